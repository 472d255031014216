"""Time the classical masks (:mod:`dicomnode.imaging.masks`) on P01 (64 slices) and a 300-slice chest series.

    python scripts/bench_masks.py [--repeat 3] [--ct300 DIR]

The 300-slice series is P01 re-sliced by :func:`scripts.synthetic.resliced_ct` (made in ``--ct300`` when
missing). Loading is not timed. Each cell is the median of ``--repeat`` calls, wall and CPU seconds (CPU time
of this process: less sensitive to other load on a shared machine); the load average is printed with the
table. ``brain_mask`` runs on chest series here: it times the operations, not a meaningful brain.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.imaging.labels import LabelVolume  # noqa: E402
from dicomnode.imaging.masks import body_mask, brain_mask, lung_mask  # noqa: E402
from dicomnode.imaging.volume import Volume, load_series_dir  # noqa: E402
from scripts.timing import median_times  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MASKS: dict[str, Callable[[Volume], LabelVolume]] = {
    "body": body_mask, "lung": lung_mask, "brain": brain_mask}


def time_mask(function: Callable[[Volume], LabelVolume], volume: Volume, repeat: int) -> tuple[float, float]:
    """Median wall and median CPU seconds of ``repeat`` calls."""
    return median_times(lambda: function(volume), repeat)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ct300", type=Path, default=Path("/tmp/ct300"))
    args = parser.parse_args(argv)
    if not args.ct300.exists():
        from scripts.synthetic import resliced_ct
        resliced_ct(args.ct300, 300)
    series = {"P01 (64)": next(SHARED.glob("P01_*")), "CT 300": args.ct300}
    volumes = {name: load_series_dir(path) for name, path in series.items()}
    print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; median of {args.repeat}, seconds")
    print(f"{'series':10s} {'shape':>14s} " + " ".join(f"{name + ' wall':>10s} {name + ' cpu':>9s}"
                                                    for name in MASKS))
    for name, volume in volumes.items():
        cells = [time_mask(function, volume, args.repeat) for function in MASKS.values()]
        shape = "x".join(str(n) for n in volume.shape)
        print(f"{name:10s} {shape:>14s} " + " ".join(f"{wall:10.2f} {cpu:9.2f}" for wall, cpu in cells))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
