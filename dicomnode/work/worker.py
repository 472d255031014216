"""The worker loop: promote quiet series, claim a job, run its pipeline, record the outcome.

``Worker.step(now=...)`` does one round and can be called directly by tests for deterministic stepping;
``Worker.run(stop)`` loops until ``stop`` is set. While a job runs, a heartbeat thread renews its lease so a
long inference is not mistaken for a dead worker; if the lease cannot be renewed (the job was cancelled or
taken over) the heartbeat notes it and the result of that attempt is discarded by :func:`jobs.finish`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicomnode.config import Config
from dicomnode.errors import ConfigError, DicomNodeError, PipelineError
from dicomnode.state import jobs
from dicomnode.state.jobs import Backoff, Route
from dicomnode.state.store import JobRow, JobState, SeriesRow, SeriesState
from dicomnode.work.pipeline import PipelineContext, run_job

log = logging.getLogger(__name__)


def owner_id(index: int = 0) -> str:
    """Lease owner name: host, pid and worker index (recovery uses host and pid to spot dead workers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


def _where(cfg: Config, name: str) -> str:
    """A destination for the log: its name and address (no credentials)."""
    try:
        dest = cfg.destination(name)
    except ConfigError:
        return name
    return f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"


@dataclass(frozen=True)
class StepResult:
    promoted: tuple[str, ...]
    requeued: tuple[int, ...]
    job_id: int | None
    job_state: JobState | None


class Worker:
    """One worker: owns no state of its own beyond the pipeline context; everything is in the store."""

    def __init__(self, ctx: PipelineContext, router: Callable[[SeriesRow], Route], *, index: int = 0,
                 on_job_done: Callable[[JobRow, JobState, float], None] | None = None) -> None:
        self.ctx = ctx
        self.router = router
        self.owner = owner_id(index)
        self.on_job_done = on_job_done
        wcfg = ctx.config.worker
        self.backoff = Backoff(wcfg.max_attempts, wcfg.backoff_seconds, wcfg.backoff_max_seconds)

    def step(self, now: float | None = None) -> StepResult:
        """One round: requeue expired leases, promote complete series, run at most one due job."""
        now = time.time() if now is None else now
        store, cfg = self.ctx.store, self.ctx.config
        requeued = jobs.requeue_expired(store, now=now)
        promoted = jobs.promote(store, self.router, now=now, quiet_seconds=cfg.completion.quiet_seconds,
                                after_release_seconds=cfg.completion.after_release_seconds)
        for series_uid in promoted:
            self._log_promoted(series_uid)
        job = jobs.claim(store, self.owner, now=now, lease_seconds=cfg.worker.lease_seconds)
        if job is None:
            return StepResult(tuple(promoted), tuple(requeued), None, None)
        state = self._run(job)
        return StepResult(tuple(promoted), tuple(requeued), job.id, state)

    def _log_promoted(self, series_uid: str) -> None:
        """One INFO line per series judged complete: why, and which pipelines (or why it is ignored)."""
        series = self.ctx.store.get_series(series_uid)
        if series is None:
            return
        what = "ignored" if series.state is SeriesState.IGNORED else "complete"
        log.info("series %s (%s, %d instance(s)) %s: %s", series_uid, series.modality or "?", series.n_instances,
                 what, series.reason.removeprefix("complete: "))

    def _run(self, job: JobRow) -> JobState:
        started = time.monotonic()
        stop_heartbeat = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, stop_heartbeat), daemon=True,
                                name=f"lease-{job.id}")
        beat.start()
        error: DicomNodeError | None = None
        log.info("job %d: pipeline %s on series %s (attempt %d)", job.id, job.pipeline, job.series_uid, job.attempts)
        try:
            run_job(job, self.ctx)
        except DicomNodeError as exc:
            error = exc
        except Exception as exc:  # a bug or an unexpected library error: final, with the type in the reason
            log.exception("job %d (%s) crashed", job.id, job.pipeline)
            error = PipelineError(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            stop_heartbeat.set()
            beat.join()
        state = jobs.finish(self.ctx.store, job, self.owner, now=time.time(), error=error, backoff=self.backoff)
        elapsed = time.monotonic() - started
        log.info("job %d pipeline=%s series=%s -> %s in %.2f s%s", job.id, job.pipeline, job.series_uid,
                 state.value, elapsed, f": {error}" if error else "")
        self._log_deliveries(job)
        if self.on_job_done is not None:
            self.on_job_done(job, state, elapsed)
        return state

    def _log_deliveries(self, job: JobRow) -> None:
        """Where the job's results went: one INFO line per destination with its objects by delivery state."""
        by_dest: dict[str, dict[str, int]] = {}
        for d in self.ctx.store.deliveries(job.id):
            states = by_dest.setdefault(d.destination, {})
            states[d.state.value] = states.get(d.state.value, 0) + 1
        for name, states in by_dest.items():
            counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            log.info("job %d: results for %s: %s", job.id, _where(self.ctx.config, name), counts)

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        lease = self.ctx.config.worker.lease_seconds
        while not stop.wait(max(lease / 3, 0.5)):
            try:
                if not jobs.renew_lease(self.ctx.store, job_id, self.owner, now=time.time(), lease_seconds=lease):
                    log.warning("job %d: lease lost (cancelled or taken over); its result will be discarded", job_id)
                    return
            except DicomNodeError as exc:
                log.warning("job %d: could not renew lease: %s", job_id, exc)

    def run(self, stop: threading.Event) -> None:
        """Loop until ``stop`` is set; sleeps ``worker.poll_seconds`` only when there was nothing to do."""
        poll = self.ctx.config.worker.poll_seconds
        while not stop.is_set():
            try:
                result = self.step()
            except DicomNodeError as exc:
                log.error("worker step failed: %s", exc)
                result = None
            if result is None or result.job_id is None:
                stop.wait(poll)
