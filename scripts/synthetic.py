"""Realistic test series for benchmarks: a real chest CT re-sliced to any number of thin slices.

``resliced_ct(source_dir, out_dir, slices)`` loads a real axial CT series (default P01 from ../shared/data),
interpolates it linearly along the slice axis to ``slices`` slices over the same extent, and writes them as
a new series (new Study/Series/SOP Instance UIDs, the source's other header attributes), uncompressed, int16
with RescaleIntercept 0. Real anatomy, so the lung masks and models have something true to find.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from dicomnode.imaging.files import find_dicom_files
from dicomnode.imaging.volume import load_series

REPO = Path(__file__).resolve().parents[1]
P01 = REPO.parent / "shared" / "data" / "P01_ct_chest_philips_brilliance16_5mm_lungkernel"


def resliced_ct(out_dir: Path, slices: int = 300, source_dir: Path = P01) -> list[Path]:
    """Write a ``slices``-slice version of an axial CT series to ``out_dir``; return the file paths."""
    files = find_dicom_files([source_dir])
    volume = load_series(files)
    data = ndimage.zoom(volume.data, (slices / volume.shape[0], 1, 1), order=1)
    template = pydicom.dcmread(files[0], stop_before_pixels=True)
    first = volume.affine[:3, 3]
    step = volume.affine[:3, 0] * (volume.shape[0] - 1) / max(slices - 1, 1)
    study, series = generate_uid(), generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(slices):
        ds = copy.deepcopy(template)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesDescription = f"resliced {slices} x {float(np.linalg.norm(step)):.2f} mm"
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in first + k * step]
        ds.SliceThickness = round(float(np.linalg.norm(step)), 4)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = 1, 0
        for keyword in ("SmallestImagePixelValue", "LargestImagePixelValue", "PixelPaddingValue"):
            if keyword in ds:
                delattr(ds, keyword)
        ds.PixelData = np.clip(np.rint(data[k]), -1024, 3071).astype("<i2").tobytes()
        path = out_dir / f"ct{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
