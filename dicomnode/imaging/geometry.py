"""Slice geometry of a series: order along the normal, spacing checks, and regridding of irregular stacks.

:func:`stack_geometry` sorts :class:`~dicomnode.imaging.frames.Frame` objects by the projection of
ImagePositionPatient on the slice normal (row cosine x column cosine), checks that they form one stack
(same matrix, orientation and pixel spacing; no duplicate positions, no missing slices) and builds the
index-to-LPS affine of :class:`~dicomnode.imaging.volume.Volume` (columns: slice step, row step, column step, origin).

A stack is *irregular* when its positions are sheared off the normal (gantry tilt) or its spacing is
unequal. :func:`regularise` then resamples it onto a regular orthogonal grid the way dcm2niix does (its
``_Tilt_`` / ``_Eq_`` outputs): in-plane shifts for the tilt, linear interpolation along the normal for the
spacing. All distances are millimetres; array axes are (z, y, x) = (slice, row, column).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicomnode.errors import VolumeError
from dicomnode.imaging.frames import Frame


@dataclass(frozen=True)
class Tolerances:
    """See :class:`~dicomnode.imaging.volume.VolumeOptions`, which these mirror."""

    min_slices: int
    reject_irregular: bool
    gap_factor: float
    spacing_tolerance: float
    tilt_tolerance_deg: float


@dataclass(frozen=True)
class Geometry:
    order: tuple[int, ...]  # frame indices in slice order
    affine: npt.NDArray[np.float64]  # of the stack as acquired (before any regularisation)
    distances: npt.NDArray[np.float64]  # position of each ordered slice along the normal, from the first, mm
    irregular: bool  # tilted or unequally spaced: needs regularise()
    tilted: bool
    notes: tuple[str, ...]


def where(frame: Frame, paths: Sequence[Path]) -> str:
    """File name (and 1-based frame number) of ``frame``, for error messages."""
    name = Path(paths[frame.file_index]).name
    return name if frame.frame_index is None else f"{name} frame {frame.frame_index + 1}"


def check_uniform(frames: Sequence[Frame], paths: Sequence[Path]) -> None:
    """One matrix size, one orientation and one pixel spacing (1e-4 tolerance) for every frame."""
    sizes = sorted({(f.rows, f.cols) for f in frames})
    if len(sizes) > 1:
        raise VolumeError(f"mixed matrix sizes: {', '.join(f'{r}x{c}' for r, c in sizes)} (rows x columns)")
    ref = frames[0]
    for f in frames[1:]:
        if not np.allclose(f.orientation, ref.orientation, atol=1e-4):
            raise VolumeError(f"mixed orientations: ImageOrientationPatient of {where(f, paths)} "
                              f"{np.round(f.orientation, 4).tolist()} differs from {where(ref, paths)} "
                              f"{np.round(ref.orientation, 4).tolist()}")
        if not np.allclose(f.pixel_spacing, ref.pixel_spacing, atol=1e-4):
            raise VolumeError(f"mixed pixel spacings: {f.pixel_spacing} in {where(f, paths)} "
                              f"vs {ref.pixel_spacing} in {where(ref, paths)}")


def stack_geometry(frames: Sequence[Frame], paths: Sequence[Path], tol: Tolerances) -> Geometry:
    """Sort frames along the normal and check spacing: duplicates, missing slices, tilt, unequal spacing."""
    check_uniform(frames, paths)
    row_cos, col_cos = frames[0].orientation[:3], frames[0].orientation[3:]
    normal = np.cross(row_cos, col_cos)
    proj = np.array([f.position @ normal for f in frames])
    order = tuple(int(i) for i in np.argsort(proj, kind="stable"))
    pos = np.array([frames[k].position for k in order])
    dist = proj[list(order)] - proj[order[0]]
    steps = np.diff(dist)
    for k in np.flatnonzero(steps < 0.01):
        a, b = frames[order[k]], frames[order[k + 1]]
        raise VolumeError(f"duplicate positions: {where(a, paths)} and {where(b, paths)} both at "
                          f"{np.round(a.position, 2).tolist()} mm")
    if len(frames) < tol.min_slices:
        raise VolumeError(f"too few slices: {len(frames)} (at least {tol.min_slices} needed)")
    dy, dx = frames[0].pixel_spacing
    affine = np.eye(4)
    affine[:3, 1], affine[:3, 2], affine[:3, 3] = col_cos * dy, row_cos * dx, pos[0]
    if len(frames) == 1:
        affine[:3, 0] = normal * 1.0
        return Geometry(order, affine, dist, False, False, ("single slice: slice step set to 1 mm",))
    median = float(np.median(steps))
    check_gaps(steps, median, [frames[k] for k in order], paths, tol.gap_factor)
    unequal = bool(np.max(np.abs(steps - median)) > max(0.02, tol.spacing_tolerance * median))
    shear = np.diff(pos, axis=0) - np.outer(steps, normal)
    tilt = float(np.degrees(np.max(np.arctan2(np.linalg.norm(shear, axis=1), steps))))
    tilted = tilt > tol.tilt_tolerance_deg
    notes: list[str] = []
    if tilted:
        notes.append(f"gantry tilt / sheared stack: {tilt:.2f} deg between slice positions and the normal")
    if unequal:
        notes.append(f"unequal slice spacing: {steps.min():.3f}-{steps.max():.3f} mm (median {median:.3f})")
    if (tilted or unequal) and tol.reject_irregular:
        raise VolumeError("irregular geometry rejected: " + "; ".join(notes))
    affine[:3, 0] = (pos[-1] - pos[0]) / (len(frames) - 1)
    return Geometry(order, affine, dist, tilted or unequal, tilted, tuple(notes))


def check_gaps(steps: npt.NDArray[np.float64], median: float, ordered: Sequence[Frame],
               paths: Sequence[Path], gap_factor: float) -> None:
    """A gap > gap_factor x median that is about a whole multiple (>= 2) of it means missing slices."""
    for k, step in enumerate(steps):
        ratio = step / median
        if ratio > gap_factor and round(ratio) >= 2 and abs(ratio - round(ratio)) < 0.15:
            raise VolumeError(
                f"missing slices: gap of {step:.2f} mm ({ratio:.1f}x the {median:.2f} mm spacing, about "
                f"{round(ratio) - 1} slice(s) missing) between {where(ordered[k], paths)} and "
                f"{where(ordered[k + 1], paths)} (slices {k} and {k + 1} of {len(ordered)})")


def regularise(data: npt.NDArray[np.float32], ordered: Sequence[Frame], geometry: Geometry, fill: float,
               ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], list[str]]:
    """Resample a sheared and/or unequally spaced stack onto a regular orthogonal grid, as dcm2niix does.

    1. Tilt: each slice is shifted in its own plane (linear interpolation) so that all slices stack along the
       normal; the in-plane grid grows by the total shift (whole pixels) and new pixels get ``fill``.
    2. Unequal spacing: slices are interpolated linearly along the normal onto equal steps, with dcm2niix's
       rule (nii_makeEquidistant): the smallest step, but at most twice as many slices as acquired.
    Returns (data, affine, notes); the affine's columns are normal, column cosine, row cosine.
    """
    ref = ordered[0]
    row_cos, col_cos = ref.orientation[:3], ref.orientation[3:]
    dy, dx = ref.pixel_spacing
    notes: list[str] = []
    origin = ref.position.copy()
    if geometry.tilted:
        data, (lo_r, lo_c) = _untilt(data, ordered, fill)
        origin = origin + lo_r * dy * col_cos + lo_c * dx * row_cos
        notes.append(f"tilt corrected: slices shifted in-plane onto an orthogonal {data.shape[1]}x"
                     f"{data.shape[2]} grid (linear interpolation)")
    dist = geometry.distances
    data, step = equidistant(data, dist)
    if len(dist) != data.shape[0] or not np.allclose(dist, np.arange(len(dist)) * step, atol=0.02):
        notes.append(f"resampled along the normal to {data.shape[0]} slices at {step:.3f} mm (linear)")
    affine = np.eye(4)
    affine[:3, 0] = np.cross(row_cos, col_cos) * step
    affine[:3, 1], affine[:3, 2], affine[:3, 3] = col_cos * dy, row_cos * dx, origin
    return data, affine, notes


def _untilt(data: npt.NDArray[np.float32], ordered: Sequence[Frame], fill: float,
            ) -> tuple[npt.NDArray[np.float32], tuple[int, int]]:
    """Shift each slice in-plane by its offset from the first slice's position; returns the grown stack and
    the (row, column) index of the old origin's pixel in it, negated (the new origin's offset in pixels)."""
    ref = ordered[0]
    row_cos, col_cos = ref.orientation[:3], ref.orientation[3:]
    dy, dx = ref.pixel_spacing
    rel = np.array([f.position - ref.position for f in ordered])
    shift_rows, shift_cols = rel @ col_cos / dy, rel @ row_cos / dx
    lo_r, hi_r = int(np.floor(min(shift_rows.min(), 0) + 1e-6)), int(np.ceil(max(shift_rows.max(), 0) - 1e-6))
    lo_c, hi_c = int(np.floor(min(shift_cols.min(), 0) + 1e-6)), int(np.ceil(max(shift_cols.max(), 0) - 1e-6))
    n, rows, cols = data.shape
    canvas = np.full((n, rows + hi_r - lo_r, cols + hi_c - lo_c), fill, dtype=np.float32)
    for k in range(n):
        padded = np.full(canvas.shape[1:], fill, dtype=np.float32)
        padded[:rows, :cols] = data[k]
        ndimage.shift(padded, (shift_rows[k] - lo_r, shift_cols[k] - lo_c), output=canvas[k], order=1,
                      mode="constant", cval=fill)
    return canvas, (lo_r, lo_c)


def equidistant(data: npt.NDArray[np.float32], dist: npt.NDArray[np.float64],
                ) -> tuple[npt.NDArray[np.float32], float]:
    """Linear interpolation of slices at distances ``dist`` (ascending, from 0) onto equal steps."""
    n = len(dist)
    steps = np.diff(dist)
    if np.allclose(steps, steps.mean(), atol=0.02):
        return data, float(dist[-1] / (n - 1))
    step = float(steps.min())
    count = int(np.ceil((dist[-1] - 0.5 * steps[-1]) / step))
    if count > 2 * n:
        count = 2 * n
        step = float(dist[-1] / (count - 1))
    out = np.empty((count,) + data.shape[1:], dtype=np.float32)
    for s in range(count):
        d = min(s * step, float(dist[-1]))
        hi = min(int(np.searchsorted(dist, d, side="left")), n - 1)
        lo = max(hi - 1, 0)
        w = 0.0 if hi == lo else (d - dist[lo]) / (dist[hi] - dist[lo])
        out[s] = data[lo] * np.float32(1 - w) + data[hi] * np.float32(w)
    return out, step
