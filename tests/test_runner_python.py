"""The `python` runner: sync and async targets, thread-safe reporting, cancellation, errors."""

from __future__ import annotations

import functools
import itertools
import logging
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from fakes.context import Recorder

from agentjobs.engine.runners import (
    PythonRunner,
    RunContext,
    RunError,
    RunnerConfigError,
    SessionTurn,
    ThreadContext,
)

_names = itertools.count()

TARGETS = """
import threading, time
import trio
from agentjobs.engine.runners import RunError

events = []

async def async_upper(ctx):
    ctx.progress(50, "halfway")
    ctx.output("partial ")
    await trio.sleep(0)
    ctx.metrics["tokens"] = 3
    return {"text": ctx.prompt.upper(), "attempt": ctx.attempt}

def sync_upper(ctx):
    events.append(("thread", threading.get_ident()))
    ctx.progress(10, "start", steps_completed=0, steps_total=2)
    ctx.output("from the worker thread\\n")
    helper = threading.Thread(target=lambda: ctx.output("from a helper thread\\n"))
    helper.start(); helper.join()
    history = ctx.session_history()
    ctx.metrics["turns"] = len(history)
    return ctx.prompt.upper() + f" ({ctx.session_id}, {ctx.config.get('k')})"

def polite(ctx):
    ctx.output("working\\n")
    try:
        while True:
            ctx.sleep(0.01)
    finally:
        events.append("stopped")
        ctx.output("too late\\n")

def polling(ctx):
    ctx.output("working\\n")
    while not ctx.cancelled:
        time.sleep(0.005)
    events.append("noticed")
    ctx.check_cancelled()

def stubborn(ctx):
    ctx.output("working\\n")
    time.sleep(0.6)
    events.append("finished anyway")
    ctx.output("ignored\\n")
    return "ignored"

async def async_forever(ctx):
    ctx.output("working\\n")
    try:
        await trio.sleep_forever()
    finally:
        events.append("async cancelled")

def raises_value_error(ctx):
    raise ValueError("bad input")

async def raises_run_error(ctx):
    raise RunError("try later", retryable=True, retry_after=2)

async def run_error_in_nursery(ctx):
    async def fail():
        raise RunError("from a child task", retryable=True)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)

def returns_coroutine(ctx):
    return async_upper(ctx)

class Agent:
    @staticmethod
    def handle(ctx):
        return "static " + ctx.prompt

    async def __call__(self, ctx):
        return "callable " + ctx.prompt

agent = Agent()
not_callable = 42

def no_args():
    return 1
"""


@pytest.fixture
def targets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh module of target functions on a private path; returns its name."""
    monkeypatch.setattr(sys, "path", list(sys.path))  # python_path entries are undone
    name = f"agentjobs_test_targets_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(TARGETS)
    return name


def make(targets: str, tmp_path: Path, fn: str, **kwargs: Any) -> PythonRunner:
    return PythonRunner(f"{targets}:{fn}", python_path=[str(tmp_path)], **kwargs)


def events_of(runner: PythonRunner) -> list[Any]:
    module_name = runner.name.partition(":")[0]
    return sys.modules[module_name].events  # type: ignore[no-any-return]


# ------------------------------------------------------------------ calling convention


async def test_async_function_gets_the_run_context(targets: str, tmp_path: Path) -> None:
    runner = make(targets, tmp_path, "async_upper")
    assert runner.is_async
    rec = Recorder()
    ctx = rec.ctx("hi", attempt=2, max_attempts=3)
    assert await runner.run(ctx) == {"text": "HI", "attempt": 2}
    assert rec.outputs == ["partial "]
    assert rec.progress[0]["percentage"] == 50
    assert ctx.metrics == {"tokens": 3}


async def test_sync_function_runs_in_a_thread_with_thread_safe_reporting(
    targets: str, tmp_path: Path
) -> None:
    runner = make(targets, tmp_path, "sync_upper")
    assert not runner.is_async
    rec = Recorder(history=[SessionTurn("a", "b"), SessionTurn("c", "d")])
    ctx = rec.ctx("hi", session_id="s1", config={"k": "v"})
    assert await runner.run(ctx) == "HI (s1, v)"
    assert rec.text == "from the worker thread\nfrom a helper thread\n"
    # Reports were handed over to the trio thread, whichever thread made them.
    assert set(rec.output_threads) == {threading.get_ident()}
    assert events_of(runner)[0][1] != threading.get_ident()
    assert rec.progress == [
        {"percentage": 10, "step": "start", "steps_completed": 0, "steps_total": 2}
    ]
    assert ctx.metrics == {"turns": 2}


async def test_callables_given_directly_and_dotted_targets(targets: str, tmp_path: Path) -> None:
    static = make(targets, tmp_path, "Agent.handle")
    assert await static.run(Recorder().ctx("x")) == "static x"
    instance = make(targets, tmp_path, "agent")
    assert instance.is_async
    assert await instance.run(Recorder().ctx("y")) == "callable y"

    def direct(ctx: ThreadContext, suffix: str) -> str:
        return ctx.prompt + suffix

    partial = PythonRunner(functools.partial(direct, suffix="!"))
    assert await partial.run(Recorder().ctx("z")) == "z!"
    assert "direct" in partial.name

    async def direct_async(ctx: RunContext) -> str:
        return ctx.prompt * 2

    assert await PythonRunner(direct_async).run(Recorder().ctx("ab")) == "abab"


async def test_max_threads_limits_concurrent_sync_calls() -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    def work(ctx: ThreadContext) -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        ctx.sleep(0.05)
        with lock:
            active -= 1

    runner = PythonRunner(work, max_threads=2)
    async with trio.open_nursery() as nursery:
        for _ in range(6):
            nursery.start_soon(runner.run, Recorder().ctx())
    assert peak == 2


# ------------------------------------------------------------------ errors


async def test_exceptions_become_run_errors(targets: str, tmp_path: Path) -> None:
    with pytest.raises(RunError) as info:
        await make(targets, tmp_path, "raises_value_error").run(Recorder().ctx())
    assert info.value.message == f"{targets}:raises_value_error raised ValueError: bad input"
    assert not info.value.retryable
    assert isinstance(info.value.__cause__, ValueError)

    with pytest.raises(RunError) as info:
        await make(targets, tmp_path, "raises_run_error").run(Recorder().ctx())
    assert info.value.message == "try later"  # a RunError passes through as raised
    assert info.value.retryable and info.value.retry_after == 2

    with pytest.raises(RunError) as info:
        await make(targets, tmp_path, "run_error_in_nursery").run(Recorder().ctx())
    assert info.value.message == "from a child task"  # unwrapped from the nursery's group
    assert info.value.retryable

    with pytest.raises(RunError, match="returned an awaitable"):
        await make(targets, tmp_path, "returns_coroutine").run(Recorder().ctx())


@pytest.mark.parametrize(
    ("target", "fragment"),
    [
        ("no_colon_here", "expected 'package.module:function'"),
        ("module:", "expected 'package.module:function'"),
        ("agentjobs_no_such_module_xyz:fn", "cannot import module 'agentjobs_no_such_module_xyz'"),
        ("{targets}:missing", "has no attribute 'missing'"),
        ("{targets}:Agent.missing", ":Agent' has no attribute 'missing'"),
        ("{targets}:not_callable", "is not callable (it is a int)"),
        ("{targets}:no_args", "must accept exactly one positional argument"),
    ],
)
def test_import_errors_are_clear(targets: str, tmp_path: Path, target: str, fragment: str) -> None:
    with pytest.raises(RunnerConfigError) as info:
        PythonRunner(target.format(targets=targets), python_path=[str(tmp_path)])
    assert fragment in str(info.value)
    assert str(info.value).startswith("target: ")


def test_module_failing_at_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "path", list(sys.path))
    name = f"agentjobs_test_broken_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("raise RuntimeError('no config')\n"))
    with pytest.raises(RunnerConfigError, match="failed: RuntimeError: no config"):
        PythonRunner(f"{name}:fn", python_path=[str(tmp_path)])


# ------------------------------------------------------------------ cancellation


async def cancel_after_first_output(runner: PythonRunner, rec: Recorder) -> float:
    """Start the run, cancel it once it has produced output; return how long the cancel took."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, rec.ctx())
            await rec.wait_output(bool)
            started = trio.current_time()
            scope.cancel()
    assert scope.cancelled_caught
    return trio.current_time() - started


async def test_async_function_is_cancelled_like_trio_code(targets: str, tmp_path: Path) -> None:
    runner = make(targets, tmp_path, "async_forever")
    took = await cancel_after_first_output(runner, Recorder())
    assert took < 0.5
    assert events_of(runner) == ["async cancelled"]


@pytest.mark.parametrize("fn", ["polite", "polling"])
async def test_sync_function_sees_the_cancellation_token(
    targets: str, tmp_path: Path, fn: str
) -> None:
    runner = make(targets, tmp_path, fn, cancel_grace_s=5)
    rec = Recorder()
    took = await cancel_after_first_output(runner, rec)
    assert took < 1  # the function noticed; the grace period was not used up
    assert events_of(runner) == ["stopped" if fn == "polite" else "noticed"]
    assert rec.text == "working\n"  # output after the cancel is dropped


async def test_sync_function_ignoring_cancel_is_abandoned_after_grace(
    targets: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = make(targets, tmp_path, "stubborn", cancel_grace_s=0.2)
    rec = Recorder()
    ctx_metrics_before = dict(rec.ctx().metrics)
    took = await cancel_after_first_output(runner, rec)
    assert 0.15 < took < 0.5
    assert "did not stop within 0.2 s" in caplog.text
    await trio.sleep(0.6)  # the abandoned thread finishes meanwhile...
    assert events_of(runner) == ["finished anyway"]
    assert rec.text == "working\n"  # ...but cannot write into the finished run
    assert ctx_metrics_before == {}


def test_thread_context_token_without_trio() -> None:
    # The token is a plain threading.Event underneath: usable from any thread.
    rec = Recorder()

    async def main() -> ThreadContext:
        return ThreadContext(rec.ctx(), trio.lowlevel.current_trio_token())

    tctx = trio.run(main)
    assert not tctx.cancelled
    tctx.check_cancelled()
    tctx._event.set()
    assert tctx.cancelled
    with pytest.raises(BaseException) as info:
        tctx.sleep(10)
    assert type(info.value).__name__ == "RunCancelled"
    assert not isinstance(info.value, Exception)  # `except Exception` does not swallow it
    tctx.output("dropped")  # after a cancel: a no-op, no error
    assert rec.outputs == []


def test_logging_is_quiet_for_normal_runs(
    targets: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    runner = make(targets, tmp_path, "sync_upper")
    assert trio.run(runner.run, Recorder().ctx("q")) == "Q (None, None)"
    assert caplog.records == []
