"""The acceptor's side of the DICOM upper layer state machine (PS3.8 9.2, Table 9-10), written out as a table.

Only what an association *acceptor* that never requests a release can meet is here: the requestor's states
(Sta4, Sta5, Sta7) and the release collisions (Sta9-Sta12) cannot occur, nor can the events only a requestor
raises (Evt1, Evt2, Evt11). Each entry is the standard's: ``(state, event) -> (action, next state)``. The
connection loop (:mod:`.connection`) runs Sta1, Sta2 and Sta13 without a thread; an association's thread
(:mod:`.association`) runs Sta3, Sta6 and Sta8, and gives the connection back to the loop in Sta13.

Sta3 and Sta8 are left at once: the acceptor answers an A-ASSOCIATE-RQ and an A-RELEASE-RQ in the same step
that read it, so nothing is read in either state (Evt7/Evt8 follow Evt6 and Evt14 follows Evt12 directly).
The ARTIM timer is a deadline: from the transport connection (Sta2, which includes a TLS handshake) and from
entering Sta13 (after A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT, waiting for the peer to close), ``acse_timeout``
seconds. PS3.8 runs no timer in Sta6; the node's ``network_timeout`` is a local decision there, an A-ABORT
request (Evt15).
"""

from __future__ import annotations

import enum

from dicomnode.receive.pdu import ABORT, ASSOCIATE_AC, ASSOCIATE_RJ, ASSOCIATE_RQ, P_DATA_TF, RELEASE_RP, RELEASE_RQ


class State(str, enum.Enum):
    STA1 = "Sta1"  # idle: no transport connection
    STA2 = "Sta2"  # transport connection open, awaiting the A-ASSOCIATE-RQ (ARTIM running)
    STA3 = "Sta3"  # awaiting the local A-ASSOCIATE response (accept or reject)
    STA6 = "Sta6"  # association established, ready for data transfer
    STA8 = "Sta8"  # awaiting the local A-RELEASE response
    STA13 = "Sta13"  # awaiting the transport connection close (ARTIM running)


class Event(str, enum.Enum):
    EVT3 = "Evt3"  # A-ASSOCIATE-AC PDU received
    EVT4 = "Evt4"  # A-ASSOCIATE-RJ PDU received
    EVT5 = "Evt5"  # transport connection indication (a connection was accepted)
    EVT6 = "Evt6"  # A-ASSOCIATE-RQ PDU received
    EVT7 = "Evt7"  # local A-ASSOCIATE response: accept
    EVT8 = "Evt8"  # local A-ASSOCIATE response: reject
    EVT9 = "Evt9"  # local P-DATA request (a DIMSE response to send)
    EVT10 = "Evt10"  # P-DATA-TF PDU received
    EVT12 = "Evt12"  # A-RELEASE-RQ PDU received
    EVT13 = "Evt13"  # A-RELEASE-RP PDU received
    EVT14 = "Evt14"  # local A-RELEASE response
    EVT15 = "Evt15"  # local A-ABORT request (idle deadline, shutdown, internal error)
    EVT16 = "Evt16"  # A-ABORT PDU received
    EVT17 = "Evt17"  # transport connection closed
    EVT18 = "Evt18"  # ARTIM timer expired
    EVT19 = "Evt19"  # unrecognized or invalid PDU received


class Action(str, enum.Enum):
    AE5 = "AE-5"  # accept the transport connection, start ARTIM
    AE6 = "AE-6"  # stop ARTIM; judge the A-ASSOCIATE-RQ (local response next), or reject it: RJ, start ARTIM
    AE7 = "AE-7"  # send A-ASSOCIATE-AC
    AE8 = "AE-8"  # send A-ASSOCIATE-RJ, start ARTIM
    DT1 = "DT-1"  # send P-DATA-TF
    DT2 = "DT-2"  # P-DATA indication: hand the PDVs to the DIMSE layer
    AR2 = "AR-2"  # A-RELEASE indication
    AR4 = "AR-4"  # send A-RELEASE-RP, start ARTIM
    AR5 = "AR-5"  # stop ARTIM (the peer closed)
    AA1 = "AA-1"  # send A-ABORT (service-user source), (re)start ARTIM
    AA2 = "AA-2"  # stop ARTIM, close the transport connection
    AA3 = "AA-3"  # A-ABORT indication (the peer aborted), close the transport connection
    AA4 = "AA-4"  # A-P-ABORT indication (the connection dropped)
    AA5 = "AA-5"  # stop ARTIM
    AA6 = "AA-6"  # ignore the PDU
    AA7 = "AA-7"  # send A-ABORT (service-provider source)
    AA8 = "AA-8"  # send A-ABORT (service-provider source), A-P-ABORT indication, start ARTIM


S, E, A = State, Event, Action

#: (state, event) -> (action, next state), PS3.8 Table 9-10 restricted to what an acceptor meets
TABLE: dict[tuple[State, Event], tuple[Action, State]] = {
    (S.STA1, E.EVT5): (A.AE5, S.STA2),
    # Sta2: awaiting the A-ASSOCIATE-RQ
    (S.STA2, E.EVT3): (A.AA1, S.STA13),
    (S.STA2, E.EVT4): (A.AA1, S.STA13),
    (S.STA2, E.EVT6): (A.AE6, S.STA3),  # or S.STA13 when AE-6 rejects at once (see next_after_ae6)
    (S.STA2, E.EVT10): (A.AA1, S.STA13),
    (S.STA2, E.EVT12): (A.AA1, S.STA13),
    (S.STA2, E.EVT13): (A.AA1, S.STA13),
    (S.STA2, E.EVT16): (A.AA2, S.STA1),
    (S.STA2, E.EVT17): (A.AA5, S.STA1),
    (S.STA2, E.EVT18): (A.AA2, S.STA1),
    (S.STA2, E.EVT19): (A.AA1, S.STA13),
    # Sta3: the local response to the A-ASSOCIATE-RQ
    (S.STA3, E.EVT7): (A.AE7, S.STA6),
    (S.STA3, E.EVT8): (A.AE8, S.STA13),
    # Sta6: data transfer
    (S.STA6, E.EVT3): (A.AA8, S.STA13),
    (S.STA6, E.EVT4): (A.AA8, S.STA13),
    (S.STA6, E.EVT6): (A.AA8, S.STA13),
    (S.STA6, E.EVT9): (A.DT1, S.STA6),
    (S.STA6, E.EVT10): (A.DT2, S.STA6),
    (S.STA6, E.EVT12): (A.AR2, S.STA8),
    (S.STA6, E.EVT13): (A.AA8, S.STA13),
    (S.STA6, E.EVT15): (A.AA1, S.STA13),
    (S.STA6, E.EVT16): (A.AA3, S.STA1),
    (S.STA6, E.EVT17): (A.AA4, S.STA1),
    (S.STA6, E.EVT19): (A.AA8, S.STA13),
    # Sta8: the local response to the A-RELEASE-RQ
    (S.STA8, E.EVT14): (A.AR4, S.STA13),
    # Sta13: waiting for the peer to close, bounded by ARTIM
    (S.STA13, E.EVT3): (A.AA6, S.STA13),
    (S.STA13, E.EVT4): (A.AA6, S.STA13),
    (S.STA13, E.EVT6): (A.AA7, S.STA13),
    (S.STA13, E.EVT10): (A.AA6, S.STA13),
    (S.STA13, E.EVT12): (A.AA6, S.STA13),
    (S.STA13, E.EVT13): (A.AA6, S.STA13),
    (S.STA13, E.EVT16): (A.AA2, S.STA1),
    (S.STA13, E.EVT17): (A.AR5, S.STA1),
    (S.STA13, E.EVT18): (A.AA2, S.STA1),
    (S.STA13, E.EVT19): (A.AA7, S.STA13),
}

_PDU_EVENTS = {
    ASSOCIATE_RQ: Event.EVT6, ASSOCIATE_AC: Event.EVT3, ASSOCIATE_RJ: Event.EVT4, P_DATA_TF: Event.EVT10,
    RELEASE_RQ: Event.EVT12, RELEASE_RP: Event.EVT13, ABORT: Event.EVT16,
}


def pdu_event(pdu_type: int) -> Event:
    """The event a received PDU of ``pdu_type`` raises (Evt19 for a type PS3.8 does not define)."""
    return _PDU_EVENTS.get(pdu_type, Event.EVT19)


def transition(state: State, event: Event) -> tuple[Action, State]:
    """The action and next state for ``event`` in ``state``. A pair outside the table is a defect of this
    module, not of the peer: it raises KeyError naming the pair."""
    try:
        return TABLE[(state, event)]
    except KeyError:
        raise KeyError(f"no transition for {event.value} in {state.value}") from None
