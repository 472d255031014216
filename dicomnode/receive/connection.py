"""The connection loop: one thread per receiver accepts connections and holds every connection that is not
associated in one selector, without a thread or a read buffer of its own.

Such a connection is in one of three phases, each bounded by the ARTIM deadline (``acse_timeout`` seconds,
PS3.8 Sta2/Sta13): a TLS handshake, waiting for the A-ASSOCIATE-RQ (Sta2: it is gathered as it arrives, never
more than it claims and never more than :data:`~dicomnode.receive.pdu.MAX_ASSOCIATE_RQ`), or waiting for the
peer to close after an A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT (Sta13). A connection at its deadline is closed
(Evt18), however slowly bytes trickle in. At most ``max_pending`` such connections are held: a new one beyond
that closes the held one nearest its deadline at once (a well-behaved peer sends its A-ASSOCIATE-RQ within
milliseconds of connecting, so the connection that loses its place is a slow one).

An accepted request gets an association slot (``max_associations``, else A-ASSOCIATE-RJ transient, local limit
exceeded), the A-ASSOCIATE-AC, and a thread of its own (:mod:`.association`) that gives the connection back
here in Sta13. What a peer does wrong before it is associated is logged as one line per peer address per
minute (:class:`PeerLog`), never with a traceback.
"""

from __future__ import annotations

import logging
import selectors
import socket
import ssl
import threading
import time
from typing import Any

from dicomnode.receive.acse import decode_associate_rq
from dicomnode.receive.association import Associations
from dicomnode.receive.fsm import Action, Event, State, pdu_event, transition
from dicomnode.receive.negotiation import Acceptance, Capabilities, Rejection, negotiate
from dicomnode.receive.pdu import (
    ABORT_UNEXPECTED_PDU,
    REJECT_LOCAL_LIMIT,
    SOURCE_PROVIDER,
    SOURCE_USER,
    Pdu,
    PduSplitter,
    abort_pdu,
    reject_pdu,
)
from dicomnode.receive.upper_layer import AcceptorSettings, Association, StorageHandler

log = logging.getLogger(__name__)

_READS_PER_TURN = 16


class PeerLog:
    """One log line per peer address per ``interval`` seconds; the lines held back are counted in the next."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, address: str, message: str, *args: object) -> None:
        now = time.monotonic()
        last, held = self._last.get(address, (-self.interval, 0))
        if now - last < self.interval:
            self._last[address] = (last, held + 1)
            return
        if len(self._last) > 4096:  # forget quiet peers; the map stays small whatever the peers do
            self._last = {a: v for a, v in self._last.items() if now - v[0] < self.interval}
        self._last[address] = (now, 0)
        suffix = f" ({held} similar line(s) from this peer held back)" if held else ""
        log.warning(message + suffix, *args)


class _Pending:
    """A connection with no association: TLS handshake, Sta2 or Sta13, and its ARTIM deadline."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], deadline: float, handshake: bool) -> None:
        self.sock, self.address, self.deadline = sock, address, deadline
        self.handshake = handshake
        self.state = State.STA2
        self.splitter = PduSplitter(want_rq=True)
        self.out = b""  # bytes still to send (A-ASSOCIATE-RJ, A-ABORT)


class UpperLayerServer:
    """Accepts connections on ``listener`` (shared by every receiver process) and runs the upper layer."""

    def __init__(self, settings: AcceptorSettings, handler: StorageHandler[Any], capabilities: Capabilities,
                 listener: socket.socket, ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings, self.handler, self.capabilities = settings, handler, capabilities
        self.listener, self.ssl_context = listener, ssl_context
        self.peer_log = PeerLog()
        self.associations = Associations(settings.max_associations, handler, settings.network_timeout,
                                         self._give_back)
        self._lock = threading.Lock()  # guards _returned
        self._pending: dict[socket.socket, _Pending] = {}  # touched by the loop thread only
        self._again: set[_Pending] = set()  # to read again next turn without waiting for readiness
        self._returned: list[tuple[socket.socket, bool]] = []  # handed back in Sta13 (socket, aligned)
        self._stopping = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    @property
    def server_address(self) -> tuple[str, int]:
        return tuple(self.listener.getsockname()[:2])

    def active_associations(self) -> int:
        return self.associations.active()

    def pending_connections(self) -> int:
        return len(self._pending)

    def _artim(self) -> float:
        return time.monotonic() + (self.settings.acse_timeout if self.settings.acse_timeout is not None else 1e9)

    # -------------------------------------------------------------------------------------------- the loop

    def serve_forever(self) -> None:
        self.listener.setblocking(False)  # readiness comes from select; another receiver may take it first
        self._selector.register(self.listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                self._turn()
        finally:
            self._close_all()

    def _turn(self) -> None:
        deadlines = [p.deadline for p in self._pending.values()]
        timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.5
        again, self._again = self._again, set()
        for pending in again:
            if pending.sock in self._pending:
                self._service(pending, selectors.EVENT_READ)
        for key, mask in self._selector.select(0.0 if self._again else min(timeout, 0.5)):
            if key.fileobj is self.listener:
                self._accept()
            elif key.fileobj is self._wake_r:
                self._take_returned()
            else:
                pending = self._pending.get(key.fileobj)  # type: ignore[call-overload]
                if pending is not None:
                    self._service(pending, mask)
        now = time.monotonic()
        for pending in [p for p in self._pending.values() if p.deadline <= now]:
            self._expire(pending)

    def _accept(self) -> None:
        if self.settings.yield_per_connection:
            busy = self.associations.active()
            if busy:  # every receiver woke up for this connection: let the idler ones take it first
                time.sleep(min(busy, 10) * self.settings.yield_per_connection)
        try:
            sock, address = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return  # taken by another receiver process
        except OSError:
            if self._stopping.is_set():
                return
            raise
        self._connected(sock, address)

    def _connected(self, sock: socket.socket, address: tuple[str, int]) -> None:
        """Evt5 in Sta1: AE-5, unless the host is not allowed."""
        transition(State.STA1, Event.EVT5)
        if self.settings.allowed_hosts and address[0] not in self.settings.allowed_hosts:
            self.peer_log.warning(address[0], "connection from %s refused: host not in node.allowed_hosts",
                                  address[0])
            self.handler.refused(address[0], "host-not-allowed")
            sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        handshake = self.ssl_context is not None
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        if len(self._pending) >= self.settings.max_pending:
            victim = min(self._pending.values(), key=lambda p: p.deadline)
            self.peer_log.warning(victim.address[0], "connection from %s closed early: %d connections without"
                                  " an association (node.max_pending_connections)", victim.address[0],
                                  len(self._pending))
            self.handler.refused(victim.address[0], "too-many-pending-connections")
            self._close(victim)
        self._hold(_Pending(sock, address, self._artim(), handshake))

    def _hold(self, pending: _Pending) -> None:
        self._pending[pending.sock] = pending
        self._selector.register(pending.sock, selectors.EVENT_READ)

    def _close(self, pending: _Pending) -> None:
        self._pending.pop(pending.sock, None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        try:
            pending.sock.close()
        except OSError:
            pass

    def _expire(self, pending: _Pending) -> None:
        """Evt18 (ARTIM) in Sta2 or Sta13: AA-2, close."""
        if pending.state is State.STA2:
            self.peer_log.warning(pending.address[0], "connection from %s closed: no A-ASSOCIATE-RQ within"
                                  " node.acse_timeout", pending.address[0])
            self.handler.refused(pending.address[0], "artim-timeout")
        transition(pending.state, Event.EVT18)
        self._close(pending)

    # ------------------------------------------------------------------------------- one pending connection

    def _service(self, pending: _Pending, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._flush(pending)
            if pending.handshake and not self._handshake(pending):
                return
            if mask & selectors.EVENT_READ or isinstance(pending.sock, ssl.SSLSocket):
                self._read(pending)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            pass
        except OSError as exc:
            if pending.state is State.STA2:
                self.peer_log.warning(pending.address[0], "connection from %s failed: %s", pending.address[0], exc)
            self._close(pending)
        except Exception:  # a defect of ours: this connection goes, the loop and every other connection stay
            log.exception("connection from %s closed after an internal error", pending.address[0])
            self._close(pending)

    def _handshake(self, pending: _Pending) -> bool:
        sock = pending.sock
        if not isinstance(sock, ssl.SSLSocket):
            return True
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._selector.modify(sock, selectors.EVENT_READ)
            return False
        except ssl.SSLWantWriteError:
            self._selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            return False
        except (OSError, ValueError) as exc:
            self.peer_log.warning(pending.address[0], "TLS handshake with %s failed: %s", pending.address[0], exc)
            self.handler.refused(pending.address[0], "tls-handshake")
            self._close(pending)
            return False
        pending.handshake = False
        self._selector.modify(sock, selectors.EVENT_READ)
        return True

    def _read(self, pending: _Pending) -> None:
        for _ in range(_READS_PER_TURN):  # a peer sending without pause cannot hold the loop
            if pending.sock not in self._pending:
                return
            data = pending.sock.recv(pending.splitter.wanted())
            if not data:  # Evt17: AA-5 in Sta2, AR-5 in Sta13
                transition(pending.state, Event.EVT17)
                self._close(pending)
                return
            if pending.splitter.broken:
                continue  # Sta13 after a PDU that cannot be followed: drain until the peer closes
            for pdu in pending.splitter.feed(data):
                if pending.sock not in self._pending or self._pdu(pending, pdu):
                    return
        self._again.add(pending)  # the budget is spent, bytes may be waiting (in the socket or in TLS)

    def _pdu(self, pending: _Pending, pdu: Pdu) -> bool:
        """Take the PDU's transition; True when the connection left the loop (closed or associated)."""
        event = Event.EVT19 if pdu.error is not None else pdu_event(pdu.pdu_type)
        action, pending.state = transition(pending.state, event)
        if action is Action.AE6:
            return self._associate(pending, pdu.body or b"")
        if action is Action.AA1:
            why = pdu.error or f"PDU type 0x{pdu.pdu_type:02X} before an A-ASSOCIATE-RQ"
            self.peer_log.warning(pending.address[0], "aborting connection from %s: %s", pending.address[0], why)
            self._abort(pending, SOURCE_USER, 0)
        elif action is Action.AA7:
            self._abort(pending, SOURCE_PROVIDER, pdu.error.reason if pdu.error else ABORT_UNEXPECTED_PDU)
        elif action is Action.AA2:
            self._close(pending)
            return True
        return False

    def _abort(self, pending: _Pending, source: int, reason: int) -> None:
        """Send an A-ABORT and (re)start ARTIM in Sta13 (the splitter goes on: the rest of the PDU is skipped)."""
        pending.splitter.want_rq = False
        pending.deadline = self._artim()
        self._send(pending, abort_pdu(source, reason))

    def _send(self, pending: _Pending, data: bytes) -> None:
        pending.out += data
        self._flush(pending)

    def _flush(self, pending: _Pending) -> None:
        try:
            while pending.out:
                pending.out = pending.out[pending.sock.send(pending.out):]
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            pass
        wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending.out else 0)
        if pending.sock in self._pending:
            self._selector.modify(pending.sock, wanted)

    # ----------------------------------------------------------------------------------------- association

    def _associate(self, pending: _Pending, body: bytes) -> bool:
        """AE-6: judge the A-ASSOCIATE-RQ; accept (AE-7, to a thread) or reject (AE-8, Sta13)."""
        address = pending.address[0]
        try:
            request = decode_associate_rq(body)
        except Exception as exc:  # a malformed request: Evt19 in Sta2 (the codec raises ProtocolError)
            self.peer_log.warning(address, "aborting connection from %s: malformed A-ASSOCIATE-RQ: %s",
                                  address, exc)
            pending.state = transition(State.STA2, Event.EVT19)[1]
            self._abort(pending, SOURCE_USER, 0)
            return False
        verdict = negotiate(request, self.settings, self.capabilities)
        if isinstance(verdict, Acceptance) and not self.associations.reserve():
            verdict = Rejection(REJECT_LOCAL_LIMIT, "local-limit-exceeded")
        if isinstance(verdict, Rejection):
            self.peer_log.warning(address, "association from %s@%s rejected: %s", request.calling_ae, address,
                                  verdict.why)
            self.handler.rejected(address, request.calling_ae, verdict.why)
            pending.state = transition(State.STA3, Event.EVT8)[1]
            pending.splitter.want_rq = False
            pending.deadline = self._artim()
            self._send(pending, reject_pdu(*verdict.reject))
            return False
        pending.state = transition(State.STA3, Event.EVT7)[1]
        assoc: Association[Any] = Association(
            calling_aet=request.calling_ae, called_aet=request.called_ae, address=address,
            port=pending.address[1], session=self.handler.new_session(), peer_max_pdu=request.max_pdu,
            contexts=verdict.contexts, user=verdict.user)
        self._pending.pop(pending.sock, None)
        self._selector.unregister(pending.sock)
        log.info("association from %s accepted (%d of %d presentation contexts)", assoc.peer,
                 len(assoc.contexts), verdict.proposed)
        self.associations.start(pending.sock, assoc, pending.out + verdict.ac_pdu)
        return True

    def _give_back(self, sock: socket.socket, aligned: bool) -> None:
        with self._lock:
            self._returned.append((sock, aligned))
        try:
            self._wake_w.send(b"\x00")
        except OSError:
            pass  # the loop is already awake (full pipe) or stopping

    def _take_returned(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        with self._lock:
            returned, self._returned = self._returned, []
        for sock, aligned in returned:
            try:
                sock.setblocking(False)
                address = sock.getpeername()[:2]
            except OSError:
                sock.close()
                continue
            pending = _Pending(sock, address, self._artim(), handshake=False)
            pending.state, pending.splitter = State.STA13, PduSplitter(want_rq=False)
            pending.splitter.broken = not aligned  # cut mid-PDU: drain until the peer closes or ARTIM
            self._hold(pending)

    # ------------------------------------------------------------------------------------------ shutdown

    def _close_all(self) -> None:
        for pending in list(self._pending.values()):
            self._close(pending)
        for sock in (self.listener, self._wake_r, self._wake_w):
            try:
                sock.close()
            except OSError:
                pass
        self._selector.close()

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop accepting; give open associations ``grace`` seconds to finish, then cut them."""
        self._stopping.set()
        try:
            self._wake_w.send(b"\x00")
        except OSError:
            pass
        self.associations.stop(grace)
