"""The journal writer's IO thread: results and errors come back, a cancel waits for the
call in hand (a half-written batch must finish first), and the thread is really separate."""

from __future__ import annotations

import threading
import time

import pytest
import trio

from agentjobs.engine._iothread import IOThread


async def test_results_and_errors_come_back_from_another_thread() -> None:
    io = IOThread("test-io")
    io.start()
    try:
        assert await io.run_sync(lambda a, b: a + b, 2, 3) == 5
        assert await io.run_sync(threading.get_ident) != threading.get_ident()
        with pytest.raises(OSError, match="disk on fire"):
            await io.run_sync(_raise, OSError("disk on fire"))
        # the thread survives an error and keeps serving, in order
        seen: list[int] = []
        for i in range(50):
            await io.run_sync(seen.append, i)
        assert seen == list(range(50))
    finally:
        io.stop()
    assert not io.running


async def test_a_cancel_is_delivered_only_after_the_call_returns() -> None:
    io = IOThread("test-io")
    io.start()
    finished = threading.Event()

    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.2)
        finished.set()
        return "done"

    got: list[str] = []
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def call() -> None:
                    got.append(await io.run_sync(slow))
                    await trio.lowlevel.checkpoint()  # the pending cancel lands here

                nursery.start_soon(call)
                await trio.to_thread.run_sync(started.wait, 5)
                scope.cancel()  # while the call runs in the thread
        assert scope.cancelled_caught
        assert got == ["done"]  # the call returned its result first...
        assert finished.is_set()  # ...the cancel waited for it, it did not abandon it
    finally:
        io.stop()


async def test_it_refuses_calls_when_not_running() -> None:
    io = IOThread("test-io")
    with pytest.raises(RuntimeError):
        await io.run_sync(lambda: None)
    io.start()
    with pytest.raises(RuntimeError):
        io.start()
    io.stop()
    io.stop()  # idempotent
    io.start()  # and can start again
    assert await io.run_sync(lambda: 7) == 7
    io.stop()


def _raise(exc: BaseException) -> None:
    raise exc


async def test_an_already_cancelled_caller_starts_nothing() -> None:
    io = IOThread("test-io")
    io.start()
    ran: list[int] = []
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            await io.run_sync(ran.append, 1)
        assert scope.cancelled_caught
        assert await io.run_sync(lambda: 2) == 2  # the thread is still there, in order
        assert ran == []
    finally:
        io.stop()
