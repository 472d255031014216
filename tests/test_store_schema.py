"""The state store's schema version (PRAGMA user_version) and its migrations at start-up: a node upgraded over an
existing dicomnode.sqlite3 keeps its queue; a store written by a newer dicomnode is refused with a clear error."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from dicomnode.errors import StoreError
from dicomnode.state import jobs
from dicomnode.state.jobs import Backoff
from dicomnode.state.schema import MIGRATIONS, SCHEMA_VERSION
from dicomnode.state.store import InstanceMeta, JobState, SeriesState, Store
from tests.peers import free_port

T0 = 1_700_000_000.0

# The schema as dicomnode wrote it before stores had a version (git ea8bdff, dicomnode/state/store.py), verbatim:
# such a store has user_version 0.
PREVIOUS_SCHEMA = """
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, modality TEXT NOT NULL DEFAULT '',
    body_part TEXT NOT NULL DEFAULT '', description TEXT NOT NULL DEFAULT '',
    sop_class_uid TEXT NOT NULL DEFAULT '', image_type TEXT NOT NULL DEFAULT '',
    calling_aet TEXT NOT NULL DEFAULT '', n_instances INTEGER NOT NULL DEFAULT 0,
    n_bytes INTEGER NOT NULL DEFAULT 0, first_received REAL NOT NULL, last_received REAL NOT NULL,
    released_at REAL, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    generation INTEGER NOT NULL DEFAULT 1);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_received);
CREATE TABLE IF NOT EXISTS instances (
    sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, received_at REAL NOT NULL,
    missing INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, series_uid TEXT NOT NULL, pipeline TEXT NOT NULL, generation INTEGER NOT NULL,
    state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, lease_owner TEXT, lease_expires REAL,
    next_attempt_at REAL NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    error TEXT NOT NULL DEFAULT '', outputs_ready INTEGER NOT NULL DEFAULT 0,
    UNIQUE (series_uid, pipeline, generation));
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL, destination TEXT NOT NULL, sop_uid TEXT NOT NULL, path TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, state TEXT NOT NULL,
    status INTEGER, detail TEXT NOT NULL DEFAULT '', updated_at REAL NOT NULL,
    PRIMARY KEY (job_id, destination, sop_uid));
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, kind TEXT NOT NULL, series_uid TEXT, job_id INTEGER,
    message TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_series ON events(series_uid);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
"""


def _previous_store(path: Path, n_series: int = 3) -> None:
    """A store as the previous dicomnode left it: instances received, series complete, jobs QUEUED (one RUNNING,
    held by a worker that is gone), a PENDING delivery, the event history."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(PREVIOUS_SCHEMA)
    with conn:
        for i in range(n_series):
            uid = f"1.2.3.{i}"
            conn.execute("INSERT INTO series (series_uid, study_uid, modality, n_instances, n_bytes, first_received,"
                         " last_received, state, reason) VALUES (?, '1.2', 'CT', 1, 100, ?, ?, 'COMPLETE', 'test')",
                         (uid, T0, T0))
            conn.execute("INSERT INTO instances VALUES (?, ?, '1.2.840.10008.5.1.4.1.1.2', '1.2.840.10008.1.2.1',"
                         " ?, 100, ?, 0)", (f"{uid}.1", uid, f"/spool/{uid}.1.dcm", T0))
            conn.execute("INSERT INTO jobs (series_uid, pipeline, generation, state, next_attempt_at, created_at,"
                         " updated_at) VALUES (?, 'fwd', 1, 'QUEUED', ?, ?, ?)", (uid, T0, T0, T0))
            conn.execute("INSERT INTO events (ts, kind, series_uid, message) VALUES (?, 'job.queued', ?, 'fwd')",
                         (T0, uid))
        conn.execute("UPDATE jobs SET state = 'RUNNING', attempts = 1, lease_owner = 'old:1:0', lease_expires = ?"
                     " WHERE id = 1", (T0 + 900,))
        conn.execute("INSERT INTO deliveries VALUES (2, 'pacs', '2.25.9', '/outbox/x.dcm',"
                     " '1.2.840.10008.5.1.4.1.1.66.4', '1.2.840.10008.1.2.1', 'PENDING', NULL, '', ?)", (T0,))
    conn.close()


def _user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def test_a_store_of_the_previous_schema_is_migrated_and_keeps_its_queue(tmp_path: Path) -> None:
    db = tmp_path / "dicomnode.sqlite3"
    _previous_store(db)
    assert _user_version(db) == 0

    store = Store(db)

    assert _user_version(db) == SCHEMA_VERSION >= 1
    assert [(j.id, j.state) for j in store.list_jobs()] == [
        (3, JobState.QUEUED), (2, JobState.QUEUED), (1, JobState.RUNNING)]
    assert store.get_series("1.2.3.0").state is SeriesState.COMPLETE  # type: ignore[union-attr]
    assert [d.sop_uid for d in store.deliveries(2)] == ["2.25.9"]
    assert any(e.kind == "store.migrated" for e in store.events())
    # ... and workable by the new code: the dead worker's lease runs out, every job is claimed and finished.
    assert jobs.requeue_expired(store, now=T0 + 1000) == [1]
    done = []
    while (job := jobs.claim(store, "new:1:0", now=T0 + 1001, lease_seconds=60)) is not None:
        done.append(jobs.finish(store, job, "new:1:0", now=T0 + 1002, error=None, backoff=Backoff(3, 1, 1)))
    assert done == [JobState.DONE] * 3
    assert store.get_series("1.2.3.2").state is SeriesState.DONE  # type: ignore[union-attr]
    store.record_instance(InstanceMeta("9.9.1", "1.2.840.10008.5.1.4.1.1.2", "9.9", "9", "1.2.840.10008.1.2.1"),
                          Path("/spool/9.9.1.dcm"), 10, now=T0 + 2000, reprocess_late=True)
    store.close()
    again = Store(db)  # opening a current store again changes nothing
    assert _user_version(db) == SCHEMA_VERSION and len(again.list_jobs()) == 3
    assert sum(e.kind == "store.migrated" for e in again.events()) == 1


def test_a_new_store_starts_at_the_current_version(tmp_path: Path) -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1))  # one step per version
    db = tmp_path / "fresh.sqlite3"
    Store(db)
    assert _user_version(db) == SCHEMA_VERSION
    assert not any(e.kind == "store.migrated" for e in Store(db).events())


def test_a_store_from_a_newer_dicomnode_is_a_clear_start_up_error(tmp_path: Path) -> None:
    db = tmp_path / "data" / "dicomnode.sqlite3"
    db.parent.mkdir()
    _previous_store(db)
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}.*newer"):
        Store(db)
    config = tmp_path / "node.yaml"
    config.write_text(f"node:\n  port: {free_port()}\nstorage:\n  path: {db.parent}\n  min_free_mb: 1\n")
    serve = subprocess.run([sys.executable, "-m", "dicomnode", "serve", "-c", str(config)], capture_output=True,
                           text=True, timeout=60)
    assert serve.returncode == 1 and f"schema version {SCHEMA_VERSION + 1}" in serve.stderr, serve.stderr
    assert _user_version(db) == SCHEMA_VERSION + 1  # left as it was
