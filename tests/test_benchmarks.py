"""The benchmark scripts still run (on a tiny input; their numbers are not checked: timing is for the scripts,
never for tests on a shared machine)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ingest_benchmark_runs_every_receiver_and_reports_rates_cpu_and_the_bound() -> None:
    out = subprocess.run([sys.executable, "scripts/bench_ingest.py", "--slices", "40", "--repeat", "1"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    rows = {m.group(1): m.group(2).split() for m in re.finditer(r"^(storescp|orthanc|dicomnode|\(no fsync\))\s+(.*)$",
                                                                 out.stdout, re.MULTILINE)}
    assert set(rows) == {"storescp", "orthanc", "dicomnode", "(no fsync)"}
    for name, values in rows.items():
        rates, receiver_cpu, sender_cpu = values[:3], values[3:5], values[5:]
        assert len(values) == 7 and all(float(v) > 0 for v in rates + sender_cpu), (name, values)
        assert all(float(v) >= 0 for v in receiver_cpu), (name, values)  # /proc counts in 10 ms ticks
    assert re.search(r"CPU bound for 4 associations on \d+ cores: \d+/s", out.stdout)


def test_latency_benchmark_reports_both_rules() -> None:
    out = subprocess.run([sys.executable, "scripts/bench_latency.py", "--series", "p01", "--quiet-seconds", "4"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    row = re.search(r"P01 64 slices\s+evidence\s+([\d.]+) s \(complete after\s+([\d.]+) s\)\s+quiet period\s+"
                    r"([\d.]+) s\s+ratio", out.stdout)
    assert row is not None, out.stdout
    evidence, complete_after, quiet = map(float, row.groups())
    assert quiet > 4.0  # the quiet period alone decided: at least its length
    assert complete_after < 4.0  # the evidence decided before the quiet period ended
    assert "stages:" in out.stdout


def _run(*args: str) -> str:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def test_ray_benchmark_reports_one_and_two_replicas_on_both_nodes() -> None:
    text = _run("scripts/bench_ray.py", "--model", "lung", "--jobs", "1", "--slices", "8")
    one = re.search(r"1 replica\(s\): 1 series in [\d.]+ s = \d+ series/h \(Ray nodes used: (\w+)\)", text)
    two = re.search(r"2 replica\(s\): 1 series in [\d.]+ s = \d+ series/h \(Ray nodes used: ([\w, ]+)\)", text)
    assert one and two, text
    assert re.search(r"2 replicas / 1 replica = [\d.]+", text)


def test_scaling_and_batching_benchmarks_report_their_numbers() -> None:
    text = _run("scripts/bench_scaling.py", "--instances", "100", "--repeats", "1", "--slices", "10")
    assert re.search(r"store: \d+ instances recorded/s", text) and re.search(r"store: \d+ segment jobs/s", text)
    assert re.search(r"ray: .*10x512x512: median \d+ ms", text), text
    text = _run("scripts/bench_batching.py", "--repeats", "1")
    assert re.search(r"per job / across jobs = [\d.]+", text), text
