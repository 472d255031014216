"""The Volume: a series' voxels with the geometry that places them in the patient.

Contract (every stage after loading relies on it):

- ``data`` is a float32 array indexed ``data[k, j, i]`` = (slice, row, column), i.e. (z, y, x).
- ``affine`` is a 4x4 float64 matrix mapping the *array index* ``(k, j, i, 1)`` to the centre of that voxel in
  patient LPS coordinates in millimetres (DICOM patient coordinate system: +x towards patient Left, +y towards
  Posterior, +z towards Superior). Column 0 is the slice step, column 1 the row step (down a column of the
  image, i.e. ImageOrientationPatient[3:6] * PixelSpacing[0]), column 2 the column step
  (ImageOrientationPatient[0:3] * PixelSpacing[1]), column 3 the position of voxel (0, 0, 0).
- Slices are ordered by increasing projection of ImagePositionPatient on the slice normal
  (row direction x column direction), never by InstanceNumber or file name.
- CT values are Hounsfield units (RescaleSlope/Intercept applied per slice); other modalities are in the
  scanner's units after any rescale. ``units`` says which.
- ``slices[k]`` names the source instance (and 1-based frame number for multi-frame objects) of slice k. When
  the volume was resampled onto a new grid (gantry tilt, unequal spacing) slices no longer map one-to-one to
  sources and ``slices`` is empty; ``sources`` always lists every source instance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.errors import VolumeError
from dicomnode.imaging.files import is_dicom_file
from dicomnode.imaging.frames import Frame, SliceSource, frames_of, functional_group
from dicomnode.imaging.geometry import Tolerances, regularise, stack_geometry
from dicomnode.imaging.pixels import AIR_HU, OUTSIDE_SCAN_HU, SourceFile, decode_stack, fill_value, read_all

__all__ = ["AIR_HU", "OUTSIDE_SCAN_HU", "SliceSource", "Volume", "VolumeOptions", "load_series",
           "load_series_dir"]


@dataclass(frozen=True, eq=False)
class Volume:
    """Voxel data (z, y, x) float32 with a 4x4 index-to-LPS-mm affine. See the module docstring."""

    data: npt.NDArray[np.float32]
    affine: npt.NDArray[np.float64]
    modality: str
    units: str  # "HU" for CT, otherwise a description such as "MR signal"
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    slices: tuple[SliceSource, ...]  # one per slice k, or empty when resampled (see module docstring)
    sources: tuple[SliceSource, ...]  # every source instance/frame, in slice order where that exists
    headers: tuple[Dataset, ...] = field(repr=False)  # source datasets without PixelData, one per source file
    window: tuple[float, float] | None = None  # the series' own (center, width), if it has one
    notes: tuple[str, ...] = ()  # what loading did that a person should know (e.g. "tilt 18.5 deg resampled")

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.data.shape
        return (int(z), int(y), int(x))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (z, y, x): the lengths of the affine's first three columns."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def direction(self) -> npt.NDArray[np.float64]:
        """3x3 matrix whose columns are the unit LPS directions of the (z, y, x) array axes."""
        return np.asarray(self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0), dtype=np.float64)


# ------------------------------------------------------------------------------------------------- loading
@dataclass(frozen=True)
class VolumeOptions:
    """How strict :func:`load_series` is.

    ``irregular``: what to do with a gantry tilt (positions not along the slice normal) or unequal slice
    spacing: ``"resample"`` onto a regular orthogonal grid (recorded in ``Volume.notes``) or ``"reject"``
    (VolumeError).
    ``gap_factor``: a gap between neighbouring slices larger than ``gap_factor`` x the median spacing that is
    close to a whole multiple of it (2x, 3x, ...) is a missing slice and always an error.
    ``spacing_tolerance``: relative tolerance (of the median spacing, at least 0.02 mm) for "equal" spacing.
    ``tilt_tolerance_deg``: slice-position shear below this angle is treated as no tilt.
    ``workers``: threads used to decode compressed files.
    """

    min_slices: int = 3
    irregular: Literal["resample", "reject"] = "resample"
    gap_factor: float = 1.5
    spacing_tolerance: float = 0.01
    tilt_tolerance_deg: float = 0.05
    workers: int = 4

    def tolerances(self) -> Tolerances:
        return Tolerances(self.min_slices, self.irregular == "reject", self.gap_factor,
                          self.spacing_tolerance, self.tilt_tolerance_deg)


def load_series_dir(folder: Path, options: VolumeOptions = VolumeOptions()) -> Volume:
    """Load every DICOM file (recognised by its 'DICM' preamble, not its name) in ``folder`` as one volume."""
    paths = [p for p in sorted(Path(folder).iterdir()) if p.is_file() and is_dicom_file(p)]
    if not paths:
        raise VolumeError(f"no DICOM files in {folder}")
    return load_series(paths, options=options)


def load_series(paths: Sequence[Path], *, options: VolumeOptions = VolumeOptions()) -> Volume:
    """Read the files of one series into a :class:`Volume` (z, y, x) float32 with an index-to-LPS affine.

    Slices are sorted by the projection of ImagePositionPatient on the slice normal; spacing comes from the
    positions (never SliceThickness). Pixel data is decoded once, straight into the final float32 array, with
    each slice's (or frame's) RescaleSlope/Intercept applied (see :mod:`dicomnode.imaging.pixels`). For CT,
    PixelPaddingValue (and the padding range) and values <= -2000 HU (outside the scan field) become air,
    -1000 HU; for other modalities padding becomes 0. Gantry tilt and unequal spacing are resampled or
    rejected per ``options`` (see :mod:`dicomnode.imaging.geometry`).

    Raises VolumeError for: not DICOM / not an image, more than one SeriesInstanceUID, mixed matrix sizes,
    mixed orientations or pixel spacings, duplicate positions, missing slices, too few slices, irregular
    geometry when ``options.irregular == "reject"``.
    """
    files = read_all(paths)
    _check_same_series(files)
    datasets = [f.dataset for f in files]
    frames = [f for i, ds in enumerate(datasets) for f in frames_of(i, ds, paths[i])]
    geometry = stack_geometry(frames, paths, options.tolerances())
    ordered = [frames[k] for k in geometry.order]
    first = datasets[0]
    modality = str(first.get("Modality", ""))
    data = decode_stack(files, ordered, modality, options.workers)
    notes = list(geometry.notes)
    affine = geometry.affine
    if geometry.irregular:
        data, affine, more = regularise(data, ordered, geometry, fill_value(modality))
        notes.extend(more)
    units, unit_notes = _units(modality, ordered, first)
    sources = tuple(f.source for f in ordered)
    return Volume(
        data=data,
        affine=affine,
        modality=modality,
        units=units,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "")),
        slices=() if geometry.irregular else sources,
        sources=sources,
        headers=tuple(datasets),
        window=_window(first),
        notes=tuple(notes + unit_notes),
    )


def _check_same_series(files: Sequence[SourceFile]) -> None:
    uids = sorted({str(f.dataset.get("SeriesInstanceUID", "")) for f in files})
    if len(uids) > 1:
        raise VolumeError(f"more than one series: {len(uids)} SeriesInstanceUIDs among {len(files)} files")


def _units(modality: str, ordered: Sequence[Frame], first: Dataset) -> tuple[str, list[str]]:
    """'HU' for CT without a RescaleType (or RescaleType HU), else the RescaleType or '<modality> signal'."""
    types = {f.rescale_type for f in ordered if f.rescale_type}
    notes: list[str] = []
    rescale_type = sorted(types)[0] if types else None
    if modality == "CT" and rescale_type in (None, "HU"):
        units = "HU"
    elif rescale_type:
        units = rescale_type
        notes.append(f"values are RescaleType {rescale_type!r}, not Hounsfield units")
    else:
        units = f"{modality or 'unknown'} signal"
    rwv = functional_group(first, 0, "RealWorldValueMappingSequence")
    if rwv is not None and "MeasurementUnitsCodeSequence" in rwv:
        code = rwv.MeasurementUnitsCodeSequence[0]
        notes.append(f"real-world value mapping available: {rwv.get('LUTExplanation', '')} "
                     f"[{code.get('CodeValue', '')}]")
    return units, notes


def _window(ds: Dataset) -> tuple[float, float] | None:
    """The series' own first (center, width), from the top level or the Frame VOI LUT functional group."""
    item: Dataset | None = ds if "WindowCenter" in ds else functional_group(ds, 0, "FrameVOILUTSequence")
    if item is None or "WindowCenter" not in item or "WindowWidth" not in item:
        return None
    center, width = item.WindowCenter, item.WindowWidth
    center = center[0] if isinstance(center, MultiValue) else center
    width = width[0] if isinstance(width, MultiValue) else width
    return (float(center), float(width))
