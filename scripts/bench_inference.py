"""Time the shipped lung U-Net per volume: CPU fp32, and on CUDA (when present) fp32 vs mixed precision.

Each configuration runs once to warm up, then ``--repeats`` times; the table gives the median seconds of the
whole ``segment`` call, its minimum (less sensitive to other load on a shared machine), and the medians of its
three stages (prepare: normalise + resample; predict: sliding window; restore: resample back to the source
grid + arg-max), the patches per volume and the peak CUDA memory.
The classical ``lung_mask`` is timed on the same volume for reference.

Usage: ``python scripts/bench_inference.py [--series P01] [--repeats 3] [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from dicomnode.imaging.volume import Volume, load_series_dir
from dicomnode.inference import RunnerSettings, UNetSegmenter
from dicomnode.inference.spec import prepare, restore_labels

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Row:
    config: str
    total_s: float
    best_s: float
    prepare_s: float
    predict_s: float
    restore_s: float
    patches: int
    peak_mib: float


def _median_seconds(function: Callable[[], object], repeats: int) -> float:
    return statistics.median(_seconds(function, repeats))


def _seconds(function: Callable[[], object], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def bench(volume: Volume, device: str, amp: bool, batch: int, repeats: int) -> Row:
    """Median timings of one configuration (after one warm-up run)."""
    segmenter = UNetSegmenter(settings=RunnerSettings(device=device, amp=amp, batch_size=batch))
    runner = segmenter.runner
    segmenter.segment(volume)  # warm-up: allocator, kernels, autotuning
    if runner.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    image = prepare(volume, segmenter.spec)
    probs = runner.predict(image)
    totals = _seconds(lambda: segmenter.segment(volume), repeats)
    prep = _median_seconds(lambda: prepare(volume, segmenter.spec), repeats)
    pred = _median_seconds(lambda: runner.predict(image), repeats)
    rest = _median_seconds(lambda: restore_labels(probs, volume.shape), repeats)
    peak = torch.cuda.max_memory_allocated() / 2**20 if runner.device.type == "cuda" else 0.0
    patches = runner.patch_count((int(image.shape[0]), int(image.shape[1]), int(image.shape[2])))
    label = f"{runner.device.type} {'amp' if amp and runner.device.type == 'cuda' else 'fp32'} batch {batch}"
    return Row(label, statistics.median(totals), min(totals), prep, pred, rest, patches, peak)


def classical_seconds(volume: Volume, repeats: int) -> float:
    from dicomnode.imaging.masks import lung_mask

    lung_mask(volume)
    return _median_seconds(lambda: lung_mask(volume), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", default="P01")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    volume = load_series_dir(next(DATA.glob(f"{args.series}_*")))
    configs = [("cpu", False, 2)]
    if torch.cuda.is_available():
        configs += [("cuda", False, 2), ("cuda", True, 2), ("cuda", True, 8)]
    rows = [bench(volume, device, amp, batch, args.repeats) for device, amp, batch in configs]
    print(
        f"{args.series} {volume.shape} spacing {tuple(round(s, 3) for s in volume.spacing)} mm; "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'}"
    )
    heads = ("total s", "best s", "prepare", "predict", "restore", "patches")
    print(f"{'config':<22}" + "".join(f"{h:>9}" for h in heads) + f"{'peak MiB':>10}")
    for r in rows:
        print(
            f"{r.config:<22}{r.total_s:>9.2f}{r.best_s:>9.2f}{r.prepare_s:>9.2f}{r.predict_s:>9.2f}{r.restore_s:>9.2f}"
            f"{r.patches:>9d}{r.peak_mib:>10.0f}"
        )
    print(f"{'classical lung_mask':<22}{classical_seconds(volume, args.repeats):>9.2f}")


if __name__ == "__main__":
    main()
