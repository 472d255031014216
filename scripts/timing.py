"""Shared by the benchmark scripts: median wall and CPU time of repeated calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def median_times(call: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median wall seconds and median CPU seconds of ``repeat`` calls (CPU time suffers less on a busy machine)."""
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)
