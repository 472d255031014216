"""The admin verbs' logic over the state store; ``ops/cli.py`` only parses arguments and prints.

Every function returns a JSON-ready document (plain dicts, lists, numbers, strings). Times are Unix seconds,
ages and durations seconds. Errors: :class:`NotFound` (unknown job or series) and :class:`Refused` (the
operation does not apply in the current state) are :class:`~dicomnode.errors.DicomNodeError` (exit code 1);
a configuration problem is a :class:`~dicomnode.errors.ConfigError` (exit code 2). Never imports torch.

``status --json`` (schema ``dicomnode.status/1``)::

    {"schema": "dicomnode.status/1", "generated_at": 1700000000.0,
     "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": 11112},
     "counts": {"series": {"RECEIVING": 0, "COMPLETE": 0, "DONE": 3, "FAILED": 0, "IGNORED": 1},
                "jobs": {"QUEUED": 0, "RUNNING": 0, "DONE": 3, "FAILED": 0, "CANCELLED": 0}},
     "queue": {"waiting": 0, "due": 0, "running": 0,
               "oldest_waiting": {"job_id": 7, "series_uid": "1.2...", "pipeline": "lung",
                                  "waiting_seconds": 12.5, "next_attempt_in_seconds": 0.0} | null},
     "backlog": {"pacs": 0},              # PENDING deliveries per destination (configured ones always listed)
     "oldest_queued_job_age_seconds": 12.5 | null,
     "series": [{"series_uid", "study_uid", "modality", "description", "calling_aet", "instances", "bytes",
                 "state", "age_seconds", "generation", "reason"}, ...]}   # newest first

``jobs --json`` (schema ``dicomnode.jobs/1``)::

    {"schema": "dicomnode.jobs/1", "generated_at": 1700000000.0,
     "jobs": [{"id": 7, "series_uid": "1.2...", "pipeline": "lung", "generation": 1, "state": "DONE",
               "attempts": 1, "created_at": ..., "updated_at": ..., "next_attempt_at": ...,
               "age_seconds": 30.1, "error": "", "outputs_ready": true,
               "deliveries": {"STORED": 3},
               "inference": {"engine": "ray", "node_id": "9f3c...", "node_ip": "10.0.0.7",
                             "actor_id": "e1a2...", "replica": 1, "pid": 4711, "seconds": 1.42,
                             "wait_seconds": 0.8} | null}, ...]}        # newest job first

``inference`` is where the job's latest inference ran (its ``job.inference`` event): engine ``local`` (the
worker's host name as ``node_ip``, empty ids) or ``ray`` (Ray node and actor ids, the replica's index), the
seconds the segmenter took and the seconds the job waited for a free replica; null before any inference.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from dicomnode.config import Config, Destination
from dicomnode.errors import DicomNodeError
from dicomnode.outputs.scu import StoreResult
from dicomnode.state import jobs
from dicomnode.state.store import DeliveryState, JobRow, JobState, SeriesRow, SeriesState, Store

STATUS_SCHEMA = "dicomnode.status/1"
JOBS_SCHEMA = "dicomnode.jobs/1"
SHOW_SCHEMA = "dicomnode.show/1"
PURGE_SCHEMA = "dicomnode.purge/1"
SEND_SCHEMA = "dicomnode.send/1"
ECHO_SCHEMA = "dicomnode.echo/1"
RETRY_SCHEMA = "dicomnode.retry/1"
CANCEL_SCHEMA = "dicomnode.cancel/1"
COMPLETE_SCHEMA = "dicomnode.complete/1"
PROCESS_SCHEMA = "dicomnode.process/1"
CONVERT_SCHEMA = "dicomnode.convert/1"
CONFIG_SCHEMA = "dicomnode.config/1"

# Output kinds by SOP Class UID, in the order ``show`` and the status page list them.
OUTPUT_KIND_ORDER = {"SEG": 0, "SR": 1, "SC": 2, "RTSTRUCT": 3}
_SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
_SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants 1.2.840.10008.5.1.4.1.1.7.n
_SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
FINISHED_SERIES = (SeriesState.DONE, SeriesState.IGNORED, SeriesState.FAILED)


class NotFound(DicomNodeError):
    """No job or series with that identifier in the store."""


class Refused(DicomNodeError):
    """The operation does not apply to the job or series in its current state."""


def output_kind(sop_class_uid: str) -> str:
    """``SEG``, ``SR``, ``SC`` (single or multi-frame Secondary Capture), ``RTSTRUCT``; ``IMAGE`` for anything
    else (the instances a forward pipeline sends)."""
    if sop_class_uid == _SEG_CLASS:
        return "SEG"
    if sop_class_uid == _RTSTRUCT_CLASS:
        return "RTSTRUCT"
    if sop_class_uid == _SC_CLASS or sop_class_uid.startswith(_SC_CLASS + "."):
        return "SC"
    if sop_class_uid.startswith(_SR_PREFIX):
        return "SR"
    return "IMAGE"


def parse_duration(text: str) -> float:
    """``"90"``/``"90s"``, ``"10m"``, ``"2h"``, ``"3d"``, ``"1w"`` -> seconds; ValueError otherwise."""
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 10m, 2h, 7d")
    return float(match.group(1)) * _UNIT[match.group(2) or "s"]


def parse_since(text: str, *, now: float) -> float:
    """A relative duration (``10m`` = ten minutes ago) or an ISO 8601 time (local time when naive)."""
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        msg = f"{text!r} is neither a duration (10m, 2h) nor an ISO time (2024-05-01T08:00)"
        raise ValueError(msg) from None


def open_store(cfg: Config) -> Store:
    """The node's store; a missing database is an error (a typo in the config must not create a new one)."""
    if not cfg.db_path.exists():
        raise DicomNodeError(f"no state store at {cfg.db_path}: has the node run with this configuration?")
    return Store(cfg.db_path)


# ------------------------------------------------------------------------------------------- reading


def series_dict(s: SeriesRow, now: float) -> dict[str, Any]:
    return {"series_uid": s.series_uid, "study_uid": s.study_uid, "modality": s.modality,
            "description": s.description, "calling_aet": s.calling_aet, "instances": s.n_instances,
            "bytes": s.n_bytes, "state": s.state.value, "age_seconds": round(now - s.last_received, 3),
            "generation": s.generation, "reason": s.reason}


def job_dict(store: Store, j: JobRow, now: float) -> dict[str, Any]:
    summary: dict[str, int] = {}
    sql = "SELECT state, COUNT(*) AS n FROM deliveries WHERE job_id = ? GROUP BY state"
    for row in store.read(sql, (j.id,)):
        summary[row["state"]] = row["n"]
    return {"id": j.id, "series_uid": j.series_uid, "pipeline": j.pipeline, "generation": j.generation,
            "state": j.state.value, "attempts": j.attempts, "created_at": j.created_at,
            "updated_at": j.updated_at, "next_attempt_at": j.next_attempt_at,
            "age_seconds": round(now - j.created_at, 3), "error": j.error, "outputs_ready": j.outputs_ready,
            "deliveries": summary, "inference": _inference(store, j.id)}


def _inference(store: Store, job_id: int) -> dict[str, Any] | None:
    """The job's latest ``job.inference`` event as a document (see ``jobs --json``), or None."""
    rows = store.read("SELECT message FROM events WHERE job_id = ? AND kind = 'job.inference'"
                      " ORDER BY id DESC LIMIT 1", (job_id,))
    if not rows:
        return None
    try:
        doc = json.loads(rows[0]["message"])
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def status_document(cfg: Config, *, now: float | None = None, store: Store | None = None) -> dict[str, Any]:
    """The ``status --json`` document; schema in the module docstring. ``store``: read this one (the
    caller's) instead of opening the configured store."""
    now = time.time() if now is None else now
    store = open_store(cfg) if store is None else store
    queued = sorted(store.list_jobs(state=JobState.QUEUED, limit=100000), key=lambda j: j.created_at)
    oldest = None
    if queued:
        j = queued[0]
        oldest = {"job_id": j.id, "series_uid": j.series_uid, "pipeline": j.pipeline,
                  "waiting_seconds": round(now - j.created_at, 3),
                  "next_attempt_in_seconds": round(max(j.next_attempt_at - now, 0.0), 3)}
    backlog = {d.name: 0 for d in cfg.destinations}
    sql = "SELECT destination, COUNT(*) AS n FROM deliveries WHERE state = ? GROUP BY destination"
    for row in store.read(sql, (DeliveryState.PENDING.value,)):
        backlog[row["destination"]] = row["n"]
    counts = store.counts()
    return {
        "schema": STATUS_SCHEMA, "generated_at": now,
        "node": {"ae_title": cfg.node.ae_title, "host": cfg.node.host, "port": cfg.node.port},
        "counts": counts,
        "queue": {"waiting": len(queued), "due": sum(j.next_attempt_at <= now for j in queued),
                  "running": counts["jobs"][JobState.RUNNING.value], "oldest_waiting": oldest},
        "backlog": backlog,
        "oldest_queued_job_age_seconds": oldest["waiting_seconds"] if oldest else None,
        "series": [series_dict(s, now) for s in store.list_series()],
    }


def jobs_document(cfg: Config, *, state: JobState | None = None, since: float | None = None,
                  now: float | None = None, limit: int = 1000, store: Store | None = None) -> dict[str, Any]:
    """The ``jobs --json`` document (jobs updated at or after ``since``); schema in the module docstring.
    ``store``: as for :func:`status_document`."""
    now = time.time() if now is None else now
    store = open_store(cfg) if store is None else store
    rows = store.list_jobs(state=state, since=since, limit=limit)
    return {"schema": JOBS_SCHEMA, "generated_at": now, "jobs": [job_dict(store, j, now) for j in rows]}


def _events(store: Store, *, series_uid: str | None = None,
            job_id: int | None = None) -> list[dict[str, Any]]:
    return [{"ts": e.ts, "kind": e.kind, "job_id": e.job_id, "message": e.message}
            for e in store.events(series_uid=series_uid, job_id=job_id, limit=100000)]


def _outputs(store: Store, job_id: int) -> list[dict[str, Any]]:
    """The job's objects (from its delivery ledger), each with its delivery state per destination."""
    by_sop: dict[str, dict[str, Any]] = {}
    for d in store.deliveries(job_id):
        out = by_sop.setdefault(d.sop_uid, {"sop_uid": d.sop_uid, "kind": output_kind(d.sop_class_uid),
                                            "path": d.path, "sop_class_uid": d.sop_class_uid,
                                            "deliveries": []})
        out["deliveries"].append({"destination": d.destination, "state": d.state.value, "status": d.status,
                                  "detail": d.detail})
    return list(by_sop.values())


def show_document(cfg: Config, key: str, *, now: float | None = None, store: Store | None = None) -> dict[str, Any]:
    """``show JOB|SERIES``: a number is a job id, anything else a SeriesInstanceUID.

    ``{"schema": "dicomnode.show/1", "kind": "job", "job": {...jobs/1 item}, "series": {...} | null,
    "outputs": [{"sop_uid", "kind", "path", "sop_class_uid", "deliveries": [{"destination", "state", "status",
    "detail"}]}], "events": [{"ts", "kind", "job_id", "message"}]}``; an output's ``kind`` is SEG, SR, SC,
    RTSTRUCT or IMAGE (:func:`output_kind`); for a series ``kind`` is ``"series"``,
    ``jobs`` lists its jobs (each with its ``outputs``) and ``events`` its whole history. ``store``: as for
    :func:`status_document`.
    """
    now = time.time() if now is None else now
    store = open_store(cfg) if store is None else store
    if key.isdigit():
        job = store.get_job(int(key))
        if job is None:
            raise NotFound(f"no job {key}")
        series = store.get_series(job.series_uid)
        return {"schema": SHOW_SCHEMA, "kind": "job", "job": job_dict(store, job, now),
                "series": series_dict(series, now) if series else None, "outputs": _outputs(store, job.id),
                "events": _events(store, job_id=job.id)}
    found = store.get_series(key)
    if found is None:
        raise NotFound(f"no series {key} (and not a job id)")
    job_docs = [{**job_dict(store, j, now), "outputs": _outputs(store, j.id)}
                for j in reversed(store.list_jobs(series_uid=key, limit=100000))]
    return {"schema": SHOW_SCHEMA, "kind": "series", "series": series_dict(found, now), "jobs": job_docs,
            "events": _events(store, series_uid=key)}


# ------------------------------------------------------------------------------------------- steering


def retry(cfg: Config, job_id: int | None, *, now: float | None = None) -> list[dict[str, Any]]:
    """Retry one job (``job_id``) or, with None, every FAILED job; return the retried jobs."""
    now = time.time() if now is None else now
    store = open_store(cfg)
    failed = [] if job_id is not None else store.list_jobs(state=JobState.FAILED, limit=100000)
    ids = [job_id] if job_id is not None else [j.id for j in failed]
    done = []
    for jid in ids:
        try:
            done.append(job_dict(store, jobs.retry(store, jid, now=now), now))
        except KeyError:
            raise NotFound(f"no job {jid}") from None
        except ValueError as exc:
            raise Refused(str(exc)) from None
    return done


def cancel(cfg: Config, job_id: int, *, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    store = open_store(cfg)
    try:
        return job_dict(store, jobs.cancel(store, job_id, now=now), now)
    except KeyError:
        raise NotFound(f"no job {job_id}") from None
    except ValueError as exc:
        raise Refused(str(exc)) from None


def complete(cfg: Config, series_uid: str, *, now: float | None = None) -> dict[str, Any]:
    """Force a RECEIVING series complete now (routed by the config's rules); return the series, its jobs."""
    from dicomnode.work.routing import make_router

    now = time.time() if now is None else now
    store = open_store(cfg)
    try:
        changed = jobs.force_complete(store, series_uid, make_router(cfg), now=now)
    except KeyError:
        raise NotFound(f"no series {series_uid}") from None
    series = store.get_series(series_uid)
    if not changed or series is None:
        state = series.state.value if series else "gone"
        raise Refused(f"series {series_uid} is {state}; only a RECEIVING series can be completed")
    return {"schema": COMPLETE_SCHEMA, "series": series_dict(series, now),
            "jobs": [job_dict(store, j, now) for j in store.list_jobs(series_uid=series_uid)]}


# ------------------------------------------------------------------------------------------- sending


def send(cfg: Config, paths: list[Path], dest: Destination,
         on_progress: Callable[[int, int, StoreResult], None] | None = None) -> dict[str, Any]:
    """C-STORE every DICOM file under ``paths`` to ``dest`` with the node's SCU (its AE title and TLS).

    ``on_progress(done, total, result)`` is called after each answer. Returns ``{"schema": "dicomnode.send/1",
    "destination", "files",
    "stored", "failed", "statuses": {"0x0000": n, "none": n}, "failures": [{"path", "status", "detail"}]}``;
    warnings 0xB000/0xB006/0xB007 count as stored. Raises DeliveryError when no association can be made.
    """
    import pydicom

    from dicomnode.imaging.files import find_dicom_files
    from dicomnode.ops.service import scu_settings
    from dicomnode.outputs.scu import Outcome, send_files
    from dicomnode.state.jobs import OutboundFile

    found = find_dicom_files(paths)
    if not found:
        raise DicomNodeError(f"no DICOM files under {', '.join(map(str, paths))}")
    files = []
    for path in found:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        files.append(OutboundFile(str(path), str(ds.SOPInstanceUID), str(ds.SOPClassUID),
                                  str(ds.file_meta.TransferSyntaxUID)))
    done = 0

    def progress(result: StoreResult) -> None:
        nonlocal done
        done += 1
        if on_progress is not None:
            on_progress(done, len(files), result)

    results = send_files(dest, files, scu_settings(cfg), on_result=progress)
    statuses: dict[str, int] = {}
    for r in results:
        key = "none" if r.status is None else f"0x{r.status:04X}"
        statuses[key] = statuses.get(key, 0) + 1
    failures = [{"path": r.file.path, "status": r.status, "detail": r.detail}
                for r in results if r.outcome is not Outcome.STORED]
    where = {"name": dest.name, "ae_title": dest.ae_title, "host": dest.host, "port": dest.port,
             "tls": dest.tls}
    return {"schema": SEND_SCHEMA, "destination": where,
            "files": len(files), "stored": len(results) - len(failures),
            "failed": len(files) - (len(results) - len(failures)), "statuses": statuses, "failures": failures}
