#!/usr/bin/env python3
"""Ingest benchmark: DCMTK storescu -> {DCMTK storescp, Orthanc, dicomnode}, side by side in one run.

Sends a generated CT series (default 300 slices of 512x512, 16 bit) over 1 association and over 4 concurrent
associations (the series split in four) to each receiver, and prints instances/s and the ratios. All peers
run with TCP_NODELAY=1. dicomnode runs with fsync on (its default); storescp and Orthanc with theirs (neither
fsyncs). A last row, dicomnode with ``storage.fsync: false``, is a diagnostic only (never run a node like that):
the gap between the two dicomnode rows is what durability costs on this disk.

    python scripts/bench_ingest.py [--slices 300] [--repeat 3] [--receivers N] [--no-diagnostic]

Needs the Debian packages dcmtk and orthanc. Reported: the median over --repeat runs per configuration; the runs
are interleaved (every receiver once per repeat), so drift on a shared machine affects all receivers alike. Also
reported: the CPU time per instance of each receiver (all its processes) and of the senders, and from them the
most that four associations could reach on this machine's cores, where senders and receiver share them.
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
from dataclasses import dataclass
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


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and every live descendant (Linux /proc)."""
    parent, used = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        parent[int(entry)] = int(fields[1])
        used[int(entry)] = (int(fields[11]) + int(fields[12])) / _TICK
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += used.get(pid, 0.0)
        todo += [child for child, ppid in parent.items() if ppid == pid]
    return total


@dataclass
class Run:
    seconds: float
    sender_cpu: float  # CPU seconds of the storescu processes
    receiver_cpu: float  # CPU seconds of the receiver's processes over the same interval


@dataclass
class Receiver:
    port: int
    ae_title: str
    pid: int  # the receiver's process (its children are counted with it)
    stop: Callable[[], None]


def send(receiver: Receiver, folders: list[Path], work: Path) -> Run:
    """len(folders) storescu processes (one association each) send everything; their time and CPU use."""
    before = tree_cpu(receiver.pid)
    start = time.perf_counter()
    logs = [work / f"storescu-{i}.log" for i in range(len(folders))]
    procs = []
    for folder, log in zip(folders, logs, strict=True):
        with open(log, "wb") as err:
            procs.append(subprocess.Popen(
                [dcmtk("storescu"), "-aet", "BENCH", "-aec", receiver.ae_title, "+sd", "127.0.0.1",
                 str(receiver.port), str(folder)], env=PEER_ENV, stdout=subprocess.DEVNULL, stderr=err))
    sender_cpu, failed = 0.0, []
    for proc, log in zip(procs, logs, strict=True):
        _, status, usage = os.wait4(proc.pid, 0)  # reaps it, with its resource use
        proc.returncode = os.waitstatus_to_exitcode(status)
        sender_cpu += usage.ru_utime + usage.ru_stime
        text = log.read_text(errors="replace")
        if proc.returncode != 0 or "Store Failed" in text:
            failed.append(text[-500:])
    seconds = time.perf_counter() - start
    receiver_cpu = tree_cpu(receiver.pid) - before
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0]}")
    return Run(seconds, sender_cpu, receiver_cpu)


def measure(receivers: list[tuple[str, Callable[[Path], Receiver]]], one: list[Path], four: list[Path],
            repeat: int, work: Path) -> dict[str, dict[str, list[Run]]]:
    """Runs per receiver and mode. Runs are interleaved (each repeat runs every receiver once), so a shared
    machine that slows down or speeds up during the benchmark shifts every receiver alike."""
    runs: dict[str, dict[str, list[Run]]] = {name: {"1": [], "4": []} for name, _ in receivers}
    for r in range(repeat):
        for name, make in receivers:
            for mode, folders in (("1", one), ("4", four)):
                target = work / f"{name}-{mode}-{r}"
                receiver = make(target)
                try:
                    runs[name][mode].append(send(receiver, folders, work))
                finally:
                    receiver.stop()
                    shutil.rmtree(target, ignore_errors=True)
    return runs


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

        def storescp(target: Path) -> Receiver:
            scp = StoreSCP(target)
            return Receiver(scp.port, scp.ae_title, scp.proc.pid, scp.stop)

        def orthanc(target: Path) -> Receiver:
            pacs = Orthanc(target)
            assert pacs.proc is not None
            return Receiver(pacs.dicom_port, pacs.aet, pacs.proc.pid, pacs.stop)

        def dicomnode(target: Path, fsync: bool = True) -> Receiver:
            target.mkdir(parents=True)
            node = NodeProcess(target, node_config(target, node={"receivers": args.receivers},
                                                   storage={"path": str(target / "data"), "min_free_mb": 1,
                                                            "fsync": fsync},
                                                   completion={"quiet_seconds": 3600}, worker={"workers": 0}))
            node.start()
            assert node.proc is not None
            return Receiver(node.port, "DICOMNODE", node.proc.pid, lambda: (node.stop(), None)[1])

        receivers: list[tuple[str, Callable[[Path], Receiver]]] = [
            ("storescp", storescp), ("orthanc", orthanc), ("dicomnode", dicomnode)]
        if not args.no_diagnostic:
            receivers.append(("(no fsync)", lambda target: dicomnode(target, fsync=False)))
        runs = measure(receivers, one, four, args.repeat, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(runs, len(paths), args.repeat, args.receivers)
    return 0


def report(runs: dict[str, dict[str, list[Run]]], n: int, repeat: int, receivers: int) -> None:
    def median(name: str, mode: str, value: Callable[[Run], float]) -> float:
        return statistics.median(value(run) for run in runs[name][mode])

    rate = {name: {mode: median(name, mode, lambda run: n / run.seconds) for mode in "14"} for name in runs}
    print(f"\nIngest of {n} CT slices 512x512 (median of {repeat}): instances/s, and CPU ms per instance of the")
    print("receiver (all its processes) and of the storescu senders:")
    print(f"{'receiver':<12} {'1 assoc':>8} {'4 assoc':>8} {'4/1':>5}   {'CPU 1':>6} {'CPU 4':>6}   "
          f"{'sender 1':>8} {'sender 4':>8}")
    for name, r in rate.items():
        cpu = [median(name, mode, lambda run: 1000 * run.receiver_cpu / n) for mode in "14"]
        sender = [median(name, mode, lambda run: 1000 * run.sender_cpu / n) for mode in "14"]
        print(f"{name:<12} {r['1']:>8.0f} {r['4']:>8.0f} {r['4'] / r['1']:>5.2f}   {cpu[0]:>6.2f} {cpu[1]:>6.2f}   "
              f"{sender[0]:>8.2f} {sender[1]:>8.2f}")
    node = rate["dicomnode"]
    print("\nratios (dicomnode / reference):")
    for ref in ("storescp", "orthanc"):
        print(f"  vs {ref:<9} 1 assoc {node['1'] / rate[ref]['1']:.2f}x   4 assoc {node['4'] / rate[ref]['4']:.2f}x")
    print(f"  dicomnode 4 assoc / 1 assoc: {node['4'] / node['1']:.2f}x (receivers={receivers})")
    # What four associations could reach at best here: the senders and the node share this machine's cores, so
    # the rate cannot exceed cores / (CPU per instance of node + senders), however well the work overlaps.
    cores = os.cpu_count() or 1
    per_instance = median("dicomnode", "4", lambda run: (run.receiver_cpu + run.sender_cpu) / n)
    bound = cores / per_instance
    print(f"  CPU bound for 4 associations on {cores} cores: {bound:.0f}/s = {bound / node['1']:.2f}x the 1-association"
          f" rate (reached {node['4'] / bound:.0%} of it)")
    if "(no fsync)" in rate:
        bare = rate["(no fsync)"]
        print(f"  diagnostic, dicomnode without fsync vs storescp: 1 assoc {bare['1'] / rate['storescp']['1']:.2f}x"
              f"   4 assoc {bare['4'] / rate['storescp']['4']:.2f}x")


if __name__ == "__main__":
    raise SystemExit(main())
