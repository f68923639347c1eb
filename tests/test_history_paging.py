"""Reading a run's history from a point, as streams and `/events` do: from the bus's
in-memory tail of a live run or from the journal, a page at a time, with the progress
folded up to the point looked up backwards. Whatever the source, the answer must be
exactly what reading the whole history from the start gives."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trio
from live_server import open_live_server, read_stream

from agentjobs import Engine, Event, EventType, RunContext, RunError
from agentjobs.engine import open_engine
from agentjobs.engine.bus import TAIL_OVERHEAD, Bus, event_bytes
from agentjobs.http.sse import FrameBuilder, resume_builder

E = EventType


class Stepper:
    """Partial progress reports (each key on its own), output, one retryable failure
    (a second `started` resets progress), then a gate that keeps the run live."""

    def __init__(self, outputs: int = 30) -> None:
        self.gate = trio.Event()
        self.waiting = trio.Event()
        self.outputs = outputs

    async def run(self, ctx: RunContext) -> str:
        if ctx.attempt == 1:
            ctx.progress(10.0, "a", steps_total=5, steps_completed=1)
            await trio.sleep(0.08)  # the engine coalesces reports made within 50 ms
            ctx.output("first ")
            await trio.sleep(0.08)
            ctx.progress(step="b")
            await trio.sleep(0.08)
            raise RunError("flaky", retryable=True)
        # attempt 2 starts from nothing: no key of attempt 1 may leak into its frames
        ctx.progress(step="c")
        await trio.sleep(0.08)
        ctx.output("second ")
        await trio.sleep(0.08)
        ctx.progress(steps_completed=2)
        await trio.sleep(0.08)
        for i in range(self.outputs):
            ctx.output(f"{i} ")
            await trio.sleep(0.06)
        ctx.progress(percentage=60.0)
        await trio.sleep(0.08)
        self.waiting.set()
        await self.gate.wait()
        return "done"


def frames_of(events: list[Event], job: str, builder: FrameBuilder | None = None) -> list[Any]:
    builder = builder if builder is not None else FrameBuilder(job)
    out = []
    for ev in events:
        frames = builder.frames(ev)
        for i, (name, data) in enumerate(frames, start=1):
            out.append((str(ev.seq) if i == len(frames) else f"{ev.seq}.{i}", name, data))
    return out


async def frames_from(engine: Engine, job: str, after: int) -> list[Any]:
    """Frames of the events after `after`, as a stream resuming there builds them."""
    builder = await resume_builder(engine, job, after)
    events: list[Event] = []
    run = engine.get(job)
    if not run.finished and after >= run.last_seq:
        return []  # nothing committed after it yet: a live stream would wait
    with trio.fail_after(20):
        async for ev in engine.subscribe(job, after):
            events.append(ev)
            if ev.seq >= engine.get(job).last_seq and not engine.get(job).finished:
                break  # live: stop at what is committed so far
    return frames_of(events, job, builder)


async def check_every_resume_point(engine: Engine, job: str) -> None:
    full_events = await engine.events(job)
    full = frames_of(full_events, job)
    assert any(f[1] == "progress" for f in full)
    points = sorted({0} | {e.seq for e in full_events} | {e.seq - 1 for e in full_events})
    for after in points:
        expected = [f for f in full if int(f[0].split(".")[0]) > after]
        assert await frames_from(engine, job, after) == expected, after


@pytest.mark.parametrize("durability", ["memory", "fsync"])
@pytest.mark.parametrize("tail_events", [256, 6, 0])
async def test_resuming_anywhere_folds_progress_like_reading_from_the_start(
    tmp_path: Path, durability: str, tail_events: int
) -> None:
    """Live (from the tail, or the journal when the tail is short or off) and finished
    (from the journal): the frames after every point equal the full stream's suffix."""
    runner = Stepper()
    data_dir = tmp_path if durability == "fsync" else None
    async with open_engine(
        data_dir,
        runners={"step": runner},
        default_runner="step",
        durability=durability,
        retry_base_s=0.01,
    ) as engine:
        engine.bus.tail_events = tail_events
        run = await engine.submit("x", max_attempts=2)
        with trio.fail_after(30):
            await runner.waiting.wait()
            await trio.sleep(0.2)
        assert engine.get(run.id).attempt == 2
        before = engine.bus.stats()
        await check_every_resume_point(engine, run.id)
        after = engine.bus.stats()
        if tail_events == 256:  # the whole run fits in the tail: no journal read at all
            assert after["catch_ups_from_journal"] == before["catch_ups_from_journal"]
            assert after["catch_ups_from_tail"] > before["catch_ups_from_tail"]
        if tail_events == 0:
            assert after["catch_ups_from_tail"] == before["catch_ups_from_tail"]
        runner.gate.set()
        await engine.wait(run.id, 20)
        await check_every_resume_point(engine, run.id)
        assert engine.bus.tail_count == 0  # finished and nobody following: tail gone


async def test_a_stream_joining_a_live_run_gets_what_the_journal_gives(tmp_path: Path) -> None:
    """Over HTTP: streams opened at every moment of a live run (served from the tail)
    and resumed at every frame, against the stream of the finished run (the journal)."""
    runner = Stepper(outputs=10)
    async with open_live_server(
        tmp_path / "data", runners={"step": runner}, default_runner="step"
    ) as srv:
        engine = srv.engine
        c = srv.client
        r = await c.post("/api/v1/runs", json={"prompt": "x", "max_attempts": 2, "config": {}})
        assert r.status_code == 202, r.text
        job = r.json()["job_id"]
        live_frames: list[tuple[str, list[Any]]] = []

        async def join_now(last_id: str | None) -> None:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            status, frames, _ = await read_stream(c, job, headers=headers)
            assert status == 200
            live_frames.append((last_id or "0", frames))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(join_now, None)
                await runner.waiting.wait()
                page = (await c.get(f"/api/v1/runs/{job}/events?limit=1000")).json()["events"]
                for frame in page:  # resume live after every frame seen so far
                    nursery.start_soon(join_now, frame["id"])
                await trio.sleep(0.3)
                assert engine.bus.tail_count == 1
                runner.gate.set()
        assert engine.bus.stats()["catch_ups_from_tail"] >= len(page)
        _, reference, _ = await read_stream(c, job)  # the finished run: from the journal
        ids = [f.id for f in reference]
        for last_id, frames in live_frames:
            start = 0 if last_id == "0" else ids.index(last_id) + 1
            assert frames == reference[start:], last_id
        assert engine.bus.tail_count == 0


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 1000])
async def test_events_pages_add_up_to_the_stream(tmp_path: Path, limit: int) -> None:
    """`/events?after=&limit=` from every frame id: exactly the stream's next frames,
    `more` exactly when some are left, and following `next_after` gives them all."""
    runner = Stepper(outputs=8)
    runner.gate.set()
    async with open_live_server(
        tmp_path / "data", runners={"step": runner}, default_runner="step"
    ) as srv:
        c = srv.client
        r = await c.post("/api/v1/runs", json={"prompt": "x", "max_attempts": 2})
        job = r.json()["job_id"]
        assert (await c.get(f"/api/v1/runs/{job}/result", params={"wait": 30})).status_code == 200
        _, reference, _ = await read_stream(c, job)
        as_items = [{"id": f.id, "event": f.event, "data": f.data} for f in reference]
        for i, start in enumerate(["0"] + [f["id"] for f in as_items]):
            body = (
                await c.get(f"/api/v1/runs/{job}/events", params={"after": start, "limit": limit})
            ).json()
            want = as_items[i : i + limit]
            assert body["events"] == want, start
            assert body["more"] == (i + limit < len(as_items))
            assert body["next_after"] == (want[-1]["id"] if want else start)
        # following next_after page by page
        got: list[Any] = []
        after = "0"
        while True:
            body = (
                await c.get(f"/api/v1/runs/{job}/events", params={"after": after, "limit": limit})
            ).json()
            got += body["events"]
            after = body["next_after"]
            if not body["more"]:
                break
        assert got == as_items and body["finished"]


def _event(seq: int, run: str, text: str) -> Event:
    return Event(seq, 1.8e9, run, E.OUTPUT, {"text": text})


def test_the_tail_memory_stays_within_its_budget() -> None:
    """Thousands of live runs printing a lot: the tails hold at most their budget, by the
    bus's own count and by tracemalloc (the estimate must not undercount)."""
    budget = 2 * 1024 * 1024
    bus = Bus(tail_events=64, tail_bytes=64 * 1024, tail_total_bytes=budget)
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        seq = 0
        for round_ in range(40):
            batch = []
            for r in range(500):
                seq += 1
                run = f"run_{r:05d}"
                if round_ == 0:
                    batch.append(Event(seq, 1.8e9, run, E.SUBMITTED, {"prompt": "p" * 100}))
                else:
                    batch.append(_event(seq, run, f"{seq}" + "x" * (50 + 97 * (seq % 40))))
            bus.publish(batch)
            del batch
            assert bus.tails_bytes <= budget
            assert sum(len(t.events) for t in bus._tails.values()) == bus.tailed()
        held = tracemalloc.get_traced_memory()[0] - base
    finally:
        tracemalloc.stop()
    assert bus.tails_bytes <= budget
    assert held <= budget * 1.1, (held, bus.tails_bytes)
    assert bus.tails_bytes >= held * 0.5, "the estimate should be of the right size"
    for tail in bus._tails.values():
        assert len(tail.events) <= 64
        assert tail.bytes <= 64 * 1024
        assert tail.bytes == TAIL_OVERHEAD + sum(event_bytes(e) for e in tail.events)
    # every tail says truly what it holds: everything after its floor, in order
    for run, tail in bus._tails.items():
        seqs = [e.seq for e in tail.events]
        assert seqs == sorted(seqs) and all(s > tail.floor for s in seqs)
        assert all(e.run == run for e in tail.events)


def test_tails_end_with_their_run_once_nobody_follows() -> None:
    bus = Bus()
    bus.publish([Event(1, 0.0, "a", E.SUBMITTED, {}), Event(2, 0.0, "b", E.STARTED, {})])
    assert bus.tail_count == 2
    assert bus._tails["a"].floor == 0  # the whole run
    assert bus._tails["b"].floor == 1  # began mid-run (after a restart): seq 1 is not in it
    assert bus.tail_before("a", 2, 10) == [Event(1, 0.0, "a", E.SUBMITTED, {})]
    assert bus.tail_before("b", 3, 10) is None  # older events may be in the journal
    bus.publish([Event(3, 0.0, "a", E.SUCCEEDED, {"result": [1, {"x": "y"}]})])
    assert bus.tail_count == 1 and "a" not in bus._tails
    # webhook bookkeeping after the end does not give a finished run a tail again
    bus.publish([Event(4, 0.0, "a", E.WEBHOOK_ATTEMPT, {"ok": True})])
    assert bus.tail_count == 1
    bus.publish([Event(5, 0.0, "b", E.FAILED, {"error": "x"})])
    assert bus.tail_count == 0 and bus.tails_bytes == 0
