"""The data phase of one accepted association (PS3.8 Sta6 and Sta8), run start to end in its own thread.

PDUs are read through one buffer (allocated when the first PDU arrives) with large ``recv_into`` calls;
P-DATA-TF PDVs (PS3.8 9.3.5) are walked in place; data set fragments go to the handler's
:class:`~dicomnode.receive.upper_layer.DataSink` as they arrive. Every PDU is an event of the state table
(:mod:`.fsm`) and the table's action is what happens; the association ends in Sta1 (the connection is closed)
or in Sta13 (the connection goes back to the connection loop, which waits for the peer to close until ARTIM).

``network_timeout`` is a deadline, not a per-read timeout (see :class:`~dicomnode.receive.pdu.Reader`): the
association must make progress (a complete DIMSE message, or 64 KiB of data) within it, else it is aborted
(Evt15). A peer trickling one byte every few seconds is cut at the deadline; a large data set on a slow link
goes on.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from dicomnode.receive.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    CANNOT_UNDERSTAND,
    MAX_COMMAND_SET,
    MISTYPED_ARGUMENT,
    SUCCESS,
    UNRECOGNIZED_OPERATION,
    VERIFICATION,
    Command,
    encode_response,
    parse_command,
)
from dicomnode.receive.fsm import Action, Event, State, pdu_event, transition
from dicomnode.receive.pdu import (
    ABORT_INVALID_PARAMETER,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    PDU_HEADER,
    PDV_HEADER,
    RELEASE_RP_PDU,
    SOURCE_PROVIDER,
    SOURCE_USER,
    DeadlineExceeded,
    PeerClosed,
    ProtocolError,
    Reader,
    abort_pdu,
    check_header,
    pdata_pdus,
)
from dicomnode.receive.upper_layer import Association, DataSink, StorageHandler, StoreRequest

log = logging.getLogger(__name__)

def _discard(_: memoryview) -> None:
    return None


class AssociationRunner:
    """Sta6 to the end of one association; :meth:`run` returns the state it ended in (Sta1 or Sta13)."""

    def __init__(self, sock: socket.socket, assoc: Association[Any], handler: StorageHandler[Any],
                 network_timeout: float | None) -> None:
        self.sock, self.assoc, self.handler = sock, assoc, handler
        self.send_timeout = network_timeout
        self.reader = Reader(sock, network_timeout)
        self.state = State.STA6
        self.command = bytearray()  # command set fragments of the message being received
        self.command_context = 0
        self.pending: Command | None = None  # decoded command whose data set is arriving
        self.sink: DataSink | None = None
        self.sink_context = 0
        self.refusal: tuple[int, str] | None = None  # the pending C-STORE was refused before its data set came
        self.released_cleanly = False  # ended by A-RELEASE-RP with nothing read past the A-RELEASE-RQ

    @property
    def aligned(self) -> bool:
        """The byte stream is at a PDU boundary with nothing read ahead: the connection loop can go on
        reading PDUs from it in Sta13 (otherwise it only drains it)."""
        return self.released_cleanly and self.reader.start == self.reader.end

    def run(self) -> State:
        try:
            while self.state is State.STA6:
                self._next_pdu()
        except PeerClosed as exc:
            self._step(Event.EVT17)
            log.warning("association with %s ended without release: %s", self.assoc.peer, exc)
        except DeadlineExceeded as exc:
            log.warning("aborting association with %s: %s", self.assoc.peer, exc)
            self._step(Event.EVT15)
        except ProtocolError as exc:
            log.warning("aborting association with %s: %s", self.assoc.peer, exc)
            self._step(Event.EVT19, exc.reason)
        except Exception:
            log.exception("aborting association with %s after an internal error", self.assoc.peer)
            self._step(Event.EVT15)
        finally:
            self._end()
        return self.state

    def _end(self) -> None:
        if self.sink is not None:
            self.sink.abandon()
            self.sink = None
        try:
            if not self.assoc.released:
                self.handler.aborted(self.assoc)
        finally:
            self.handler.ended(self.assoc)

    def _step(self, event: Event, reason: int = ABORT_NOT_SPECIFIED) -> Action:
        """Take ``event``'s transition; the actions that only send or close are done here."""
        action, self.state = transition(self.state, event)
        if action is Action.AA1:
            self._send_quietly(abort_pdu(SOURCE_USER, 0))
        elif action in (Action.AA8, Action.AA7):
            self._send_quietly(abort_pdu(SOURCE_PROVIDER, reason))
        return action

    def _send_quietly(self, data: bytes) -> None:
        try:
            self.sock.settimeout(1.0)  # an abort is best effort; the peer may be gone or not reading
            self.sock.sendall(data)
        except OSError:
            pass

    def _send(self, data: bytes) -> None:
        try:
            self.sock.settimeout(self.send_timeout)
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise DeadlineExceeded("network timeout: the peer does not read") from exc
        except OSError as exc:
            raise PeerClosed(f"connection error: {exc}") from exc

    def _next_pdu(self) -> None:
        pdu_type, length = PDU_HEADER.unpack(self.reader.read(6))
        check_header(pdu_type, length)  # ProtocolError: Evt19
        action = self._step(pdu_event(pdu_type), ABORT_UNEXPECTED_PDU)
        if action is Action.DT2:
            self._p_data(length)
        elif action is Action.AR2:
            self.reader.read(length)
            self._release()
        elif action is Action.AA3:
            body = self.reader.read(length)
            source = body[2] if len(body) >= 4 else -1
            log.warning("association with %s aborted by the peer (source %d)", self.assoc.peer, source)

    def _release(self) -> None:
        """Sta8: answer the A-RELEASE-RQ at once (Evt14, AR-4) and go to Sta13."""
        assoc = self.assoc
        if self.sink is not None or self.pending is not None or self.command:
            log.warning("association with %s released in the middle of a message", assoc.peer)
            if self.sink is not None:
                self.sink.abandon()
                self.sink = None
        self._step(Event.EVT14)
        self._send(RELEASE_RP_PDU)
        self.released_cleanly = True
        assoc.released = True
        self.handler.released(assoc)

    # ----------------------------------------------------------------------------------------- P-DATA-TF

    def _p_data(self, length: int) -> None:
        remaining = length
        if remaining < 6:
            raise ProtocolError("P-DATA-TF without a presentation data value", ABORT_INVALID_PARAMETER)
        while remaining:
            if remaining < 6:
                raise ProtocolError("P-DATA-TF ends inside a PDV header", ABORT_INVALID_PARAMETER)
            item_length, context_id, control = PDV_HEADER.unpack(self.reader.read(6))
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError(f"PDV length {item_length} does not fit its PDU", ABORT_INVALID_PARAMETER)
            remaining -= 4 + item_length
            if context_id not in self.assoc.contexts:
                raise ProtocolError(f"PDV on presentation context {context_id}, which was not accepted",
                                    ABORT_INVALID_PARAMETER)
            if control & 1:
                self._command_fragment(context_id, item_length - 2, bool(control & 2))
            else:
                self._data_fragment(context_id, item_length - 2, bool(control & 2))

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
            cmd = parse_command(self.command)
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

    # ------------------------------------------------------------------------------------------------ DIMSE

    def _command(self, context_id: int, cmd: Command) -> None:
        if cmd.is_response:
            log.warning("%s sent a DIMSE response (0x%04X) to an SCP; ignored", self.assoc.peer, cmd.command_field)
            return
        if cmd.command_field == C_CANCEL_RQ:
            return  # nothing of ours can be cancelled: C-STORE and C-ECHO answer at once
        if not cmd.has_data_set:
            self._answer_without_data(context_id, cmd)
            return
        self.pending, self.sink_context, self.refusal = cmd, context_id, None
        if cmd.command_field != C_STORE_RQ:
            return
        if cmd.sop_class_uid is None or not cmd.sop_instance_uid:
            which = "Class" if cmd.sop_class_uid is None else "Instance"
            self.refusal = (CANNOT_UNDERSTAND, f"invalid Affected SOP {which} UID")
            log.warning("C-STORE from %s refused with 0x%04X: %s", self.assoc.peer, CANNOT_UNDERSTAND,
                        self.refusal[1])
            return
        abstract, transfer_syntax = self.assoc.contexts[context_id]
        request = StoreRequest(
            message_id=cmd.message_id, sop_class_uid=cmd.sop_class_uid or abstract,
            sop_instance_uid=cmd.sop_instance_uid, transfer_syntax=transfer_syntax, context_id=context_id,
            priority=cmd.priority, move_originator_aet=cmd.move_originator_aet)
        self.sink = self.handler.open_store(self.assoc, request)

    def _answer_without_data(self, context_id: int, cmd: Command) -> None:
        if cmd.command_field == C_ECHO_RQ:
            status = SUCCESS if cmd.sop_class_uid is not None else MISTYPED_ARGUMENT
            response = encode_response(C_ECHO_RQ, cmd.message_id, status, cmd.sop_class_uid or VERIFICATION,
                                       comment="invalid Affected SOP Class UID")
        else:
            status = CANNOT_UNDERSTAND if cmd.command_field == C_STORE_RQ else UNRECOGNIZED_OPERATION
            response = encode_response(cmd.command_field, cmd.message_id, status, cmd.sop_class_uid,
                                       cmd.sop_instance_uid)
        self._send_command(context_id, response)

    def _answer_with_data(self, context_id: int, cmd: Command, sink: DataSink | None) -> None:
        if sink is not None:
            status, comment = sink.finish()
        elif self.refusal is not None:
            status, comment = self.refusal
        else:
            status, comment = UNRECOGNIZED_OPERATION, "only C-ECHO and C-STORE are served here"
        self._send_command(context_id, encode_response(cmd.command_field, cmd.message_id, status,
                                                       cmd.sop_class_uid, cmd.sop_instance_uid, comment))
        if sink is not None:
            self.handler.answered(self.assoc)

    def _send_command(self, context_id: int, command: bytes) -> None:
        self._step(Event.EVT9)  # DT-1
        self._send(b"".join(pdata_pdus(context_id, command, True, self.assoc.peer_max_pdu)))
        self.reader.restart()  # a DIMSE message answered: progress


class Associations:
    """The association threads of one receiver: at most ``limit`` at a time (one slot each, taken while the
    request is judged), each running :class:`AssociationRunner` and handing its connection to ``give_back``
    when it ends in Sta13 (with whether the stream is still at a PDU boundary)."""

    def __init__(self, limit: int, handler: StorageHandler[Any], network_timeout: float | None,
                 give_back: Callable[[socket.socket, bool], None]) -> None:
        self.limit, self.handler, self.network_timeout, self.give_back = limit, handler, network_timeout, give_back
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._taken = 0
        self.stopping = False

    def active(self) -> int:
        with self._lock:
            return self._taken

    def reserve(self) -> bool:
        """Take a slot for an association about to be accepted; False when all ``limit`` are taken."""
        with self._lock:
            if self._taken >= self.limit:
                return False
            self._taken += 1
            return True

    def start(self, sock: socket.socket, assoc: Association[Any], ac_pdu: bytes) -> None:
        """Run the association (its slot reserved) in a thread of its own, which first sends ``ac_pdu``."""
        with self._lock:
            self._sockets.add(sock)
        self.handler.accepted(assoc)
        threading.Thread(target=self._run, args=(sock, assoc, ac_pdu), daemon=True,
                         name=f"assoc-{assoc.address}:{assoc.port}").start()

    def _run(self, sock: socket.socket, assoc: Association[Any], ac_pdu: bytes) -> None:
        state, aligned = State.STA1, False
        try:
            sock.settimeout(self.network_timeout)
            sock.sendall(ac_pdu)
            runner = AssociationRunner(sock, assoc, self.handler, self.network_timeout)
            state = runner.run()
            aligned = runner.aligned
        except OSError as exc:
            log.warning("association with %s ended: %s", assoc.peer, exc)
            self.handler.aborted(assoc)
            self.handler.ended(assoc)
        finally:
            with self._lock:
                self._taken -= 1
                self._sockets.discard(sock)
            if state is State.STA13 and not self.stopping:
                self.give_back(sock, aligned)
            else:
                sock.close()

    def stop(self, grace: float) -> None:
        """Give running associations ``grace`` seconds to end, then cut their connections."""
        self.stopping = True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with self._lock:
                if not self._sockets:
                    return
            time.sleep(0.05)
        with self._lock:
            open_now = list(self._sockets)
        for sock in open_now:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # unblocks the association thread's recv
            except OSError:
                pass
