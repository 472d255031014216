#!/usr/bin/env python3
"""Ingest benchmark: DCMTK storescu -> {DCMTK storescp, Orthanc, dicomnode}, side by side in one run.

Sends a generated CT series (default 300 slices of 512x512, 16 bit) over 1 association and over 4 concurrent
associations (the series split in four) to each receiver, and prints instances/s and the ratios. All peers
run with TCP_NODELAY=1. dicomnode runs with fsync on (its default); storescp and Orthanc with theirs (neither
fsyncs). A last row, dicomnode with ``storage.fsync: false``, is a diagnostic only (never run a node like that):
the gap between the two dicomnode rows is what durability costs on this disk.

    python scripts/bench_ingest.py [--slices 300] [--repeat 3] [--receivers N] [--no-diagnostic]

Needs the Debian packages dcmtk and orthanc. Reported: the median over --repeat runs per configuration; the runs
are interleaved (every receiver once per repeat), so drift on a shared machine affects all receivers alike.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import FileMetaDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.peers import PEER_ENV, NodeProcess, Orthanc, StoreSCP, dcmtk, node_config  # noqa: E402


def generate_series(folder: Path, slices: int, size: int = 512) -> list[Path]:
    """A synthetic axial CT series with realistic headers, uncompressed explicit VR little endian."""
    from pydicom.dataset import Dataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 / (size * 0.35) ** 2 + (xx - size / 2) ** 2 / (size * 0.45) ** 2) < 1
    paths = []
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Phantom", "BENCH001", "CT"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [-250.0, -250.0, -k * 1.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.977, 0.977]
        ds.SliceThickness = 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = np.where(body, 1024 + 40, 24) + rng.integers(0, 30, (size, size))
        ds.PixelData = pixels.astype(np.uint16).tobytes()
        path = folder / f"ct{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def split(paths: list[Path], parts: int, root: Path) -> list[Path]:
    folders = []
    for i in range(parts):
        folder = root / f"part{i}"
        folder.mkdir(parents=True, exist_ok=True)
        for p in paths[i::parts]:
            (folder / p.name).symlink_to(p)
        folders.append(folder)
    return folders


def send(port: int, aec: str, folders: list[Path]) -> float:
    """Seconds for len(folders) storescu processes (one association each) to send everything."""
    start = time.perf_counter()
    procs = [subprocess.Popen([dcmtk("storescu"), "-aet", "BENCH", "-aec", aec, "+sd", "127.0.0.1", str(port),
                               str(f)], env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for f in folders]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0 or b"Store Failed" in err:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - start


def measure(receivers: list[tuple[str, Callable[[Path], tuple[int, str, Callable[[], None]]]]], one: list[Path],
            four: list[Path], n: int, repeat: int, work: Path) -> dict[str, dict[str, float]]:
    """Median rates per receiver and mode. Runs are interleaved (each repeat runs every receiver once), so a
    shared machine that slows down or speeds up during the benchmark shifts every receiver alike."""
    rates: dict[str, dict[str, list[float]]] = {name: {"1": [], "4": []} for name, _ in receivers}
    for r in range(repeat):
        for name, make in receivers:
            for mode, folders in (("1", one), ("4", four)):
                target = work / f"{name}-{mode}-{r}"
                port, aec, stop = make(target)
                try:
                    rates[name][mode].append(n / send(port, aec, folders))
                finally:
                    stop()
                    shutil.rmtree(target, ignore_errors=True)
    return {name: {mode: statistics.median(v) for mode, v in by_mode.items()} for name, by_mode in rates.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--receivers", type=int, default=os.cpu_count() or 1,
                        help="dicomnode receiver processes (default: one per core)")
    parser.add_argument("--no-diagnostic", action="store_true", help="skip the dicomnode run without fsync")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        paths = generate_series(work / "series", args.slices)
        one, four = [work / "series"], split(paths, 4, work / "split")

        def storescp(target: Path) -> tuple[int, str, Callable[[], None]]:
            scp = StoreSCP(target)
            return scp.port, scp.ae_title, scp.stop

        def orthanc(target: Path) -> tuple[int, str, Callable[[], None]]:
            pacs = Orthanc(target)
            return pacs.dicom_port, pacs.aet, pacs.stop

        def dicomnode(target: Path, fsync: bool = True) -> tuple[int, str, Callable[[], None]]:
            target.mkdir(parents=True)
            node = NodeProcess(target, node_config(target, node={"receivers": args.receivers},
                                                   storage={"path": str(target / "data"), "min_free_mb": 1,
                                                            "fsync": fsync},
                                                   completion={"quiet_seconds": 3600}, worker={"workers": 0}))
            node.start()
            return node.port, "DICOMNODE", lambda: (node.stop(), None)[1]

        receivers: list[tuple[str, Callable[[Path], tuple[int, str, Callable[[], None]]]]] = [
            ("storescp", storescp), ("orthanc", orthanc), ("dicomnode", dicomnode)]
        if not args.no_diagnostic:
            receivers.append(("(no fsync)", lambda target: dicomnode(target, fsync=False)))
        results = measure(receivers, one, four, len(paths), args.repeat, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nIngest of {args.slices} CT slices 512x512 (median of {args.repeat}), instances/s:")
    print(f"{'receiver':<12} {'1 assoc':>10} {'4 assoc':>10} {'4/1':>6}")
    for name, r in results.items():
        print(f"{name:<12} {r['1']:>10.0f} {r['4']:>10.0f} {r['4'] / r['1']:>6.2f}")
    node = results["dicomnode"]
    print("\nratios (dicomnode / reference):")
    for ref in ("storescp", "orthanc"):
        one, four = node["1"] / results[ref]["1"], node["4"] / results[ref]["4"]
        print(f"  vs {ref:<9} 1 assoc {one:.2f}x   4 assoc {four:.2f}x")
    print(f"  dicomnode 4 assoc / 1 assoc: {node['4'] / node['1']:.2f}x (receivers={args.receivers})")
    if "(no fsync)" in results:
        bare = results["(no fsync)"]
        print(f"  diagnostic, dicomnode without fsync vs storescp: 1 assoc {bare['1'] / results['storescp']['1']:.2f}x"
              f"   4 assoc {bare['4'] / results['storescp']['4']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
