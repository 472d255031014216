"""The state store's schema and its versions: the tables, ``PRAGMA user_version`` and the migrations.

A new store is created at :data:`SCHEMA_VERSION`. A store written by an older dicomnode (version 0: written
before stores had a version) is brought up to it step by step (:data:`MIGRATIONS`), keeping every row: a node
upgraded over an existing ``dicomnode.sqlite3`` keeps its queue. A store written by a newer dicomnode is
refused (StoreError): this release does not know that schema and must not write to it. An older release opening
a migrated store ignores the version and finds every table it knows (migrations only add).

Add a migration by appending a :class:`Migration` with the next version, changing :data:`SCHEMA` to the result
and raising :data:`SCHEMA_VERSION`; migrations only add (tables, columns with defaults, indexes).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from dicomnode.errors import StoreError

SCHEMA = """
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
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, destination);
"""

# The schema's version, kept in the database header (PRAGMA user_version). Version 0 is a store written before
# stores had a version (the schema above without the deliveries_state index).
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Migration:
    """The step from ``version - 1`` to ``version``: SQL statements run in one write transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS = (
    Migration(1, "index of deliveries by state and destination (the backlog gauge and status read it)",
              ("CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, destination)",)),
)


def user_version(conn: sqlite3.Connection) -> int:
    """The schema version recorded in the database header (0 for a new or a pre-version store)."""
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, path: Path, *, now: float) -> None:
    """Inside the caller's write transaction: create the tables of a new store, or run the migrations an older
    store lacks, each recorded as a ``store.migrated`` event; then stamp :data:`SCHEMA_VERSION`. StoreError for a
    store of a newer version (left untouched)."""
    version = user_version(conn)
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"state store {path} has schema version {version}, newer than this dicomnode's ({SCHEMA_VERSION}):"
            " it was written by a newer release; run that release, or restore a backup")
    if version == SCHEMA_VERSION:
        return  # another process migrated it meanwhile
    new = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").fetchone() is None
    if new:
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
    else:
        for step in MIGRATIONS[version:]:
            for statement in step.statements:
                conn.execute(statement)
            conn.execute("INSERT INTO events (ts, kind, message) VALUES (?, 'store.migrated', ?)",
                         (now, f"schema version {step.version - 1} -> {step.version}: {step.description}"))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
