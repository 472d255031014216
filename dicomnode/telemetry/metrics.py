"""Prometheus metric instruments that every stage records into, added up over the node's processes.

Contract:

- :func:`prepare_multiprocess` runs in the supervisor *before* any child is spawned: it empties
  ``<storage.path>/prometheus`` and sets ``PROMETHEUS_MULTIPROC_DIR`` so every child (spawn context, fresh
  interpreter) writes its samples to memory-mapped files there; :mod:`dicomnode.ops.http` serves the sum.
- Recording functions (:func:`instance_received`, :func:`association_accepted`, :func:`rejection`,
  :func:`observe_stage`, :func:`stage_timer`, :func:`send_outcome`, :func:`inference_placed`,
  :func:`job_finished`) may be called from
  any process; without the multiprocess directory (tests, ``process``) they record into this process'
  default registry and cost next to nothing. Metric objects are created on first use, never at import.
- GPU memory (``dicomnode_gpu_memory_bytes{kind}``) is sampled only when ``torch`` is already imported by the
  process and CUDA is available: this module never imports torch.

Units: all latencies are seconds, sizes bytes. Stages are the closed set :data:`STAGES`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dicomnode.config import Config

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("receive_to_complete", "queue_wait", "load", "preprocess", "replica_wait", "inference", "encode", "send")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0, 1800.0, 3600.0)

log = logging.getLogger(__name__)
_metrics: dict[str, Any] = {}
_metrics_lock = threading.Lock()  # association threads race to the first use


def _get() -> dict[str, Any]:
    """The process' metric objects, created on first use (after PROMETHEUS_MULTIPROC_DIR is in place)."""
    if _metrics:
        return _metrics
    with _metrics_lock:
        if not _metrics:
            _create()
    return _metrics


def _create() -> None:
    from prometheus_client import Counter, Gauge, Histogram

    _metrics.update(
        instances=Counter("dicomnode_instances_received", "Instances stored and acknowledged with success"),
        bytes=Counter("dicomnode_received_bytes", "Bytes of instances stored (encoded data set as received)"),
        associations=Counter("dicomnode_associations", "Associations accepted by the Storage SCP"),
        rejections=Counter("dicomnode_rejections", "Associations refused and C-STORE failure statuses sent",
                           ["reason"]),
        stages=Histogram("dicomnode_stage_seconds", "Latency of each stage of the data path", ["stage"],
                         buckets=LATENCY_BUCKETS),
        send=Counter("dicomnode_send_results", "C-STORE results of the node's SCU by outcome", ["outcome"]),
        retries=Counter("dicomnode_send_retries", "Retryable send failures (object left pending)"),
        inference_runs=Counter("dicomnode_inference_runs", "Inferences by engine (local, ray) and the node that ran"
                               " them (Ray node IP, or this host's name)", ["engine", "node"]),
        jobs_finished=Counter("dicomnode_jobs_finished", "Job attempts ended, by resulting state", ["state"]),
        gpu=Gauge("dicomnode_gpu_memory_bytes", "CUDA memory of a worker process (torch allocator)", ["kind"],
                  multiprocess_mode="liveall"),
    )


# ----------------------------------------------------------------------------------------- recording


def instance_received(size: int) -> None:
    """One instance was stored and answered with success; ``size`` is its encoded size in bytes."""
    m = _get()
    m["instances"].inc()
    m["bytes"].inc(size)


def association_accepted() -> None:
    _get()["associations"].inc()


def rejection(reason: str) -> None:
    """Count a refusal: ``association:<why>``, ``tls-handshake`` or ``status:0xNNNN`` (a C-STORE failure)."""
    _get()["rejections"].labels(reason=reason).inc()


def observe_stage(stage: str, seconds: float) -> None:
    """Record one latency of ``stage`` (one of :data:`STAGES`) in seconds; unknown stages raise ValueError."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    _get()["stages"].labels(stage=stage).observe(max(seconds, 0.0))
    if stage == "inference":
        sample_gpu_memory()


@contextmanager
def stage_timer(stage: str) -> Iterator[None]:
    """``with stage_timer("inference"): ...`` observes the block's wall time, also when it raises."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    started = time.monotonic()
    try:
        yield
    finally:
        observe_stage(stage, time.monotonic() - started)


def send_outcome(outcome: str, *, count: int = 1) -> None:
    """Count SCU results by outcome (``stored``, ``retryable``, ``permanent``); retryable ones are retries."""
    m = _get()
    m["send"].labels(outcome=outcome).inc(count)
    if outcome == "retryable":
        m["retries"].inc(count)


def inference_placed(engine: str, node: str, wait_seconds: float) -> None:
    """One inference ran on ``engine`` (``local`` or ``ray``) at ``node`` after waiting ``wait_seconds`` for a
    replica (observed as the ``replica_wait`` stage)."""
    _get()["inference_runs"].labels(engine=engine, node=node).inc()
    observe_stage("replica_wait", wait_seconds)


def job_finished(state: str, *, queue_wait: float | None = None,
                 receive_to_complete: float | None = None) -> None:
    """A worker ended a job attempt in ``state``; the optional latencies are observed as their stages."""
    _get()["jobs_finished"].labels(state=state).inc()
    if queue_wait is not None:
        observe_stage("queue_wait", queue_wait)
    if receive_to_complete is not None:
        observe_stage("receive_to_complete", receive_to_complete)
    sample_gpu_memory()


def sample_gpu_memory() -> None:
    """Set the GPU memory gauges if this process already imported torch and CUDA is available."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    try:
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        gauge = _get()["gpu"]
        gauge.labels(kind="allocated").set(torch.cuda.memory_allocated())
        gauge.labels(kind="reserved").set(torch.cuda.memory_reserved())
        gauge.labels(kind="max_allocated").set(torch.cuda.max_memory_allocated())
    except Exception:  # metrics must never break the data path
        return


# ----------------------------------------------------------------------------------------- multiprocess


def multiprocess_dir(cfg: Config) -> Path:
    return cfg.storage.path / "prometheus"


def prepare_multiprocess(cfg: Config) -> Path:
    """Empty the multiprocess directory, point ``PROMETHEUS_MULTIPROC_DIR`` at it (supervisor, pre-spawn)."""
    path = multiprocess_dir(cfg)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    return path


def process_exited(pid: int) -> None:
    """Drop a dead child's live gauges (its counters and histograms keep counting in the sum)."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


def registered() -> list[Any]:
    """This process' metric objects (those created so far), for a registry that serves them."""
    return list(_metrics.values())
