"""3D surface pictures of a label volume: marching cubes and a small z-buffer rasterizer in numpy.

Each label's mask is reoriented to canonical (S, P, L) axes (see :mod:`dicomnode.encode.render`), reduced
in-plane to about ``target_mm`` voxels, meshed with ``skimage.measure.marching_cubes`` at the true voxel
spacing (so the mesh is in millimetres), and drawn with Gouraud-shaded headlight lighting in two views:

- anterior: the viewer faces the patient, patient Right on image left, head up;
- left lateral: the viewer stands at the patient's left, Anterior on image left, head up.

Both are true (not mirrored) views of the patient: image-right is ``forward x up`` in LPS.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from skimage.measure import marching_cubes

from dicomnode.encode.render import RGB, Panel, canonical, compose, draw_edges, hstack
from dicomnode.labels import LabelInfo, LabelVolume
from dicomnode.volume import Volume

F64 = npt.NDArray[np.float64]
# view name -> (canonical axis shown horizontally, its sign, depth axis, depth sign, edge letters)
# canonical axes: 0 = S, 1 = P, 2 = L (mm, increasing with index). Smaller depth = nearer the viewer.
_VIEWS = {
    "Anterior": (2, +1, 1, +1, ("R", "L", "S", "I")),
    "Left lateral": (1, +1, 2, -1, ("A", "P", "S", "I")),
}


def label_mesh(mask: npt.NDArray[np.bool_], spacing: tuple[float, float, float],
               target_mm: float = 2.0) -> tuple[F64, npt.NDArray[np.int64], F64]:
    """Vertices (mm, canonical S, P, L), triangle indices and unit vertex normals of a canonical mask.

    The mask is resampled (linear) to an isotropic ``target_mm`` grid and lightly smoothed first, so thick
    slices do not show as stairs and every triangle is at most about ``target_mm * 1.5`` across.
    """
    steps = tuple(max(1, int(target_mm // (2 * s))) for s in spacing)  # cheap pre-reduction, no aliasing
    small = mask[:: steps[0], :: steps[1], :: steps[2]].astype(np.float32)
    zoom = [s * k / target_mm for s, k in zip(spacing, steps, strict=True)]
    iso = ndimage.gaussian_filter(ndimage.zoom(small, zoom, order=1), sigma=0.6)
    padded = np.pad(iso, 1)  # closed surfaces at the volume's border
    grid = (target_mm, target_mm, target_mm)
    verts, faces, normals, _ = marching_cubes(padded, level=0.5, spacing=grid)  # type: ignore[no-untyped-call]
    physical = np.array([n * s for n, s in zip(mask.shape, spacing, strict=True)])
    scale = physical / np.array(iso.shape) / target_mm
    verts = (verts - target_mm) * scale  # undo padding, then stretch back to the exact physical extent
    return verts.astype(np.float64), faces.astype(np.int64), normals.astype(np.float64)


def _candidates(tri: F64, window: int) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Pixel (u, v) candidates in a window x window box at each triangle's lower bounding corner."""
    u0 = np.floor(tri[:, :, 0].min(axis=1)).astype(np.int64)
    v0 = np.floor(tri[:, :, 1].min(axis=1)).astype(np.int64)
    du, dv = np.meshgrid(np.arange(window), np.arange(window))
    return u0[:, None] + du.ravel()[None, :], v0[:, None] + dv.ravel()[None, :]


def rasterize(tri: F64, shade: F64, colour: F64, zbuf: F64, image: F64) -> None:
    """Draw triangles (n, 3, [u px, v px, depth]) with per-vertex shade into ``zbuf``/``image`` in place."""
    extent = np.ceil(np.ptp(tri[:, :, :2], axis=1).max(initial=0.0)) + 2
    window = int(min(extent, 8))
    for start in range(0, len(tri), 20000):
        t, sh = tri[start:start + 20000], shade[start:start + 20000]
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
        rasterize(projected[faces], shade[faces], np.asarray(info.color_rgb, dtype=np.float64), zbuf, image)
    rgb = np.clip(image, 0, 255).astype(np.uint8)
    return Panel(rgb, f"3D surface, {view.lower()} view", edges)


def surface_view(volume: Volume, labels: LabelVolume, *, title: str, width_px: int = 1000) -> RGB:
    """Anterior and left lateral shaded surface views of every non-empty label, side by side."""
    meshes = []
    for info in labels.labels:
        mask, spacing = canonical(labels.data == info.value, volume.direction, volume.spacing)
        if np.count_nonzero(mask) == 0:
            continue
        verts, faces, normals = label_mesh(np.asarray(mask), spacing)
        meshes.append((info, verts, faces, normals))
    canon, spacing = canonical(labels.data, volume.direction, volume.spacing)
    extent_mm = np.array([n * s for n, s in zip(canon.shape, spacing, strict=True)])
    mm_per_px = (extent_mm[2] + extent_mm[1]) / (width_px - 16)
    panels = [draw_edges(_view_panel(meshes, extent_mm, view, mm_per_px)) for view in _VIEWS]
    shown = [m[0] for m in meshes]
    return compose(hstack(panels), title, shown, ("Surface rendering of the label masks (marching cubes)",))
