"""Render the Secondary Capture outputs of a series to PNG files, to look at them.

Usage: python scripts/render_outputs.py OUT_DIR [SERIES_DIR]

SERIES_DIR defaults to the shared P01 chest CT. The lung mask of :mod:`dicomnode.imaging.masks` is computed,
:func:`dicomnode.outputs.encode.build_outputs` builds (and checks) the SC objects, and their pixels are written as
``OUT_DIR/<SeriesNumber>_<InstanceNumber>.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from dicomnode.imaging.masks import lung_mask
from dicomnode.imaging.volume import load_series_dir
from dicomnode.outputs.encode import build_outputs
from dicomnode.outputs.render import write_pngs

DEFAULT_SERIES = Path(__file__).resolve().parents[2] / "shared" / "data"


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    out_dir = Path(argv[1])
    series = Path(argv[2]) if len(argv) == 3 else next(DEFAULT_SERIES.glob("P01_*"))
    volume = load_series_dir(series)
    labels = lung_mask(volume)
    outputs = build_outputs(volume, labels, pipeline="lung-mask", series_number_base=9000, kinds=("sc",),
                            overlay_every=6, overlay_max=6, algorithm_family="MorphologicalOperations")
    for path in write_pngs(outputs, out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
