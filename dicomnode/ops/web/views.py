"""The data behind each page of the status page, as plain dicts for the templates (read-only).

Everything comes from the admin documents (:mod:`dicomnode.ops.admin`: the same numbers ``status``, ``jobs``
and ``show`` print) plus what :mod:`.pictures` reads from output files. Patient names and IDs are added only
when ``ui.show_patient_ids`` is true, read from the first received file of the series.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dicomnode.config import Config
from dicomnode.ops import admin
from dicomnode.ops.web import pictures
from dicomnode.state.store import Store

log = logging.getLogger(__name__)
MAX_SERIES = 200  # newest series listed on the overview
MAX_JOBS = 50
STATE_ORDER = {"RECEIVING": 0, "COMPLETE": 1, "QUEUED": 1, "RUNNING": 2, "DONE": 3, "FAILED": 4,
               "IGNORED": 5, "CANCELLED": 5}


def _patient(store: Store, series_uid: str) -> dict[str, str] | None:
    rows = store.instances(series_uid)
    if not rows:
        return None
    try:
        name, pid = pictures.patient_ids(Path(rows[0].path))
    except (OSError, ValueError):
        return None
    return {"name": name, "id": pid}


def overview(cfg: Config, store: Store, health: dict[str, Any] | None) -> dict[str, Any]:
    doc = admin.status_document(cfg, store=store)
    series = doc["series"][:MAX_SERIES]
    latest_job: dict[str, int] = {}
    for job in store.list_jobs(limit=100000):
        latest_job.setdefault(job.series_uid, job.id)
    for s in series:
        s["latest_job"] = latest_job.get(s["series_uid"])
        if cfg.ui.show_patient_ids:
            s["patient"] = _patient(store, s["series_uid"])
    jobs = admin.jobs_document(cfg, store=store, limit=MAX_JOBS)["jobs"]
    return {"status": doc, "series": series, "more_series": len(doc["series"]) - len(series), "jobs": jobs,
            "health": health}


def series_view(cfg: Config, store: Store, series_uid: str) -> dict[str, Any]:
    doc = admin.show_document(cfg, series_uid, store=store)
    if doc["kind"] != "series":
        raise admin.NotFound(f"no series {series_uid}")
    patient = _patient(store, series_uid) if cfg.ui.show_patient_ids else None
    return {"doc": doc, "series": doc["series"], "jobs": doc["jobs"], "events": doc["events"], "patient": patient}


def job_view(cfg: Config, store: Store, job_id: int) -> dict[str, Any]:
    doc = admin.show_document(cfg, str(job_id), store=store)
    outputs = doc["outputs"]
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for out in outputs:
        by_kind.setdefault(out["kind"], []).append(out)
    kinds = sorted(by_kind, key=lambda k: (admin.OUTPUT_KIND_ORDER.get(k, 99), k))
    patient = _patient(store, doc["job"]["series_uid"]) if cfg.ui.show_patient_ids else None
    return {"doc": doc, "job": doc["job"], "series": doc["series"], "events": doc["events"], "kinds": kinds,
            "by_kind": by_kind, "segments": _segments(by_kind), "pictures": _pictures(by_kind.get("SC", [])),
            "destinations": _destinations(outputs), "patient": patient}


def _segments(by_kind: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The SEG's segments with the SR's volume and mean for each (matched by label = tracking identifier)."""
    segs = by_kind.get("SEG", [])
    if not segs:
        return []
    measured: dict[str, pictures.Measurement] = {}
    for sr in by_kind.get("SR", []):
        try:
            measured.update(pictures.sr_measurements(Path(sr["path"])))
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("status page: cannot read SR %s: %s", sr["sop_uid"], type(exc).__name__)
    rows = []
    for seg in segs:
        try:
            segments = pictures.seg_segments(Path(seg["path"]))
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("status page: cannot read SEG %s: %s", seg["sop_uid"], type(exc).__name__)
            continue
        for s in segments:
            m = measured.get(s.label)
            rows.append({"number": s.number, "label": s.label, "color": "#" + "".join(f"{c:02x}" for c in s.rgb),
                         "volume_ml": m.volume_ml if m else None, "mean": m.mean if m else None,
                         "mean_unit": m.mean_unit if m else ""})
    return rows


def _pictures(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    shown = []
    for out in outputs:
        try:
            info = pictures.picture_info(Path(out["path"]))
            caption, order = info.series_description, (info.series_description, info.instance_number)
        except (OSError, ValueError):
            caption, order = "unreadable", ("~", 0)
        shown.append({**out, "caption": caption, "number": order[1], "order": order})
    return sorted(shown, key=lambda p: p["order"])


def _destinations(outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per destination: how many objects in each delivery state, and the last detail that is not success."""
    table: dict[str, dict[str, Any]] = {}
    for out in outputs:
        for d in out["deliveries"]:
            row = table.setdefault(d["destination"], {"destination": d["destination"], "states": {}, "detail": ""})
            row["states"][d["state"]] = row["states"].get(d["state"], 0) + 1
            if d["state"] != "STORED" and d["detail"]:
                row["detail"] = d["detail"]
    return list(table.values())
