"""The state store's rows and closed sets of states, as the store returns them (frozen dataclasses, enums).

Times are Unix seconds (float); ``state`` columns are stored as the enums' values.
"""

from __future__ import annotations

import enum
import sqlite3
from dataclasses import dataclass


class SeriesState(str, enum.Enum):
    RECEIVING = "RECEIVING"  # instances arriving; not yet judged complete
    COMPLETE = "COMPLETE"  # judged complete and routed; jobs queued or running
    DONE = "DONE"  # every job of the current generation is DONE
    FAILED = "FAILED"  # a job of the current generation FAILED for good
    IGNORED = "IGNORED"  # matched no rule (reason says why)


class JobState(str, enum.Enum):
    QUEUED = "QUEUED"  # waiting; next_attempt_at may lie in the future (backoff)
    RUNNING = "RUNNING"  # claimed by a worker holding an unexpired lease
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class DeliveryState(str, enum.Enum):
    PENDING = "PENDING"
    STORED = "STORED"  # the destination answered success or a warning (0x0000, 0xB000, 0xB006, 0xB007)
    REJECTED = "REJECTED"  # the destination refused it for good
    DRY_RUN = "DRY_RUN"  # would have been sent; the pipeline runs in dry-run mode


@dataclass(frozen=True)
class InstanceMeta:
    """What the receiver records about one instance (header attributes, no pixel data)."""

    sop_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    modality: str = ""
    body_part: str = ""
    description: str = ""
    image_type: str = ""  # backslash-joined ImageType values
    calling_aet: str = ""


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str
    body_part: str
    description: str
    sop_class_uid: str
    image_type: str
    calling_aet: str
    n_instances: int
    n_bytes: int
    first_received: float
    last_received: float
    released_at: float | None
    state: SeriesState
    reason: str
    generation: int


@dataclass(frozen=True)
class InstanceRow:
    sop_uid: str
    series_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: str
    size: int
    received_at: float
    missing: bool


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    pipeline: str
    generation: int
    state: JobState
    attempts: int
    lease_owner: str | None
    lease_expires: float | None
    next_attempt_at: float
    created_at: float
    updated_at: float
    error: str
    outputs_ready: bool


@dataclass(frozen=True)
class DeliveryRow:
    job_id: int
    destination: str
    sop_uid: str
    path: str
    sop_class_uid: str
    transfer_syntax: str
    state: DeliveryState
    status: int | None
    detail: str
    updated_at: float


@dataclass(frozen=True)
class EventRow:
    id: int
    ts: float
    kind: str
    series_uid: str | None
    job_id: int | None
    message: str


class RecordOutcome(str, enum.Enum):
    NEW = "new"
    REPLACED = "replaced"  # same SOP Instance UID seen before: the file was replaced, counted once
    REOPENED = "reopened"  # arrived after the series was complete; the series is processed again
    LATE_IGNORED = "late-ignored"  # arrived after completion; stored, not processed again (policy)


def series_row(row: sqlite3.Row) -> SeriesRow:
    """A ``series`` row as the store returns it."""
    d = dict(row)
    d["state"] = SeriesState(d["state"])
    return SeriesRow(**d)


def job_row(row: sqlite3.Row) -> JobRow:
    """A ``jobs`` row as the store returns it."""
    d = dict(row)
    d["state"] = JobState(d["state"])
    d["outputs_ready"] = bool(d["outputs_ready"])
    return JobRow(**d)


def delivery_row(row: sqlite3.Row) -> DeliveryRow:
    """A ``deliveries`` row as the store returns it."""
    d = dict(row)
    d["state"] = DeliveryState(d["state"])
    return DeliveryRow(**d)
