"""Start-up recovery reconciles the spool with the state store after a crash."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from dicomnode.state import jobs
from dicomnode.state.jobs import Route
from dicomnode.state.recovery import recover
from dicomnode.state.spool import Spool
from dicomnode.state.store import InstanceMeta, JobState, Store
from tests.conftest import series_dir


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
