"""The fold: random legal event sequences folded live through a real Journal equal the same
sequence replayed from the file, and every index stays consistent with the runs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import trio
from hypothesis import given, settings
from test_journal_support import (
    CHOICES,
    NO_FSYNC,
    PROFILE,
    FakeClock,
    drive,
    legal_steps,
    make_journal,
    reference_idempotency,
    replay_dir,
    snapshot,
)

from agentjobs.engine.model import TERMINAL, Event, EventType, RunSpec, Status
from agentjobs.engine.state import State, apply, replay, spec_from_data, spec_to_data

E = EventType


def check_indexes(state: State, events: list[Event]) -> None:
    """Every index agrees with the runs and with a reference computed from the events."""
    runs = state.runs
    # by_status: each run exactly once, under its own status
    seen: set[str] = set()
    for status, ids in state.by_status.items():
        for rid in ids:
            assert runs[rid].status is status
            assert rid not in seen
            seen.add(rid)
    assert seen == set(runs)
    # creation order: submitted order of the runs still alive
    submitted = [ev.run for ev in events if ev.type is E.SUBMITTED]
    alive_order = [r.id for r in state.order if r.id in runs]
    assert alive_order == [rid for rid in submitted if rid in runs]
    assert state.order_seqs == [r.seq for r in state.order]
    assert state.order_seqs == sorted(state.order_seqs)
    # sessions: exactly the runs with that session, no empty entries
    expected_sessions: dict[str, list[str]] = {}
    for rid in alive_order:
        sid = runs[rid].spec.session_id
        if sid is not None:
            expected_sessions.setdefault(sid, []).append(rid)
    assert {k: list(v) for k, v in state.by_session.items()} == expected_sessions
    # idempotency
    assert state.idempotency == reference_idempotency(events)
    # last_seq of runs and state
    for run in runs.values():
        assert run.last_seq == max(ev.seq for ev in events if ev.run == run.id)
    assert state.last_seq == (events[-1].seq if events else 0)


def check_listing(state: State) -> None:
    """newest_first: filters match, and cursor pagination covers the list exactly once."""
    everyone = list(state.newest_first(any_tenant=True))
    assert [r.seq for r in everyone] == sorted((r.seq for r in state.runs.values()), reverse=True)
    tenants = {r.spec.tenant for r in state.runs.values()}
    for tenant in tenants:
        mine = list(state.newest_first(tenant=tenant))
        assert mine == [r for r in everyone if r.spec.tenant == tenant]
    for status in Status:
        got = list(state.newest_first(status=status, any_tenant=True))
        assert got == [r for r in everyone if r.status is status]
    for sid in state.by_session:
        got = list(state.newest_first(session_id=sid, any_tenant=True))
        assert got == [r for r in everyone if r.spec.session_id == sid]
    for page_size in (1, 3):
        pages: list[str] = []
        cursor: int | None = None
        while True:
            it = state.newest_first(before_seq=cursor, any_tenant=True)
            page = [r for _, r in zip(range(page_size), it, strict=False)]
            if not page:
                break
            pages.extend(r.id for r in page)
            cursor = page[-1].seq
        assert pages == [r.id for r in everyone]


@settings(PROFILE)
@given(choices=CHOICES)
def test_pure_fold_keeps_indexes_consistent_after_every_event(
    choices: list[tuple[int, int, int, float]],
) -> None:
    state = State()
    events: list[Event] = []
    ts = 1_000.0
    for i, step in enumerate(legal_steps(choices), start=1):
        ts += step.dt
        event = Event(i, ts, step.run, step.type, step.data)
        events.append(event)
        apply(state, event)
        check_indexes(state, events)
    check_listing(state)
    state.vacuum()
    check_indexes(state, events)
    check_listing(state)
    assert state.deleted_in_order == 0
    assert len(state.order) == len(state.runs)


@settings(PROFILE)
@given(choices=CHOICES)
async def test_live_fold_through_a_journal_equals_replay_from_the_file(
    tmp_path: Path, choices: list[tuple[int, int, int, float]]
) -> None:
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    steps = legal_steps(choices)
    clock = FakeClock()
    journal, live = make_journal(directory, clock, segment_bytes=2048, hooks=NO_FSYNC)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        events = await drive(journal, clock, steps)
        histories = {rid: journal.history(rid) for rid in {s.run for s in steps}}
        await journal.aclose()
    check_indexes(live, events)
    # the file replays to the same state, through the same pure function
    replayed, journal2 = replay_dir(directory)
    try:
        assert snapshot(replayed) == snapshot(live)
        assert journal2.last_seq == (events[-1].seq if events else 0)
        for rid, history in histories.items():
            assert history == [ev for ev in events if ev.run == rid]
            assert journal2.history(rid) == history
    finally:
        journal2.close_files()
    # and `replay` over the events gives it too
    assert snapshot(replay(events)) == snapshot(live)


def test_idempotency_lookup_respects_the_window() -> None:
    state = State()
    spec = RunSpec(prompt="x", idempotency_key="k", tenant="t", request_hash="h")
    apply(state, Event(1, 100.0, "run_a", E.SUBMITTED, spec_to_data(spec)))
    assert state.find_idempotent("t", "k", now=150.0, window=100.0) is state.runs["run_a"]
    assert state.find_idempotent("t", "k", now=200.0, window=100.0) is None  # expired
    assert state.find_idempotent("t", "k", now=1e12, window=None) is state.runs["run_a"]
    assert state.find_idempotent(None, "k", now=150.0, window=100.0) is None  # other tenant
    assert state.find_idempotent("t", "other", now=150.0, window=100.0) is None


def test_deleting_the_newest_run_with_a_key_frees_the_key() -> None:
    state = State()
    for seq, rid in ((1, "run_a"), (2, "run_b")):
        apply(
            state, Event(seq, float(seq), rid, E.SUBMITTED, {"prompt": "p", "idempotency_key": "k"})
        )
    assert state.idempotency[None, "k"] == "run_b"
    apply(state, Event(3, 3.0, "run_b", E.CANCELLED, {"reason": "x"}))
    apply(state, Event(4, 4.0, "run_b", E.DELETED, {}))
    assert (None, "k") not in state.idempotency
    assert state.find_idempotent(None, "k", now=5.0, window=None) is None


def test_progress_merges_partial_updates_and_success_completes_it() -> None:
    state = State()
    apply(state, Event(1, 1.0, "r", E.SUBMITTED, {"prompt": "p"}))
    apply(state, Event(2, 2.0, "r", E.STARTED, {"attempt": 1}))
    apply(
        state, Event(3, 3.0, "r", E.PROGRESS, {"percentage": 10.0, "step": "a", "steps_total": 4})
    )
    apply(state, Event(4, 4.0, "r", E.PROGRESS, {"steps_completed": 2}))
    run = state.runs["r"]
    assert (run.progress.percentage, run.progress.step) == (10.0, "a")
    assert (run.progress.steps_completed, run.progress.steps_total) == (2, 4)
    apply(state, Event(5, 9.0, "r", E.SUCCEEDED, {"result": [1], "metrics": {"t": 1}}))
    assert run.progress.percentage == 100.0
    assert (run.result, run.metrics, run.completed_at, run.duration) == ([1], {"t": 1}, 9.0, 7.0)


def test_retry_then_restart_clears_the_error_and_counts_attempts() -> None:
    state = State()
    apply(state, Event(1, 1.0, "r", E.SUBMITTED, {"prompt": "p", "max_attempts": 3}))
    apply(state, Event(2, 2.0, "r", E.STARTED, {"attempt": 1}))
    apply(state, Event(3, 3.0, "r", E.RETRYING, {"error": "e", "kind": "error", "not_before": 9.0}))
    run = state.runs["r"]
    assert (run.status, run.error, run.not_before) == (Status.QUEUED, "e", 9.0)
    apply(state, Event(4, 10.0, "r", E.STARTED, {"attempt": 2}))
    assert (run.status, run.attempt, run.error, run.not_before) == (Status.RUNNING, 2, None, None)


def test_webhook_bookkeeping() -> None:
    state = State()
    apply(state, Event(1, 1.0, "r", E.SUBMITTED, {"prompt": "p", "webhook_url": "https://h"}))
    apply(state, Event(2, 2.0, "r", E.CANCELLED, {"reason": "x"}))
    run = state.runs["r"]
    assert run.webhook is not None and run.webhook.next_attempt_at == 2.0
    apply(
        state,
        Event(
            3,
            3.0,
            "r",
            E.WEBHOOK_ATTEMPT,
            {"ok": False, "status_code": 500, "next_attempt_at": 8.0},
        ),
    )
    assert (run.webhook.attempts, run.webhook.gave_up, run.webhook.next_attempt_at) == (
        1,
        False,
        8.0,
    )
    apply(state, Event(4, 8.0, "r", E.WEBHOOK_ATTEMPT, {"ok": False, "error": "refused"}))
    assert run.webhook.gave_up and run.webhook.last_error == "refused"
    apply(state, Event(5, 9.0, "r", E.WEBHOOK_REDELIVER, {"at": 10.0}))
    assert not run.webhook.gave_up and run.webhook.next_attempt_at == 10.0
    assert run.status in TERMINAL


@pytest.mark.parametrize(
    "spec",
    [
        RunSpec(prompt="p"),
        RunSpec(
            prompt="p",
            config={"a": [1]},
            session_id="s",
            priority=2,
            timeout=3.5,
            max_attempts=4,
            runner="echo",
            webhook_url="https://h",
            idempotency_key="k",
            request_hash="h",
            tenant="t",
            ttl=60.0,
        ),
    ],
)
def test_spec_data_round_trips_and_omits_defaults(spec: RunSpec) -> None:
    data = spec_to_data(spec)
    assert spec_from_data(data) == spec
    if spec == RunSpec(prompt="p"):
        assert data == {"prompt": "p"}
