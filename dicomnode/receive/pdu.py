"""PDU framing of the DICOM upper layer (PS3.8 9.3): types, limits, the PDUs the acceptor sends, and a splitter
that cuts an untrusted byte stream into PDUs without trusting a length it has not checked.

Every length a peer sends is checked against a limit before anything is allocated for it: an A-ASSOCIATE-RQ
of at most :data:`MAX_ASSOCIATE_RQ` bytes, the short PDUs (release, abort, reject) of at most
:data:`MAX_SHORT_PDU`; P-DATA-TF bodies are never buffered whole (the association thread streams them, the
connection loop skips them).

:class:`Reader` reads an association's PDUs against a deadline that only progress moves on: a peer cannot hold
a connection by trickling bytes, however short each wait for the next byte is.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

# PDU types (PS3.8 9.3.1)
ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT = 1, 2, 3, 4, 5, 6, 7
KNOWN_TYPES = frozenset((ASSOCIATE_RQ, ASSOCIATE_AC, ASSOCIATE_RJ, P_DATA_TF, RELEASE_RQ, RELEASE_RP, ABORT))

# A-ABORT source (PS3.8 9.3.8) and the reasons this node gives as service provider
SOURCE_USER, SOURCE_PROVIDER = 0, 2
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0, 1, 2
ABORT_UNRECOGNIZED_PARAMETER, ABORT_UNEXPECTED_PARAMETER, ABORT_INVALID_PARAMETER = 4, 5, 6

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

MAX_ASSOCIATE_RQ = 1024 * 1024  # 128 presentation contexts with many transfer syntaxes take ~100 KB
MAX_SHORT_PDU = 1024  # release, abort, reject: 4 bytes each by the standard
PDU_HEADER = struct.Struct(">BxL")
PDV_HEADER = struct.Struct(">LBB")


class ProtocolError(Exception):
    """The peer broke the protocol; the association is aborted with ``reason`` (PS3.8 A-ABORT reasons)."""

    def __init__(self, message: str, reason: int = ABORT_NOT_SPECIFIED) -> None:
        super().__init__(message)
        self.reason = reason


def check_header(pdu_type: int, length: int) -> None:
    """Refuse a PDU header before its body is read: an unknown type, or a length over its type's limit."""
    if pdu_type not in KNOWN_TYPES:
        raise ProtocolError(f"unrecognised PDU type 0x{pdu_type:02X}", ABORT_UNRECOGNIZED_PDU)
    if pdu_type == ASSOCIATE_RQ and length > MAX_ASSOCIATE_RQ:
        raise ProtocolError(f"A-ASSOCIATE-RQ of {length} bytes", ABORT_INVALID_PARAMETER)
    if pdu_type not in (P_DATA_TF, ASSOCIATE_RQ, ASSOCIATE_AC) and length > MAX_SHORT_PDU:
        raise ProtocolError(f"PDU type 0x{pdu_type:02X} claims {length} bytes", ABORT_INVALID_PARAMETER)


def abort_pdu(source: int, reason: int) -> bytes:
    """A-ABORT; the reason is only significant (and only sent) when the source is the service provider."""
    return PDU_HEADER.pack(ABORT, 4) + bytes((0, 0, source, reason if source == SOURCE_PROVIDER else 0))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return PDU_HEADER.pack(ASSOCIATE_RJ, 4) + bytes((0, result, source, reason))


RELEASE_RP_PDU = PDU_HEADER.pack(RELEASE_RP, 4) + b"\x00\x00\x00\x00"


def pdata_pdus(context_id: int, payload: bytes, is_command: bool, peer_max_pdu: int) -> list[bytes]:
    """P-DATA-TF PDUs carrying ``payload`` as one message part, split to fit the peer's maximum PDU length
    (``peer_max_pdu``, 0 = unlimited; it counts the PDV items, not the 6-byte PDU header: PS3.8 D.1)."""
    room = len(payload) if peer_max_pdu <= 0 else max(peer_max_pdu - 6, 1)  # PDV header: 4 length + id + control
    pdus, offset = [], 0
    while True:
        chunk = payload[offset:offset + room]
        offset += len(chunk)
        last = offset >= len(payload)
        control = (1 if is_command else 0) | (2 if last else 0)
        pdv = PDV_HEADER.pack(len(chunk) + 2, context_id, control) + chunk
        pdus.append(PDU_HEADER.pack(P_DATA_TF, len(pdv)) + pdv)
        if last:
            return pdus


@dataclass(frozen=True)
class Pdu:
    """One PDU as the splitter saw it: ``body`` only for an A-ASSOCIATE-RQ (the one body the connection loop
    needs); ``error`` names why it is invalid (then the stream cannot be followed any further)."""

    pdu_type: int
    length: int
    body: bytes | None = None
    error: ProtocolError | None = None


class PduSplitter:
    """Cuts a byte stream into PDUs as bytes arrive, in any pieces. Bodies are skipped, except an
    A-ASSOCIATE-RQ's, which is gathered (at most :data:`MAX_ASSOCIATE_RQ` bytes) only when ``want_rq``; memory
    grows with the bytes the peer actually sent, never with a length it claims."""

    def __init__(self, want_rq: bool) -> None:
        self.want_rq = want_rq
        self._head = bytearray()
        self._body = bytearray()
        self._current: tuple[int, int] | None = None  # (type, length) of the PDU whose body is arriving
        self._skip = 0
        self.broken = False

    def wanted(self, most: int = 65536) -> int:
        """How many bytes to read next so that no read runs past the end of an A-ASSOCIATE-RQ (what follows it
        belongs to the association's thread): the rest of the header, the rest of the RQ, or up to ``most``."""
        current = self._current
        if current is None:
            return 6 - len(self._head)
        if current[0] == ASSOCIATE_RQ and self.want_rq:
            return current[1] - len(self._body)
        return max(1, min(self._skip, most))

    def feed(self, data: bytes | memoryview) -> list[Pdu]:
        out: list[Pdu] = []
        view = memoryview(data)
        while view and not self.broken:
            current = self._current
            if current is not None:
                view = self._body_bytes(current, view, out)
                continue
            take = min(6 - len(self._head), len(view))
            self._head += view[:take]
            view = view[take:]
            if len(self._head) == 6:
                out.extend(self._header())
        return out

    def _header(self) -> list[Pdu]:
        pdu_type, length = PDU_HEADER.unpack(self._head)
        self._head.clear()
        try:
            check_header(pdu_type, length)
        except ProtocolError as exc:
            self.broken = True
            return [Pdu(pdu_type, length, error=exc)]
        if pdu_type == ASSOCIATE_RQ and self.want_rq:
            self._current = (pdu_type, length)
            return [] if length else [self._finish()]
        self._skip = length
        self._current = (pdu_type, length) if length else None
        return [Pdu(pdu_type, length)]

    def _body_bytes(self, current: tuple[int, int], view: memoryview, out: list[Pdu]) -> memoryview:
        pdu_type, length = current
        if pdu_type == ASSOCIATE_RQ and self.want_rq:
            take = min(length - len(self._body), len(view))
            self._body += view[:take]
            if len(self._body) == length:
                out.append(self._finish())
            return view[take:]
        take = min(self._skip, len(view))
        self._skip -= take
        if not self._skip:
            self._current = None
        return view[take:]

    def _finish(self) -> Pdu:
        pdu_type, length = self._current or (ASSOCIATE_RQ, 0)
        body, self._body = bytes(self._body), bytearray()
        self._current = None
        return Pdu(pdu_type, length, body=body)


# ------------------------------------------------------------------------------------ reading, with deadline


READ_BUFFER = 1024 * 1024
PROGRESS_BYTES = 64 * 1024  # data that counts as progress for the network_timeout deadline


class PeerClosed(Exception):
    """The transport connection closed under us (Evt17)."""


class DeadlineExceeded(Exception):
    """The association made no progress within network_timeout (a local A-ABORT request, Evt15)."""


class Reader:
    """Buffered exact reads from a socket against a deadline that progress moves on."""

    def __init__(self, sock: socket.socket, window: float | None, size: int = READ_BUFFER) -> None:
        self.sock, self.window, self.size = sock, window, size
        self.buf = bytearray()
        self.view = memoryview(self.buf)
        self.start = self.end = 0
        self.progress = 0
        self.deadline = 0.0
        self.restart()

    def restart(self) -> None:
        """The peer made progress: the deadline is ``window`` from now."""
        self.progress = 0
        self.deadline = time.monotonic() + self.window if self.window is not None else float("inf")

    def _fill(self) -> None:
        if not self.buf:
            self.buf = bytearray(self.size)  # allocated when the first PDU arrives, not at connection
            self.view = memoryview(self.buf)
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buf):  # keep the unread tail, make room after it
            tail = self.end - self.start
            self.buf[:tail] = self.buf[self.start:self.end]
            self.start, self.end = 0, tail
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("network timeout: no progress")
        try:
            self.sock.settimeout(min(left, 3600.0))
            n = self.sock.recv_into(self.view[self.end:])
        except TimeoutError as exc:
            raise DeadlineExceeded("network timeout: no progress") from exc
        except OSError as exc:
            raise PeerClosed(f"connection error: {exc}") from exc
        if n == 0:
            raise PeerClosed("the peer closed the connection")
        self.end += n
        self.progress += n
        if self.progress >= PROGRESS_BYTES:
            self.restart()

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
