"""Render a series' three central planes with its lung mask overlaid, as PNGs (uses Pillow).

    python scripts/render_masks.py SERIES_DIR OUT_DIR [--mask lung|body|brain]

Writes OUT_DIR/axial.png, coronal.png, sagittal.png (lung window, label colours from labels.py, pixels
resampled to square millimetres; axial shown with patient right on the image left, as radiologists read).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from dicomnode.imaging.labels import LabelVolume
from dicomnode.imaging.masks import body_mask, brain_mask, lung_mask
from dicomnode.imaging.volume import Volume, load_series_dir

MASKS: dict[str, Callable[[Volume], LabelVolume]] = {
    "lung": lung_mask, "body": body_mask, "brain": brain_mask}


def _overlay(gray: npt.NDArray[np.float32], labels: npt.NDArray[np.uint8], mask: LabelVolume,
             ) -> npt.NDArray[np.uint8]:
    rgb = np.repeat(np.clip(gray * 255, 0, 255)[..., None], 3, axis=2)
    for info in mask.labels:
        where = labels == info.value
        rgb[where] = 0.55 * rgb[where] + 0.45 * np.array(info.color_rgb, dtype=np.float32)
    return rgb.astype(np.uint8)


def _save(rgb: npt.NDArray[np.uint8], row_mm: float, col_mm: float, path: Path) -> None:
    height, width = rgb.shape[:2]
    scale = 512 / max(height * row_mm, width * col_mm)
    size = (max(1, round(width * col_mm * scale)), max(1, round(height * row_mm * scale)))
    Image.fromarray(rgb).resize(size, Image.Resampling.NEAREST).save(path)


def render(volume: Volume, mask: LabelVolume, out_dir: Path, window: tuple[float, float] = (-600, 1500),
           ) -> list[Path]:
    """Axial, coronal and sagittal central planes; assumes a roughly axial acquisition (z = S-I)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    center, width = window
    gray = ((volume.data - (center - width / 2)) / width).astype(np.float32)
    dz, dy, dx = volume.spacing
    k, j, i = (s // 2 for s in volume.shape)
    z_down = volume.affine[2, 0] > 0  # slices go up (superior): flip so the head is at the image top
    planes = {
        "axial": (gray[k], mask.data[k], dy, dx),
        "coronal": (gray[:, j, :], mask.data[:, j, :], dz, dx),
        "sagittal": (gray[:, :, i], mask.data[:, :, i], dz, dy),
    }
    paths = []
    for name, (g, lab, row_mm, col_mm) in planes.items():
        if name != "axial" and z_down:
            g, lab = g[::-1], lab[::-1]
        path = out_dir / f"{name}.png"
        _save(_overlay(g, lab, mask), row_mm, col_mm, path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("series_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mask", choices=sorted(MASKS), default="lung")
    args = parser.parse_args(argv)
    volume = load_series_dir(args.series_dir)
    mask = MASKS[args.mask](volume)
    for path in render(volume, mask, args.out_dir):
        print(path)
    counts = {info.name: int((mask.data == info.value).sum()) for info in mask.labels}
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    print({name: f"{n * voxel_ml:.0f} ml" for name, n in counts.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
