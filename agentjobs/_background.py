"""`BackgroundEngine`: the trio engine on a thread of its own, behind a blocking facade.

Research code lives in plain scripts and in Jupyter, where an asyncio loop is already
running and cannot be handed to trio. Rather than asking those callers to learn trio, the
engine gets its own thread with its own `trio.run`; every public method here crosses into
that thread with `trio.from_thread` and blocks the *calling* thread until the answer is
back. Nothing ever touches the caller's event loop, so the same object works from plain
code, from any number of worker threads, and from inside `asyncio.run` / a notebook cell
(where `await asyncio.to_thread(bg.wait, run_id)` keeps the loop responsive).

Every call runs in the engine thread under a cancel scope this object keeps track of. That
gives three guarantees the bare `trio.from_thread.run` does not:

* a caller interrupted while blocked (Ctrl-C in a notebook) cancels its trio-side task
  instead of leaving it waiting forever;
* `close()` ends every blocked call with `EngineClosed` instead of leaving threads hanging;
* engine state (mutated only in the engine thread) is only ever read in that thread.

The thread is a daemon so that a forgotten instance cannot keep the interpreter alive, and
an exit hook closes every open instance gracefully (the engine gets its grace period, the
journal is flushed and closed) before the interpreter joins the program's own threads, so
that threads still blocked in `wait()` are released rather than hanging the exit.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import logging
import math
import threading
import weakref
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar

import attrs
import trio

from .engine import Engine, EngineClosed, EngineError, Event, Run, Status, open_engine
from .engine.bus import ENDS_STREAM

__all__ = ["BackgroundEngine", "EventStream", "RunCancelled", "RunFailed"]

T = TypeVar("T")

log = logging.getLogger("agentjobs.background")

_STREAM_BUFFER: Final = 256


class RunFailed(EngineError):
    """`result()` of a run that finished as failed; `run` is the finished run."""

    def __init__(self, run: Run) -> None:
        kind = f" ({run.error_kind})" if run.error_kind else ""
        super().__init__(f"run {run.id} failed{kind}: {run.error}")
        self.run = run


class RunCancelled(EngineError):
    """`result()` of a run that was cancelled; `run` is the finished run."""

    def __init__(self, run: Run) -> None:
        super().__init__(f"run {run.id} was cancelled: {run.error or 'no reason given'}")
        self.run = run


@attrs.define(slots=True, eq=False)
class _StreamEnd:
    """Why a stream pump stopped, read by the consumer after the channel ends."""

    error: BaseException | None = None


_open: weakref.WeakSet[BackgroundEngine] = weakref.WeakSet()
_open_lock = threading.Lock()
_hooked = False


def _close_all_at_exit() -> None:
    """Close engines the program forgot to close, while threads can still be joined."""
    with _open_lock:
        engines = list(_open)
    for bg in engines:
        with contextlib.suppress(Exception):  # nothing useful to do about it at exit
            bg.close()


def _hook_exit() -> None:
    """Arrange for `_close_all_at_exit` to run at interpreter exit, early enough.

    `threading._register_atexit` hooks run *before* the interpreter joins non-daemon
    threads (concurrent.futures uses it for the same reason): a worker thread blocked in
    `wait()` then gets `EngineClosed` and ends, instead of the exit hanging on it. Plain
    `atexit` (which runs after that join) is the fallback and a backstop.
    """
    global _hooked
    if _hooked:
        return
    _hooked = True
    atexit.register(_close_all_at_exit)
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(_close_all_at_exit)


class BackgroundEngine:
    """The engine, running on a background thread, with a synchronous API.

    `BackgroundEngine(data_dir, **engine_options)` takes what `open_engine` takes
    (`runners=`, `default_runner=`, `config=`, or `EngineConfig` fields such as
    `durability="os"`, `max_concurrency=4`). It returns once the journal is replayed and
    the engine accepts runs; a journal that cannot be opened raises here.

    Every method may be called from any thread, including one running an asyncio loop; each
    blocks the calling thread until done. It must not be called from trio code (that
    would block trio's own loop): embed the engine with `open_engine` there instead.
    """

    RunFailed = RunFailed
    RunCancelled = RunCancelled

    def __init__(self, data_dir: Path | str | None = None, **engine_options: Any) -> None:
        self._data_dir = data_dir
        self._options = engine_options
        self._lock = threading.Lock()
        self._scopes: set[trio.CancelScope] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._engine: Engine | None = None
        self._nursery: trio.Nursery | None = None
        self._stop: trio.Event | None = None
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name="agentjobs-engine", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._closed = True
            raise self._startup_error
        with _open_lock:
            _open.add(self)
            _hook_exit()

    # -- the engine thread -------------------------------------------------------------

    def _thread_main(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            if not self._ready.is_set():
                self._startup_error = exc
            else:
                self._failure = exc
                log.error("the background engine stopped with an error", exc_info=exc)
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        try:
            # exits in reverse order: stream pumps end first, then leaving `open_engine`
            # gives running runs their grace period (calls blocked in `wait` still see the
            # runs that finish meanwhile)
            async with (
                open_engine(self._data_dir, **self._options) as engine,
                trio.open_nursery() as nursery,
            ):
                self._engine = engine
                self._nursery = nursery
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._engine = None
            with self._lock:
                scopes = list(self._scopes)
            for scope in scopes:
                scope.cancel()

    # -- crossing into the engine thread -----------------------------------------------

    def _closed_error(self) -> EngineClosed:
        if self._failure is not None:
            err = EngineClosed(f"the background engine stopped with an error: {self._failure!r}")
            err.__cause__ = self._failure
            return err
        return EngineClosed("the background engine is closed")

    def _require_token(self) -> trio.lowlevel.TrioToken:
        token = self._token
        if self._closed or token is None or not self._thread.is_alive():
            raise self._closed_error()
        return token

    def _call(self, fn: Callable[[Engine], Awaitable[T]]) -> T:
        """Run `await fn(engine)` in the engine thread; block this thread for the answer."""
        token = self._require_token()
        scope = trio.CancelScope()

        async def task() -> T:
            engine = self._engine
            if engine is None:
                raise self._closed_error()
            with scope:
                return await fn(engine)
            raise EngineClosed("the background engine was closed while the call waited")

        with self._lock:
            self._scopes.add(scope)
        try:
            return self._send(token, task)
        except BaseException:
            # e.g. KeyboardInterrupt while blocked: do not leave the trio side waiting
            if not scope.cancel_called:
                self._try_sync(token, scope.cancel)
            raise
        finally:
            with self._lock:
                self._scopes.discard(scope)

    def _call_sync(self, fn: Callable[[Engine], T]) -> T:
        """Run `fn(engine)` in the engine thread: engine state is only read there."""

        async def task(engine: Engine) -> T:
            return fn(engine)

        return self._call(task)

    def _send(self, token: trio.lowlevel.TrioToken, afn: Callable[[], Awaitable[T]]) -> T:
        try:
            return trio.from_thread.run(afn, trio_token=token)
        except (trio.RunFinishedError, trio.Cancelled):
            # the engine thread ended (or was ending) before the call could run
            raise self._closed_error() from None
        except RuntimeError as exc:
            if "blocking function" in str(exc):
                raise RuntimeError(
                    "BackgroundEngine blocks the calling thread, so it cannot be called "
                    "from trio code; use agentjobs.open_engine there, or wrap the call "
                    "in trio.to_thread.run_sync"
                ) from None
            raise

    @staticmethod
    def _try_sync(token: trio.lowlevel.TrioToken, fn: Callable[[], object]) -> None:
        with contextlib.suppress(trio.RunFinishedError, RuntimeError):
            trio.from_thread.run_sync(fn, trio_token=token)

    # -- the facade --------------------------------------------------------------------

    def submit(self, prompt: str, **options: Any) -> str:
        """Submit a run and return its id once the run is durable. Options are those of
        `Engine.make_spec` (`config=`, `session_id=`, `runner=`, `timeout=`, ...)."""

        async def go(engine: Engine) -> str:
            run = await engine.submit(prompt, **options)
            return run.id

        return self._call(go)

    def get(self, run_id: str) -> Run:
        """A snapshot of the run now. Raises `NotFound`."""
        return self._call_sync(lambda engine: engine.get(run_id))

    def wait(self, run_id: str, timeout: float | None = None) -> Run:
        """Block until the run is finished and return it. Raises `TimeoutError` if it is
        not finished after `timeout` seconds (None: wait as long as it takes)."""
        if timeout is not None and (math.isnan(timeout) or timeout < 0):
            raise ValueError("timeout must be a non-negative number of seconds or None")

        async def go(engine: Engine) -> Run:
            return await engine.wait(run_id, timeout)

        run = self._call(go)
        if not run.finished:
            raise TimeoutError(
                f"run {run_id} is not finished after {timeout} s (status: {run.status.value})"
            )
        return run

    def result(self, run_id: str, timeout: float | None = None) -> Any:
        """Wait for the run and return its result. A failed run raises `RunFailed`, a
        cancelled one `RunCancelled` (both carry the run); `TimeoutError` as for `wait`."""
        run = self.wait(run_id, timeout)
        if run.status is Status.SUCCEEDED:
            return run.result
        if run.status is Status.CANCELLED:
            raise RunCancelled(run)
        raise RunFailed(run)

    def cancel(self, run_id: str, *, reason: str = "cancelled by user") -> Run:
        """Cancel a run: at once if queued; a running run is stopped for real first.
        Raises `AlreadyFinished` for a finished run."""

        async def go(engine: Engine) -> Run:
            return await engine.cancel(run_id, reason=reason)

        return self._call(go)

    def delete(self, run_id: str) -> None:
        """Forget a finished run. Raises `NotFinished` otherwise."""

        async def go(engine: Engine) -> None:
            await engine.delete(run_id)

        self._call(go)

    def list(
        self,
        *,
        status: Status | str | None = None,
        session_id: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[Run]:
        """Runs newest first, filtered; at most `limit` of them (None: all)."""

        def go(engine: Engine) -> builtins.list[Run]:
            out: builtins.list[Run] = []
            cursor: str | None = None
            while limit is None or len(out) < limit:
                want = 500 if limit is None else min(500, limit - len(out))
                page = engine.list(status=status, session_id=session_id, limit=want, cursor=cursor)
                out.extend(page.runs)
                cursor = page.next_cursor
                if cursor is None:
                    break
            return out

        return self._call_sync(go)

    def events(self, run_id: str, after_seq: int = 0) -> builtins.list[Event]:
        """The run's recorded events after `after_seq`, oldest first (no waiting)."""

        async def go(engine: Engine) -> builtins.list[Event]:
            return await engine.events(run_id, after_seq)

        return self._call(go)

    def stream(self, run_id: str, after_seq: int = 0) -> EventStream:
        """Iterate over the run's events after `after_seq`: past ones, then live ones as
        they are recorded, ending after the terminal event. Raises `NotFound` at once.

        A pump task in the engine thread feeds a bounded channel and each `next()` takes
        one event from it, so a slow reader holds back only its own pump. Leaving the loop
        early is fine; `close()` the stream (or use it as a context manager) to stop the
        pump at once rather than when the stream is garbage-collected.
        """
        token = self._require_token()
        end = _StreamEnd()

        def start(engine: Engine) -> tuple[trio.MemoryReceiveChannel[Event], trio.CancelScope]:
            events = engine.subscribe(run_id, after_seq)  # NotFound raises here, at once
            send, recv = trio.open_memory_channel[Event](_STREAM_BUFFER)
            pump_scope = trio.CancelScope()

            async def pump() -> None:
                completed = False
                try:
                    with pump_scope:
                        async for event in events:
                            await send.send(event)
                        completed = True
                except Exception as exc:  # handed to the reader; must not crash the engine
                    end.error = exc
                finally:
                    # say why *before* the reader can see the channel end
                    if not completed and end.error is None:
                        end.error = EngineClosed("the background engine was closed")
                    send.close()
                    aclose = getattr(events, "aclose", None)
                    if aclose is not None:
                        with trio.CancelScope(shield=True):
                            await aclose()

            nursery = self._nursery
            if nursery is None:
                raise EngineClosed("the background engine is closed")
            nursery.start_soon(pump)
            return recv, pump_scope

        recv, pump_scope = self._call_sync(start)
        return EventStream(self, token, recv, pump_scope, end)

    # -- lifecycle ---------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Shut the engine down gracefully and wait for its thread. Idempotent.

        Running runs get the engine's `grace_period_s` to finish; the rest are stopped and
        recorded so that the next open of the same data dir resumes them. Calls blocked in
        other threads (`wait`, `stream`) then raise `EngineClosed`.
        """
        if threading.current_thread() is self._thread:
            raise RuntimeError("BackgroundEngine.close() cannot be called from its own thread")
        with self._lock:
            if self._closed:
                already = True
            else:
                already = False
                self._closed = True
        if not already:
            token, stop = self._token, self._stop
            if token is not None and stop is not None:
                self._try_sync(token, stop.set)
        self._thread.join()
        with _open_lock:
            _open.discard(self)

    def __enter__(self) -> BackgroundEngine:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<BackgroundEngine {self._data_dir!s} ({state})>"


class EventStream:
    """A blocking iterator over one run's events, from `BackgroundEngine.stream`."""

    def __init__(
        self,
        owner: BackgroundEngine,
        token: trio.lowlevel.TrioToken,
        recv: trio.MemoryReceiveChannel[Event],
        pump_scope: trio.CancelScope,
        end: _StreamEnd,
    ) -> None:
        self._owner = owner
        self._token = token
        self._recv = recv
        self._pump_scope = pump_scope
        self._end = end
        self._done = False

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> Event:
        if self._done:
            raise StopIteration
        recv = self._recv

        async def receive(_engine: Engine) -> Event | None:
            try:
                return await recv.receive()
            except trio.EndOfChannel:
                return None

        try:
            event = self._owner._call(receive)
        except EngineClosed:
            self.close()
            if self._end.error is not None:
                raise self._end.error from None
            raise
        except BaseException:
            self.close()
            raise
        if event is None:
            self.close()
            if self._end.error is not None:
                raise self._end.error
            raise StopIteration
        if event.type in ENDS_STREAM:
            self.close()
        return event

    def close(self) -> None:
        """Stop following the run (idempotent)."""
        if self._done:
            return
        self._done = True
        pump_scope, recv = self._pump_scope, self._recv

        def stop() -> None:
            pump_scope.cancel()
            recv.close()

        BackgroundEngine._try_sync(self._token, stop)

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not self._done:
            with contextlib.suppress(Exception):  # interpreter teardown
                self.close()
