"""The worker loop: promote quiet series, claim a job, run its pipeline, record the outcome.

``Worker.step(now=...)`` does one round and can be called directly by tests for deterministic stepping;
``Worker.run(stop)`` loops until ``stop`` is set. While a job runs, a heartbeat thread renews its lease so a
long inference is not mistaken for a dead worker. The pipeline asks :meth:`Worker._owns` before producing and
before each object it sends: the job must still be RUNNING, leased to this worker, with the lease not run out.
Once that fails (an operator cancelled the job, the heartbeat could not renew the lease, another worker took the
job over) the pipeline stops, sends nothing more, and :func:`jobs.finish` discards the attempt's result.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from dicomnode.config import Config
from dicomnode.errors import ConfigError, DicomNodeError, PipelineError
from dicomnode.imaging.completeness import judge_stack
from dicomnode.state import jobs
from dicomnode.state.jobs import Backoff, Route
from dicomnode.state.owners import OwnerLock
from dicomnode.state.recovery import requeue_dead_workers
from dicomnode.state.store import JobRow, JobState, SeriesRow, SeriesState, Store
from dicomnode.work.pipeline import PipelineContext, run_job

log = logging.getLogger(__name__)


class Bell(Protocol):
    """What wakes an idle worker when a receiver records a release (:class:`dicomnode.ops.service.Bell`)."""

    def wait(self, timeout: float | None = None) -> bool: ...

    def clear(self) -> None: ...


def _step_clock(now: float) -> Callable[[], float]:
    """The clock of one step: ``now`` (the step's time, real or given by a test) advancing in real time."""
    started = time.monotonic()
    return lambda: now + (time.monotonic() - started)


def owner_id(index: int = 0) -> str:
    """Lease owner name: host, pid and worker index (also the name of the worker's liveness lock)."""
    return f"{socket.gethostname()}:{os.getpid()}:{index}"


class EvidenceMemo:
    """Judges a released series' instances (:func:`~dicomnode.imaging.completeness.judge_stack`) once per
    state of the series (generation, count, last arrival), so a series waiting for its quiet period is not
    read again at every poll."""

    MAX_ENTRIES = 1024

    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: dict[str, tuple[tuple[int, int, float], tuple[bool, str]]] = {}

    def __call__(self, row: SeriesRow) -> tuple[bool, str]:
        key = (row.generation, row.n_instances, row.last_received)
        hit = self._seen.get(row.series_uid)
        if hit is not None and hit[0] == key:
            return hit[1]
        evidence = judge_stack([Path(i.path) for i in self.store.instances(row.series_uid)])
        if not evidence.complete:
            log.info("series %s: association released, no evidence of a complete volume (%s); waiting for the"
                     " quiet period", row.series_uid, evidence.reason)
        if len(self._seen) >= self.MAX_ENTRIES:
            self._seen.clear()
        self._seen[row.series_uid] = (key, (evidence.complete, evidence.reason))
        return evidence.complete, evidence.reason


def _where(cfg: Config, name: str) -> str:
    """A destination for the log: its name and address (no credentials)."""
    try:
        return cfg.destination(name).where()
    except ConfigError:
        return name


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
        # held for the life of this worker (of the process, at the latest): recovery sees the job of a worker
        # whose lock is free as abandoned, at once (dicomnode.state.owners)
        self.lock = OwnerLock.acquire(ctx.store.path, self.owner)
        self.on_job_done = on_job_done
        wcfg = ctx.config.worker
        self.backoff = Backoff(wcfg.max_attempts, wcfg.backoff_seconds, wcfg.backoff_max_seconds,
                               wcfg.backoff_jitter)
        self.rng = random.Random()  # draws the retries' jitter; seeded from the OS, so workers differ
        self.evidence = EvidenceMemo(ctx.store)

    def close(self) -> None:
        """Release the worker's liveness lock (a job it still holds is then requeued by the next recovery)."""
        self.lock.release()

    def step(self, now: float | None = None) -> StepResult:
        """One round: requeue jobs of ended workers and expired leases, promote complete series, run at most one
        due job."""
        now = time.time() if now is None else now
        store, cfg = self.ctx.store, self.ctx.config
        requeued = requeue_dead_workers(store, now=now) + jobs.requeue_expired(store, now=now)
        promoted = jobs.promote(store, self.router, now=now, quiet_seconds=cfg.completion.quiet_seconds,
                                on_release=cfg.completion.on_release, evidence=self.evidence)
        for series_uid in promoted:
            self._log_promoted(series_uid)
        job = jobs.claim(store, self.owner, now=now, lease_seconds=cfg.worker.lease_seconds)
        if job is None:
            return StepResult(tuple(promoted), tuple(requeued), None, None)
        clock = _step_clock(now)
        state = self._run(job, clock)
        return StepResult(tuple(promoted), tuple(requeued), job.id, state)

    def _log_promoted(self, series_uid: str) -> None:
        """One INFO line per series judged complete: why, and which pipelines (or why it is ignored)."""
        series = self.ctx.store.get_series(series_uid)
        if series is None:
            return
        what = "ignored" if series.state is SeriesState.IGNORED else "complete"
        log.info("series %s (%s, %d instance(s)) %s: %s", series_uid, series.modality or "?", series.n_instances,
                 what, series.reason.removeprefix("complete: "))

    def _run(self, job: JobRow, clock: Callable[[], float]) -> JobState:
        started = time.monotonic()
        stop_heartbeat = threading.Event()
        lost = threading.Event()  # set once this worker knows it no longer owns the job
        beat = threading.Thread(target=self._heartbeat, args=(job.id, stop_heartbeat, lost, clock), daemon=True,
                                name=f"lease-{job.id}")
        beat.start()
        error: DicomNodeError | None = None
        log.info("job %d: pipeline %s on series %s (attempt %d)", job.id, job.pipeline, job.series_uid, job.attempts)
        try:
            run_job(job, self.ctx, owned=lambda: self._owns(job.id, lost, clock))
        except DicomNodeError as exc:
            error = exc
        except Exception as exc:  # a bug or an unexpected library error: final, with the type in the reason
            log.exception("job %d (%s) crashed", job.id, job.pipeline)
            error = PipelineError(f"unexpected {type(exc).__name__}: {exc}")
        finally:
            stop_heartbeat.set()
            beat.join()
        state = jobs.finish(self.ctx.store, job, self.owner, now=clock(), error=error, backoff=self.backoff,
                            rng=self.rng)
        elapsed = time.monotonic() - started
        log.info("job %d pipeline=%s series=%s -> %s in %.2f s%s", job.id, job.pipeline, job.series_uid,
                 state.value, elapsed, f": {error}" if error else "")
        self._log_deliveries(job)
        if self.on_job_done is not None:
            self.on_job_done(job, state, elapsed)
        return state

    def _owns(self, job_id: int, lost: threading.Event, clock: Callable[[], float]) -> bool:
        """True while the job is RUNNING, leased to this worker, and the lease has not run out at ``clock()``."""
        if lost.is_set():
            return False
        row = self.ctx.store.get_job(job_id)
        if (row is not None and row.state is JobState.RUNNING and row.lease_owner == self.owner
                and row.lease_expires is not None and row.lease_expires >= clock()):
            return True
        lost.set()
        why = "gone" if row is None else f"{row.state.value}, lease of {row.lease_owner or 'nobody'}"
        log.warning("job %d is no longer this worker's (%s): stopping, sending nothing more", job_id, why)
        return False

    def _log_deliveries(self, job: JobRow) -> None:
        """Where the job's results went: one INFO line per destination with its objects by delivery state."""
        by_dest: dict[str, dict[str, int]] = {}
        for d in self.ctx.store.deliveries(job.id):
            states = by_dest.setdefault(d.destination, {})
            states[d.state.value] = states.get(d.state.value, 0) + 1
        for name, states in by_dest.items():
            counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
            log.info("job %d: results for %s: %s", job.id, _where(self.ctx.config, name), counts)

    def _heartbeat(self, job_id: int, stop: threading.Event, lost: threading.Event,
                   clock: Callable[[], float]) -> None:
        lease = self.ctx.config.worker.lease_seconds
        while not stop.wait(max(lease / 3, 0.5)):
            try:
                if not jobs.renew_lease(self.ctx.store, job_id, self.owner, now=clock(), lease_seconds=lease):
                    lost.set()
                    log.warning("job %d: lease lost (cancelled or taken over); its result will be discarded", job_id)
                    return
            except DicomNodeError as exc:
                log.warning("job %d: could not renew lease: %s", job_id, exc)

    def run(self, stop: threading.Event, bell: Bell | None = None) -> None:
        """Loop until ``stop`` is set; when there was nothing to do, waits ``worker.poll_seconds`` or until
        ``bell`` rings (a receiver recorded a release: a series may be complete now). Whoever sets ``stop``
        rings the bell too."""
        poll = self.ctx.config.worker.poll_seconds
        while not stop.is_set():
            try:
                result = self.step()
            except DicomNodeError as exc:
                log.error("worker step failed: %s", exc)
                result = None
            if result is None or result.job_id is None:
                if bell is None:
                    stop.wait(poll)
                else:  # cleared before the next step, which then sees what the ring announced
                    bell.wait(poll)
                    bell.clear()
