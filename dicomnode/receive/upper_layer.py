"""The DICOM upper layer of the Storage SCP, as the SCP sees it: its settings, the association it is handed,
and the handler interface it implements. The protocol itself is in the modules beside this one:

- :mod:`.connection`: the connection loop. One thread per receiver accepts connections and keeps every
  connection that is not associated (TLS handshake, waiting for the A-ASSOCIATE-RQ, waiting for the peer to
  close after a reject, release or abort) in one selector, with a deadline each and a cap on how many.
- :mod:`.negotiation` and :mod:`.acse`: the A-ASSOCIATE-RQ judged and answered (presentation contexts, roles,
  asynchronous operations window, extended negotiation, user identity).
- :mod:`.association`: one thread per accepted association runs the data phase: PDUs read through one buffer
  with large ``recv_into`` calls, P-DATA-TF PDVs walked in place, data set fragments streamed to a
  :class:`DataSink` as they arrive (a large object is never held in memory).
- :mod:`.fsm`: the PS3.8 state table both follow; :mod:`.pdu` and :mod:`.dimse`: the codecs.

pynetdicom's acceptor runs two threads per association that hand every PDU and DIMSE message to each other
through queues they poll with short sleeps; measured here (scripts/bench_ingest.py) that hand-off, not our work,
bounded ingest. pynetdicom stays the node's SCU and the reference peer of the tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


@dataclass(frozen=True)
class AcceptorSettings:
    """The limits and identity of one receiver. Times are seconds; None: no limit."""

    ae_title: str
    allowed_calling_aets: frozenset[str] = frozenset()  # empty: any calling AE title
    allowed_hosts: frozenset[str] = frozenset()  # empty: any peer address
    max_pdu: int = 0  # maximum PDU length we receive, announced in the A-ASSOCIATE-AC; 0 = unlimited
    acse_timeout: float | None = 30.0  # ARTIM: deadline for TLS + A-ASSOCIATE-RQ, and for the peer to close
    network_timeout: float | None = 60.0  # deadline for progress of an established association
    max_associations: int = 16
    max_pending: int = 64  # connections not associated (handshake, awaiting the RQ, closing)
    implementation_uid: str = ""
    implementation_version: str = ""
    # Several receiver processes sharing one listening socket: a receiver with open connections waits this long
    # per connection before it takes a new one, so that the least busy receiver takes it (0: take it at once).
    yield_per_connection: float = 0.0


S = TypeVar("S")


@dataclass
class Association(Generic[S]):
    """One accepted association as the handlers see it.

    ``session`` is the handler's own bookkeeping for this association, made by
    :meth:`StorageHandler.new_session` when it is accepted; the upper layer only carries it. ``released`` is set
    by the upper layer when the peer released the association normally. ``user`` is the username the peer
    proved with User Identity negotiation ("" when none was checked).
    """

    calling_aet: str
    called_aet: str
    address: str
    port: int
    session: S
    peer_max_pdu: int = 0  # the requestor's maximum receive length; 0 = unlimited
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (abstract syntax, transfer syntax)
    released: bool = False
    user: str = ""

    @property
    def peer(self) -> str:
        return f"{self.calling_aet}@{self.address}"


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ command set, and the presentation context it came on. Both UIDs are valid UIDs."""

    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    context_id: int
    priority: int = 0
    move_originator_aet: str = ""


class DataSink(Protocol):
    """Where one C-STORE data set goes, fragment by fragment, and the status it earns."""

    def write(self, fragment: memoryview) -> None: ...

    def finish(self) -> tuple[int, str]:
        """The whole data set has arrived: persist it (or refuse it); return (status, error comment)."""
        ...

    def abandon(self) -> None:
        """The association ended before the data set was complete: leave nothing behind."""
        ...


class StorageHandler(Protocol[S]):
    """What the upper layer calls; ``S`` is the type of the handler's per-association session.

    ``new_session``, ``accepted``, ``rejected`` and ``refused`` run in the connection loop's thread and must
    return at once; the others run in the association's thread.
    """

    def new_session(self) -> S:
        """Fresh bookkeeping for an association being accepted (carried as :attr:`Association.session`)."""
        ...

    def accepted(self, assoc: Association[S]) -> None: ...

    def rejected(self, address: str, calling_aet: str, reason: str) -> None: ...

    def refused(self, address: str, reason: str) -> None:
        """A connection closed before any association: host not allowed, TLS handshake failed, ARTIM deadline,
        or the cap on pending connections."""

    def open_store(self, assoc: Association[S], request: StoreRequest) -> DataSink: ...

    def answered(self, assoc: Association[S]) -> None:
        """Called after a C-STORE response went out, while the peer prepares its next request."""

    def released(self, assoc: Association[S]) -> None: ...

    def aborted(self, assoc: Association[S]) -> None: ...

    def ended(self, assoc: Association[S]) -> None:
        """The association's thread is about to end (after ``released`` or ``aborted``): free what the thread
        holds (its state store connection)."""
