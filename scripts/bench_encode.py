"""Time :func:`dicomnode.outputs.encode.build_outputs` per output kind on P01 (64 slices) and a 300-slice series.

Usage: python scripts/bench_encode.py [--repeat N] [--ct300 DIR] [--cache DIR] [--profile KIND]

The 300-slice series is P01 re-sliced by :func:`scripts.synthetic.resliced_ct` (made in ``--ct300`` when
missing). The lung masks (:func:`dicomnode.imaging.masks.lung_mask`, slow) are cached as ``.npy`` in ``--cache``
keyed by the series' SeriesInstanceUID. Each kind is timed alone (``sr`` needs the SEG, so its row is
``seg+sr`` minus ``seg``); ``all`` is the default output set (seg, sr, sc) with overlay_every 4,
overlay_max 24, as the example config ships. Times are the median of ``--repeat`` runs, in seconds, wall and CPU
(CPU time of this process: less sensitive to other load on a shared machine).
``--profile KIND`` prints a cProfile of one build of that kind on the 300-slice series instead.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.imaging.labels import AIRWAYS, LUNG_LEFT, LUNG_RIGHT, LabelVolume  # noqa: E402
from dicomnode.imaging.masks import ALGORITHM_VERSION, lung_mask  # noqa: E402
from dicomnode.imaging.volume import Volume, load_series_dir  # noqa: E402
from dicomnode.outputs.encode import build_outputs  # noqa: E402
from scripts.timing import median_times  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KW = {"pipeline": "lung", "series_number_base": 9000, "overlay_every": 4, "overlay_max": 24,
      "algorithm_family": "MorphologicalOperations"}
ROWS: dict[str, tuple[str, ...]] = {
    "seg": ("seg",), "seg+sr": ("seg", "sr"), "sc-overlay": ("sc-overlay",), "sc-planes": ("sc-planes",),
    "sc-surface": ("sc-surface",), "all": ("seg", "sr", "sc"),
}


def load(series: Path, cache: Path) -> tuple[Volume, LabelVolume]:
    """The series' volume and its lung mask (the mask's voxels from the cache when present)."""
    volume = load_series_dir(series)
    path = cache / f"lung_{volume.series_instance_uid}_{ALGORITHM_VERSION}.npy"
    if not path.exists():
        labels = lung_mask(volume)
        cache.mkdir(parents=True, exist_ok=True)
        np.save(path, labels.data)
        return volume, labels
    return volume, LabelVolume(np.load(path), (LUNG_RIGHT, LUNG_LEFT, AIRWAYS), "dicomnode-classical-lung",
                               ALGORITHM_VERSION)


def time_kinds(volume: Volume, labels: LabelVolume, kinds: Sequence[str],
               repeat: int) -> tuple[float, float]:
    """Median wall and median CPU seconds of ``repeat`` builds."""
    return median_times(lambda: build_outputs(volume, labels, kinds=kinds, **KW), repeat)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ct300", type=Path, default=Path("/tmp/ct300"))
    parser.add_argument("--cache", type=Path, default=Path("/tmp/dicomnode-bench-masks"))
    parser.add_argument("--profile", choices=sorted(ROWS), default=None)
    args = parser.parse_args(argv)
    if not args.ct300.exists():
        from scripts.synthetic import resliced_ct
        resliced_ct(args.ct300, 300)
    series = {"P01 (64)": next(SHARED.glob("P01_*")), "CT 300": args.ct300}
    inputs = {name: load(path, args.cache) for name, path in series.items()}
    if args.profile:
        volume, labels = inputs["CT 300"]
        profiler = cProfile.Profile()
        profiler.runcall(build_outputs, volume, labels, kinds=ROWS[args.profile], **KW)
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(45)
        return 0
    table: dict[str, dict[str, tuple[float, float]]] = {}
    for name, (volume, labels) in inputs.items():
        build_outputs(volume, labels, kinds=("seg",), **KW)  # warm imports
        table[name] = {row: time_kinds(volume, labels, kinds, args.repeat) for row, kinds in ROWS.items()}
        both, seg = table[name]["seg+sr"], table[name]["seg"]
        table[name]["sr"] = (both[0] - seg[0], both[1] - seg[1])
    names = list(table)
    print(f"build_outputs, median of {args.repeat}: wall s / CPU s (load average {os.getloadavg()[0]:.1f})")
    print(f"{'kind':<12}" + "".join(f"{n:>18}" for n in names))
    for row in ("seg", "sr", "sc-overlay", "sc-planes", "sc-surface", "all"):
        print(f"{row:<12}" + "".join(f"{table[n][row][0]:>10.3f} /{table[n][row][1]:>6.2f}" for n in names))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
