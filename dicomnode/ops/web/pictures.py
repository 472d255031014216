"""What the status page shows of a job's derived objects, read from the outbox files.

- :func:`thumbnail_png`: a Secondary Capture (or any image object) as a PNG no larger than ``size`` pixels
  on its longer side; the first frame of a multi-frame object; monochrome images windowed to their range.
- :func:`seg_segments`: the SEG's segments (number, label, display colour as sRGB).
- :func:`sr_measurements`: per tracking identifier, the SR's Volume (mL) and mean value (HU) of TID 1500
  measurement groups, as :mod:`dicomnode.outputs.sr` writes them.
- :func:`patient_ids`: PatientName and PatientID of a received file (shown only with ``ui.show_patient_ids``).

Every function reads one file and raises ``OSError`` or ``ValueError`` (pydicom's errors included) when it
cannot; callers show "unreadable" rather than fail the page.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset

VOLUME_CODE = "118565006"  # SCT Volume
ATTENUATION_CODE = "112031"  # DCM Attenuation Coefficient
TRACKING_ID_CODE = "112039"  # DCM Tracking Identifier


@dataclass(frozen=True)
class Segment:
    number: int
    label: str
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Measurement:
    volume_ml: float | None
    mean: float | None
    mean_unit: str


@dataclass(frozen=True)
class PictureInfo:
    series_description: str
    instance_number: int


def _as_uint8(frame: np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    if frame.dtype == np.uint8:
        return frame
    lo, hi = float(frame.min()), float(frame.max())
    scaled = (frame.astype(np.float32) - lo) * (255.0 / (hi - lo) if hi > lo else 0.0)
    return np.asarray(np.clip(scaled, 0, 255), dtype=np.uint8)


def thumbnail_png(path: Path, size: int) -> bytes:
    """The object's (first) frame as PNG bytes, at most ``size`` pixels wide or high (aspect kept)."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    samples = int(ds.get("SamplesPerPixel", 1))
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        frames = frames[0]
    if samples == 3 and str(ds.PhotometricInterpretation).startswith("YBR"):
        from pydicom.pixels.processing import convert_color_space  # noqa: PLC0415

        frames = convert_color_space(frames, str(ds.PhotometricInterpretation), "RGB")
    image = Image.fromarray(_as_uint8(np.asarray(frames)), "RGB" if samples == 3 else "L")
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        image = Image.eval(image, lambda v: 255 - v)
    image.thumbnail((size, size))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def picture_info(path: Path) -> PictureInfo:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesDescription", "InstanceNumber"])
    return PictureInfo(str(ds.get("SeriesDescription", "")), int(ds.get("InstanceNumber", 0) or 0))


def _lab_to_rgb(value: Any) -> tuple[int, int, int]:
    from highdicom.color import CIELabColor  # noqa: PLC0415 - only pages that show a SEG need it

    if value is None:
        return (128, 128, 128)
    r, g, b = CIELabColor.from_dicom_value([int(v) for v in value]).to_rgb(clip=True)
    return (int(r), int(g), int(b))


def seg_segments(path: Path) -> list[Segment]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return [Segment(int(s.SegmentNumber), str(s.SegmentLabel), _lab_to_rgb(s.get("RecommendedDisplayCIELabValue")))
            for s in ds.get("SegmentSequence", [])]


def _items(items: Any) -> Iterator[Dataset]:
    for item in items or []:
        yield item
        yield from _items(item.get("ContentSequence"))


def _code(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else ""


def _number(item: Dataset) -> tuple[float, str] | None:
    values = item.get("MeasuredValueSequence")
    if not values:
        return None
    unit = values[0].get("MeasurementUnitsCodeSequence")
    return float(values[0].NumericValue), str(unit[0].CodeValue) if unit else ""


def sr_measurements(path: Path) -> dict[str, Measurement]:
    """Tracking identifier -> measurement, for every measurement group of the SR."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    found: dict[str, Measurement] = {}
    for group in _items(ds.get("ContentSequence")):
        if group.get("ValueType") != "CONTAINER" or not group.get("ContentSequence"):
            continue
        children = list(group.ContentSequence)
        names = [str(c.TextValue) for c in children if _code(c) == TRACKING_ID_CODE and "TextValue" in c]
        if not names:
            continue
        volume = next((_number(c) for c in children if _code(c) == VOLUME_CODE), None)
        mean = next((_number(c) for c in children if _code(c) == ATTENUATION_CODE), None)
        found[names[0]] = Measurement(volume[0] if volume else None, mean[0] if mean else None,
                                      "HU" if mean and mean[1] == "[hnsf'U]" else (mean[1] if mean else ""))
    return found


def patient_ids(path: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientName", "PatientID"])
    return str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))
