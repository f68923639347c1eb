"""Shared by the machine, state, journal, compaction and CLI tests (no tests in here).

* `legal_steps` turns a list of random integers into a sequence of events that is legal
  by `machine.TRANSITIONS` (the table itself picks the options, so a new edge is covered
  without touching this file). Hypothesis shrinks the integers; the sequence follows.
* `FakeClock`, `drive` (feed steps through a real `Journal`), `snapshot` (a comparable
  picture of every State index) and `reference_idempotency` (what the index must hold).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import hypothesis.strategies as st
from hypothesis import HealthCheck, settings

from agentjobs.engine import machine
from agentjobs.engine.journal import IOHooks, Journal
from agentjobs.engine.model import Event, EventType, RunSpec, Status
from agentjobs.engine.state import State, apply, spec_to_data

E = EventType

# For properties about content, not power loss: fsync is a no-op (the durability tests in
# test_journal_commit.py use real fsyncs and failing ones).
NO_FSYNC = IOHooks(fsync=lambda fd: None)

settings.register_profile(
    "journal",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
settings.register_profile(
    "journal-thorough",
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# AGENTJOBS_HYPOTHESIS=journal-thorough for a long run (the default keeps the suite fast)
PROFILE = settings.get_profile(os.environ.get("AGENTJOBS_HYPOTHESIS", "journal"))

LEGAL: dict[Status | None, list[EventType]] = {}
for (_before, _event), _after in machine.TRANSITIONS.items():
    LEGAL.setdefault(_before, []).append(_event)

# (a, b, c, dt): a picks submit-or-not, b picks the run, c picks the event and its data
CHOICE = st.tuples(
    st.integers(0, 1 << 16),
    st.integers(0, 1 << 16),
    st.integers(0, 1 << 16),
    st.sampled_from([0.0, 0.5, 7.0, 3600.0, 86400.0, 3 * 86400.0]),
)
CHOICES = st.lists(CHOICE, max_size=60)
LONG_CHOICES = st.lists(CHOICE, min_size=20, max_size=90)  # enough for runs to finish


@attrs.frozen
class Step:
    run: str
    type: EventType
    data: dict[str, Any]
    dt: float  # advance the clock by this much before appending
    sync: bool


def _data(etype: EventType, c: int) -> dict[str, Any]:
    if etype is E.STARTED:
        return {"attempt": 1 + c % 3}
    if etype is E.PROGRESS:
        return {
            "percentage": float(c % 101),
            "step": f"step {c % 5}",
            "steps_completed": c % 5,
            "steps_total": 5,
        }
    if etype is E.OUTPUT:
        return {"text": "out \u00e9\u4e2d\n" * (c % 3)}
    if etype is E.CANCEL_REQUESTED:
        return {"reason": "user asked"}
    if etype is E.SUCCEEDED:
        return {"result": {"answer": c, "items": [1, "two", None]}, "metrics": {"tokens": c}}
    if etype is E.FAILED:
        kind = ("error", "timeout", "expired", "interrupted")[c % 4]
        return {"error": f"boom {c}", "kind": kind, "metrics": {"ms": c}}
    if etype is E.CANCELLED:
        return {"reason": "cancelled by user"}
    if etype is E.RETRYING:
        return {"error": "flaky", "kind": "error", "not_before": 1e9 + c, "attempt": 1}
    if etype is E.REQUEUED:
        if c % 2:
            return {"reason": "shutting down", "count_attempt": False}
        return {"reason": "interrupted by restart"}
    if etype is E.WEBHOOK_ATTEMPT:
        ok = c % 3 == 0
        return {
            "ok": ok,
            "status_code": 200 if ok else (500 if c % 2 else None),
            "error": None if ok else "refused",
            "next_attempt_at": None if ok or c % 5 == 0 else 1e9 + c,
            "attempt": 1 + c % 4,
        }
    if etype is E.WEBHOOK_REDELIVER:
        return {"at": 1e9 + c}
    return {}


def legal_steps(
    choices: Sequence[tuple[int, int, int, float]], *, shared_keys: bool = True
) -> list[Step]:
    """A legal event sequence driven by `choices` (see module docstring).

    `shared_keys=False` gives every keyed run its own idempotency key.
    """
    status: dict[str, Status | None] = {}
    alive: list[str] = []
    steps: list[Step] = []
    n = 0
    for a, b, c, dt in choices:
        sync = bool(a & 2)
        if not alive or a % 4 == 0:
            n += 1
            rid = f"run_{n:04d}"
            keyed = c % 3 == 0
            key = (f"k{c % 4}" if shared_keys else f"k{n}") if keyed else None
            spec = RunSpec(
                prompt=f"prompt {n} \u2603",
                config={"temperature": 0.5} if b % 4 == 0 else {},
                session_id=f"s{c % 3}" if c % 2 else None,
                priority=b % 3,
                timeout=30.0 if b % 5 == 0 else None,
                max_attempts=1 + b % 3,
                webhook_url="https://hooks.example/x" if c % 7 == 0 else None,
                idempotency_key=key,
                request_hash=f"h{c}" if keyed else None,
                tenant=f"t{b % 2}" if b % 5 < 2 else None,
            )
            steps.append(Step(rid, E.SUBMITTED, spec_to_data(spec), dt, sync))
            status[rid] = Status.QUEUED
            alive.append(rid)
            continue
        rid = alive[b % len(alive)]
        before = status[rid]
        options = LEGAL[before]
        etype = options[c % len(options)]
        after = machine.TRANSITIONS[before, etype]
        status[rid] = after
        if after is None:
            alive.remove(rid)
        steps.append(Step(rid, etype, _data(etype, c), dt, sync or etype is E.DELETED))
    return steps


class FakeClock:
    """The journal's clock: tests move it; events carry its time."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def drive(journal: Journal, clock: FakeClock, steps: Sequence[Step]) -> list[Event]:
    """Append `steps` through the journal (writer must be running); return the events.

    Non-sync appends are not awaited one by one (like progress in the engine), but every
    ticket is awaited before returning, so the caller sees a settled journal.
    """
    tickets = []
    for step in steps:
        clock.now += step.dt
        ticket = journal.append(step.run, step.type, step.data, sync=step.sync)
        tickets.append(ticket)
        if step.sync:
            await ticket.wait()
    return [await t.wait() for t in tickets]


def replay_dir(directory: Path, **kwargs: Any) -> tuple[State, Journal]:
    """A fresh State folded from the journal in `directory` (the journal is left open)."""
    state = State()
    journal = Journal(directory, "fsync", **kwargs)
    journal.open(lambda e: apply(state, e))
    return state, journal


def snapshot(state: State, *, with_last_seq: bool = True) -> dict[str, Any]:
    """Everything a State holds, in comparable form (deleted runs squeezed out of order)."""
    alive = [r for r in state.order if r.id in state.runs]
    snap: dict[str, Any] = {
        "runs": dict(state.runs),
        "order": [r.id for r in alive],
        "order_seqs": [r.seq for r in alive],
        "by_status": {s: list(ids) for s, ids in state.by_status.items()},
        "by_session": {k: list(v) for k, v in state.by_session.items()},
        "idempotency": dict(state.idempotency),
    }
    if with_last_seq:
        snap["last_seq"] = state.last_seq
    return snap


def reference_idempotency(events: Sequence[Event]) -> dict[tuple[str | None, str], str]:
    """What `State.idempotency` must hold: per (tenant, key), the newest run submitted with
    it, as long as that run was not deleted."""
    newest: dict[tuple[str | None, str], str] = {}
    deleted: set[str] = set()
    for ev in events:
        if ev.type is E.SUBMITTED and ev.data.get("idempotency_key") is not None:
            newest[ev.data.get("tenant"), ev.data["idempotency_key"]] = ev.run
        elif ev.type is E.DELETED:
            deleted.add(ev.run)
    return {k: rid for k, rid in newest.items() if rid not in deleted}


def make_journal(
    directory: Path | None,
    clock: FakeClock | None = None,
    durability: str = "fsync",
    **kwargs: Any,
) -> tuple[Journal, State]:
    """An opened journal whose replay and commits both fold into the returned State."""
    state = State()

    def on_commit(events: list[Event]) -> None:
        for e in events:
            apply(state, e)

    journal = Journal(
        directory,
        durability,  # type: ignore[arg-type]
        on_commit,
        clock=clock if clock is not None else FakeClock(),
        **kwargs,
    )
    journal.open(lambda e: apply(state, e))
    return journal, state
