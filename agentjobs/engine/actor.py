"""One actor per running run: it owns the run from `started` to its last event.

Ownership is what keeps the journal consistent without locks. While a run is running, only
its actor writes events about it; the rest of the engine talks to it through its mailbox
(a bounded trio memory channel taking `Cancel` and `Shutdown`). So "a cancel arrived just
as the runner returned" has one answer, decided in one place:

* A `Cancel` is first recorded durably as `cancel_requested`; that record is the
  acknowledgement the caller waits for, and a promise: once it is on disk the run ends
  `cancelled`, whatever the runner does next (recovery after a crash keeps the same promise:
  `cancel_requested` becomes `cancelled`). Only then is the runner's scope cancelled, and
  only after the runner has really stopped (its subprocess reaped, its HTTP stream closed)
  is `cancelled` written.
* A `Cancel` that arrives after the runner has returned records nothing and is answered
  "too late"; the caller then sees the run's real outcome.

The runner runs inside a cancel scope carrying the run's deadline. Progress and output are
coalesced (`OUTPUT_FLUSH_S`, `OUTPUT_FLUSH_BYTES`) and appended without waiting; they ride
the next group commit. The mailbox listener and the flusher are started only when there is
something for them to do, because a no-op run should cost one task, not three (see
`docs/benchmarks.md`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final

import attrs
import orjson
import trio

from .journal import JournalClosed, JournalError, JournalWriteError, Ticket
from .model import EventType, Run
from .runners import RunContext, RunError, Runner, SessionTurn

if TYPE_CHECKING:
    from .supervisor import Supervisor

__all__ = ["Actor", "Cancel", "Shutdown"]

log = logging.getLogger("agentjobs.actor")
E = EventType

OUTPUT_FLUSH_S = 0.05  # coalesce output and progress over this long
OUTPUT_FLUSH_BYTES = 16 * 1024
MAILBOX_SIZE = 8

# How a `Cancel` was answered.
REQUESTED: Final = "requested"  # `cancel_requested` is durable: the run will end cancelled
TOO_LATE: Final = "too_late"  # the runner had already returned; nothing was recorded
NOT_RECORDED: Final = "not_recorded"  # the journal could not take `cancel_requested`
BUSY: Final = "busy"  # the mailbox was full; ask again

# Results of these types need no encoding to check them.
_CANONICAL_TYPES: Final = (str, bool, type(None))


@attrs.define(slots=True, eq=False)
class Cancel:
    """Stop the run and record it as cancelled. `acked` is set once answered; `outcome`
    says how (`REQUESTED`, `TOO_LATE`, `NOT_RECORDED`, `BUSY`)."""

    reason: str
    acked: trio.Event = attrs.Factory(trio.Event)
    outcome: str | None = None
    error: BaseException | None = None

    def answer(self, outcome: str, error: BaseException | None = None) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.error = error
        self.acked.set()


@attrs.frozen(slots=True)
class Shutdown:
    """Stop the run and put it back in the queue (the engine is stopping)."""

    reason: str = "engine shutting down"


Message = Cancel | Shutdown


class Actor:
    __slots__ = (
        "_closing",
        "_finished",
        "_flusher_running",
        "_helpers",
        "_listening",
        "_live",
        "_mail",
        "_mailbox",
        "_out",
        "_out_bytes",
        "_progress",
        "_recording",
        "_scope",
        "_send",
        "_stop",
        "done",
        "released",
        "run",
        "run_id",
        "runner",
        "started",
        "sup",
    )

    def __init__(self, supervisor: Supervisor, run: Run, runner: Runner, started: Ticket) -> None:
        self.sup = supervisor
        self.started = started  # the `started` event, appended by the supervisor
        self.run_id = run.id
        self.run = run
        self.runner = runner
        self.done = trio.Event()
        self.released = False  # the supervisor has taken the run back
        self._send: trio.MemorySendChannel[Message] | None = None  # the mailbox, made on demand
        self._mailbox: trio.MemoryReceiveChannel[Message] | None = None
        self._live = False  # `started` is committed: the run's other events are legal now
        self._finished = False  # the last event is being written: report nothing more
        self._closing = False  # the runner has returned: record no new cancel
        self._stop: Message | None = None
        self._scope: trio.CancelScope | None = None
        self._helpers: list[trio.CancelScope] | None = None
        self._listening = False
        self._mail = False
        self._recording: trio.Event | None = None
        self._out: list[str] = []
        self._out_bytes = 0
        self._progress: dict[str, Any] | None = None
        self._flusher_running = False

    # -- the mailbox ------------------------------------------------------------------

    def _post(self, msg: Message) -> bool:
        """Put `msg` in the mailbox (made on first use: most runs never get mail)."""
        send = self._send
        if send is None:
            if self._finished:
                return False
            send, self._mailbox = trio.open_memory_channel[Message](MAILBOX_SIZE)
            self._send = send
        send.send_nowait(msg)
        return True

    def post_cancel(self, reason: str) -> Cancel:
        """Put a `Cancel` in the mailbox; await `msg.acked` for the answer."""
        msg = Cancel(reason)
        try:
            posted = self._post(msg)
        except trio.WouldBlock:
            msg.answer(BUSY)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            msg.answer(TOO_LATE)
        else:
            if posted:
                self._start_listener()
            else:
                msg.answer(TOO_LATE)
        return msg

    def post_shutdown(self, msg: Shutdown) -> None:
        """Ask the run to stop and go back to the queue; never blocks, never fails."""
        try:
            posted = self._post(msg)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            posted = False
        if posted:
            self._start_listener()
        elif self._stop is None and not self._closing:
            self._stop = msg
            if self._scope is not None:
                self._scope.cancel()

    def _spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run a helper in the supervisor's nursery under a scope this actor cancels when
        its runner is done (cheaper than a nursery per run, which most runs never need)."""
        scope = trio.CancelScope()
        if self._helpers is None:
            self._helpers = []
        self._helpers.append(scope)

        async def helper() -> None:
            with scope:
                await fn()

        self.sup.spawn(helper)

    def _start_listener(self) -> None:
        if self._listening:
            return
        if not self._live:
            self._mail = True  # started once `started` is committed
            return
        self._listening = True
        self._spawn(self._listen)

    async def _listen(self) -> None:
        """The only way the rest of the engine speaks to a running run."""
        assert self._mailbox is not None
        async for msg in self._mailbox:
            if self._closing or (self._stop is not None and not isinstance(msg, Cancel)):
                if isinstance(msg, Cancel):
                    msg.answer(TOO_LATE)
                continue
            if isinstance(msg, Shutdown):
                self._stop = msg
            else:
                if isinstance(self._stop, Cancel):  # already cancelling
                    msg.answer(REQUESTED)
                    continue
                self._recording = recording = trio.Event()
                try:
                    await self.sup.journal.commit(
                        self.run_id, E.CANCEL_REQUESTED, {"reason": msg.reason}
                    )
                except (JournalWriteError, JournalClosed) as exc:
                    log.warning("run %s: could not record cancel request: %s", self.run_id, exc)
                    msg.answer(NOT_RECORDED, exc)
                    continue
                finally:
                    recording.set()
                self._stop = msg  # durable now: this run ends cancelled (overrides Shutdown)
                msg.answer(REQUESTED)
            if self._scope is not None:
                self._scope.cancel()

    def _drain_mailbox(self) -> None:
        """Answer requests that arrived too late to matter, so no caller waits forever."""
        if self._send is None or self._mailbox is None:
            return
        self._send.close()
        while True:
            try:
                msg = self._mailbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                return
            if isinstance(msg, Cancel):
                msg.answer(TOO_LATE)

    # -- reporting (called by the runner through its context) ----------------------------

    def _report_progress(self, **fields: Any) -> None:
        if threading.get_ident() != self.sup.thread:  # a sync runner in a worker thread
            self._from_thread(lambda: self._report_progress(**fields))
            return
        if self._finished:
            return
        fresh: dict[str, Any] = {}
        percentage = fields.get("percentage")
        if percentage is not None:
            value = float(percentage)
            if not math.isnan(value):
                fresh["percentage"] = max(0.0, min(100.0, value))
        step = fields.get("step")
        if step is not None:
            fresh["step"] = str(step)
        for name in ("steps_completed", "steps_total"):
            count = fields.get(name)
            if count is not None:
                fresh[name] = int(count)
        if not fresh:
            return
        if self._progress is None:
            self._progress = fresh
        else:
            self._progress.update(fresh)
        self._wake_flusher()

    def _report_output(self, text: str) -> None:
        if threading.get_ident() != self.sup.thread:
            self._from_thread(lambda: self._report_output(text))
            return
        if self._finished:
            return
        if not isinstance(text, str):
            text = str(text)
        self._out.append(text)
        self._out_bytes += len(text)
        if self._out_bytes >= OUTPUT_FLUSH_BYTES:
            self._flush()
        else:
            self._wake_flusher()

    def _from_thread(self, fn: Any) -> None:
        token = self.sup.token
        assert token is not None
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(fn)

    def _wake_flusher(self) -> None:
        if not self._flusher_running and not self._closing:
            self._flusher_running = True
            self._spawn(self._flush_later)

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
                self.sup.note_bytes(len(text))
            if self._progress is not None:
                progress, self._progress = self._progress, None
                journal.append(self.run_id, E.PROGRESS, progress)
        except JournalError as exc:  # closing, or the disk is failing: progress may be lost
            log.debug("run %s: progress/output not recorded: %s", self.run_id, exc)

    # -- the actor's life ---------------------------------------------------------------

    def session_history(self) -> list[SessionTurn]:
        return self.sup.session_history(self.run)

    async def main(self) -> None:
        """Run the run once: `started`, the runner, exactly one last event."""
        sup = self.sup
        run = self.run
        spec = run.spec
        try:
            attempt: int = self.started.event.data["attempt"]
            try:
                # Written, not fsynced: a start lost to a crash only means the run starts
                # again. Waited for: the run's later events are illegal unless it runs.
                await self.started.wait()
            except (JournalWriteError, JournalClosed) as exc:
                log.warning("run %s: could not record start (%s); it stays queued", run.id, exc)
                self._finished = True
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
            started = trio.current_time()  # the engine's clock: virtual under a MockClock
            self._live = True
            if self._mail:
                self._start_listener()
            outcome = await self._execute(ctx, started)
            self._closing = True
            if self._recording is not None:
                await self._recording.wait()  # a cancel being recorded decides the outcome
            if self._helpers is not None:
                for scope in self._helpers:
                    scope.cancel()
            stop = self._stop
            if isinstance(stop, Cancel):
                outcome = (E.CANCELLED, {"reason": stop.reason})
            elif isinstance(stop, Shutdown) and outcome[0] is not E.SUCCEEDED:
                outcome = (E.REQUEUED, {"reason": stop.reason, "count_attempt": False})
            await self._finish(*outcome)
        finally:
            self._finished = True
            self._drain_mailbox()
            self.done.set()
            sup.actor_done(self)

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
            except Exception as exc:
                if scope.cancel_called:
                    # Most likely the runner turned our cancellation into an error of its own.
                    return self._stopped(ctx, timeout)
                leaf = _single_leaf(exc)
                if isinstance(leaf, RunError):
                    return self._failure(ctx, str(leaf.message), leaf.retryable, leaf.retry_after)
                log.debug("run %s: runner raised", self.run_id, exc_info=True)
                message = f"{type(leaf).__name__}: {leaf}" if str(leaf) else type(leaf).__name__
                return self._failure(ctx, message, False, None)
            else:
                return self._success(ctx, result, started)
            finally:
                self._scope = None
        return self._stopped(ctx, timeout)

    def _stopped(self, ctx: RunContext, timeout: float | None) -> tuple[EventType, dict[str, Any]]:
        """The runner was stopped: by a message, or by the deadline."""
        if isinstance(self._stop, Cancel):
            return E.CANCELLED, {"reason": self._stop.reason}
        if isinstance(self._stop, Shutdown):
            return E.REQUEUED, {"reason": self._stop.reason, "count_attempt": False}
        data: dict[str, Any] = {"error": f"timed out after {timeout:g}s", "kind": "timeout"}
        metrics = _canonical_metrics(ctx.metrics)
        if metrics:
            data["metrics"] = metrics
        return E.FAILED, data

    def _success(
        self, ctx: RunContext, result: Any, started: float
    ) -> tuple[EventType, dict[str, Any]]:
        own = ctx.metrics
        metrics = dict(own) if own else {}
        metrics.setdefault("duration_s", round(trio.current_time() - started, 6))
        if not isinstance(result, _CANONICAL_TYPES):
            # (the journal records a decoded copy, so live state equals a replay's)
            try:
                size = len(orjson.dumps(result))
            except TypeError as exc:
                return E.FAILED, {
                    "error": f"result is not JSON-serialisable: {exc}",
                    "kind": "error",
                }
        elif isinstance(result, str):
            # at most 6 bytes of JSON per character (a \u escape): encode only when it matters
            size = len(result) * 6 + 2
        else:
            size = 5
        if size > 4096:  # (an upper bound for a str: a GC hint, not a measure)
            self.sup.note_bytes(len(result) if isinstance(result, str) else size)
        limit = self.sup.config.max_result_bytes
        if limit is not None and size > limit:
            if isinstance(result, str):
                size = len(orjson.dumps(result))
            if size > limit:
                return E.FAILED, {
                    "error": f"result is {size} bytes, over the limit of {limit}",
                    "kind": "error",
                }
        return E.SUCCEEDED, {
            "result": result,
            "metrics": _canonical_metrics(metrics) if own else metrics,  # (ours encode)
        }

    def _failure(
        self, ctx: RunContext, message: str, retryable: bool, retry_after: float | None
    ) -> tuple[EventType, dict[str, Any]]:
        spec = self.run.spec
        attempt = ctx.attempt
        if retryable and attempt < spec.max_attempts:
            cfg = self.sup.config
            delay = min(cfg.retry_max_s, cfg.retry_base_s * 2 ** (attempt - 1))
            delay = delay * (0.5 + random.random() / 2)  # jitter, so retries do not herd
            if retry_after is not None and math.isfinite(retry_after):
                delay = max(delay, float(retry_after))
            return E.RETRYING, {
                "error": message,
                "kind": "error",
                "attempt": attempt,
                "retry_in": round(delay, 6),
                "not_before": self.sup.wall() + delay,
            }
        failed: dict[str, Any] = {"error": message, "kind": "error"}
        metrics = _canonical_metrics(ctx.metrics)
        if metrics:
            failed["metrics"] = metrics
        return E.FAILED, failed

    async def _finish(self, etype: EventType, data: dict[str, Any]) -> None:
        """Write the run's last event, retrying while the journal cannot take it."""
        self._flush()
        self._finished = True
        delay = 0.05
        while True:
            try:
                await self.sup.journal.append(self.run_id, etype, data, sync=True).wait()
                return
            except JournalWriteError as exc:
                log.error("run %s: cannot record %s yet (%s); retrying", self.run_id, etype, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except JournalClosed:
                log.error("run %s: journal closed before %s was recorded", self.run_id, etype)
                return
            except TypeError as exc:  # an unencodable field that slipped through
                etype, data = E.FAILED, {"error": f"cannot record result: {exc}", "kind": "error"}


def _canonical_metrics(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The runner's metrics, or a note if they cannot be recorded (so the result can)."""
    if not metrics:
        return None
    try:
        orjson.dumps(metrics)
    except TypeError as exc:
        return {"metrics_error": f"metrics are not JSON-serialisable: {exc}"}
    return metrics


def _single_leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested single-member groups (a runner's own nursery)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
