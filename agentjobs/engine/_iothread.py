"""One long-lived thread for the journal writer's blocking calls (write + fsync).

Why not `trio.to_thread.run_sync`: it is built for many callers and arbitrary work, so each
call takes a `CapacityLimiter` token, fetches a thread from the cache, renames it for the
job and wakes it through a lock. The journal's writer is one task that hands off one batch
at a time, and at low concurrency a batch holds one to four events, so that bookkeeping was
paid per submit (~150 us of CPU, docs/benchmarks.md "Optimisation notes" 4). Here the
thread is started once per writer, fed through a `queue.SimpleQueue` (a C-level queue, no
Python lock), and reports back with `TrioToken.run_sync_soon`.

Semantics match `to_thread.run_sync` with its default `abandon_on_cancel=False`: a
caller already cancelled raises `Cancelled` without starting the call; otherwise the
calling task cannot be cancelled while its call runs (a half-made batch must finish or fail
before anyone looks at the journal again); a cancellation is delivered when it returns.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

__all__ = ["IOThread"]

T = TypeVar("T")

_Job = tuple[Callable[..., Any], tuple[Any, ...], Callable[[outcome.Outcome[Any]], None]]


class IOThread:
    """A worker thread owned by one trio task; `start`, then `run_sync`, then `stop`."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the IO thread is already running")
        # daemon: a process that exits without closing its journal must not hang on it
        self._thread = threading.Thread(target=self._serve, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Let the thread finish the job in hand (if any) and exit; does not wait for it."""
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    async def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in the thread and return (or raise) what it did."""
        if self._thread is None:
            raise RuntimeError("the IO thread is not running")
        # As to_thread does: an already-cancelled caller starts nothing (a writer being
        # stopped must not go on starting write+fsync rounds).
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        token = trio.lowlevel.current_trio_token()

        def deliver(result: outcome.Outcome[Any]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, task, result)

        self._jobs.put((fn, args, deliver))
        value: T = await trio.lowlevel.wait_task_rescheduled(_refuse_abort)
        return value

    def _serve(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, args, deliver = job
            deliver(outcome.capture(fn, *args))
            del job, fn, args, deliver  # drop references before blocking again


def _refuse_abort(_: Any) -> trio.lowlevel.Abort:
    return trio.lowlevel.Abort.FAILED
