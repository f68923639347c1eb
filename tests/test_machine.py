"""The transition table, exhaustively: every allowed edge works (in the table and through
`state.apply`), every other (status, event) pair raises `IllegalTransition` and changes
nothing."""

from __future__ import annotations

import copy
import itertools

import pytest
from test_journal_support import snapshot

from agentjobs.engine import machine
from agentjobs.engine.machine import TRANSITIONS, IllegalTransition
from agentjobs.engine.model import TERMINAL, Event, EventType, RunSpec, Status
from agentjobs.engine.state import State, apply, spec_to_data

E = EventType
ALL_STATUSES: list[Status | None] = [None, *Status]
ALL_PAIRS = list(itertools.product(ALL_STATUSES, EventType))
ALLOWED = [pair for pair in ALL_PAIRS if pair in TRANSITIONS]
FORBIDDEN = [pair for pair in ALL_PAIRS if pair not in TRANSITIONS]

# How to bring a fresh run to each status with legal events (the table's own paths).
PATH_TO: dict[Status | None, list[EventType]] = {
    None: [],
    Status.QUEUED: [E.SUBMITTED],
    Status.RUNNING: [E.SUBMITTED, E.STARTED],
    Status.SUCCEEDED: [E.SUBMITTED, E.STARTED, E.SUCCEEDED],
    Status.FAILED: [E.SUBMITTED, E.STARTED, E.FAILED],
    Status.CANCELLED: [E.SUBMITTED, E.CANCELLED],
}


def _data(etype: EventType) -> dict[str, object]:
    if etype is E.SUBMITTED:
        return spec_to_data(RunSpec(prompt="hi", webhook_url="https://example.com/h"))
    return {
        E.STARTED: {"attempt": 1},
        E.PROGRESS: {"percentage": 50.0, "step": "half"},
        E.OUTPUT: {"text": "x"},
        E.FAILED: {"error": "boom", "kind": "error"},
        E.SUCCEEDED: {"result": 1},
        E.WEBHOOK_ATTEMPT: {"ok": False, "status_code": 500, "next_attempt_at": 5.0},
    }.get(etype, {})


def state_at(status: Status | None) -> tuple[State, int]:
    state = State()
    seq = 0
    for etype in PATH_TO[status]:
        seq += 1
        apply(state, Event(seq, float(seq), "run_x", etype, _data(etype)))
    return state, seq


def test_the_table_mentions_only_known_statuses_and_events() -> None:
    for (before, event), after in TRANSITIONS.items():
        assert before is None or isinstance(before, Status)
        assert isinstance(event, EventType)
        assert after is None or isinstance(after, Status)


def test_paths_really_reach_their_status() -> None:
    for status in ALL_STATUSES:
        state, _ = state_at(status)
        run = state.get("run_x")
        assert (run.status if run is not None else None) is status


@pytest.mark.parametrize(("before", "event"), ALLOWED, ids=lambda x: str(getattr(x, "value", x)))
def test_every_allowed_edge_works(before: Status | None, event: EventType) -> None:
    assert machine.is_legal(before, event)
    after = machine.transition("run_x", before, event)
    assert after is TRANSITIONS[before, event]
    state, seq = state_at(before)
    apply(state, Event(seq + 1, float(seq + 1), "run_x", event, _data(event)))
    run = state.get("run_x")
    assert (run.status if run is not None else None) is after
    assert state.last_seq == seq + 1
    if run is not None:
        assert run.last_seq == seq + 1
        assert "run_x" in state.by_status[run.status]
        assert sum(len(ids) for ids in state.by_status.values()) == 1
    else:
        assert all(not ids for ids in state.by_status.values())


@pytest.mark.parametrize(("before", "event"), FORBIDDEN, ids=lambda x: str(getattr(x, "value", x)))
def test_every_other_pair_raises_and_changes_nothing(
    before: Status | None, event: EventType
) -> None:
    assert not machine.is_legal(before, event)
    with pytest.raises(IllegalTransition) as info:
        machine.transition("run_x", before, event)
    assert info.value.status is before and info.value.event is event
    assert "run_x" in str(info.value) and event.value in str(info.value)
    state, seq = state_at(before)
    picture = copy.deepcopy(snapshot(state))
    with pytest.raises(IllegalTransition):
        apply(state, Event(seq + 1, float(seq + 1), "run_x", event, _data(event)))
    assert snapshot(state) == picture


def test_pair_counts_add_up() -> None:
    assert len(ALLOWED) + len(FORBIDDEN) == len(ALL_STATUSES) * len(EventType)
    assert len(ALLOWED) == len(TRANSITIONS)


def test_terminal_statuses_never_leave_except_by_deletion() -> None:
    for (before, _event), after in TRANSITIONS.items():
        if before in TERMINAL:
            assert after is before or after is None


def test_only_submitted_creates_a_run() -> None:
    assert [e for (b, e) in TRANSITIONS if b is None] == [E.SUBMITTED]


def test_a_stale_seq_is_refused_before_any_change() -> None:
    state, seq = state_at(Status.RUNNING)
    picture = copy.deepcopy(snapshot(state))
    with pytest.raises(ValueError, match="not after"):
        apply(state, Event(seq, 99.0, "run_x", E.PROGRESS, {"percentage": 1.0}))
    assert snapshot(state) == picture
