"""The job queue on top of the state store: completion, claiming with leases, retries, the delivery ledger.

Every function takes ``now`` (Unix seconds) so the worker can be stepped deterministically in tests.

Lifecycle: a series in RECEIVING that has been quiet long enough is *promoted*: the router picks pipelines and
one QUEUED job per pipeline is created (or the series is IGNORED with the router's reason). A worker *claims*
the oldest due job (BEGIN IMMEDIATE, so only one worker wins) with a lease it renews while working. The job ends
DONE, FAILED (permanent error, or attempts exhausted) or back in QUEUED with an exponential backoff (capped, with
jitter so that jobs that failed together do not retry together). A job whose worker is known to be gone (its
liveness lock is free: :mod:`dicomnode.state.owners`) is requeued at once; one whose lease expired (a worker on
another host, or one that hangs) on every worker step.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dicomnode.errors import DicomNodeError
from dicomnode.state.rows import job_row
from dicomnode.state.store import (
    DeliveryState,
    JobRow,
    JobState,
    SeriesRow,
    SeriesState,
    Store,
)


@dataclass(frozen=True)
class Route:
    """The router's decision for a complete series: pipelines to run, or why none."""

    pipelines: tuple[str, ...]
    reason: str  # which rule(s) matched, or why nothing matched


@dataclass(frozen=True)
class Backoff:
    """Retry policy: exponential backoff, capped, with jitter.

    ``jitter`` (0 to 1) is the fraction of each delay drawn at random, so that the jobs that failed together
    when a destination went down do not all fall due in the same second when it comes back.
    """

    max_attempts: int
    base_seconds: float
    max_seconds: float
    jitter: float = 0.0

    def delay(self, attempts: int, *, draw: float = 0.0) -> float:
        """Seconds to wait before attempt ``attempts + 1`` (attempts >= 1): d = base * 2^(attempts-1) capped at
        ``max_seconds``, then shortened by ``jitter * draw * d`` with ``draw`` uniform in [0, 1): the delay lies in
        [d * (1 - jitter), d], never past the cap."""
        capped = min(self.base_seconds * 2 ** max(attempts - 1, 0), self.max_seconds)
        return float(capped * (1.0 - self.jitter * draw))


@dataclass(frozen=True)
class OutboundFile:
    """One object to deliver: a file on disk with the identifiers needed to propose a presentation context."""

    path: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str


#: Judges a released series' received instances: (complete, reason). Supplied by the worker (it reads the
#: images' headers, which this package does not), see :mod:`dicomnode.imaging.completeness`.
EvidenceJudge = Callable[[SeriesRow], tuple[bool, str]]


def due_series(store: Store, *, now: float, quiet_seconds: float, on_release: float | str = "off",
               evidence: EvidenceJudge | None = None) -> list[tuple[SeriesRow, str]]:
    """Series in RECEIVING judged complete at ``now``, each with the reason it was judged so.

    A series is due after ``quiet_seconds`` without an instance; sooner once the association that sent its
    last instance was released (``released_at`` is cleared by every new instance): ``on_release`` seconds
    after that, or, with ``on_release="evidence"``, as soon as ``evidence`` finds the instances complete.
    """
    out: list[tuple[SeriesRow, str]] = []
    for row in store.series_in_state(SeriesState.RECEIVING):
        idle = now - row.last_received
        if idle >= quiet_seconds:
            out.append((row, f"no instance for {idle:.1f} s (quiet period {quiet_seconds:g} s)"))
        elif row.released_at is None or on_release == "off":
            continue
        elif isinstance(on_release, (int, float)):
            if idle >= on_release:
                out.append((row, f"association released and no instance for {idle:.1f} s"))
        elif on_release == "evidence" and evidence is not None:
            complete, why = evidence(row)
            if complete:
                out.append((row, f"association released and the instances form a complete volume ({why})"))
    return out


def complete_series(store: Store, series: SeriesRow, *, reason: str, route: Route, now: float,
                    forced: bool = False) -> bool:
    """Promote one series (if it did not change meanwhile): create its jobs, or mark it IGNORED."""
    with store.transaction() as conn:
        current = conn.execute("SELECT * FROM series WHERE series_uid = ?", (series.series_uid,)).fetchone()
        if current is None or current["state"] != SeriesState.RECEIVING.value:
            return False
        if not forced and (current["generation"] != series.generation
                           or current["last_received"] != series.last_received):
            return False  # an instance arrived since the caller looked: not quiet any more
        state = SeriesState.COMPLETE if route.pipelines else SeriesState.IGNORED
        full_reason = f"complete: {reason}; {route.reason}"
        conn.execute("UPDATE series SET state = ?, reason = ? WHERE series_uid = ?",
                     (state.value, full_reason, series.series_uid))
        Store.event(conn, "series.complete" if route.pipelines else "series.ignored", full_reason,
                    now=now, series_uid=series.series_uid)
        for pipeline in route.pipelines:
            cur = conn.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, pipeline, generation, state, next_attempt_at,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (series.series_uid, pipeline, current["generation"], JobState.QUEUED.value, now, now, now))
            if cur.lastrowid:
                Store.event(conn, "job.queued", f"pipeline {pipeline} (generation {current['generation']})",
                            now=now, series_uid=series.series_uid, job_id=cur.lastrowid)
    return True


def promote(store: Store, router: Callable[[SeriesRow], Route], *, now: float, quiet_seconds: float,
            on_release: float | str = "off", evidence: EvidenceJudge | None = None) -> list[str]:
    """Promote every series that is complete at ``now`` (see :func:`due_series`); return their UIDs."""
    promoted = []
    for series, reason in due_series(store, now=now, quiet_seconds=quiet_seconds, on_release=on_release,
                                     evidence=evidence):
        if complete_series(store, series, reason=reason, route=router(series), now=now):
            promoted.append(series.series_uid)
    return promoted


def claim(store: Store, owner: str, *, now: float, lease_seconds: float) -> JobRow | None:
    """Take the oldest due QUEUED job with a lease; None when nothing is due."""
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM jobs WHERE state = ? AND next_attempt_at <= ? ORDER BY id LIMIT 1",
                           (JobState.QUEUED.value, now)).fetchone()
        if row is None:
            return None
        conn.execute("UPDATE jobs SET state = ?, lease_owner = ?, lease_expires = ?, attempts = attempts + 1,"
                     " updated_at = ? WHERE id = ?",
                     (JobState.RUNNING.value, owner, now + lease_seconds, now, row["id"]))
        Store.event(conn, "job.running", f"attempt {row['attempts'] + 1} by {owner}", now=now,
                    series_uid=row["series_uid"], job_id=row["id"])
        claimed = conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
    return job_row(claimed)


def renew_lease(store: Store, job_id: int, owner: str, *, now: float, lease_seconds: float) -> bool:
    """Extend a running job's lease; False if this owner no longer holds it (cancelled or requeued)."""
    with store.transaction() as conn:
        cur = conn.execute("UPDATE jobs SET lease_expires = ? WHERE id = ? AND lease_owner = ? AND state = ?",
                           (now + lease_seconds, job_id, owner, JobState.RUNNING.value))
        return cur.rowcount == 1


def finish(store: Store, job: JobRow, owner: str, *, now: float, error: DicomNodeError | None,
           backoff: Backoff, rng: random.Random | None = None) -> JobState:
    """End an attempt: DONE, QUEUED again after a backoff (retryable error), or FAILED. Returns the state.

    ``rng`` draws the backoff's jitter (a worker passes its own generator; tests a seeded one); without it Python's
    shared generator is used. A retryable error with ``counts_attempt`` False (the engine was unavailable) gives
    the attempt back, so such a job is retried at the base delay for as long as it takes, never FAILED."""
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job.id,)).fetchone()
        if row is None or row["state"] != JobState.RUNNING.value or row["lease_owner"] != owner:
            return JobState(row["state"]) if row else JobState.CANCELLED  # cancelled or taken over meanwhile
        attempts = row["attempts"]
        if error is not None and error.retryable and not error.counts_attempt:  # the engine, not the job
            attempts -= 1
            conn.execute("UPDATE jobs SET attempts = ? WHERE id = ?", (attempts, job.id))
        if error is None:
            state, next_at, message = JobState.DONE, now, "done"
        elif error.retryable and attempts < backoff.max_attempts:
            delay = backoff.delay(attempts, draw=rng.random() if rng is not None else random.random())
            state, next_at = JobState.QUEUED, now + delay
            counted = f"attempt {attempts} failed" if error.counts_attempt else "attempt not counted"
            message = f"{counted} (retryable), retry in {delay:.1f} s: {error}"
        else:
            state, next_at = JobState.FAILED, now
            why = "permanent error" if not error.retryable else f"gave up after {attempts} attempts"
            message = f"{why}: {error}"
        conn.execute("UPDATE jobs SET state = ?, next_attempt_at = ?, lease_owner = NULL, lease_expires = NULL,"
                     " error = ?, updated_at = ? WHERE id = ?",
                     (state.value, next_at, "" if error is None else str(error), now, job.id))
        Store.event(conn, f"job.{state.value.lower()}", message, now=now, series_uid=job.series_uid, job_id=job.id)
        _refresh_series(conn, job.series_uid, now)
    return state


def _refresh_series(conn: sqlite3.Connection, series_uid: str, now: float) -> None:
    """Derive the series state from the jobs of its current generation."""
    series = conn.execute("SELECT state, generation FROM series WHERE series_uid = ?", (series_uid,)).fetchone()
    if series is None or series["state"] in (SeriesState.RECEIVING.value, SeriesState.IGNORED.value):
        return
    jobs = conn.execute("SELECT state, pipeline, error FROM jobs WHERE series_uid = ? AND generation = ?",
                        (series_uid, series["generation"])).fetchall()
    states = {j["state"] for j in jobs}
    if states & {JobState.QUEUED.value, JobState.RUNNING.value}:
        new, reason = SeriesState.COMPLETE, None
    elif JobState.FAILED.value in states:
        failed = next(j for j in jobs if j["state"] == JobState.FAILED.value)
        new, reason = SeriesState.FAILED, f"pipeline {failed['pipeline']} failed: {failed['error']}"
    else:
        new, reason = SeriesState.DONE, None
    if new.value != series["state"]:
        if reason is None:
            conn.execute("UPDATE series SET state = ? WHERE series_uid = ?", (new.value, series_uid))
        else:
            conn.execute("UPDATE series SET state = ?, reason = ? WHERE series_uid = ?",
                         (new.value, reason, series_uid))
        Store.event(conn, f"series.{new.value.lower()}", reason or new.value.lower(), now=now,
                    series_uid=series_uid)


def requeue_expired(store: Store, *, now: float) -> list[int]:
    """Put RUNNING jobs whose lease expired (their worker died) back in the queue; return their ids."""
    with store.transaction() as conn:
        rows = conn.execute("SELECT id, series_uid, lease_owner FROM jobs WHERE state = ? AND lease_expires < ?",
                            (JobState.RUNNING.value, now)).fetchall()
        for row in rows:
            conn.execute("UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires = NULL, next_attempt_at = ?,"
                         " updated_at = ? WHERE id = ?", (JobState.QUEUED.value, now, now, row["id"]))
            Store.event(conn, "job.requeued", f"lease of {row['lease_owner']} expired (worker died?)",
                        now=now, series_uid=row["series_uid"], job_id=row["id"])
    return [r["id"] for r in rows]


def requeue_owned(store: Store, owners: Sequence[str], *, now: float, why: str) -> list[int]:
    """Put RUNNING jobs held by ``owners`` (known to be gone: ``why`` says how) back in the queue at once, without
    waiting for their leases; return their ids. A job finished or taken over meanwhile is left alone."""
    requeued: list[int] = []
    with store.transaction() as conn:
        for owner in owners:
            rows = conn.execute("SELECT id, series_uid FROM jobs WHERE state = ? AND lease_owner = ?",
                                (JobState.RUNNING.value, owner)).fetchall()
            for row in rows:
                conn.execute("UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires = NULL,"
                             " next_attempt_at = ?, updated_at = ? WHERE id = ?",
                             (JobState.QUEUED.value, now, now, row["id"]))
                Store.event(conn, "job.requeued", f"worker {owner} is gone ({why})", now=now,
                            series_uid=row["series_uid"], job_id=row["id"])
                requeued.append(row["id"])
    return requeued


def retry(store: Store, job_id: int, *, now: float) -> JobRow:
    """Operator retry: a FAILED or CANCELLED (or waiting QUEUED) job is due now, its attempts reset.

    Objects already produced are not produced again: refused deliveries go back to PENDING and are re-sent.
    """
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        if row["state"] in (JobState.RUNNING.value, JobState.DONE.value):
            raise ValueError(f"job {job_id} is {row['state']}; only FAILED, CANCELLED or QUEUED jobs can be retried")
        conn.execute("UPDATE jobs SET state = ?, attempts = 0, next_attempt_at = ?, error = '', updated_at = ?"
                     " WHERE id = ?", (JobState.QUEUED.value, now, now, job_id))
        conn.execute("UPDATE deliveries SET state = ?, updated_at = ? WHERE job_id = ? AND state = ?",
                     (DeliveryState.PENDING.value, now, job_id, DeliveryState.REJECTED.value))
        conn.execute("UPDATE series SET state = ? WHERE series_uid = ? AND state IN (?, ?)",
                     (SeriesState.COMPLETE.value, row["series_uid"], SeriesState.FAILED.value,
                      SeriesState.DONE.value))
        Store.event(conn, "job.retry", "retry requested by operator", now=now, series_uid=row["series_uid"],
                    job_id=job_id)
        return job_row(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


def cancel(store: Store, job_id: int, *, now: float) -> JobRow:
    """Operator cancel of a QUEUED or RUNNING job (a running attempt notices at its next lease renewal)."""
    with store.transaction() as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(job_id)
        if row["state"] not in (JobState.QUEUED.value, JobState.RUNNING.value):
            raise ValueError(f"job {job_id} is {row['state']}; only QUEUED or RUNNING jobs can be cancelled")
        conn.execute("UPDATE jobs SET state = ?, lease_owner = NULL, lease_expires = NULL, error = ?,"
                     " updated_at = ? WHERE id = ?",
                     (JobState.CANCELLED.value, "cancelled by operator", now, job_id))
        Store.event(conn, "job.cancelled", "cancelled by operator", now=now, series_uid=row["series_uid"],
                    job_id=job_id)
        _refresh_series(conn, row["series_uid"], now)
        return job_row(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())


# ---------------------------------------------------------------------------------------- deliveries


def add_deliveries(store: Store, job_id: int, destination: str, files: Sequence[OutboundFile], *,
                   now: float) -> None:
    """Enter objects in the outbox ledger as PENDING for a destination (idempotent per SOP Instance UID)."""
    with store.transaction() as conn:
        conn.executemany(
            "INSERT OR IGNORE INTO deliveries (job_id, destination, sop_uid, path, sop_class_uid, transfer_syntax,"
            " state, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(job_id, destination, f.sop_uid, f.path, f.sop_class_uid, f.transfer_syntax,
              DeliveryState.PENDING.value, now) for f in files])


def mark_delivery(store: Store, job_id: int, destination: str, sop_uid: str, state: DeliveryState, *,
                  status: int | None, detail: str, now: float) -> None:
    with store.transaction() as conn:
        conn.execute("UPDATE deliveries SET state = ?, status = ?, detail = ?, updated_at = ?"
                     " WHERE job_id = ? AND destination = ? AND sop_uid = ?",
                     (state.value, status, detail, now, job_id, destination, sop_uid))


def set_outputs_ready(store: Store, job_id: int, *, now: float, message: str) -> None:
    """The job's outputs are in the outbox and its deliveries recorded: a retry re-sends, never re-computes."""
    with store.transaction() as conn:
        row = conn.execute("SELECT series_uid FROM jobs WHERE id = ?", (job_id,)).fetchone()
        conn.execute("UPDATE jobs SET outputs_ready = 1, updated_at = ? WHERE id = ?", (now, job_id))
        Store.event(conn, "job.outputs", message, now=now, series_uid=row["series_uid"], job_id=job_id)


def force_complete(store: Store, series_uid: str, router: Callable[[SeriesRow], Route], *,
                   now: float) -> bool:
    """Operator: judge a RECEIVING series complete now, without waiting for the quiet period."""
    series = store.get_series(series_uid)
    if series is None:
        raise KeyError(series_uid)
    return complete_series(store, series, reason="forced by operator", route=router(series), now=now, forced=True)


__all__ = [
    "Backoff", "OutboundFile", "Route", "add_deliveries", "cancel", "claim", "complete_series", "due_series",
    "finish", "force_complete", "mark_delivery", "promote", "renew_lease", "requeue_expired", "requeue_owned", "retry",
    "set_outputs_ready",
]
