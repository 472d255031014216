"""Classical (threshold and morphology) masks of CT volumes: body, lungs with airways, brain.

All functions take a :class:`~dicomnode.imaging.volume.Volume` in Hounsfield units (z, y, x) and return a
:class:`~dicomnode.imaging.labels.LabelVolume` on exactly its grid. They work in 3D with ``scipy.ndimage`` on an
in-plane grid subsampled by an integer factor (pixels of about 1.5 mm); the labels are mapped back by
repeating each coarse pixel over the block of fine pixels it was sampled from, so every source pixel gets
exactly the label of its block.

The lung method follows the classic "seed tutorial 004" recipe: threshold between air and tissue, air outside
the body (what touches the image border) removed, holes filled slice by slice, the largest air components
kept, left and right lungs told apart by patient side from the affine (patient left is +x in LPS), airways
(trachea, main bronchi) found as small air regions near the midline connected to the top of the scan.

To be fast (a 300x512x512 chest in about 1.5 s on one core) each step runs once in 3D: per-slice
operations use structures with no extent along z (one ``ndimage.label`` call labels every slice), component
sizes come from one ``np.bincount``, in-plane 3x3 erosions and dilations are shifted boolean ``&``/``|``
(what ``scipy.ndimage`` computes, with a zero border), everything after the body works on the bounding box of
the body and then of the lungs, and the nearest-core fill that separates touching lungs is decided on a grid
of about 3.4 mm.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from dicomnode.imaging.labels import AIRWAYS, BODY, BRAIN, LUNG_LEFT, LUNG_RIGHT, LabelVolume
from dicomnode.imaging.volume import Volume

ALGORITHM_VERSION = "1.1"  # 1.1: faster left/right split, may differ from 1.0 at the lungs' contact line
BoolArray = npt.NDArray[np.bool_]
Box = tuple[slice, slice, slice]

# 4-connected within each axial slice, nothing across slices: one label call labels every slice on its own.
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


def _factor(volume: Volume, target_mm: float = 1.5) -> int:
    """In-plane subsampling factor giving pixels of about ``target_mm`` (at least 1)."""
    return max(1, int(round(target_mm / max(min(volume.spacing[1:]), 1e-3))))


def _coarse(volume: Volume, factor: int) -> npt.NDArray[np.float32]:
    """The in-plane subsampled grid, as a view (no copy): coarse pixel (j, i) is fine pixel (j, i) * factor."""
    return volume.data[:, ::factor, ::factor]


def _paint(out: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8], start: tuple[int, int, int],
           factor: int) -> None:
    """Write coarse ``labels`` (whose voxel (0, 0, 0) is coarse voxel ``start``) into the fine grid ``out``:
    each coarse pixel labels the factor x factor block of fine pixels it was sampled from."""
    k0, j0, i0 = start
    depth, rows, cols = labels.shape
    target = out[k0: k0 + depth, j0 * factor: (j0 + rows) * factor, i0 * factor: (i0 + cols) * factor]
    for dj in range(factor):
        for di in range(factor):
            part = target[:, dj::factor, di::factor]
            part[...] = labels[:, : part.shape[1], : part.shape[2]]


def _box(mask: BoolArray, margin: int = 1) -> Box | None:
    """Bounding box of ``mask`` grown by ``margin`` voxels in-plane (clipped to the array); None if empty."""
    ks = np.flatnonzero(mask.any(axis=(1, 2)))
    if ks.size == 0:
        return None
    plane = np.asarray(np.any(mask[ks[0]: ks[-1] + 1], axis=0))
    js, is_ = np.flatnonzero(np.any(plane, axis=1)), np.flatnonzero(np.any(plane, axis=0))
    return (slice(int(ks[0]), int(ks[-1]) + 1),
            slice(max(0, int(js[0]) - margin), min(mask.shape[1], int(js[-1]) + 1 + margin)),
            slice(max(0, int(is_[0]) - margin), min(mask.shape[2], int(is_[-1]) + 1 + margin)))


def _start(box: Box, origin: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int]:
    """First voxel of ``box``, in the coordinates where the boxed array's voxel (0, 0, 0) is ``origin``."""
    return (origin[0] + int(box[0].start), origin[1] + int(box[1].start), origin[2] + int(box[2].start))


def _erode(mask: BoolArray) -> BoolArray:
    """``ndimage.binary_erosion`` with a (1, 3, 3) structure (border value 0), as two 1D passes."""
    rows = np.empty_like(mask)
    rows[:, :1] = rows[:, -1:] = False
    np.logical_and(mask[:, :-2], mask[:, 1:-1], out=rows[:, 1:-1])
    rows[:, 1:-1] &= mask[:, 2:]
    out = np.empty_like(mask)
    out[:, :, :1] = out[:, :, -1:] = False
    np.logical_and(rows[:, :, :-2], rows[:, :, 1:-1], out=out[:, :, 1:-1])
    out[:, :, 1:-1] &= rows[:, :, 2:]
    return out


def _dilate(mask: BoolArray) -> BoolArray:
    """``ndimage.binary_dilation`` with a (1, 3, 3) structure, as two 1D passes."""
    rows = mask.copy()
    rows[:, 1:] |= mask[:, :-1]
    rows[:, :-1] |= mask[:, 1:]
    out = rows.copy()
    out[:, :, 1:] |= rows[:, :, :-1]
    out[:, :, :-1] |= rows[:, :, 1:]
    return out


def _open(mask: BoolArray) -> BoolArray:
    """``ndimage.binary_opening`` with a (1, 3, 3) structure: removes anything thinner than 3 pixels."""
    return _dilate(_erode(mask))


def _components(mask: BoolArray, structure: BoolArray | None = None,
                ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Connected components (6-connectivity unless told otherwise) and their sizes (index 0 = background,
    size 0), from one label call and one bincount."""
    labelled = np.empty(mask.shape, dtype=np.intp)
    n = int(ndimage.label(mask, structure=structure, output=labelled))
    sizes = np.bincount(labelled.ravel(), minlength=n + 1)
    sizes[0] = 0
    return labelled, sizes


def _largest(mask: BoolArray, count: int = 1, structure: BoolArray | None = None) -> BoolArray:
    """The ``count`` largest connected components of ``mask`` (6-connectivity unless told otherwise),
    labelled on the mask's bounding box."""
    out = np.zeros(mask.shape, dtype=bool)
    box = _box(mask, margin=0)
    if box is None:
        return out
    labelled, sizes = _components(mask[box], structure)
    keep = [int(i) for i in np.argsort(sizes)[::-1][:count] if sizes[i] > 0]
    crop = out[box]
    for i in keep:
        crop |= labelled == i
    return out


def _fill_slices(mask: BoolArray) -> BoolArray:
    """Fill holes in each axial slice (k) separately, as ``ndimage.binary_fill_holes`` does per slice: a hole
    is background not 4-connected in its slice to the slice's border (checked on the mask's bounding box
    with a one-pixel background margin, which is equivalent)."""
    box = _box(mask)
    if box is None:
        return mask.copy()
    labelled = np.empty(mask[box].shape, dtype=np.int32)
    n = int(ndimage.label(~mask[box], structure=_IN_PLANE, output=labelled))
    hole = np.ones(n + 1, dtype=bool)
    hole[0] = False
    for edge in (labelled[:, 0, :], labelled[:, -1, :], labelled[:, :, 0], labelled[:, :, -1]):
        hole[edge] = False
    out = mask.copy()
    out[box] |= hole[labelled]
    return out


def _body(hu: npt.NDArray[np.float32], threshold_hu: float) -> BoolArray:
    """HU > threshold, opened in-plane, largest 3D component, holes filled per slice; computed on the
    bounding box of the tissue with a one-pixel margin (where the opening is the same as on the full grid)."""
    tissue = hu > threshold_hu
    body = np.zeros(tissue.shape, dtype=bool)
    box = _box(tissue)
    if box is not None:
        body[box] = _fill_slices(_largest(_open(tissue[box])))
    return body


def body_mask(volume: Volume, threshold_hu: float = -500.0) -> LabelVolume:
    """Body (label BODY=1): HU > ``threshold_hu``, largest 3D component, holes filled per axial slice.

    Table and clothing thinner than ~2 pixels are removed by a small in-plane opening.
    """
    factor = _factor(volume)
    body = _body(_coarse(volume, factor), threshold_hu)
    data = np.zeros(volume.shape, dtype=np.uint8)
    box = _box(body, margin=0)
    if box is not None:
        _paint(data, body[box].view(np.uint8), _start(box), factor)
    return LabelVolume(data, (BODY,), "dicomnode-classical-body", ALGORITHM_VERSION)


def _airways(air: BoolArray, mids: npt.NDArray[np.float64], pixel_mm: float) -> BoolArray:
    """Trachea and main bronchi: per-slice air components under 4 cm2, centred within 25 mm of the body's
    midline (``mids[k]``, a column index; NaN where slice k has no body), connected in 3D to such a component
    in the most superior slice that has one."""
    labelled, sizes = _components(air, _IN_PLANE)  # every slice labelled on its own
    where = np.flatnonzero(labelled)
    ids = labelled.ravel()[where]
    rows, cols = air.shape[1:]
    centre = np.bincount(ids, weights=(where % cols).astype(np.float64), minlength=sizes.size) \
        / np.maximum(sizes, 1)
    slice_of = np.zeros(sizes.size, dtype=np.intp)
    slice_of[ids] = where // (rows * cols)  # a component lies in one slice
    with np.errstate(invalid="ignore"):
        ok = (sizes > 0) & (sizes <= 400.0 / (pixel_mm * pixel_mm)) \
            & (np.abs(centre - mids[slice_of]) * pixel_mm < 25.0)
    small = ok[labelled]
    box = _box(small, margin=0)
    if box is None:
        return small
    labelled, sizes = _components(small[box])
    top = labelled[-1]  # the most superior slice with a candidate: the last of the box
    seeds = np.zeros(sizes.size, dtype=bool)
    seeds[top[top > 0]] = True
    airways = np.zeros_like(small)
    airways[box] = seeds[labelled]
    return airways


def _two_largest(mask: BoolArray) -> tuple[npt.NDArray[np.intp], int, int] | None:
    """Labels of ``mask`` and its two largest components, if the second is at least 10% of the first."""
    labelled, sizes = _components(mask)
    if sizes.size < 3:
        return None
    a, b = (int(x) for x in np.argsort(sizes)[::-1][:2])
    return (labelled, a, b) if sizes[b] > 0 and sizes[b] >= 0.1 * sizes[a] else None


def _nearest_core(cores: npt.NDArray[np.uint8], steps: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """For every voxel the value of the nearest non-zero voxel of ``cores`` (Euclidean, in voxel units),
    decided on the grid sampled every ``steps`` voxels and repeated back; cores keep their own value."""
    low = cores[:: steps[0], :: steps[1], :: steps[2]]
    if not low.any():
        low = cores
        steps = (1, 1, 1)
    index = ndimage.distance_transform_edt(low == 0, sampling=steps, return_distances=False,
                                           return_indices=True)
    grown = low[tuple(index)]
    for axis, step in enumerate(steps):
        if step > 1:
            grown = np.repeat(grown, step, axis=axis)
    grown = grown[: cores.shape[0], : cores.shape[1], : cores.shape[2]]
    return np.where(cores > 0, cores, grown)


def _split_sides(lungs: BoolArray, steps: tuple[int, int, int], max_erosions: int = 15,
                 ) -> tuple[BoolArray, BoolArray]:
    """Two lungs, each one 3D component: if they touch, erode in-plane until two big cores separate, grow the
    cores back to every lung voxel by nearest core (decided every ``steps`` voxels) and keep the largest
    component of each side. Without erosion the two largest components are the lungs (nearest-core growth
    would only add smaller, unconnected components, which the largest-component step drops)."""
    eroded = lungs
    found = _two_largest(lungs)
    erosions = 0
    while found is None and erosions < max_erosions:
        eroded = _erode(eroded)
        found = _two_largest(eroded)
        erosions += 1
    if found is None:
        return _largest(lungs), np.zeros_like(lungs)
    labelled, a, b = found
    if erosions == 0:
        return np.asarray(labelled == a), np.asarray(labelled == b)
    cores = (labelled == a).view(np.uint8) + 2 * (labelled == b).view(np.uint8)
    grown = _nearest_core(cores, steps)
    return _largest(lungs & (grown == 1)), _largest(lungs & (grown == 2))


def _centroid(mask: BoolArray) -> tuple[float, float, float]:
    """Centre of mass (k, j, i) of a non-empty mask, from its three axis profiles."""
    total = float(np.count_nonzero(mask))
    profiles = (mask.sum(axis=(1, 2)), mask.sum(axis=(0, 2)), mask.sum(axis=(0, 1)))
    k, j, i = (float(np.dot(p, np.arange(p.size))) / total for p in profiles)
    return k, j, i


def _patient_right_first(volume: Volume, a: BoolArray, b: BoolArray, start: tuple[int, int, int],
                         factor: int) -> tuple[BoolArray, BoolArray]:
    """Order two masks (on the coarse grid, offset by ``start``) as (patient right, patient left) by the LPS
    x of their centroids (left = +x)."""
    def x_mm(mask: BoolArray) -> float:
        k, j, i = _centroid(mask)
        index = np.array([k + start[0], (j + start[1]) * factor, (i + start[2]) * factor, 1.0])
        return float((volume.affine @ index)[0])

    if not b.any():
        return (a, b) if x_mm(a) < float(volume.affine[0, 3] + volume.affine[0, 2] * volume.shape[2] / 2) \
            else (b, a)
    return (a, b) if x_mm(a) < x_mm(b) else (b, a)


def _midlines(body: BoolArray) -> npt.NDArray[np.float64]:
    """Per slice, the column half-way between the body's leftmost and rightmost columns (NaN if no body)."""
    cols = np.asarray(np.any(body, axis=1))
    present = np.any(cols, axis=1)
    first = np.argmax(cols, axis=1)
    last = cols.shape[1] - 1 - np.argmax(cols[:, ::-1], axis=1)
    return np.where(present, 0.5 * (first + last), np.nan)


def _lung_labels(volume: Volume, hu: npt.NDArray[np.float32], body: BoolArray, threshold_hu: float,
                 factor: int, start: tuple[int, int, int]) -> tuple[npt.NDArray[np.uint8], Box] | None:
    """Lung labels on the bounding box of the lung air (within the body's box ``hu``/``body``, which starts
    at coarse voxel ``start``), and that box; None without air in the body."""
    air = (hu < threshold_hu) & body
    labelled, sizes = _components(air)
    keep = [int(i) for i in np.argsort(sizes)[::-1][:2] if sizes[i] > 0 and sizes[i] >= 0.1 * sizes.max()]
    if not keep:
        return None
    air = labelled == keep[0]
    if len(keep) > 1:
        air |= labelled == keep[1]
    box = _box(air)
    if box is None:
        return None
    air = air[box]
    pixel_mm = float(min(volume.spacing[1:])) * factor
    airways = _airways(air, _midlines(body[box[0]]) - box[2].start, pixel_mm)
    lungs = _open(air & ~airways)
    z_step = max(1, int(round(2.0 * pixel_mm / max(float(volume.spacing[0]), 1e-3))))
    right, left = _patient_right_first(volume, *_split_sides(lungs, (z_step, 2, 2)), _start(box, start),
                                       factor)
    labels = np.zeros(air.shape, dtype=np.uint8)
    labels[_fill_slices(right)] = LUNG_RIGHT.value
    labels[_fill_slices(left) & (labels == 0)] = LUNG_LEFT.value
    labels[airways & (labels == 0)] = AIRWAYS.value
    return labels, box


def lung_mask(volume: Volume, threshold_hu: float = -500.0) -> LabelVolume:
    """Lungs and large airways of a chest CT: LUNG_RIGHT=1, LUNG_LEFT=2, AIRWAYS=3, uint8 (z, y, x).

    Air is HU < ``threshold_hu`` inside the body (air outside the body is what touches the image border);
    the one or two largest air components (each at least 10% of the largest) are the lungs plus airways;
    airways are split off (see :func:`_airways`); each lung's holes (vessels, nodules) are filled per slice;
    right and left are decided from the affine, not from the array's column order.
    """
    factor = _factor(volume)
    hu = _coarse(volume, factor)
    body = _body(hu, threshold_hu)
    data = np.zeros(volume.shape, dtype=np.uint8)
    body_box = _box(body)
    if body_box is not None:
        start = _start(body_box)
        found = _lung_labels(volume, hu[body_box], body[body_box], threshold_hu, factor, start)
        if found is not None:
            labels, box = found
            _paint(data, labels, _start(box, start), factor)
    return LabelVolume(data, (LUNG_RIGHT, LUNG_LEFT, AIRWAYS), "dicomnode-classical-lung", ALGORITHM_VERSION)


def brain_mask(volume: Volume, low_hu: float = 0.0, high_hu: float = 100.0) -> LabelVolume:
    """Brain of a head CT (label BRAIN=1): HU in the brain window [``low_hu``, ``high_hu``], an in-plane
    opening of ~5 mm to cut it off from scalp and muscles, the largest 3D component, grown back by the
    opening radius inside the window, holes filled per axial slice."""
    factor = _factor(volume)
    hu = _coarse(volume, factor)
    window = (hu >= low_hu) & (hu <= high_hu)
    radius = max(1, int(round(5.0 / (float(min(volume.spacing[1:])) * factor))))
    disk = _disk(radius)
    core = _largest(ndimage.binary_opening(window, structure=disk))
    brain = ndimage.binary_dilation(core, structure=disk) & window
    brain = _fill_slices(_largest(brain))
    data = np.zeros(volume.shape, dtype=np.uint8)
    box = _box(brain, margin=0)
    if box is not None:
        _paint(data, brain[box].view(np.uint8), _start(box), factor)
    return LabelVolume(data, (BRAIN,), "dicomnode-classical-brain", ALGORITHM_VERSION)


def _disk(radius: int) -> BoolArray:
    y, x = np.mgrid[-radius: radius + 1, -radius: radius + 1]
    return np.asarray((x * x + y * y <= radius * radius)[None, :, :])
