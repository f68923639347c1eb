"""The fold: journal events in, run state and its indexes out. Sans-IO.

`apply(state, event)` is the only code that changes run state, live and on replay alike, so
a server that replays its journal from scratch ends up exactly where the live one was. It is
deterministic (no clock, no IO, no randomness: every time it needs is in the event) and it
updates `state` in place for speed, returning it so a replay reads as
`functools.reduce(apply, events, State())`.

Indexes kept alongside the runs, each updated by the same fold:

* `runs`: id -> Run.
* `order` / `order_seqs`: runs in creation order (append-only; deleted runs are skipped
  lazily and squeezed out by `vacuum`), so listing newest first with a cursor is a bisect.
* `by_status`, `by_session`: id sets for filtered listing and counts.
* `idempotency`: (tenant, key) -> run id. Expiry is judged at lookup time against a `now`
  the caller supplies; compaction forgets expired keys for good.

Memory (every finished run is kept until `--retention`): a CPython dict never gives its
table back when entries are deleted, so the indexes that empty out again (`by_status`'s
queued and running sets after a burst, everything after compaction) are shrunk in place by
`shrink_dict` now and then. Strings repeated across runs (tenant, runner, session id, error
kind) are shared through a small bounded cache instead of one decoded copy per run.
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

import attrs

from . import machine
from .model import (
    DONE_PROGRESS,
    NO_PROGRESS,
    PROGRESS_MARK_EVERY,
    TERMINAL,
    Event,
    EventType,
    Progress,
    ProgressTrail,
    Run,
    RunSpec,
    Status,
    WebhookState,
)

__all__ = [
    "State",
    "apply",
    "fold_progress",
    "progress_at",
    "replay",
    "shrink_dict",
    "spec_from_data",
    "spec_to_data",
]

E = EventType

# A dict is shrunk once its table takes more than this many bytes per live entry plus
# `_SHRINK_SLACK`: a freshly built dict needs at most ~75 (str keys; 110 for tuple keys)
# bytes per entry, so only one that was several times bigger and emptied out is rebuilt.
_SHRINK_BYTES_PER_ENTRY = 256
_SHRINK_SLACK = 16_384
# `apply` looks at the status sets for shrinking after this many removals from them.
_SHRINK_EVERY = 4096


def shrink_dict(d: dict[Any, Any]) -> bool:
    """Give back the table of a dict that emptied out (in place, so references stay live).

    CPython only resizes a dict when an insert finds it full, so a set of queued run ids
    that held 100,000 runs during a burst keeps ~4 MB after they have all started, for
    good if no new burst comes. O(1) when the dict is fine; O(len) when it is rebuilt, which
    only happens once it is mostly empty, so the cost is amortised over the removals.
    """
    if sys.getsizeof(d) <= _SHRINK_BYTES_PER_ENTRY * len(d) + _SHRINK_SLACK:
        return False
    live = dict(d)  # sized for what is left
    d.clear()  # frees the old table
    d.update(live)  # takes the compact copy's table
    return True


# Strings that recur across runs (tenant, runner, session id, error kind) arrive decoded
# from JSON, one copy per run; runs share one copy through this cache instead. Bounded by
# starting afresh when full, so unbounded inputs (session ids) cannot grow it.
_SHARED: dict[str, str] = {}
_SHARED_MAX = 4096


def _shared(text: Any) -> Any:
    if type(text) is not str:
        return text
    found = _SHARED.get(text)
    if found is not None:
        return found
    if len(_SHARED) >= _SHARED_MAX:
        _SHARED.clear()
    _SHARED[text] = text
    return text


@attrs.define(slots=True, eq=False)
class State:
    runs: dict[str, Run] = attrs.Factory(dict)
    order: list[Run] = attrs.Factory(list)
    order_seqs: list[int] = attrs.Factory(list)
    by_status: dict[Status, dict[str, None]] = attrs.Factory(lambda: {s: {} for s in Status})
    by_session: dict[str, dict[str, None]] = attrs.Factory(dict)
    idempotency: dict[tuple[str | None, str], str] = attrs.Factory(dict)
    last_seq: int = 0
    deleted_in_order: int = 0
    removed: int = 0  # removals from `by_status` since its sets were last checked for shrinking

    # -- queries ---------------------------------------------------------------------

    def get(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    def count(self, status: Status) -> int:
        return len(self.by_status[status])

    def find_idempotent(
        self, tenant: str | None, key: str, *, now: float, window: float | None
    ) -> Run | None:
        """The live run submitted under (tenant, key) within `window` seconds of `now`."""
        run_id = self.idempotency.get((tenant, key))
        if run_id is None:
            return None
        run = self.runs.get(run_id)
        if run is None:
            return None
        if window is not None and run.created_at + window <= now:
            return None
        return run

    def newest_first(
        self,
        *,
        before_seq: int | None = None,
        status: Status | None = None,
        session_id: str | None = None,
        tenant: str | None = None,
        any_tenant: bool = False,
    ) -> Iterator[Run]:
        """Runs newest first, optionally only those created before `before_seq` (a cursor)."""
        end = len(self.order)
        if before_seq is not None:
            end = bisect.bisect_left(self.order_seqs, before_seq)
        status_ids = self.by_status[status] if status is not None else None
        session_ids = self.by_session.get(session_id, {}) if session_id is not None else None
        for i in range(end - 1, -1, -1):
            run = self.order[i]
            rid = run.id
            if rid not in self.runs:
                continue  # deleted; squeezed out at the next vacuum
            if status_ids is not None and rid not in status_ids:
                continue
            if session_ids is not None and rid not in session_ids:
                continue
            if not any_tenant and run.spec.tenant != tenant:
                continue
            yield run

    def vacuum(self) -> None:
        """Drop deleted runs from the creation-order index (amortised, after many deletes),
        and give back the table space of the indexes they emptied."""
        if self.deleted_in_order:
            self.order = [r for r in self.order if r.id in self.runs]
            self.order_seqs = [r.seq for r in self.order]
            self.deleted_in_order = 0
            shrink_dict(self.runs)
            shrink_dict(self.by_session)
            shrink_dict(self.idempotency)
            self.shrink_status_sets()

    def shrink_status_sets(self) -> None:
        """Give back the table space of `by_status` sets that emptied out."""
        self.removed = 0
        for ids in self.by_status.values():
            shrink_dict(ids)


def _spec_defaults() -> tuple[tuple[str, Any], ...]:
    blank = RunSpec(prompt="")
    return tuple((f.name, getattr(blank, f.name)) for f in attrs.fields(RunSpec)[1:])


_SPEC_DEFAULTS = _spec_defaults()


def spec_to_data(spec: RunSpec) -> dict[str, Any]:
    """A spec as the `submitted` event's data: only fields that differ from the defaults."""
    data: dict[str, Any] = {"prompt": spec.prompt}
    for name, default in _SPEC_DEFAULTS:
        value = getattr(spec, name)
        if value != default:
            data[name] = value
    return data


_SHARED_SPEC_FIELDS = ("session_id", "runner", "tenant")


def spec_from_data(data: dict[str, Any]) -> RunSpec:
    if len(data) > 1:  # more than the prompt: share the strings that recur across runs
        canonical: dict[str, Any] | None = None
        for name in _SHARED_SPEC_FIELDS:
            value = data.get(name)
            if value is not None and (shared := _shared(value)) is not value:
                if canonical is None:
                    canonical = dict(data)  # the event's own data is left as it is
                canonical[name] = shared
        if canonical is not None:
            return RunSpec(**canonical)
    return RunSpec(**data)


def _remove_index(state: State, run: Run) -> None:
    ids = state.by_status[run.status]
    ids.pop(run.id, None)
    _removed(state, ids)


def _removed(state: State, ids: dict[str, None]) -> None:
    """Bookkeeping after a removal from the status set `ids`: shrink it if it emptied
    (a drained burst, O(1) to check), and every `_SHRINK_EVERY` removals look at them all
    (a burst that drained down to a few)."""
    if not ids:
        shrink_dict(ids)
    state.removed += 1
    if state.removed >= _SHRINK_EVERY:
        state.shrink_status_sets()


def apply(state: State, event: Event) -> State:
    """Fold one event into `state`. Raises `IllegalTransition` for an impossible event."""
    if event.seq <= state.last_seq:
        raise ValueError(f"event seq {event.seq} is not after {state.last_seq}")
    run = state.runs.get(event.run)
    before = run.status if run is not None else None
    after = machine.transition(event.run, before, event.type)
    state.last_seq = event.seq
    data = event.data
    etype = event.type

    if etype is E.SUBMITTED:
        spec = spec_from_data(data)
        run = Run(id=event.run, spec=spec, seq=event.seq, created_at=event.ts)
        state.runs[run.id] = run
        state.order.append(run)
        state.order_seqs.append(event.seq)
        if spec.session_id is not None:
            state.by_session.setdefault(spec.session_id, {})[run.id] = None
        if spec.idempotency_key is not None:
            state.idempotency[spec.tenant, spec.idempotency_key] = run.id
        state.by_status[Status.QUEUED][run.id] = None
        run.last_seq = event.seq
        return state

    assert run is not None  # the table has no other edge from None
    run.last_seq = event.seq

    if etype is E.DELETED:
        _remove_index(state, run)
        del state.runs[run.id]
        state.deleted_in_order += 1
        sid = run.spec.session_id
        if sid is not None:
            ids = state.by_session.get(sid)
            if ids is not None:
                ids.pop(run.id, None)
                if not ids:
                    del state.by_session[sid]
        key = run.spec.idempotency_key
        if key is not None and state.idempotency.get((run.spec.tenant, key)) == run.id:
            del state.idempotency[run.spec.tenant, key]
        return state

    assert after is not None
    if after is not before:
        assert before is not None
        ids = state.by_status[before]
        ids.pop(run.id, None)
        state.by_status[after][run.id] = None
        run.status = after
        _removed(state, ids)

    if etype is E.STARTED:
        run.attempt = data.get("attempt", run.attempt + 1)
        run.started_at = event.ts
        run.not_before = None
        run.progress = NO_PROGRESS
        run.error = None
        run.error_kind = None
        if run.progress_trail is not None:
            _trail_add(run, -event.seq, NO_PROGRESS)
    elif etype is E.PROGRESS:
        run.progress = fold_progress(run.progress, data)
        _trail_add(run, event.seq, run.progress)
    elif etype is E.OUTPUT:
        pass  # output lives in the journal (for streams), not in the folded state
    elif etype is E.CANCEL_REQUESTED:
        run.cancel_requested = True
    elif etype is E.SUCCEEDED:
        run.result = data.get("result")
        run.metrics = data.get("metrics")
        run.completed_at = event.ts
        old = run.progress
        if old.step is None and old.steps_completed == 0 and old.steps_total is None:
            run.progress = DONE_PROGRESS  # shared (frozen): no steps were reported
        else:
            run.progress = Progress(100.0, old.step, old.steps_completed, old.steps_total)
        if run.progress_trail is not None:
            _trail_add(run, event.seq, run.progress)
        _finish(run)
    elif etype is E.FAILED:
        run.error = data.get("error")
        run.error_kind = _shared(data.get("kind", "error"))
        run.metrics = data.get("metrics", run.metrics)
        run.completed_at = event.ts
        _finish(run)
    elif etype is E.CANCELLED:
        run.error = data.get("reason")
        run.error_kind = "cancelled"
        run.completed_at = event.ts
        _finish(run)
    elif etype is E.RETRYING:
        run.error = data.get("error")
        run.error_kind = _shared(data.get("kind", "error"))
        run.not_before = data.get("not_before")
    elif etype is E.REQUEUED:
        run.not_before = None
        if not data.get("count_attempt", True):
            run.attempt = max(0, run.attempt - 1)  # an interrupted attempt is given back
    elif etype is E.WEBHOOK_ATTEMPT:
        hook = run.webhook if run.webhook is not None else WebhookState()
        hook.attempts += 1
        hook.delivered = bool(data.get("ok"))
        hook.last_status = data.get("status_code")
        hook.last_error = data.get("error")
        hook.next_attempt_at = data.get("next_attempt_at")
        hook.gave_up = not hook.delivered and hook.next_attempt_at is None
        run.webhook = hook
    elif etype is E.WEBHOOK_REDELIVER:
        hook = run.webhook if run.webhook is not None else WebhookState()
        hook.gave_up = False
        hook.delivered = False
        hook.next_attempt_at = data.get("at", event.ts)
        run.webhook = hook
    return state


_PACKED_FULL = 8 * PROGRESS_MARK_EVERY  # bytes of a packed trail that takes its first mark


def _trail_add(run: Run, entry: int, progress: Progress) -> None:
    """Record in the run's progress trail that an event changed its progress to
    `progress`: `entry` is the event's seq, negated for a `started` (a reset)."""
    trail = run.progress_trail
    if trail is None or type(trail) is bytes:
        packed = entry.to_bytes(8, sys.byteorder, signed=True)
        if trail is not None:
            packed = trail + packed
        if len(packed) < _PACKED_FULL:
            run.progress_trail = packed
            return
        seqs = array("q")
        seqs.frombytes(packed)
        run.progress_trail = ProgressTrail(seqs, [progress])
        return
    assert isinstance(trail, ProgressTrail)
    trail.seqs.append(entry)
    if len(trail.seqs) % PROGRESS_MARK_EVERY == 0:
        trail.marks.append(progress)


def fold_progress(progress: Progress, data: dict[str, Any]) -> Progress:
    """`progress` after a `progress` event with `data` (each key it has replaces one)."""
    return Progress(
        percentage=data.get("percentage", progress.percentage),
        step=data.get("step", progress.step),
        steps_completed=data.get("steps_completed", progress.steps_completed),
        steps_total=data.get("steps_total", progress.steps_total),
    )


def progress_at(run: Run, seq: int) -> tuple[Progress, list[int]]:
    """The run's progress after its events up to `seq`, as `(base, seqs)`: fold the
    `progress` events at `seqs` (oldest first; fewer than `PROGRESS_MARK_EVERY`) into
    `base` with `fold_progress` to get it.

    O(1) when the progress has not changed since `seq` (the run's current progress, no
    events to read), O(log n) in the run's progress reports otherwise: whatever output
    the run wrote in between, nothing is searched for.
    """
    trail = run.progress_trail
    if trail is None:  # no progress reported: the initial progress, or the final 100 %
        end = run.terminal_seq
        if end is not None and seq >= end and run.status is Status.SUCCEEDED:
            return run.progress, []
        return NO_PROGRESS, []
    if type(trail) is bytes:
        seqs = array("q")
        seqs.frombytes(trail)
        marks: list[Progress] = []
    else:
        assert isinstance(trail, ProgressTrail)
        seqs, marks = trail.seqs, trail.marks
    i = bisect.bisect_right(seqs, seq, key=abs) - 1
    if i < 0:
        return NO_PROGRESS, []
    if i == len(seqs) - 1:
        return run.progress, []
    done = (i + 1) // PROGRESS_MARK_EVERY  # marks at or before entry i
    if done:
        base, first = marks[done - 1], done * PROGRESS_MARK_EVERY
    else:
        base, first = NO_PROGRESS, 0
    todo: list[int] = []
    for k in range(i, first - 1, -1):
        at = seqs[k]
        if at < 0:  # a `started` since the mark: nothing before it counts
            todo.reverse()
            return NO_PROGRESS, todo
        todo.append(at)
    todo.reverse()
    return base, todo


def _finish(run: Run) -> None:
    run.not_before = None
    run.terminal_seq = run.last_seq
    if run.spec.webhook_url is not None and run.status in TERMINAL:
        run.webhook = WebhookState(next_attempt_at=run.completed_at)


def replay(events: Iterable[Event], state: State | None = None) -> State:
    state = state if state is not None else State()
    for event in events:
        apply(state, event)
    return state
