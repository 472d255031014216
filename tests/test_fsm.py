"""The acceptor's PS3.8 state machine (dicomnode.receive.fsm), one test per (state, event) pair the acceptor can
meet, driven over a real socket against the SCP in this process, as pynetdicom tests its own fsm. Each test brings
the connection into the state, raises the event with the PDU (or silence, or a close) that makes it, and checks the
table's action on the wire: what the node sends, whether it closes, whether it keeps the connection."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.receive.fsm import TABLE, Action, Event, State, pdu_event, transition
from dicomnode.receive.pdu import pdata_pdus
from tests.peers import wait_until
from tests.scp_peer import Scp, associate_rq, command, read_pdu, status_of

ARTIM = 2.0
CONTEXTS = [(1, CTImageStorage, ImplicitVRLittleEndian), (3, Verification, ImplicitVRLittleEndian)]


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BxL", pdu_type, len(body)) + body


ABORT = _pdu(7, b"\x00\x00\x00\x00")
PDUS: dict[Event, bytes] = {
    Event.EVT3: _pdu(2, b"\x00\x01\x00\x00" + b" " * 64),  # A-ASSOCIATE-AC
    Event.EVT4: _pdu(3, b"\x00\x01\x01\x01"),  # A-ASSOCIATE-RJ
    Event.EVT6: associate_rq(CONTEXTS),  # A-ASSOCIATE-RQ
    Event.EVT10: b"".join(pdata_pdus(3, command(0x0030, 1, Verification), True, 0)),  # P-DATA-TF: C-ECHO-RQ
    Event.EVT12: _pdu(5, b"\x00\x00\x00\x00"),  # A-RELEASE-RQ
    Event.EVT13: _pdu(6, b"\x00\x00\x00\x00"),  # A-RELEASE-RP
    Event.EVT16: ABORT,
    Event.EVT19: _pdu(0x09, b"\x00\x00"),  # no such PDU type
}
QUIET = "nothing sent, connection kept"
CLOSED = "closed"


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Scp]:
    s = Scp(tmp_path, acse_timeout=ARTIM, network_timeout=30)
    yield s
    s.server.shutdown(grace=0.5)


def _connect(s: Scp) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _outcome(sock: socket.socket, wait: float = 0.4) -> tuple[int, bytes] | str:
    """The next PDU the node sends; QUIET when none comes within ``wait`` s; CLOSED when it closes."""
    sock.settimeout(wait)
    try:
        return read_pdu(sock)
    except TimeoutError:
        return QUIET
    except (EOFError, ConnectionResetError):
        return CLOSED
    finally:
        sock.settimeout(5)


def _in_sta6(s: Scp) -> socket.socket:
    sock = _connect(s)
    sock.sendall(PDUS[Event.EVT6])
    assert read_pdu(sock)[0] == 0x02  # Sta2 -Evt6-> AE-6 -> Sta3 -Evt7-> AE-7 (A-ASSOCIATE-AC) -> Sta6
    return sock


def _in_sta13(s: Scp) -> socket.socket:
    sock = _in_sta6(s)
    sock.sendall(PDUS[Event.EVT12])
    assert read_pdu(sock)[0] == 0x06  # Sta6 -Evt12-> AR-2 -> Sta8 -Evt14-> AR-4 (A-RELEASE-RP) -> Sta13
    wait_until(lambda: s.server.pending_connections() == 1, 5, "the connection back in the loop, Sta13")
    return sock


def _still_serving(s: Scp) -> None:
    wait_until(lambda: s.server.active_associations() == 0, 5, "association slots free")
    with _in_sta6(s) as sock:
        sock.sendall(PDUS[Event.EVT10])
        pdu_type, body = read_pdu(sock)
        assert pdu_type == 0x04 and status_of(body) == 0x0000


# ------------------------------------------------------------------------------------------------ the table


def test_table_covers_every_pdu_in_every_reading_state() -> None:
    for state in (State.STA2, State.STA6, State.STA13):
        for pdu_type in range(0, 9):
            assert (state, pdu_event(pdu_type)) in TABLE
        for event in (Event.EVT17, Event.EVT19):
            assert (state, event) in TABLE
    assert pdu_event(0x08) is Event.EVT19 and pdu_event(0x01) is Event.EVT6


def test_a_pair_outside_the_table_is_named() -> None:
    with pytest.raises(KeyError, match="Evt9 in Sta2"):
        transition(State.STA2, Event.EVT9)


# ------------------------------------------------------------------------------------------------ Sta1, Sta2


def test_sta1_evt5_accepts_the_connection_and_starts_artim(scp: Scp) -> None:
    with _connect(scp):
        wait_until(lambda: scp.server.pending_connections() == 1, 5, "connection held in Sta2")
        assert scp.server.active_associations() == 0


@pytest.mark.parametrize("event", [Event.EVT3, Event.EVT4, Event.EVT10, Event.EVT12, Event.EVT13, Event.EVT19])
def test_sta2_unexpected_pdu_aa1_aborts_then_waits_in_sta13(scp: Scp, event: Event) -> None:
    assert transition(State.STA2, event) == (Action.AA1, State.STA13)
    with _connect(scp) as sock:
        sock.sendall(PDUS[event])
        assert _outcome(sock) == (0x07, b"\x00\x00\x00\x00")  # A-ABORT, service-user source
        assert _outcome(sock) == QUIET  # Sta13: the peer is to close
        assert scp.server.pending_connections() == 1
    wait_until(lambda: scp.server.pending_connections() == 0, 5, "Evt17 in Sta13: AR-5")
    _still_serving(scp)


def test_sta2_evt6_ae6_judges_the_request_ae7_accepts(scp: Scp) -> None:
    assert transition(State.STA2, Event.EVT6) == (Action.AE6, State.STA3)
    assert transition(State.STA3, Event.EVT7) == (Action.AE7, State.STA6)
    with _in_sta6(scp):
        wait_until(lambda: scp.server.active_associations() == 1, 5, "association")


def test_sta3_evt8_ae8_rejects_then_waits_in_sta13_until_artim(scp: Scp) -> None:
    assert transition(State.STA3, Event.EVT8) == (Action.AE8, State.STA13)
    with _connect(scp) as sock:
        sock.sendall(associate_rq(CONTEXTS, called="SOMEONEELSE"))
        assert _outcome(sock) == (0x03, b"\x00\x01\x01\x07")  # A-ASSOCIATE-RJ: called AE not recognised
        start = time.monotonic()
        assert _outcome(sock) == QUIET  # Sta13: the node waits for the peer to close ...
        assert _outcome(sock, wait=ARTIM + 2) == CLOSED  # ... until ARTIM (Evt18: AA-2)
        assert ARTIM - 0.5 < time.monotonic() - start < ARTIM + 2
    _still_serving(scp)


def test_sta2_evt16_aa2_closes(scp: Scp) -> None:
    assert transition(State.STA2, Event.EVT16) == (Action.AA2, State.STA1)
    with _connect(scp) as sock:
        sock.sendall(ABORT)
        assert _outcome(sock) == CLOSED
    _still_serving(scp)


def test_sta2_evt17_aa5_forgets_the_connection(scp: Scp) -> None:
    assert transition(State.STA2, Event.EVT17) == (Action.AA5, State.STA1)
    with _connect(scp) as sock:
        sock.sendall(PDUS[Event.EVT6][:10])  # part of a request, then gone
        wait_until(lambda: scp.server.pending_connections() == 1, 5, "held")
    wait_until(lambda: scp.server.pending_connections() == 0, 5, "forgotten")
    _still_serving(scp)


def test_sta2_evt18_artim_closes_a_trickling_connection(scp: Scp) -> None:
    assert transition(State.STA2, Event.EVT18) == (Action.AA2, State.STA1)
    rq = PDUS[Event.EVT6]
    with _connect(scp) as sock:
        start = time.monotonic()
        for i in range(len(rq)):  # one byte every 0.2 s: each read is quick, the request never completes
            try:
                sock.sendall(rq[i:i + 1])
            except OSError:
                break
            if _outcome(sock, wait=0.2) == CLOSED:
                break
        assert ARTIM - 0.5 < time.monotonic() - start < ARTIM + 1.5
    _still_serving(scp)


# ------------------------------------------------------------------------------------------------------ Sta6


@pytest.mark.parametrize("event", [Event.EVT3, Event.EVT4, Event.EVT6, Event.EVT13, Event.EVT19])
def test_sta6_unexpected_pdu_aa8_aborts_as_provider(scp: Scp, event: Event) -> None:
    assert transition(State.STA6, event) == (Action.AA8, State.STA13)
    with _in_sta6(scp) as sock:
        sock.sendall(PDUS[event])
        pdu_type, body = read_pdu(sock)
        reason = 1 if event is Event.EVT19 else 2  # unrecognised PDU / unexpected PDU
        assert (pdu_type, body[2], body[3]) == (0x07, 2, reason)
        assert _outcome(sock) == QUIET  # Sta13
    _still_serving(scp)


def test_sta6_evt10_dt2_and_evt9_dt1_serve_a_request(scp: Scp) -> None:
    assert transition(State.STA6, Event.EVT10) == (Action.DT2, State.STA6)
    assert transition(State.STA6, Event.EVT9) == (Action.DT1, State.STA6)
    with _in_sta6(scp) as sock:
        for _ in range(2):
            sock.sendall(PDUS[Event.EVT10])
            pdu_type, body = read_pdu(sock)
            assert pdu_type == 0x04 and status_of(body) == 0x0000


def test_sta6_evt12_ar2_then_sta8_evt14_ar4_releases(scp: Scp) -> None:
    assert transition(State.STA6, Event.EVT12) == (Action.AR2, State.STA8)
    assert transition(State.STA8, Event.EVT14) == (Action.AR4, State.STA13)
    with _in_sta13(scp) as sock:
        assert _outcome(sock) == QUIET
    wait_until(lambda: scp.server.pending_connections() == 0, 5, "closed after the peer closed")


def test_sta6_evt15_aa1_aborts_an_idle_association(tmp_path: Path) -> None:
    assert transition(State.STA6, Event.EVT15) == (Action.AA1, State.STA13)
    s = Scp(tmp_path, acse_timeout=ARTIM, network_timeout=0.5)
    try:
        with _in_sta6(s) as sock:
            assert _outcome(sock, wait=3) == (0x07, b"\x00\x00\x00\x00")  # local abort: service-user source
            wait_until(lambda: s.server.active_associations() == 0, 5, "slot freed")
            assert _outcome(sock) == QUIET  # Sta13
    finally:
        s.server.shutdown(grace=0.5)


def test_sta6_evt16_aa3_closes_after_the_peer_aborts(scp: Scp) -> None:
    assert transition(State.STA6, Event.EVT16) == (Action.AA3, State.STA1)
    with _in_sta6(scp) as sock:
        sock.sendall(ABORT)
        assert _outcome(sock) == CLOSED
    wait_until(lambda: scp.server.active_associations() == 0, 5, "slot freed")


def test_sta6_evt17_aa4_frees_the_association(scp: Scp) -> None:
    assert transition(State.STA6, Event.EVT17) == (Action.AA4, State.STA1)
    with _in_sta6(scp):
        wait_until(lambda: scp.server.active_associations() == 1, 5, "association")
    wait_until(lambda: scp.server.active_associations() == 0, 5, "slot freed")
    assert scp.server.pending_connections() == 0


# ----------------------------------------------------------------------------------------------------- Sta13


@pytest.mark.parametrize("event", [Event.EVT3, Event.EVT4, Event.EVT10, Event.EVT12, Event.EVT13])
def test_sta13_aa6_ignores_the_pdu(scp: Scp, event: Event) -> None:
    assert transition(State.STA13, event) == (Action.AA6, State.STA13)
    with _in_sta13(scp) as sock:
        sock.sendall(PDUS[event])
        assert _outcome(sock) == QUIET
        assert scp.server.pending_connections() == 1


@pytest.mark.parametrize("event", [Event.EVT6, Event.EVT19])
def test_sta13_aa7_answers_with_an_abort(scp: Scp, event: Event) -> None:
    assert transition(State.STA13, event) == (Action.AA7, State.STA13)
    with _in_sta13(scp) as sock:
        sock.sendall(PDUS[event])
        pdu_type, body = read_pdu(sock)
        assert (pdu_type, body[2]) == (0x07, 2)
        assert _outcome(sock) == QUIET


def test_sta13_evt16_aa2_closes(scp: Scp) -> None:
    assert transition(State.STA13, Event.EVT16) == (Action.AA2, State.STA1)
    with _in_sta13(scp) as sock:
        sock.sendall(ABORT)
        assert _outcome(sock) == CLOSED


def test_sta13_evt17_ar5_forgets_the_connection(scp: Scp) -> None:
    assert transition(State.STA13, Event.EVT17) == (Action.AR5, State.STA1)
    with _in_sta13(scp):
        pass
    wait_until(lambda: scp.server.pending_connections() == 0, 5, "forgotten")


def test_sta13_evt18_artim_closes(scp: Scp) -> None:
    assert transition(State.STA13, Event.EVT18) == (Action.AA2, State.STA1)
    with _in_sta13(scp) as sock:
        start = time.monotonic()
        assert _outcome(sock, wait=ARTIM + 2) == CLOSED
        assert time.monotonic() - start < ARTIM + 1.5
