"""A cancelled job stops: nothing more is produced or sent once the worker no longer owns the job (issue 15).

The destination is a real pynetdicom Storage SCP whose C-STORE handler is slow, so the job is caught in the
middle of its delivery; the same holds when the job's lease is lost to another worker.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomnode.config import parse_config
from dicomnode.ops.service import pipeline_context
from dicomnode.state import jobs
from dicomnode.state.spool import Spool
from dicomnode.state.store import InstanceMeta, JobState, Store
from dicomnode.work.routing import make_router
from dicomnode.work.worker import Worker
from tests.conftest import series_dir
from tests.peers import NodeProcess, free_port, node_config, stored_count, storescu, wait_until

pytestmark = pytest.mark.peers


class SlowSCP:
    """A C-STORE SCP that takes ``delay`` seconds per instance and records what it kept and when."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.received: list[tuple[float, str]] = []
        self.closed = threading.Event()
        self.port = free_port()
        self._lock = threading.Lock()
        ae = AE(ae_title="SLOWPACS")
        ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
        handlers: list[Any] = [(evt.EVT_C_STORE, self._store), (evt.EVT_CONN_CLOSE, lambda e: self.closed.set())]
        server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server

    def _store(self, event: evt.Event) -> int:
        time.sleep(self.delay)
        with self._lock:
            request: Any = event.request
            self.received.append((time.monotonic(), str(request.AffectedSOPInstanceUID)))
        return 0x0000

    def count(self) -> int:
        with self._lock:
            return len(self.received)

    def stop(self) -> None:
        self.server.shutdown()


def _forward_config(workdir: Path, scp: SlowSCP, **extra: Any) -> dict[str, Any]:
    return node_config(workdir, destinations=[{"name": "slow", "ae_title": "SLOWPACS", "host": "127.0.0.1",
                                               "port": scp.port}],
                       pipelines=[{"name": "archive", "kind": "forward", "destinations": ["slow"]}],
                       rules=[{"name": "all", "pipelines": ["archive"]}], **extra)


def test_cancel_during_delivery_stops_sending(tmp_path: Path) -> None:
    scp = SlowSCP(delay=0.5)  # 28 objects take 14 s: the cancel lands well inside the delivery
    node = NodeProcess(tmp_path, _forward_config(tmp_path, scp)).start()
    store = Store(tmp_path / "data" / "dicomnode.sqlite3")
    try:
        assert stored_count(storescu(node.port, [series_dir("P03")])) == 28
        wait_until(lambda: scp.count() >= 3, 60, "the slow destination to receive a few objects")
        (job,) = store.list_jobs()
        out = node.cli("cancel", str(job.id))
        assert out.returncode == 0, out.stderr
        at_cancel = scp.count()
        assert "cancelled" in out.stdout
        # The worker notices before its next C-STORE and releases the association.
        assert scp.closed.wait(30), "the node kept the association open after the cancel"
        at_close = scp.count()
        assert at_close < 28, f"all {at_close} objects were delivered despite the cancel"
        assert at_close <= at_cancel + 1  # at most the C-STORE in flight when the job was cancelled
        time.sleep(1.5)  # nothing may arrive any more: no retry, no new association
        assert scp.count() == at_close
        final = store.get_job(job.id)
        assert final is not None and final.state is JobState.CANCELLED
        assert sum(d.state.value == "STORED" for d in store.deliveries(job.id)) == at_close
    finally:
        node.stop()
        scp.stop()


def test_a_lease_lost_to_another_worker_stops_sending(tmp_path: Path) -> None:
    """In process: while worker A delivers, its lease expires and worker B takes the job; A sends no more."""
    scp = SlowSCP(delay=0.1)
    raw = _forward_config(tmp_path, scp, completion={"quiet_seconds": 0})
    cfg = parse_config(raw)
    store = Store(cfg.db_path)
    ctx = pipeline_context(cfg)
    _receive_p03(ctx.store, ctx.spool)
    worker_a = Worker(ctx, make_router(cfg), index=1)
    taken: list[int] = []

    def take_over() -> None:
        wait_until(lambda: scp.count() >= 3, 60, "worker A to deliver a few objects")
        now = time.time() + cfg.worker.lease_seconds + 1  # A's lease has run out as far as B can tell
        taken.extend(jobs.requeue_expired(store, now=now))
        claimed = jobs.claim(store, "other-host:1:0", now=now, lease_seconds=cfg.worker.lease_seconds)
        assert claimed is not None

    thread = threading.Thread(target=take_over)
    thread.start()
    try:
        result = worker_a.step()
        thread.join(60)
        assert taken == [result.job_id]
        sent = scp.count()
        assert sent < 28, "worker A went on sending after losing its lease"
        job = store.get_job(result.job_id)  # type: ignore[arg-type]
        assert job is not None and job.state is JobState.RUNNING and job.lease_owner == "other-host:1:0"
        assert result.job_state is JobState.RUNNING  # A's attempt was discarded; B owns the job
    finally:
        scp.stop()



def _receive_p03(store: Store, spool: Spool) -> None:
    """P03's instances in the spool and the store as the receiver leaves them, quiet for 10 s."""
    for path in sorted(series_dir("P03").iterdir()):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        written = spool.write(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), path.read_bytes())
        meta = InstanceMeta(sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                            series_uid=str(ds.SeriesInstanceUID), study_uid=str(ds.StudyInstanceUID),
                            transfer_syntax=str(ds.file_meta.TransferSyntaxUID), modality="CT", description="",
                            calling_aet="CT1")
        store.record_instance(meta, written.path, written.size, now=time.time() - 10, reprocess_late=True)


def test_a_job_cancelled_while_producing_records_and_sends_nothing(tmp_path: Path) -> None:
    """Cancelled during its inference (body mask, RTSTRUCT of P03): the outputs are neither entered in the
    delivery ledger nor sent; the job stays CANCELLED."""
    results = tmp_path / "results"
    cfg = parse_config({"storage": {"path": str(tmp_path / "data")}, "completion": {"quiet_seconds": 0},
                        "destinations": [{"name": "results", "kind": "folder", "path": str(results)}],
                        "pipelines": [{"name": "body", "kind": "segment", "destinations": ["results"],
                                       "model": {"kind": "body"}, "outputs": {"kinds": ["rtstruct"]}}],
                        "rules": [{"name": "all", "pipelines": ["body"]}]})
    ctx = pipeline_context(cfg)
    _receive_p03(ctx.store, ctx.spool)

    def cancel_once_running() -> None:
        wait_until(lambda: any(j.state is JobState.RUNNING for j in ctx.store.list_jobs()), 60, "the job to run")
        (job,) = ctx.store.list_jobs()
        jobs.cancel(ctx.store, job.id, now=time.time())

    thread = threading.Thread(target=cancel_once_running)
    thread.start()
    result = Worker(ctx, make_router(cfg)).step()
    thread.join(60)
    assert result.job_state is JobState.CANCELLED
    job = ctx.store.get_job(result.job_id)  # type: ignore[arg-type]
    assert job is not None and job.state is JobState.CANCELLED and not job.outputs_ready
    assert ctx.store.deliveries(job.id) == []
    assert not results.exists() or not any(results.rglob("*.dcm"))
