"""The DICOM upper-layer state machine (PS3.8 section 9.2), as a table.

Theory of operation
-------------------
The connection code (``channel.py``, driven by ``acceptor.py`` and ``requestor.py``) owns the
socket. Every time something happens (a PDU arrives, the local side wants to send one, the ARTIM
timer fires, the connection drops) it calls
``StateMachine.fire(event)``, which looks the (state, event) pair up in ``TRANSITIONS`` and returns the
action the caller must perform. Pairs not in the table are protocol errors: the caller aborts (AA-8,
"unexpected PDU"). The machine itself does no I/O, so it is tested exhaustively as data.

Only the states an acceptor and a requestor of this gateway pass through are listed; names follow the
standard (Sta1 = idle ... Sta13 = awaiting transport close) so the table can be checked against PS3.8
table 9-10 line by line.
"""

from __future__ import annotations

from enum import Enum

from gateway.errors import ProtocolError


class State(Enum):
    STA1 = "idle"
    STA2 = "transport open, awaiting A-ASSOCIATE-RQ"
    STA3 = "awaiting local A-ASSOCIATE response"
    STA4 = "awaiting transport connection"
    STA5 = "awaiting A-ASSOCIATE-AC or -RJ"
    STA6 = "association established"
    STA7 = "awaiting A-RELEASE-RP"
    STA8 = "awaiting local A-RELEASE response"
    STA9 = "release collision, requestor: awaiting local A-RELEASE response"
    STA11 = "release collision, requestor: awaiting A-RELEASE-RP"
    STA13 = "awaiting transport close"


class Event(Enum):
    CONNECT_REQUEST = "Evt1 local A-ASSOCIATE request"
    CONNECTED = "Evt2 transport connection confirmed"
    AC_RECEIVED = "Evt3 A-ASSOCIATE-AC received"
    RJ_RECEIVED = "Evt4 A-ASSOCIATE-RJ received"
    TRANSPORT_INDICATION = "Evt5 transport connection indication"
    RQ_RECEIVED = "Evt6 A-ASSOCIATE-RQ received"
    LOCAL_ACCEPT = "Evt7 local A-ASSOCIATE accept"
    LOCAL_REJECT = "Evt8 local A-ASSOCIATE reject"
    LOCAL_DATA = "Evt9 local P-DATA request"
    DATA_RECEIVED = "Evt10 P-DATA-TF received"
    LOCAL_RELEASE = "Evt11 local A-RELEASE request"
    RELEASE_RQ_RECEIVED = "Evt12 A-RELEASE-RQ received"
    RELEASE_RP_RECEIVED = "Evt13 A-RELEASE-RP received"
    LOCAL_RELEASE_RESPONSE = "Evt14 local A-RELEASE response"
    LOCAL_ABORT = "Evt15 local A-ABORT request"
    ABORT_RECEIVED = "Evt16 A-ABORT received"
    TRANSPORT_CLOSED = "Evt17 transport connection closed"
    ARTIM_EXPIRED = "Evt18 ARTIM timer expired"
    INVALID_PDU = "Evt19 unrecognized or invalid PDU"


class Action(Enum):
    CONNECT = "AE-1 issue transport connect"
    SEND_RQ = "AE-2 send A-ASSOCIATE-RQ"
    ASSOCIATED = "AE-3 A-ASSOCIATE confirmation (accept)"
    REJECTED = "AE-4 A-ASSOCIATE confirmation (reject), close"
    START_ARTIM = "AE-5 transport open, start ARTIM"
    EVALUATE_RQ = "AE-6 stop ARTIM, evaluate A-ASSOCIATE-RQ"
    SEND_AC = "AE-7 send A-ASSOCIATE-AC"
    SEND_RJ = "AE-8 send A-ASSOCIATE-RJ, start ARTIM"
    SEND_DATA = "DT-1 send P-DATA-TF"
    DELIVER_DATA = "DT-2 P-DATA indication"
    SEND_RELEASE_RQ = "AR-1 send A-RELEASE-RQ"
    RELEASE_INDICATION = "AR-2 A-RELEASE indication"
    RELEASED = "AR-3 A-RELEASE confirmation, close"
    SEND_RELEASE_RP = "AR-4 send A-RELEASE-RP, start ARTIM"
    DELIVER_DATA_RELEASING = "AR-6 P-DATA indication while releasing"
    COLLISION = "AR-8 release collision indication"
    COLLISION_SEND_RP = "AR-9 send A-RELEASE-RP (collision)"
    SEND_ABORT = "AA-1 send A-ABORT, start ARTIM"
    CLOSE = "AA-2 stop ARTIM, close transport"
    ABORT_INDICATION = "AA-3 A-ABORT indication, close"
    PROVIDER_ABORT = "AA-4 A-P-ABORT indication"
    IGNORE = "AA-6 ignore PDU"
    ABORT_PROTOCOL = "AA-8 send A-ABORT (unexpected PDU), indication, start ARTIM"


S, E, A = State, Event, Action
_ESTABLISHED_ERRORS = (E.AC_RECEIVED, E.RJ_RECEIVED, E.RQ_RECEIVED, E.INVALID_PDU)

TRANSITIONS: dict[tuple[State, Event], tuple[Action, State]] = {
    # requestor: connect and associate
    (S.STA1, E.CONNECT_REQUEST): (A.CONNECT, S.STA4),
    (S.STA4, E.CONNECTED): (A.SEND_RQ, S.STA5),
    (S.STA4, E.TRANSPORT_CLOSED): (A.PROVIDER_ABORT, S.STA1),
    (S.STA5, E.AC_RECEIVED): (A.ASSOCIATED, S.STA6),
    (S.STA5, E.RJ_RECEIVED): (A.REJECTED, S.STA1),
    # acceptor: transport open, A-ASSOCIATE-RQ, local decision
    (S.STA1, E.TRANSPORT_INDICATION): (A.START_ARTIM, S.STA2),
    (S.STA2, E.RQ_RECEIVED): (A.EVALUATE_RQ, S.STA3),
    (S.STA2, E.ARTIM_EXPIRED): (A.CLOSE, S.STA1),
    (S.STA3, E.LOCAL_ACCEPT): (A.SEND_AC, S.STA6),
    (S.STA3, E.LOCAL_REJECT): (A.SEND_RJ, S.STA13),
    # established
    (S.STA6, E.LOCAL_DATA): (A.SEND_DATA, S.STA6),
    (S.STA6, E.DATA_RECEIVED): (A.DELIVER_DATA, S.STA6),
    (S.STA6, E.LOCAL_RELEASE): (A.SEND_RELEASE_RQ, S.STA7),
    (S.STA6, E.RELEASE_RQ_RECEIVED): (A.RELEASE_INDICATION, S.STA8),
    # acceptor release
    (S.STA8, E.LOCAL_RELEASE_RESPONSE): (A.SEND_RELEASE_RP, S.STA13),
    (S.STA8, E.LOCAL_DATA): (A.SEND_DATA, S.STA8),
    # requestor release, including the release collision (Sta7 -> Sta9 -> Sta11 -> Sta1)
    (S.STA7, E.DATA_RECEIVED): (A.DELIVER_DATA_RELEASING, S.STA7),
    (S.STA7, E.RELEASE_RP_RECEIVED): (A.RELEASED, S.STA1),
    (S.STA7, E.RELEASE_RQ_RECEIVED): (A.COLLISION, S.STA9),
    (S.STA9, E.LOCAL_RELEASE_RESPONSE): (A.COLLISION_SEND_RP, S.STA11),
    (S.STA11, E.RELEASE_RP_RECEIVED): (A.RELEASED, S.STA1),
    # awaiting close: everything but the close itself is ignored
    (S.STA13, E.TRANSPORT_CLOSED): (A.CLOSE, S.STA1),
    (S.STA13, E.ARTIM_EXPIRED): (A.CLOSE, S.STA1),
}

for _state in (S.STA2, S.STA3, S.STA5, S.STA6, S.STA7, S.STA8, S.STA9, S.STA11):
    TRANSITIONS[(_state, E.ABORT_RECEIVED)] = (A.ABORT_INDICATION, S.STA1)
    TRANSITIONS[(_state, E.TRANSPORT_CLOSED)] = (A.PROVIDER_ABORT, S.STA1)
    TRANSITIONS[(_state, E.LOCAL_ABORT)] = (A.SEND_ABORT, S.STA13)
for _event in (*_ESTABLISHED_ERRORS, E.DATA_RECEIVED, E.RELEASE_RQ_RECEIVED,
               E.RELEASE_RP_RECEIVED, E.ABORT_RECEIVED):
    TRANSITIONS[(S.STA13, _event)] = (A.IGNORE, S.STA13)
TRANSITIONS[(S.STA13, E.LOCAL_ABORT)] = (A.IGNORE, S.STA13)
del _state, _event


class StateMachine:
    """Current state plus the table; ``fire`` returns what the caller must do."""

    __slots__ = ("state",)

    def __init__(self, state: State = State.STA1) -> None:
        self.state = state

    def fire(self, event: Event) -> Action:
        try:
            action, self.state = TRANSITIONS[(self.state, event)]
        except KeyError:
            raise ProtocolError(f"{event.value} is not valid in state {self.state.name} "
                                f"({self.state.value})") from None
        return action

    @property
    def established(self) -> bool:
        return self.state in (State.STA6, State.STA7, State.STA8)
