"""The nouns of the engine: what a run asks for, what it has become, and the events between.

Everything here is plain data. `RunSpec` and `Event` are frozen because they are facts
(a submitted request, a journal line) that must never change after the fact. `Run` is
mutable on purpose: it is the fold's accumulator, updated in place by `state.apply` so that
replaying a million events does not copy a million records. Nothing outside `state.py`
assigns to a `Run`.

Timestamps are floats (seconds since the Unix epoch, UTC) inside the engine: cheap to store,
compare and do arithmetic on. They become ISO-8601 strings with a `Z` only at the boundaries
(HTTP, webhooks, `log inspect`), via `isoformat`.

Memory: a server keeps every finished run until `--retention`, so what a run holds is paid
100,000 times over. Hence `__slots__` without a `__weakref__` slot on the per-run classes,
one shared read-only `EMPTY_CONFIG` for specs without a config, and shared `NO_PROGRESS` /
`DONE_PROGRESS` for runs that never reported steps (see docs/benchmarks.md, optimisation
note 5).
"""

from __future__ import annotations

import enum
import secrets
from array import array
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, NoReturn

import attrs

__all__ = [
    "DONE_PROGRESS",
    "EMPTY_CONFIG",
    "NO_PROGRESS",
    "PROGRESS_MARK_EVERY",
    "TERMINAL",
    "Event",
    "EventType",
    "Progress",
    "ProgressTrail",
    "Run",
    "RunSpec",
    "Status",
    "WebhookState",
    "isoformat",
    "new_run_id",
]


class Status(enum.StrEnum):
    """Where a run is in its life. The legal moves between them live in `machine.py`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL: frozenset[Status] = frozenset({Status.SUCCEEDED, Status.FAILED, Status.CANCELLED})


class EventType(enum.StrEnum):
    """Every kind of journal line about a run. The string is what is written to disk."""

    SUBMITTED = "submitted"  # the run exists (queued)
    STARTED = "started"  # an actor took it (running)
    PROGRESS = "progress"  # percentage / step reported by the runner
    OUTPUT = "output"  # a chunk of streamed output text
    CANCEL_REQUESTED = "cancel_requested"  # acknowledged cancel of a running run
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # runner error, timeout, expiry in queue, interrupted by restart
    CANCELLED = "cancelled"
    RETRYING = "retrying"  # a retryable failure with attempts left: back to queued
    REQUEUED = "requeued"  # recovery: was running when the process stopped
    DELETED = "deleted"  # removed by the user (finished runs only)
    WEBHOOK_ATTEMPT = "webhook_attempt"  # one delivery attempt of the terminal webhook
    WEBHOOK_REDELIVER = "webhook_redeliver"  # a user asked for another delivery


def new_run_id() -> str:
    """An opaque, unguessable id: `run_` and 128 random bits."""
    return "run_" + secrets.token_hex(16)


def isoformat(ts: float | None) -> str | None:
    """Epoch seconds -> `2026-11-28T21:08:57.123456Z` (None stays None)."""
    if ts is None:
        return None
    # isoformat + slice, not strftime: the same text (checked against it for 200k random
    # times) in 70% of the time, and this runs several times per answered request
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")[:-6] + "Z"


class _EmptyConfig(dict[str, Any]):
    """The one empty `config` every spec without a config shares (a `dict`, so orjson, cattrs
    and `isinstance` checks see nothing new; 64 bytes per run saved). Shared means it must
    never change: every mutator raises. Copy it (`dict(spec.config)`) to get a private one."""

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError("RunSpec.config is shared and read-only; copy it with dict(...)")

    __setitem__ = __delitem__ = __ior__ = _read_only
    clear = pop = popitem = setdefault = update = _read_only

    def __repr__(self) -> str:
        return "{}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_empty_config, ())


def _empty_config() -> dict[str, Any]:
    return EMPTY_CONFIG


EMPTY_CONFIG: dict[str, Any] = _EmptyConfig()


def _config(value: Mapping[str, Any] | None) -> dict[str, Any]:
    """Any empty config becomes the shared `EMPTY_CONFIG`; a non-empty one is kept as given."""
    if not value:
        return EMPTY_CONFIG
    return value if isinstance(value, dict) else dict(value)


@attrs.frozen(slots=True, weakref_slot=False)
class RunSpec:
    """What the caller asked for; fixed at submit and written whole in the `submitted` event."""

    prompt: str
    config: dict[str, Any] = attrs.field(default=EMPTY_CONFIG, converter=_config)
    session_id: str | None = None
    priority: int = 0
    timeout: float | None = None  # seconds of running before the run fails as timed out
    max_attempts: int = 1
    runner: str | None = None  # None: the engine's default runner
    webhook_url: str | None = None
    idempotency_key: str | None = None
    request_hash: str | None = None  # hash of the request body, to tell a replay from a misuse
    tenant: str | None = None
    ttl: float | None = None  # seconds a run may wait in the queue before it expires


@attrs.frozen(slots=True, weakref_slot=False)
class Progress:
    percentage: float = 0.0
    step: str | None = None
    steps_completed: int = 0
    steps_total: int | None = None


# Frozen, so runs may share them: a run that never reported a step holds one of these two
# rather than a Progress of its own (72 bytes per finished run).
NO_PROGRESS = Progress()
DONE_PROGRESS = Progress(100.0)

#: A `ProgressTrail` keeps the folded progress at every this many of its entries: looking
#: up the progress as of an old event then folds at most this many - 1 `progress` events.
PROGRESS_MARK_EVERY: Final = 16


@attrs.define(slots=True, weakref_slot=False)
class ProgressTrail:
    """Where a run's progress changed, so its progress as of any past event is cheap to
    find (a stream resuming there needs it, and its output may be 100,000s of lines).

    Only runs that reported progress have a trail (`Run.progress_trail`): before its
    first `progress` event a run's progress is the initial one whatever else happened.

    `seqs`: the seq of each event that changed the progress since the first `progress`
    event, in order: `progress` events, `started` ones (a reset to nothing; stored
    negated, so a lookup knows one without reading it) and `succeeded` (100 %: always
    the last entry). `marks[k]`: the progress after entry `(k + 1) * PROGRESS_MARK_EVERY
    - 1` (a `Progress` the run held anyway). So the progress after any event is the
    current `Run.progress`, or a mark (or the initial progress) plus at most
    `PROGRESS_MARK_EVERY - 1` `progress` events whose seqs are known
    (`state.progress_at`).

    A short trail (no mark yet) is kept packed instead, as the bytes of its seqs (8-byte
    signed, native order): ~50 bytes for a run with one report rather than ~180.
    """

    seqs: array[int]
    marks: list[Progress]

    def copy(self) -> ProgressTrail:
        """An independent copy (the fold keeps appending to the run's own trail)."""
        return ProgressTrail(array("q", self.seqs), list(self.marks))


@attrs.frozen(slots=True)
class Event:
    """One journal line: a fact about one run, numbered by `seq` (strictly increasing)."""

    seq: int
    ts: float
    run: str
    type: EventType
    data: dict[str, Any]


@attrs.define(slots=True, weakref_slot=False)
class WebhookState:
    """Delivery bookkeeping for a run's terminal webhook, folded from webhook events."""

    attempts: int = 0
    delivered: bool = False
    gave_up: bool = False
    next_attempt_at: float | None = None
    last_status: int | None = None
    last_error: str | None = None


@attrs.define(slots=True, eq=True, weakref_slot=False)
class Run:
    """The folded state of one run. Mutated only by `state.apply`."""

    id: str
    spec: RunSpec
    seq: int  # seq of the `submitted` event: the run's place in creation order
    created_at: float
    status: Status = Status.QUEUED
    attempt: int = 0
    started_at: float | None = None
    completed_at: float | None = None
    progress: Progress = NO_PROGRESS
    result: Any = None
    error: str | None = None
    error_kind: str | None = None  # "error" | "timeout" | "expired" | "interrupted" | ...
    metrics: dict[str, Any] | None = None
    not_before: float | None = None  # earliest start after a retry backoff
    cancel_requested: bool = False
    last_seq: int = 0  # seq of the newest event about this run
    terminal_seq: int | None = None  # seq of its succeeded/failed/cancelled event
    webhook: WebhookState | None = None
    # where its progress changed: None until its first `progress` event, then packed
    # bytes, then a ProgressTrail (see there); 8 bytes a run without progress reports
    progress_trail: bytes | ProgressTrail | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL

    @property
    def duration(self) -> float | None:
        if self.completed_at is None:
            return None
        start = self.started_at if self.started_at is not None else self.created_at
        return max(0.0, self.completed_at - start)
