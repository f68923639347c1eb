"""`BackgroundEngine`: the trio engine on its own thread, used from plain code, from a
thread pool, and from inside a running asyncio loop; clean shutdown, including at exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import trio

import agentjobs
from agentjobs import (
    AlreadyFinished,
    BackgroundEngine,
    EngineClosed,
    EventType,
    InvalidRequest,
    NotFinished,
    NotFound,
    Status,
)

E = EventType


@pytest.fixture
def bg() -> Iterator[BackgroundEngine]:
    with BackgroundEngine(None, durability="memory", max_concurrency=8) as engine:
        yield engine


def _subscribers(bg: BackgroundEngine) -> int:
    return bg._call_sync(lambda engine: engine.bus.subscriber_count)


# -- plain code ------------------------------------------------------------------------


def test_submit_wait_result(bg: BackgroundEngine) -> None:
    run_id = bg.submit("hello", config={"delay_s": 0.05})
    assert run_id.startswith("run_")
    assert bg.get(run_id).status in (Status.QUEUED, Status.RUNNING)
    run = bg.wait(run_id, timeout=10)
    assert run.status is Status.SUCCEEDED
    assert run.result == "hello"
    assert bg.result(run_id) == "hello"
    assert bg.get(run_id).status is Status.SUCCEEDED


def test_failed_run_raises_run_failed_with_the_run(bg: BackgroundEngine) -> None:
    run_id = bg.submit("x", config={"fail": "boom"})
    with pytest.raises(BackgroundEngine.RunFailed, match="boom") as info:
        bg.result(run_id, timeout=10)
    assert info.value.run.id == run_id
    assert info.value.run.status is Status.FAILED
    assert isinstance(info.value, agentjobs.EngineError)


def test_wait_timeout_then_cancel(bg: BackgroundEngine) -> None:
    run_id = bg.submit("slow", config={"delay_s": 30})
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="not finished"):
        bg.wait(run_id, timeout=0.2)
    assert 0.15 < time.monotonic() - t0 < 5
    with pytest.raises(TimeoutError):
        bg.result(run_id, timeout=0)
    cancelled = bg.cancel(run_id)
    assert cancelled.status is Status.CANCELLED
    with pytest.raises(BackgroundEngine.RunCancelled) as info:
        bg.result(run_id)
    assert info.value.run.status is Status.CANCELLED
    with pytest.raises(AlreadyFinished):
        bg.cancel(run_id)


def test_engine_errors_cross_the_thread(bg: BackgroundEngine) -> None:
    with pytest.raises(NotFound):
        bg.get("run_nope")
    with pytest.raises(NotFound):
        bg.wait("run_nope")
    with pytest.raises(NotFound):
        bg.stream("run_nope")
    with pytest.raises(InvalidRequest) as info:
        bg.submit("   ")
    assert info.value.field == "prompt"
    with pytest.raises(ValueError):
        bg.wait("run_nope", timeout=-1)


def test_stream_yields_past_and_live_events_then_ends(bg: BackgroundEngine) -> None:
    run_id = bg.submit("a b c", config={"delay_s": 0.6, "steps": 3, "output": True})
    events = list(bg.stream(run_id))
    types = [e.type for e in events]
    assert types[0] is E.SUBMITTED
    assert types[-1] is E.SUCCEEDED
    assert types.count(E.PROGRESS) == 3
    assert "".join(e.data["text"] for e in events if e.type is E.OUTPUT) == "a b c "
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs))
    # the finished run replays the same history; `after_seq` resumes with no duplicate
    assert [e.seq for e in bg.stream(run_id)] == seqs
    assert [e.seq for e in bg.stream(run_id, after_seq=seqs[2])] == seqs[3:]
    assert [e.seq for e in bg.events(run_id, after_seq=seqs[2])] == seqs[3:]
    assert _subscribers(bg) == 0


def test_leaving_a_stream_early_stops_its_pump(bg: BackgroundEngine) -> None:
    run_id = bg.submit("slow", config={"delay_s": 30, "steps": 30})
    with bg.stream(run_id) as stream:
        first = next(stream)
        assert first.type is E.SUBMITTED
        assert _subscribers(bg) == 1
    deadline = time.monotonic() + 5
    while _subscribers(bg) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _subscribers(bg) == 0
    with pytest.raises(StopIteration):
        next(stream)
    bg.cancel(run_id)


def test_list_and_delete(bg: BackgroundEngine) -> None:
    ids = [bg.submit(f"p{i}", session_id="s1" if i % 2 else "s2") for i in range(7)]
    for run_id in ids:
        bg.wait(run_id, timeout=10)
    assert [r.id for r in bg.list()] == ids[::-1]
    assert [r.id for r in bg.list(session_id="s1")] == ids[1::2][::-1]
    assert [r.id for r in bg.list(limit=3)] == ids[::-1][:3]
    assert len(bg.list(status="succeeded")) == 7
    assert bg.list(status=Status.FAILED) == []
    bg.delete(ids[0])
    with pytest.raises(NotFound):
        bg.get(ids[0])
    slow = bg.submit("slow", config={"delay_s": 30})
    with pytest.raises(NotFinished):
        bg.delete(slow)
    bg.cancel(slow)


def test_close_is_idempotent_and_later_calls_raise() -> None:
    bg = BackgroundEngine(None, durability="memory")
    assert "open" in repr(bg)
    bg.close()
    bg.close()
    assert bg.closed
    assert not bg._thread.is_alive()
    with pytest.raises(EngineClosed):
        bg.submit("late")
    with pytest.raises(EngineClosed):
        bg.get("run_x")


def test_startup_error_raises_in_the_constructor() -> None:
    with pytest.raises(ValueError, match="max_concurrency"):
        BackgroundEngine(None, durability="memory", max_concurrency=0)
    with pytest.raises(ValueError, match="data_dir"):
        BackgroundEngine(None)  # fsync needs a directory


def test_runs_survive_close_and_reopen(tmp_path: Path) -> None:
    with BackgroundEngine(tmp_path, durability="os") as bg:
        done = bg.submit("kept")
        assert bg.result(done, timeout=10) == "kept"
    with BackgroundEngine(tmp_path, durability="os") as bg:
        assert bg.get(done).result == "kept"
        assert [r.id for r in bg.list()] == [done]


def test_close_ends_calls_blocked_in_other_threads() -> None:
    bg = BackgroundEngine(None, durability="memory", grace_period_s=0.1)
    run_id = bg.submit("slow", config={"delay_s": 60})
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            bg.wait(run_id)
        except BaseException as exc:
            errors.append(exc)

    def streamer() -> None:
        try:
            for _ in bg.stream(run_id):
                pass
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter), threading.Thread(target=streamer)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    bg.close()
    for t in threads:
        t.join(5)
        assert not t.is_alive()
    assert time.monotonic() - t0 < 5
    assert len(errors) == 2
    assert all(isinstance(e, EngineClosed) for e in errors), errors


def test_refuses_to_block_a_trio_loop(bg: BackgroundEngine) -> None:
    async def main() -> None:
        with pytest.raises(RuntimeError, match="cannot be called from trio"):
            bg.submit("x")
        # the documented way out works
        run_id = await trio.to_thread.run_sync(bg.submit, "from trio")
        run = await trio.to_thread.run_sync(bg.wait, run_id)
        assert run.status is Status.SUCCEEDED

    trio.run(main)


# -- a thread pool -------------------------------------------------------------------


def test_many_threads_submit_and_wait_concurrently(bg: BackgroundEngine) -> None:
    def job(i: int) -> tuple[str, object]:
        run_id = bg.submit(f"prompt {i}", config={"delay_s": 0.01 * (i % 3)})
        return run_id, bg.result(run_id, timeout=30)

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(job, range(300)))
    assert [r for _, r in results] == [f"prompt {i}" for i in range(300)]
    assert len({run_id for run_id, _ in results}) == 300
    assert len(bg.list(status="succeeded")) == 300


def test_streams_from_many_threads(bg: BackgroundEngine) -> None:
    run_ids = [bg.submit(f"s {i}", config={"delay_s": 0.1, "steps": 2}) for i in range(20)]

    def follow(run_id: str) -> list[EventType]:
        return [e.type for e in bg.stream(run_id)]

    with ThreadPoolExecutor(max_workers=20) as pool:
        seen = list(pool.map(follow, run_ids))
    for types in seen:
        assert types[0] is E.SUBMITTED and types[-1] is E.SUCCEEDED
        assert E.PROGRESS in types  # progress is coalesced, so at least one


def test_idempotent_submits_from_threads_make_one_run(bg: BackgroundEngine) -> None:
    with ThreadPoolExecutor(max_workers=12) as pool:
        ids = list(pool.map(lambda _: bg.submit("once", idempotency_key="k1"), range(40)))
    assert len(set(ids)) == 1


# -- inside a running asyncio loop -----------------------------------------------------


def test_inside_asyncio_run() -> None:
    async def main() -> None:
        # plain blocking calls work inside a coroutine (they block this loop briefly) ...
        with BackgroundEngine(None, durability="memory") as bg:
            run_id = bg.submit("in asyncio", config={"delay_s": 0.3})
            # ... and `asyncio.to_thread` keeps the loop free while waiting
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            task = asyncio.create_task(ticker())
            run = await asyncio.to_thread(bg.wait, run_id, 10)
            task.cancel()
            assert run.status is Status.SUCCEEDED
            assert ticks >= 5  # the loop kept running during the 0.3 s wait
            results = await asyncio.gather(
                *(asyncio.to_thread(bg.result, bg.submit(f"g{i}")) for i in range(20))
            )
            assert results == [f"g{i}" for i in range(20)]
            events = await asyncio.to_thread(lambda: list(bg.stream(run_id)))
            assert events[-1].type is E.SUCCEEDED

    asyncio.run(main())


# -- interpreter exit --------------------------------------------------------------------


def test_unclosed_engine_is_closed_gracefully_at_exit(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import agentjobs
        bg = agentjobs.BackgroundEngine({str(tmp_path)!r}, grace_period_s=0.2)
        done = bg.submit("finished before exit")
        bg.wait(done)
        slow = bg.submit("still running at exit", config={{"delay_s": 60}})
        while bg.get(slow).status != "running":
            pass
        print(done, slow, flush=True)
        # no close(): the atexit hook must stop the engine and flush the journal
        """
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - t0 < 15
    done, slow = proc.stdout.split()
    with BackgroundEngine(tmp_path, max_concurrency=1) as bg:
        assert bg.get(done).result == "finished before exit"
        # stopped for the shutdown and put back in the queue, not lost and not failed
        again = bg.get(slow)
        assert again.status in (Status.QUEUED, Status.RUNNING)
        bg.cancel(slow)


def test_exit_releases_threads_blocked_in_wait() -> None:
    """The program's own (non-daemon) threads blocked in `wait` must not hang the exit:
    the engine is closed before the interpreter joins them, and they get EngineClosed."""
    script = textwrap.dedent(
        """
        import threading, agentjobs
        bg = agentjobs.BackgroundEngine(None, durability="memory", grace_period_s=0.1)
        slow = bg.submit("slow", config={"delay_s": 60})

        def waiter():
            try:
                bg.wait(slow)
            except agentjobs.EngineClosed:
                print("released", flush=True)

        threading.Thread(target=waiter).start()  # not a daemon
        """
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "released"
    assert time.monotonic() - t0 < 15
