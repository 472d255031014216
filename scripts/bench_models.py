"""What resident models save: per volume and model, a worker that loads the model once and runs jobs, against a
cold start per job (a fresh process that imports, loads the model, segments one series and exits, as peers run
TotalSegmentator's CLI per series). Wall time per job and peak RSS on the CPU; on CUDA, when there is a GPU,
fp32 (unet kinds) or nnU-Net's own autocast, with peak GPU memory.

Models (random weights, built by scripts/tiny_models.py; no weights are downloaded):

- ``tiny``: a 3-stage PlainConvUNet as an nnU-Net v2 model folder (kind ``nnunet``);
- ``totalseg-size``: a network of TotalSegmentator's 3 mm architecture size (six stages, 32..320 features,
  128^3 patch, 118 classes; nnU-Net's default 3d_fullres plan for that spacing) in a TotalSegmentator weights
  folder, run by kind ``totalsegmentator`` (task total, fast).

Volumes: P01 (64 x 512 x 512, 5 mm) and a 300-slice re-slice of it (scripts/synthetic.py).
A job = read the series' files into a Volume + segment. Each child process reports its own numbers as JSON.

Usage: ``python scripts/bench_models.py [--jobs 3] [--cold 2] [--volumes P01 300] [--models tiny totalseg-size]
[--device cpu|cuda] [--threads N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.synthetic import P01, resliced_ct  # noqa: E402
from scripts.tiny_models import TOTALSEG_3MM, NnUNetArch, nnunet_model_folder, totalsegmentator_weights  # noqa: E402


def child(args: argparse.Namespace) -> None:
    """One worker process: load the model once, run ``--jobs`` jobs, print JSON with the timings."""
    import torch

    from dicomnode.config import ModelConfig, SegmenterKind
    from dicomnode.imaging.files import find_dicom_files
    from dicomnode.imaging.volume import load_series
    from dicomnode.inference.runner import RunnerSettings
    from dicomnode.inference.segmenter import build_segmenter

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if args.kind == "nnunet":
        model = ModelConfig(kind=SegmenterKind.NNUNET, path=Path(args.model), mirroring=False)
    else:
        model = ModelConfig(kind=SegmenterKind.TOTALSEGMENTATOR, task="total", fast=True, weights=Path(args.model))
    segmenter = build_segmenter(model, None, RunnerSettings(device=args.device))
    load_s = time.perf_counter() - start
    files = find_dicom_files([Path(args.series)])
    jobs = []
    for _ in range(args.jobs):
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        segmenter.segment(load_series(files))
        jobs.append(time.perf_counter() - t)
    gpu = torch.cuda.max_memory_allocated() / 2**20 if args.device == "cuda" else 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"load_s": load_s, "jobs_s": jobs,
                      "peak_rss_mib": rss, "peak_gpu_mib": gpu}))


def run_child(kind: str, model: Path, series: Path, jobs: int, device: str, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--kind", kind, "--model", str(model), "--series", str(series),
           "--jobs", str(jobs), "--device", device, "--threads", str(threads)]
    wall = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-3000:])
    doc: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    doc["wall_s"] = time.perf_counter() - wall
    return doc


def build_models(root: Path, names: list[str]) -> dict[str, tuple[str, Path]]:
    models: dict[str, tuple[str, Path]] = {}
    if "tiny" in names:
        labels = {f"class_{i}": i for i in range(1, 4)}
        models["tiny"] = ("nnunet", nnunet_model_folder(root / "tiny", labels, arch=NnUNetArch(patch=(32, 64, 64))))
    if "totalseg-size" in names:
        totalsegmentator_weights(root / "totalseg", "total", fast=True, arch=TOTALSEG_3MM)
        models["totalseg-size"] = ("totalsegmentator", root / "totalseg")
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--series", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=3, help="jobs per resident worker (the first includes warm-up)")
    parser.add_argument("--cold", type=int, default=2, help="cold single-job processes per configuration")
    parser.add_argument("--volumes", nargs="+", default=["P01", "300"])
    parser.add_argument("--models", nargs="+", default=["tiny", "totalseg-size"])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        root = Path(tmp)
        volumes = {"P01": P01} if "P01" in args.volumes else {}
        if "300" in args.volumes:
            resliced_ct(root / "ct300", 300)
            volumes["300-slice"] = root / "ct300"
        models = build_models(root, args.models)
        print(f"device {args.device}; {os.cpu_count()} CPUs; jobs per resident worker {args.jobs}, "
              f"cold processes {args.cold}")
        head = (f"{'volume':<10}{'model':<15}{'load s':>8}{'1st job':>9}{'resident':>10}{'cold job':>10}"
                f"{'cold/res':>9}{'RSS MiB':>9}{'cold RSS':>9}{'GPU MiB':>9}")
        print(head)
        for vname, series in volumes.items():
            for mname, (kind, path) in models.items():
                resident = run_child(kind, path, series, args.jobs, args.device, args.threads)
                cold = [run_child(kind, path, series, 1, args.device, args.threads) for _ in range(args.cold)]
                warm = statistics.median(resident["jobs_s"][1:]) if len(resident["jobs_s"]) > 1 else \
                    resident["jobs_s"][0]
                cold_s = statistics.median(c["wall_s"] for c in cold)
                print(f"{vname:<10}{mname:<15}{resident['load_s']:>8.1f}{resident['jobs_s'][0]:>9.1f}{warm:>10.1f}"
                      f"{cold_s:>10.1f}{cold_s / warm:>9.2f}{resident['peak_rss_mib']:>9.0f}"
                      f"{statistics.median(c['peak_rss_mib'] for c in cold):>9.0f}{resident['peak_gpu_mib']:>9.0f}",
                      flush=True)
        print("resident = median wall time of jobs 2.. in one worker; cold job = wall time of a fresh process that "
              "imports, loads the model and runs one job; cold/res = what a cold start per job costs relative")


if __name__ == "__main__":
    main()
