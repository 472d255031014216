"""Prometheus metrics and the health endpoint, added up over the supervisor's receiver and worker processes.

Contract:

- :func:`prepare_multiprocess` runs in the supervisor *before* any child is spawned: it empties
  ``<storage.path>/prometheus`` and sets ``PROMETHEUS_MULTIPROC_DIR`` so every child (spawn context, fresh
  interpreter) writes its samples to memory-mapped files there; :func:`start_http_server` then serves the sum.
- Recording functions (:func:`instance_received`, :func:`association_accepted`, :func:`rejection`,
  :func:`observe_stage`, :func:`stage_timer`, :func:`send_outcome`, :func:`job_finished`) may be called from
  any process; without the multiprocess directory (tests, ``process``) they record into this process'
  default registry and cost next to nothing. Metric objects are created on first use, never at import.
- Values computed from the store at scrape time (no drift across restarts): ``dicomnode_series{state}``,
  ``dicomnode_jobs{state}``, ``dicomnode_delivery_backlog{destination}`` (PENDING deliveries) and
  ``dicomnode_series_completed_total`` (count of ``series.complete``/``series.ignored`` events).
- GPU memory (``dicomnode_gpu_memory_bytes{kind}``) is sampled only when ``torch`` is already imported by the
  process and CUDA is available: this module never imports torch.

Units: all latencies are seconds, sizes bytes. Stages are the closed set :data:`STAGES`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dicomnode.config import Config
from dicomnode.store import JobRow, JobState, Store

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
STAGES = ("receive_to_complete", "queue_wait", "load", "preprocess", "inference", "encode", "send")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0, 1800.0, 3600.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
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


class StoreCollector:
    """Gauges read from the state store at scrape time (series and jobs by state, delivery backlog)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from dicomnode.store import Store

        store = Store(self.db_path)
        try:
            counts = store.counts()
            completed = store.read("SELECT COUNT(*) AS n FROM events WHERE kind IN"
                                   " ('series.complete', 'series.ignored')")[0]["n"]
            backlog = store.read("SELECT destination, COUNT(*) AS n FROM deliveries WHERE state = 'PENDING'"
                                 " GROUP BY destination")
        finally:
            store.close()
        for table in ("series", "jobs"):
            fam = GaugeMetricFamily(f"dicomnode_{table}", f"{table.capitalize()} in the store by state",
                                    labels=["state"])
            for state, n in counts[table].items():
                fam.add_metric([state], n)
            yield fam
        yield CounterMetricFamily("dicomnode_series_completed", "Series judged complete (or ignored)",
                                  value=completed)
        fam = GaugeMetricFamily("dicomnode_delivery_backlog", "PENDING deliveries per destination",
                                labels=["destination"])
        for row in backlog:
            fam.add_metric([row["destination"]], row["n"])
        yield fam


def render(db_path: Path) -> bytes:
    """The Prometheus text exposition: the multiprocess sum (or this process' registry) plus the store."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    mp_dir = os.environ.get(MULTIPROC_ENV)
    if mp_dir:
        multiprocess.MultiProcessCollector(registry, path=mp_dir)  # type: ignore[no-untyped-call]
    else:
        for metric in _metrics.values():
            registry.register(metric)
    registry.register(StoreCollector(db_path))
    return bytes(generate_latest(registry))


# ----------------------------------------------------------------------------------------- HTTP server


HealthFn = Callable[[], dict[str, Any]]


def start_http_server(host: str, port: int, db_path: Path, health: HealthFn) -> ThreadingHTTPServer:
    """Serve ``GET /metrics`` (Prometheus text format) and ``GET /health`` in a daemon thread.

    ``/health`` answers the JSON document returned by ``health()``, with HTTP 200 when its ``healthy`` key is
    true and 503 otherwise. Stop the server with ``shutdown()`` then ``server_close()``.
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                try:
                    body, code, ctype = render(db_path), 200, CONTENT_TYPE
                except Exception as exc:  # the store is unreadable: say so, do not kill the server
                    body, code, ctype = f"metrics unavailable: {exc}\n".encode(), 500, "text/plain"
            elif path == "/health":
                doc = health()
                body = (json.dumps(doc) + "\n").encode()
                code, ctype = (200 if doc.get("healthy") else 503), "application/json"
            else:
                body, code, ctype = b"not found: try /metrics or /health\n", 404, "text/plain"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not news
            log.debug("http %s", format % args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    log.info("metrics and health on http://%s:%d/metrics and /health", host, server.server_address[1])
    return server


def job_hook(store: Store) -> Callable[[JobRow, JobState, float], None]:
    """A ``Worker.on_job_done`` hook: counts the attempt and, on a first attempt, observes ``queue_wait``
    (job created -> claimed) and ``receive_to_complete`` (first instance -> series judged complete)."""

    def on_job_done(job: JobRow, state: JobState, elapsed: float) -> None:
        queue_wait = receive_to_complete = None
        if job.attempts == 1:
            queue_wait = job.updated_at - job.created_at  # the claimed row: updated_at is the claim time
            series = store.get_series(job.series_uid)
            if series is not None:
                receive_to_complete = job.created_at - series.first_received
        job_finished(state.value, queue_wait=queue_wait, receive_to_complete=receive_to_complete)

    return on_job_done
