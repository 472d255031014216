"""Pure preprocessing of volumes and their inverses: windowing, resampling, normalisation, crop and pad.

Arrays are indexed (z, y, x) = (k, j, i) like :class:`~dicomnode.imaging.volume.Volume`; affines are 4x4 maps from
the array index (k, j, i, 1) to patient LPS millimetres. Nothing here mutates its input. Every geometric
transform returns the new affine, so its inverse can put results (masks) back on the source slices.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F

from dicomnode.imaging.volume import Volume

FloatArray = npt.NDArray[np.float32]
Order = Literal["linear", "nearest"]

# (center, width) in HU
WINDOWS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (75.0, 215.0),
    "stroke": (40.0, 40.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
}


# ------------------------------------------------------------------------------------------------- windowing
def window(data: npt.NDArray[np.floating], center: float, width: float) -> FloatArray:
    """Linear window (DICOM VOI, center/width in the data's units): center - width/2 -> 0, + width/2 -> 1,
    clipped to [0, 1], float32, same shape."""
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    scaled = (np.asarray(data, dtype=np.float32) - np.float32(low)) / np.float32(width)
    return np.asarray(np.clip(scaled, 0.0, 1.0), dtype=np.float32)


def window_volume(volume: Volume, preset: str = "series") -> FloatArray:
    """Window a volume with a preset name from :data:`WINDOWS` or ``"series"`` (the series' own window)."""
    if preset == "series":
        if volume.window is None:
            raise ValueError("the series has no window of its own (WindowCenter/WindowWidth)")
        return window(volume.data, *volume.window)
    if preset not in WINDOWS:
        raise ValueError(f"unknown window preset {preset!r}; known: {', '.join(sorted(WINDOWS))}, series")
    return window(volume.data, *WINDOWS[preset])


def to_uint8(windowed: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    """[0, 1] floats to 0..255 (rounded)."""
    return np.asarray(np.rint(np.clip(windowed, 0.0, 1.0) * 255.0), dtype=np.uint8)


# ------------------------------------------------------------------------------------------------ resampling
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def target_grid(shape: tuple[int, ...], affine: npt.NDArray[np.float64],
                spacing: tuple[float, float, float]) -> tuple[tuple[int, int, int], npt.NDArray[np.float64]]:
    """Grid with the same directions and voxel (0,0,0) centre, voxel size ``spacing`` (z, y, x) mm, covering
    the same extent: returns (shape, affine)."""
    old = np.linalg.norm(affine[:3, :3], axis=0)
    sizes = zip(shape, old, spacing, strict=True)
    new_shape = tuple(max(1, int(np.floor((n - 1) * o / s + 1e-6)) + 1) for n, o, s in sizes)
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] / old * np.asarray(spacing, dtype=np.float64)
    return (new_shape[0], new_shape[1], new_shape[2]), new_affine


def resample(data: Volume | npt.NDArray[np.generic], affine: npt.NDArray[np.float64] | None = None,
             target_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), order: Order = "linear",
             device: torch.device | str | None = None,
             ) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """Resample a volume (or a (z, y, x) array with its ``affine``) to ``target_spacing`` mm (z, y, x).

    Returns (array, new_affine). Linear or nearest interpolation (use nearest for labels: the dtype is kept);
    samples outside the source take the nearest edge value. Runs on ``device`` (default: CUDA when present).
    Inverse: :func:`resample_to` with the source's shape and affine.
    """
    array, src_affine = (data.data, data.affine) if isinstance(data, Volume) else (data, affine)
    if src_affine is None:
        raise ValueError("an affine is needed to resample a bare array")
    shape, new_affine = target_grid(array.shape, src_affine, target_spacing)
    return resample_to(array, src_affine, shape, new_affine, order, device), new_affine


def resample_to(array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], shape: tuple[int, int, int],
                target_affine: npt.NDArray[np.float64], order: Order = "linear",
                device: torch.device | str | None = None) -> npt.NDArray[np.generic]:
    """Sample ``array`` (grid ``affine``) at the voxel centres of the grid (``shape``, ``target_affine``).

    The exact inverse of :func:`resample`: called with the source's shape and affine, it puts results back on
    the source slices. Axis-aligned maps (same directions) use separable 1D interpolation along each axis;
    oblique ones use ``grid_sample``. Out-of-source samples take the nearest edge value.
    """
    dev = torch.device(device) if device is not None else default_device()
    index_map = np.linalg.inv(affine) @ target_affine  # target index -> source index
    axis_aligned = np.allclose(index_map[:3, :3], np.diag(np.diag(index_map[:3, :3])), atol=1e-9)
    if axis_aligned and order == "linear" and dev.type == "cpu" and array.ndim == 3:
        coords = [index_map[a, a] * np.arange(shape[a]) + index_map[a, 3] for a in range(3)]
        try:
            return _linear_separable_cpu(np.ascontiguousarray(array, dtype=np.float32), coords)
        except _NonFinite:
            pass  # NaN or infinity: the gather path below keeps them where they are
    src = torch.from_numpy(np.ascontiguousarray(array)).to(dev)
    work = src if order == "nearest" else src.to(torch.float32)
    if axis_aligned:
        # axes that shrink the data first, so later passes move less memory
        for axis in sorted(range(3), key=lambda a: shape[a] / max(array.shape[a], 1)):
            coords_1d = index_map[axis, axis] * np.arange(shape[axis]) + index_map[axis, 3]
            work = _sample_axis(work, axis, coords_1d, order)
    else:
        work = _grid_sample(work, index_map, shape, order)
    out = work.cpu().numpy()
    return out if order == "nearest" else out.astype(np.float32, copy=False)


@dataclass(frozen=True)
class _Band:
    """Linear interpolation along one axis as a banded matrix cut into dense blocks.

    Output samples ``[start, stop)`` are ``source[..., low:high] @ weights`` (two non-zero weights per
    column, ``1 - w`` and ``w``, at the sample's two neighbours; coordinates clamped to the edges).
    """

    start: int
    stop: int
    low: int
    high: int
    weights: FloatArray  # (high - low, stop - start)


def _bands(coords: npt.NDArray[np.float64], size: int, block: int = 64) -> list[_Band] | None:
    """The blocks of one axis, or None when the axis is sampled exactly at its own voxels (nothing to do)."""
    clipped = np.clip(coords, 0, size - 1)
    if len(coords) == size and np.array_equal(clipped, np.arange(size)):
        return None
    low = np.floor(clipped).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    frac = (clipped - low).astype(np.float32)
    bands = []
    for start in range(0, len(coords), block):
        i = np.arange(start, min(start + block, len(coords)))
        first, last = int(low[i].min()), int(high[i].max()) + 1  # coordinates may run backwards (flips)
        weights = np.zeros((last - first, len(i)), dtype=np.float32)
        np.add.at(weights, (low[i] - first, i - start), 1 - frac[i])
        np.add.at(weights, (high[i] - first, i - start), frac[i])
        bands.append(_Band(start, start + len(i), first, last, weights))
    return bands


class _NonFinite(ValueError):
    """The data holds NaN or infinity, which a banded product would spread (0 x inf) within a block."""


def _linear_separable_cpu(array: FloatArray, coords: list[npt.NDArray[np.float64]], chunk: int = 4,
                          ) -> FloatArray:
    """Trilinear resampling of an axis-aligned map on the CPU, each axis a banded matrix product.

    Linear interpolation along an axis is a product with a matrix that has two non-zero weights per output
    sample; cut into 64-sample blocks it becomes a few small dense products that BLAS runs at full speed,
    straight from the source into the destination (no gathered copies). The in-plane axes run slab by slab
    (``chunk`` slices, buffers that stay in cache), the slice axis last over whole slices, or first when it
    shrinks. Raises _NonFinite for data with NaN or infinity (checked slab by slab while the slab is in
    cache anyway), for which the caller takes the gather path.
    """
    y_bands, x_bands = (_bands(c, n) for c, n in zip(coords[1:], array.shape[1:], strict=True))
    z_bands = _bands(coords[0], array.shape[0], block=16)
    in_plane_first = z_bands is None or len(coords[0]) >= array.shape[0]
    if not (in_plane_first and (y_bands or x_bands)) and not np.isfinite(np.sum(array, dtype=np.float32)):
        raise _NonFinite()
    if in_plane_first:
        return _in_plane_then_slices(array, z_bands, y_bands, x_bands, chunk)
    return _in_plane(_slice_pass(array, z_bands), y_bands, x_bands, chunk)


def _slice_pass(array: FloatArray, bands: list[_Band] | None) -> FloatArray:
    """Interpolate along axis 0 (slices): each output slice is a weighted sum of two source slices."""
    if bands is None:
        return array
    flat = array.reshape(array.shape[0], -1)
    out = np.empty((bands[-1].stop,) + array.shape[1:], dtype=np.float32)
    flat_out = out.reshape(out.shape[0], -1)
    for band in bands:
        _mm(band.weights.T, flat[band.low: band.high], flat_out[band.start: band.stop])
    return out


def _mm(a: FloatArray, b: FloatArray, out: FloatArray) -> None:
    """out = a @ b on numpy views without copies, by torch's BLAS (threads: ``torch.set_num_threads``)."""
    torch.mm(torch.from_numpy(a), torch.from_numpy(b), out=torch.from_numpy(out))


def _in_plane_then_slices(array: FloatArray, z_bands: list[_Band] | None, rows: list[_Band] | None,
                          cols: list[_Band] | None, chunk: int) -> FloatArray:
    """In-plane passes, then the slice pass, band of output slices by band: the in-plane results a band needs
    go to a small buffer (slices shared with the previous band are copied over), never to a whole
    intermediate volume."""
    if z_bands is None or (rows is None and cols is None):
        return _slice_pass(_in_plane(array, rows, cols, chunk), z_bands)
    ny, nx = rows[-1].stop if rows is not None else array.shape[1], cols[-1].stop if cols is not None else \
        array.shape[2]
    out = np.empty((z_bands[-1].stop, ny, nx), dtype=np.float32)
    depth = max(b.high - b.low for b in z_bands)
    buffers = [np.empty((depth, ny, nx), dtype=np.float32) for _ in range(2)]
    held, held_low, held_high = buffers[1][:0], 0, 0
    for i, band in enumerate(z_bands):
        stack = buffers[i % 2][: band.high - band.low]
        reuse = max(0, min(held_high, band.high) - band.low) if held_low <= band.low else 0
        stack[:reuse] = held[band.low - held_low: band.low - held_low + reuse]
        _in_plane(array[band.low + reuse: band.high], rows, cols, chunk, out=stack[reuse:])
        _mm(band.weights.T, stack.reshape(len(stack), -1),
            out[band.start: band.stop].reshape(band.stop - band.start, -1))
        held, held_low, held_high = stack, band.low, band.high
    return out


def _in_plane(array: FloatArray, rows: list[_Band] | None, cols: list[_Band] | None, chunk: int,
              out: FloatArray | None = None) -> FloatArray:
    """Interpolate along axes 1 (rows) and 2 (columns), ``chunk`` slices at a time (into ``out`` if given)."""
    if rows is None and cols is None:
        return array
    n = array.shape[0]
    ny = rows[-1].stop if rows is not None else array.shape[1]
    nx = cols[-1].stop if cols is not None else array.shape[2]
    out = np.empty((n, ny, nx), dtype=np.float32) if out is None else out
    row_t = [np.ascontiguousarray(b.weights.T) for b in rows] if rows is not None else []
    buffer = np.empty((chunk, ny, array.shape[2]), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        slab = array[start:stop]
        if not np.isfinite(np.sum(slab, dtype=np.float32)):
            raise _NonFinite()
        if rows is not None:
            target = buffer[: stop - start] if cols is not None else out[start:stop]
            for band, weights in zip(rows, row_t, strict=True):
                for z in range(stop - start):
                    _mm(weights, slab[z, band.low: band.high], target[z, band.start: band.stop])
            slab = target
        if cols is not None:
            flat, flat_out = slab.reshape(-1, slab.shape[2]), out[start:stop].reshape(-1, nx)
            for band in cols:
                _mm(flat[:, band.low: band.high], band.weights, flat_out[:, band.start: band.stop])
    return out


def _sample_axis(data: torch.Tensor, axis: int, coords: npt.NDArray[np.float64], order: Order,
                 ) -> torch.Tensor:
    """1D interpolation along ``axis`` at source indices ``coords`` (clamped to the edges).

    Uses advanced indexing (a gather of whole rows), which on CPU is several times faster than index_select.
    """
    size = data.shape[axis]
    coords = np.clip(coords, 0, size - 1)
    where: list[slice | torch.Tensor] = [slice(None)] * data.dim()
    if order == "nearest":
        where[axis] = torch.from_numpy(np.floor(coords + 0.5).astype(np.int64)).to(data.device)
        return data[tuple(where)]
    low = np.floor(coords).astype(np.int64)
    high = np.minimum(low + 1, size - 1)
    view = [1] * data.dim()
    view[axis] = len(coords)
    weight = torch.from_numpy((coords - low).astype(np.float32)).to(data.device).reshape(view)
    where[axis] = torch.from_numpy(low).to(data.device)
    a = data[tuple(where)]
    where[axis] = torch.from_numpy(high).to(data.device)
    return a.lerp_(data[tuple(where)], weight)


def _grid_sample(data: torch.Tensor, index_map: npt.NDArray[np.float64], shape: tuple[int, int, int],
                 order: Order, chunk: int = 32) -> torch.Tensor:
    """General affine resampling with grid_sample (align_corners=True), chunked along the output z."""
    src = data.to(torch.float32)[None, None]
    size_in = np.array(data.shape, dtype=np.float64)
    out = torch.empty(shape, dtype=torch.float32, device=data.device)
    mode = "nearest" if order == "nearest" else "bilinear"
    jj, ii = torch.meshgrid(torch.arange(shape[1], device=data.device, dtype=torch.float64),
                            torch.arange(shape[2], device=data.device, dtype=torch.float64), indexing="ij")
    m = torch.from_numpy(index_map).to(data.device)
    for start in range(0, shape[0], chunk):
        kk = torch.arange(start, min(start + chunk, shape[0]), device=data.device, dtype=torch.float64)
        n = len(kk)
        idx = torch.stack((kk[:, None, None].expand(n, *jj.shape), jj.expand(n, *jj.shape),
                           ii.expand(n, *ii.shape)), dim=-1)
        src_idx = idx @ m[:3, :3].T + m[:3, 3]  # (k, j, i) source indices
        norm = 2.0 * src_idx / torch.from_numpy(np.maximum(size_in - 1, 1)).to(data.device) - 1.0
        grid = norm.flip(-1).to(torch.float32)[None]  # grid_sample wants (x, y, z) = (i, j, k)
        out[start: start + len(kk)] = F.grid_sample(src, grid, mode=mode, padding_mode="border",
                                                     align_corners=True)[0, 0]
    return out.to(data.dtype) if order == "nearest" else out


# ------------------------------------------------------------------------------------------- normalisation
def clip_hu(data: npt.NDArray[np.floating], low: float = -1000.0, high: float = 1000.0) -> FloatArray:
    """Clip values to [low, high] (HU for CT), float32."""
    return np.clip(np.asarray(data, dtype=np.float32), low, high)


def zscore(data: npt.NDArray[np.floating], mask: npt.NDArray[np.bool_] | None = None,
           ) -> tuple[FloatArray, tuple[float, float]]:
    """(data - mean) / std over ``mask`` (or all voxels); returns (array, (mean, std)). See unzscore."""
    values = np.asarray(data, dtype=np.float32)
    ref = values[mask] if mask is not None else values
    mean, std = float(ref.mean()), float(ref.std())
    std = std if std > 0 else 1.0
    return (values - np.float32(mean)) / np.float32(std), (mean, std)


def unzscore(data: npt.NDArray[np.floating], stats: tuple[float, float]) -> FloatArray:
    return np.asarray(data, dtype=np.float32) * np.float32(stats[1]) + np.float32(stats[0])


def minmax(data: npt.NDArray[np.floating], low: float | None = None, high: float | None = None,
           ) -> tuple[FloatArray, tuple[float, float]]:
    """Map [low, high] (default: the data's min and max) to [0, 1], clipping; returns (array, (low, high))."""
    values = np.asarray(data, dtype=np.float32)
    lo = float(values.min()) if low is None else low
    hi = float(values.max()) if high is None else high
    scale = hi - lo if hi > lo else 1.0
    return np.clip((values - np.float32(lo)) / np.float32(scale), 0.0, 1.0), (lo, hi)


def unminmax(data: npt.NDArray[np.floating], bounds: tuple[float, float]) -> FloatArray:
    return np.asarray(data, dtype=np.float32) * np.float32(bounds[1] - bounds[0]) + np.float32(bounds[0])


# ------------------------------------------------------------------------------------------------ crop / pad
@dataclass(frozen=True)
class Crop:
    """A box in a source grid: ``start`` and ``stop`` (exclusive) per axis (z, y, x), 0-based indices."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]
    source_shape: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return (slice(self.start[0], self.stop[0]), slice(self.start[1], self.stop[1]),
                slice(self.start[2], self.stop[2]))


def bounding_box(mask: npt.NDArray[np.bool_], margin: int = 0) -> Crop:
    """Smallest box holding every True voxel of ``mask``, grown by ``margin`` voxels (clipped to the grid)."""
    if not mask.any():
        raise ValueError("empty mask has no bounding box")
    shape = (int(mask.shape[0]), int(mask.shape[1]), int(mask.shape[2]))
    where = np.argwhere(mask)
    lo = np.maximum(where.min(axis=0) - margin, 0)
    hi = np.minimum(where.max(axis=0) + 1 + margin, shape)
    return Crop((int(lo[0]), int(lo[1]), int(lo[2])), (int(hi[0]), int(hi[1]), int(hi[2])), shape)


def crop(array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], box: Crop,
         ) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64]]:
    """Cut ``box`` out of ``array``; returns (copy, affine of the crop). Inverse: :func:`uncrop`."""
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ np.asarray(box.start, dtype=np.float64) + affine[:3, 3]
    return np.array(array[box.slices]), new_affine


def uncrop(array: npt.NDArray[np.generic], box: Crop, fill: float = 0) -> npt.NDArray[np.generic]:
    """Put a cropped array back into a ``fill``-valued array of the source shape."""
    out = np.full(box.source_shape, fill, dtype=array.dtype)
    out[box.slices] = array
    return out


def pad_to_shape(array: npt.NDArray[np.generic], affine: npt.NDArray[np.float64], shape: tuple[int, int, int],
                 fill: float = 0) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.float64], Crop]:
    """Pad (centred) to at least ``shape``; returns (array, affine, where the input sits). Inverse: index the
    result with the returned box's ``slices``."""
    before = [max(0, (t - n) // 2) for n, t in zip(array.shape, shape, strict=True)]
    after = [max(0, t - n - b) for n, t, b in zip(array.shape, shape, before, strict=True)]
    out = np.pad(array, list(zip(before, after, strict=True)), constant_values=fill)
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, 3] - affine[:3, :3] @ np.asarray(before, dtype=np.float64)
    start = (before[0], before[1], before[2])
    stop = (before[0] + array.shape[0], before[1] + array.shape[1], before[2] + array.shape[2])
    return out, new_affine, Crop(start, stop, (out.shape[0], out.shape[1], out.shape[2]))
