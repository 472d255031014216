"""Pictures of a label volume over its CT/MR volume, as RGB uint8 arrays (rows, columns, 3).

Display conventions (radiological, as every PACS viewer shows them):

- axial: patient Right on image left, Anterior at the top;
- coronal: patient Right on image left, Superior (head) at the top;
- sagittal: Anterior on image left, Superior at the top.

Volumes are (z, y, x) with an index-to-LPS affine (see :mod:`dicomnode.imaging.volume`). In-plane pixel spacing and
slice spacing are honoured: every panel is resampled to square display pixels, so anatomy keeps its aspect.
For oblique acquisitions each array axis is shown along the patient axis it is closest to (no resampling
of the obliquity), which is what "nearest orthogonal" viewer modes do.

Every picture carries a header with a title and a burned-in "NOT FOR DIAGNOSTIC USE" label, and a legend of
the labels drawn (colour swatch, name). The SC encoder marks them BurnedInAnnotation YES.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage
from scipy import ndimage

from dicomnode.imaging.labels import LabelInfo, LabelVolume
from dicomnode.imaging.volume import Volume
from dicomnode.outputs.measure import LabelMeasures, measure_labels

RGB = npt.NDArray[np.uint8]
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
DEFAULT_CT_WINDOW = (-600.0, 1500.0)  # (center, width) lung window: the labels are mostly thoracic
FILL_ALPHA = 0.28
_HEADER_PX = 64
_LEGEND_ROW_PX = 26
_CAPTION_PX = 26

# (horizontal patient axis, vertical patient axis, vertical sign) for each plane normal (LPS index 0, 1, 2).
# vertical sign +1: the vertical patient coordinate increases downwards (axial: P down); -1: head up.
_PLANE_LAYOUT = {2: (0, 1, +1), 1: (0, 2, -1), 0: (1, 2, -1)}
# edge letters (left, right, top, bottom) per plane normal
_EDGE_LETTERS = {2: ("R", "L", "A", "P"), 1: ("R", "L", "S", "I"), 0: ("A", "P", "S", "I")}
PLANE_NAMES = {2: "Axial", 1: "Coronal", 0: "Sagittal"}


@dataclass(frozen=True)
class Panel:
    """One oriented 2D picture: RGB pixels plus the patient direction letters at its four edges."""

    rgb: RGB
    title: str
    edges: tuple[str, str, str, str]  # left, right, top, bottom


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A scalable font (DejaVu Sans when installed, else Pillow's bundled FreeType font)."""
    try:
        return ImageFont.truetype("DejaVuSans-Bold.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def window_u8(values: npt.NDArray[np.float32], window: tuple[float, float]) -> npt.NDArray[np.uint8]:
    """Linear VOI window (center, width) to 0..255, clipped."""
    center, width = window
    low = center - width / 2.0
    scaled = (values.astype(np.float32) - low) / max(width, 1e-6) * 255.0
    return np.asarray(np.clip(scaled, 0, 255), dtype=np.uint8)


def display_window(volume: Volume) -> tuple[float, float]:
    """The lung window for CT, else the series' own window, else the 1st-99th percentile range."""
    if volume.units == "HU":
        return DEFAULT_CT_WINDOW
    if volume.window is not None:
        return volume.window
    low, high = np.percentile(volume.data[::2, ::4, ::4], [1, 99])
    return (float(low + high) / 2.0, float(max(high - low, 1.0)))


def _dominant(direction: npt.NDArray[np.float64], axis: int) -> tuple[int, int]:
    """(patient axis 0=L 1=P 2=S, sign) closest to array axis ``axis`` of a 3x3 column-direction matrix."""
    column = direction[:, axis]
    patient = int(np.argmax(np.abs(column)))
    return patient, 1 if column[patient] >= 0 else -1


def orient_plane(image: npt.NDArray[np.generic], row_step: tuple[int, int], col_step: tuple[int, int],
                 spacing: tuple[float, float]) -> tuple[npt.NDArray[np.generic], int, tuple[float, float]]:
    """Reorder a 2D (rows, cols) image to display convention; return it, the plane normal and its spacing.

    ``row_step``/``col_step`` are the (patient axis, sign) of moving down a row / along a column.
    """
    normal = ({0, 1, 2} - {row_step[0], col_step[0]}).pop()
    horizontal, vertical, vertical_sign = _PLANE_LAYOUT[normal]
    if row_step[0] != vertical:  # rows run along the horizontal patient axis: transpose
        image = image.T
        row_step, col_step = col_step, row_step
        spacing = (spacing[1], spacing[0])
    if row_step[1] != vertical_sign:
        image = image[::-1, :]
    if col_step[1] != 1:
        image = image[:, ::-1]
    return image, normal, spacing


def resize(image: npt.NDArray[np.generic], spacing: tuple[float, float], mm_per_px: float,
           nearest: bool) -> npt.NDArray[np.generic]:
    """Resample a 2D array so one output pixel is ``mm_per_px`` square (Pillow, bilinear or nearest)."""
    rows = max(1, round(image.shape[0] * spacing[0] / mm_per_px))
    cols = max(1, round(image.shape[1] * spacing[1] / mm_per_px))
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    pil = Image.fromarray(np.ascontiguousarray(image))
    return np.asarray(pil.resize((cols, rows), resample=resample))


def paint_labels(gray: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8],
                 infos: Sequence[LabelInfo]) -> RGB:
    """Grey image with each label filled semi-transparently and outlined in its colour (same shape)."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    for info in infos:
        mask = labels == info.value
        if not mask.any():
            continue
        colour = np.asarray(info.color_rgb, dtype=np.float32)
        rgb[mask] = (1.0 - FILL_ALPHA) * rgb[mask] + FILL_ALPHA * colour
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        rgb[edge] = colour
    return np.clip(rgb, 0, 255).astype(np.uint8)


def draw_edges(panel: Panel) -> RGB:
    """The panel with its orientation letters at the middle of each edge and its title in a strip above."""
    pil = Image.fromarray(panel.rgb)
    draw = ImageDraw.Draw(pil)
    fnt = font(20)
    height, width = panel.rgb.shape[:2]
    left, right, top, bottom = panel.edges
    spots = ((left, 6, height // 2, "lm"), (right, width - 6, height // 2, "rm"),
             (top, width // 2, 6, "mt"), (bottom, width // 2, height - 6, "mb"))
    for text, x, y, anchor in spots:
        draw.text((x, y), text, fill=(255, 255, 0), font=fnt, anchor=anchor, stroke_width=2,
                  stroke_fill=(0, 0, 0))
    captioned = Image.new("RGB", (width, height + _CAPTION_PX), (0, 0, 0))
    captioned.paste(pil, (0, _CAPTION_PX))
    ImageDraw.Draw(captioned).text((4, 3), panel.title, fill=(255, 255, 255), font=font(17))
    return np.asarray(captioned)


def hstack(panels: Sequence[RGB], gap: int = 8) -> RGB:
    """Panels side by side, top-aligned, on black."""
    height = max(p.shape[0] for p in panels)
    width = sum(p.shape[1] for p in panels) + gap * (len(panels) - 1)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    x = 0
    for p in panels:
        out[: p.shape[0], x: x + p.shape[1]] = p
        x += p.shape[1] + gap
    return out


def compose(body: RGB, title: str, infos: Sequence[LabelInfo], notes: Sequence[str] = ()) -> RGB:
    """Header (title, NOT FOR DIAGNOSTIC USE) + body + legend (colour, label name) + notes, even size."""
    width = max(body.shape[1], 560)
    legend_rows = len(infos) + len(notes)
    height = _HEADER_PX + body.shape[0] + 12 + _LEGEND_ROW_PX * legend_rows
    height += height % 2
    width += width % 2
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    canvas.paste(Image.fromarray(body), ((width - body.shape[1]) // 2, _HEADER_PX))
    draw = ImageDraw.Draw(canvas)
    draw.text((10, 6), title, fill=(255, 255, 255), font=font(20))
    draw.text((10, 34), NOT_FOR_DIAGNOSIS, fill=(255, 60, 60), font=font(20))
    y = _HEADER_PX + body.shape[0] + 8
    for info in infos:
        draw.rectangle((10, y + 3, 28, y + 21), fill=tuple(info.color_rgb), outline=(255, 255, 255))
        draw.text((38, y + 2), info.name, fill=(255, 255, 255), font=font(18))
        y += _LEGEND_ROW_PX
    for note in notes:
        draw.text((10, y + 2), note, fill=(200, 200, 200), font=font(16))
        y += _LEGEND_ROW_PX
    return np.asarray(canvas)


def axial_overlay(volume: Volume, labels: LabelVolume, k: int, *, title: str, size_px: int = 640) -> RGB:
    """Source slice ``k`` (0-based array index) windowed, labels drawn over, oriented and annotated."""
    direction = volume.direction
    spacing = (volume.spacing[1], volume.spacing[2])
    gray, normal, sp = orient_plane(window_u8(volume.data[k], display_window(volume)),
                                    _dominant(direction, 1), _dominant(direction, 2), spacing)
    lab, _, _ = orient_plane(labels.data[k], _dominant(direction, 1), _dominant(direction, 2), spacing)
    mm_per_px = max(gray.shape[0] * sp[0], gray.shape[1] * sp[1]) / size_px
    gray_d = resize(gray, sp, mm_per_px, nearest=False)
    lab_d = resize(lab, sp, mm_per_px, nearest=True)
    rgb = paint_labels(np.asarray(gray_d, dtype=np.uint8), np.asarray(lab_d, dtype=np.uint8), labels.labels)
    position = float((volume.affine @ np.array([k, 0.0, 0.0, 1.0]))[normal])
    name = PLANE_NAMES[normal]
    panel = Panel(rgb, f"{name} {k + 1}/{volume.shape[0]}  ({'LPS'[normal]} {position:.1f} mm)",
                  _EDGE_LETTERS[normal])
    present = [i for i in labels.labels if bool(np.any(labels.data[k] == i.value))]
    return compose(draw_edges(panel), title, present,
                   (f"Window C {display_window(volume)[0]:g} W {display_window(volume)[1]:g}",))


def axis_map(direction: npt.NDArray[np.float64]) -> tuple[list[int], list[int]]:
    """For canonical axes (S, P, L): the array axis shown along each, and its sign (+1 or -1)."""
    steps = [_dominant(direction, a) for a in range(3)]
    if sorted(s[0] for s in steps) != [0, 1, 2]:
        raise ValueError("volume axes do not map to three distinct patient axes")
    order = [next(a for a in range(3) if steps[a][0] == p) for p in (2, 1, 0)]
    return order, [steps[a][1] for a in order]


def canonical(array: npt.NDArray[np.generic], direction: npt.NDArray[np.float64],
              spacing: tuple[float, float, float],
              ) -> tuple[npt.NDArray[np.generic], tuple[float, float, float]]:
    """Reorder a (z, y, x) array to axes (S, P, L), each increasing with its index, and permute spacing.

    Uses the nearest patient axis of each array axis (see module docstring). Returns a view, not a copy.
    """
    order, signs = axis_map(direction)
    out = np.transpose(array, order)
    flips = tuple(slice(None, None, -1) if sign < 0 else slice(None) for sign in signs)
    return out[flips], (spacing[order[0]], spacing[order[1]], spacing[order[2]])


def _centre(volume: Volume, labels: LabelVolume,
            measures: LabelMeasures) -> tuple[tuple[int, int, int], npt.NDArray[np.float64]]:
    """Canonical (S, P, L) index of the cut planes and their LPS position in mm.

    Axial and coronal planes pass through the centre of mass of all labels; the sagittal plane through that
    of the largest label (the midline of a paired organ would miss both halves). Both centres come exactly
    from the per-axis voxel-count profiles of ``measures``.
    """
    index = np.array(volume.shape, dtype=np.float64) / 2.0
    everything = measures.centre()
    if everything is not None:
        index = everything
        largest = max(measures.labels, key=lambda item: (item.voxels, item.info.value))
        order, _ = axis_map(volume.direction)
        index[order[2]] = largest.centre()[order[2]]
    position = (volume.affine @ np.append(index, 1.0))[:3]
    order, signs = axis_map(volume.direction)
    cidx = [index[a] if sign > 0 else volume.shape[a] - 1 - index[a]
            for a, sign in zip(order, signs, strict=True)]
    return (int(round(cidx[0])), int(round(cidx[1])), int(round(cidx[2]))), position


def _plane_panels(values3: npt.NDArray[np.generic], lab3: npt.NDArray[np.uint8],
                  spacing: tuple[float, float, float], centre: tuple[int, int, int],
                  position: npt.NDArray[np.float64], infos: Sequence[LabelInfo],
                  mm_per_px: float, window: tuple[float, float]) -> list[RGB]:
    """Axial, coronal and sagittal panels of canonical (S, P, L) arrays through ``centre``.

    ``values3`` holds the volume's values: only the three cut planes are windowed (with ``window``).
    """
    s, p, lat = centre
    cuts = (
        (2, values3[s], lab3[s], (spacing[1], spacing[2]), position[2]),
        (1, values3[::-1, p, :], lab3[::-1, p, :], (spacing[0], spacing[2]), position[1]),
        (0, values3[::-1, :, lat], lab3[::-1, :, lat], (spacing[0], spacing[1]), position[0]),
    )
    panels = []
    for normal, values, lab, sp, offset in cuts:
        gray = window_u8(np.asarray(values, dtype=np.float32), window)
        g = np.asarray(resize(gray, sp, mm_per_px, nearest=False), dtype=np.uint8)
        lb = np.asarray(resize(lab, sp, mm_per_px, nearest=True), dtype=np.uint8)
        title = f"{PLANE_NAMES[normal]}  {'LPS'[normal]} {offset:.1f} mm"
        panels.append(draw_edges(Panel(paint_labels(g, lb, infos), title, _EDGE_LETTERS[normal])))
    return panels


def three_plane(volume: Volume, labels: LabelVolume, *, title: str, width_px: int = 1200,
                measures: LabelMeasures | None = None) -> RGB:
    """Axial, coronal and sagittal views through the centre of mass of all labels, side by side.

    ``measures`` (:func:`~dicomnode.outputs.measure.measure_labels` of the same inputs) saves measuring again.
    """
    window = display_window(volume)
    values3, spacing = canonical(volume.data, volume.direction, volume.spacing)
    lab3, _ = canonical(labels.data, volume.direction, volume.spacing)
    centre, position = _centre(volume, labels, measures or measure_labels(volume, labels))
    extent = (lab3.shape[2] * spacing[2]) * 2 + lab3.shape[1] * spacing[1]  # axial + coronal + sagittal
    mm_per_px = extent / (width_px - 16)
    panels = _plane_panels(values3, np.asarray(lab3, dtype=np.uint8), spacing, centre, position,
                           labels.labels, mm_per_px, window)
    return compose(hstack(panels), title, labels.labels,
                   (f"Planes through the labels' centre; window C {window[0]:g} W {window[1]:g}",))


def write_pngs(datasets: Sequence[object], folder: Path) -> list[Path]:
    """Write the pixels of every Secondary Capture in ``datasets`` to ``folder`` as PNG; return the paths.

    Files are named ``<SeriesNumber>_<InstanceNumber>.png``; datasets of other classes are skipped.
    """
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        if not isinstance(ds, Dataset) or ds.get("SOPClassUID") != SecondaryCaptureImageStorage:
            continue
        path = folder / f"{int(ds.SeriesNumber)}_{int(ds.InstanceNumber):03d}.png"
        Image.fromarray(np.asarray(ds.pixel_array, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths
