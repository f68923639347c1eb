"""The supervisor: the admission queue, concurrency limits, timers, and the actors' nursery.

Queued runs are data, not tasks: a heap ordered by (higher priority first, then submission
order), plus a heap of runs waiting out a retry backoff and a heap of queue expiries. A run
becomes a task (an `Actor`) only when a slot is free, so 100k queued runs cost 100k small
tuples, not 100k coroutines.

The supervisor never writes a run's state directly: it learns that a run is queued from the
engine (which sees every committed `submitted` / `retrying` / `requeued` event) and it
hands a run to exactly one actor, which owns it until its terminal event. Taking a run out of
the queue (`take_queued`) is the ownership transfer that lets a cancel or an expiry write the
run's terminal event without racing an actor.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import trio

from .actor import Actor, Cancel, Shutdown
from .journal import Journal, JournalClosed, JournalWriteError
from .model import EventType, Run, Status
from .runners import Runner, SessionTurn
from .state import State

if TYPE_CHECKING:
    from ._engine import EngineConfig

__all__ = ["Supervisor"]

log = logging.getLogger("agentjobs.supervisor")
E = EventType

Entry = tuple[int, int, str]  # (-priority, seq, run id)


class Supervisor:
    def __init__(
        self,
        config: EngineConfig,
        journal: Journal,
        state: State,
        runners: Mapping[str, Runner],
        default_runner: str,
        wall: Callable[[], float],
    ) -> None:
        self.config = config
        self.journal = journal
        self.state = state
        self.runners = runners
        self.default_runner = default_runner
        self.wall = wall
        self.actors: dict[str, Actor] = {}
        self.admitting = True
        self.peak_running = 0
        self.started_total = 0
        self._ready: list[Entry] = []
        self._queued: dict[str, Entry] = {}  # live queued runs (ready, delayed or blocked)
        self._delayed: list[tuple[float, int, str]] = []  # (not_before, seq, run id)
        self._expiry: list[tuple[float, str]] = []  # (expires at, run id)
        self._blocked: dict[str, deque[Entry]] = {}  # session -> entries waiting for a slot
        self._session_running: Counter[str] = Counter()
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._idle = trio.Event()
        self._idle.set()

    # -- queue -----------------------------------------------------------------------------

    @property
    def queued_count(self) -> int:
        return len(self._queued)

    @property
    def running_count(self) -> int:
        return len(self.actors)

    def enqueue(self, run: Run) -> None:
        """A run is (again) queued. Called for every committed submitted/retrying/requeued."""
        entry: Entry = (-run.spec.priority, run.seq, run.id)
        self._queued[run.id] = entry
        if run.not_before is not None and run.not_before > self.wall():
            heapq.heappush(self._delayed, (run.not_before, run.seq, run.id))
        else:
            heapq.heappush(self._ready, entry)
        if run.spec.ttl is not None and run.attempt == 0:
            heapq.heappush(self._expiry, (run.created_at + run.spec.ttl, run.id))
        self._wakeup.set()

    def take_queued(self, run_id: str) -> bool:
        """Take a queued run out of the queue (for cancel/expiry). False if it is not queued."""
        return self._queued.pop(run_id, None) is not None

    def put_back(self, run: Run) -> None:
        """Undo `take_queued` after the caller failed to record what it meant to."""
        if run.status is Status.QUEUED and run.id not in self._queued:
            self.enqueue(run)

    # -- scheduling ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduling loop; actors live in its nursery, so none outlives it."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                self._wakeup = trio.Event()
                deadline = self._tick()
                with trio.move_on_at(deadline):
                    await self._wakeup.wait()

    def _tick(self) -> float:
        """Promote due timers, start what fits; return the trio deadline of the next timer."""
        now = self.wall()
        while self._delayed and self._delayed[0][0] <= now:
            _, _, run_id = heapq.heappop(self._delayed)
            entry = self._queued.get(run_id)
            if entry is not None:
                heapq.heappush(self._ready, entry)
        while self._expiry and self._expiry[0][0] <= now:
            _, run_id = heapq.heappop(self._expiry)
            run = self.state.runs.get(run_id)
            if run is not None and run.attempt == 0 and self.take_queued(run_id):
                assert self._nursery is not None
                self._nursery.start_soon(self._expire, run)
        if self.admitting:
            self._start_ready()
        next_at = min(
            self._delayed[0][0] if self._delayed else float("inf"),
            self._expiry[0][0] if self._expiry else float("inf"),
        )
        if next_at == float("inf"):
            return float("inf")
        return trio.current_time() + max(0.0, next_at - now)

    def _start_ready(self) -> None:
        limit = self.config.max_concurrency
        session_limit = self.config.session_concurrency
        ready = self._ready
        while ready and len(self.actors) < limit:
            entry = heapq.heappop(ready)
            run_id = entry[2]
            if self._queued.get(run_id) is not entry:
                continue  # cancelled, expired, or re-queued under a newer entry
            run = self.state.runs[run_id]
            session = run.spec.session_id
            if session_limit is not None and session is not None:
                if self._session_running[session] >= session_limit:
                    self._blocked.setdefault(session, deque()).append(entry)
                    continue
                self._session_running[session] += 1
            del self._queued[run_id]
            self._start(run)

    def _start(self, run: Run) -> None:
        name = run.spec.runner or self.default_runner
        runner = self.runners.get(name)
        assert self._nursery is not None
        if runner is None:
            self._nursery.start_soon(
                self._fail_queued,
                run,
                f"runner {name!r} is not configured on this server",
                "error",
            )
            self._release_session(run)
            return
        actor = Actor(self, run, runner)
        self.actors[run.id] = actor
        self.started_total += 1
        if len(self.actors) > self.peak_running:
            self.peak_running = len(self.actors)
        self._idle = trio.Event()
        self._nursery.start_soon(actor.main, name=f"actor {run.id}")

    def _release_session(self, run: Run) -> None:
        session = run.spec.session_id
        if session is None or self.config.session_concurrency is None:
            return
        self._session_running[session] -= 1
        if self._session_running[session] <= 0:
            del self._session_running[session]
        blocked = self._blocked.pop(session, None)
        if blocked:
            for entry in blocked:
                heapq.heappush(self._ready, entry)

    def actor_done(self, actor: Actor) -> None:
        self.actors.pop(actor.run_id, None)
        self._release_session(actor.run)
        if not self.actors:
            self._idle.set()
        self._wakeup.set()

    def actor_failed_to_start(self, actor: Actor) -> None:
        """`started` could not be recorded: the run is still queued; try it again later."""
        self.actor_done(actor)
        run = actor.run
        self._queued[run.id] = (-run.spec.priority, run.seq, run.id)
        heapq.heappush(self._delayed, (self.wall() + 1.0, run.seq, run.id))

    async def _expire(self, run: Run) -> None:
        await self._fail_queued(
            run, f"expired after waiting {run.spec.ttl:g}s in the queue", "expired"
        )

    async def _fail_queued(self, run: Run, error: str, kind: str) -> None:
        try:
            await self.journal.commit(run.id, E.FAILED, {"error": error, "kind": kind})
        except (JournalWriteError, JournalClosed) as exc:
            log.error("run %s: could not record failure (%s); it stays queued", run.id, exc)
            self.put_back(run)

    # -- talking to actors -------------------------------------------------------------

    def send_cancel(self, run_id: str, reason: str) -> Cancel | None:
        """Ask a running run's actor to cancel. None if no actor runs it."""
        actor = self.actors.get(run_id)
        if actor is None:
            return None
        msg = Cancel(reason)
        try:
            actor.mailbox_send.send_nowait(msg)
        except trio.WouldBlock:
            # the mailbox is full of earlier requests; one of them will do
            msg.acked.set()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            msg.acked.set()
        return msg

    async def stop(self, grace: float) -> None:
        """Stop admitting; give actors `grace` seconds, then requeue the rest and stop."""
        self.admitting = False
        if self.actors:
            with trio.move_on_after(grace):
                await self._idle.wait()
        for actor in list(self.actors.values()):
            try:
                actor.mailbox_send.send_nowait(Shutdown())
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                if actor._scope is not None:
                    actor._scope.cancel()
        if self.actors:
            await self._idle.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    # -- what runners may ask ------------------------------------------------------------

    def session_history(self, run: Run) -> list[SessionTurn]:
        sid = run.spec.session_id
        if sid is None:
            return []
        turns = []
        for rid in self.state.by_session.get(sid, {}):
            other = self.state.runs.get(rid)
            if other is None or other.seq >= run.seq or other.spec.tenant != run.spec.tenant:
                continue
            if other.status is Status.SUCCEEDED:
                turns.append(SessionTurn(prompt=other.spec.prompt, result=other.result))
        return turns
