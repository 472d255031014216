"""Per-label measurements of a label volume, computed once and shared by the SR and the pictures.

For each described label :func:`measure_labels` makes one boolean mask (limited to the slices that contain any
label) and reduces it to what every encoder needs: the voxel count, the voxel-count profile along each array
axis (z, y, x: 0-based indices of the label volume), the bounding box, and the sum of the volume's values over
the label's voxels (float64). The centre of mass follows exactly from the profiles (sum of index x count over
the count), so no encoder has to touch the full (z, y, x) array again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicomnode.imaging.labels import LabelInfo, LabelVolume
from dicomnode.imaging.volume import Volume

Profile = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class LabelMeasure:
    """One label: voxel count, per-axis profiles and the sum of the volume's values over its voxels.

    ``profiles[a][i]`` is the number of the label's voxels with index ``i`` along array axis ``a`` (z, y, x).
    ``value_sum`` is in the volume's units (HU for CT), 0.0 for an empty label.
    """

    info: LabelInfo
    voxels: int
    profiles: tuple[Profile, Profile, Profile]
    value_sum: float

    @property
    def mean(self) -> float | None:
        """Mean of the volume's values over the label's voxels; None when the label is empty."""
        return self.value_sum / self.voxels if self.voxels else None

    def centre(self) -> npt.NDArray[np.float64]:
        """Centre of mass in array index space (z, y, x), 0-based; ValueError for an empty label."""
        if not self.voxels:
            raise ValueError(f"label {self.info.value} is empty")
        return centre_of_profiles(self.profiles)

    def bounds(self) -> tuple[slice, slice, slice]:
        """The smallest (z, y, x) box holding all of the label's voxels (empty slices for an empty label)."""
        out = []
        for profile in self.profiles:
            present = np.flatnonzero(profile)
            out.append(slice(int(present[0]), int(present[-1]) + 1) if present.size else slice(0, 0))
        return out[0], out[1], out[2]


@dataclass(frozen=True, eq=False)
class LabelMeasures:
    """The measures of every described label, in the order of ``LabelVolume.labels``."""

    shape: tuple[int, int, int]
    labels: tuple[LabelMeasure, ...]

    def of(self, value: int) -> LabelMeasure:
        for item in self.labels:
            if item.info.value == value:
                return item
        raise KeyError(value)

    def slices_with_labels(self) -> npt.NDArray[np.intp]:
        """Increasing 0-based slice (z) indices that contain a voxel of any described label."""
        total = np.zeros(self.shape[0], dtype=np.int64)
        for item in self.labels:
            total += item.profiles[0]
        return np.flatnonzero(total)

    def centre(self) -> npt.NDArray[np.float64] | None:
        """Centre of mass (z, y, x index space) of all described labels together; None when all are empty."""
        if not any(item.voxels for item in self.labels):
            return None
        summed = tuple(sum((item.profiles[a] for item in self.labels), np.zeros(self.shape[a], np.int64))
                       for a in range(3))
        return centre_of_profiles((summed[0], summed[1], summed[2]))


def centre_of_profiles(profiles: tuple[Profile, Profile, Profile]) -> npt.NDArray[np.float64]:
    """Centre of mass (index space) of a mask from its per-axis voxel-count profiles."""
    total = float(profiles[0].sum())
    return np.array([float(np.dot(np.arange(p.size, dtype=np.float64), p)) / total for p in profiles])


def measure_labels(volume: Volume, labels: LabelVolume, *, chunk: int = 16) -> LabelMeasures:
    """Measures of every label of ``labels`` (on ``volume``'s grid; values summed from ``volume.data``).

    Voxels of label values without a :class:`~dicomnode.imaging.labels.LabelInfo` are ignored. Works through the
    slices that contain labels ``chunk`` slices at a time with one small reused mask buffer: no temporary
    as large as the volume (allocating one costs more than the arithmetic on it).
    """
    data, values = labels.data, volume.data
    shape = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
    along_z = {info.value: np.zeros(shape[0], dtype=np.int64) for info in labels.labels}
    planes = {info.value: np.zeros(shape[1:], dtype=np.int64) for info in labels.labels}  # (y, x) counts
    sums = dict.fromkeys(along_z, 0.0)
    occupied = np.flatnonzero(data.reshape(shape[0], -1).max(axis=1))
    buffer = np.empty((chunk, *shape[1:]), dtype=np.bool_)
    for z0 in range(int(occupied[0]) if occupied.size else 0, int(occupied[-1]) + 1 if occupied.size else 0,
                    chunk):
        part, part_values = data[z0:z0 + chunk], values[z0:z0 + chunk]
        mask = buffer[: part.shape[0]]
        for value in along_z:
            np.equal(part, value, out=mask)
            along_z[value][z0:z0 + part.shape[0]] = mask.reshape(part.shape[0], -1).sum(axis=1)
            planes[value] += mask.sum(axis=0, dtype=np.uint16)
            sums[value] += float(part_values[mask].sum(dtype=np.float64))
    out = []
    for info in labels.labels:
        plane = planes[info.value]
        out.append(LabelMeasure(info, int(along_z[info.value].sum()),
                                (along_z[info.value], plane.sum(axis=1), plane.sum(axis=0)), sums[info.value]))
    return LabelMeasures(shape, tuple(out))
