"""Start-up recovery: make the state store agree with the spool after a crash or power cut.

- Temporary spool files (a write that never finished, so never acknowledged) are removed.
- Spool files without a row (the database lost its last commits) are read (header only) and recorded.
- Rows whose file is gone are flagged missing and left out of processing; an event says so.
- RUNNING jobs whose worker process on this host has ended (its liveness lock is free, see
  :mod:`dicomnode.state.owners`) are requeued at once; others wait for their lease.

Half-assembled series are never deleted: they simply continue to wait for their quiet period.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicomnode.state import jobs, owners
from dicomnode.state.spool import Spool
from dicomnode.state.store import InstanceMeta, JobState, Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    partial_removed: int
    recorded: int
    unreadable: int
    missing: int
    requeued: int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _meta_from_file(path: Path) -> InstanceMeta:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return InstanceMeta(
        sop_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID), series_uid=str(ds.SeriesInstanceUID),
        study_uid=str(ds.StudyInstanceUID), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        modality=str(ds.get("Modality", "")), body_part=str(ds.get("BodyPartExamined", "")),
        description=str(ds.get("SeriesDescription", "")),
        image_type="\\".join(str(v) for v in ds.get("ImageType", [])),
        calling_aet=str(ds.file_meta.get("SourceApplicationEntityTitle", "")).strip())


def requeue_dead_workers(store: Store, *, now: float) -> list[int]:
    """Requeue at once the RUNNING jobs of worker processes of this host that have ended; return their ids.

    A worker is gone when its liveness lock is free (:mod:`dicomnode.state.owners`): no pid check, which a
    killed process that has not finished exiting (or waits as a zombie) would still pass. A worker of a release
    without these locks is judged by its pid. Jobs of other hosts wait for their leases. Called at start-up,
    when the supervisor sees a worker exit, and on every worker step (so a job whose worker was still exiting
    at start-up is taken up as soon as the kernel has let go of it)."""
    requeued = jobs.requeue_owned(store, owners.sweep(store.path), now=now, why="its lock is free")
    host = socket.gethostname()
    legacy = set()
    for job in store.list_jobs(state=JobState.RUNNING):
        owner = job.lease_owner or ""
        owner_host, _, rest = owner.partition(":")
        pid = rest.split(":")[0]
        if (owner_host == host and pid.isdigit() and not owners.has_lock_file(store.path, owner)
                and not _pid_alive(int(pid))):
            legacy.add(owner)
    if legacy:
        requeued += jobs.requeue_owned(store, sorted(legacy), now=now, why="no process with its pid")
    return requeued


def recover(store: Store, spool: Spool, *, reprocess_late: bool, now: float | None = None) -> RecoveryReport:
    """Reconcile spool and store; see the module docstring. Safe to run on every start."""
    now = time.time() if now is None else now
    partial = spool.remove_partial_files()
    known = store.all_instance_paths()
    recorded = unreadable = 0
    on_disk: set[str] = set()
    for f in spool.scan():
        on_disk.add(f.sop_uid)
        if known.get(f.sop_uid) == str(f.path):
            continue
        try:
            meta = _meta_from_file(f.path)
        except Exception as exc:  # a file we wrote but cannot read back: keep it, say so
            unreadable += 1
            log.error("spool file %s cannot be read back: %s", f.path, exc)
            continue
        store.record_instance(meta, f.path, f.size, now=f.path.stat().st_mtime, reprocess_late=reprocess_late)
        recorded += 1
    missing = [sop for sop, path in known.items() if sop not in on_disk and not Path(path).exists()]
    if missing:
        store.mark_missing(missing, now=now)
    requeued = len(requeue_dead_workers(store, now=now))
    report = RecoveryReport(partial, recorded, unreadable, len(missing), requeued)
    if any((partial, recorded, unreadable, missing, requeued)):
        store.add_event("recovery", f"removed {partial} partial file(s), recorded {recorded} unrecorded file(s),"
                        f" {unreadable} unreadable, flagged {len(missing)} missing, requeued {requeued} job(s)",
                        now=now)
    log.info("recovery: %s", report)
    return report
