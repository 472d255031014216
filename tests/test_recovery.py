"""Start-up recovery reconciles the spool with the state store after a crash."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dicomnode.errors import StoreError
from dicomnode.state import jobs
from dicomnode.state.jobs import Route
from dicomnode.state.owners import OwnerLock, sweep
from dicomnode.state.recovery import recover
from dicomnode.state.spool import Spool
from dicomnode.state.store import DeliveryState, InstanceMeta, JobState, Store
from tests.conftest import REPO, series_dir
from tests.peers import NodeProcess, StoreSCP, node_config, stored_count, storescu, wait_until


def _meta(path: Path) -> InstanceMeta:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceMeta(sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, series_uid=ds.SeriesInstanceUID,
                        study_uid=ds.StudyInstanceUID, transfer_syntax=ds.file_meta.TransferSyntaxUID, modality="CT")


def test_recovery_records_orphans_flags_missing_and_drops_partials(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    spool = Spool(tmp_path / "spool", fsync=False)
    files = sorted(series_dir("P03").iterdir())[:5]
    metas = [_meta(f) for f in files]
    written = [spool.write(m.series_uid, m.sop_uid, f.read_bytes()) for m, f in zip(metas, files, strict=True)]
    for m, w in list(zip(metas, written, strict=True))[:3]:  # the last two rows were lost in the crash
        store.record_instance(m, w.path, w.size, now=1.0, reprocess_late=True)
    written[0].path.unlink()  # and one recorded file vanished
    partial = written[0].path.parent / ".tmp-1.2.3.4242.dead"
    partial.write_bytes(b"half an instance")

    report = recover(store, spool, reprocess_late=True, now=100.0)

    assert (report.partial_removed, report.recorded, report.missing) == (1, 2, 1)
    assert not partial.exists()
    rows = store.instances(metas[0].series_uid, include_missing=True)
    assert {r.sop_uid for r in rows} == {m.sop_uid for m in metas}
    assert [r.sop_uid for r in rows if r.missing] == [metas[0].sop_uid]
    series = store.get_series(metas[0].series_uid)
    assert series is not None and series.n_instances == 4
    assert any(e.kind == "recovery" for e in store.events())
    assert recover(store, spool, reprocess_late=True, now=101.0).recorded == 0  # idempotent


def test_jobs_of_a_dead_worker_on_this_host_are_requeued_at_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite3")
    spool = Spool(tmp_path / "spool", fsync=False)
    m = _meta(next(series_dir("P03").iterdir()))
    store.record_instance(m, Path("/nowhere"), 1, now=1.0, reprocess_late=True)
    jobs.promote(store, lambda s: Route(("p",), "test"), now=100.0, quiet_seconds=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = f"{socket.gethostname()}:{int(dead.stdout)}:0"
    alive_owner = f"{socket.gethostname()}:{os.getpid()}:0"
    job = jobs.claim(store, owner, now=101.0, lease_seconds=3600)
    assert job is not None
    assert recover(store, spool, reprocess_late=True, now=102.0).requeued == 1
    again = jobs.claim(store, alive_owner, now=103.0, lease_seconds=3600)
    assert again is not None and again.id == job.id
    assert recover(store, spool, reprocess_late=True, now=104.0).requeued == 0  # a live worker keeps its job
    assert store.get_job(job.id).state is JobState.RUNNING  # type: ignore[union-attr]


CLAIMING_WORKER = """
import sys, time
from pathlib import Path
from dicomnode.errors import StoreError
from dicomnode.state import jobs
from dicomnode.state.owners import OwnerLock
from dicomnode.state.store import Store
from dicomnode.work.worker import owner_id
store = Store(Path(sys.argv[1]))
lock = OwnerLock.acquire(store.path, owner_id(0))
assert jobs.claim(store, owner_id(0), now=101.0, lease_seconds=3600) is not None
print("claimed", flush=True)
time.sleep(600)
"""


def _state(pid: int) -> str:
    """The one-letter process state from /proc (R, S, D, Z...), or "" once the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return ""


def test_a_killed_worker_is_gone_once_its_lock_is_free_even_while_its_pid_still_exists(tmp_path: Path) -> None:
    """The killed worker is left unreaped (a zombie: its pid answers kill(pid, 0), as a process that has not
    finished exiting does): its lock is free, so its job is requeued at once; while it ran, it was kept."""
    store = Store(tmp_path / "db.sqlite3")
    spool = Spool(tmp_path / "spool", fsync=False)
    store.record_instance(_meta(next(series_dir("P03").iterdir())), Path("/nowhere"), 1, now=1.0,
                          reprocess_late=True)
    jobs.promote(store, lambda s: Route(("p",), "test"), now=100.0, quiet_seconds=1)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", CLAIMING_WORKER, str(store.path)], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "claimed"
        (job,) = store.list_jobs()
        assert job.state is JobState.RUNNING and job.lease_owner == f"{socket.gethostname()}:{child.pid}:0"
        assert recover(store, spool, reprocess_late=True, now=102.0).requeued == 0  # alive: keeps its job
        os.kill(child.pid, signal.SIGKILL)
        wait_until(lambda: _state(child.pid) == "Z", 10, "the killed worker to be a zombie")
        os.kill(child.pid, 0)  # its pid still exists: a pid check would keep the job RUNNING for an hour
        # The kernel lets go of the lock when the last of the process' threads has exited, which can be a moment
        # after its main thread shows as a zombie (torch and friends start threads); recovery runs on every
        # worker step, so the job is requeued at the first step after that.
        counts: list[int] = []

        def requeued_once() -> bool:
            counts.append(recover(store, spool, reprocess_late=True, now=103.0).requeued)
            return sum(counts) == 1

        wait_until(requeued_once, 10, "the dead worker's job to be requeued")
        requeued = store.get_job(job.id)
        assert requeued is not None and requeued.state is JobState.QUEUED
        assert "is gone (its lock is free)" in store.events(job_id=job.id)[-1].message
        assert list((tmp_path / "workers").iterdir()) == []  # the dead owner's lock file is swept
    finally:
        child.kill()
        child.wait()


def test_owner_locks_are_exclusive_and_swept_only_when_free(tmp_path: Path) -> None:
    db = tmp_path / "db.sqlite3"
    lock = OwnerLock.acquire(db, "host:1:0")
    with pytest.raises(StoreError, match="in use by a live process"):
        OwnerLock.acquire(db, "host:1:0")
    other = OwnerLock.acquire(db, "host/with:odd name:2")
    assert sweep(db) == []  # both held
    other.release()
    assert sweep(db) == ["host/with:odd name:2"] and sweep(db) == []
    lock.release()
    again = OwnerLock.acquire(db, "host:1:0")  # a new process with the same name (pid reused) takes it over
    assert sweep(db) == []
    again.release()
    assert sweep(db) == ["host:1:0"]


@pytest.mark.peers
def test_kill9_of_the_node_mid_job_and_a_quick_restart_requeues_the_job_at_once(tmp_path: Path) -> None:
    """kill -9 of the whole process group while a worker runs a segment job, and a restart 0.3 s later, while
    the killed processes may still be exiting: the job goes back to the queue at once (not after its 10-minute
    lease), runs again and its outputs reach the destination."""
    scp = StoreSCP(tmp_path / "scp")
    cfg = node_config(tmp_path, worker={"lease_seconds": 600},
                      destinations=[{"name": "scp", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}],
                      pipelines=[{"name": "lung", "kind": "segment", "destinations": ["scp"],
                                  "model": {"kind": "lung"}, "outputs": {"overlay_max": 4}}],
                      rules=[{"name": "ct", "pipelines": ["lung"]}])
    node = NodeProcess(tmp_path, cfg).start()
    store = Store(tmp_path / "data" / "dicomnode.sqlite3")
    try:
        assert stored_count(storescu(node.port, [series_dir("P01")])) == 64
        wait_until(lambda: any(j.state is JobState.RUNNING for j in store.list_jobs()), 60, "job running",
                   interval=0.01)
        node.kill9()  # supervisor, receiver and the worker mid-job
        time.sleep(0.3)  # the scenario: an operator (or systemd) restarts the node at once
        restarted = time.time()
        node.start()
        (job,) = store.list_jobs()
        wait_until(lambda: store.get_job(job.id).state is not JobState.RUNNING  # type: ignore[union-attr]
                   or store.get_job(job.id).lease_owner != job.lease_owner, 20,  # type: ignore[union-attr]
                   "the killed worker's job to be taken up again")
        wait_until(lambda: store.get_job(job.id).state is JobState.DONE, 180, "job done")  # type: ignore[union-attr]
        requeued = [e for e in store.events(job_id=job.id) if e.kind == "job.requeued"]
        assert len(requeued) == 1 and requeued[0].ts - restarted < 20, requeued
        assert store.get_job(job.id).attempts == 2  # type: ignore[union-attr]
        delivered = store.deliveries(job.id)
        assert delivered and all(d.state is DeliveryState.STORED for d in delivered)
        received = {p.name for p in scp.files()}
        assert len(received) == len(delivered)  # storescp names files by SOP Instance UID: each object once
    finally:
        node.stop()
        scp.stop()
        store.close()
