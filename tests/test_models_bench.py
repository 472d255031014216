"""The per-model benchmark still runs (tiny model, P01, one job each way; its numbers are not checked: timing is
for the script, never for tests on a shared machine)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_models_reports_resident_and_cold_jobs() -> None:
    out = subprocess.run([sys.executable, "scripts/bench_models.py", "--volumes", "P01", "--models", "tiny",
                          "--jobs", "2", "--cold", "1"], capture_output=True, text=True, timeout=900, cwd=REPO)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    row = re.search(r"^P01\s+tiny\s+(.*)$", out.stdout, re.MULTILINE)
    assert row is not None, out.stdout
    values = [float(v) for v in row.group(1).split()]
    assert len(values) == 8 and all(v > 0 for v in values[:7]), values
