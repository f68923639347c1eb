"""The engine's public API, one behaviour per test: submit/get/list/wait, cancel, delete,
idempotency, retries, timeouts, expiry, results, output, errors.

Everything runs under trio's `MockClock` with autojump (the `autojump_clock` fixture), so
waiting ten virtual minutes costs nothing; the engine's wall clock follows it (`wall`).
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from test_engine_support import scripted_engine, until, wall
from trio.testing import MockClock

from agentjobs import (
    AlreadyFinished,
    EngineClosed,
    EventType,
    IdempotencyConflict,
    InvalidRequest,
    NotFinished,
    NotFound,
    RunContext,
    RunError,
    Status,
    UnknownRunner,
    open_engine,
)
from agentjobs.engine.journal import IOHooks

E = EventType


async def test_submit_runs_to_success_with_its_history(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("hello", config={"do": "ok"})
        assert run.id.startswith("run_")  # returned as it is by then: queued, or later
        done = await engine.wait(run.id)
        assert done.status is Status.SUCCEEDED
        assert done.result == "hello"
        assert done.attempt == 1 and done.progress.percentage == 100.0
        assert done.started_at is not None and done.completed_at is not None
        assert done.metrics is not None and "duration_s" in done.metrics
        types = [e.type for e in await engine.events(run.id)]
        assert types == [E.SUBMITTED, E.STARTED, E.SUCCEEDED]


async def test_get_returns_snapshots_not_live_records(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "sleep", "s": 5})
        snap = engine.get(run.id)
        before = snap.status
        await engine.wait(run.id)
        assert before is not Status.SUCCEEDED and snap.status is before  # the copy stays
        assert engine.get(run.id).status is Status.SUCCEEDED
        live = engine.state.runs[run.id]
        copy = engine.get(run.id)
        assert copy == live and copy is not live  # every field copied


async def test_wait_with_timeout_returns_the_unfinished_run(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "sleep", "s": 100})
        t0 = trio.current_time()
        got = await engine.wait(run.id, timeout=10)
        assert trio.current_time() - t0 == pytest.approx(10)
        assert got.status is Status.RUNNING and not got.finished
        got = await engine.wait(run.id, timeout=1000)
        assert got.status is Status.SUCCEEDED
        assert trio.current_time() - t0 == pytest.approx(100, abs=0.5)


async def test_unknown_run_is_not_found_everywhere(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        with pytest.raises(NotFound):
            engine.get("run_nope")
        with pytest.raises(NotFound):
            await engine.wait("run_nope")
        with pytest.raises(NotFound):
            await engine.cancel("run_nope")
        with pytest.raises(NotFound):
            await engine.delete("run_nope")
        with pytest.raises(NotFound):
            engine.subscribe("run_nope")


async def test_tenants_do_not_see_each_other(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", tenant="a")
        assert engine.get(run.id, tenant="a").id == run.id
        with pytest.raises(NotFound):
            engine.get(run.id, tenant="b")
        with pytest.raises(NotFound):
            engine.get(run.id)
        assert [r.id for r in engine.list(tenant="a").runs] == [run.id]
        assert engine.list(tenant="b").runs == []


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": math.inf}, "timeout"),
        ({"timeout": True}, "timeout"),
        ({"ttl": "5"}, "ttl"),
        ({"priority": 1.5}, "priority"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 101}, "max_attempts"),
        ({"config": [1, 2]}, "config"),
        ({"config": {"x": object()}}, "config"),
        ({"session_id": ""}, "session_id"),
        ({"idempotency_key": 5}, "idempotency_key"),
        ({"runner": "nope"}, "runner"),
    ],
)
async def test_invalid_submits_name_the_field(
    autojump_clock: MockClock, options: dict[str, Any], field: str
) -> None:
    async with scripted_engine(max_prompt_chars=10) as (engine, _):
        prompt = options.pop("prompt", "ok")
        with pytest.raises(InvalidRequest) as info:
            await engine.submit(prompt, **options)
        assert info.value.field == field
        assert engine.list().runs == []


async def test_prompt_over_the_limit_is_refused(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_prompt_chars=10) as (engine, _):
        with pytest.raises(InvalidRequest, match="over the limit"):
            await engine.submit("x" * 11)
        await engine.submit("x" * 10)


async def test_unknown_runner_is_its_own_error(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        with pytest.raises(UnknownRunner) as info:
            await engine.submit("x", runner="gpt-9")
        assert info.value.available == ("echo", "s")


async def test_config_is_stored_as_json_would_give_it_back(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "ok", "t": (1, 2), "nested": {"k": [3]}})
        assert run.spec.config == {"do": "ok", "t": [1, 2], "nested": {"k": [3]}}


# -- results and errors ------------------------------------------------------------------


async def test_runner_exception_fails_the_run_without_retry(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, runner):
        run = await engine.submit("x", config={"do": "boom"}, max_attempts=3)
        done = await engine.wait(run.id)
        assert done.status is Status.FAILED
        assert done.error == "ValueError: boom" and done.error_kind == "error"
        assert runner.attempts[run.id] == 1


async def test_run_error_fails_the_run_with_its_message(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "fail"}, max_attempts=3)
        done = await engine.wait(run.id)
        assert (done.status, done.error, done.attempt) == (Status.FAILED, "scripted failure", 1)


async def test_unencodable_result_fails_the_run(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "unencodable"})
        done = await engine.wait(run.id)
        assert done.status is Status.FAILED
        assert done.error is not None and "not JSON-serialisable" in done.error


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("x" * 98, True),  # 100 bytes of JSON with the quotes
        ("x" * 99, False),
        ("é" * 40, True),  # 80 bytes of UTF-8 + quotes
        ("é" * 50, False),  # 50 characters but 102 bytes
        ({"k": "v" * 80}, True),
        ({"k": "v" * 100}, False),
        ([1] * 60, False),
    ],
)
async def test_result_size_limit_counts_json_bytes(
    autojump_clock: MockClock, value: Any, ok: bool
) -> None:
    async with scripted_engine(max_result_bytes=100) as (engine, _):
        run = await engine.submit("x", config={"do": "value", "value": value})
        done = await engine.wait(run.id)
        if ok:
            assert done.status is Status.SUCCEEDED and done.result == value
        else:
            assert done.status is Status.FAILED
            assert done.error is not None and "over the limit of 100" in done.error


async def test_result_is_what_a_replay_gives_back(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    class Tuples:
        async def run(self, ctx: RunContext) -> Any:
            return {"pair": (1, 2), "nan": math.nan}

    async with open_engine(tmp_path, runners={"t": Tuples()}, wall_clock=wall) as engine:
        run = await engine.submit("x")
        live = await engine.wait(run.id)
    async with open_engine(tmp_path, runners={"t": Tuples()}, wall_clock=wall) as engine:
        replayed = engine.get(run.id)
    assert live.result == replayed.result == {"pair": [1, 2], "nan": None}


async def test_exception_group_with_a_retryable_run_error_is_retried(
    autojump_clock: MockClock,
) -> None:
    class Grouped:
        async def run(self, ctx: RunContext) -> Any:
            if ctx.attempt == 1:
                async with trio.open_nursery() as nursery:

                    async def fail() -> None:
                        raise RunError("inner", retryable=True)

                    nursery.start_soon(fail)
            return "second time lucky"

    async with open_engine(
        None, durability="memory", runners={"g": Grouped()}, wall_clock=wall
    ) as engine:
        run = await engine.submit("x", max_attempts=2)
        done = await engine.wait(run.id)
        assert (done.status, done.attempt, done.result) == (
            Status.SUCCEEDED,
            2,
            "second time lucky",
        )


async def test_unencodable_metrics_do_not_lose_the_result(autojump_clock: MockClock) -> None:
    class Metered:
        async def run(self, ctx: RunContext) -> Any:
            ctx.metrics["bad"] = object()
            return "fine"

    async with open_engine(
        None, durability="memory", runners={"m": Metered()}, wall_clock=wall
    ) as engine:
        run = await engine.submit("x")
        done = await engine.wait(run.id)
        assert done.status is Status.SUCCEEDED and done.result == "fine"
        assert done.metrics is not None and "metrics_error" in done.metrics


# -- retries, timeouts, expiry -------------------------------------------------------------


async def test_retryable_errors_back_off_exponentially_with_jitter(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine(retry_base_s=10, retry_max_s=1000) as (engine, runner):
        run = await engine.submit("x", config={"do": "flaky", "fails": 3}, max_attempts=4)
        done = await engine.wait(run.id)
        assert (done.status, done.attempt) == (Status.SUCCEEDED, 4)
        events = await engine.events(run.id)
        retrying = [e for e in events if e.type is E.RETRYING]
        started = [e for e in events if e.type is E.STARTED]
        assert [e.data["attempt"] for e in started] == [1, 2, 3, 4]
        assert [e.data["attempt"] for e in retrying] == [1, 2, 3]
        for n, (retry, nxt) in enumerate(zip(retrying, started[1:], strict=True)):
            base = 10 * 2**n
            gap = nxt.ts - retry.ts
            assert base / 2 <= gap <= base + 0.5, (n, gap)  # jitter: between half and whole
            assert retry.data["not_before"] == pytest.approx(retry.ts + retry.data["retry_in"])
        assert runner.attempts[run.id] == 4


async def test_jitter_differs_between_runs(autojump_clock: MockClock) -> None:
    async with scripted_engine(retry_base_s=100) as (engine, _):
        runs = [await engine.submit("x", config={"do": "flaky"}, max_attempts=2) for _ in range(8)]
        delays = set()
        for run in runs:
            await engine.wait(run.id)
            (retry,) = [e for e in await engine.events(run.id) if e.type is E.RETRYING]
            delays.add(round(retry.data["retry_in"], 6))
        assert len(delays) == 8


async def test_retries_stop_at_max_attempts(autojump_clock: MockClock) -> None:
    async with scripted_engine(retry_base_s=1) as (engine, runner):
        run = await engine.submit("x", config={"do": "retry"}, max_attempts=3)
        done = await engine.wait(run.id)
        assert (done.status, done.attempt, done.error) == (Status.FAILED, 3, "try again")
        assert runner.attempts[run.id] == 3


async def test_retry_after_is_a_floor_for_the_backoff(autojump_clock: MockClock) -> None:
    async with scripted_engine(retry_base_s=1) as (engine, _):
        run = await engine.submit("x", config={"do": "retry", "retry_after": 120}, max_attempts=2)
        await engine.wait(run.id)
        events = await engine.events(run.id)
        (retry,) = [e for e in events if e.type is E.RETRYING]
        second = [e for e in events if e.type is E.STARTED][1]
        assert retry.data["retry_in"] == 120
        assert second.ts - retry.ts == pytest.approx(120, abs=0.5)


async def test_a_run_waiting_for_its_retry_is_queued_and_cancellable(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine(retry_base_s=1000) as (engine, runner):
        run = await engine.submit("x", config={"do": "retry"}, max_attempts=2)
        await until(lambda: engine.get(run.id).not_before is not None)
        assert engine.get(run.id).status is Status.QUEUED
        t0 = trio.current_time()
        done = await engine.cancel(run.id)
        assert done.status is Status.CANCELLED
        assert trio.current_time() - t0 < 1
        assert runner.attempts[run.id] == 1


async def test_timeout_fails_the_run_after_stopping_its_runner(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, runner):
        run = await engine.submit("x", config={"do": "hang"}, timeout=30)
        t0 = trio.current_time()
        done = await engine.wait(run.id)
        assert trio.current_time() - t0 == pytest.approx(30, abs=0.5)
        assert (done.status, done.error_kind) == (Status.FAILED, "timeout")
        assert done.error == "timed out after 30s"
        assert run.id in runner.cancelled


async def test_default_timeout_applies_when_a_run_sets_none(autojump_clock: MockClock) -> None:
    async with scripted_engine(default_timeout=5) as (engine, _):
        run = await engine.submit("x", config={"do": "hang"})
        done = await engine.wait(run.id)
        assert done.error_kind == "timeout"


async def test_timeout_is_not_retried_even_with_attempts_left(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, runner):
        run = await engine.submit("x", config={"do": "hang"}, timeout=1, max_attempts=3)
        done = await engine.wait(run.id)
        assert done.status is Status.FAILED and runner.attempts[run.id] == 1


async def test_ttl_expires_runs_that_never_start(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=1) as (engine, runner):
        blocker = await engine.submit("block", config={"do": "hang"})
        await until(lambda: engine.get(blocker.id).status is Status.RUNNING)
        t0 = trio.current_time()
        waiting = await engine.submit("x", ttl=60)
        patient = await engine.submit("y")
        done = await engine.wait(waiting.id)
        assert trio.current_time() - t0 == pytest.approx(60, abs=0.5)
        assert (done.status, done.error_kind) == (Status.FAILED, "expired")
        assert done.error == "expired after waiting 60s in the queue"
        assert waiting.id not in runner.started
        assert engine.get(patient.id).status is Status.QUEUED
        await engine.cancel(blocker.id)
        assert (await engine.wait(patient.id)).status is Status.SUCCEEDED


async def test_ttl_does_not_touch_a_run_that_started(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "sleep", "s": 100}, ttl=10)
        done = await engine.wait(run.id)
        assert done.status is Status.SUCCEEDED


async def test_ttl_does_not_expire_a_run_that_waits_for_its_retry(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine(retry_base_s=100) as (engine, _):
        run = await engine.submit("x", config={"do": "flaky"}, ttl=10, max_attempts=2)
        done = await engine.wait(run.id)
        assert (done.status, done.attempt) == (Status.SUCCEEDED, 2)


# -- cancel and delete ------------------------------------------------------------------


async def test_cancel_queued_run_is_immediate_and_it_never_runs(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=1) as (engine, runner):
        blocker = await engine.submit("block", config={"do": "hang"})
        run = await engine.submit("x")
        t0 = trio.current_time()
        done = await engine.cancel(run.id, reason="changed my mind")
        assert trio.current_time() == t0
        assert (done.status, done.error) == (Status.CANCELLED, "changed my mind")
        await engine.cancel(blocker.id)
        await trio.sleep(10)
        assert run.id not in runner.started
        types = [e.type for e in await engine.events(run.id)]
        assert types == [E.SUBMITTED, E.CANCELLED]


async def test_cancel_running_run_stops_the_runner_before_recording(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine() as (engine, runner):
        run = await engine.submit("x", config={"do": "hang"})
        await until(lambda: run.id in runner.running)
        done = await engine.cancel(run.id)
        assert done.status is Status.CANCELLED
        assert run.id in runner.cancelled and run.id not in runner.running
        types = [e.type for e in await engine.events(run.id)]
        assert types == [E.SUBMITTED, E.STARTED, E.CANCEL_REQUESTED, E.CANCELLED]
        # (and `scripted_engine` checks the terminal was committed after the runner stopped)


async def test_cancel_waits_for_a_slow_runner_to_stop(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, runner):
        run = await engine.submit("x", config={"do": "stubborn", "cleanup_s": 20})
        await until(lambda: run.id in runner.running)
        t0 = trio.current_time()
        done = await engine.cancel(run.id)
        assert trio.current_time() - t0 == pytest.approx(20, abs=0.1)
        assert done.status is Status.CANCELLED and run.id not in runner.running


async def test_cancel_with_short_wait_returns_an_acknowledged_request(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine() as (engine, runner):
        run = await engine.submit("x", config={"do": "stubborn", "cleanup_s": 20})
        await until(lambda: run.id in runner.running)
        got = await engine.cancel(run.id, wait=1)
        assert got.status is Status.RUNNING and got.cancel_requested
        assert run.id in runner.running
        done = await engine.wait(run.id)
        assert done.status is Status.CANCELLED


async def test_an_acknowledged_cancel_holds_even_if_the_runner_then_returns(
    autojump_clock: MockClock,
) -> None:
    class Swallower:
        """A bad citizen: turns cancellation into a normal return."""

        async def run(self, ctx: RunContext) -> Any:
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                return "I finished anyway"

    async with open_engine(
        None, durability="memory", runners={"x": Swallower()}, wall_clock=wall
    ) as engine:
        run = await engine.submit("x")
        await until(lambda: engine.get(run.id).status is Status.RUNNING)
        done = await engine.cancel(run.id)
        assert done.status is Status.CANCELLED and done.result is None


async def test_cancel_that_arrives_after_the_runner_returned_is_already_finished(
    tmp_path: Path,
) -> None:
    """Real time here: the terminal event's fsync is held (in its worker thread) until the
    cancel has been answered, so the run is still `running` when the cancel arrives."""
    hold = threading.Event()  # set: the next fsyncs wait for `release`
    holding = threading.Event()
    release = threading.Event()

    def fsync(fd: int) -> None:
        if hold.is_set():
            holding.set()
            release.wait(10)
        os.fsync(fd)

    class Quick:
        async def run(self, ctx: RunContext) -> Any:
            hold.set()
            return "done"

    hooks = IOHooks(fsync=fsync)
    async with open_engine(tmp_path, runners={"q": Quick()}, journal_hooks=hooks) as engine:
        run = await engine.submit("x")
        await trio.to_thread.run_sync(holding.wait, 10)
        assert engine.get(run.id).status is Status.RUNNING  # its outcome is being written
        outcome: list[BaseException] = []

        async def cancel() -> None:
            try:
                await engine.cancel(run.id)
            except AlreadyFinished as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel)
            await trio.sleep(0.2)  # the cancel is answered "too late" and waits
            assert not outcome
            hold.clear()
            release.set()
        assert len(outcome) == 1 and outcome[0].status == "succeeded"  # type: ignore[attr-defined]
        assert not engine.get(run.id).cancel_requested


async def test_cancel_a_finished_run_is_already_finished(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        for do, status in (("ok", "succeeded"), ("fail", "failed")):
            run = await engine.submit("x", config={"do": do})
            await engine.wait(run.id)
            with pytest.raises(AlreadyFinished) as info:
                await engine.cancel(run.id)
            assert info.value.status == status
        run = await engine.submit("x", config={"do": "hang"})
        await engine.cancel(run.id)
        with pytest.raises(AlreadyFinished):
            await engine.cancel(run.id)


async def test_concurrent_cancels_of_one_run_all_succeed_once(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, runner):
        run = await engine.submit("x", config={"do": "stubborn", "cleanup_s": 5})
        await until(lambda: run.id in runner.running)
        answers: list[Status] = []

        async def cancel() -> None:
            answers.append((await engine.cancel(run.id)).status)

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(cancel)
        assert answers == [Status.CANCELLED] * 5
        types = [e.type for e in await engine.events(run.id)]
        assert types.count(E.CANCEL_REQUESTED) == 1 and types.count(E.CANCELLED) == 1


async def test_delete_only_finished_runs(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "hang"})
        with pytest.raises(NotFinished) as info:
            await engine.delete(run.id)
        assert info.value.status in ("queued", "running")
        await engine.cancel(run.id)
        await engine.delete(run.id)
        with pytest.raises(NotFound):
            engine.get(run.id)
        assert engine.list().runs == []
        assert engine.count() == 0
        with pytest.raises(NotFound):
            await engine.delete(run.id)


async def test_delete_survives_a_restart_and_frees_the_history(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with scripted_engine(tmp_path) as (engine, _):
        keep = await engine.submit("keep")
        gone = await engine.submit("gone")
        await engine.wait(keep.id)
        await engine.wait(gone.id)
        await engine.delete(gone.id)
        assert await engine.events(keep.id)
    async with scripted_engine(tmp_path) as (engine, _):
        assert [r.id for r in engine.list().runs] == [keep.id]
        assert engine.journal.runs_indexed() == 1


# -- idempotency ----------------------------------------------------------------------


async def test_same_key_same_request_returns_the_original_run(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        spec = engine.make_spec("x", idempotency_key="k1", config={"a": 1})
        first, replayed1 = await engine.submit_spec(spec)
        again, replayed2 = await engine.submit_spec(
            engine.make_spec("x", idempotency_key="k1", config={"a": 1})
        )
        assert (replayed1, replayed2) == (False, True)
        assert again.id == first.id
        assert engine.count() == 1


async def test_same_key_different_request_is_a_conflict(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        first = await engine.submit("x", idempotency_key="k1")
        with pytest.raises(IdempotencyConflict) as info:
            await engine.submit("y", idempotency_key="k1")
        assert info.value.run_id == first.id
        with pytest.raises(IdempotencyConflict):
            await engine.submit("x", idempotency_key="k1", priority=3)


async def test_idempotency_keys_are_per_tenant(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        a = await engine.submit("x", idempotency_key="k", tenant="a")
        b = await engine.submit("x", idempotency_key="k", tenant="b")
        n = await engine.submit("x", idempotency_key="k")
        assert len({a.id, b.id, n.id}) == 3
        assert (await engine.submit("x", idempotency_key="k", tenant="a")).id == a.id


async def test_concurrent_submits_with_one_key_make_one_run(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with scripted_engine(tmp_path) as (engine, _):
        answers: list[tuple[str, bool]] = []

        async def submit() -> None:
            run, replayed = await engine.submit_spec(engine.make_spec("x", idempotency_key="k"))
            answers.append((run.id, replayed))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(submit)
        assert len({rid for rid, _ in answers}) == 1
        assert sorted(r for _, r in answers) == [False] + [True] * 19
        assert engine.count() == 1


async def test_idempotency_survives_restart_and_expires_after_the_window(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with scripted_engine(tmp_path, idempotency_window_s=3600) as (engine, _):
        first = await engine.submit("x", idempotency_key="k")
    async with scripted_engine(tmp_path, idempotency_window_s=3600) as (engine, _):
        assert (await engine.submit("x", idempotency_key="k")).id == first.id
        await trio.sleep(3600)
        later = await engine.submit("x", idempotency_key="k")
        assert later.id != first.id
        assert (await engine.submit("x", idempotency_key="k")).id == later.id


# -- output, progress, runners in threads ----------------------------------------------------


async def test_output_is_coalesced_and_complete(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "output", "n": 500})
        await engine.wait(run.id)
        outputs = [e for e in await engine.events(run.id) if e.type is E.OUTPUT]
        assert 1 <= len(outputs) <= 2
        assert "".join(e.data["text"] for e in outputs) == "".join(f"<{i}>" for i in range(500))


async def test_slow_output_is_flushed_within_the_coalescing_window(
    autojump_clock: MockClock,
) -> None:
    async with scripted_engine() as (engine, _):
        run = await engine.submit("x", config={"do": "output", "n": 100, "every": 0.01})
        await engine.wait(run.id)
        outputs = [e for e in await engine.events(run.id) if e.type is E.OUTPUT]
        # one second of output, flushed every 50 ms: about 20 events, not 100 and not 1
        assert 15 <= len(outputs) <= 25
        assert "".join(e.data["text"] for e in outputs) == "".join(f"<{i}>" for i in range(100))


async def test_large_output_is_flushed_at_once(autojump_clock: MockClock) -> None:
    class Big:
        async def run(self, ctx: RunContext) -> Any:
            for _ in range(4):
                ctx.output("x" * 20_000)
                # no time passes, so only the size can trigger a flush
                await trio.lowlevel.checkpoint()
            return None

    async with open_engine(
        None, durability="memory", runners={"b": Big()}, wall_clock=wall
    ) as engine:
        run = await engine.submit("x")
        await engine.wait(run.id)
        outputs = [e for e in await engine.events(run.id) if e.type is E.OUTPUT]
        assert len(outputs) == 4


async def test_progress_is_coalesced_and_folded(autojump_clock: MockClock) -> None:
    class Steps:
        async def run(self, ctx: RunContext) -> Any:
            for i in range(10):
                ctx.progress(i * 10, f"step {i}", steps_completed=i, steps_total=10)
            await trio.sleep(1)
            ctx.progress(150)  # clamped
            await trio.sleep(1)
            return None

    async with open_engine(
        None, durability="memory", runners={"p": Steps()}, wall_clock=wall
    ) as engine:
        run = await engine.submit("x")
        await trio.sleep(0.5)
        mid = engine.get(run.id).progress
        assert (mid.percentage, mid.step, mid.steps_completed, mid.steps_total) == (
            90.0,
            "step 9",
            9,
            10,
        )
        await trio.sleep(1)
        assert engine.get(run.id).progress.percentage == 100.0
        await engine.wait(run.id)
        progress = [e for e in await engine.events(run.id) if e.type is E.PROGRESS]
        assert len(progress) == 2


async def test_a_sync_runner_may_report_from_a_worker_thread(autojump_clock: MockClock) -> None:
    class Threaded:
        async def run(self, ctx: RunContext) -> Any:
            def work() -> str:
                for i in range(5):
                    ctx.output(f"line {i}\n")
                ctx.progress(50, "halfway")
                return "from a thread"

            result = await trio.to_thread.run_sync(work)
            await trio.sleep(1)
            return result

    async with open_engine(
        None, durability="memory", runners={"t": Threaded()}, wall_clock=wall
    ) as engine:
        run = await engine.submit("x")
        done = await engine.wait(run.id)
        assert done.result == "from a thread"
        events = await engine.events(run.id)
        text = "".join(e.data["text"] for e in events if e.type is E.OUTPUT)
        assert text == "".join(f"line {i}\n" for i in range(5))
        assert any(e.type is E.PROGRESS and e.data["step"] == "halfway" for e in events)


async def test_session_history_shows_earlier_successful_turns(autojump_clock: MockClock) -> None:
    seen: dict[str, list[tuple[str, Any]]] = {}

    class Chat:
        async def run(self, ctx: RunContext) -> Any:
            seen[ctx.prompt] = [(t.prompt, t.result) for t in ctx.session_history()]
            if ctx.prompt == "bad":
                raise RunError("no")
            return ctx.prompt.upper()

    async with open_engine(
        None,
        durability="memory",
        runners={"c": Chat()},
        wall_clock=wall,
        session_concurrency=1,
    ) as engine:
        ids = [(await engine.submit(p, session_id="s1")).id for p in ("a", "bad", "b")]
        other = await engine.submit("z", session_id="s2")
        for rid in [*ids, other.id]:
            await engine.wait(rid)
    assert seen == {"a": [], "bad": [("a", "A")], "b": [("a", "A")], "z": []}


# -- lifecycle and listing ----------------------------------------------------------------


async def test_submit_after_close_is_engine_closed(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        pass
    with pytest.raises(EngineClosed):
        await engine.submit("late")


async def test_list_is_newest_first_with_cursor_and_filters(autojump_clock: MockClock) -> None:
    async with scripted_engine(max_concurrency=1) as (engine, _):
        ids = [
            (await engine.submit(f"p{i}", config={"do": "hang"}, session_id=f"s{i % 2}")).id
            for i in range(7)
        ]
        await until(lambda: engine.get(ids[0]).status is Status.RUNNING)
        page = engine.list(limit=3)
        assert [r.id for r in page.runs] == ids[::-1][:3]
        page2 = engine.list(limit=3, cursor=page.next_cursor)
        assert [r.id for r in page2.runs] == ids[::-1][3:6]
        page3 = engine.list(limit=3, cursor=page2.next_cursor)
        assert [r.id for r in page3.runs] == [ids[0]] and page3.next_cursor is None
        assert [r.id for r in engine.list(status="running").runs] == [ids[0]]
        assert [r.id for r in engine.list(session_id="s1").runs] == ids[1::2][::-1]
        assert engine.count(status=Status.QUEUED) == 6
        with pytest.raises(InvalidRequest):
            engine.list(cursor="garbage")
        with pytest.raises(InvalidRequest):
            engine.list(status="sleeping")
        for rid in ids:
            await engine.cancel(rid)


async def test_stats_and_metrics_follow_the_runs(autojump_clock: MockClock) -> None:
    async with scripted_engine(retry_base_s=1) as (engine, _):
        ok = await engine.submit("x")
        flaky = await engine.submit("x", config={"do": "flaky"}, max_attempts=2)
        hung = await engine.submit("x", config={"do": "hang"})
        await engine.wait(ok.id)
        await engine.wait(flaky.id)
        await engine.cancel(hung.id)
        stats = engine.stats()
        assert stats["by_status"]["succeeded"] == 2 and stats["by_status"]["cancelled"] == 1
        assert stats["durability"] == "memory"
        m = engine.metrics
        assert m.submitted_total == 3 and m.retries_total == 1 and m.cancel_requests_total == 1
        assert m.finished_total == {"succeeded": 2, "cancelled": 1}
        assert m.queue_wait_seconds.count == 3
