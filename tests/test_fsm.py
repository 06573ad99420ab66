"""The upper-layer state machine (gateway.dicom.fsm) as data, checked against PS3.8 table 9-10.

The expectations below are written from the standard, not read back from ``TRANSITIONS``.
"""

from __future__ import annotations

import itertools

import pytest

from gateway.dicom.fsm import TRANSITIONS, Action, Event, State, StateMachine
from gateway.errors import ProtocolError

S, E, A = State, Event, Action

# Sta6, association established: every event the standard defines an action for, except the
# "unexpected PDU" ones (AA-8), which the table leaves out so that firing them raises.
ESTABLISHED: dict[Event, tuple[Action, State]] = {
    E.LOCAL_DATA: (A.SEND_DATA, S.STA6),  # DT-1
    E.DATA_RECEIVED: (A.DELIVER_DATA, S.STA6),  # DT-2
    E.LOCAL_RELEASE: (A.SEND_RELEASE_RQ, S.STA7),  # AR-1
    E.RELEASE_RQ_RECEIVED: (A.RELEASE_INDICATION, S.STA8),  # AR-2
    E.LOCAL_ABORT: (A.SEND_ABORT, S.STA13),  # AA-1
    E.ABORT_RECEIVED: (A.ABORT_INDICATION, S.STA1),  # AA-3
    E.TRANSPORT_CLOSED: (A.PROVIDER_ABORT, S.STA1),  # AA-4
}
UNEXPECTED_IN_STA6 = (E.AC_RECEIVED, E.RJ_RECEIVED, E.RQ_RECEIVED, E.RELEASE_RP_RECEIVED,
                      E.INVALID_PDU, E.CONNECT_REQUEST, E.LOCAL_ACCEPT, E.LOCAL_REJECT,
                      E.LOCAL_RELEASE_RESPONSE, E.ARTIM_EXPIRED, E.CONNECTED,
                      E.TRANSPORT_INDICATION)


def run(start: State, events: list[Event]) -> list[tuple[Action, State]]:
    machine = StateMachine(start)
    steps = []
    for event in events:
        action = machine.fire(event)
        steps.append((action, machine.state))
    return steps


@pytest.mark.parametrize("event", list(ESTABLISHED), ids=lambda e: e.name)
def test_every_established_state_transition(event: Event) -> None:
    machine = StateMachine(S.STA6)
    assert (machine.fire(event), machine.state) == ESTABLISHED[event]


def test_the_table_defines_nothing_else_in_the_established_state() -> None:
    defined = {event for (state, event) in TRANSITIONS if state is S.STA6}
    assert defined == set(ESTABLISHED)


@pytest.mark.parametrize("event", UNEXPECTED_IN_STA6, ids=lambda e: e.name)
def test_unexpected_events_in_sta6_raise_and_leave_the_state_alone(event: Event) -> None:
    machine = StateMachine(S.STA6)
    with pytest.raises(ProtocolError, match="is not valid in state STA6") as raised:
        machine.fire(event)
    assert event.value in str(raised.value)
    assert machine.state is S.STA6
    assert machine.established


def test_acceptor_lifecycle_accept_then_release() -> None:
    steps = run(S.STA1, [E.TRANSPORT_INDICATION, E.RQ_RECEIVED, E.LOCAL_ACCEPT, E.DATA_RECEIVED,
                         E.LOCAL_DATA, E.RELEASE_RQ_RECEIVED, E.LOCAL_RELEASE_RESPONSE,
                         E.TRANSPORT_CLOSED])
    assert steps == [
        (A.START_ARTIM, S.STA2), (A.EVALUATE_RQ, S.STA3), (A.SEND_AC, S.STA6),
        (A.DELIVER_DATA, S.STA6), (A.SEND_DATA, S.STA6), (A.RELEASE_INDICATION, S.STA8),
        (A.SEND_RELEASE_RP, S.STA13), (A.CLOSE, S.STA1),
    ]


def test_acceptor_reject_waits_in_sta13_and_artim_closes() -> None:
    steps = run(S.STA1, [E.TRANSPORT_INDICATION, E.RQ_RECEIVED, E.LOCAL_REJECT,
                         E.DATA_RECEIVED, E.ARTIM_EXPIRED])
    assert steps == [(A.START_ARTIM, S.STA2), (A.EVALUATE_RQ, S.STA3), (A.SEND_RJ, S.STA13),
                     (A.IGNORE, S.STA13), (A.CLOSE, S.STA1)]


def test_artim_expiry_before_any_request_closes() -> None:
    assert run(S.STA1, [E.TRANSPORT_INDICATION, E.ARTIM_EXPIRED]) == [
        (A.START_ARTIM, S.STA2), (A.CLOSE, S.STA1)]


@pytest.mark.parametrize("event", [E.DATA_RECEIVED, E.RELEASE_RQ_RECEIVED, E.AC_RECEIVED,
                                   E.RELEASE_RP_RECEIVED, E.INVALID_PDU],
                         ids=lambda e: e.name)
def test_anything_but_a_request_or_abort_before_association_raises(event: Event) -> None:
    machine = StateMachine(S.STA2)
    with pytest.raises(ProtocolError):
        machine.fire(event)


def test_requestor_lifecycle_associate_then_release() -> None:
    steps = run(S.STA1, [E.CONNECT_REQUEST, E.CONNECTED, E.AC_RECEIVED, E.LOCAL_DATA,
                         E.DATA_RECEIVED, E.LOCAL_RELEASE, E.DATA_RECEIVED, E.RELEASE_RP_RECEIVED])
    assert steps == [
        (A.CONNECT, S.STA4), (A.SEND_RQ, S.STA5), (A.ASSOCIATED, S.STA6), (A.SEND_DATA, S.STA6),
        (A.DELIVER_DATA, S.STA6), (A.SEND_RELEASE_RQ, S.STA7),
        (A.DELIVER_DATA_RELEASING, S.STA7), (A.RELEASED, S.STA1),
    ]


def test_requestor_rejected() -> None:
    assert run(S.STA4, [E.CONNECTED, E.RJ_RECEIVED]) == [(A.SEND_RQ, S.STA5), (A.REJECTED, S.STA1)]


def test_release_collision_sta7_sta9_sta11_sta1() -> None:
    steps = run(S.STA6, [E.LOCAL_RELEASE, E.RELEASE_RQ_RECEIVED, E.LOCAL_RELEASE_RESPONSE,
                         E.RELEASE_RP_RECEIVED])
    assert steps == [(A.SEND_RELEASE_RQ, S.STA7), (A.COLLISION, S.STA9),
                     (A.COLLISION_SEND_RP, S.STA11), (A.RELEASED, S.STA1)]


def test_acceptor_may_still_send_data_while_the_peer_releases() -> None:
    assert run(S.STA8, [E.LOCAL_DATA, E.LOCAL_RELEASE_RESPONSE]) == [
        (A.SEND_DATA, S.STA8), (A.SEND_RELEASE_RP, S.STA13)]


ABORTABLE = (S.STA2, S.STA3, S.STA5, S.STA6, S.STA7, S.STA8, S.STA9, S.STA11)


@pytest.mark.parametrize("state", ABORTABLE, ids=lambda s: s.name)
def test_abort_received_or_connection_lost_ends_in_sta1(state: State) -> None:
    assert run(state, [E.ABORT_RECEIVED]) == [(A.ABORT_INDICATION, S.STA1)]
    assert run(state, [E.TRANSPORT_CLOSED]) == [(A.PROVIDER_ABORT, S.STA1)]


@pytest.mark.parametrize("state", ABORTABLE, ids=lambda s: s.name)
def test_a_local_abort_waits_for_the_close_in_sta13(state: State) -> None:
    assert run(state, [E.LOCAL_ABORT, E.ABORT_RECEIVED, E.TRANSPORT_CLOSED]) == [
        (A.SEND_ABORT, S.STA13), (A.IGNORE, S.STA13), (A.CLOSE, S.STA1)]


@pytest.mark.parametrize("event", [E.AC_RECEIVED, E.RJ_RECEIVED, E.RQ_RECEIVED, E.INVALID_PDU,
                                   E.DATA_RECEIVED, E.RELEASE_RQ_RECEIVED, E.RELEASE_RP_RECEIVED,
                                   E.ABORT_RECEIVED, E.LOCAL_ABORT],
                         ids=lambda e: e.name)
def test_sta13_ignores_everything_until_the_close(event: Event) -> None:
    assert run(S.STA13, [event]) == [(A.IGNORE, S.STA13)]


def test_idle_accepts_only_a_connection() -> None:
    allowed = {event for (state, event) in TRANSITIONS if state is S.STA1}
    assert allowed == {E.CONNECT_REQUEST, E.TRANSPORT_INDICATION}


def test_established_covers_the_data_transfer_states() -> None:
    assert {s for s in State if StateMachine(s).established} == {S.STA6, S.STA7, S.STA8}


def test_every_pair_outside_the_table_raises() -> None:
    for state, event in itertools.product(State, Event):
        machine = StateMachine(state)
        if (state, event) in TRANSITIONS:
            action, after = TRANSITIONS[(state, event)]
            assert machine.fire(event) is action
            assert machine.state is after
        else:
            with pytest.raises(ProtocolError):
                machine.fire(event)
            assert machine.state is state


def test_every_transition_lands_in_a_state_with_a_way_out() -> None:
    """No dead ends: from every state the table reaches, some event leads on."""
    reachable = {after for _, after in TRANSITIONS.values()}
    for state in reachable - {S.STA1}:
        assert any(s is state for s, _ in TRANSITIONS), state
