"""The data path of one job, top to bottom: inputs -> outputs in the outbox -> delivery to every destination.

``run_job`` is what a worker calls for a claimed job. It raises a :class:`~dicomnode.errors.DicomNodeError`
whose ``retryable`` flag tells the worker whether to try again later; returning normally means DONE.

A job is worked on only while its worker owns it: ``owned`` (the worker's check that the job is still RUNNING
under its own lease) is asked before producing, before recording the outputs, before each destination and
before each object (or STOW-RS batch) sent. Once it says no (an operator cancelled the job, or its lease was lost
to another worker) nothing more is produced or sent and :class:`JobReleased` is raised; the worker then
discards the attempt's result (:func:`~dicomnode.state.jobs.finish` leaves a job it does not own alone).

Outputs are produced once per job: after they are written and entered in the delivery ledger the job is
marked ``outputs_ready``, and any later attempt (a retry after a PACS outage, an operator's ``retry``) only
re-sends what is still PENDING. A forward job's outputs are the spooled instances themselves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dicomnode.config import Config, Destination, PipelineConfig
from dicomnode.errors import DeliveryError, PipelineError, TransientError
from dicomnode.outputs.delivery import Outcome, Proceed, StoreResult, always
from dicomnode.outputs.destinations import open_sender
from dicomnode.outputs.scu import ScuSettings
from dicomnode.state import jobs
from dicomnode.state.jobs import OutboundFile
from dicomnode.state.spool import Spool
from dicomnode.state.store import DeliveryState, JobRow, Store
from dicomnode.work.routing import UNMATCHED_FORWARD

log = logging.getLogger(__name__)

# A producer turns a job into files in the outbox (image pipelines); forward jobs need none.
Producer = Callable[[JobRow, PipelineConfig], list[OutboundFile]]


class JobReleased(TransientError):
    """The worker no longer owns the job (cancelled, or its lease lost to another worker): stop at once."""


@dataclass(frozen=True)
class PipelineContext:
    config: Config
    store: Store
    spool: Spool
    scu: ScuSettings
    producers: dict[str, Producer]  # pipeline kind -> producer of outputs


def pipeline_for(cfg: Config, name: str) -> PipelineConfig:
    """The configured pipeline, or the implicit forwarder used for series that matched no rule."""
    if name == UNMATCHED_FORWARD:
        dests = cfg.unmatched_destinations or tuple(d.name for d in cfg.destinations)
        return PipelineConfig(name=UNMATCHED_FORWARD, kind="forward", destinations=dests)
    return cfg.pipeline(name)


def run_job(job: JobRow, ctx: PipelineContext, owned: Proceed = always) -> None:
    """Run one attempt of ``job``: produce its outputs (once), then deliver what is still pending.

    ``owned`` says whether this worker still owns the job (module docstring); JobReleased when it stops saying so.
    """
    pipe = pipeline_for(ctx.config, job.pipeline)
    if not job.outputs_ready:
        _check_owned(job, owned, "before producing")
        files = _produce(job, pipe, ctx)
        _check_owned(job, owned, "after producing, before recording the outputs")
        now = time.time()
        for dest_name in pipe.destinations:
            jobs.add_deliveries(ctx.store, job.id, dest_name, files, now=now)
        jobs.set_outputs_ready(ctx.store, job.id, now=now,
                               message=f"{len(files)} object(s) ready for {', '.join(pipe.destinations) or 'nobody'}")
        _log_outputs(job, pipe, files)
    refused: list[str] = []  # permanent: the destination said no, or will never accept
    transient: list[str] = []
    for dest_name in pipe.destinations:
        _check_owned(job, owned, f"before delivering to {dest_name}")
        dest = ctx.config.destination(dest_name)
        try:
            refused.extend(_deliver(job, dest, pipe.dry_run, ctx, owned))
        except DeliveryError as exc:
            (transient if exc.retryable else refused).append(str(exc))
            continue
        left = [d for d in ctx.store.deliveries(job.id, destination=dest_name) if d.state is DeliveryState.PENDING]
        if left:
            transient.append(f"{len(left)} object(s) still pending for {dest_name}")
    if transient:
        raise TransientError("not yet delivered: " + "; ".join(transient[:3]))
    if refused:
        raise PipelineError("refused: " + "; ".join(refused[:3]))


def _check_owned(job: JobRow, owned: Proceed, when: str) -> None:
    if not owned():
        raise JobReleased(f"job {job.id} is no longer this worker's (cancelled or taken over); stopped {when}")


def _log_outputs(job: JobRow, pipe: PipelineConfig, files: list[OutboundFile]) -> None:
    """Where the job's objects are before delivery (outbox folders, or the spool for a forward job)."""
    folders = sorted({str(Path(f.path).parent) for f in files})
    where = "-" if not folders else folders[0] if len(folders) == 1 else \
        f"{len(folders)} folders under {Path(folders[0]).parent}"
    log.info("job %d: %d object(s) in %s; destinations: %s", job.id, len(files), where,
             ", ".join(pipe.destinations) or "none (they stay in the outbox)")


def _produce(job: JobRow, pipe: PipelineConfig, ctx: PipelineContext) -> list[OutboundFile]:
    if pipe.kind == "forward":
        rows = ctx.store.instances(job.series_uid)
        if not rows:
            raise PipelineError("series has no instances on disk to forward")
        return [OutboundFile(r.path, r.sop_uid, r.sop_class_uid, r.transfer_syntax) for r in rows]
    producer = ctx.producers.get(pipe.kind)
    if producer is None:
        raise PipelineError(f"pipeline kind {pipe.kind!r} is not available in this build")
    return producer(job, pipe)


def _deliver(job: JobRow, dest: Destination, dry_run: bool, ctx: PipelineContext, owned: Proceed) -> list[str]:
    """Send this job's PENDING objects to ``dest``; record each answer; return permanent refusals.

    Stops between objects once ``owned`` says no (JobReleased): what was answered is recorded, the rest stays
    PENDING. Raises DeliveryError when the destination as a whole fails (retryable or not)."""
    pending = [d for d in ctx.store.deliveries(job.id, destination=dest.name) if d.state is DeliveryState.PENDING]
    if not pending:
        return []
    files = [OutboundFile(d.path, d.sop_uid, d.sop_class_uid, d.transfer_syntax) for d in pending]
    if dry_run:
        for f in files:
            jobs.mark_delivery(ctx.store, job.id, dest.name, f.sop_uid, DeliveryState.DRY_RUN, status=None,
                               detail="dry run: not sent", now=time.time())
        ctx.store.add_event("job.dry-run", f"would send {len(files)} object(s) to {dest.name}",
                            series_uid=job.series_uid, job_id=job.id)
        return []
    refused: list[str] = []

    def record(result: StoreResult) -> None:
        if result.outcome is Outcome.RETRYABLE:
            return  # stays PENDING for the next attempt
        state = DeliveryState.STORED if result.outcome is Outcome.STORED else DeliveryState.REJECTED
        if state is DeliveryState.REJECTED:
            refused.append(f"{result.file.sop_uid}: {result.detail}")
        jobs.mark_delivery(ctx.store, job.id, dest.name, result.file.sop_uid, state, status=result.status,
                           detail=result.detail, now=time.time())

    started = time.monotonic()
    sender = open_sender(dest, ctx.scu, fsync=ctx.config.storage.fsync)
    try:
        results = sender.send(files, on_result=record, proceed=owned)
    finally:
        sender.close()
    stored = sum(r.outcome is Outcome.STORED for r in results)
    still_owned = owned()
    stopped = "" if still_owned else "; stopped: the job is no longer this worker's"
    ctx.store.add_event("job.sent", f"{dest.where()}: {stored}/{len(files)} stored in "
                        f"{time.monotonic() - started:.1f} s{stopped}", series_uid=job.series_uid, job_id=job.id)
    if not still_owned:
        raise JobReleased(f"job {job.id} is no longer this worker's (cancelled or taken over); stopped while "
                          f"delivering to {dest.name} after {len(results)} of {len(files)} object(s)")
    return refused
