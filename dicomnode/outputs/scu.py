"""The C-STORE SCU: send files to a destination and classify every answer.

Classification (PS3.4 B.2.3 and PS3.7 C):

- stored: ``0x0000`` success and the warnings ``0xB000`` (coercion of data elements), ``0xB006`` (elements
  discarded), ``0xB007`` (data set does not match SOP class): the peer kept the object.
- retryable: no status at all (timeout, abort, connection lost: pynetdicom then returns an empty Dataset),
  ``0xA7xx`` out of resources, ``0x0110`` processing failure, a refused connection, and an association
  rejected as *transient*.
- permanent: every other failure status (``0xA9xx``, ``0xCxxx``, ``0x0122`` SOP class not supported, ...), a
  presentation context the peer does not accept, and an association rejected as *permanent* (for example an
  unknown calling AE title). These are not retried for ever: the job fails with the reason.

Files are sent as stored (pynetdicom streams the data set from the file without re-encoding), over one
association per destination with exactly the (SOP class, transfer syntax) pairs of the files (split into
several associations beyond 128 pairs, the protocol's limit). Sockets get TCP_NODELAY.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import Destination, DestinationKind
from dicomnode.errors import DeliveryError
from dicomnode.outputs.delivery import STORED_WARNINGS, OnResult, Outcome, Proceed, StoreResult, always, classify_status
from dicomnode.state.jobs import OutboundFile
from dicomnode.telemetry import metrics

__all__ = ["STORED_WARNINGS", "Outcome", "ScuSender", "ScuSettings", "StoreResult", "classify", "client_ssl_context",
           "echo", "send_files"]

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128


def classify(rsp: Dataset) -> tuple[Outcome, int | None, str]:
    """Classify a C-STORE response data set (possibly empty) as stored, retryable or permanent."""
    if "Status" not in rsp:
        return Outcome.RETRYABLE, None, "no response (timeout, abort or connection lost)"
    status = int(rsp.Status)
    outcome, detail = classify_status(status, str(rsp.ErrorComment) if "ErrorComment" in rsp else "")
    return outcome, status, detail


def _nodelay(event: evt.Event) -> None:
    assoc_sock = event.assoc.dul.socket
    if assoc_sock is not None and assoc_sock.socket is not None:
        assoc_sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class ScuSettings:
    calling_aet: str
    acse_timeout: float = 30.0
    dimse_timeout: float = 120.0
    network_timeout: float = 60.0
    connection_timeout: float = 15.0
    ssl_context: ssl.SSLContext | None = None


def _context_chunks(files: Sequence[OutboundFile]) -> list[tuple[list[tuple[str, str]], list[OutboundFile]]]:
    """Group files into associations of at most 128 (SOP class, transfer syntax) presentation contexts."""
    pairs: list[tuple[str, str]] = []
    for f in files:
        pair = (f.sop_class_uid, f.transfer_syntax)
        if pair not in pairs:
            pairs.append(pair)
    chunks = []
    for start in range(0, len(pairs), MAX_CONTEXTS):
        chunk = pairs[start:start + MAX_CONTEXTS]
        members = set(chunk)
        chunks.append((chunk, [f for f in files if (f.sop_class_uid, f.transfer_syntax) in members]))
    return chunks


def _application_entity(settings: ScuSettings, contexts: Sequence[tuple[str, str | Sequence[str]]]) -> AE:
    """The node's requesting AE with every timeout of ``settings`` and the requested presentation contexts."""
    ae = AE(ae_title=settings.calling_aet)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.connection_timeout = settings.connection_timeout
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


def _associate(dest: Destination, settings: ScuSettings,
               contexts: Sequence[tuple[str, str | Sequence[str]]]) -> Any:
    """An established association with ``dest``; DeliveryError (retryable or not, as classified) if none."""
    if dest.kind is not DestinationKind.DICOM:
        raise DeliveryError(f"{dest.where()} is a {dest.kind.value} destination, not a DICOM (C-STORE/C-ECHO) peer",
                            retryable=False)
    ae = _application_entity(settings, contexts)
    responses: list[Any] = []
    handlers: list[Any] = [(evt.EVT_CONN_OPEN, _nodelay),
                           (evt.EVT_ACSE_RECV, lambda e: responses.append(e.primitive))]
    tls = (settings.ssl_context, dest.host) if settings.ssl_context is not None and dest.tls else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=handlers, tls_args=tls)
    if assoc.is_established:
        return assoc
    where = f"{dest.name} ({dest.ae_title}@{dest.host}:{dest.port})"
    if assoc.is_rejected:
        rsp = next((r for r in responses if getattr(r, "result", None) in (0x01, 0x02)), None)
        transient = rsp is not None and rsp.result == 0x02
        why = f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}" if rsp is not None else "rejected"
        raise DeliveryError(f"association with {where} rejected ({why})", retryable=transient)
    raise DeliveryError(f"cannot associate with {where}: connection refused, aborted or timed out",
                        retryable=True)


def send_files(dest: Destination, files: Sequence[OutboundFile], settings: ScuSettings,
               on_result: OnResult | None = None, proceed: Proceed = always) -> list[StoreResult]:
    """C-STORE ``files`` to ``dest``; return one result per file sent.

    ``proceed`` is asked before each C-STORE; when it says False the association is released and the files not
    yet sent get no result. Raises :class:`DeliveryError` when an association cannot be set up (retryable or
    not, as classified) or is lost mid-way (retryable); results of files already answered are reported through
    ``on_result`` first.
    """
    # Each data set streams from its file as stored (pynetdicom's STORE_SEND_CHUNKED_DATASET, set once per
    # process by dicomnode.ops.runtime): the bytes sent are the bytes kept.
    with metrics.stage_timer("send"):
        return _send_chunks(dest, files, settings, on_result, proceed)


def _send_chunks(dest: Destination, files: Sequence[OutboundFile], settings: ScuSettings,
                 on_result: OnResult | None, proceed: Proceed) -> list[StoreResult]:
    results: list[StoreResult] = []
    for contexts, members in _context_chunks(files):
        if not proceed():
            break
        try:
            assoc = _associate(dest, settings, contexts)
        except DeliveryError as exc:
            metrics.send_outcome(Outcome.RETRYABLE.value if exc.retryable else Outcome.PERMANENT.value)
            raise
        try:
            if not _send_members(assoc, dest, members, results, on_result, proceed):
                break
        finally:
            if assoc.is_established:
                assoc.release()
    return results


def _send_members(assoc: Any, dest: Destination, members: Sequence[OutboundFile], results: list[StoreResult],
                  on_result: OnResult | None, proceed: Proceed) -> bool:
    """C-STORE ``members`` over ``assoc``, appending to ``results``; False when ``proceed`` said stop."""
    accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts}
    for f in members:
        if not proceed():
            return False
        if (f.sop_class_uid, f.transfer_syntax) not in accepted:
            result = StoreResult(f, Outcome.PERMANENT, None,
                                 f"{dest.name} does not accept SOP class {f.sop_class_uid} "
                                 f"in transfer syntax {f.transfer_syntax}")
        else:
            outcome, status, detail = classify(assoc.send_c_store(f.path))
            result = StoreResult(f, outcome, status, detail)
        results.append(result)
        metrics.send_outcome(result.outcome.value)
        if on_result is not None:
            on_result(result)
        if not assoc.is_established:
            raise DeliveryError(f"association with {dest.name} lost after {len(results)} object(s)",
                                retryable=True)
    return True


class ScuSender:
    """The :class:`~dicomnode.outputs.delivery.Sender` of a ``dicom`` destination: :func:`send_files`."""

    def __init__(self, dest: Destination, settings: ScuSettings) -> None:
        self.dest = dest
        self.settings = settings

    def send(self, files: Sequence[OutboundFile], *, on_result: OnResult | None = None,
             proceed: Proceed = always) -> list[StoreResult]:
        return send_files(self.dest, files, self.settings, on_result=on_result, proceed=proceed)

    def close(self) -> None:
        """Nothing to release: each send opens and releases its own associations."""


def echo(dest: Destination, settings: ScuSettings) -> int:
    """C-ECHO ``dest``; return the status (0x0000 on success). Raises DeliveryError when no association
    (classified like a send's) or no response."""
    assoc = _associate(dest, settings, [(Verification, DEFAULT_TRANSFER_SYNTAXES)])
    try:
        rsp = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in rsp:
        raise DeliveryError("no C-ECHO response (timeout or abort)", retryable=True)
    return int(rsp.Status)


def client_ssl_context(cert_file: str | None, key_file: str | None, ca_file: str | None) -> ssl.SSLContext:
    """TLS context for the SCU: verifies the peer against ``ca_file``; presents our certificate if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    ctx.check_hostname = False  # DICOM peers are addressed by IP; the CA pins who they are
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx
