"""Benchmark: load + HU of a generated 300x512x512 CT series vs a plain pydicom loop; torch vs scipy resample.

    python scripts/bench_volume.py [--slices 300] [--repeat 2]

The series is written to a temporary folder with realistic CT headers (CT Image Storage, explicit VR little
endian, 16-bit signed, slope 1, intercept -1024, 0.7 mm pixels, 1.25 mm slices, shuffled file names).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from dicomnode.preprocess import resample
from dicomnode.volume import load_series


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


def best(fn: object, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_series(Path(tmp), args.slices)
        volume = load_series(paths)
        assert np.array_equal(volume.data, plain_loop(paths))
        t_plain = best(lambda: plain_loop(paths), args.repeat)
        t_ours = best(lambda: load_series(paths), args.repeat)
    print(f"load+HU {volume.shape}: plain pydicom loop {t_plain:.2f} s, load_series {t_ours:.2f} s, "
          f"ratio {t_ours / t_plain:.2f}x (target <= 1.0)")
    data, affine = volume.data, volume.affine
    target = (1.0, 1.0, 1.0)
    out, new_affine = resample(data, affine, target, device="cpu")
    index_map = np.linalg.inv(affine) @ new_affine
    t_torch = best(lambda: resample(data, affine, target, device="cpu"), args.repeat)
    t_scipy = best(lambda: ndimage.affine_transform(data, index_map[:3, :3], index_map[:3, 3],
                                                    output_shape=out.shape, order=1, mode="nearest"), 1)
    t_zoom = best(lambda: ndimage.zoom(data, np.array(volume.spacing) / np.array(target), order=1), 1)
    print(f"resample {data.shape} -> {out.shape} linear: torch {t_torch:.2f} s, scipy affine_transform "
          f"{t_scipy:.2f} s ({t_scipy / t_torch:.1f}x), scipy zoom {t_zoom:.2f} s ({t_zoom / t_torch:.1f}x) "
          "(target >= 4x)")


if __name__ == "__main__":
    main()
