"""Benchmark: load + HU of a generated 300x512x512 CT series vs a plain pydicom loop; torch vs scipy resample.

    python scripts/bench_volume.py [--slices 300] [--repeat 7] [--only load|resample]
    python scripts/bench_volume.py --threads 2   # torch intra-op threads (default 1: one core vs scipy's one)

Every round runs each candidate once, back to back, and the ratios are medians over rounds, so that a load
change on a shared machine hits both sides of a ratio alike.

The series is written to a temporary folder with realistic CT headers (CT Image Storage, explicit VR little
endian, 16-bit signed, slope 1, intercept -1024, 0.7 mm pixels, 1.25 mm slices, shuffled file names).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from dicomnode.imaging.preprocess import resample
from dicomnode.imaging.volume import load_series


def make_series(folder: Path, slices: int, size: int = 512) -> list[Path]:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) ** 2 / (0.35 * size) ** 2 + (xx - size / 2) ** 2 / (0.45 * size) ** 2) < 1
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in rng.permutation(slices):
        noise = rng.normal(0, 20, (size, size))
        stored = np.where(body, 1024 + 40 + noise, 24 + noise).astype(np.int16)
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer, ds.PatientID, ds.PatientName = "CT", "BENCH", "BENCH", "Bench^Series"
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [-179.0, -179.0, float(-200 + 1.25 * k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.25
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = stored.tobytes()
        path = folder / f"{generate_uid()[-12:]}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def plain_loop(paths: list[Path]) -> np.ndarray:
    """What a careful script does: read, decode, sort by z, stack, rescale."""
    items = []
    for p in paths:
        ds = pydicom.dcmread(p)
        items.append((float(ds.ImagePositionPatient[2]), ds.pixel_array, float(ds.RescaleSlope),
                      float(ds.RescaleIntercept)))
    items.sort(key=lambda t: t[0])
    stack = np.stack([a for _, a, _, _ in items]).astype(np.float32)
    slopes = np.array([s for _, _, s, _ in items], np.float32)[:, None, None]
    intercepts = np.array([i for _, _, _, i in items], np.float32)[:, None, None]
    return stack * slopes + intercepts


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, Callable[[], object]], repeat: int) -> dict[str, list[float]]:
    """Run every candidate once per round, ``repeat`` rounds (plus one warm-up round, not counted), so that
    each ratio compares runs taken moments apart on a machine whose load changes."""
    for fn in candidates.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            times[name].append(timed(fn))
    return times


def ratios(times: dict[str, list[float]], ours: str, other: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of time[ours] / time[other]."""
    r = np.array(times[ours]) / np.array(times[other])
    return float(np.median(r)), float(r.min()), float(r.max())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=7, help="rounds; ratios are medians over rounds")
    parser.add_argument("--only", choices=["load", "resample"], help="run one benchmark")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for the resample")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str, float, float, float, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_series(Path(tmp), args.slices)
        volume = load_series(paths)
        assert np.array_equal(volume.data, plain_loop(paths))
        if args.only != "resample":
            t = interleaved({"plain": lambda: plain_loop(paths), "ours": lambda: load_series(paths)}, args.repeat)
            med, lo, hi = ratios(t, "ours", "plain")
            rows.append((f"load+HU {volume.shape}", "load_series / pydicom loop", float(np.median(t["ours"])),
                         float(np.median(t["plain"])), med, f"{lo:.2f}-{hi:.2f}  (target <= 1.0)"))
    if args.only != "load":
        rows.extend(_resample_rows(volume.data, volume.affine, volume.spacing, args.repeat))
    print(f"{'benchmark':<34} {'comparison':<34} {'ours s':>7} {'ref s':>7} {'ratio':>6}  range over "
          f"{args.repeat} rounds")
    for name, what, ours, ref, med, extra in rows:
        print(f"{name:<34} {what:<34} {ours:7.3f} {ref:7.3f} {med:6.2f}  {extra}")


def _resample_rows(data: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float], repeat: int,
                   ) -> list[tuple[str, str, float, float, float, str]]:
    target = (1.0, 1.0, 1.0)
    out, new_affine = resample(data, affine, target, device="cpu")
    index_map = np.linalg.inv(affine) @ new_affine
    t = interleaved({
        "torch": lambda: resample(data, affine, target, device="cpu"),
        "affine": lambda: ndimage.affine_transform(data, index_map[:3, :3], index_map[:3, 3],
                                                   output_shape=out.shape, order=1, mode="nearest"),
        "zoom": lambda: ndimage.zoom(data, np.array(spacing) / np.array(target), order=1),
    }, repeat)
    name = f"resample {data.shape}->{out.shape}"
    rows = []
    for ref, label in (("affine", "scipy affine_transform / torch"), ("zoom", "scipy zoom / torch")):
        med, lo, hi = ratios(t, ref, "torch")
        rows.append((name, label, float(np.median(t["torch"])), float(np.median(t[ref])), med,
                     f"{lo:.2f}-{hi:.2f}  (target >= 4.0; {torch.get_num_threads()} torch thread(s))"))
    return rows


if __name__ == "__main__":
    main()
