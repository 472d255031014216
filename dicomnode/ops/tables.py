"""Human output of the CLI verbs: aligned tables on stdout, the send progress bar on stderr.

Each function prints one admin document (:mod:`dicomnode.ops.admin`) the way ``dicomnode VERB`` shows it
without ``--json``; the documents themselves are the stable interface.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

from dicomnode.ops import admin
from dicomnode.outputs.scu import StoreResult


def age(seconds: float | None) -> str:
    """A short human age: 42s, 12m, 3.5h, 2.1d."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_status(doc: dict[str, Any]) -> None:
    counts = doc["counts"]
    print("series: " + ", ".join(f"{k} {v}" for k, v in counts["series"].items()))
    print("jobs:   " + ", ".join(f"{k} {v}" for k, v in counts["jobs"].items()))
    oldest = doc["queue"]["oldest_waiting"]
    if oldest:
        waited = age(oldest["waiting_seconds"])
        print(f"oldest waiting job: {oldest['job_id']} ({oldest['pipeline']}) for {waited}")
    if doc["backlog"]:
        print("backlog (pending deliveries): " + ", ".join(f"{k} {v}" for k, v in doc["backlog"].items()))
    if doc["series"]:
        print()
        table(["SERIES UID", "MOD", "INST", "STATE", "AGE", "REASON"],
              [[s["series_uid"], s["modality"], s["instances"], s["state"], age(s["age_seconds"]),
                s["reason"]] for s in doc["series"]])


def print_jobs(rows: list[dict[str, Any]]) -> None:
    table(["JOB", "STATE", "PIPELINE", "TRIES", "AGE", "DELIVERIES", "SERIES UID", "ERROR"],
          [[j["id"], j["state"], j["pipeline"], j["attempts"], age(j["age_seconds"]),
            " ".join(f"{k}:{v}" for k, v in j["deliveries"].items()) or "-", j["series_uid"],
            j["error"][:60]] for j in rows])


def print_outputs(outputs: list[dict[str, Any]]) -> None:
    """The job's objects grouped by kind (SEG, SR, SC, RTSTRUCT, then anything else), with their deliveries."""
    kinds = sorted({o["kind"] for o in outputs}, key=lambda k: (admin.OUTPUT_KIND_ORDER.get(k, 99), k))
    for kind in kinds:
        mine = [o for o in outputs if o["kind"] == kind]
        print(f"  {kind}: {len(mine)} object(s)")
        rows = [[o["sop_uid"], d["destination"], d["state"],
                 "-" if d["status"] is None else f"0x{d['status']:04X}", d["detail"]]
                for o in mine for d in o["deliveries"]]
        if rows:
            table(["    SOP INSTANCE UID", "DESTINATION", "STATE", "STATUS", "DETAIL"],
                  [["    " + r[0], *r[1:]] for r in rows])


def progress_bar(done: int, total: int, result: StoreResult) -> None:
    width = 30
    filled = width * done // max(total, 1)
    print(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {result.outcome.value:<9}",
          end="\n" if done == total else "", file=sys.stderr, flush=True)


def print_show(doc: dict[str, Any]) -> None:
    """``show JOB|SERIES``: the series, each job with its outputs by kind, the events."""
    series = doc["series"]
    if series:
        print(f"series {series['series_uid']}: {series['modality']} {series['instances']} instance(s), "
              f"{series['state']} (generation {series['generation']}) {series['reason']}")
    job_docs = [doc["job"]] if doc["kind"] == "job" else doc["jobs"]
    for job in job_docs:
        print(f"\njob {job['id']}: {job['pipeline']} {job['state']}, {job['attempts']} attempt(s)"
              + (f": {job['error']}" if job["error"] else ""))
        ran = job.get("inference")
        if ran:
            where = f"Ray node {ran['node_ip']} {ran['node_id'][:12]}, actor {ran['actor_id'][:12]} (replica " \
                    f"{ran['replica']})" if ran["engine"] == "ray" else f"{ran['node_ip']} (local, pid {ran['pid']})"
            print(f"  inference on {where}: {ran['seconds']:.2f} s after {ran['wait_seconds']:.2f} s waiting")
        outputs = doc["outputs"] if doc["kind"] == "job" else job["outputs"]
        print_outputs(outputs)
    print("\nevents:")
    for e in doc["events"]:
        job = "" if e["job_id"] is None else e["job_id"]
        print(f"  {when(e['ts'])}  {e['kind']:<18} {job:>4}  {e['message']}")
