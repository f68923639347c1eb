"""The engine: the one object callers hold. It wires journal, state, bus and supervisor.

The write path is always the same: build an event, `journal.append`/`commit` it; the
journal's writer makes the batch durable and calls `_on_commit`, which folds the events
into `state` (`state.apply`), tells the supervisor about newly queued runs, wakes waiters,
updates metrics and publishes to the bus. Nothing else changes run state.

Callers get snapshots (copies) of runs, never the live records the fold mutates.
"""

from __future__ import annotations

import builtins
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

from .bus import Bus
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
from .journal import Durability, Journal, JournalClosed, JournalWriteError, ReplayReport
from .metrics import Metrics
from .model import TERMINAL, Event, EventType, Run, RunSpec, Status, new_run_id
from .runners import EchoRunner, Runner
from .state import State, apply, spec_to_data
from .supervisor import Supervisor

__all__ = ["Engine", "EngineConfig", "Page", "open_engine"]

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

    def __attrs_post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.session_concurrency is not None and self.session_concurrency < 1:
            raise ValueError("session_concurrency must be at least 1")


@attrs.frozen(slots=True)
class Page:
    """A page of runs, newest first. Pass `next_cursor` back to get the next page."""

    runs: list[Run]
    next_cursor: str | None


def _snapshot(run: Run) -> Run:
    copy = attrs.evolve(run)
    if run.webhook is not None:
        copy.webhook = attrs.evolve(run.webhook)
    return copy


def request_hash(spec: RunSpec) -> str:
    """A stable hash of what a submit asked for (everything but the key itself)."""
    data = spec_to_data(attrs.evolve(spec, idempotency_key=None, request_hash=None))
    return hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


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
        )
        self.supervisor = Supervisor(
            self.config, self.journal, self.state, self.runners, default_runner, wall_clock
        )
        self.replay_report: ReplayReport | None = None
        self.recovered: dict[str, int] = {}
        self.accepting = False
        self._finished_events: dict[str, trio.Event] = {}
        self._pending_keys: dict[tuple[str | None, str], trio.Event] = {}
        self._cancelling: dict[str, trio.Event] = {}
        self._gone: set[str] = set()  # runs whose `deleted` is written but not yet applied
        self._submitting = 0
        self._commit_hooks: list[Callable[[Sequence[Event]], None]] = []

    # -- the commit hook: the only place state changes -------------------------------------

    def _on_commit(self, events: list[Event]) -> None:
        state = self.state
        sup = self.supervisor
        metrics = self.metrics
        for ev in events:
            apply(state, ev)
            t = ev.type
            if t in _REQUEUE_EVENTS:
                run = state.runs[ev.run]
                sup.enqueue(run)
                if t is E.SUBMITTED:
                    metrics.submitted_total += 1
                elif t is E.RETRYING:
                    metrics.retries_total += 1
            elif t is E.STARTED:
                run = state.runs[ev.run]
                if run.attempt == 1:
                    metrics.queue_wait_seconds.observe(max(0.0, ev.ts - run.created_at))
            elif t in _TERMINAL_EVENTS:
                run = state.runs[ev.run]
                metrics.finished_total[run.status.value] += 1
                if run.started_at is not None and run.completed_at is not None:
                    metrics.run_seconds.observe(max(0.0, run.completed_at - run.started_at))
                waiter = self._finished_events.pop(ev.run, None)
                if waiter is not None:
                    waiter.set()
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
        state = self.state

        def fold(event: Event) -> None:
            apply(state, event)

        self.replay_report = self.journal.open(fold)

    async def _recover(self) -> None:
        """Settle runs that were running when the process stopped; queue the queued ones."""
        counts = {"requeued": 0, "failed": 0, "cancelled": 0, "queued": 0}
        for run in list(self.state.runs.values()):
            if run.status is Status.QUEUED:
                counts["queued"] += 1
                self.supervisor.enqueue(run)
        tickets = []
        for run in list(self.state.runs.values()):
            if run.status is not Status.RUNNING:
                continue
            if run.cancel_requested:
                tickets.append(
                    self.journal.append(
                        run.id,
                        E.CANCELLED,
                        {"reason": "cancelled (finished after restart)"},
                        sync=True,
                    )
                )
                counts["cancelled"] += 1
            elif run.attempt < run.spec.max_attempts:
                tickets.append(
                    self.journal.append(
                        run.id, E.REQUEUED, {"reason": "interrupted by restart"}, sync=True
                    )
                )
                counts["requeued"] += 1
            else:
                tickets.append(
                    self.journal.append(
                        run.id,
                        E.FAILED,
                        {"error": "interrupted by restart", "kind": "interrupted"},
                        sync=True,
                    )
                )
                counts["failed"] += 1
        for ticket in tickets:
            await ticket.wait()
        self.recovered = counts
        if any(counts[k] for k in ("requeued", "failed", "cancelled")):
            log.info(
                "recovered after restart: %d requeued, %d failed, %d cancelled; %d queued",
                counts["requeued"],
                counts["failed"],
                counts["cancelled"],
                counts["queued"],
            )

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
        if config is not None and not isinstance(config, Mapping):
            raise InvalidRequest("config", "must be an object")
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
        attempts = cfg.default_max_attempts if max_attempts is None else max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or not 1 <= attempts <= 100:
            raise InvalidRequest("max_attempts", "must be an integer from 1 to 100")
        if runner is not None and runner not in self.runners:
            raise UnknownRunner(runner, list(self.runners))
        for name, text in (
            ("session_id", session_id),
            ("idempotency_key", idempotency_key),
            ("webhook_url", webhook_url),
        ):
            if text is not None and (not isinstance(text, str) or not text):
                raise InvalidRequest(name, "must be a non-empty string")
        spec = RunSpec(
            prompt=prompt,
            config=dict(config) if config else {},
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
        idempotent repeat of an earlier submit."""
        if not self.accepting:
            raise EngineClosed("the engine is not accepting runs")
        key = spec.idempotency_key
        pending_key = None
        if key is not None:
            pending_key = (spec.tenant, key)
            while True:
                found = self.state.find_idempotent(
                    spec.tenant, key, now=self.wall(), window=self.config.idempotency_window_s
                )
                if found is not None:
                    if (
                        found.spec.request_hash is not None
                        and spec.request_hash is not None
                        and found.spec.request_hash != spec.request_hash
                    ):
                        raise IdempotencyConflict(key, found.id)
                    return _snapshot(found), True
                inflight = self._pending_keys.get(pending_key)
                if inflight is None:
                    break
                await inflight.wait()
        if self.supervisor.queued_count + self._submitting >= self.config.max_queue:
            raise QueueFull(
                f"the queue is full ({self.config.max_queue} runs waiting); retry later",
                retry_after=self._retry_hint(),
            )
        run_id = new_run_id()
        done = trio.Event()
        if pending_key is not None:
            self._pending_keys[pending_key] = done
        self._submitting += 1
        try:
            await self.journal.commit(run_id, E.SUBMITTED, spec_to_data(spec))
        except JournalWriteError as exc:
            raise StorageUnavailable(f"could not record the run durably: {exc}") from exc
        except JournalClosed:
            raise EngineClosed("the engine is shutting down") from None
        finally:
            self._submitting -= 1
            if pending_key is not None:
                del self._pending_keys[pending_key]
            done.set()
        return _snapshot(self.state.runs[run_id]), False

    def _retry_hint(self) -> float:
        return 1.0

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
        status = Status(status) if status is not None else None
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
        """Wait until the run is finished (or `timeout` passes); return it either way."""
        run = self._visible(run_id, tenant)
        if not run.finished:
            event = self._finished_events.get(run_id)
            if event is None:
                event = self._finished_events[run_id] = trio.Event()
            with trio.move_on_after(timeout if timeout is not None else math.inf):
                await event.wait()
        return self.get(run_id, tenant=tenant)

    async def events(
        self, run_id: str, after_seq: int = 0, *, tenant: str | None = None
    ) -> builtins.list[Event]:
        """The run's committed events after `after_seq`, oldest first."""
        self._visible(run_id, tenant)
        return await self._read_history(run_id, after_seq)

    async def _read_history(self, run_id: str, after_seq: int) -> builtins.list[Event]:
        if self.config.durability == "memory":
            return self.journal.history(run_id, after_seq)
        return await trio.to_thread.run_sync(self.journal.history, run_id, after_seq)

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
        """Cancel a run. A queued run is cancelled at once; a running one is stopped for real
        (its runner cancelled, its process gone) and then recorded as cancelled; this waits
        up to `wait` seconds (default `cancel_wait_s`) for that. Raises `AlreadyFinished`."""
        run = self._visible(run_id, tenant)
        if run.finished:
            raise AlreadyFinished(run_id, run.status.value)
        wait = self.config.cancel_wait_s if wait is None else wait
        inflight = self._cancelling.get(run_id)
        if inflight is not None:
            await inflight.wait()
        else:
            done = self._cancelling[run_id] = trio.Event()
            try:
                await self._cancel(run, reason, wait)
            finally:
                del self._cancelling[run_id]
                done.set()
        run = self._visible(run_id, tenant)
        if run.finished and run.status is not Status.CANCELLED:
            raise AlreadyFinished(run_id, run.status.value)
        return _snapshot(run)

    async def _cancel(self, run: Run, reason: str, wait: float) -> None:
        sup = self.supervisor
        deadline = trio.current_time() + wait
        while not run.finished:
            if sup.take_queued(run.id):
                try:
                    await self.journal.commit(run.id, E.CANCELLED, {"reason": reason})
                except JournalWriteError as exc:
                    sup.put_back(run)
                    raise StorageUnavailable(f"could not record the cancel durably: {exc}") from exc
                except JournalClosed:
                    raise EngineClosed("the engine is shutting down") from None
                return
            msg = sup.send_cancel(run.id, reason)
            if msg is not None:
                await msg.acked.wait()
                if run.id in sup.actors:
                    remaining = deadline - trio.current_time()
                    await self.wait(run.id, timeout=max(0.0, remaining), tenant=run.spec.tenant)
                    return
            # in between owners (an actor starting up or just done): look again shortly
            if trio.current_time() >= deadline:
                return
            await trio.sleep(0.005)

    async def delete(self, run_id: str, *, tenant: str | None = None) -> None:
        """Forget a finished run (its result and history). Raises `NotFinished` otherwise."""
        run = self._visible(run_id, tenant)
        if not run.finished:
            raise NotFinished(run_id, run.status.value)
        self._gone.add(run_id)
        try:
            await self.journal.commit(run_id, E.DELETED, {})
        except JournalWriteError as exc:
            self._gone.discard(run_id)
            raise StorageUnavailable(f"could not record the delete durably: {exc}") from exc
        except JournalClosed:
            self._gone.discard(run_id)
            raise EngineClosed("the engine is shutting down") from None

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


@asynccontextmanager
async def open_engine(
    data_dir: Path | str | None = None,
    *,
    runners: Mapping[str, Runner] | None = None,
    default_runner: str | None = None,
    wall_clock: Callable[[], float] = time.time,
    config: EngineConfig | None = None,
    **options: Any,
) -> AsyncIterator[Engine]:
    """Open (replaying its journal) and run an engine for the duration of the block.

    `options` are `EngineConfig` fields (`max_concurrency=4, durability="os"`, ...). On
    leaving the block the engine stops admitting, gives running runs `grace_period_s` to
    finish, then stops the rest and records them so that the next open resumes them.
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
    )
    engine._replay()
    try:
        async with trio.open_nursery() as nursery:
            journal_done = trio.Event()

            async def run_journal(*, task_status: trio.TaskStatus[None]) -> None:
                try:
                    await engine.journal.run(task_status=task_status)
                finally:
                    journal_done.set()

            await nursery.start(run_journal)
            await nursery.start(engine.supervisor.run)
            await engine._recover()
            engine.accepting = True
            try:
                yield engine
            finally:
                engine.accepting = False
                with trio.CancelScope(shield=True) as scope:
                    scope.deadline = trio.current_time() + config.grace_period_s + 30.0
                    await engine.supervisor.stop(config.grace_period_s)
                    await engine.journal.aclose()
                    await journal_done.wait()
                nursery.cancel_scope.cancel()
    finally:
        engine.journal.close_files()
        for runner in engine.runners.values():
            aclose = getattr(runner, "aclose", None)
            if aclose is not None:
                with trio.CancelScope(shield=True):
                    await aclose()
