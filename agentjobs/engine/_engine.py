"""The engine: the one object callers hold. It wires journal, state, bus and supervisor.

The write path is always the same: build an event, `journal.append`/`commit` it; the
journal's writer makes the batch durable and calls `_on_commit`, which folds the events
into `state` (`state.apply`), tells the supervisor about newly queued runs, wakes waiters,
updates metrics and publishes to the bus. Nothing else changes run state.

Callers get snapshots (copies) of runs, never the live records the fold mutates.
"""

from __future__ import annotations

import builtins
import gc
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import orjson
import trio

from .actor import BUSY, NOT_RECORDED, REQUESTED
from .bus import Bus
from .compaction import CompactionReport, compact_state
from .errors import (
    AlreadyFinished,
    EngineClosed,
    IdempotencyConflict,
    InvalidRequest,
    NotFinished,
    NotFound,
    QueueFull,
    StorageUnavailable,
    UnknownRunner,
)
from .journal import (
    Durability,
    IOHooks,
    Journal,
    JournalClosed,
    JournalError,
    JournalWriteError,
    ReplayReport,
)
from .metrics import Metrics
from .model import TERMINAL, Event, EventType, Progress, Run, RunSpec, Status, new_run_id
from .runners import EchoRunner, Runner
from .runners._base import RecordsAttempts
from .runners._orphans import AttemptRecords
from .state import State, apply, fold_progress, progress_at, spec_to_data
from .supervisor import Supervisor

__all__ = ["Engine", "EngineConfig", "Page", "SubmitOutcome", "open_engine"]

log = logging.getLogger("agentjobs.engine")
E = EventType

_TERMINAL_EVENTS = frozenset({E.SUCCEEDED, E.FAILED, E.CANCELLED})
_REQUEUE_EVENTS = frozenset({E.SUBMITTED, E.RETRYING, E.REQUEUED})


@attrs.frozen(slots=True, kw_only=True)
class EngineConfig:
    """Every knob of the engine, with the defaults a server starts with."""

    durability: Durability = "fsync"
    max_concurrency: int = 8
    session_concurrency: int | None = None  # e.g. 1: a session's runs go one at a time
    max_queue: int = 100_000
    default_timeout: float | None = None  # seconds; None: runs may take as long as they need
    default_max_attempts: int = 1
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    max_prompt_chars: int | None = 1_000_000
    max_result_bytes: int | None = 16 * 1024 * 1024
    idempotency_window_s: float = 24 * 3600.0
    retention_s: float = 7 * 24 * 3600.0
    grace_period_s: float = 10.0
    cancel_wait_s: float = 30.0
    segment_bytes: int = 64 * 1024 * 1024
    compact_interval_s: float | None = 3600.0
    gc_tuning: bool = True  # see `_GCTuning`: fewer, cheaper cyclic-GC passes while open

    def __attrs_post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.session_concurrency is not None and self.session_concurrency < 1:
            raise ValueError("session_concurrency must be at least 1")
        if self.max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        if not 1 <= self.default_max_attempts <= 100:
            raise ValueError("default_max_attempts must be from 1 to 100")
        for name in ("retry_base_s", "retry_max_s", "grace_period_s", "cancel_wait_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number of seconds >= 0")
        if self.default_timeout is not None and not self.default_timeout > 0:
            raise ValueError("default_timeout must be positive (or None)")


@attrs.frozen(slots=True)
class Page:
    """A page of runs, newest first. Pass `next_cursor` back to get the next page."""

    runs: list[Run]
    next_cursor: str | None


_RUN_FIELDS: tuple[str, ...] = tuple(a.name for a in attrs.fields(Run))


def _make_copier() -> Callable[[Run], Run]:
    """A function copying every field of a `Run`, written out field by field: a third
    faster than a loop over the names and half the cost of `attrs.evolve`, and this runs
    on every submit and every get."""
    lines = ["def copy_run(run):", "    copy = new(Run)"]
    lines += [f"    set(copy, {name!r}, run.{name})" for name in _RUN_FIELDS]
    lines.append("    return copy")
    namespace: dict[str, Any] = {"new": object.__new__, "set": object.__setattr__, "Run": Run}
    exec("\n".join(lines), namespace)  # field names come from attrs, never from input
    copier: Callable[[Run], Run] = namespace["copy_run"]
    return copier


_copy_run = _make_copier()


def _snapshot(run: Run) -> Run:
    """A copy callers may keep: the fold goes on mutating the original."""
    copy = _copy_run(run)
    if run.webhook is not None:
        copy.webhook = attrs.evolve(run.webhook)
    trail = run.progress_trail
    if trail is not None and not isinstance(trail, bytes):  # bytes trails are immutable
        copy.progress_trail = trail.copy()
    return copy


def request_hash(spec: RunSpec) -> str:
    """A stable hash of what a submit asked for (everything but the key itself)."""
    data = spec_to_data(attrs.evolve(spec, idempotency_key=None, request_hash=None))
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


@attrs.frozen(slots=True)
class SubmitOutcome:
    """One item of `Engine.submit_many`: the run (new, or the original one for a replay),
    or the `IdempotencyConflict` that refused this item alone (or `NotFound`, in the rare
    case the new run was recorded and then deleted before the submitter looked at it)."""

    run: Run | None
    replayed: bool = False
    error: IdempotencyConflict | NotFound | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _hashes_differ(a: RunSpec, b: RunSpec) -> bool:
    """Do two submits under one key ask for different things? (`submit_spec`'s rule.)"""
    return (
        a.request_hash is not None
        and b.request_hash is not None
        and a.request_hash != b.request_hash
    )


@attrs.define(slots=True)
class _Plan:
    """`Engine._plan`'s decisions for a list of submits, by item index."""

    new: list[int] = attrs.Factory(list)  # items that create a run
    existing: dict[int, Run] = attrs.Factory(dict)  # replays of an earlier run
    conflicts: dict[int, IdempotencyConflict] = attrs.Factory(dict)  # ...of another request
    first: dict[tuple[str | None, str], int] = attrs.Factory(dict)  # key -> its new item
    same_as: dict[int, int] = attrs.Factory(dict)  # later item with a key -> its new item
    clashes: set[int] = attrs.Factory(set)  # items of `same_as` asking something else


class Engine:
    """Submit, watch, cancel and list runs. Get one from `open_engine`."""

    def __init__(
        self,
        data_dir: Path | str | None,
        *,
        runners: Mapping[str, Runner] | None = None,
        default_runner: str | None = None,
        config: EngineConfig | None = None,
        wall_clock: Callable[[], float] = time.time,
        journal_hooks: IOHooks | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        if data_dir is None and self.config.durability != "memory":
            raise ValueError("data_dir is required unless durability='memory'")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.runners: dict[str, Runner] = dict(runners) if runners else {"echo": EchoRunner()}
        if default_runner is None:
            default_runner = "echo" if "echo" in self.runners else next(iter(self.runners))
        if default_runner not in self.runners:
            raise UnknownRunner(default_runner, list(self.runners))
        self.default_runner = default_runner
        self.wall = wall_clock
        self.state = State()
        self.metrics = Metrics()
        self.bus = Bus()
        self.journal = Journal(
            self.data_dir / "journal" if self.data_dir is not None else None,
            self.config.durability,
            self._on_commit,
            segment_bytes=self.config.segment_bytes,
            clock=wall_clock,
            hooks=journal_hooks,
        )
        self.supervisor = Supervisor(
            self.config, self.journal, self.state, self.runners, default_runner, wall_clock
        )
        if self.config.gc_tuning:
            self.supervisor.note_bytes = _GCTuning.note_bytes
        self.replay_report: ReplayReport | None = None
        self.recovered: dict[str, int] = {}
        self.accepting = False
        self._finished_events: dict[str, trio.Event] = {}
        self._pending_keys: dict[tuple[str | None, str], trio.Event] = {}
        self._cancelling: dict[str, trio.Event] = {}
        self._gone: set[str] = set()  # runs whose `deleted` is written but not yet applied
        self._submitting = 0
        self._commit_hooks: list[Callable[[Sequence[Event]], None]] = []
        self._nursery: trio.Nursery | None = None
        self._aborted = False

    # -- the commit hook: the only place state changes -------------------------------------

    def _on_commit(self, events: list[Event]) -> None:
        """Fold a durable batch into state, in order, and tell everyone who cares.

        Runs inside the journal's writer task with no checkpoint, so nothing can observe a
        half-applied batch. The supervisor hears about an actor's last event here (and
        frees its slot) in the same step that makes the run queued again, so a retried run
        can never be started while its previous actor is still registered.
        """
        state = self.state
        runs = state.runs
        sup = self.supervisor
        metrics = self.metrics
        for ev in events:
            apply(state, ev)
            t = ev.type
            if t is E.OUTPUT or t is E.PROGRESS:
                continue
            if t in _TERMINAL_EVENTS:
                sup.release(ev.run)
                run = runs[ev.run]
                metrics.finished_total[run.status.value] += 1
                if run.started_at is not None and run.completed_at is not None:
                    metrics.run_seconds.observe(max(0.0, run.completed_at - run.started_at))
                waiter = self._finished_events.pop(ev.run, None)
                if waiter is not None:
                    waiter.set()
            elif t in _REQUEUE_EVENTS:
                run = runs[ev.run]
                # queued first, then the actor's slot freed: a session whose head is
                # waiting out its backoff must see that head before it admits the next run
                sup.enqueue(run)
                if t is E.SUBMITTED:
                    metrics.submitted_total += 1
                else:
                    sup.release(ev.run)
                    if t is E.RETRYING:
                        metrics.retries_total += 1
            elif t is E.STARTED:
                run = runs[ev.run]
                if run.attempt == 1:
                    metrics.queue_wait_seconds.observe(max(0.0, ev.ts - run.created_at))
            elif t is E.DELETED:
                self._gone.discard(ev.run)
                self.journal.forget(ev.run)
                waiter = self._finished_events.pop(ev.run, None)
                if waiter is not None:
                    waiter.set()
            elif t is E.CANCEL_REQUESTED:
                metrics.cancel_requests_total += 1
        self.bus.publish(events)
        for hook in self._commit_hooks:
            hook(events)

    def add_commit_hook(self, hook: Callable[[Sequence[Event]], None]) -> None:
        """Call `hook(events)` after each committed batch is applied (e.g. the outbox)."""
        self._commit_hooks.append(hook)

    # -- lifecycle ---------------------------------------------------------------------

    def _replay(self) -> None:
        """Fold the journal into state (synchronously, before anything is served)."""
        state = self.state
        deleted: builtins.list[str] = []

        def fold(event: Event) -> None:
            apply(state, event)
            if event.type is E.DELETED:
                deleted.append(event.run)

        try:
            self.replay_report = self.journal.open(fold)
        except BaseException:
            self.journal.close_files()  # release the directory lock: a repair may follow
            raise
        for run_id in deleted:
            if run_id not in state.runs:
                self.journal.forget(run_id)
        state.vacuum()

    async def _recover(self, records: AttemptRecords | None = None) -> None:
        """Settle runs that were running when the process stopped; queue the queued ones.

        Nothing starts until every run is settled and queued, so the queue order after a
        restart is the journal's (priority, then submission), recovered runs included.

        First of all, process groups that attempts of the previous server left running
        (`records`, see `runners/_orphans.py`) are stopped: the run they belong to is
        about to be requeued, and must not run twice at once. Only then do runners that
        record their attempts get this engine's records.
        """
        counts = {"requeued": 0, "failed": 0, "cancelled": 0, "queued": 0}
        sup = self.supervisor
        sup.admitting = False
        if records is not None:
            # blocking (signals, then polling /proc for up to the recorded grace): a thread
            leftovers = await trio.to_thread.run_sync(records.stop_leftovers)
            if leftovers.stopped:
                log.warning(
                    "stopped %d process groups left running by the previous server: %s",
                    len(leftovers.stopped),
                    ", ".join(leftovers.stopped),
                )
            for runner in self.runners.values():
                if isinstance(runner, RecordsAttempts):
                    runner.attach_attempt_records(records)
        tickets = []
        for run in list(self.state.runs.values()):
            if run.status is Status.QUEUED:
                counts["queued"] += 1
                sup.enqueue(run)
                continue
            if run.status is not Status.RUNNING:
                continue
            if run.cancel_requested:
                # the cancel was acknowledged: keep the promise
                etype, data = E.CANCELLED, {"reason": "cancelled (finished after restart)"}
                counts["cancelled"] += 1
            elif run.attempt < run.spec.max_attempts:
                etype, data = E.REQUEUED, {"reason": "interrupted by restart"}
                counts["requeued"] += 1
            else:
                etype, data = E.FAILED, {"error": "interrupted by restart", "kind": "interrupted"}
                counts["failed"] += 1
            tickets.append(self.journal.append(run.id, etype, data, sync=True))
        for ticket in tickets:
            await ticket.wait()
        sup.admitting = True
        sup.wake()
        self.recovered = counts
        if any(counts[k] for k in ("requeued", "failed", "cancelled")):
            log.info(
                "recovered after restart: %d requeued, %d failed, %d cancelled; %d queued",
                counts["requeued"],
                counts["failed"],
                counts["cancelled"],
                counts["queued"],
            )

    def _abort(self) -> None:
        """Stop at once, recording nothing more, as if the process had died. For tests of
        crash recovery: what is on disk is exactly what a `kill -9` would have left."""
        self._aborted = True
        self.accepting = False
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- submitting ------------------------------------------------------------------------

    def make_spec(
        self,
        prompt: str,
        *,
        config: Mapping[str, Any] | None = None,
        session_id: str | None = None,
        priority: int = 0,
        timeout: float | None = None,
        max_attempts: int | None = None,
        runner: str | None = None,
        webhook_url: str | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        tenant: str | None = None,
        ttl: float | None = None,
    ) -> RunSpec:
        """Validate a submit and build its spec. Raises `InvalidRequest` naming the field."""
        cfg = self.config
        if not isinstance(prompt, str):
            raise InvalidRequest("prompt", "must be a string")
        if not prompt.strip():
            raise InvalidRequest("prompt", "must not be empty")
        if cfg.max_prompt_chars is not None and len(prompt) > cfg.max_prompt_chars:
            raise InvalidRequest(
                "prompt", f"is {len(prompt)} characters, over the limit of {cfg.max_prompt_chars}"
            )
        run_config: dict[str, Any] = {}
        if config is not None:
            if not isinstance(config, Mapping):
                raise InvalidRequest("config", "must be an object")
            if config:
                # a canonical copy: exactly what a replay of the journal will give back
                try:
                    run_config = orjson.loads(orjson.dumps(dict(config)))
                except TypeError as exc:
                    raise InvalidRequest("config", f"must be JSON-serialisable: {exc}") from None
        for name, value in (("timeout", timeout), ("ttl", ttl)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value <= 0
            ):
                raise InvalidRequest(name, "must be a positive number of seconds")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidRequest("priority", "must be an integer")
        if not -(2**53) <= priority <= 2**53:
            raise InvalidRequest("priority", "is out of range")
        attempts = cfg.default_max_attempts if max_attempts is None else max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            raise InvalidRequest("max_attempts", "must be an integer from 1 to 100")
        if runner is not None and runner not in self.runners:
            raise UnknownRunner(runner, list(self.runners))
        for name, text in (
            ("session_id", session_id),
            ("idempotency_key", idempotency_key),
            ("webhook_url", webhook_url),
            ("tenant", tenant),
        ):
            if text is not None and (not isinstance(text, str) or not text):
                raise InvalidRequest(name, "must be a non-empty string")
        spec = RunSpec(
            prompt=prompt,
            config=run_config,
            session_id=session_id,
            priority=priority,
            timeout=float(timeout) if timeout is not None else None,
            max_attempts=attempts,
            runner=runner,
            webhook_url=webhook_url,
            idempotency_key=idempotency_key,
            tenant=tenant,
            ttl=float(ttl) if ttl is not None else None,
        )
        if idempotency_key is not None:
            spec = attrs.evolve(spec, request_hash=request_hash or _request_hash(spec))
        return spec

    async def submit(self, prompt: str, **options: Any) -> Run:
        """Submit a run; returns once it is durable. See `make_spec` for the options.

        With an `idempotency_key` already used for the same request, the original run is
        returned instead (use `submit_spec` to tell the two apart).
        """
        run, _ = await self.submit_spec(self.make_spec(prompt, **options))
        return run

    async def submit_spec(self, spec: RunSpec) -> tuple[Run, bool]:
        """Submit a validated spec. Returns (run, replayed): replayed is True for an
        idempotent repeat of an earlier submit (the original run is returned).

        A batch of one (`submit_many`), so that the idempotency rules and the protocol
        with concurrent submits of the same key exist once; raises what `submit_many`
        raises, and the item's `IdempotencyConflict`."""
        (outcome,) = await self.submit_many((spec,))
        if outcome.error is not None:
            raise outcome.error
        assert outcome.run is not None
        return outcome.run, outcome.replayed

    async def settle(self, specs: Sequence[RunSpec]) -> None:
        """Wait until no idempotency key of `specs` is being recorded by a concurrent
        submit, so that `new_runs` and `submit_many` see that submit's run (a retry that
        overtook its original then counts as the replay it is, not as a new run a quota
        must make room for). Returns at once when no key is pending."""
        pending = self._pending_keys
        if not pending:
            return
        keyed = {(s.tenant, s.idempotency_key) for s in specs if s.idempotency_key is not None}
        while (
            inflight := next((ev for pk in keyed if (ev := pending.get(pk)) is not None), None)
        ) is not None:
            await inflight.wait()
            if not self.accepting:
                raise EngineClosed("the engine is not accepting runs")

    def new_runs(self, specs: Sequence[RunSpec]) -> int:
        """How many runs `submit_many(specs)` would create if it were called now: the
        items without a key, and the first item of each key that has no live earlier run
        (an earlier run answers the others: a replay, or a conflict). What a quota must
        hold room for. A key a concurrent submit is recording counts as new (its run is
        not recorded yet): call `settle` first. The same rules as the submit itself
        (`_plan`), so the HTTP layer never decides "is this a replay?" on its own."""
        return len(self._plan(specs).new)

    def _plan(self, specs: Sequence[RunSpec]) -> _Plan:
        """Decide each item: new run, replay, or conflict (no checkpoint: nothing can
        change under the decisions until the caller appends). A run whose `deleted` is
        written but not yet applied (`_gone`) is no longer there to replay."""
        now = self.wall()
        window = self.config.idempotency_window_s
        find = self.state.find_idempotent
        gone = self._gone
        plan = _Plan()
        for i, spec in enumerate(specs):
            key = spec.idempotency_key
            if key is None:
                plan.new.append(i)
                continue
            found = find(spec.tenant, key, now=now, window=window)
            if found is not None and found.id not in gone:
                if _hashes_differ(found.spec, spec):
                    plan.conflicts[i] = IdempotencyConflict(key, found.id)
                else:
                    plan.existing[i] = found
                continue
            pk = (spec.tenant, key)
            j = plan.first.get(pk)
            if j is None:
                plan.first[pk] = i
                plan.new.append(i)
            else:
                plan.same_as[i] = j
                if _hashes_differ(specs[j], spec):
                    plan.clashes.add(i)
        return plan

    async def submit_many(self, specs: Sequence[RunSpec]) -> builtins.list[SubmitOutcome]:
        """Submit validated specs together: one journal batch (one write, one fsync).

        Returns one `SubmitOutcome` per spec, in order: a new run, an idempotent replay
        (the original run, `replayed=True`), or an `IdempotencyConflict` in `error` (that
        item only; the others go ahead). Keys are per tenant: a key whose earlier run is
        still known (within `idempotency_window_s`, not deleted) is a replay when the
        request is the same (`request_hash`) and a conflict when it differs; a key given
        twice in `specs` makes the second a replay of the first (same request) or a
        conflict; a key a concurrent submit is recording is waited for first.

        All or nothing for the rest: `QueueFull` if the new runs do not all fit in
        `max_queue` (nothing written), `StorageUnavailable` if their batch could not be
        made durable (none of it is applied: the journal applies a batch only once it is
        written), `EngineClosed` when shutting down. Why one batch: every `submitted`
        event is appended without a checkpoint in between, so the journal's writer takes
        them as one group commit, and the caller pays one fsync for the lot instead of
        one trio task and one ticket wait per run (docs/benchmarks.md).

        Cancelling the caller once the runs are appended does not take them back: they
        are recorded all the same (see `_record`).
        """
        if not self.accepting:
            raise EngineClosed("the engine is not accepting runs")
        if not specs:
            return []
        await self.settle(specs)
        # From here to the appends: no checkpoint, so nothing can change under the decisions.
        plan = self._plan(specs)
        new = plan.new
        ids = await self._record(specs, plan) if new else {}
        runs = self.state.runs

        def recorded(run_id: str, replayed: bool) -> SubmitOutcome:
            # The submitter resumes after the batch was applied; a delete may have come in
            # between (durable all the same): answer that it is gone, not a KeyError.
            run = runs.get(run_id)
            if run is None:
                return SubmitOutcome(None, False, NotFound(run_id))
            return SubmitOutcome(_snapshot(run), replayed)

        out: builtins.list[SubmitOutcome] = []
        for i in range(len(specs)):
            if i in ids:
                out.append(recorded(ids[i], False))
            elif i in plan.clashes:
                conflict = IdempotencyConflict(specs[i].idempotency_key or "", ids[plan.same_as[i]])
                out.append(SubmitOutcome(None, False, conflict))
            elif i in plan.same_as:
                out.append(recorded(ids[plan.same_as[i]], True))
            elif i in plan.conflicts:
                out.append(SubmitOutcome(None, False, plan.conflicts[i]))
            else:
                out.append(SubmitOutcome(_snapshot(plan.existing[i]), True))
        return out

    async def _record(self, specs: Sequence[RunSpec], plan: _Plan) -> dict[int, str]:
        """Append the `submitted` events of `plan.new` as one batch and wait until it is
        durable and applied; the new run ids by item.

        The keys this records are marked pending (`_pending_keys`) until the batch is
        resolved, so that a concurrent submit of the same key waits for this run instead
        of recording a second one. The wait is shielded from the caller's cancellation
        (an HTTP client that went away): once appended, the events are written and
        applied whatever the caller does, and releasing the keys earlier would let that
        concurrent submit find neither the run nor the marker. The shielded wait ends
        as soon as the journal resolves the batch, which it always does: while the engine
        is open its writer commits or fails each batch it takes (one write and fsync
        away), and a writer that stops, cancelled or closed, fails what is left
        (`Journal.run`; `Journal.aclose` when no writer runs). The caller's cancellation
        is then delivered at its next checkpoint.
        """
        new = plan.new
        if self.supervisor.queued_count + self._submitting + len(new) > self.config.max_queue:
            raise QueueFull(
                f"the queue is full ({self.config.max_queue} runs waiting); retry later"
                if len(specs) == 1
                else f"the queue cannot take {len(new)} more runs ({self.config.max_queue} "
                "may wait); nothing was submitted; retry later",
                retry_after=self.supervisor.retry_hint(),
            )
        datas = [spec_to_data(specs[i]) for i in new]
        if len(datas) > 1:
            try:  # any encoding error now, before the first append: all or nothing
                orjson.dumps(datas)
            except TypeError as exc:
                raise InvalidRequest("config", f"must be JSON-serialisable: {exc}") from None
        append = self.journal.append
        note = self.supervisor.note_bytes
        ids: dict[int, str] = {}
        tickets = []
        try:
            for i, data in zip(new, datas, strict=True):
                run_id = ids[i] = new_run_id()
                tickets.append(append(run_id, E.SUBMITTED, data, sync=True))
                note(len(specs[i].prompt))
        except TypeError as exc:  # one item, not checked above: nothing was queued
            raise InvalidRequest("config", f"must be JSON-serialisable: {exc}") from None
        except JournalClosed:
            raise EngineClosed("the engine is shutting down") from None
        except JournalError as exc:  # broken journal: raised before anything was queued
            raise StorageUnavailable(f"could not record the runs durably: {exc}") from exc
        done = trio.Event()
        mine = [pk for pk, i in plan.first.items() if i in ids]
        pending = self._pending_keys
        for pk in mine:
            pending[pk] = done
        self._submitting += len(tickets)
        try:
            with trio.CancelScope(shield=True):
                # one batch: every ticket shares it, so the last one answers for all
                await tickets[-1].wait()
        except JournalWriteError as exc:
            raise StorageUnavailable(f"could not record the runs durably: {exc}") from exc
        except JournalClosed:
            raise EngineClosed("the engine is shutting down") from None
        finally:
            self._submitting -= len(tickets)
            for pk in mine:
                if pending.get(pk) is done:
                    del pending[pk]
            done.set()
        return ids

    # -- reading -----------------------------------------------------------------------

    def _visible(self, run_id: str, tenant: str | None) -> Run:
        run = self.state.runs.get(run_id)
        if run is None or run.spec.tenant != tenant or run_id in self._gone:
            raise NotFound(run_id)
        return run

    def get(self, run_id: str, *, tenant: str | None = None) -> Run:
        """A snapshot of the run, or `NotFound`."""
        return _snapshot(self._visible(run_id, tenant))

    def list(
        self,
        *,
        status: Status | str | None = None,
        session_id: str | None = None,
        tenant: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
        offset: int = 0,
    ) -> Page:
        """Runs newest first. `cursor` is the `next_cursor` of the previous page."""
        try:
            status = Status(status) if status is not None else None
        except ValueError:
            raise InvalidRequest("status", f"unknown status {status!r}") from None
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InvalidRequest("limit", "must be a positive integer")
        before = None
        if cursor:
            try:
                before = int(cursor)
            except ValueError:
                raise InvalidRequest("cursor", "is not a cursor this server gave out") from None
        out: builtins.list[Run] = []
        it = self.state.newest_first(
            before_seq=before, status=status, session_id=session_id, tenant=tenant
        )
        skipped = 0
        for run in it:
            if run.id in self._gone:
                continue
            if skipped < offset:
                skipped += 1
                continue
            if len(out) == limit:
                return Page([_snapshot(r) for r in out], str(out[-1].seq))
            out.append(run)
        return Page([_snapshot(r) for r in out], None)

    def count(
        self,
        *,
        status: Status | str | None = None,
        session_id: str | None = None,
        tenant: str | None = None,
    ) -> int:
        status = Status(status) if status is not None else None
        return sum(
            1
            for r in self.state.newest_first(status=status, session_id=session_id, tenant=tenant)
            if r.id not in self._gone
        )

    async def wait(
        self, run_id: str, timeout: float | None = None, *, tenant: str | None = None
    ) -> Run:
        """Wait until the run is finished (or `timeout` seconds pass); return it either way
        (check `run.finished`)."""
        run = self._visible(run_id, tenant)
        if not run.finished:
            event = self._finished_events.get(run_id)
            if event is None:
                event = self._finished_events[run_id] = trio.Event()
            with trio.move_on_after(timeout if timeout is not None else math.inf):
                await event.wait()
        return self.get(run_id, tenant=tenant)

    async def events(
        self,
        run_id: str,
        after_seq: int = 0,
        *,
        tenant: str | None = None,
        limit: int | None = None,
    ) -> builtins.list[Event]:
        """The run's committed events after `after_seq`, oldest first (at most `limit`).

        A page costs what it holds: the journal finds `after_seq` by binary search over
        the run's index and reads only the lines of the page.
        """
        self._visible(run_id, tenant)
        return await self._read_history(run_id, after_seq, limit)

    async def _read_history(
        self, run_id: str, after_seq: int, limit: int | None = None
    ) -> builtins.list[Event]:
        if self.config.durability == "memory":
            return self.journal.history(run_id, after_seq, limit)
        return await trio.to_thread.run_sync(self.journal.history, run_id, after_seq, limit)

    async def progress_at(self, run_id: str, seq: int, *, tenant: str | None = None) -> Progress:
        """The run's progress as of its event `seq` (what a stream resuming after `seq`
        starts from), without reading the output in between.

        From the run's state when its progress has not changed since `seq` (O(1), the
        common case of a reconnect); else from a mark of its `ProgressTrail` and at most
        `PROGRESS_MARK_EVERY - 1` `progress` events read by seq (from the bus's tail of a
        live run, else the journal: a few binary searches of the run's index).
        """
        run = self._visible(run_id, tenant)
        progress, seqs = progress_at(run, seq)
        if not seqs:
            return progress
        events = self.bus.tail_at(run_id, seqs)
        if events is None:
            read = self.journal.history_at
            if self.config.durability == "memory":
                events = read(run_id, seqs)
            else:
                events = await trio.to_thread.run_sync(read, run_id, seqs)
        if [ev.seq for ev in events] != seqs:
            self._visible(run_id, tenant)  # deleted meanwhile: NotFound
            raise JournalError(f"history of {run_id}: progress events {seqs} not all found")
        for ev in events:
            progress = fold_progress(progress, ev.data)
        return progress

    def subscribe(
        self, run_id: str, after_seq: int = 0, *, tenant: str | None = None
    ) -> AsyncIterator[Event]:
        """The run's events after `after_seq`: past ones, then live ones, ending after the
        terminal event. Raises `NotFound` at once for an unknown run."""
        self._visible(run_id, tenant)

        def finished() -> int | None:
            run = self.state.runs.get(run_id)
            if run is None:
                return 0
            return run.terminal_seq

        return self.bus.follow(run_id, after_seq, self._read_history, finished)

    # -- cancelling and deleting -----------------------------------------------------------

    async def cancel(
        self,
        run_id: str,
        *,
        tenant: str | None = None,
        reason: str = "cancelled by user",
        wait: float | None = None,
    ) -> Run:
        """Cancel a run and return it.

        A queued run is cancelled at once. For a running one, `cancel_requested` is recorded
        durably first (from then on the run will end `cancelled`, even across a crash), its
        runner is stopped for real (its process gone), and then `cancelled` is recorded;
        this waits up to `wait` seconds (default `cancel_wait_s`) for that last step and
        returns the run as it is then (`status` cancelled, or running with
        `cancel_requested`). Raises `AlreadyFinished` if the run finished first.
        """
        run = self._visible(run_id, tenant)
        if run.finished:
            raise AlreadyFinished(run_id, run.status.value)
        wait = self.config.cancel_wait_s if wait is None else wait
        while True:
            inflight = self._cancelling.get(run_id)
            if inflight is None:
                break
            await inflight.wait()
            run = self._visible(run_id, tenant)
            if run.finished or run.cancel_requested:
                return self._cancel_answer(run)
        done = self._cancelling[run_id] = trio.Event()
        try:
            await self._cancel(run, reason, wait)
        finally:
            del self._cancelling[run_id]
            done.set()
        return self._cancel_answer(self._visible(run_id, tenant))

    @staticmethod
    def _cancel_answer(run: Run) -> Run:
        if run.finished and run.status is not Status.CANCELLED:
            raise AlreadyFinished(run.id, run.status.value)
        return _snapshot(run)

    async def _cancel(self, run: Run, reason: str, wait: float) -> None:
        sup = self.supervisor
        deadline = trio.current_time() + wait
        while not run.finished:
            if sup.take_queued(run.id):
                # we own the run now; shielded, so a caller who gives up cannot strand it
                # outside the queue with nothing recorded
                with trio.CancelScope(shield=True):
                    try:
                        await self.journal.commit(run.id, E.CANCELLED, {"reason": reason})
                    except JournalWriteError as exc:
                        sup.put_back(run)
                        raise StorageUnavailable(
                            f"could not record the cancel durably: {exc}"
                        ) from exc
                    except JournalClosed:
                        sup.put_back(run)
                        raise EngineClosed("the engine is shutting down") from None
                return
            actor = sup.actors.get(run.id)
            if actor is None:
                # in between owners (an expiry or a failed start being recorded): look again
                await trio.sleep(0.005)
                continue
            msg = actor.post_cancel(reason)
            await msg.acked.wait()
            if msg.outcome == REQUESTED:
                with trio.move_on_at(deadline):
                    await actor.done.wait()
                return
            if msg.outcome == NOT_RECORDED:
                raise StorageUnavailable(
                    f"could not record the cancel durably: {msg.error}"
                ) from msg.error
            if msg.outcome == BUSY:
                await trio.sleep(0.01)
                continue
            # too late: the runner had returned; once the actor lets go, look again (the run
            # is then finished, or queued for a retry and cancellable at once)
            with trio.move_on_at(max(deadline, trio.current_time() + TOO_LATE_WAIT_S)):
                await actor.done.wait()
            if not actor.done.is_set():  # its outcome cannot be recorded (see `_finish`)
                raise StorageUnavailable(f"run {run.id}: its outcome is not recorded yet")

    async def delete(self, run_id: str, *, tenant: str | None = None) -> None:
        """Forget a finished run (its result and history). Raises `NotFinished` otherwise."""
        run = self._visible(run_id, tenant)
        if not run.finished:
            raise NotFinished(run_id, run.status.value)
        self._gone.add(run_id)
        try:
            await self.journal.commit(run_id, E.DELETED, {})
        except JournalClosed:
            self._gone.discard(run_id)
            raise EngineClosed("the engine is shutting down") from None
        except JournalError as exc:  # a write error, or the run is being compacted away
            self._gone.discard(run_id)
            raise StorageUnavailable(f"could not record the delete durably: {exc}") from exc

    async def compact(self) -> CompactionReport:
        """Drop finished runs older than `retention_s` (whose webhooks are settled) and
        expired idempotency keys from the journal, and from the state at the same instant.

        The journal stays writable meanwhile (the rewrite runs in a worker thread); see
        `compaction.py` for why a crash at any step is safe. Runs every
        `compact_interval_s` on its own; call it to compact now.
        """
        gone = self._gone
        waiters = self._finished_events

        def on_swap(report: CompactionReport) -> None:
            for rid in report.dropped:  # the engine's own per-run bookkeeping
                gone.discard(rid)
                waiter = waiters.pop(rid, None)
                if waiter is not None:
                    waiter.set()

        return await compact_state(
            self.journal,
            self.state,
            self.wall(),
            retention_s=self.config.retention_s,
            idempotency_window_s=self.config.idempotency_window_s,
            on_swap=on_swap,
        )

    async def _compact_periodically(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            try:
                report = await self.compact()
            except (JournalError, OSError) as exc:
                # e.g. a full disk while sealing the segment: the journal itself is fine
                # (the seal is retried by the next compaction), so the engine carries on.
                log.error("scheduled compaction failed (will try again): %s", exc)
            else:
                if report.skipped is None:
                    log.info("scheduled %s", report.summary())

    def writable(self, run_id: str) -> bool:
        """May a bookkeeping event (webhooks) still be written for this finished run?"""
        run = self.state.runs.get(run_id)
        return run is not None and run.status in TERMINAL and run_id not in self._gone

    # -- figures ---------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        state = self.state
        return {
            "queued": self.supervisor.queued_count,
            "running": self.supervisor.running_count,
            "runs": len(state.runs),
            "by_status": {s.value: state.count(s) for s in Status},
            "max_concurrency": self.config.max_concurrency,
            "durability": self.config.durability,
            "last_seq": self.journal.last_seq,
            "subscribers": self.bus.subscriber_count,
        }


def _request_hash(spec: RunSpec) -> str:
    return request_hash(spec)


class _GCTuning:
    """Tune CPython's cyclic garbage collector while engines are open (process-wide,
    reference counted: the first open engine applies it, the last one to close undoes it).

    Why: an engine allocates a few dozen container objects per run that live for
    milliseconds (tasks, coroutines, events), and keeps a few per run for good (the
    state). With the default first-generation threshold (700) the in-flight ones survive
    two young collections and are promoted, which triggers full collections that walk the
    whole state; at 10k runs/s that was ~30% of the engine's CPU (`docs/benchmarks.md`).
    A threshold of `THRESHOLD0` lets them die young instead. And after a large replay the
    state is collected once and frozen (`gc.freeze`), so later full collections skip it.

    The threshold counts objects, not bytes. Payloads (output, results, prompts) end up in
    short-lived reference cycles until a collection (the journal's batch and its tickets
    point at each other), and a run that writes megabytes of output allocates few objects:
    with 50,000 it could leave tens of MB waiting per run. So the engine also counts the
    payload bytes it hands to the journal (`note_bytes`) and runs a young collection
    (generations 0 and 1, a few ms) after every `COLLECT_AFTER_BYTES` of them.
    """

    THRESHOLD0 = 50_000
    FREEZE_AFTER_EVENTS = 100_000
    COLLECT_AFTER_BYTES = 8 * 1024 * 1024

    depth = 0
    saved: tuple[int, int, int] | None = None
    froze = False
    pending_bytes = 0

    @classmethod
    def note_bytes(cls, n: int) -> None:
        cls.pending_bytes += n
        if cls.pending_bytes >= cls.COLLECT_AFTER_BYTES:
            cls.pending_bytes = 0
            if cls.depth:
                gc.collect(1)

    @classmethod
    def enter(cls) -> None:
        if cls.depth == 0:
            cls.saved = gc.get_threshold()
            gen0, gen1, gen2 = cls.saved
            gc.set_threshold(max(gen0, cls.THRESHOLD0), gen1, gen2)
        cls.depth += 1

    @classmethod
    def after_replay(cls, events: int) -> None:
        if events >= cls.FREEZE_AFTER_EVENTS:
            gc.collect()  # nothing that is garbage now gets frozen
            gc.freeze()
            cls.froze = True

    @classmethod
    def exit(cls) -> None:
        cls.depth -= 1
        if cls.depth == 0:
            if cls.saved is not None:
                gc.set_threshold(*cls.saved)
            if cls.froze:
                gc.unfreeze()
                cls.froze = False


STOP_EXTRA_S = 30.0  # after the grace period: how long stopped runners get to unwind
TOO_LATE_WAIT_S = 30.0  # a cancel that came too late waits this long for the real outcome
FLUSH_TIMEOUT_S = 30.0  # how long the journal gets to write what is queued at shutdown


@asynccontextmanager
async def open_engine(
    data_dir: Path | str | None = None,
    *,
    runners: Mapping[str, Runner] | None = None,
    default_runner: str | None = None,
    wall_clock: Callable[[], float] = time.time,
    config: EngineConfig | None = None,
    journal_hooks: IOHooks | None = None,
    **options: Any,
) -> AsyncIterator[Engine]:
    """Open (replaying its journal) and run an engine for the duration of the block.

    `options` are `EngineConfig` fields (`max_concurrency=4, durability="os"`, ...). On
    leaving the block the engine stops admitting, gives running runs `grace_period_s` to
    finish, then stops the rest and records them as requeued (their attempt given back), so
    that the next open resumes them.
    """
    if config is None:
        config = EngineConfig(**options)
    elif options:
        config = attrs.evolve(config, **options)
    engine = Engine(
        data_dir,
        runners=runners,
        default_runner=default_runner,
        config=config,
        wall_clock=wall_clock,
        journal_hooks=journal_hooks,
    )
    if config.gc_tuning:
        _GCTuning.enter()
    try:
        async with _run_engine(engine, config) as running:
            yield running
    finally:
        if config.gc_tuning:
            _GCTuning.exit()


@asynccontextmanager
async def _run_engine(engine: Engine, config: EngineConfig) -> AsyncIterator[Engine]:
    engine._replay()
    report = engine.replay_report
    if config.gc_tuning and report is not None:
        _GCTuning.after_replay(report.events)
    # Process groups of live attempts are recorded beside the journal (whose lock makes
    # this engine the dir's only user). Without a data dir nothing outlives the process
    # in a way a restart could see, so nothing is recorded.
    records = (
        AttemptRecords(engine.data_dir / "attempts")
        if engine.data_dir is not None and config.durability != "memory"
        else None
    )
    log.info(
        "engine open: durability=%s%s, %d events replayed",
        config.durability,
        f", data in {engine.data_dir}" if engine.data_dir is not None else "",
        report.events if report is not None else 0,
    )
    try:
        async with trio.open_nursery() as nursery:
            engine._nursery = nursery
            journal_done = trio.Event()

            async def run_journal(*, task_status: trio.TaskStatus[None]) -> None:
                try:
                    await engine.journal.run(task_status=task_status)
                finally:
                    journal_done.set()

            await nursery.start(run_journal)
            await nursery.start(engine.supervisor.run)
            await engine._recover(records)
            compactor = trio.CancelScope()
            if config.compact_interval_s is not None:

                async def compact_periodically() -> None:
                    with compactor:
                        await engine._compact_periodically(config.compact_interval_s or 0)

                nursery.start_soon(compact_periodically)
            engine.accepting = True
            try:
                yield engine
            finally:
                engine.accepting = False
                compactor.cancel()  # a compaction cut short is safe (see compaction.py)
                if not engine._aborted:
                    await _shut_down(engine, journal_done)
                nursery.cancel_scope.cancel()
    finally:
        if records is not None:
            for runner in engine.runners.values():
                if isinstance(runner, RecordsAttempts):
                    runner.detach_attempt_records(records)
        engine.journal.close_files()
        for runner in engine.runners.values():
            aclose = getattr(runner, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + STOP_EXTRA_S
                    await aclose()


async def _shut_down(engine: Engine, journal_done: trio.Event) -> None:
    """Graceful stop, shielded from the caller's cancellation but bounded in time."""
    grace = engine.config.grace_period_s
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + grace + STOP_EXTRA_S
        await engine.supervisor.stop(grace)
    if scope.cancelled_caught:
        log.error(
            "%d runs did not stop within %gs of being asked; they are recovered at the next start",
            engine.supervisor.running_count,
            STOP_EXTRA_S,
        )
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + FLUSH_TIMEOUT_S
        await engine.journal.aclose()
        await journal_done.wait()
    if scope.cancelled_caught:
        log.error("journal did not flush within %gs at shutdown", FLUSH_TIMEOUT_S)
