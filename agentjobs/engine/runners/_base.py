"""What a runner is, and what it gets to work with.

A runner turns one run's prompt into a result. The engine calls `await runner.run(ctx)`
inside the run's actor, under a trio cancel scope that carries the run's deadline and any
user cancel: a runner needs no cancellation code of its own beyond being a good trio
citizen (cancellation arrives as `trio.Cancelled` at its next checkpoint; subprocesses and
HTTP streams opened with trio/httpx are closed by that). What it returns (any JSON value)
becomes the run's result; what it raises fails the run.

Runners report through the context: `ctx.progress(...)` and `ctx.output(text)` are plain,
non-blocking calls (the engine coalesces output and writes it to the journal in the
background), and `ctx.metrics` is a dict recorded with the terminal event.

A runner whose work can outlive the server process (a subprocess in a session of its
own) also implements `RecordsAttempts`: the engine then hands it the attempt records of
its data dir, and stops what they describe before any run starts again after a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

if TYPE_CHECKING:
    from ._orphans import AttemptRecords

__all__ = ["RecordsAttempts", "RunContext", "RunError", "Runner", "SessionTurn"]


class RunError(Exception):
    """A runner's way to fail a run with a clear message, optionally asking for a retry.

    `retryable=True` lets the supervisor try again (with backoff) while attempts remain;
    `retry_after` (seconds) is a floor for that backoff, e.g. from an HTTP `Retry-After`.
    """

    def __init__(
        self, message: str, *, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after


@attrs.frozen(slots=True)
class SessionTurn:
    """One earlier finished run of the same session: what was asked and what came back."""

    prompt: str
    result: Any


@attrs.define(slots=True, eq=False)
class RunContext:
    """Everything a runner may know about and do for the run it is executing."""

    run_id: str
    prompt: str
    config: dict[str, Any]
    session_id: str | None
    attempt: int
    max_attempts: int
    _report_progress: Callable[..., None]
    _report_output: Callable[[str], None]
    _session_history: Callable[[], Sequence[SessionTurn]] = lambda: ()
    metrics: dict[str, Any] = attrs.Factory(dict)

    def progress(
        self,
        percentage: float | None = None,
        step: str | None = None,
        *,
        steps_completed: int | None = None,
        steps_total: int | None = None,
    ) -> None:
        """Report progress (0..100) and/or the current step. Cheap; never blocks."""
        self._report_progress(
            percentage=percentage,
            step=step,
            steps_completed=steps_completed,
            steps_total=steps_total,
        )

    def output(self, text: str) -> None:
        """Stream a chunk of output text to subscribers. Cheap; never blocks."""
        if text:
            self._report_output(text)

    def session_history(self) -> Sequence[SessionTurn]:
        """Earlier finished runs of this run's session (same tenant), oldest first."""
        return self._session_history()


@runtime_checkable
class Runner(Protocol):
    """Anything with an async `run(ctx) -> result`. `aclose()` is optional."""

    async def run(self, ctx: RunContext) -> Any: ...


@runtime_checkable
class RecordsAttempts(Protocol):
    """A runner that records its attempts' process groups (see `_orphans.py`).

    The engine calls `attach_attempt_records` at start-up (with `None` when it has no
    data dir: nothing to record, nothing survives it anyway) and `detach_attempt_records`
    when it closes.
    """

    def attach_attempt_records(self, records: AttemptRecords | None) -> None: ...

    def detach_attempt_records(self, records: AttemptRecords) -> None: ...
