"""The supervisor: the admission queue, concurrency limits, timers, and the actors' nursery.

Queued runs are data, not tasks: a heap ordered by (higher priority first, then submission
order), plus a heap of runs waiting out a retry backoff and a heap of queue expiries. A run
becomes a task (an `Actor`) only when a slot is free, so 100k queued runs cost 100k small
tuples, not 100k coroutines.

Ownership is what keeps the journal consistent without locks. A queued run is owned by the
queue; `_start_ready` hands it to exactly one actor, which owns it until the commit of its
last event (terminal, `retrying` or `requeued`). That commit is the hand-back: the engine's
commit hook calls `release` *in the same synchronous step* that folds the event, before any
other task can see the run queued again, so a run is never owned by two actors, and a slot
is free exactly when the runner that used it has returned. Taking a run out of the queue
(`take_queued`) is the ownership transfer that lets a cancel or an expiry write the run's
terminal event without racing an actor.

Sessions under `session_concurrency`: a session's queued runs wait in a per-session heap
ordered by submission, and only its first runs (as many as the limit allows, counting those
running) are *admitted* into the global heap, where they compete by priority. So a
session's runs start strictly in submission order (a run waiting out a retry backoff keeps
its place at the head of its session), and a session with 10k waiting runs costs O(log n)
per start, not a rescan.
"""

from __future__ import annotations

import heapq
import logging
import math
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING

import attrs
import trio

from .actor import Actor, Cancel, Shutdown
from .journal import Journal, JournalClosed, JournalError, JournalWriteError
from .model import EventType, Run, Status
from .runners import Runner, SessionTurn
from .state import State, shrink_dict

if TYPE_CHECKING:
    from ._engine import EngineConfig

__all__ = ["Supervisor"]

log = logging.getLogger("agentjobs.supervisor")
E = EventType

Entry = tuple[int, int, str]  # (-priority, seq, run id); identity marks the live entry


_SessionKey = tuple[str | None, str]


def _session_key(run: Run) -> _SessionKey | None:
    """Whose session a run belongs to: session ids are chosen by clients, so the same id
    from two tenants names two sessions (each with its own `session_concurrency`)."""
    sid = run.spec.session_id
    return None if sid is None else (run.spec.tenant, sid)


@attrs.define(slots=True, eq=False)
class _Session:
    """Bookkeeping of one session under a per-session limit."""

    running: int = 0
    admitted: set[str] = attrs.Factory(set)  # run ids pushed into the global heap
    waiting: list[tuple[int, Entry]] = attrs.Factory(list)  # heap by seq; may hold stale


def _ignore(n: int) -> None:
    pass


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
        self._ready: list[Entry] = []  # heap of runs that may start now (may hold stale)
        self._queued: dict[str, Entry] = {}  # every live queued run -> its current entry
        self._dequeued = 0  # removals from `_queued` since it was last checked for shrinking
        self._delayed: list[tuple[float, int, str]] = []  # (not_before, seq, run id)
        self._expiry: list[tuple[float, str]] = []  # (expires at, run id)
        # keyed by (tenant, session id): two tenants may pick the same session id
        self._sessions: dict[_SessionKey, _Session] = {}
        self._start_times: deque[float] = deque(maxlen=64)  # trio times of recent starts
        self._hold: dict[str, float] = {}  # run id -> not before (a start that failed)
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._idle = trio.Event()
        self._idle.set()
        # payload bytes handed to the journal (see `_engine._GCTuning`); set by the engine
        self.note_bytes: Callable[[int], None] = _ignore
        # for runners that report from a worker thread (see `Actor._report_output`)
        self.thread = threading.get_ident()
        self.token: trio.lowlevel.TrioToken | None = None

    # -- queue -----------------------------------------------------------------------------

    @property
    def queued_count(self) -> int:
        return len(self._queued)

    @property
    def running_count(self) -> int:
        return len(self.actors)

    def _session_of(self, run: Run) -> _Session | None:
        """The run's session bookkeeping, if a per-session limit applies to it."""
        key = _session_key(run)
        if key is None or self.config.session_concurrency is None:
            return None
        session = self._sessions.get(key)
        if session is None:
            session = self._sessions[key] = _Session()
        return session

    def enqueue(self, run: Run, *, not_before: float | None = None) -> None:
        """A run is (again) queued. Called for every committed submitted/retrying/requeued,
        and for the queued runs found at start-up."""
        entry: Entry = (-run.spec.priority, run.seq, run.id)
        self._queued[run.id] = entry
        if not_before is None:
            not_before = run.not_before
        else:
            self._hold[run.id] = not_before
        delayed = not_before is not None and not_before > self.wall()
        if delayed:
            assert not_before is not None
            heapq.heappush(self._delayed, (not_before, run.seq, run.id))
        session = self._session_of(run)
        if session is not None:
            heapq.heappush(session.waiting, (run.seq, entry))
            self._admit(_session_key(run), session)  # type: ignore[arg-type]
        elif not delayed:
            heapq.heappush(self._ready, entry)
        if run.spec.ttl is not None and run.started_at is None:
            heapq.heappush(self._expiry, (run.created_at + run.spec.ttl, run.id))
        self._wakeup.set()

    def wake(self) -> None:
        """Look at the queue again (after admission was paused)."""
        self._wakeup.set()

    def retry_hint(self) -> float:
        """Seconds until a full queue likely has room: the recent time between starts
        (each start frees a queue place), at least 1 s and at most 60 s."""
        times = self._start_times
        if len(times) < 2:
            return 1.0
        interval = (trio.current_time() - times[0]) / len(times)
        return float(min(60, max(1, math.ceil(interval))))

    def _shrink_queue(self) -> None:
        """Give back the tables of `_queued`, `_hold` and `_sessions` once a burst has
        drained: a dict keeps its peak size otherwise (~40 bytes per run of the largest
        queue ever seen)."""
        self._dequeued = 0
        shrink_dict(self._queued)
        shrink_dict(self._hold)
        shrink_dict(self._sessions)

    def take_queued(self, run_id: str) -> bool:
        """Take a queued run out of the queue (for cancel/expiry). False if it is not queued."""
        if self._queued.pop(run_id, None) is None:
            return False
        self._dequeued += 1
        if self._hold:
            self._hold.pop(run_id, None)
        run = self.state.runs.get(run_id)
        key = _session_key(run) if run is not None else None
        if key is not None:
            session = self._sessions.get(key)
            if session is not None:
                session.admitted.discard(run_id)
                self._admit(key, session)
        return True

    def put_back(self, run: Run) -> None:
        """Undo `take_queued` after the caller failed to record what it meant to."""
        if run.status is Status.QUEUED and run.id not in self._queued:
            self.enqueue(run)

    def _admit(self, key: _SessionKey, session: _Session) -> None:
        """Move the session's next runs, in submission order, into the global heap."""
        limit = self.config.session_concurrency
        assert limit is not None
        waiting = session.waiting
        queued = self._queued
        now: float | None = None
        while waiting and session.running + len(session.admitted) < limit:
            entry = waiting[0][1]
            run_id = entry[2]
            if queued.get(run_id) is not entry:
                heapq.heappop(waiting)  # cancelled, expired or started under a newer entry
                continue
            not_before = self._hold.get(run_id, self.state.runs[run_id].not_before)
            if not_before is not None:
                if now is None:
                    now = self.wall()
                if not_before > now:
                    break  # the head waits out its backoff; the rest of the session waits too
            heapq.heappop(waiting)
            session.admitted.add(run_id)
            heapq.heappush(self._ready, entry)
            self._wakeup.set()
        if not waiting and not session.admitted and session.running == 0:
            self._sessions.pop(key, None)

    # -- scheduling ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The scheduling loop; actors live in its nursery, so none outlives it."""
        self.thread = threading.get_ident()
        self.token = trio.lowlevel.current_trio_token()
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
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, _, run_id = heapq.heappop(delayed)
            entry = self._queued.get(run_id)
            if entry is None:
                continue
            key = _session_key(self.state.runs[run_id])
            if key is not None and self.config.session_concurrency is not None:
                session = self._sessions.get(key)
                if session is not None:
                    self._admit(key, session)
            else:
                heapq.heappush(self._ready, entry)
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            _, run_id = heapq.heappop(expiry)
            expiring = self.state.runs.get(run_id)
            if (
                expiring is not None
                and expiring.status is Status.QUEUED
                and expiring.started_at is None
                and self.take_queued(run_id)
            ):
                assert self._nursery is not None
                self._nursery.start_soon(self._expire, expiring)
        if self.admitting:
            self._start_ready()
        next_at = min(
            delayed[0][0] if delayed else math.inf,
            expiry[0][0] if expiry else math.inf,
        )
        if next_at == math.inf:
            return math.inf
        return trio.current_time() + max(0.0, next_at - now)

    def _start_ready(self) -> None:
        limit = self.config.max_concurrency
        ready = self._ready
        queued = self._queued
        runs = self.state.runs
        while ready and len(self.actors) < limit:
            entry = heapq.heappop(ready)
            run_id = entry[2]
            if queued.get(run_id) is not entry:
                continue  # cancelled, expired, or re-queued under a newer entry
            del queued[run_id]
            self._dequeued += 1
            if self._hold:
                self._hold.pop(run_id, None)
            run = runs[run_id]
            session = self._session_of(run)
            if session is not None:
                session.admitted.discard(run_id)
                session.running += 1
            self._start(run)
        if self._dequeued >= 4096 or (self._dequeued and not queued):
            self._shrink_queue()  # O(1) unless a dict is mostly empty space

    def _start(self, run: Run) -> None:
        name = run.spec.runner or self.default_runner
        runner = self.runners.get(name)
        assert self._nursery is not None
        if runner is None:
            self._release_session(run)
            self._nursery.start_soon(
                self._fail_queued,
                run,
                f"runner {name!r} is not configured on this server",
                "error",
            )
            return
        try:
            # Appended here rather than by the actor, so the journal orders starts exactly
            # as the queue decided (actors begin in whatever order trio schedules them).
            started = self.journal.append(run.id, E.STARTED, {"attempt": run.attempt + 1})
        except JournalError as exc:
            log.warning("run %s: could not record start (%s); it stays queued", run.id, exc)
            self._release_session(run)
            if not isinstance(exc, JournalClosed):
                self.enqueue(run, not_before=self.wall() + 1.0)
            return
        actor = Actor(self, run, runner, started)
        self.actors[run.id] = actor
        self.started_total += 1
        self._start_times.append(trio.current_time())
        if len(self.actors) > self.peak_running:
            self.peak_running = len(self.actors)
        if self._idle.is_set():
            self._idle = trio.Event()
        self._nursery.start_soon(actor.main)

    def _release_session(self, run: Run) -> None:
        key = _session_key(run)
        if key is None or self.config.session_concurrency is None:
            return
        session = self._sessions.get(key)
        if session is None:  # pragma: no cover - a start always created it
            return
        session.running -= 1
        self._admit(key, session)

    def release(self, run_id: str) -> None:
        """The run's actor has recorded its last event: free its slot (from the commit hook)."""
        actor = self.actors.pop(run_id, None)
        if actor is not None:
            actor.released = True
            self._released(actor)

    def actor_done(self, actor: Actor) -> None:
        """The actor's task is ending; release it if its last commit did not (journal gone)."""
        if self.actors.get(actor.run_id) is actor:
            del self.actors[actor.run_id]
            actor.released = True
            self._released(actor)

    def _released(self, actor: Actor) -> None:
        self._release_session(actor.run)
        if not self.actors:
            self._idle.set()
        self._wakeup.set()

    def actor_failed_to_start(self, actor: Actor) -> None:
        """`started` could not be recorded: the run is still queued; try it again later."""
        self.actor_done(actor)
        run = actor.run
        if run.status is Status.QUEUED and run.id not in self._queued:
            self.enqueue(run, not_before=self.wall() + 1.0)

    async def _expire(self, run: Run) -> None:
        await self._fail_queued(
            run, f"expired after waiting {run.spec.ttl:g}s in the queue", "expired"
        )

    async def _fail_queued(self, run: Run, error: str, kind: str) -> None:
        """Record the failure of a run taken out of the queue (we own it meanwhile)."""
        try:
            await self.journal.commit(run.id, E.FAILED, {"error": error, "kind": kind})
        except (JournalWriteError, JournalClosed) as exc:
            log.error("run %s: could not record failure (%s); it stays queued", run.id, exc)
            self.put_back(run)

    # -- talking to actors -------------------------------------------------------------

    def spawn(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Start a helper task (an actor's mailbox listener or flusher) in our nursery."""
        assert self._nursery is not None
        self._nursery.start_soon(fn)

    def send_cancel(self, run_id: str, reason: str) -> Cancel | None:
        """Ask a running run's actor to cancel. None if no actor runs it."""
        actor = self.actors.get(run_id)
        if actor is None:
            return None
        return actor.post_cancel(reason)

    async def stop(self, grace: float) -> None:
        """Stop admitting; give actors `grace` seconds, then requeue the rest and stop."""
        self.admitting = False
        if self.actors:
            with trio.move_on_after(grace):
                await self._idle.wait()
        for actor in list(self.actors.values()):
            actor.post_shutdown(Shutdown())
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
