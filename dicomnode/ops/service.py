"""Wiring: build the pieces from the config and run receivers and workers as separate processes.

``serve`` = one supervisor process + ``node.receivers`` receiver processes (Storage SCPs accepting from one
listening socket the supervisor opens, so several associations are received in parallel without sharing a GIL)
+ ``worker.workers`` worker processes (each with its own resident model, so inference never slows receiving).
They share nothing but the spool and the SQLite store. A child that exits is restarted with a capped
exponential backoff (:class:`RestartPolicy`), logged and shown on ``/health``. SIGTERM or SIGINT stops them
gracefully: receivers stop accepting and finish their associations, workers finish (or abandon, lease intact)
their current job.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import select
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from dicomnode.config import Config, Engine
from dicomnode.ops.http import start_http_server
from dicomnode.ops.web.server import StatusPage
from dicomnode.outputs.scu import ScuSettings, client_ssl_context
from dicomnode.receive.scp import ReceiveContext, listen, start_server
from dicomnode.state.recovery import recover, requeue_dead_workers
from dicomnode.state.spool import Spool
from dicomnode.state.store import Store
from dicomnode.telemetry import metrics
from dicomnode.work.pipeline import PipelineContext, Producer
from dicomnode.work.routing import make_router
from dicomnode.work.worker import Worker

log = logging.getLogger(__name__)


def open_spool(cfg: Config) -> Spool:
    return Spool(cfg.spool_dir, fsync=cfg.storage.fsync, min_free_bytes=cfg.storage.min_free_mb * 2**20)


def scu_settings(cfg: Config) -> ScuSettings:
    tls = cfg.node.tls
    ssl_ctx = None
    if tls.enabled:
        ssl_ctx = client_ssl_context(str(tls.cert_file), str(tls.key_file), str(tls.ca_file) if tls.ca_file else None)
    return ScuSettings(calling_aet=cfg.node.ae_title, acse_timeout=cfg.node.acse_timeout,
                       dimse_timeout=cfg.node.dimse_timeout, network_timeout=cfg.node.network_timeout,
                       ssl_context=ssl_ctx)


def producers(cfg: Config, store: Store, spool: Spool) -> dict[str, Producer]:
    """Producers of image-pipeline outputs, by pipeline kind (imported lazily: forwarding needs no torch)."""
    if not any(p.kind != "forward" for p in cfg.pipelines):
        return {}
    from dicomnode.work.segment import segment_producer  # noqa: PLC0415 - heavy imports only where needed

    return {"segment": segment_producer(cfg, store, spool)}


def pipeline_context(cfg: Config) -> PipelineContext:
    store = Store(cfg.db_path)
    spool = open_spool(cfg)
    return PipelineContext(cfg, store, spool, scu_settings(cfg), producers(cfg, store, spool))


def make_worker(cfg: Config, index: int = 0) -> Worker:
    return Worker(pipeline_context(cfg), make_router(cfg), index=index)


def check_engine(cfg: Config) -> None:
    """Engine ``ray``: the cluster must be reachable now (EngineUnavailable, naming the address, stops ``serve``);
    the local engine checks nothing and never imports Ray."""
    if cfg.worker.engine is not Engine.RAY or cfg.worker.workers == 0:
        return
    from dicomnode.inference.remote import check_cluster  # noqa: PLC0415 - Ray only for engine: ray

    segment = {p.name: cfg.ray.placement(p.ray) for p in cfg.pipelines if p.kind == "segment"}
    log.info("%s", check_cluster(cfg.ray, segment))


# ------------------------------------------------------------------------------------------ processes


class _Signals:
    """SIGTERM/SIGINT only raise a flag: setting an Event inside a signal handler can deadlock the very
    thread that is waiting on it, so loops poll the flag (and the shared stop event) instead."""

    def __init__(self) -> None:
        self.raised = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.raised = True

    def wait(self, stop: Any, interval: float = 0.2) -> bool:
        """Sleep ``interval``; True once a signal arrived or ``stop`` (shared with other processes) is set."""
        time.sleep(interval)
        return self.raised or bool(stop.is_set())


class Bell:
    """Wakes idle workers when a receiver records a release (a series may be complete now), instead of at their
    next poll: a datagram socket pair shared by the supervisor's children. A ring is one datagram (dropped when
    the buffer is full: it is ringing already); a waiting worker wakes on it and drains it. No lock is shared,
    so a child killed at any moment (kill -9, the OOM killer) cannot leave the others blocked, as a
    multiprocessing Event's lock would. One ring may wake one worker; the others find the work at their poll."""

    def __init__(self) -> None:
        self.read, self.write = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.read.setblocking(False)
        self.write.setblocking(False)

    def ring(self) -> None:
        try:
            self.write.send(b"!")
        except OSError:
            pass  # full (already ringing) or closed (stopping)

    def wait(self, timeout: float | None = None) -> bool:
        """True when rung within ``timeout`` seconds."""
        readable, _, _ = select.select([self.read], [], [], timeout)
        return bool(readable)

    def clear(self) -> None:
        while True:
            try:
                self.read.recv(16)
            except OSError:  # BlockingIOError once drained
                return


def _child_setup(cfg: Config) -> _Signals:
    from dicomnode.ops.logs import configure_logging  # noqa: PLC0415
    from dicomnode.ops.runtime import configure_libraries  # noqa: PLC0415

    configure_libraries()
    configure_logging(cfg.logging.level, json_lines=cfg.logging.json)
    return _Signals()


def receiver_main(cfg: Config, index: int, stop: Any, ready: Any = None,
                  listener: socket.socket | None = None, bell: Bell | None = None) -> None:
    """Entry point of a receiver process: accepts on ``listener`` (the supervisor's) and sets ``ready`` (shared with
    the supervisor) once it does."""
    signals = _child_setup(cfg)
    ctx = ReceiveContext(cfg, open_spool(cfg), Store(cfg.db_path), on_released=None if bell is None else bell.ring)
    server = start_server(cfg, ctx, listener)
    if ready is not None:
        ready.set()
    while not signals.wait(stop):
        pass
    server.shutdown()
    log.info("receiver %d stopped", index)


def worker_main(cfg: Config, index: int, stop: Any, ready: Any = None, bell: Bell | None = None) -> None:
    """Entry point of a worker process; sets ``ready`` once its pipelines (and model) are loaded; an idle worker
    wakes when ``bell`` (shared with the receivers) rings."""
    signals = _child_setup(cfg)
    local_stop = threading.Event()

    def watch() -> None:
        while not signals.wait(stop):
            pass
        local_stop.set()
        if bell is not None:
            bell.ring()  # wakes a waiting worker now; it sees the stop and leaves

    threading.Thread(target=watch, daemon=True, name="stop-watch").start()
    worker = make_worker(cfg, index)
    log.info("worker %d ready", index)
    if ready is not None:
        ready.set()
    if cfg.metrics.enabled:
        from dicomnode.ops.http import job_hook  # noqa: PLC0415

        worker.on_job_done = job_hook(worker.ctx.store)
    worker.run(local_stop, bell)
    worker.close()
    log.info("worker %d stopped", index)


@dataclass
class _Child:
    name: str
    target: Callable[..., None]
    index: int
    process: Any = None
    restarts: int = 0  # times it was started again after exiting
    ready: Any = None  # an Event the child sets when it serves (receivers: once listening)
    started_at: float = 0.0  # time.monotonic() of the last start
    failures: int = 0  # exits in a row, each after less than RestartPolicy.stable_seconds of life
    last_exit_code: int | None = None  # negative: killed by that signal
    restart_at: float | None = None  # time.monotonic() of the next start while it is down
    next_restart_at: float | None = None  # the same as Unix time (for /health)


@dataclass(frozen=True)
class RestartPolicy:
    """How the supervisor restarts a child that exited: after ``base_seconds``, doubling with every exit in a row
    up to ``max_seconds``, so a child that crashes at start-up is not restarted in a tight loop for ever; a child
    that had run ``stable_seconds`` or longer starts over at ``base_seconds``."""

    base_seconds: float = 0.5
    max_seconds: float = 60.0
    stable_seconds: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds before the restart that follows the ``failures``-th exit in a row (failures >= 1)."""
        return float(min(self.base_seconds * 2 ** max(failures - 1, 0), self.max_seconds))


def _health(children: list[_Child], started: float) -> dict[str, Any]:
    """The ``/health`` document: healthy when there is a receiver and every receiver and worker is alive.

    Per child: pid, alive, restarts, last_exit_code (null until it exits) and next_restart_at (Unix time of its
    next start while it is down and waiting, else null)."""
    doc: dict[str, Any] = {"receivers": [], "workers": []}
    for child in children:
        alive = child.restart_at is None and child.process is not None and child.process.is_alive()
        role = "receivers" if child.target is receiver_main else "workers"
        doc[role].append({"name": child.name, "pid": child.process.pid if child.process else None,
                          "alive": alive, "restarts": child.restarts, "last_exit_code": child.last_exit_code,
                          "next_restart_at": child.next_restart_at})
    everyone = doc["receivers"] + doc["workers"]
    doc["healthy"] = bool(doc["receivers"]) and all(c["alive"] for c in everyone)
    doc["uptime_seconds"] = round(time.time() - started, 3)
    return doc


def _wait_for_receivers(children: list[_Child], signals: _Signals, stop: Any, limit: float = 120.0) -> None:
    """Return once every receiver listens (or has died: the loop in ``serve`` restarts it), so that "serving"
    in the log means every receiver process takes associations, not only the first to start."""
    deadline = time.monotonic() + limit
    for child in children:
        if child.target is not receiver_main:
            continue
        while not child.ready.wait(0.1):
            if not child.process.is_alive() or signals.raised or stop.is_set() or time.monotonic() > deadline:
                log.warning("%s is not listening yet", child.name)
                return


def _supervise(children: list[_Child], start: Callable[[_Child], None], on_exit: Callable[[_Child], None],
               policy: RestartPolicy) -> None:
    """One round of the supervisor: note the children that exited (exit code, next start per ``policy``, one log
    line each) and start again those whose delay has passed. Never sleeps."""
    now = time.monotonic()
    for child in children:
        if child.restart_at is not None:
            if now >= child.restart_at:
                child.restart_at = child.next_restart_at = None
                child.restarts += 1
                start(child)
            continue
        if child.process.is_alive():
            continue
        lived = now - child.started_at
        child.failures = 1 if lived >= policy.stable_seconds else child.failures + 1
        child.last_exit_code = child.process.exitcode
        delay = policy.delay(child.failures)
        child.restart_at, child.next_restart_at = now + delay, time.time() + delay
        log.error("%s exited with code %s after %.1f s; restart %d in %.1f s", child.name, child.last_exit_code,
                  lived, child.restarts + 1, delay)
        on_exit(child)


def serve(cfg: Config, *, ready: Callable[[], None] | None = None) -> int:
    """Run the node until SIGTERM/SIGINT. Returns the exit code."""
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    bell = Bell()  # receivers ring it when a sender releases; idle workers wake on it
    if cfg.metrics.enabled:
        metrics.prepare_multiprocess(cfg)  # before any child is spawned: they inherit the directory
    listener = listen(cfg)  # before anything else: a port in use is the first error to report
    page = StatusPage(cfg) if cfg.ui.enabled else None  # binds ui.port now: in use, serve fails here too
    check_engine(cfg)
    store = Store(cfg.db_path)
    report = recover(store, open_spool(cfg), reprocess_late=cfg.completion.on_late_instance.value == "reprocess")
    log.info("recovered: %s", report)
    children = [_Child(f"receiver-{i}", receiver_main, i) for i in range(cfg.node.receivers)]
    children += [_Child(f"worker-{i}", worker_main, i) for i in range(cfg.worker.workers)]

    def start(child: _Child) -> None:
        child.ready = spawn.Event()
        args: tuple[Any, ...] = (cfg, child.index, stop, child.ready)
        if child.target is receiver_main:
            args += (listener,)  # passed to the spawned process as a duplicate of the descriptor
        child.process = spawn.Process(target=child.target, args=args, kwargs={"bell": bell}, name=child.name)
        child.process.start()
        child.started_at = time.monotonic()

    def on_exit(child: _Child) -> None:
        if cfg.metrics.enabled:
            metrics.process_exited(child.process.pid)
        if child.target is worker_main:  # its job goes back to the queue now, not when the lease ends
            requeue_dead_workers(store, now=time.time())

    signals = _Signals()
    for child in children:
        start(child)
    _wait_for_receivers(children, signals, stop)
    http = _start_health_pages(cfg, children, page)
    log.info("dicomnode %s serving on %s:%d with %d receiver(s) and %d worker(s)", cfg.node.ae_title,
             cfg.node.host, cfg.node.port, cfg.node.receivers, cfg.worker.workers)
    if ready is not None:
        ready()
    policy = RestartPolicy()
    while not signals.wait(stop, 0.1):
        _supervise(children, start, on_exit, policy)
    log.info("stopping")
    stop.set()
    listener.close()  # the receivers close their copies as they stop; then the port refuses connections
    _join_children(children)
    if http is not None:
        http.shutdown()
        http.server_close()
    if page is not None:
        page.stop()
    log.info("stopped")
    return 0


def _start_health_pages(cfg: Config, children: list[_Child],
                        page: StatusPage | None) -> ThreadingHTTPServer | None:
    """The metrics server (returned, or None) and the status page, both answering /health from ``children``."""
    started_at = time.time()
    http: ThreadingHTTPServer | None = None
    if cfg.metrics.enabled:
        http = start_http_server(cfg.metrics.host, cfg.metrics.port, cfg.db_path,
                                 lambda: _health(children, started_at))
    if page is not None:
        page.start(functools.partial(_health, children, started_at))
    return http


def _join_children(children: list[_Child]) -> None:
    """Wait up to 30 s for each child to stop after the stop event; terminate the ones that do not."""
    for child in children:
        child.process.join(timeout=30)
        if child.process.is_alive():
            log.warning("%s did not stop in time; terminating", child.name)
            child.process.terminate()
            child.process.join(timeout=5)
