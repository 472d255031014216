"""Wiring: build the pieces from the config and run receivers and workers as separate processes.

``serve`` = one supervisor process + ``node.receivers`` receiver processes (pynetdicom servers sharing the port
through SO_REUSEPORT, so several associations are received in parallel without sharing a GIL) + ``worker.workers``
worker processes (each with its own resident model, so inference never slows receiving). They share nothing
but the spool and the SQLite store. SIGTERM or SIGINT stops them gracefully: receivers stop accepting and
finish their associations, workers finish (or abandon, lease intact) their current job.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicomnode.config import Config
from dicomnode.pipeline import PipelineContext, Producer
from dicomnode.recovery import recover
from dicomnode.routing import make_router
from dicomnode.scp import ReceiveContext, start_server
from dicomnode.scu import ScuSettings, client_ssl_context
from dicomnode.spool import Spool
from dicomnode.store import Store
from dicomnode.worker import Worker

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
    from dicomnode.imaging import segment_producer  # noqa: PLC0415 - heavy imports only where needed

    return {"segment": segment_producer(cfg, store, spool)}


def pipeline_context(cfg: Config) -> PipelineContext:
    store = Store(cfg.db_path)
    spool = open_spool(cfg)
    return PipelineContext(cfg, store, spool, scu_settings(cfg), producers(cfg, store, spool))


def make_worker(cfg: Config, index: int = 0) -> Worker:
    return Worker(pipeline_context(cfg), make_router(cfg), index=index)


# ------------------------------------------------------------------------------------------ processes


def _child_setup(cfg: Config, stop: Any) -> None:
    from dicomnode.logs import configure_logging  # noqa: PLC0415

    configure_logging(cfg.logging.level, json_lines=cfg.logging.json)

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def receiver_main(cfg: Config, index: int, stop: Any) -> None:
    """Entry point of a receiver process."""
    _child_setup(cfg, stop)
    ctx = ReceiveContext(cfg, open_spool(cfg), Store(cfg.db_path))
    server = start_server(cfg, ctx)
    stop.wait()
    server.shutdown()
    server.server_close()
    log.info("receiver %d stopped", index)


def worker_main(cfg: Config, index: int, stop: Any) -> None:
    """Entry point of a worker process."""
    _child_setup(cfg, stop)
    local_stop = threading.Event()
    threading.Thread(target=lambda: (stop.wait(), local_stop.set()), daemon=True).start()
    make_worker(cfg, index).run(local_stop)
    log.info("worker %d stopped", index)


@dataclass
class _Child:
    name: str
    target: Callable[..., None]
    index: int
    process: Any = None


def serve(cfg: Config, *, ready: Callable[[], None] | None = None) -> int:
    """Run the node until SIGTERM/SIGINT. Returns the exit code."""
    spawn = mp.get_context("spawn")
    stop = spawn.Event()
    store = Store(cfg.db_path)
    report = recover(store, open_spool(cfg), reprocess_late=cfg.completion.on_late_instance.value == "reprocess")
    log.info("recovered: %s", report)
    children = [_Child(f"receiver-{i}", receiver_main, i) for i in range(cfg.node.receivers)]
    children += [_Child(f"worker-{i}", worker_main, i) for i in range(cfg.worker.workers)]

    def start(child: _Child) -> None:
        child.process = spawn.Process(target=child.target, args=(cfg, child.index, stop), name=child.name)
        child.process.start()

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for child in children:
        start(child)
    log.info("dicomnode %s serving on %s:%d with %d receiver(s) and %d worker(s)", cfg.node.ae_title,
             cfg.node.host, cfg.node.port, cfg.node.receivers, cfg.worker.workers)
    if ready is not None:
        ready()
    while not stop.wait(1.0):
        for child in children:
            if not child.process.is_alive():
                log.error("%s exited with code %s; restarting it", child.name, child.process.exitcode)
                time.sleep(0.5)
                start(child)
    for child in children:
        child.process.join(timeout=30)
        if child.process.is_alive():
            log.warning("%s did not stop in time; terminating", child.name)
            child.process.terminate()
            child.process.join(timeout=5)
    log.info("stopped")
    return 0
