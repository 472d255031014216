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

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class SliceSource:
    """Where one slice of a volume came from."""

    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int | None = None  # 1-based frame of a multi-frame object; None for single-frame images


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
