"""The state store: SQLite (WAL) shared by receivers, workers and the CLI; the only link between them.

Tables: ``series`` (one row per SeriesInstanceUID), ``instances``, ``jobs`` (one per series, pipeline and
generation), ``deliveries`` (one per job, destination and object: the outbox ledger) and an append-only
``events`` table recording every transition with its reason.

Durability: the spool is the source of truth for received data (every file is fsynced before its C-STORE is
acknowledged); the database runs with ``synchronous=NORMAL``, so after a power cut the last few rows may be
missing, and :func:`dicomnode.state.recovery.recover` re-records spool files that have no row. All times are Unix
seconds (float). The schema carries a version (``PRAGMA user_version``, :mod:`dicomnode.state.schema`): opening a store
written by an older dicomnode migrates it in place, keeping its queue; a store from a newer one is refused.
Every write goes through :meth:`Store.transaction`, which takes the write lock up front
(``BEGIN IMMEDIATE``) so two workers can never claim the same job.

Writers queue on a lock of their own before SQLite's: a thread lock within a process and ``flock`` on
``<database>.writer-lock`` across processes. Both wake the next writer the moment the lock is free, where
SQLite's busy handler sleeps and polls (1, 2, 5, 10 ms...): with several receiver processes writing a row per
instance, those sleeps would otherwise land on the C-STORE's critical path. The busy timeout stays as a safety
net for any writer that does not take the lock.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomnode.errors import StoreError
from dicomnode.state import schema
from dicomnode.state.rows import (
    DeliveryRow,
    DeliveryState,
    EventRow,
    InstanceMeta,
    InstanceRow,
    JobRow,
    JobState,
    RecordOutcome,
    SeriesRow,
    SeriesState,
    delivery_row,
    job_row,
    series_row,
)

__all__ = [  # the rows and states are part of the store's interface (defined in rows.py)
    "DeliveryRow", "DeliveryState", "EventRow", "InstanceMeta", "InstanceRow", "JobRow", "JobState",
    "RecordOutcome", "SeriesRow", "SeriesState", "Store",
]


class Store:
    """Thread-safe access to the SQLite state store (one connection per thread, WAL, busy timeout)."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 30.0) -> None:
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer_lock = threading.Lock()
        self._writer_fd: int | None = None
        self._writer_pid = os.getpid()
        self._prepare_schema()

    def _prepare_schema(self) -> None:
        """Create the tables, or migrate an older store (:func:`dicomnode.state.schema.migrate`): in one write
        transaction, so processes starting together migrate once; no write lock when the store is current."""
        if schema.user_version(self._conn()) == schema.SCHEMA_VERSION:
            return
        with self.transaction() as conn:
            schema.migrate(conn, self.path, now=time.time())

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot open state store {self.path}: {exc}") from exc
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_s * 1000)}")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _writer_file(self) -> int:
        # flock belongs to the open file description: a forked child must open its own, or it would share
        # (not contend for) its parent's lock.
        if self._writer_fd is None or self._writer_pid != os.getpid():
            self._writer_pid = os.getpid()
            lock_path = self.path.with_name(self.path.name + ".writer-lock")
            try:
                self._writer_fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o640)
            except OSError as exc:
                raise StoreError(f"cannot open the writer lock {lock_path}: {exc}") from exc
        return self._writer_fd

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction (BEGIN IMMEDIATE): commit on success, roll back on any exception."""
        conn = self._conn()
        with self._writer_lock:
            fd = self._writer_file()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise StoreError(f"state store busy or unavailable: {exc}") from exc
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                else:
                    conn.execute("COMMIT")
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def read(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        """Run a read-only query outside any write transaction."""
        return list(self._conn().execute(sql, params))

    @staticmethod
    def event(conn: sqlite3.Connection, kind: str, message: str, *, now: float,
              series_uid: str | None = None, job_id: int | None = None) -> None:
        """Append one event (inside the caller's transaction)."""
        conn.execute(
            "INSERT INTO events (ts, kind, series_uid, job_id, message) VALUES (?, ?, ?, ?, ?)",
            (now, kind, series_uid, job_id, message),
        )

    def add_event(self, kind: str, message: str, *, series_uid: str | None = None,
                  job_id: int | None = None, now: float | None = None) -> None:
        with self.transaction() as conn:
            self.event(conn, kind, message, now=time.time() if now is None else now,
                       series_uid=series_uid, job_id=job_id)

    # ------------------------------------------------------------------------------------------ series

    def get_series(self, series_uid: str) -> SeriesRow | None:
        rows = self.read("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
        return series_row(rows[0]) if rows else None

    def list_series(self, *, limit: int = 1000) -> list[SeriesRow]:
        rows = self.read("SELECT * FROM series ORDER BY last_received DESC LIMIT ?", (limit,))
        return [series_row(r) for r in rows]

    def series_in_state(self, state: SeriesState) -> list[SeriesRow]:
        rows = self.read("SELECT * FROM series WHERE state = ? ORDER BY last_received", (state.value,))
        return [series_row(r) for r in rows]

    def instances(self, series_uid: str, *, include_missing: bool = False) -> list[InstanceRow]:
        sql = "SELECT * FROM instances WHERE series_uid = ?" + ("" if include_missing else " AND missing = 0")
        return [InstanceRow(**{**dict(r), "missing": bool(r["missing"])})
                for r in self.read(sql + " ORDER BY sop_uid", (series_uid,))]

    def instance(self, sop_uid: str) -> InstanceRow | None:
        rows = self.read("SELECT * FROM instances WHERE sop_uid = ?", (sop_uid,))
        return InstanceRow(**{**dict(rows[0]), "missing": bool(rows[0]["missing"])}) if rows else None

    # ------------------------------------------------------------------------------------------ jobs

    def get_job(self, job_id: int) -> JobRow | None:
        rows = self.read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return job_row(rows[0]) if rows else None

    def list_jobs(self, *, state: JobState | None = None, since: float | None = None,
                  series_uid: str | None = None, limit: int = 1000) -> list[JobRow]:
        clauses, params = [], []
        for clause, value in (("state = ?", state.value if state else None), ("updated_at >= ?", since),
                              ("series_uid = ?", series_uid)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.read(f"SELECT * FROM jobs {where} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [job_row(r) for r in rows]

    def deliveries(self, job_id: int, *, destination: str | None = None) -> list[DeliveryRow]:
        if destination is None:
            rows = self.read("SELECT * FROM deliveries WHERE job_id = ? ORDER BY destination, sop_uid", (job_id,))
        else:
            rows = self.read("SELECT * FROM deliveries WHERE job_id = ? AND destination = ? ORDER BY sop_uid",
                             (job_id, destination))
        return [delivery_row(r) for r in rows]

    def events(self, *, series_uid: str | None = None, job_id: int | None = None,
               limit: int = 1000) -> list[EventRow]:
        if series_uid is not None:
            rows = self.read(
                "SELECT * FROM events WHERE series_uid = ? OR job_id IN (SELECT id FROM jobs WHERE series_uid = ?)"
                " ORDER BY id LIMIT ?", (series_uid, series_uid, limit))
        elif job_id is not None:
            rows = self.read("SELECT * FROM events WHERE job_id = ? ORDER BY id LIMIT ?", (job_id, limit))
        else:
            rows = self.read("SELECT * FROM events ORDER BY id DESC LIMIT ?", (limit,))
        return [EventRow(**dict(r)) for r in rows]

    def counts(self) -> dict[str, dict[str, int]]:
        """{"series": {state: n}, "jobs": {state: n}} with every state present (zeros included)."""
        out: dict[str, dict[str, int]] = {
            "series": {s.value: 0 for s in SeriesState}, "jobs": {s.value: 0 for s in JobState}}
        for table in ("series", "jobs"):
            for row in self.read(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state"):
                out[table][row["state"]] = row["n"]
        return out

    # ------------------------------------------------------------------------------------------ receiving

    def record_instance(self, meta: InstanceMeta, path: Path, size: int, *, now: float,
                        reprocess_late: bool) -> tuple[RecordOutcome, str | None]:
        """Record a spooled instance; return what happened and the path of a replaced copy, if it moved.

        A repeated SOP Instance UID replaces the earlier row and counts once. An instance for a series that
        was already judged complete reopens it (``reprocess_late``: new generation, queued jobs of the old one
        cancelled) or is only recorded (an event says so).
        """
        with self.transaction() as conn:
            old = conn.execute("SELECT series_uid, path, size FROM instances WHERE sop_uid = ?",
                               (meta.sop_uid,)).fetchone()
            series = conn.execute("SELECT state, generation FROM series WHERE series_uid = ?",
                                  (meta.series_uid,)).fetchone()
            outcome = RecordOutcome.REPLACED if old is not None else RecordOutcome.NEW
            if series is None:
                conn.execute(
                    "INSERT INTO series (series_uid, study_uid, modality, body_part, description, sop_class_uid,"
                    " image_type, calling_aet, first_received, last_received, state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (meta.series_uid, meta.study_uid, meta.modality, meta.body_part, meta.description,
                     meta.sop_class_uid, meta.image_type, meta.calling_aet, now, now,
                     SeriesState.RECEIVING.value))
                self.event(conn, "series.new", f"first instance from {meta.calling_aet or '?'}",
                           now=now, series_uid=meta.series_uid)
            elif series["state"] != SeriesState.RECEIVING.value:
                outcome = self._late_instance(conn, meta, series["state"], series["generation"], now,
                                              reprocess_late)
            if old is not None:
                conn.execute("UPDATE series SET n_instances = n_instances - 1, n_bytes = n_bytes - ?"
                             " WHERE series_uid = ?", (old["size"], old["series_uid"]))
            conn.execute(
                "INSERT OR REPLACE INTO instances (sop_uid, series_uid, sop_class_uid, transfer_syntax, path,"
                " size, received_at, missing) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                (meta.sop_uid, meta.series_uid, meta.sop_class_uid, meta.transfer_syntax, str(path), size, now))
            conn.execute(
                "UPDATE series SET n_instances = n_instances + 1, n_bytes = n_bytes + ?, last_received = ?,"
                " released_at = NULL WHERE series_uid = ?", (size, now, meta.series_uid))
        moved = old["path"] if old is not None and old["path"] != str(path) else None
        return outcome, moved

    def _late_instance(self, conn: sqlite3.Connection, meta: InstanceMeta, state: str, generation: int,
                       now: float, reprocess: bool) -> RecordOutcome:
        if not reprocess:
            self.event(conn, "series.late-instance",
                       f"instance arrived after the series was {state}; stored, not processed again"
                       " (completion.on_late_instance = ignore)", now=now, series_uid=meta.series_uid)
            return RecordOutcome.LATE_IGNORED
        conn.execute("UPDATE series SET state = ?, reason = '', generation = ? WHERE series_uid = ?",
                     (SeriesState.RECEIVING.value, generation + 1, meta.series_uid))
        cancelled = conn.execute(
            "UPDATE jobs SET state = ?, error = ?, updated_at = ? WHERE series_uid = ? AND state = ?",
            (JobState.CANCELLED.value, f"superseded by generation {generation + 1}", now, meta.series_uid,
             JobState.QUEUED.value)).rowcount
        self.event(conn, "series.reopened",
                   f"instance arrived after the series was {state}: reopened as generation {generation + 1},"
                   f" {cancelled} queued job(s) superseded", now=now, series_uid=meta.series_uid)
        return RecordOutcome.REOPENED

    def mark_released(self, series_uids: list[str], *, now: float) -> None:
        """The association that delivered these series was released (evidence for completion)."""
        with self.transaction() as conn:
            conn.executemany("UPDATE series SET released_at = ? WHERE series_uid = ? AND state = ?",
                             [(now, uid, SeriesState.RECEIVING.value) for uid in series_uids])

    def mark_missing(self, sop_uids: list[str], *, now: float) -> None:
        """Rows whose spool file is gone (found at recovery): flagged, excluded from processing."""
        with self.transaction() as conn:
            for sop in sop_uids:
                row = conn.execute("SELECT series_uid, size FROM instances WHERE sop_uid = ?", (sop,)).fetchone()
                conn.execute("UPDATE instances SET missing = 1 WHERE sop_uid = ?", (sop,))
                conn.execute("UPDATE series SET n_instances = n_instances - 1, n_bytes = n_bytes - ?"
                             " WHERE series_uid = ?", (row["size"], row["series_uid"]))
                self.event(conn, "instance.missing", f"spool file of instance {sop} is missing",
                           now=now, series_uid=row["series_uid"])

    def all_instance_paths(self) -> dict[str, str]:
        """sop_uid -> path for every instance not already flagged missing (used by recovery)."""
        return {r["sop_uid"]: r["path"] for r in self.read("SELECT sop_uid, path FROM instances WHERE missing = 0")}
