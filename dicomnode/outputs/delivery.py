"""The one delivery interface: a :class:`Sender` sends files to one destination and classifies every answer.

Implementations, one per ``destinations[].kind`` (:func:`dicomnode.outputs.destinations.open_sender` picks one):
C-STORE (:mod:`.scu`), DICOMweb STOW-RS (:mod:`.dicomweb`) and a folder (:mod:`.folder`). Whatever the
transport, each object ends in one of three outcomes, which the pipeline turns into delivery records:

- ``STORED``: the destination kept the object (warnings included);
- ``RETRYABLE``: it may keep it later (peer down, out of resources, timeout): the record stays PENDING and the
  job is retried with backoff;
- ``PERMANENT``: it refused the object and will refuse it again: the record is REJECTED and the job FAILS
  with the reason.

Contract of :meth:`Sender.send`: ``on_result`` is called once per file as soon as its answer is known (so the
ledger is written as answers come in, not at the end); ``proceed`` is asked before each file (or batch of
files) and sending stops when it says False: files not yet sent get no result. A failure of the whole
destination (no association, wrong URL, refused credentials, connection lost) raises
:class:`~dicomnode.errors.DeliveryError`, retryable or not, after the results already known were reported.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from dicomnode.state.jobs import OutboundFile


class Outcome(str, enum.Enum):
    STORED = "stored"
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class StoreResult:
    """The answer for one file. ``status``: the DIMSE status (C-STORE), the failure reason code of a STOW-RS
    response, or None (no status: HTTP errors, timeouts, folder writes); ``detail`` says it in words."""

    file: OutboundFile
    outcome: Outcome
    status: int | None
    detail: str


OnResult = Callable[[StoreResult], None]
Proceed = Callable[[], bool]


def always() -> bool:
    """The default ``proceed``: never stop early."""
    return True


def classify_status(status: int, comment: str = "") -> tuple[Outcome, str]:
    """Outcome and wording of a DICOM storage status (C-STORE status, or a STOW-RS Failure/Warning Reason).

    0x0000 success; warnings 0xB000, 0xB006, 0xB007 stored; 0xA7xx out of resources and 0x0110 processing
    failure retryable; every other status permanent (PS3.4 B.2.3, PS3.18 Table 10.5.3-2).
    """
    extra = f" ({comment})" if comment else ""
    if status == 0x0000:
        return Outcome.STORED, "success"
    if status in STORED_WARNINGS:
        return Outcome.STORED, f"stored with warning 0x{status:04X}{extra}"
    if 0xA700 <= status <= 0xA7FF or status == 0x0110:
        return Outcome.RETRYABLE, f"0x{status:04X} out of resources or processing failure{extra}"
    return Outcome.PERMANENT, f"refused with 0x{status:04X}{extra}"


STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


class Sender(Protocol):
    """Delivers files to one destination (see the module docstring for the contract)."""

    def send(self, files: Sequence[OutboundFile], *, on_result: OnResult | None = None,
             proceed: Proceed = always) -> list[StoreResult]:
        """Send ``files``; return one result per file sent (in order)."""
        ...

    def close(self) -> None:
        """Release what the sender holds (HTTP sessions); it is not used afterwards."""
        ...
