"""Retention: ``dicomnode purge`` removes the files and history of finished series older than a duration.

Deletes only files under the spool and outbox folders, files before rows (see :func:`purge`). Never imports torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dicomnode.config import Config
from dicomnode.ops.admin import FINISHED_SERIES, PURGE_SCHEMA, open_store
from dicomnode.state.store import DeliveryState, Store


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(root.resolve()) for root in roots)


def purge(cfg: Config, older_than: float, *, force: bool = False, now: float | None = None) -> dict[str, Any]:
    """Remove spool files, outbox files and history rows of series idle for more than ``older_than`` seconds.

    A series qualifies when its last activity (last instance received, last job update) is before the cutoff
    and it is DONE, IGNORED or FAILED with no PENDING delivery. Without ``force`` anything else (RECEIVING or
    COMPLETE series, undelivered outputs) is kept and listed under ``skipped``. Files go first, then the rows
    (one transaction per series): a crash in between leaves rows whose files are missing, which recovery
    flags, never spool files without rows, which recovery would take for new data. Only files under the
    spool and outbox folders are deleted. Returns ``{"schema": "dicomnode.purge/1", "cutoff", "force",
    "removed": [{"series_uid", "state", "jobs", "files", "bytes"}], "skipped": [{"series_uid", "state",
    "reason"}], "files", "bytes"}``.
    """
    now = time.time() if now is None else now
    cutoff = now - older_than
    store = open_store(cfg)
    rows = store.read(
        "SELECT s.series_uid, s.state, MAX(s.last_received, COALESCE(MAX(j.updated_at), 0)) AS active,"
        " (SELECT COUNT(*) FROM deliveries d JOIN jobs k ON k.id = d.job_id"
        "  WHERE k.series_uid = s.series_uid AND d.state = ?) AS pending"
        " FROM series s LEFT JOIN jobs j ON j.series_uid = s.series_uid GROUP BY s.series_uid",
        (DeliveryState.PENDING.value,))
    removed, skipped = [], []
    for row in rows:
        if row["active"] >= cutoff:
            continue
        finished = row["state"] in {s.value for s in FINISHED_SERIES}
        if not force and (not finished or row["pending"]):
            why = f"{row['pending']} undelivered object(s)" if row["pending"] else f"series is {row['state']}"
            skipped.append({"series_uid": row["series_uid"], "state": row["state"], "reason": why})
            continue
        removed.append(_purge_series(cfg, store, row["series_uid"], row["state"], now))
    return {"schema": PURGE_SCHEMA, "cutoff": cutoff, "force": force, "removed": removed, "skipped": skipped,
            "files": sum(r["files"] for r in removed), "bytes": sum(r["bytes"] for r in removed)}


def _purge_series(cfg: Config, store: Store, series_uid: str, state: str, now: float) -> dict[str, Any]:
    job_ids = [j.id for j in store.list_jobs(series_uid=series_uid, limit=100000)]
    paths = {r.path for r in store.instances(series_uid, include_missing=True)}
    for jid in job_ids:
        paths.update(d.path for d in store.deliveries(jid))
    roots = (cfg.spool_dir, cfg.outbox_dir)
    n_files = n_bytes = 0
    folders: set[Path] = set()
    for name in sorted(paths):
        path = Path(name)
        if not _inside(path, roots) or not path.is_file():
            continue
        n_bytes += path.stat().st_size
        path.unlink()
        n_files += 1
        folders.add(path.parent)
    for folder in sorted(folders, reverse=True):
        if folder.resolve() not in {r.resolve() for r in roots}:
            try:
                folder.rmdir()  # only when empty: a late instance may have arrived meanwhile
            except OSError:
                pass
    with store.transaction() as conn:
        marks = ",".join("?" * len(job_ids))
        if job_ids:
            conn.execute(f"DELETE FROM deliveries WHERE job_id IN ({marks})", job_ids)
            conn.execute(f"DELETE FROM events WHERE job_id IN ({marks})", job_ids)
            conn.execute(f"DELETE FROM jobs WHERE id IN ({marks})", job_ids)
        conn.execute("DELETE FROM instances WHERE series_uid = ?", (series_uid,))
        conn.execute("DELETE FROM events WHERE series_uid = ?", (series_uid,))
        conn.execute("DELETE FROM series WHERE series_uid = ?", (series_uid,))
        Store.event(conn, "purge", f"series {series_uid} ({state}) purged: {len(job_ids)} job(s),"
                    f" {n_files} file(s)", now=now)
    return {"series_uid": series_uid, "state": state, "jobs": len(job_ids), "files": n_files,
            "bytes": n_bytes}
