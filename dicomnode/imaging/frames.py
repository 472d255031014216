"""The 2D frames of a series' files: single-frame images, and multi-frame objects' functional groups.

A :class:`Frame` is one 2D image, either a single-frame file or one frame of an Enhanced (multi-frame) object,
with what :mod:`dicomnode.imaging.geometry` needs to place it (ImagePositionPatient, ImageOrientationPatient,
PixelSpacing, in LPS mm) and what :mod:`dicomnode.imaging.pixels` needs to rescale it (RescaleSlope/Intercept).
For multi-frame objects each attribute comes from the frame's Per-Frame Functional Groups item, else from the
Shared Functional Groups (PS3.3 C.7.6.16).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from dicomnode.errors import VolumeError


@dataclass(frozen=True)
class SliceSource:
    """Where one slice of a volume came from."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None  # 1-based frame of a multi-frame object; None for single-frame images


@dataclass(frozen=True)
class Frame:
    """One 2D image: a single-frame file or one frame of a multi-frame file, with its geometry and rescale."""

    file_index: int
    frame_index: int | None  # 0-based frame in a multi-frame file
    source: SliceSource
    position: npt.NDArray[np.float64]  # ImagePositionPatient, LPS mm
    orientation: npt.NDArray[np.float64]  # ImageOrientationPatient (row cosine, column cosine)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    slope: float
    intercept: float
    rescale_type: str | None
    rows: int
    cols: int


def functional_group(ds: Dataset, frame: int, name: str) -> Dataset | None:
    """Item 0 of functional group ``name`` for ``frame`` (0-based): per-frame first, then shared."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        inner = seq[index].get(name) if seq is not None and len(seq) > index else None
        if inner is not None and len(inner) > 0:
            item: Dataset = inner[0]
            return item
    return None


def _floats(value: object, count: int, what: str, name: str) -> npt.NDArray[np.float64]:
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise VolumeError(f"not an image with geometry: {name} has no valid {what}") from exc
    if arr.shape != (count,):
        raise VolumeError(f"not an image with geometry: {name} has an invalid {what}")
    return arr


_Geo = tuple[object, object, object]  # (ImagePositionPatient, ImageOrientationPatient, PixelSpacing) values


def _multi_frame_attributes(ds: Dataset, f: int, name: str) -> tuple[_Geo, Dataset]:
    """Geometry and the rescale item (a Dataset, maybe empty) of frame ``f`` from the functional groups."""
    pos_item = functional_group(ds, f, "PlanePositionSequence")
    ori_item = functional_group(ds, f, "PlaneOrientationSequence")
    pm_item = functional_group(ds, f, "PixelMeasuresSequence")
    pv_item = functional_group(ds, f, "PixelValueTransformationSequence")
    if pos_item is None or ori_item is None or pm_item is None:
        raise VolumeError(f"not an image with geometry: {name} frame {f + 1} lacks plane position, "
                          "orientation or pixel measures")
    geo = (pos_item.get("ImagePositionPatient"), ori_item.get("ImageOrientationPatient"),
           pm_item.get("PixelSpacing"))
    return geo, (pv_item if pv_item is not None else Dataset())


def frames_of(index: int, ds: Dataset, path: Path) -> list[Frame]:
    """The 2D frames of file number ``index``, with geometry from the top level or the functional groups."""
    name = Path(path).name
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise VolumeError(f"not a grayscale image: {name} has SamplesPerPixel {ds.SamplesPerPixel}")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    multi = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if n_frames > 1 and not multi:
        raise VolumeError(f"not supported: {name} is multi-frame without functional groups")
    sop_instance, sop_class = str(ds.SOPInstanceUID), str(ds.SOPClassUID)
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = []
    for f in range(n_frames):
        if multi:
            geo, src = _multi_frame_attributes(ds, f, name)
        else:
            geo, src = (ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"),
                        ds.get("PixelSpacing")), ds
        if geo[0] is None or geo[1] is None or geo[2] is None:
            raise VolumeError(f"not an image with geometry: {name} lacks ImagePositionPatient, "
                              "ImageOrientationPatient or PixelSpacing")
        spacing = _floats(geo[2], 2, "PixelSpacing", name)
        frames.append(Frame(
            file_index=index,
            frame_index=f if multi or n_frames > 1 else None,
            source=SliceSource(sop_instance, sop_class, f + 1 if multi else None),
            position=_floats(geo[0], 3, "ImagePositionPatient", name),
            orientation=_floats(geo[1], 6, "ImageOrientationPatient", name),
            pixel_spacing=(float(spacing[0]), float(spacing[1])),
            slope=float(src.get("RescaleSlope", 1.0) or 1.0),
            intercept=float(src.get("RescaleIntercept", 0.0) or 0.0),
            rescale_type=str(src["RescaleType"].value) if "RescaleType" in src else None,
            rows=rows,
            cols=cols,
        ))
    return frames
