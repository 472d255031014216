"""3D surface pictures of a label volume: marching cubes and a small z-buffer rasterizer in numpy.

Each label is cut to its bounding box (from :mod:`dicomnode.outputs.measure`), reduced by block averaging to
cells of about ``target_mm`` (the fraction of the label in each cell), reoriented to canonical (S, P, L) axes
(see :mod:`dicomnode.outputs.render`), resampled to an isotropic ``target_mm`` grid, meshed with
``skimage.measure.marching_cubes`` at that grid's exact spacing (so the mesh is in millimetres, voxel ``i``
centred at ``i * spacing``), and drawn with Gouraud-shaded headlight lighting in two views:

- anterior: the viewer faces the patient, patient Right on image left, head up;
- left lateral: the viewer stands at the patient's left, Anterior on image left, head up.

Back faces are culled before rasterizing: marching cubes' normals point out of the label, so a triangle whose
vertex normals all point away from the viewer lies behind the front surface of a closed mesh (faces nearly
edge-on are kept, so silhouettes stay whole). That halves the work and changes a handful of edge pixels.

Both are true (not mirrored) views of the patient: image-right is ``forward x up`` in LPS.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage.measure import marching_cubes

from dicomnode.imaging.labels import LabelInfo, LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.outputs.measure import LabelMeasure, LabelMeasures, measure_labels
from dicomnode.outputs.render import RGB, Panel, axis_map, canonical, compose, draw_edges, hstack

F64 = npt.NDArray[np.float64]
# view name -> (canonical axis shown horizontally, its sign, depth axis, depth sign, edge letters)
# canonical axes: 0 = S, 1 = P, 2 = L (mm, increasing with index). Smaller depth = nearer the viewer.
_VIEWS = {
    "Anterior": (2, +1, 1, +1, ("R", "L", "S", "I")),
    "Left lateral": (1, +1, 2, -1, ("A", "P", "S", "I")),
}


def block_fraction(mask: npt.NDArray[np.bool_], factors: tuple[int, int, int]) -> npt.NDArray[np.float32]:
    """Fraction of set voxels in each ``factors``-sized block of ``mask`` (zero-padded at its end to whole
    blocks): an area-averaging (anti-aliased) reduction, much cheaper than interpolating the full mask."""
    pads = [(0, (-n) % k) for n, k in zip(mask.shape, factors, strict=True)]
    full = np.pad(mask, pads) if any(p for _, p in pads) else mask
    (kz, ky, kx), (nz, ny, nx) = factors, (n // k for n, k in zip(full.shape, factors, strict=True))
    counts = full.reshape(nz, kz, ny, ky, nx, kx).sum(axis=(1, 3, 5), dtype=np.uint16)
    return np.asarray(counts, dtype=np.float32) / float(kz * ky * kx)


def fraction_mesh(fraction: npt.NDArray[np.float32], step_mm: tuple[float, float, float], origin_mm: F64,
                  target_mm: float = 2.0) -> tuple[F64, npt.NDArray[np.int64], F64] | None:
    """Mesh of the 0.5 level of a canonical (S, P, L) fraction grid; None when no voxel reaches it.

    ``fraction[i, j, k]`` is the fraction of the mask inside the grid cell centred at ``origin_mm +
    (i, j, k) * step_mm`` (canonical mm). The grid is resampled (linear) to about ``target_mm`` isotropic and
    lightly smoothed first, so thick slices do not show as stairs and triangles are at most about
    ``target_mm * 1.5`` across. Returns vertices (canonical mm), triangle indices and unit vertex normals.
    """
    iso = ndimage.gaussian_filter(ndimage.zoom(fraction, [s / target_mm for s in step_mm], order=1), sigma=0.6)
    if iso.size == 0 or float(iso.max()) <= 0.5:
        return None
    # exact spacing of the resampled grid: zoom maps first to first and last to last sample
    grid = tuple(float(s * (n_in - 1) / (n_out - 1)) if n_out > 1 else float(s)
                 for s, n_in, n_out in zip(step_mm, fraction.shape, iso.shape, strict=True))
    padded = np.pad(iso, 1)  # closed surfaces at the grid's border
    verts, faces, normals, _ = marching_cubes(padded, level=0.5, spacing=grid)  # type: ignore[no-untyped-call]
    verts = verts - np.array(grid) + origin_mm  # undo the padding, then place the grid in the volume
    return verts.astype(np.float64), faces.astype(np.int64), normals.astype(np.float64)


def label_mesh(mask: npt.NDArray[np.bool_], spacing: tuple[float, float, float],
               target_mm: float = 2.0) -> tuple[F64, npt.NDArray[np.int64], F64] | None:
    """Vertices (mm, canonical S, P, L; voxel ``i`` centred at ``i * spacing``), triangles and unit vertex
    normals of a canonical mask, or None when it is (nearly) empty. See :func:`fraction_mesh`."""
    factors = _factors(spacing, target_mm)
    step = (spacing[0] * factors[0], spacing[1] * factors[1], spacing[2] * factors[2])
    origin = np.array([(k - 1) / 2.0 * s for k, s in zip(factors, spacing, strict=True)])
    return fraction_mesh(block_fraction(mask, factors), step, origin, target_mm)


def _factors(spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """Block sizes that bring each spacing close to ``target_mm`` (never coarser than 1.5 x target)."""
    k = [max(1, round(target_mm / s)) for s in spacing]
    return k[0], k[1], k[2]


def _label_fraction(volume: Volume, labels: LabelVolume, item: LabelMeasure, target_mm: float,
                    ) -> tuple[npt.NDArray[np.float32], tuple[float, float, float], F64]:
    """Canonical fraction grid of one label cut to its bounding box (plus a margin), its step and origin.

    Reduces in array space first (only the box is compared with the label value) and reorders the small
    result: (fraction, step in mm, origin in canonical mm) as :func:`fraction_mesh` takes them.
    """
    spacing = volume.spacing
    factors = _factors(spacing, target_mm)
    margin = [2 * k for k in factors]  # room for the smoothing, and for closing at the border
    box = [slice(max(0, b.start - m), min(n, b.stop + m))
           for b, m, n in zip(item.bounds(), margin, volume.shape, strict=True)]
    fraction = block_fraction(labels.data[box[0], box[1], box[2]] == item.info.value, factors)
    canon, _ = canonical(fraction, volume.direction, spacing)
    order, signs = axis_map(volume.direction)
    step, origin = [], []
    for a, sign in zip(order, signs, strict=True):
        covered = fraction.shape[a] * factors[a]  # voxels covered by the blocks (padding included)
        first = box[a].start if sign > 0 else volume.shape[a] - box[a].start - covered
        step.append(spacing[a] * factors[a])
        origin.append((first + (factors[a] - 1) / 2.0) * spacing[a])
    return np.asarray(canon), (step[0], step[1], step[2]), np.array(origin)


def _candidates(tri: F64, window: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Pixel (u, v) candidates in a window x window box at each triangle's lower bounding corner."""
    u0 = np.floor(tri[:, :, 0].min(axis=1)).astype(np.int64)
    v0 = np.floor(tri[:, :, 1].min(axis=1)).astype(np.int64)
    du, dv = np.meshgrid(np.arange(window), np.arange(window))
    return u0[:, None] + du.ravel()[None, :], v0[:, None] + dv.ravel()[None, :]


def rasterize(tri: F64, shade: F64, colour: F64, zbuf: F64, image: F64) -> None:
    """Draw triangles (n, 3, [u px, v px, depth]) with per-vertex shade into ``zbuf``/``image`` in place.

    Each triangle is tested against the pixel centres of a square window at its lower bounding corner, as
    wide as the triangle (at most 8 px); triangles are processed in groups of equal window size, so the
    many small ones of a fine mesh test few pixels.
    """
    extent = np.ceil(np.ptp(tri[:, :, :2], axis=1).max(axis=1, initial=0.0)) + 2 if len(tri) else np.zeros(0)
    windows = np.minimum(extent, 8).astype(np.int64)
    for window in np.unique(windows):
        group = np.flatnonzero(windows == window)
        for start in range(0, len(group), 20000):
            pick = group[start:start + 20000]
            _draw(tri[pick], shade[pick], int(window), colour, zbuf, image)


def _draw(t: F64, sh: F64, window: int, colour: F64, zbuf: F64, image: F64) -> None:
    pu, pv = _candidates(t, window)
    x, y = pu + 0.5, pv + 0.5
    (ax, ay), (bx, by), (cx, cy) = ((t[:, i, 0:1], t[:, i, 1:2]) for i in range(3))
    area = (bx - ax) * (cy - ay) - (cx - ax) * (by - ay)
    area = np.where(np.abs(area) < 1e-9, 1e-9, area)
    w1 = ((x - ax) * (cy - ay) - (cx - ax) * (y - ay)) / area
    w2 = ((bx - ax) * (y - ay) - (x - ax) * (by - ay)) / area
    w0 = 1.0 - w1 - w2
    inside = (w0 >= -1e-6) & (w1 >= -1e-6) & (w2 >= -1e-6)
    inside &= (pu >= 0) & (pv >= 0) & (pu < zbuf.shape[1]) & (pv < zbuf.shape[0])
    depth = w0 * t[:, 0, 2:3] + w1 * t[:, 1, 2:3] + w2 * t[:, 2, 2:3]
    light = w0 * sh[:, 0:1] + w1 * sh[:, 1:2] + w2 * sh[:, 2:3]
    uu, vv, dd, ll = pu[inside], pv[inside], depth[inside], light[inside]
    order = np.lexsort((dd, vv, uu))[::-1]  # for each pixel the nearest fragment is written last
    uu, vv, dd, ll = uu[order], vv[order], dd[order], ll[order]
    nearer = dd < zbuf[vv, uu]
    uu, vv, dd, ll = uu[nearer], vv[nearer], dd[nearer], ll[nearer]
    zbuf[vv, uu] = dd
    image[vv, uu] = ll[:, None] * colour[None, :]


def _view_panel(meshes: list[tuple[LabelInfo, F64, npt.NDArray[np.int64], F64]], extent_mm: F64,
                view: str, mm_per_px: float) -> Panel:
    horizontal, h_sign, depth_axis, d_sign, edges = _VIEWS[view]
    width = int(np.ceil(extent_mm[horizontal] / mm_per_px)) + 1
    height = int(np.ceil(extent_mm[0] / mm_per_px)) + 1
    zbuf = np.full((height, width), np.inf)
    image = np.zeros((height, width, 3))
    eye = np.zeros(3)
    eye[depth_axis] = -d_sign  # unit vector from the surface towards the viewer
    for info, verts, faces, normals in meshes:
        u = verts[:, horizontal] if h_sign > 0 else extent_mm[horizontal] - verts[:, horizontal]
        v = extent_mm[0] - verts[:, 0]  # head up
        d = d_sign * verts[:, depth_axis]
        lambert = np.abs(normals @ eye)
        depth_cue = 1.0 - 0.35 * (d - d.min()) / max(float(np.ptp(d)), 1.0)
        shade = (0.18 + 0.82 * lambert ** 1.2) * depth_cue
        projected = np.stack([u / mm_per_px, v / mm_per_px, d], axis=1)
        front = faces[normals[faces].sum(axis=1) @ eye >= -0.3]
        rasterize(projected[front], shade[front], np.asarray(info.color_rgb, dtype=np.float64), zbuf, image)
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    return Panel(rgb, f"3D surface, {view.lower()} view", edges)


def surface_view(volume: Volume, labels: LabelVolume, *, title: str, width_px: int = 1000,
                 measures: LabelMeasures | None = None, target_mm: float = 2.0) -> RGB:
    """Anterior and left lateral shaded surface views of every non-empty label, side by side.

    ``measures`` (:func:`~dicomnode.outputs.measure.measure_labels` of the same inputs) saves measuring again;
    each label is meshed from its bounding box only.
    """
    measures = measures or measure_labels(volume, labels)
    meshes = []
    for item in measures.labels:
        if item.voxels == 0:
            continue
        mesh = fraction_mesh(*_label_fraction(volume, labels, item, target_mm), target_mm=target_mm)
        if mesh is not None:
            meshes.append((item.info, *mesh))
    canon, spacing = canonical(labels.data, volume.direction, volume.spacing)
    extent_mm = np.array([n * s for n, s in zip(canon.shape, spacing, strict=True)])
    mm_per_px = (extent_mm[2] + extent_mm[1]) / (width_px - 16)
    panels = [draw_edges(_view_panel(meshes, extent_mm, view, mm_per_px)) for view in _VIEWS]
    shown = [m[0] for m in meshes]
    return compose(hstack(panels), title, shown, ("Surface rendering of the label masks (marching cubes)",))
