"""The DICOM upper layer of the Storage SCP: one blocking thread per association, nothing polls.

pynetdicom's acceptor runs two threads per association (its DUL and its association reactor) that hand every
PDU and every DIMSE message to each other through queues they poll with short sleeps. Measured here on one
association (scripts/bench_ingest.py) that hand-off, not our work, bounded ingest: about 5 ms of the 7.5 ms a
512 KB instance took. This module keeps pynetdicom for what it does well, the association negotiation (its
A-ASSOCIATE PDU codecs and :func:`pynetdicom.presentation.negotiate_as_acceptor`), and replaces the data phase
with a plain loop on the socket:

- PDUs are read through one buffer with large ``recv_into`` calls; P-DATA-TF PDVs (PS3.8 9.3.5) are walked in
  place, so a PDU of any size costs no more memory than the buffer.
- DIMSE command sets (PS3.7 group 0000, implicit VR little endian) are decoded and encoded here: C-ECHO and
  C-STORE are served; any other request on an accepted context is answered 0x0211 (unrecognized operation).
- Data set fragments go straight to a :class:`DataSink` (the spool's incoming file) as they arrive, so writing
  overlaps receiving and a large object is never held in memory.

The acceptor side of the PS3.8 state machine that a storage SCP passes through is implemented: ARTIM while
waiting for the A-ASSOCIATE-RQ (``acse_timeout``), A-ASSOCIATE-RJ with the standard result/source/reason, an
idle limit in data transfer (``network_timeout``), A-RELEASE-RQ answered with A-RELEASE-RP, A-ABORT on any
unexpected or unrecognised PDU, on an unknown presentation context and on a malformed command set.
"""

from __future__ import annotations

import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, cast

from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicomnode.state.spool import is_valid_uid

log = logging.getLogger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7

# DIMSE command fields (PS3.7 E.1) and the statuses this layer answers by itself
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATA_SET = 0x0101
SUCCESS, UNRECOGNIZED_OPERATION, MISTYPED_ARGUMENT, CANNOT_UNDERSTAND = 0x0000, 0x0211, 0x0212, 0xC000

# A-ASSOCIATE-RJ (result, source, reason) and the names metrics and logs use for them (PS3.8 9.3.4)
REJECT_NO_REASON = (1, 1, 1)
REJECT_APPLICATION_CONTEXT = (1, 1, 2)
REJECT_CALLING_AE = (1, 1, 3)
REJECT_CALLED_AE = (1, 1, 7)
REJECT_PROTOCOL_VERSION = (1, 2, 2)
REJECT_LOCAL_LIMIT = (2, 3, 2)
REJECT_REASONS = {
    REJECT_NO_REASON: "no-reason-given",
    REJECT_APPLICATION_CONTEXT: "application-context-name-not-supported",
    REJECT_CALLING_AE: "calling-ae-title-not-recognised",
    REJECT_CALLED_AE: "called-ae-title-not-recognised",
    REJECT_PROTOCOL_VERSION: "protocol-version-not-supported",
    REJECT_LOCAL_LIMIT: "local-limit-exceeded",
}

# A-ABORT reasons when the service provider (this node) aborts (PS3.8 9.3.8)
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_INVALID_PARAMETER = 6

MAX_COMMAND_SET = 64 * 1024  # a command set is a few hundred bytes; more is a broken or hostile peer
MAX_ASSOCIATE_RQ = 1024 * 1024
_READ_BUFFER = 1024 * 1024
_PDU_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted with ``reason`` (PS3.8 A-ABORT reasons)."""

    def __init__(self, message: str, reason: int = ABORT_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


class PeerClosed(Exception):
    """The transport connection closed (or went idle past the network timeout) under us."""


@dataclass(frozen=True)
class AcceptorSettings:
    ae_title: str
    allowed_calling_aets: frozenset[str] = frozenset()  # empty: any calling AE title
    max_pdu: int = 0  # maximum PDU length we receive, announced in the A-ASSOCIATE-AC; 0 = unlimited
    acse_timeout: float | None = 30.0  # ARTIM: how long to wait for the A-ASSOCIATE-RQ
    network_timeout: float | None = 60.0  # how long an established association may stay silent
    max_associations: int = 16
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
    by the upper layer when the peer released the association normally.
    """

    calling_aet: str
    called_aet: str
    address: str
    port: int
    session: S
    peer_max_pdu: int = 0  # the requestor's maximum receive length; 0 = unlimited
    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (abstract syntax, transfer syntax)
    released: bool = False

    @property
    def peer(self) -> str:
        return f"{self.calling_aet}@{self.address}"


@dataclass(frozen=True)
class StoreRequest:
    """A C-STORE-RQ command set, and the presentation context it came on."""

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
    """What the upper layer calls; ``S`` is the type of the handler's per-association session."""

    def new_session(self) -> S:
        """Fresh bookkeeping for an association being accepted (carried as :attr:`Association.session`)."""
        ...

    def accepted(self, assoc: Association[S]) -> None: ...

    def rejected(self, address: str, calling_aet: str, reason: str) -> None: ...

    def open_store(self, assoc: Association[S], request: StoreRequest) -> DataSink: ...

    def answered(self, assoc: Association[S]) -> None:
        """Called after a C-STORE response went out, while the peer prepares its next request."""

    def released(self, assoc: Association[S]) -> None: ...

    def aborted(self, assoc: Association[S]) -> None: ...


# ---------------------------------------------------------------------------------------------------- encoding


def _pad_uid(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _pad_text(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def _element(group: int, elem: int, value: bytes) -> bytes:
    return _ELEMENT.pack(group, elem, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_response(command_field: int, message_id: int, status: int, sop_class_uid: str = "",
                    sop_instance_uid: str = "", comment: str = "") -> bytes:
    """A DIMSE-C response command set (implicit VR little endian, group 0000, tags ascending).

    The Affected SOP Class/Instance UIDs are optional in a response (PS3.7 9.3): one that is not a valid UID is
    left out rather than echoed, so whatever a peer sent, encoding its response cannot fail.
    """
    body = b""
    if sop_class_uid and is_valid_uid(sop_class_uid):
        body += _element(0x0000, 0x0002, _pad_uid(sop_class_uid))
    body += _element(0x0000, 0x0100, _us(command_field | 0x8000))
    body += _element(0x0000, 0x0120, _us(message_id))
    body += _element(0x0000, 0x0800, _us(NO_DATA_SET))
    body += _element(0x0000, 0x0900, _us(status))
    if comment and status not in (SUCCESS,):
        body += _element(0x0000, 0x0902, _pad_text(comment[:64]))  # Error Comment, LO
    if sop_instance_uid and is_valid_uid(sop_instance_uid):
        body += _element(0x0000, 0x1000, _pad_uid(sop_instance_uid))
    return _element(0x0000, 0x0000, struct.pack("<L", len(body))) + body


def decode_command(raw: bytes | bytearray) -> dict[int, bytes]:
    """Elements of a command set by tag ``(group << 16) | element``; raises ProtocolError when malformed."""
    out: dict[int, bytes] = {}
    i, end = 0, len(raw)
    while i < end:
        if i + 8 > end:
            raise ProtocolError("command set ends inside an element header", ABORT_INVALID_PARAMETER)
        group, elem, length = _ELEMENT.unpack_from(raw, i)
        i += 8
        if group != 0x0000 or length == 0xFFFFFFFF or i + length > end:
            raise ProtocolError(f"malformed command set element ({group:04X},{elem:04X})", ABORT_INVALID_PARAMETER)
        out[(group << 16) | elem] = bytes(raw[i:i + length])
        i += length
    return out


def _cmd_us(cmd: dict[int, bytes], tag: int, default: int | None = None) -> int:
    value = cmd.get(tag)
    if value is None or len(value) != 2:
        if default is None:
            raise ProtocolError(f"command set lacks ({tag >> 16:04X},{tag & 0xFFFF:04X})", ABORT_INVALID_PARAMETER)
        return default
    return cast(int, struct.unpack("<H", value)[0])


def _cmd_text(cmd: dict[int, bytes], tag: int) -> str:
    return cmd.get(tag, b"").decode("ascii", "replace").rstrip("\x00 ").lstrip(" ")


def _cmd_uid(cmd: dict[int, bytes], tag: int) -> str | None:
    """The UID at ``tag`` ("" when absent); None when it is present and not a valid UID (non-ASCII included)."""
    raw = cmd.get(tag)
    if raw is None:
        return ""
    text = raw.rstrip(b"\x00").decode("ascii", "replace")  # UI is padded with one NUL; no other trimming
    return text if is_valid_uid(text) else None


def pdata_pdus(context_id: int, payload: bytes, is_command: bool, peer_max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying ``payload`` as one message part, split to fit the peer's maximum PDU length."""
    room = len(payload) if peer_max_pdu <= 0 else max(peer_max_pdu - 6, 1)  # PDV header: 4 length + id + control
    pdus, offset = [], 0
    while True:
        chunk = payload[offset:offset + room]
        offset += len(chunk)
        last = offset >= len(payload)
        control = (1 if is_command else 0) | (2 if last else 0)
        pdv = _PDV_HEADER.pack(len(chunk) + 2, context_id, control) + chunk
        pdus.append(_PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv)
        if last:
            return pdus


def _abort_pdu(source: int, reason: int) -> bytes:
    return _PDU_HEADER.pack(ABORT, 4) + bytes((0, 0, source, reason))


def _reject_pdu(result: int, source: int, reason: int) -> bytes:
    return _PDU_HEADER.pack(ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


_RELEASE_RP = _PDU_HEADER.pack(RELEASE_RP, 4) + b"\x00\x00\x00\x00"


# ----------------------------------------------------------------------------------------------------- reading


class _Reader:
    """Buffered exact reads from a socket, with large ``recv_into`` calls (a 512 KB instance: a few dozen)."""

    def __init__(self, sock: socket.socket, size: int = _READ_BUFFER) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def _fill(self) -> None:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):  # keep the unread tail, make room after it
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start:self.end]
            self.start, self.end = 0, tail
        try:
            n = self.sock.recv_into(self.view[self.end:])
        except TimeoutError as exc:
            raise PeerClosed("network timeout: the peer sent nothing") from exc
        except OSError as exc:
            raise PeerClosed(f"connection error: {exc}") from exc
        if n == 0:
            raise PeerClosed("the peer closed the connection")
        self.end += n

    def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes (``n`` at most the buffer size)."""
        while self.end - self.start < n:
            self._fill()
        out = bytes(self.view[self.start:self.start + n])
        self.start += n
        return out

    def stream(self, n: int, sink: Callable[[memoryview], None]) -> None:
        """Pass exactly ``n`` bytes to ``sink`` in the pieces they arrive in (each a view valid during the call)."""
        while n:
            if self.start == self.end:
                self._fill()
            take = min(n, self.end - self.start)
            sink(self.view[self.start:self.start + take])
            self.start += take
            n -= take


def _discard(_: memoryview) -> None:
    return None


# ----------------------------------------------------------------------------------------------- association


class _Acceptor:
    """Runs one association on an accepted socket, start to end, in the calling thread."""

    def __init__(self, server: UpperLayerServer, sock: socket.socket, address: tuple[str, int]) -> None:
        self.server = server
        self.settings = server.settings
        self.handler = server.handler
        self.sock = sock
        self.address = address
        self.reader = _Reader(sock)
        self.has_slot = False
        self.assoc: Association[Any] | None = None
        # the DIMSE message being received
        self.command = bytearray()
        self.command_context = 0
        self.pending: dict[int, bytes] | None = None  # decoded command whose data set is arriving
        self.sink: DataSink | None = None
        self.sink_context = 0
        self.refusal: tuple[int, str] | None = None  # the pending C-STORE was refused before its data set came

    def run(self) -> None:
        try:
            self._run()
        except PeerClosed as exc:
            if self.assoc is not None:
                log.warning("association with %s ended without release: %s", self.assoc.peer, exc)
        except ProtocolError as exc:
            peer = self.assoc.peer if self.assoc else self.address[0]
            log.warning("aborting association with %s: %s", peer, exc)
            self._send_quietly(_abort_pdu(2, exc.reason))
        except Exception:
            peer = self.assoc.peer if self.assoc else self.address[0]
            log.exception("aborting association with %s after an internal error", peer)
            self._send_quietly(_abort_pdu(2, ABORT_NOT_SPECIFIED))
        finally:
            if self.sink is not None:
                self.sink.abandon()
                self.sink = None
            if self.assoc is not None and not self.assoc.released:
                self.handler.aborted(self.assoc)

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            pass

    def _run(self) -> None:
        self.sock.settimeout(self.settings.acse_timeout)
        pdu_type, length = self._pdu_header()
        if pdu_type == ABORT:
            self.reader.read(length)
            return
        if pdu_type != ASSOCIATE_RQ:
            raise ProtocolError(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
        if length > MAX_ASSOCIATE_RQ:
            raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes", ABORT_INVALID_PARAMETER)
        assoc = self._associate(self.reader.read(length), length)
        if assoc is None:
            return
        self.sock.settimeout(self.settings.network_timeout)
        while True:
            pdu_type, length = self._pdu_header()
            if pdu_type == P_DATA_TF:
                self._p_data(length)
            elif pdu_type == RELEASE_RQ:
                self.reader.read(length)
                self.sock.sendall(_RELEASE_RP)
                assoc.released = True
                if self.sink is not None or self.pending is not None or self.command:
                    log.warning("association with %s released in the middle of a message", assoc.peer)
                    if self.sink is not None:
                        self.sink.abandon()
                        self.sink = None
                self.handler.released(assoc)
                return
            elif pdu_type == ABORT:
                body = self.reader.read(length)
                source = body[2] if len(body) >= 4 else -1
                log.warning("association with %s aborted by the peer (source %d)", assoc.peer, source)
                return
            elif pdu_type in (ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, RELEASE_RP):
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} during data transfer",
                                    ABORT_UNEXPECTED_PDU)
            else:
                raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)

    def _pdu_header(self) -> tuple[int, int]:
        pdu_type, length = _PDU_HEADER.unpack(self.reader.read(6))
        if pdu_type not in (ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT):
            raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
        if pdu_type != P_DATA_TF and pdu_type != ASSOCIATE_RQ and length > 1024:
            raise ProtocolError(f"PDU type 0x{pdu_type:02X} claims {length} bytes", ABORT_INVALID_PARAMETER)
        return pdu_type, length

    # ------------------------------------------------------------------------------------------- negotiation

    def _associate(self, body: bytes, length: int) -> Association[Any] | None:
        """Answer the A-ASSOCIATE-RQ; the association when it was accepted, None when it was rejected."""
        rq = A_ASSOCIATE_RQ()
        try:
            rq.decode(_PDU_HEADER.pack(ASSOCIATE_RQ, length) + body)
            primitive = rq.to_primitive()
        except Exception as exc:
            raise ProtocolError(f"A-ASSOCIATE-RQ cannot be decoded: {exc}", ABORT_INVALID_PARAMETER) from exc
        calling = str(primitive.calling_ae_title).strip()
        called = str(primitive.called_ae_title).strip()
        s = self.settings
        reject: tuple[int, int, int] | None = None
        if not (rq.protocol_version & 1):
            reject = REJECT_PROTOCOL_VERSION
        elif str(primitive.application_context_name) != APPLICATION_CONTEXT:
            reject = REJECT_APPLICATION_CONTEXT
        elif s.allowed_calling_aets and calling not in s.allowed_calling_aets:
            reject = REJECT_CALLING_AE
        elif called != s.ae_title:
            reject = REJECT_CALLED_AE
        elif not self.server.reserve_slot():
            reject = REJECT_LOCAL_LIMIT
        if reject is not None:
            log.warning("association from %s@%s rejected: %s", calling, self.address[0], REJECT_REASONS[reject])
            self.handler.rejected(self.address[0], calling, REJECT_REASONS[reject])
            self._send_quietly(_reject_pdu(*reject))
            return None
        self.has_slot = True  # the server releases it when this association's thread ends

        peer_max, roles = 0, {}  # roles: {SOP class UID: (SCU role, SCP role)}
        for item in primitive.user_information:
            if isinstance(item, MaximumLengthNotification):
                peer_max = int(item.maximum_length_received or 0)
            elif isinstance(item, SCP_SCU_RoleSelectionNegotiation):
                if item.sop_class_uid is not None:
                    roles[item.sop_class_uid] = (item.scu_role, item.scp_role)
        results, role_items = negotiate_as_acceptor(primitive.presentation_context_definition_list,
                                                    self.server.supported_contexts, roles)
        ac = A_ASSOCIATE()
        ac.application_context_name = APPLICATION_CONTEXT
        ac.calling_ae_title = primitive.calling_ae_title
        ac.called_ae_title = primitive.called_ae_title
        ac.result, ac.result_source = 0x00, 0x01
        ac.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = s.max_pdu
        impl_uid = ImplementationClassUIDNotification()
        impl_uid.implementation_class_uid = s.implementation_uid
        user_info: list[Any] = [max_length, impl_uid]
        if s.implementation_version:
            version = ImplementationVersionNameNotification()
            version.implementation_version_name = s.implementation_version
            user_info.append(version)
        ac.user_information = user_info + list(role_items)
        pdu = A_ASSOCIATE_AC()
        pdu.from_primitive(ac)
        self.assoc = Association(
            calling_aet=calling, called_aet=called, address=self.address[0], port=self.address[1],
            session=self.handler.new_session(), peer_max_pdu=peer_max,
            contexts={int(cast(int, cx.context_id)): (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
                      for cx in results if cx.result == 0x00})
        self.sock.sendall(pdu.encode())
        log.info("association from %s accepted (%d of %d presentation contexts)", self.assoc.peer,
                 len(self.assoc.contexts), len(results))
        self.handler.accepted(self.assoc)
        return self.assoc

    # ----------------------------------------------------------------------------------------- data transfer

    def _p_data(self, length: int) -> None:
        assoc = cast(Association[Any], self.assoc)
        remaining = length
        if remaining < 6:
            raise ProtocolError("P-DATA-TF without a presentation data value", ABORT_INVALID_PARAMETER)
        while remaining:
            if remaining < 6:
                raise ProtocolError("P-DATA-TF ends inside a PDV header", ABORT_INVALID_PARAMETER)
            item_length, context_id, control = _PDV_HEADER.unpack(self.reader.read(6))
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError(f"PDV length {item_length} does not fit its PDU", ABORT_INVALID_PARAMETER)
            remaining -= 4 + item_length
            size = item_length - 2
            if context_id not in assoc.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted",
                                    ABORT_INVALID_PARAMETER)
            if control & 1:
                self._command_fragment(context_id, size, bool(control & 2))
            else:
                self._data_fragment(context_id, size, bool(control & 2))

    def _command_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self.pending is not None:
            raise ProtocolError("a command set arrived before the previous message's data set ended",
                                ABORT_UNEXPECTED_PDU)
        if self.command and context_id != self.command_context:
            raise ProtocolError("command fragments on different presentation contexts", ABORT_INVALID_PARAMETER)
        if len(self.command) + size > MAX_COMMAND_SET:
            raise ProtocolError("command set larger than 64 KiB", ABORT_INVALID_PARAMETER)
        self.command_context = context_id
        self.command += self.reader.read(size)
        if last:
            cmd = decode_command(self.command)
            self.command = bytearray()
            self._command(context_id, cmd)

    def _data_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self.pending is None:
            raise ProtocolError("a data set fragment arrived without a command announcing it", ABORT_UNEXPECTED_PDU)
        if context_id != self.sink_context:
            raise ProtocolError("data set on a different presentation context than its command",
                                ABORT_INVALID_PARAMETER)
        self.reader.stream(size, self.sink.write if self.sink is not None else _discard)
        if last:
            cmd, self.pending = self.pending, None
            sink, self.sink = self.sink, None
            self._answer_with_data(context_id, cmd, sink)

    def _command(self, context_id: int, cmd: dict[int, bytes]) -> None:
        assoc = cast(Association[Any], self.assoc)
        field_ = _cmd_us(cmd, 0x00000100)
        has_data = _cmd_us(cmd, 0x00000800, NO_DATA_SET) != NO_DATA_SET
        if field_ & 0x8000:
            log.warning("%s sent a DIMSE response (0x%04X) to an SCP; ignored", assoc.peer, field_)
            return
        if field_ == C_CANCEL_RQ:
            return  # nothing of ours can be cancelled: C-STORE and C-ECHO answer at once
        message_id = _cmd_us(cmd, 0x00000110)
        sop_class, sop_instance = _cmd_uid(cmd, 0x00000002), _cmd_uid(cmd, 0x00001000)
        if field_ == C_ECHO_RQ and not has_data:
            status = SUCCESS if sop_class is not None else MISTYPED_ARGUMENT
            self._send_command(context_id, encode_response(C_ECHO_RQ, message_id, status, sop_class or VERIFICATION,
                                                           comment="invalid Affected SOP Class UID"))
            return
        if not has_data:
            status = CANNOT_UNDERSTAND if field_ == C_STORE_RQ else UNRECOGNIZED_OPERATION
            self._send_command(context_id, encode_response(field_, message_id, status, sop_class or "",
                                                           sop_instance or ""))
            return
        self.pending, self.sink_context, self.refusal = cmd, context_id, None
        if field_ != C_STORE_RQ:
            return
        if sop_class is None or not sop_instance:
            which = "Class" if sop_class is None else "Instance"
            self.refusal = (CANNOT_UNDERSTAND, f"invalid Affected SOP {which} UID")
            log.warning("C-STORE from %s refused with 0x%04X: %s", assoc.peer, CANNOT_UNDERSTAND, self.refusal[1])
            return
        abstract, transfer_syntax = assoc.contexts[context_id]
        request = StoreRequest(
            message_id=message_id, sop_class_uid=sop_class or abstract, sop_instance_uid=sop_instance,
            transfer_syntax=transfer_syntax, context_id=context_id, priority=_cmd_us(cmd, 0x00000700, 0),
            move_originator_aet=_cmd_text(cmd, 0x00001030))
        self.sink = self.handler.open_store(assoc, request)

    def _answer_with_data(self, context_id: int, cmd: dict[int, bytes], sink: DataSink | None) -> None:
        field_ = _cmd_us(cmd, 0x00000100)
        message_id = _cmd_us(cmd, 0x00000110)
        sop_class, sop_instance = _cmd_uid(cmd, 0x00000002) or "", _cmd_uid(cmd, 0x00001000) or ""
        if sink is not None:
            status, comment = sink.finish()
        elif self.refusal is not None:
            status, comment = self.refusal
        else:
            status, comment = UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE are served here"
        self._send_command(context_id, encode_response(field_, message_id, status, sop_class, sop_instance, comment))
        if sink is not None:
            self.handler.answered(cast(Association[Any], self.assoc))

    def _send_command(self, context_id: int, command: bytes) -> None:
        assoc = cast(Association[Any], self.assoc)
        self.sock.sendall(b"".join(pdata_pdus(context_id, command, True, assoc.peer_max_pdu)))


# -------------------------------------------------------------------------------------------------- server


class UpperLayerServer:
    """Accepts connections and runs each association in its own thread with :class:`_Acceptor`.

    ``prepare`` (optional) is called with each accepted socket and its address and returns the socket to use
    (TLS wrapping, socket options) or None to drop the connection.
    """

    def __init__(self, settings: AcceptorSettings, handler: StorageHandler[Any],
                 supported_contexts: list[PresentationContext], listener: socket.socket,
                 prepare: Callable[[socket.socket, tuple[str, int]], socket.socket | None] | None = None) -> None:
        self.settings = settings
        self.handler = handler
        self.supported_contexts = supported_contexts
        self.listener = listener
        self.prepare = prepare
        self._lock = threading.Lock()
        self._active = 0
        self._accepted = 0  # connections accepted and not yet closed (negotiating or not)
        self._connections: set[socket.socket] = set()
        self._stopping = threading.Event()

    @property
    def server_address(self) -> tuple[str, int]:
        return cast(tuple[str, int], self.listener.getsockname()[:2])

    def reserve_slot(self) -> bool:
        """Take one of ``max_associations`` slots (an acceptor, while negotiating); False when none is free."""
        with self._lock:
            if self._active >= self.settings.max_associations:
                return False
            self._active += 1
            return True

    def active_associations(self) -> int:
        with self._lock:
            return self._active

    def serve_forever(self) -> None:
        listener = self.listener
        listener.setblocking(False)  # readiness comes from poll; another receiver may take the connection first
        poller = select.poll()
        poller.register(listener, select.POLLIN)
        while not self._stopping.is_set():
            if not poller.poll(500):
                continue
            if self.settings.yield_per_connection:
                with self._lock:
                    busy = self._accepted
                if busy:  # every receiver woke up for this connection: let the idler ones take it first
                    time.sleep(min(busy, 10) * self.settings.yield_per_connection)
            try:
                sock, address = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue  # taken by another receiver process
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            with self._lock:
                self._accepted += 1
            threading.Thread(target=self._connection, args=(sock, address), daemon=True,
                             name=f"assoc-{address[0]}:{address[1]}").start()

    def _connection(self, sock: socket.socket, address: tuple[str, int]) -> None:
        acceptor: _Acceptor | None = None
        try:
            sock.settimeout(None)
            prepared = self.prepare(sock, address) if self.prepare else sock
            if prepared is None:
                sock.close()
                return
            sock = prepared
            with self._lock:
                self._connections.add(sock)
            acceptor = _Acceptor(self, sock, address)
            acceptor.run()
        except Exception:
            log.exception("connection from %s failed", address[0])
        finally:
            with self._lock:
                self._accepted -= 1
                self._connections.discard(sock)
                if acceptor is not None and acceptor.has_slot:
                    self._active -= 1
            try:
                sock.close()
            except OSError:
                pass

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting; give open associations ``grace`` seconds to finish, then cut them."""
        self._stopping.set()
        try:
            self.listener.close()
        except OSError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._connections:
                    return
            time.sleep(0.05)
        with self._lock:
            open_now = list(self._connections)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the association thread's recv
            except OSError:
                pass
