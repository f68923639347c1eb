"""Graceful shutdown, crash recovery and replay: what a restart must make of the journal.

A crash is simulated with `Engine._abort()`: every task stops at once and nothing more is
recorded, which leaves on disk exactly what a `kill -9` would (`test_kill9.py` does the
real thing with a child process; `test_engine_stateful.py` also cuts unsynced bytes).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_engine_support import (
    Scripted,
    TrackingHooks,
    last_segment,
    normalise,
    replay_dir,
    scripted_engine,
    until,
    wall,
)
from trio.testing import MockClock

from agentjobs import EventType, NotFound, Status, open_engine
from agentjobs.engine.journal import JournalCorrupt

E = EventType


async def test_graceful_shutdown_lets_short_runs_finish_and_requeues_the_rest(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    runner = Scripted()
    async with scripted_engine(tmp_path, runner=runner, grace_period_s=10) as (engine, _):
        quick = await engine.submit("quick", config={"do": "sleep", "s": 5})
        slow = await engine.submit("slow", config={"do": "sleep", "s": 500}, max_attempts=1)
        queued_later = await engine.submit("later", priority=-1, config={"do": "hang"})
        await until(lambda: slow.id in runner.running)
        t0 = trio.current_time()
    assert trio.current_time() - t0 == pytest.approx(10, abs=0.1)  # the grace period
    assert slow.id in runner.cancelled and not runner.running
    async with scripted_engine(tmp_path, runner=runner, grace_period_s=10) as (engine, _):
        assert engine.get(quick.id).status is Status.SUCCEEDED
        resumed = engine.get(slow.id)
        # requeued with its attempt given back, so even a single-attempt run resumes
        assert (resumed.status, resumed.attempt) == (
            Status.QUEUED,
            0,
        ) or resumed.status is Status.RUNNING
        done = await engine.wait(slow.id)
        assert (done.status, done.attempt) == (Status.SUCCEEDED, 1)
        types = [e.type for e in await engine.events(slow.id)]
        assert types == [E.SUBMITTED, E.STARTED, E.REQUEUED, E.STARTED, E.SUCCEEDED]
        assert engine.recovered["requeued"] == 0  # nothing was left running
        await engine.cancel(queued_later.id)


async def test_shutdown_waits_for_runners_to_really_stop(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    runner = Scripted()
    async with scripted_engine(tmp_path, runner=runner, grace_period_s=1) as (engine, _):
        run = await engine.submit("x", config={"do": "stubborn", "cleanup_s": 7})
        await until(lambda: run.id in runner.running)
        t0 = trio.current_time()
    assert trio.current_time() - t0 == pytest.approx(8, abs=0.1)
    assert not runner.running
    async with scripted_engine(tmp_path, runner=runner) as (engine, _):
        assert engine.get(run.id).status is Status.QUEUED or engine.get(run.id).attempt == 1
        runner.release_all()
        assert (await engine.wait(run.id)).status is Status.SUCCEEDED


async def test_crash_recovery_requeues_fails_or_cancels_what_was_running(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    runner = Scripted()
    async with scripted_engine(tmp_path, runner=runner, max_concurrency=4) as (engine, _):
        again = await engine.submit("again", config={"do": "hang"}, max_attempts=2)
        once = await engine.submit("once", config={"do": "hang"}, max_attempts=1)
        stopping = await engine.submit("stopping", config={"do": "stubborn", "cleanup_s": 100})
        await until(lambda: len(runner.running) == 3)
        got = await engine.cancel(stopping.id, wait=1)
        assert got.cancel_requested and got.status is Status.RUNNING  # acknowledged
        engine._abort()
    assert not runner.running  # the crash stopped every runner
    runner.release_all()
    async with scripted_engine(tmp_path, runner=runner) as (engine, _):
        assert engine.recovered == {"requeued": 1, "failed": 1, "cancelled": 1, "queued": 0}
        failed = engine.get(once.id)
        assert (failed.status, failed.error, failed.error_kind) == (
            Status.FAILED,
            "interrupted by restart",
            "interrupted",
        )
        assert engine.get(stopping.id).status is Status.CANCELLED
        done = await engine.wait(again.id)
        assert (done.status, done.attempt) == (Status.SUCCEEDED, 2)  # the crash cost an attempt


async def test_queued_runs_keep_their_order_across_a_crash(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    runner = Scripted()
    async with scripted_engine(tmp_path, runner=runner, max_concurrency=1) as (engine, _):
        # running at the crash, with an attempt left and the highest priority: recovery
        # requeues it, and it must still go first (nothing starts before recovery is done)
        first = await engine.submit("first", config={"do": "hang"}, max_attempts=2, priority=5)
        await until(lambda: first.id in runner.running)
        priorities = [0, 2, 1, 2, 0, 1]
        ids = [(await engine.submit(f"p{p}", priority=p)).id for p in priorities]
        engine._abort()
    started_before = len(runner.started)
    runner.release_all()
    async with scripted_engine(tmp_path, runner=runner, max_concurrency=1) as (engine, _):
        assert engine.recovered["requeued"] == 1 and engine.recovered["queued"] == 6
        for rid in ids:
            await engine.wait(rid)
    ordered = sorted((-p, i, r) for i, (p, r) in enumerate(zip(priorities, ids, strict=True)))
    assert runner.started[started_before:] == [first.id] + [r for _, _, r in ordered]


async def test_a_pending_retry_keeps_its_backoff_across_a_restart(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    runner = Scripted()
    async with scripted_engine(tmp_path, runner=runner, retry_base_s=600) as (engine, _):
        run = await engine.submit("x", config={"do": "flaky"}, max_attempts=2)
        await until(lambda: engine.get(run.id).not_before is not None)
        not_before = engine.get(run.id).not_before
    async with scripted_engine(tmp_path, runner=runner, retry_base_s=600) as (engine, _):
        done = await engine.wait(run.id)
        second = [e for e in await engine.events(run.id) if e.type is E.STARTED][1]
        assert done.status is Status.SUCCEEDED
        assert not_before is not None and second.ts >= not_before


async def test_ttl_counts_across_a_restart(autojump_clock: MockClock, tmp_path: Path) -> None:
    runner = Scripted()
    async with scripted_engine(tmp_path, runner=runner, max_concurrency=1) as (engine, _):
        blocker = await engine.submit("block", config={"do": "hang"}, max_attempts=1)
        await until(lambda: blocker.id in runner.running)
        run = await engine.submit("x", ttl=100)
        await trio.sleep(60)
    await trio.sleep(60)  # down for a minute: the run has now waited 120 s
    async with scripted_engine(tmp_path, runner=runner, max_concurrency=1) as (engine, _):
        done = await engine.wait(run.id, timeout=1)
        assert (done.status, done.error_kind) == (Status.FAILED, "expired")


async def test_replayed_state_equals_live_state(autojump_clock: MockClock, tmp_path: Path) -> None:
    runner = Scripted()
    async with scripted_engine(
        tmp_path, runner=runner, max_concurrency=3, session_concurrency=1, retry_base_s=2
    ) as (engine, _):
        ids = []
        for i, do in enumerate(["ok", "fail", "flaky", "hang", "boom", "output", "sleep", "retry"]):
            run = await engine.submit(
                f"p{i}",
                config={"do": do, "n": 5, "every": 0.1, "s": 3},
                session_id=f"s{i % 3}",
                max_attempts=2,
                idempotency_key=f"k{i}",
                priority=i % 2,
                webhook_url="https://example.com/hook" if i % 4 == 0 else None,
            )
            ids.append(run.id)
        await trio.sleep(1)
        await engine.cancel(ids[3])
        for rid in ids:
            await engine.wait(rid)
        await engine.delete(ids[0])
        live = normalise(engine.state)
        journal_dir = tmp_path / "journal"
        assert normalise(replay_dir(journal_dir)) == live
    async with scripted_engine(tmp_path, runner=runner) as (engine, _):
        assert normalise(engine.state) == live


async def test_a_corrupt_journal_refuses_to_open_and_releases_its_lock(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with scripted_engine(tmp_path) as (engine, _):
        for _ in range(3):
            await engine.wait((await engine.submit("x")).id)
    segment = last_segment(tmp_path / "journal")
    good = segment.read_bytes()
    lines = good.split(b"\n")
    assert b'"prompt":"x"' in lines[1]
    lines[1] = lines[1].replace(b'"prompt":"x"', b'"prompt":"y"')  # damage with intact lines after
    segment.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalCorrupt) as info:
        async with open_engine(tmp_path, wall_clock=wall):
            pass
    assert info.value.line == 2
    segment.write_bytes(good)  # repaired: the same process may open it now
    async with open_engine(tmp_path, wall_clock=wall) as engine:
        assert engine.count() == 3


async def test_a_torn_last_line_is_cut_and_the_rest_is_kept(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hooks = TrackingHooks()
    async with scripted_engine(tmp_path, journal_hooks=hooks) as (engine, _):
        ids = [(await engine.submit(f"x{i}")).id for i in range(3)]
        for rid in ids:
            await engine.wait(rid)
    segment = last_segment(tmp_path / "journal")
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # the last line (the third run's terminal) is torn
    async with scripted_engine(tmp_path) as (engine, _):
        assert engine.replay_report is not None and engine.replay_report.torn_bytes > 0
        assert [engine.get(r).status for r in ids[:2]] == [Status.SUCCEEDED] * 2
        # the torn run was `running` as far as the journal knows, with no attempt left
        torn = engine.get(ids[2])
        assert (torn.status, torn.error_kind) == (Status.FAILED, "interrupted")


async def test_compaction_drops_old_finished_runs_and_keeps_state_equal_to_replay(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    runner = Scripted()
    async with scripted_engine(
        tmp_path, runner=runner, retention_s=3600.0, compact_interval_s=600.0
    ) as (engine, _):
        old = await engine.submit("old")
        await engine.wait(old.id)
        waiting = await engine.submit("waiting", config={"do": "gate"})
        await trio.sleep(3000)
        recent = await engine.submit("recent")
        await engine.wait(recent.id)
        assert engine.count() == 3
        await trio.sleep(1200)  # old is past retention now; the scheduled compaction runs
        with pytest.raises(NotFound):
            engine.get(old.id)
        assert {r.id for r in engine.list().runs} == {waiting.id, recent.id}
        assert normalise(replay_dir(tmp_path / "journal")) == normalise(engine.state)
        runner.open(waiting.id)
        assert (await engine.wait(waiting.id)).status is Status.SUCCEEDED
        live = normalise(engine.state)
    async with scripted_engine(tmp_path, runner=runner) as (engine, _):
        assert normalise(engine.state) == live
