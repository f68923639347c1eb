"""`python`: call a function of your own, named `package.module:function`.

Calling convention (one rule, whatever the function's colour):

- **async** functions (`async def fn(ctx)`) are awaited in the engine's trio loop with the
  `RunContext` itself. They are cancelled like any trio code: `trio.Cancelled` at their next
  checkpoint. Use trio (or anyio) for I/O; a blocking call would stall the whole server.
- **sync** functions (`def fn(ctx)`) run in a worker thread, so blocking work (a local model,
  `requests`, numpy) does not stall the loop. They get a `ThreadContext`: the same data
  (`prompt`, `config`, `session_id`, `run_id`, `attempt`, `max_attempts`, `metrics`) and the
  same `progress()` / `output()` / `session_history()`, made thread-safe by handing each
  call over to the trio thread. Threads cannot be interrupted, so cancellation is a
  *token*: `ctx.cancelled` turns true, `ctx.check_cancelled()` raises `RunCancelled`, and
  `ctx.sleep(s)` wakes up early. A function that never looks is given `cancel_grace_s`
  to return; then its thread is abandoned (it runs on, its output and result are ignored)
  so that a cancel never hangs the server, and a warning is logged.

Either way the return value (any JSON value) is the result; raising `RunError` fails the
run as asked (e.g. retryable); any other exception fails it with the exception's type and
message.

The target is imported when the runner is constructed, i.e. at server start: a typo in
the name fails start-up with a clear `RunnerConfigError` instead of every run.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import attrs
import trio

from ._base import RunContext, RunError, SessionTurn
from .config import RunnerConfigError

__all__ = ["PythonRunner", "RunCancelled", "ThreadContext"]

log = logging.getLogger("agentjobs.runners.python")


class RunCancelled(BaseException):
    """Raised by `ThreadContext.check_cancelled()` / `sleep()` once the run is cancelled.

    A `BaseException`, like `trio.Cancelled` and `asyncio.CancelledError`, so that a
    function's `except Exception:` error handling does not swallow it by accident.
    """


class ThreadContext:
    """What a sync runner function gets: the run's data, thread-safe reporting, and a
    cancellation token. Safe to use from any thread (including ones the function starts).

    Reporting after the run was cancelled or has finished is silently dropped, so a late
    thread cannot write into a run that is already over.
    """

    __slots__ = (
        "_closed",
        "_ctx",
        "_event",
        "_token",
        "attempt",
        "config",
        "max_attempts",
        "metrics",
        "prompt",
        "run_id",
        "session_id",
    )

    def __init__(self, ctx: RunContext, token: trio.lowlevel.TrioToken) -> None:
        self.run_id = ctx.run_id
        self.prompt = ctx.prompt
        self.config = ctx.config
        self.session_id = ctx.session_id
        self.attempt = ctx.attempt
        self.max_attempts = ctx.max_attempts
        # The thread's own dict, merged into the run's metrics when the function returns:
        # the engine never sees a dict that a thread is still writing to.
        self.metrics: dict[str, Any] = {}
        self._ctx = ctx
        self._token = token
        self._event = threading.Event()  # set = cancelled
        self._closed = False  # set (on the trio thread) once the run is over

    # -------------------------------------------------------------- cancellation token

    @property
    def cancelled(self) -> bool:
        """True once the run has been cancelled (user cancel, timeout, shutdown)."""
        return self._event.is_set()

    def check_cancelled(self) -> None:
        """Raise `RunCancelled` if the run has been cancelled; call it between steps."""
        if self._event.is_set():
            raise RunCancelled

    def sleep(self, seconds: float) -> None:
        """Like `time.sleep`, but returns early by raising `RunCancelled` on cancel."""
        if self._event.wait(seconds):
            raise RunCancelled

    # -------------------------------------------------------------- reporting

    def progress(
        self,
        percentage: float | None = None,
        step: str | None = None,
        *,
        steps_completed: int | None = None,
        steps_total: int | None = None,
    ) -> None:
        """Report progress (0..100) and/or the current step (see `RunContext.progress`)."""
        self._to_trio(
            lambda: self._ctx.progress(
                percentage, step, steps_completed=steps_completed, steps_total=steps_total
            )
        )

    def output(self, text: str) -> None:
        """Stream a chunk of output text (see `RunContext.output`)."""
        if text:
            self._to_trio(lambda: self._ctx.output(text))

    def session_history(self) -> Sequence[SessionTurn]:
        """Earlier finished runs of this run's session, oldest first."""
        result: Sequence[SessionTurn] = ()

        def fetch() -> None:
            nonlocal result
            result = self._ctx.session_history()

        self._to_trio(fetch)
        return result

    def _to_trio(self, fn: Callable[[], None]) -> None:
        if self._event.is_set():
            return

        def guarded() -> None:
            # Checked on the trio thread, where `_closed` is written: no race with the end
            # of the run.
            if not self._closed:
                fn()

        try:
            trio.from_thread.run_sync(guarded, trio_token=self._token)
        except (trio.RunFinishedError, trio.Cancelled):
            self._event.set()


@attrs.define(slots=True, eq=False)
class PythonRunner:
    """Run `module:function` (or a callable given directly, from the embedding API).

    Options: `python_path` (directories put at the front of `sys.path` before importing,
    e.g. a plugins folder next to the config file), `cancel_grace_s` (how long a sync
    function may take to notice a cancel before its thread is abandoned), `max_threads`
    (worker threads this runner may use at once; default: trio's shared limit of 40).
    """

    target: str | Callable[..., Any]
    python_path: Sequence[str] = attrs.field(default=(), kw_only=True)
    cancel_grace_s: float = attrs.field(default=5.0, kw_only=True)
    max_threads: int | None = attrs.field(default=None, kw_only=True)
    _fn: Callable[..., Any] = attrs.field(init=False)
    _is_async: bool = attrs.field(init=False, default=False)
    _limiter: trio.CapacityLimiter | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if self.cancel_grace_s < 0:
            raise RunnerConfigError("cancel_grace_s: must be >= 0")
        if self.max_threads is not None and self.max_threads < 1:
            raise RunnerConfigError("max_threads: must be >= 1")
        for entry in reversed(self.python_path):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        fn = _resolve(self.target) if isinstance(self.target, str) else self.target
        if not callable(fn):
            raise RunnerConfigError(
                f"target: {self.name!r} is not callable (it is a {type(fn).__name__})"
            )
        self._fn = fn
        self._is_async = _is_async_callable(fn)
        try:
            inspect.signature(fn).bind(None)
        except TypeError:
            raise RunnerConfigError(
                f"target: {self.name!r} must accept exactly one positional argument, the run "
                "context (e.g. `def fn(ctx): return ctx.prompt`)"
            ) from None
        except ValueError:  # pragma: no cover - no signature available (some builtins)
            pass

    @property
    def name(self) -> str:
        """The target as given, for messages."""
        if isinstance(self.target, str):
            return self.target
        module = getattr(self.target, "__module__", "?")
        return f"{module}:{getattr(self.target, '__qualname__', repr(self.target))}"

    @property
    def is_async(self) -> bool:
        return self._is_async

    async def run(self, ctx: RunContext) -> Any:
        if self._is_async:
            try:
                return await self._fn(ctx)
            except RunError:
                raise
            except Exception as exc:
                _fail(self.name, exc)
        return await self._run_sync(ctx)

    async def _run_sync(self, ctx: RunContext) -> Any:
        token = trio.lowlevel.current_trio_token()
        tctx = ThreadContext(ctx, token)
        finished = trio.Event()
        fn = self._fn

        name = self.name

        def call() -> Any:
            try:
                result = fn(tctx)
                if inspect.isawaitable(result):
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()  # no "coroutine was never awaited" noise
                    raise RunError(
                        f"{name} returned an awaitable from a sync call; declare it "
                        "`async def` so it runs in trio"
                    )
                return result
            finally:
                # Tell the trio side the thread is done, even if it has stopped waiting
                # (the loop may even be gone by now).
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(finished.set)

        if self.max_threads is not None and self._limiter is None:
            self._limiter = trio.CapacityLimiter(self.max_threads)
        try:
            result = await trio.to_thread.run_sync(
                call, abandon_on_cancel=True, limiter=self._limiter
            )
        except trio.Cancelled:
            tctx._event.set()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(self.cancel_grace_s):
                    await finished.wait()
                if not finished.is_set():
                    log.warning(
                        "run %s: %s did not stop within %.3g s of being cancelled; abandoning "
                        "its thread (poll ctx.cancelled or ctx.check_cancelled() to stop "
                        "promptly)",
                        ctx.run_id,
                        self.name,
                        self.cancel_grace_s,
                    )
            raise
        except RunCancelled:
            # The function saw a cancel that did not come from trio (cannot normally
            # happen: only our cancellation sets the token). Fail clearly rather than hang.
            raise RunError(f"{self.name} was cancelled") from None
        except RunError:
            raise
        except Exception as exc:
            _fail(self.name, exc)
        finally:
            tctx._closed = True
            if finished.is_set():
                ctx.metrics.update(tctx.metrics)
        return result


def _fail(name: str, exc: Exception) -> NoReturn:
    """Fail the run for what the function raised. A `RunError` that only got wrapped in
    exception groups by the function's own nurseries is passed on as it was raised."""
    leaf: BaseException = exc
    while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
        leaf = leaf.exceptions[0]
    if isinstance(leaf, RunError):
        raise leaf from None
    detail = str(leaf)
    message = f"{name} raised {type(leaf).__name__}" + (f": {detail}" if detail else "")
    raise RunError(message) from exc


def _is_async_callable(fn: Any) -> bool:
    while hasattr(fn, "func") and hasattr(fn, "args"):  # functools.partial
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = getattr(fn, "__call__", None)  # noqa: B004 - async __call__ on an instance
    return call is not None and inspect.iscoroutinefunction(call)


def _resolve(target: str) -> Any:
    """Import `package.module:attr.path`; a `RunnerConfigError` says precisely what failed."""
    module_name, sep, attr_path = target.partition(":")
    if not sep or not module_name or not attr_path:
        raise RunnerConfigError(f"target: expected 'package.module:function', got {target!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise RunnerConfigError(
            f"target: cannot import module {module_name!r} for {target!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    except Exception as exc:
        raise RunnerConfigError(
            f"target: importing module {module_name!r} for {target!r} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    walked = module_name
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise RunnerConfigError(
                f"target: {walked!r} has no attribute {part!r} (from {target!r})"
            ) from None
        walked = f"{walked}:{part}" if walked == module_name else f"{walked}.{part}"
    return obj
