"""`Engine.subscribe`: the past from the journal, then live events, with no gap and no
duplicate at the switch, ending after the terminal event; slow subscribers fall back to
the journal instead of growing memory."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
from test_engine_support import WALL0, scripted_engine, until
from trio.testing import MockClock

from agentjobs import Engine, Event, EventType, Status

E = EventType


async def collect(engine: Engine, run_id: str, after: int = 0, delay: float = 0.0) -> list[Event]:
    """Every event the stream gives; fails (in virtual time) if it never ends."""
    out = []
    with trio.fail_after(3600):
        async for ev in engine.subscribe(run_id, after):
            out.append(ev)
            if delay:
                await trio.sleep(delay)
    return out


def seqs(events: list[Event]) -> list[int]:
    return [e.seq for e in events]


@pytest.mark.parametrize("durability", ["memory", "fsync"])
async def test_subscribers_joining_at_any_moment_see_every_event_once(
    autojump_clock: MockClock, tmp_path: Path, durability: str
) -> None:
    rng = random.Random(11)
    data_dir = tmp_path if durability == "fsync" else None
    async with scripted_engine(data_dir, durability=durability) as (engine, _):
        run = await engine.submit("x", config={"do": "output", "n": 60, "every": 0.07})
        results: list[tuple[int, list[Event]]] = []

        async def late_subscriber(at: float, after_from: str) -> None:
            await trio.sleep(at)
            after = 0
            if after_from == "now":
                after = engine.get(run.id).last_seq
            elif after_from == "random":
                history = await engine.events(run.id)
                after = rng.choice(history).seq
            results.append((after, await collect(engine, run.id, after)))

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(
                    late_subscriber, rng.uniform(0, 5), rng.choice(["zero", "now", "random"])
                )
        full = await engine.events(run.id)
        assert full[-1].type is E.SUCCEEDED
        for after, got in results:
            assert seqs(got) == [e.seq for e in full if e.seq > after]
            assert got == [e for e in full if e.seq > after]
        assert engine.bus.subscriber_count == 0


@pytest.mark.parametrize("page_size", [256, 3])
async def test_events_committed_while_the_past_is_read_are_not_lost_or_repeated(
    autojump_clock: MockClock, tmp_path: Path, page_size: int
) -> None:
    async with scripted_engine(tmp_path) as (engine, _):
        engine.bus.tail_events = 0  # no in-memory tail: the past comes from the journal
        engine.bus.page_size = page_size
        run = await engine.submit("x", config={"do": "output", "n": 40, "every": 0.06})
        await trio.sleep(1)
        real = engine._read_history
        reads: list[int] = []

        async def slow_read(run_id: str, after: int, limit: int | None = None) -> list[Event]:
            events = await real(run_id, after, limit)
            reads.append(len(events))
            await trio.sleep(0.5)  # meanwhile more events are committed and pushed live
            return events

        engine._read_history = slow_read  # type: ignore[method-assign]
        got = await collect(engine, run.id)
        engine._read_history = real  # type: ignore[method-assign]
        full = await engine.events(run.id)
        assert seqs(got) == seqs(full)
        assert reads and max(reads) <= page_size
        if page_size == 3:
            assert len(reads) > 1  # the catch-up really went page by page


async def test_a_finished_run_streams_its_history_and_stops(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "output", "n": 3})
        await engine.wait(run.id)
        full = await engine.events(run.id)
        assert await collect(engine, run.id) == full
        assert await collect(engine, run.id, full[-1].seq) == []
        assert await collect(engine, run.id, full[-2].seq) == full[-1:]


async def test_a_stream_ends_after_each_kind_of_terminal_event(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        for config, last in (
            ({"do": "sleep", "s": 1}, E.SUCCEEDED),
            ({"do": "fail"}, E.FAILED),
            ({"do": "hang"}, E.CANCELLED),
        ):
            run = await engine.submit("x", config=config)
            async with trio.open_nursery() as nursery:
                got: list[Event] = []

                async def follow(rid: str = run.id, into: list[Event] = got) -> None:
                    into.extend(await collect(engine, rid))

                nursery.start_soon(follow)
                if last is E.CANCELLED:
                    await until(lambda rid=run.id: engine.get(rid).status is Status.RUNNING)
                    await engine.cancel(run.id)
            assert got[-1].type is last


async def test_a_retried_run_streams_through_its_retries(autojump_clock: MockClock) -> None:
    async with scripted_engine(retry_base_s=5) as (engine, _):
        run = await engine.submit("x", config={"do": "flaky", "fails": 2}, max_attempts=3)
        got = await collect(engine, run.id)
        types = [e.type for e in got]
        assert types.count(E.RETRYING) == 2 and types[-1] is E.SUCCEEDED


async def test_slow_subscriber_falls_back_to_the_journal_with_bounded_memory(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with scripted_engine(tmp_path) as (engine, _):
        engine.bus.buffer_limit = 8
        run = await engine.submit("x", config={"do": "output", "n": 200, "every": 0.06})
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, engine.bus.buffered())
                await trio.sleep(0.01)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            slow = await collect(engine, run.id, delay=0.5)  # ~8x slower than the producer
            fast = await collect(engine, run.id)
            nursery.cancel_scope.cancel()
        full = await engine.events(run.id)
        assert len(full) > 200
        assert seqs(slow) == seqs(full) == seqs(fast)
        assert engine.bus.overflows >= 1
        assert peak <= 8


async def test_a_fast_subscriber_is_not_held_back_by_a_slow_one(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine() as (engine, _):
        engine.bus.buffer_limit = 4
        run = await engine.submit("x", config={"do": "output", "n": 50, "every": 0.1})
        arrival: dict[int, float] = {}

        async def fast() -> None:
            async for ev in engine.subscribe(run.id):
                arrival[ev.seq] = trio.current_time()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(fast)
            nursery.start_soon(collect, engine, run.id, 0, 2.0)
        for ev in await engine.events(run.id):
            assert arrival[ev.seq] == pytest.approx(ev.ts - WALL0, abs=0.01)  # live, not late


async def test_leaving_a_stream_early_unregisters_the_subscriber(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "output", "n": 100, "every": 0.1})
        stream = engine.subscribe(run.id)
        async for ev in stream:
            if ev.type is E.OUTPUT:
                break
        assert engine.bus.subscriber_count == 1
        await stream.aclose()  # type: ignore[attr-defined]
        assert engine.bus.subscriber_count == 0
        with trio.move_on_after(1):
            async for _ in engine.subscribe(run.id):
                pass
        assert engine.bus.subscriber_count == 0
        await engine.cancel(run.id)


async def test_publish_costs_nothing_without_subscribers(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "output", "n": 10})
        await engine.wait(run.id)
        assert engine.bus.subscriber_count == 0 and engine.bus._subs == {}


async def test_events_after_and_limit(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "output", "n": 10, "every": 0.1})
        await engine.wait(run.id)
        full = await engine.events(run.id)
        assert await engine.events(run.id, full[3].seq, limit=2) == full[4:6]
        assert await engine.events(run.id, full[-1].seq) == []
        assert await engine.events(run.id, limit=1) == full[:1]
