"""Typed views of the server's JSON: runs, results and stream events.

They are frozen records built from the documents the API returns. Fields a server does not
send (an older agentjobs, or PraisonAI's own server) get their defaults rather than failing
the parse; the document as received stays available as `raw` for anything not modelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import attrs

from ..engine.model import TERMINAL, Status
from ._errors import APIError, RunCancelled, RunFailed

__all__ = [
    "BatchItem",
    "BatchResult",
    "CancelledEvent",
    "ErrorEvent",
    "HeartbeatEvent",
    "OutputEvent",
    "Progress",
    "ProgressEvent",
    "ResultEvent",
    "Run",
    "RunResult",
    "ShutdownEvent",
    "StatusEvent",
    "StreamEvent",
    "parse_event",
]


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _status(value: Any) -> Status:
    try:
        return Status(value)
    except ValueError:
        raise ValueError(f"unknown run status from the server: {value!r}") from None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any, default: float = 0.0) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


@attrs.frozen(slots=True)
class Progress:
    percentage: float = 0.0
    step: str | None = None
    steps_completed: int = 0
    steps_total: int | None = None

    @classmethod
    def from_json(cls, doc: Any) -> Progress:
        if not isinstance(doc, Mapping):
            return cls()
        return cls(
            percentage=_float(doc.get("percentage")),
            step=_opt_str(doc.get("current_step", doc.get("step"))) or None,
            steps_completed=_opt_int(doc.get("steps_completed")) or 0,
            steps_total=_opt_int(doc.get("steps_total")),
        )


@attrs.frozen(slots=True)
class Run:
    """A run as `submit`, `get`, `cancel` and `list` report it."""

    id: str
    status: Status
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    progress: Progress = Progress()
    session_id: str | None = None
    error: str | None = None
    error_kind: str | None = None
    retry_after: int | None = None
    runner: str | None = None
    attempt: int = 0
    max_attempts: int | None = None
    priority: int | None = None
    cancel_requested: bool = False
    poll_url: str | None = None  # submit only
    stream_url: str | None = None  # submit only
    replayed: bool = False  # submit only: an idempotent repeat returned the original run
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, doc: Mapping[str, Any], *, replayed: bool = False) -> Run:
        return cls(
            id=str(doc["job_id"]),
            status=_status(doc.get("status")),
            created_at=_time(doc.get("created_at")),
            started_at=_time(doc.get("started_at")),
            completed_at=_time(doc.get("completed_at")),
            progress=Progress.from_json(doc.get("progress")),
            session_id=_opt_str(doc.get("session_id")),
            error=_opt_str(doc.get("error")),
            error_kind=_opt_str(doc.get("error_kind")),
            retry_after=_opt_int(doc.get("retry_after")),
            runner=_opt_str(doc.get("runner", doc.get("agent_id"))),
            attempt=_opt_int(doc.get("attempt")) or 0,
            max_attempts=_opt_int(doc.get("max_attempts")),
            priority=_opt_int(doc.get("priority")),
            cancel_requested=doc.get("cancel_requested") is True,
            poll_url=_opt_str(doc.get("poll_url")),
            stream_url=_opt_str(doc.get("stream_url")),
            replayed=replayed,
            raw=dict(doc),
        )


@attrs.frozen(slots=True)
class BatchItem:
    """One item of `submit_batch`: its accepted `run` (new, or an earlier one when
    `run.replayed`), or the `error` that refused it alone (a `ValidationError`,
    `IdempotencyConflict`, ...: what the same body submitted alone would have raised)."""

    index: int
    status: int
    run: Run | None = None
    error: APIError | None = None

    @property
    def ok(self) -> bool:
        return self.run is not None


@attrs.frozen(slots=True)
class BatchResult:
    """What `submit_batch` returns: one `BatchItem` per item sent, in order."""

    items: list[BatchItem]

    @property
    def runs(self) -> list[Run]:
        """The accepted items' runs, in order (replays included)."""
        return [i.run for i in self.items if i.run is not None]

    @property
    def errors(self) -> list[BatchItem]:
        """The refused items."""
        return [i for i in self.items if i.run is None]

    @property
    def accepted(self) -> int:
        return sum(1 for i in self.items if i.run is not None)

    @property
    def rejected(self) -> int:
        return len(self.items) - self.accepted

    def raise_for_errors(self) -> BatchResult:
        """Raise the first refused item's error, if any; else return self."""
        for item in self.items:
            if item.error is not None:
                raise item.error
        return self

    def __len__(self) -> int:
        return len(self.items)


@attrs.frozen(slots=True)
class RunResult:
    """A finished run's outcome, from `GET /api/v1/runs/{id}/result`.

    The server answers 200 for every finished run, failed and cancelled included, so this
    is returned whatever the outcome: check `ok`, or call `raise_for_status()`.
    """

    id: str
    status: Status
    result: Any = None
    error: str | None = None
    error_kind: str | None = None
    metrics: dict[str, Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_seconds: float | None = None
    session_id: str | None = None
    attempt: int = 0
    raw: dict[str, Any] = attrs.field(factory=dict, eq=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status is Status.SUCCEEDED

    def raise_for_status(self) -> RunResult:
        """Raise `RunFailed` / `RunCancelled` unless the run succeeded; else return self."""
        if self.status is Status.CANCELLED:
            raise RunCancelled(self)
        if self.status is not Status.SUCCEEDED:
            raise RunFailed(self)
        return self

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> RunResult:
        metrics = doc.get("metrics")
        duration = doc.get("duration_seconds")
        return cls(
            id=str(doc["job_id"]),
            status=_status(doc.get("status")),
            result=doc.get("result"),
            error=_opt_str(doc.get("error")),
            error_kind=_opt_str(doc.get("error_kind")),
            metrics=dict(metrics) if isinstance(metrics, Mapping) else None,
            created_at=_time(doc.get("created_at")),
            started_at=_time(doc.get("started_at")),
            completed_at=_time(doc.get("completed_at")),
            duration_seconds=_float(duration) if duration is not None else None,
            session_id=_opt_str(doc.get("session_id")),
            attempt=_opt_int(doc.get("attempt")) or 0,
            raw=dict(doc),
        )


# -- stream events ---------------------------------------------------------------------


@attrs.frozen(slots=True, kw_only=True)
class StreamEvent:
    """One server-sent event of a run's stream. Subclasses type the known event names;
    an unknown name comes as a plain `StreamEvent` (a newer server may add some)."""

    id: str | None
    event: str
    data: dict[str, Any] = attrs.field(eq=False, repr=False)

    #: True for the event that ends a run's stream (`result`, `error`, `cancelled`).
    terminal = False

    @property
    def job_id(self) -> str | None:
        return _opt_str(self.data.get("job_id"))


@attrs.frozen(slots=True, kw_only=True)
class StatusEvent(StreamEvent):
    status: Status
    timestamp: datetime | None = None


@attrs.frozen(slots=True, kw_only=True)
class ProgressEvent(StreamEvent):
    percentage: float
    step: str | None = None
    steps_completed: int = 0
    steps_total: int | None = None


@attrs.frozen(slots=True, kw_only=True)
class OutputEvent(StreamEvent):
    text: str


@attrs.frozen(slots=True, kw_only=True)
class ResultEvent(StreamEvent):
    result: Any
    metrics: dict[str, Any] | None = None
    terminal = True


@attrs.frozen(slots=True, kw_only=True)
class ErrorEvent(StreamEvent):
    error: str | None
    kind: str | None = None
    terminal = True


@attrs.frozen(slots=True, kw_only=True)
class CancelledEvent(StreamEvent):
    message: str | None
    terminal = True


@attrs.frozen(slots=True, kw_only=True)
class HeartbeatEvent(StreamEvent):
    timestamp: datetime | None = None


@attrs.frozen(slots=True, kw_only=True)
class ShutdownEvent(StreamEvent):
    """The server is shutting down; the client reconnects and resumes by itself."""

    message: str | None = None


def parse_event(event_id: str | None, name: str, data: dict[str, Any]) -> StreamEvent:
    """The typed event for one SSE frame (`data` already decoded from JSON)."""
    base: dict[str, Any] = {"id": event_id, "event": name, "data": data}
    if name == "status" and isinstance(data.get("status"), str):
        try:
            status = Status(data["status"])
        except ValueError:
            return StreamEvent(**base)
        return StatusEvent(**base, status=status, timestamp=_time(data.get("timestamp")))
    if name == "progress":
        return ProgressEvent(
            **base,
            percentage=_float(data.get("percentage")),
            step=_opt_str(data.get("step")) or None,
            steps_completed=_opt_int(data.get("steps_completed")) or 0,
            steps_total=_opt_int(data.get("steps_total")),
        )
    if name == "output":
        text = data.get("text")
        return OutputEvent(**base, text=text if isinstance(text, str) else "")
    if name == "result":
        metrics = data.get("metrics")
        return ResultEvent(
            **base,
            result=data.get("result"),
            metrics=dict(metrics) if isinstance(metrics, Mapping) else None,
        )
    if name == "error":
        return ErrorEvent(
            **base, error=_opt_str(data.get("error")), kind=_opt_str(data.get("kind"))
        )
    if name == "cancelled":
        return CancelledEvent(**base, message=_opt_str(data.get("message")))
    if name == "heartbeat":
        return HeartbeatEvent(**base, timestamp=_time(data.get("timestamp")))
    if name == "shutdown":
        return ShutdownEvent(**base, message=_opt_str(data.get("message")))
    return StreamEvent(**base)
