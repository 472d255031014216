#!/usr/bin/env python3
"""Does batching patches *across jobs* help on the CPU? The shipped lung U-Net, same patch shape, one run.

Batching across jobs means a replica that holds several jobs' volumes runs their sliding-window patches
together, in batches k times larger than one job's ``model.batch_size``. That only pays if the model's
throughput (patches per second) grows with the batch. This measures exactly that, on the real model and real
patches: the patches of ``--jobs`` volumes (P01, and P01 shifted, so the content differs) are cut by the
runner's own sliding window, then pushed through the model

- per job: each job's patches in batches of ``--batch`` (today's path, one job after the other), and
- across jobs: all jobs' patches interleaved, in batches of ``--batch`` x ``--jobs``,

``--repeats`` times each, alternating, with torch on ``--threads`` threads. The report is the ratio of the
medians (per job / across jobs: above 1 means batching across jobs is faster). CPU only, by design: on a GPU
larger batches are the point and this script is not the judge of that.

    python scripts/bench_batching.py [--jobs 2] [--batch 2] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.imaging.volume import load_series_dir  # noqa: E402
from dicomnode.inference.loaders import load_unet  # noqa: E402
from dicomnode.inference.runner import ModelRunner, RunnerSettings, window_starts  # noqa: E402
from dicomnode.inference.spec import prepare  # noqa: E402
from scripts.synthetic import P01  # noqa: E402


def job_patches(runner: ModelRunner, image: torch.Tensor, pad_value: float) -> list[torch.Tensor]:
    """One job's sliding-window patches (1, pz, py, px): padded to at least a patch, windows at the runner's
    overlap (:func:`~dicomnode.inference.runner.window_starts`)."""
    patch = runner.patch_size
    pads = [max(0, p - int(s)) for p, s in zip(patch, image.shape, strict=True)]
    padded = F.pad(image.float(), (0, pads[2], 0, pads[1], 0, pads[0]), value=pad_value)
    starts = [window_starts(int(s), p, runner.settings.overlap) for s, p in zip(padded.shape, patch, strict=True)]
    return [padded[z:z + patch[0], y:y + patch[1], x:x + patch[2]][None]
            for z in starts[0] for y in starts[1] for x in starts[2]]


@torch.inference_mode()
def run(model: torch.nn.Module, batches: list[list[torch.Tensor]]) -> float:
    started = time.perf_counter()
    for batch in batches:
        model(torch.stack(batch))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_unet(None)
    model = loaded.module.eval()
    runner = ModelRunner(model, loaded.spec.patch_size, RunnerSettings(device="cpu", batch_size=args.batch),
                         loaded.spec.pad_value)
    image = prepare(load_series_dir(P01), loaded.spec)
    jobs = [job_patches(runner, torch.roll(image, shifts=7 * i, dims=2), loaded.spec.pad_value)
            for i in range(args.jobs)]
    per_job = [p[i:i + args.batch] for p in jobs for i in range(0, len(p), args.batch)]
    mixed = [patch for group in zip(*jobs, strict=True) for patch in group]
    big = args.batch * args.jobs
    across = [mixed[i:i + big] for i in range(0, len(mixed), big)]
    run(model, per_job[:2])  # warm-up
    times: dict[str, list[float]] = {"per job": [], "across jobs": []}
    for _ in range(args.repeats):
        times["per job"].append(run(model, per_job))
        times["across jobs"].append(run(model, across))
    n = sum(len(p) for p in jobs)
    print(f"lung U-Net, patch {tuple(loaded.spec.patch_size)}, {args.jobs} jobs x {len(jobs[0])} patches, "
          f"{args.threads} thread(s), {args.repeats} repeats (median; min)")
    for name, batch in (("per job", args.batch), ("across jobs", big)):
        med, best = statistics.median(times[name]), min(times[name])
        print(f"  {name:<12} batch {batch:>2}: {med:6.2f} s ({best:6.2f} s), {n / med:6.1f} patches/s")
    ratio = statistics.median(times["per job"]) / statistics.median(times["across jobs"])
    print(f"per job / across jobs = {ratio:.2f} (above 1: batching across jobs is faster on this CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
