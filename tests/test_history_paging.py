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
from hypothesis import event, given, settings
from hypothesis import strategies as st
from live_server import open_live_server, read_stream, wait_until

from agentjobs import Engine, Event, EventType, RunContext, RunError
from agentjobs.engine import journal as journal_mod
from agentjobs.engine import open_engine
from agentjobs.engine.bus import TAIL_OVERHEAD, Bus, event_bytes
from agentjobs.engine.model import PROGRESS_MARK_EVERY, ProgressTrail
from agentjobs.engine.state import State, apply, fold_progress, progress_at
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
    assert bus.tail_at("a", [1]) == [Event(1, 0.0, "a", E.SUBMITTED, {})]
    assert bus.tail_at("b", [2]) == [Event(2, 0.0, "b", E.STARTED, {})]
    assert bus.tail_at("b", [1, 2]) is None  # at or below the floor: ask the journal
    assert bus.tail_at("a", [1, 2]) is None  # seq 2 is not one of a's events
    assert bus.tail_at("c", [1]) is None
    bus.publish([Event(3, 0.0, "a", E.SUCCEEDED, {"result": [1, {"x": "y"}]})])
    assert bus.tail_count == 1 and "a" not in bus._tails
    # webhook bookkeeping after the end does not give a finished run a tail again
    bus.publish([Event(4, 0.0, "a", E.WEBHOOK_ATTEMPT, {"ok": True})])
    assert bus.tail_count == 1
    bus.publish([Event(5, 0.0, "b", E.FAILED, {"error": "x"})])
    assert bus.tail_count == 0 and bus.tails_bytes == 0


# -- resuming a long run: the cost does not grow with its output (review finding) ---------


class TwoGates:
    """Attempt 1 waits for `first` then fails (retryable), attempt 2 waits for `second`;
    the test writes the run's progress and output into the journal meanwhile, as fast as
    the journal takes them (an actor coalesces a runner's own reports)."""

    def __init__(self) -> None:
        self.first = trio.Event()
        self.second = trio.Event()
        self.entered = [trio.Event(), trio.Event()]

    async def run(self, ctx: RunContext) -> str:
        self.entered[ctx.attempt - 1].set()
        if ctx.attempt < ctx.max_attempts:
            await self.first.wait()
            raise RunError("flaky", retryable=True)
        await self.second.wait()
        return "done"


class LineReads:
    """Counts the journal lines looked at (a line's head or the whole line) by history
    reads, in every durability: what a resume costs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        lines = journal_mod._RunLines
        real_head, real_line = lines.head, lines.line

        def head(this: Any, k: int) -> Any:
            self.count += 1
            return real_head(this, k)

        def line(this: Any, k: int) -> bytes:
            self.count += 1
            return real_line(this, k)

        monkeypatch.setattr(lines, "head", head)
        monkeypatch.setattr(lines, "line", line)

    def take(self) -> int:
        n, self.count = self.count, 0
        return n


# A resume reads at most PROGRESS_MARK_EVERY - 1 progress events, each found by a binary
# search of the run's ~21,000 lines (~15 heads) and then read whole: well under this.
RESUME_READS = PROGRESS_MARK_EVERY * 18


async def write_long_run(
    engine: Engine, runner: TwoGates, outputs: int, *, retry: bool = True
) -> str:
    """A run with `outputs` output lines and few progress reports, over two attempts
    (the second `started` resets the progress; one attempt without `retry`), plus a
    stretch of 40 reports (more than two marks of the run's progress trail apart)."""
    journal = engine.journal
    run = await engine.submit("x", max_attempts=2 if retry else 1)
    job = run.id

    async def write(events: list[tuple[EventType, dict[str, Any]]]) -> None:
        ticket = None
        for etype, data in events:
            ticket = journal.append(job, etype, data)
        assert ticket is not None
        await ticket.wait()

    def out(n: int) -> list[tuple[EventType, dict[str, Any]]]:
        return [(E.OUTPUT, {"text": f"line {i}\n"}) for i in range(n)]

    with trio.fail_after(30):
        await runner.entered[0].wait()
    first = outputs // 4
    report = {"percentage": 10.0, "step": "a", "steps_total": 5, "steps_completed": 1}
    await write([(E.PROGRESS, report), *out(first)])
    burst: list[tuple[EventType, dict[str, Any]]] = []
    for i in range(40):
        each = {"steps_completed": i} if i % 3 else {"percentage": float(i), "step": f"s{i}"}
        burst += [(E.PROGRESS, each), *out(3)]
    await write(burst)
    if retry:
        runner.first.set()
        with trio.fail_after(30):
            await runner.entered[1].wait()
    rest = outputs - first - 300
    await write(
        [(E.PROGRESS, {"step": "c"}), *out(rest), (E.PROGRESS, {"percentage": 60.0}), *out(300)]
    )
    return job


def states_after(events: list[Event], job: str) -> dict[int, tuple[Any, ...]]:
    """The frame builder's progress after each event, folding from the start."""
    builder = FrameBuilder(job)
    out: dict[int, tuple[Any, ...]] = {0: (0.0, None, 0, None)}
    for ev in events:
        builder.frames(ev)
        out[ev.seq] = (
            builder.percentage,
            builder.step,
            builder.steps_completed,
            builder.steps_total,
        )
    return out


async def check_long_run_resumes(engine: Engine, job: str, reads: LineReads) -> None:
    full_events = await engine.events(job)
    states = states_after(full_events, job)
    seqs = [e.seq for e in full_events]
    changed = [
        i for i, e in enumerate(full_events) if e.type in (E.PROGRESS, E.STARTED, E.SUCCEEDED)
    ]
    points = {0, *seqs[-300:], *seqs[::997]}
    for i in changed:
        points.update(seqs[max(0, i - 2) : i + 3])
    last_change = full_events[changed[-1]].seq
    reads.take()
    for after in sorted(points):
        builder = await resume_builder(engine, job, after)
        cost = reads.take()
        assert cost <= RESUME_READS, (after, cost)
        if after >= last_change:
            assert cost == 0, after  # the run's own progress, nothing read
        got = (builder.percentage, builder.step, builder.steps_completed, builder.steps_total)
        want = states[max(s for s in states if s <= after)]
        assert got == want, after
    # and the frames of late resumes equal the full stream's suffix
    full = frames_of(full_events, job)
    for after in seqs[-40:]:
        expected = [f for f in full if int(f[0].split(".")[0]) > after]
        assert await frames_from(engine, job, after) == expected, after


@pytest.mark.parametrize("durability", ["memory", "fsync"])
async def test_resuming_a_long_run_reads_a_bounded_number_of_lines(
    tmp_path: Path, durability: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20,000 output lines and few progress reports: a resume anywhere (live, when the
    bus's tail holds only the last 256 events, and finished) reads at most a few progress
    events, never the output back to the attempt's start, and folds the same progress
    as reading the run from its first event."""
    runner = TwoGates()
    async with open_engine(
        tmp_path if durability == "fsync" else None,
        runners={"gates": runner},
        default_runner="gates",
        durability=durability,
        retry_base_s=0.01,
    ) as engine:
        job = await write_long_run(engine, runner, 20_000)
        run = engine.get(job)
        assert run.attempt == 2 and isinstance(run.progress_trail, ProgressTrail)
        # 43 progress reports and the second `started` (the first came before any report)
        assert len(run.progress_trail.seqs) == 44
        reads = LineReads(monkeypatch)
        await check_long_run_resumes(engine, job, reads)
        runner.second.set()
        await engine.wait(job, 20)
        await check_long_run_resumes(engine, job, reads)
        # `get` handed out a snapshot: the fold went on (the `succeeded` entry) without it
        assert len(run.progress_trail.seqs) == 44
        final = engine.get(job).progress_trail
        assert isinstance(final, ProgressTrail) and len(final.seqs) == 45


_REPORT_KEYS = st.fixed_dictionaries(
    {},
    optional={
        "percentage": st.floats(0, 100),
        "step": st.sampled_from(["a", "b", "c"]),
        "steps_completed": st.integers(0, 9),
        "steps_total": st.integers(1, 9),
    },
)
_STEP = st.one_of(
    st.just("output"),
    _REPORT_KEYS.filter(bool),
    _REPORT_KEYS.filter(bool),
    st.sampled_from(["output", "output", "retry"]),
)
# short runs (the packed trail) and long ones (past several marks)
_STEPS = st.lists(_STEP, max_size=30) | st.lists(_STEP, min_size=40, max_size=150)


@settings(max_examples=300, deadline=None)
@given(steps=_STEPS, end=st.sampled_from([None, E.SUCCEEDED, E.FAILED, E.CANCELLED]))
def test_the_progress_trail_gives_the_fold_at_every_point(steps: list[Any], end: Any) -> None:
    """Pure: for a run of any shape, the progress at every seq from `progress_at` (a mark
    or the run's progress, plus the few events it names) equals the frame builder's fold
    of every event from the start; and it never names more than the events between two
    marks, all of them `progress` events."""
    state = State()
    events: list[Event] = []

    def add(etype: EventType, data: dict[str, Any]) -> None:
        ev = Event(len(events) + 1, 1.8e9, "r", etype, data)
        events.append(ev)
        apply(state, ev)

    add(E.SUBMITTED, {"prompt": "p"})
    add(E.STARTED, {"attempt": 1})
    attempt = 1
    for step in steps:
        if step == "output":
            add(E.OUTPUT, {"text": "x"})
        elif step == "retry":
            attempt += 1
            add(E.RETRYING, {"error": "e"})
            add(E.STARTED, {"attempt": attempt})
        else:
            add(E.PROGRESS, step)
    if end is not None:
        add(end, {"result": 1} if end is E.SUCCEEDED else {"error": "e"})
    run = state.runs["r"]
    reports = sum(1 for e in events if e.type is E.PROGRESS)
    assert (run.progress_trail is None) == (reports == 0)
    event(f"trail {type(run.progress_trail).__name__}")  # both forms must be seen
    states = states_after(events, "r")
    by_seq = {e.seq: e for e in events}
    for after in range(len(events) + 2):
        base, seqs = progress_at(run, after)
        assert len(seqs) < PROGRESS_MARK_EVERY
        assert all(by_seq[s].type is E.PROGRESS and s <= after for s in seqs)
        for s in seqs:
            base = fold_progress(base, by_seq[s].data)
        got = (float(base.percentage), base.step, base.steps_completed, base.steps_total)
        assert got == states[min(after, len(events))], after


async def test_events_and_streams_resumed_late_in_a_long_run_read_little(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over HTTP, a finished run with 20,000 output lines: `/events?after=` and a stream
    resumed with `Last-Event-ID` from late points read about what they return (plus a
    bounded look-up of the progress), and return exactly the full stream's frames."""
    runner = TwoGates()
    async with open_live_server(
        tmp_path / "data", runners={"gates": runner}, default_runner="gates"
    ) as srv:
        c = srv.client
        job = await write_long_run(srv.engine, runner, 20_000, retry=False)
        runner.second.set()
        await srv.engine.wait(job, 20)
        _, reference, _ = await read_stream(c, job)
        items = [{"id": f.id, "event": f.event, "data": f.data} for f in reference]
        last_report = max(i for i, f in enumerate(items) if f["event"] == "progress")
        starts = [len(items) - 2, len(items) - 5, last_report - 100, last_report - 1]
        reads = LineReads(monkeypatch)
        for start in starts:
            after = items[start]["id"]
            want = items[start + 1 :]
            reads.take()
            body = (
                await c.get(f"/api/v1/runs/{job}/events", params={"after": after, "limit": 5})
            ).json()
            assert body["events"] == want[:5], after
            assert reads.take() <= RESUME_READS + 64, after
            status, frames, _ = await read_stream(c, job, headers={"Last-Event-ID": after})
            assert status == 200 and frames == reference[start + 1 :], after
            assert reads.take() <= RESUME_READS + 64 + 2 * len(want), after


async def test_a_tenant_at_its_stream_limit_costs_no_history_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream slot is taken before the resume point's progress is looked up: a
    client retrying at its limit is refused (429) without any history work."""
    key = "alice-key-0123456789abcdef"
    async with (
        open_live_server(tmp_path, api_keys=f"alice:{key}", tenant_max_streams=1) as srv,
        srv.client_for(key) as a,
    ):
        engine = srv.engine
        job = await a.post("/api/v1/runs", json={"prompt": "a", "config": {"delay_s": 30}})
        job_id = job.json()["job_id"]
        await wait_until(lambda: engine.get(job_id, tenant="alice").status.value == "running")
        looked_up: list[str] = []
        real_progress_at, real_events = engine.progress_at, engine.events

        async def progress_at(*args: Any, **kwargs: Any) -> Any:
            looked_up.append("progress_at")
            return await real_progress_at(*args, **kwargs)

        async def events(*args: Any, **kwargs: Any) -> Any:
            looked_up.append("events")
            return await real_events(*args, **kwargs)

        monkeypatch.setattr(engine, "progress_at", progress_at)
        monkeypatch.setattr(engine, "events", events)
        reads = LineReads(monkeypatch)
        headers = {"Last-Event-ID": "2"}
        async with a.stream("GET", f"/api/v1/runs/{job_id}/stream", headers=headers) as first:
            assert first.status_code == 200
            assert looked_up == ["progress_at"]
            looked_up.clear()
            reads.take()
            for _ in range(3):
                second = await a.get(f"/api/v1/runs/{job_id}/stream", headers=headers)
                assert second.status_code == 429
                assert second.json()["limit"] == "tenant-streams"
            assert looked_up == [] and reads.take() == 0
        await a.post(f"/api/v1/runs/{job_id}/cancel")
