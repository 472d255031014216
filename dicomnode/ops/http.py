"""The node's HTTP endpoints: Prometheus ``/metrics`` (the processes' samples plus values read from the state
store at scrape time) and ``/health``.

The samples come from :mod:`dicomnode.telemetry.metrics` (recorded by every stage, added up over the receiver
and worker processes through prometheus-client's multiprocess directory); the store's values
(``dicomnode_series{state}``, ``dicomnode_jobs{state}``, ``dicomnode_delivery_backlog{destination}``,
``dicomnode_series_completed_total``) are computed per scrape, so they never drift across restarts.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from dicomnode.state.store import JobRow, JobState, Store
from dicomnode.telemetry import metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
log = logging.getLogger(__name__)


class StoreCollector:
    """Gauges read from the state store at scrape time (series and jobs by state, delivery backlog)."""

    def __init__(self, db_path: Path) -> None:
        self.db_path = db_path

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
    mp_dir = os.environ.get(metrics.MULTIPROC_ENV)
    if mp_dir:
        multiprocess.MultiProcessCollector(registry, path=mp_dir)  # type: ignore[no-untyped-call]
    else:
        for metric in metrics.registered():
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
        metrics.job_finished(state.value, queue_wait=queue_wait, receive_to_complete=receive_to_complete)

    return on_job_done
