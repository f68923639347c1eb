"""One actor per running run: it owns the run from `started` to its terminal event.

Ownership is what keeps the journal consistent without locks. While a run is running, only
its actor writes events about it; the rest of the engine talks to it through its mailbox.
So "cancel arrived just as the runner returned" has one answer, decided in one place: the
first of the two to reach `_finish` wins, and the loser writes nothing.

The runner runs inside a cancel scope carrying the run's deadline. A user cancel (a `Cancel`
message) is first recorded durably as `cancel_requested` (that is the acknowledgement the
caller waits for), then the scope is cancelled; only after the runner has really stopped
(its subprocess reaped, its HTTP stream closed) is `cancelled` written.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio

from .journal import JournalClosed, JournalWriteError
from .model import EventType, Run
from .runners import RunContext, RunError, Runner, SessionTurn

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["Actor", "Cancel", "Shutdown"]

log = logging.getLogger("agentjobs.actor")
E = EventType

OUTPUT_FLUSH_S = 0.05  # coalesce output and progress over this long
OUTPUT_FLUSH_BYTES = 16 * 1024


@attrs.frozen(slots=True)
class Cancel:
    """Stop the run and record it as cancelled. `acked` is set once that is durable."""

    reason: str
    acked: trio.Event = attrs.field(factory=trio.Event, eq=False)


@attrs.frozen(slots=True)
class Shutdown:
    """Stop the run and put it back in the queue (the engine is stopping)."""

    reason: str = "engine shutting down"


Message = Cancel | Shutdown


class Actor:
    def __init__(self, supervisor: Supervisor, run: Run, runner: Runner) -> None:
        self.sup = supervisor
        self.run_id = run.id
        self.run = run
        self.runner = runner
        self.mailbox_send, self.mailbox = trio.open_memory_channel[Message](8)
        self.done = trio.Event()
        self._finished = False
        self._stop: Message | None = None
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._out: list[str] = []
        self._out_bytes = 0
        self._progress: dict[str, Any] | None = None
        self._flusher_running = False

    # -- reporting (called by the runner through its context) ----------------------------

    def _report_progress(self, **fields: Any) -> None:
        if self._finished:
            return
        fresh = {k: v for k, v in fields.items() if v is not None}
        if "percentage" in fresh:
            fresh["percentage"] = float(max(0.0, min(100.0, fresh["percentage"])))
        if self._progress is None:
            self._progress = fresh
        else:
            self._progress.update(fresh)
        self._wake_flusher()

    def _report_output(self, text: str) -> None:
        if self._finished:
            return
        self._out.append(text)
        self._out_bytes += len(text)
        if self._out_bytes >= OUTPUT_FLUSH_BYTES:
            self._flush()
        else:
            self._wake_flusher()

    def _wake_flusher(self) -> None:
        if not self._flusher_running and self._nursery is not None:
            self._flusher_running = True
            self._nursery.start_soon(self._flush_later)

    async def _flush_later(self) -> None:
        await trio.sleep(OUTPUT_FLUSH_S)
        self._flusher_running = False
        self._flush()

    def _flush(self) -> None:
        """Write pending output and progress as events (not awaited: they ride the next batch)."""
        if self._finished:
            return
        journal = self.sup.journal
        try:
            if self._out:
                text = "".join(self._out)
                self._out.clear()
                self._out_bytes = 0
                journal.append(self.run_id, E.OUTPUT, {"text": text})
            if self._progress is not None:
                progress, self._progress = self._progress, None
                journal.append(self.run_id, E.PROGRESS, progress)
        except JournalClosed:
            pass

    # -- the actor's life ---------------------------------------------------------------

    def session_history(self) -> list[SessionTurn]:
        return self.sup.session_history(self.run)

    async def main(self) -> None:
        """Run the run once: `started`, the runner, exactly one terminal (or requeue) event."""
        sup = self.sup
        run = self.run
        spec = run.spec
        attempt = run.attempt + 1
        try:
            # written, not fsynced: a start lost to a crash only means the run starts again
            await sup.journal.append(run.id, E.STARTED, {"attempt": attempt}).wait()
        except (JournalWriteError, JournalClosed) as exc:
            log.warning("run %s: could not record start (%s); it stays queued", run.id, exc)
            self._finished = True
            self._drain_mailbox()
            self.done.set()
            sup.actor_failed_to_start(self)
            return
        ctx = RunContext(
            run_id=run.id,
            prompt=spec.prompt,
            config=dict(spec.config),
            session_id=spec.session_id,
            attempt=attempt,
            max_attempts=spec.max_attempts,
            report_progress=self._report_progress,
            report_output=self._report_output,
            session_history=self.session_history,
        )
        started = time.monotonic()
        outcome: tuple[EventType, dict[str, Any]]
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._listen)
                outcome = await self._execute(ctx, started)
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
        await self._finish(*outcome)

    async def _execute(self, ctx: RunContext, started: float) -> tuple[EventType, dict[str, Any]]:
        spec = self.run.spec
        timeout = spec.timeout if spec.timeout is not None else self.sup.config.default_timeout
        with trio.CancelScope() as scope:
            self._scope = scope
            if timeout is not None and math.isfinite(timeout):
                scope.deadline = trio.current_time() + timeout
            if self._stop is not None:  # a message beat us here
                scope.cancel()
            try:
                result = await self.runner.run(ctx)
            except RunError as exc:
                return self._failure(ctx, exc.message, exc.retryable, exc.retry_after)
            except Exception as exc:
                log.debug("run %s: runner raised", self.run_id, exc_info=True)
                message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                return self._failure(ctx, message, False, None)
            else:
                return self._success(ctx, result, started)
        # the scope was cancelled: by a message, or by the deadline
        metrics = ctx.metrics or None
        if isinstance(self._stop, Cancel):
            return E.CANCELLED, {"reason": self._stop.reason}
        if isinstance(self._stop, Shutdown):
            return E.REQUEUED, {"reason": self._stop.reason, "count_attempt": False}
        message = f"timed out after {_fmt_seconds(timeout)}"
        data: dict[str, Any] = {"error": message, "kind": "timeout"}
        if metrics:
            data["metrics"] = metrics
        return E.FAILED, data

    def _success(
        self, ctx: RunContext, result: Any, started: float
    ) -> tuple[EventType, dict[str, Any]]:
        metrics = dict(ctx.metrics)
        metrics.setdefault("duration_s", round(time.monotonic() - started, 6))
        try:
            size = len(orjson.dumps(result))
        except TypeError as exc:
            return E.FAILED, {"error": f"result is not JSON-serialisable: {exc}", "kind": "error"}
        limit = self.sup.config.max_result_bytes
        if limit is not None and size > limit:
            return E.FAILED, {
                "error": f"result is {size} bytes, over the limit of {limit}",
                "kind": "error",
            }
        return E.SUCCEEDED, {"result": result, "metrics": metrics}

    def _failure(
        self, ctx: RunContext, message: str, retryable: bool, retry_after: float | None
    ) -> tuple[EventType, dict[str, Any]]:
        spec = self.run.spec
        attempt = ctx.attempt
        metrics = ctx.metrics or None
        if retryable and attempt < spec.max_attempts:
            cfg = self.sup.config
            delay = min(cfg.retry_max_s, cfg.retry_base_s * 2 ** (attempt - 1))
            delay = delay * (0.5 + random.random() / 2)  # jitter, so retries do not herd
            if retry_after is not None:
                delay = max(delay, retry_after)
            data: dict[str, Any] = {
                "error": message,
                "kind": "error",
                "attempt": attempt,
                "not_before": self.sup.wall() + delay,
            }
            return E.RETRYING, data
        failed: dict[str, Any] = {"error": message, "kind": "error"}
        if metrics:
            failed["metrics"] = metrics
        return E.FAILED, failed

    async def _listen(self) -> None:
        """The mailbox: the only way the rest of the engine speaks to a running run."""
        async for msg in self.mailbox:
            if self._finished or self._stop is not None:
                if isinstance(msg, Cancel):
                    msg.acked.set()
                continue
            if isinstance(msg, Cancel):
                try:
                    await self.sup.journal.commit(
                        self.run_id, E.CANCEL_REQUESTED, {"reason": msg.reason}
                    )
                except (JournalWriteError, JournalClosed) as exc:
                    log.warning("run %s: could not record cancel request: %s", self.run_id, exc)
                    msg.acked.set()  # the caller sees the run still running
                    continue
                if self._finished:  # the runner finished while we were writing
                    msg.acked.set()
                    continue
                self._stop = msg
                msg.acked.set()
            else:
                self._stop = msg
            if self._scope is not None:
                self._scope.cancel()

    async def _finish(self, etype: EventType, data: dict[str, Any]) -> None:
        """Write the run's last event, retrying while the journal cannot take it."""
        self._flush()
        self._finished = True
        delay = 0.05
        while True:
            try:
                await self.sup.journal.commit(self.run_id, etype, data)
                break
            except JournalWriteError as exc:
                log.error("run %s: cannot record %s yet (%s); retrying", self.run_id, etype, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except JournalClosed:
                log.error("run %s: journal closed before %s was recorded", self.run_id, etype)
                break
            except TypeError as exc:  # an unencodable field that slipped through
                etype, data = E.FAILED, {"error": f"cannot record result: {exc}", "kind": "error"}
        self._drain_mailbox()
        self.done.set()
        self.sup.actor_done(self)

    def _drain_mailbox(self) -> None:
        """Answer requests that arrived too late to matter, so no caller waits forever."""
        self.mailbox_send.close()
        while True:
            try:
                msg = self.mailbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if isinstance(msg, Cancel):
                msg.acked.set()


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    return f"{s:g}s"


def callable_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", repr(fn))
