"""The state store and job queue, stepped deterministically with explicit ``now`` (no network, no sleeps)."""

from __future__ import annotations

import fcntl
import os
import random
from pathlib import Path

import pytest

from dicomnode.config import parse_config
from dicomnode.errors import EngineUnavailable, PipelineError, TransientError
from dicomnode.outputs.scu import ScuSettings
from dicomnode.state import jobs
from dicomnode.state.jobs import Backoff, Route
from dicomnode.state.spool import Spool
from dicomnode.state.store import InstanceMeta, JobState, RecordOutcome, SeriesRow, SeriesState, Store
from dicomnode.work.pipeline import PipelineContext
from dicomnode.work.routing import make_router
from dicomnode.work.worker import Worker

T0 = 1_700_000_000.0
BACKOFF = Backoff(max_attempts=3, base_seconds=10, max_seconds=25)


def meta(sop: str, series: str = "1.2.3", **kw: str) -> InstanceMeta:
    return InstanceMeta(sop_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_uid=series,
                        study_uid="1.2", transfer_syntax="1.2.840.10008.1.2.1", modality=kw.get("modality", "CT"),
                        description=kw.get("description", ""), calling_aet="CT1")


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "db.sqlite3")


def always(*pipelines: str) -> Route:
    return Route(pipelines, "test")


def receive(store: Store, n: int, *, at: float, series: str = "1.2.3", reprocess: bool = True) -> list[RecordOutcome]:
    return [store.record_instance(meta(f"{series}.{i}", series), Path(f"/x/{i}"), 100, now=at + i * 0.01,
                                  reprocess_late=reprocess)[0] for i in range(n)]


def test_repeated_instance_counts_once(store: Store) -> None:
    receive(store, 3, at=T0)
    assert receive(store, 1, at=T0 + 5) == [RecordOutcome.REPLACED]
    series = store.get_series("1.2.3")
    assert series is not None and series.n_instances == 3 and series.n_bytes == 300


def test_series_completes_only_after_the_quiet_period(store: Store) -> None:
    receive(store, 3, at=T0)
    assert jobs.promote(store, lambda s: always("p"), now=T0 + 9.9, quiet_seconds=10) == []
    assert jobs.promote(store, lambda s: always("p"), now=T0 + 10.1, quiet_seconds=10) == ["1.2.3"]
    series = store.get_series("1.2.3")
    assert series is not None and series.state is SeriesState.COMPLETE
    assert "quiet period 10 s" in series.reason
    (job,) = store.list_jobs()
    assert job.state is JobState.QUEUED and job.pipeline == "p"


def test_release_shortens_the_quiet_period_when_configured(store: Store) -> None:
    receive(store, 2, at=T0)
    store.mark_released(["1.2.3"], now=T0 + 1)
    assert jobs.promote(store, lambda s: always("p"), now=T0 + 3, quiet_seconds=30, on_release="off") == []
    promoted = jobs.promote(store, lambda s: always("p"), now=T0 + 3, quiet_seconds=30, on_release=2.0)
    assert promoted == ["1.2.3"]
    assert "association released" in store.get_series("1.2.3").reason  # type: ignore[union-attr]


def test_no_route_means_ignored_with_reason(store: Store) -> None:
    receive(store, 1, at=T0)
    jobs.promote(store, lambda s: Route((), "matched no rule (ct: Modality 'MR')"), now=T0 + 60, quiet_seconds=1)
    series = store.get_series("1.2.3")
    assert series is not None and series.state is SeriesState.IGNORED
    assert "matched no rule (ct: Modality 'MR')" in series.reason
    assert store.list_jobs() == []


def test_claim_is_exclusive_and_leases_expire(store: Store) -> None:
    receive(store, 1, at=T0)
    jobs.promote(store, lambda s: always("p"), now=T0 + 60, quiet_seconds=1)
    job = jobs.claim(store, "w1", now=T0 + 61, lease_seconds=30)
    assert job is not None and job.state is JobState.RUNNING and job.attempts == 1
    assert jobs.claim(store, "w2", now=T0 + 62, lease_seconds=30) is None
    assert jobs.requeue_expired(store, now=T0 + 80) == []
    assert jobs.renew_lease(store, job.id, "w1", now=T0 + 80, lease_seconds=30)
    assert jobs.requeue_expired(store, now=T0 + 109) == []
    assert jobs.requeue_expired(store, now=T0 + 111) == [job.id]  # w1 died: the job is taken up again
    again = jobs.claim(store, "w2", now=T0 + 112, lease_seconds=30)
    assert again is not None and again.id == job.id and again.attempts == 2
    assert jobs.finish(store, job, "w1", now=T0 + 113, error=None, backoff=BACKOFF) is JobState.RUNNING  # stale


def test_retryable_errors_back_off_then_fail(store: Store) -> None:
    receive(store, 1, at=T0)
    jobs.promote(store, lambda s: always("p"), now=T0 + 60, quiet_seconds=1)
    now = T0 + 60
    delays = []
    for _ in range(3):
        job = jobs.claim(store, "w", now=now + 1000, lease_seconds=30)
        assert job is not None
        state = jobs.finish(store, job, "w", now=now, error=TransientError("pacs down"), backoff=BACKOFF)
        row = store.get_job(job.id)
        assert row is not None
        delays.append(row.next_attempt_at - now)
        now += 1000
    assert state is JobState.FAILED
    assert delays[:2] == [10, 20]  # base, then doubled; the third attempt was the last
    series = store.get_series("1.2.3")
    assert series is not None and series.state is SeriesState.FAILED and "pacs down" in series.reason


def test_retry_delays_are_jittered_so_a_returning_pacs_is_not_hit_all_at_once(store: Store) -> None:
    """Forty jobs fail together (the PACS went down): their retries spread over [d * (1 - jitter), d] instead of
    all falling due at the same second; the spread comes from the injected generator, so it is reproducible."""
    backoff = Backoff(max_attempts=5, base_seconds=60, max_seconds=600, jitter=0.5)
    assert backoff.delay(3, draw=0.0) == 240 and backoff.delay(3, draw=1.0) == 120  # the two ends, capped after
    assert backoff.delay(9, draw=0.0) == 600 and Backoff(5, 60, 600).delay(3, draw=0.9) == 240  # no jitter: exact
    for i in range(40):
        receive(store, 1, at=T0, series=f"1.2.{i}")
    jobs.promote(store, lambda s: always("p"), now=T0 + 60, quiet_seconds=1)

    def fail_all(rng: random.Random, at: float) -> list[float]:
        delays = []
        while (job := jobs.claim(store, "w", now=at, lease_seconds=30)) is not None:
            jobs.finish(store, job, "w", now=at, error=TransientError("pacs down"), backoff=backoff, rng=rng)
            delays.append(store.get_job(job.id).next_attempt_at - at)  # type: ignore[union-attr]
        return delays

    first = fail_all(random.Random(7), T0 + 61)
    assert len(first) == 40 and all(30 <= d <= 60 for d in first)  # attempt 1: base 60 s, jitter 50 %
    assert len({round(d, 3) for d in first}) == 40 and max(first) - min(first) > 20  # spread, not a burst
    second = fail_all(random.Random(7), T0 + 1000)  # attempt 2, same seed: the same draws, twice the delay
    assert second == pytest.approx([2 * d for d in first])


def test_an_unavailable_engine_waits_and_retries_without_using_up_attempts(store: Store) -> None:
    receive(store, 1, at=T0)
    jobs.promote(store, lambda s: always("p"), now=T0 + 60, quiet_seconds=1)
    now = T0 + 60
    for _ in range(BACKOFF.max_attempts * 3):  # far more rounds than attempts: a lost Ray cluster never fails a job
        job = jobs.claim(store, "w", now=now + 1000, lease_seconds=30)
        assert job is not None
        state = jobs.finish(store, job, "w", now=now, error=EngineUnavailable("ray at 10.0.0.1:6379 unreachable"),
                            backoff=BACKOFF)
        row = store.get_job(job.id)
        assert state is JobState.QUEUED and row is not None and row.attempts == 0
        assert row.next_attempt_at - now == BACKOFF.base_seconds
        now += 1000
    job = jobs.claim(store, "w", now=now + 1000, lease_seconds=30)
    assert job is not None and job.attempts == 1
    assert jobs.finish(store, job, "w", now=now, error=None, backoff=BACKOFF) is JobState.DONE
    retries = [e.message for e in store.events(job_id=job.id) if e.kind == "job.queued" and "retry" in e.message]
    assert len(retries) == BACKOFF.max_attempts * 3 and all("attempt not counted" in m for m in retries)


def test_permanent_error_fails_at_once_and_operator_retry_requeues(store: Store) -> None:
    receive(store, 1, at=T0)
    jobs.promote(store, lambda s: always("p"), now=T0 + 60, quiet_seconds=1)
    job = jobs.claim(store, "w", now=T0 + 61, lease_seconds=30)
    assert job is not None
    assert jobs.finish(store, job, "w", now=T0 + 62, error=PipelineError("bad"), backoff=BACKOFF) is JobState.FAILED
    retried = jobs.retry(store, job.id, now=T0 + 100)
    assert retried.state is JobState.QUEUED and retried.attempts == 0
    assert store.get_series("1.2.3").state is SeriesState.COMPLETE  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        jobs.retry(store, 999, now=T0)


def test_late_instance_reopens_and_supersedes_queued_jobs(store: Store) -> None:
    receive(store, 2, at=T0)
    jobs.promote(store, lambda s: always("p"), now=T0 + 60, quiet_seconds=1)
    (old,) = store.list_jobs()
    assert store.record_instance(meta("1.2.3.99"), Path("/x/99"), 100, now=T0 + 70,
                                 reprocess_late=True)[0] is RecordOutcome.REOPENED
    series = store.get_series("1.2.3")
    assert series is not None and series.state is SeriesState.RECEIVING and series.generation == 2
    assert store.get_job(old.id).state is JobState.CANCELLED  # type: ignore[union-attr]
    jobs.promote(store, lambda s: always("p"), now=T0 + 80, quiet_seconds=1)
    new = [j for j in store.list_jobs() if j.id != old.id]
    assert len(new) == 1 and new[0].generation == 2
    assert any(e.kind == "series.reopened" for e in store.events(series_uid="1.2.3"))


def test_late_instance_ignored_by_policy_is_kept_but_not_processed(store: Store) -> None:
    receive(store, 2, at=T0)
    jobs.promote(store, lambda s: always("p"), now=T0 + 60, quiet_seconds=1)
    outcome, _ = store.record_instance(meta("1.2.3.99"), Path("/x/99"), 100, now=T0 + 70, reprocess_late=False)
    assert outcome is RecordOutcome.LATE_IGNORED
    series = store.get_series("1.2.3")
    assert series is not None and series.state is SeriesState.COMPLETE and series.n_instances == 3
    assert any(e.kind == "series.late-instance" for e in store.events(series_uid="1.2.3"))


def _row(**kw: object) -> SeriesRow:
    base: dict[str, object] = dict(series_uid="1", study_uid="2", modality="CT", body_part="CHEST",
                                   description="Thorax 5mm lung", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                                   image_type="ORIGINAL\\PRIMARY\\AXIAL", calling_aet="CT1", n_instances=64,
                                   n_bytes=0, first_received=0.0, last_received=0.0, released_at=None,
                                   state=SeriesState.RECEIVING, reason="", generation=1)
    base.update(kw)
    return SeriesRow(**base)  # type: ignore[arg-type]


def test_rules_route_by_tags_regex_and_counts() -> None:
    cfg = parse_config({
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        "pipelines": [{"name": "lung", "kind": "forward", "destinations": ["pacs"]},
                      {"name": "brain", "kind": "forward", "destinations": ["pacs"]}],
        "rules": [{"name": "chest", "pipelines": ["lung"],
                   "match": {"modality": ["ct"], "series_description": "lung|thorax", "min_instances": 20,
                             "image_type": ["AXIAL"], "calling_aet": ["CT1", "CT2"]}},
                  {"name": "head", "pipelines": ["brain"], "match": {"body_part": ["HEAD"]}}]})
    route = make_router(cfg)
    assert route(_row()).pipelines == ("lung",)
    assert route(_row(body_part="HEAD", description="brain")).pipelines == ("brain",)
    miss = route(_row(n_instances=5))
    assert miss.pipelines == () and "chest: 5 instances < 20" in miss.reason
    assert route(_row(image_type="DERIVED\\SECONDARY")).pipelines == ()
    assert route(_row(calling_aet="OTHER")).pipelines == ()
    private = "1.2.826.0.1.3680043.9.7433.1.16"  # a modality's private storage class
    unknown = route(_row(sop_class_uid=private))
    assert unknown.pipelines == () and f"SOP class {private} is not one of the standard's" in unknown.reason
    named = make_router(parse_config({
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}],
        "pipelines": [{"name": "keep", "kind": "forward", "destinations": ["pacs"]}],
        "rules": [{"name": "private", "pipelines": ["keep"], "match": {"sop_class_uid": [private]}}]}))
    assert named(_row(sop_class_uid=private)).pipelines == ("keep",)  # a rule that names it matches
    forwarding = make_router(parse_config({**{"unmatched": "forward"}, "destinations": [
        {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 104}]}))
    assert forwarding(_row()).pipelines == ("forward-unmatched",)


def test_worker_step_runs_a_job_to_done_deterministically(tmp_path: Path) -> None:
    cfg = parse_config({"storage": {"path": str(tmp_path)}, "completion": {"quiet_seconds": 5},
                        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
                        "pipelines": [{"name": "dry", "kind": "forward", "dry_run": True, "destinations": ["pacs"]}],
                        "rules": [{"name": "all", "pipelines": ["dry"]}]})
    store = Store(cfg.db_path)
    spool = Spool(cfg.spool_dir, fsync=False)
    written = spool.write("1.2.3", "1.2.3.1", b"x" * 10)
    store.record_instance(meta("1.2.3.1"), written.path, 10, now=T0, reprocess_late=True)
    worker = Worker(PipelineContext(cfg, store, spool, ScuSettings("NODE"), {}), make_router(cfg))
    assert worker.backoff == Backoff(5, 10.0, 1800.0, jitter=0.5)  # the config's defaults, jitter included
    assert worker.step(now=T0 + 4).job_id is None
    result = worker.step(now=T0 + 6)
    assert result.promoted == ("1.2.3",) and result.job_state is JobState.DONE
    assert store.get_series("1.2.3").state is SeriesState.DONE  # type: ignore[union-attr]
    (delivery,) = store.deliveries(result.job_id)  # type: ignore[arg-type]
    assert delivery.state.value == "DRY_RUN"  # recorded what it would send; sent nothing (port 9 is closed)


def test_writers_queue_on_a_lock_that_wakes_them_not_on_sqlite_polling(tmp_path: Path) -> None:
    """A write transaction holds <db>.writer-lock (flock): another process' writer waits on it, not on SQLite's
    sleeping busy handler; the lock is free again once the transaction ends, committed or rolled back."""
    store = Store(tmp_path / "state.sqlite3")
    other = os.open(tmp_path / "state.sqlite3.writer-lock", os.O_RDWR | os.O_CREAT)  # as another process would
    try:
        with store.transaction():
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
        with pytest.raises(RuntimeError), store.transaction():
            raise RuntimeError("rolled back")
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(other)
