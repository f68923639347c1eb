"""Scheduling: priorities, FIFO, global and per-session limits, queue depth, slot hand-back.

The `Scripted` runner records the order runs start in and how many execute at once, from
inside the runner, so these tests check what actually ran, not the engine's bookkeeping.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from test_engine_support import Scripted, scripted_engine, start_order, until
from trio.testing import MockClock

from agentjobs import QueueFull, Status
from agentjobs.engine import EngineConfig


async def block_slots(engine, runner: Scripted, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    """Occupy `n` slots with gated runs so that what is submitted next stays queued."""
    ids = [(await engine.submit(f"blocker {i}", config={"do": "gate"})).id for i in range(n)]
    await until(lambda: len(runner.waiting()) == n)
    return ids


async def test_higher_priority_first_fifo_within_a_priority(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=1) as (engine, runner):
        (blocker,) = await block_slots(engine, runner, 1)
        priorities = [0, 5, 1, 5, 0, -3, 1, 5, 0]
        ids = [(await engine.submit(f"p{p}", priority=p)).id for p in priorities]
        runner.open(blocker)
        for rid in ids:
            await engine.wait(rid)
        expected = [
            rid
            for _, _, rid in sorted(
                (-p, i, rid) for i, (p, rid) in enumerate(zip(priorities, ids, strict=True))
            )
        ]
        assert runner.started[1:] == expected


async def test_max_concurrency_is_never_exceeded_and_is_used(autojump_clock: MockClock) -> None:
    rng = random.Random(7)
    async with scripted_engine(max_concurrency=3) as (engine, runner):
        ids = [
            (await engine.submit("x", config={"do": "sleep", "s": rng.uniform(0.1, 5)})).id
            for _ in range(40)
        ]
        peak = 0
        while not all(engine.get(r).finished for r in ids):
            peak = max(peak, engine.supervisor.running_count)
            assert engine.supervisor.running_count <= 3
            await trio.sleep(0.05)
        assert runner.max_running == 3 and peak == 3
        assert engine.supervisor.peak_running == 3


async def test_a_freed_slot_is_taken_at_once(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=2) as (engine, runner):
        a, b = await block_slots(engine, runner, 2)
        c = await engine.submit("c")
        runner.open(a)
        t0 = trio.current_time()
        done = await engine.wait(c.id)
        assert done.status is Status.SUCCEEDED and trio.current_time() == t0
        runner.open(b)


async def test_session_runs_go_one_at_a_time_in_submission_order(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine(max_concurrency=4, session_concurrency=1) as (engine, runner):
        rng = random.Random(3)
        subs: dict[str, list[str]] = {"a": [], "b": [], "c": []}
        for i in range(30):
            session = rng.choice("abc")
            # priorities order runs across sessions, never within one
            run = await engine.submit(
                f"{session}{i}",
                session_id=session,
                priority=rng.randint(-2, 2),
                config={"do": "sleep", "s": rng.uniform(0.1, 2)},
            )
            subs[session].append(run.id)
        free = await engine.submit("free", config={"do": "sleep", "s": 1})
        for ids in subs.values():
            for rid in ids:
                await engine.wait(rid)
        await engine.wait(free.id)
        assert runner.max_session == 1
        for ids in subs.values():
            assert [r for r in runner.started if r in set(ids)] == ids
        assert runner.max_running >= 3  # sessions do run in parallel with each other


async def test_session_limit_above_one(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=10, session_concurrency=2) as (engine, runner):
        ids = [
            (await engine.submit("x", session_id="s", config={"do": "sleep", "s": 1})).id
            for _ in range(7)
        ]
        for rid in ids:
            await engine.wait(rid)
        assert runner.max_session == 2
        assert await start_order(engine, ids) == ids


async def test_a_session_waits_for_its_head_to_retry(autojump_clock: MockClock) -> None:
    async with scripted_engine(session_concurrency=1, retry_base_s=100) as (engine, runner):
        first = await engine.submit("1", session_id="s", config={"do": "flaky"}, max_attempts=2)
        second = await engine.submit("2", session_id="s")
        done = await engine.wait(second.id)
        assert done.status is Status.SUCCEEDED
        assert runner.started == [first.id, first.id, second.id]
        assert engine.get(first.id).status is Status.SUCCEEDED


async def test_cancelling_a_session_head_lets_the_next_one_start(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine(max_concurrency=1, session_concurrency=1) as (engine, runner):
        (blocker,) = await block_slots(engine, runner, 1)
        head = await engine.submit("head", session_id="s")
        nxt = await engine.submit("next", session_id="s")
        await engine.cancel(head.id)
        runner.open(blocker)
        assert (await engine.wait(nxt.id)).status is Status.SUCCEEDED
        assert head.id not in runner.started
        assert engine.supervisor._sessions == {}  # bookkeeping of idle sessions is dropped


async def test_runs_without_a_session_ignore_the_session_limit(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=5, session_concurrency=1) as (engine, runner):
        ids = [(await engine.submit("x", config={"do": "sleep", "s": 1})).id for _ in range(5)]
        for rid in ids:
            await engine.wait(rid)
        assert runner.max_running == 5


async def test_queue_full_refuses_with_a_retry_hint(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=1, max_queue=3) as (engine, runner):
        (blocker,) = await block_slots(engine, runner, 1)
        queued = [await engine.submit("x") for _ in range(3)]
        with pytest.raises(QueueFull) as info:
            await engine.submit("one too many")
        assert 1 <= info.value.retry_after <= 60
        assert engine.count() == 4
        await engine.cancel(queued[0].id)
        await engine.submit("room again")  # a cancel frees a place
        runner.open(blocker)


async def test_queue_limit_counts_submits_in_flight(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    async with scripted_engine(tmp_path, max_concurrency=1, max_queue=5) as (engine, runner):
        await block_slots(engine, runner, 1)
        outcomes: list[str] = []

        async def submit() -> None:
            try:
                await engine.submit("x")
                outcomes.append("ok")
            except QueueFull:
                outcomes.append("full")

        async with trio.open_nursery() as nursery:
            for _ in range(12):
                nursery.start_soon(submit)
        assert outcomes.count("ok") == 5 and outcomes.count("full") == 7
        assert engine.supervisor.queued_count == 5
        runner.release_all()


async def test_retry_hint_follows_the_pace_of_starts(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=1, max_queue=2) as (engine, _):
        for _ in range(8):  # one start every 10 s
            await until(lambda: engine.supervisor.queued_count < 2)
            await engine.submit("x", config={"do": "sleep", "s": 10})
        with pytest.raises(QueueFull) as info:
            for _ in range(3):
                await engine.submit("x", config={"do": "sleep", "s": 10})
        # each start frees one place in the queue: about one every 10 s
        assert 5 <= info.value.retry_after <= 11


async def test_retried_run_cannot_start_while_its_actor_is_registered(
    autojump_clock: MockClock,
) -> None:
    """Regression: with zero backoff and a free slot, the supervisor used to start a retried
    run before its previous actor had deregistered; the new actor overwrote the old one in
    `actors` and was then popped by the old one's exit, so it ran unseen by cancel and by
    the concurrency limit. The hand-back now happens in the commit of `retrying` itself."""
    async with scripted_engine(max_concurrency=2, retry_base_s=0) as (engine, runner):
        run = await engine.submit("x", config={"do": "flaky", "fails": 8, "s": 0.5}, max_attempts=9)
        while not engine.get(run.id).finished:
            if run.id in runner.running:
                assert run.id in engine.supervisor.actors
            await trio.sleep(0.1)
        assert engine.get(run.id).attempt == 9
        assert engine.supervisor.actors == {}


async def test_run_for_a_runner_no_longer_configured_fails(
    tmp_path: Path, autojump_clock: MockClock
) -> None:
    async with scripted_engine(tmp_path, max_concurrency=1) as (engine, runner):
        await block_slots(engine, runner, 1)
        orphan = await engine.submit("x", runner="echo")
    from test_engine_support import wall

    from agentjobs import open_engine

    async with open_engine(tmp_path, runners={"s": Scripted()}, wall_clock=wall) as engine:
        done = await engine.wait(orphan.id)
        assert done.status is Status.FAILED
        assert done.error == "runner 'echo' is not configured on this server"


def test_config_rejects_nonsense() -> None:
    for bad in (
        {"max_concurrency": 0},
        {"session_concurrency": 0},
        {"max_queue": 0},
        {"retry_base_s": -1},
        {"grace_period_s": float("nan")},
        {"default_timeout": 0},
        {"default_max_attempts": 0},
    ):
        with pytest.raises(ValueError):
            EngineConfig(**bad)  # type: ignore[arg-type]


async def test_one_session_id_in_two_tenants_is_two_sessions(autojump_clock: MockClock) -> None:
    """Session ids are the clients' choice: tenant B picking the id tenant A uses must not
    queue B's runs behind A's (nor A's behind B's)."""
    async with scripted_engine(max_concurrency=4, session_concurrency=1) as (engine, _):
        slow = {"do": "sleep", "s": 5}
        a1 = await engine.submit("a1", session_id="s", tenant="alice", config=slow)
        b1 = await engine.submit("b1", session_id="s", tenant="bob", config=slow)
        a2 = await engine.submit("a2", session_id="s", tenant="alice", config=slow)
        await trio.sleep(1)
        status = {
            r.id: engine.get(r.id, tenant=t).status
            for r, t in ((a1, "alice"), (b1, "bob"), (a2, "alice"))
        }
        assert status[a1.id] is Status.RUNNING
        assert status[b1.id] is Status.RUNNING  # not behind alice's run
        assert status[a2.id] is Status.QUEUED  # behind alice's own
        for run, tenant in ((a1, "alice"), (b1, "bob"), (a2, "alice")):
            assert (await engine.wait(run.id, tenant=tenant)).status is Status.SUCCEEDED
