"""A hypothesis state machine over the whole engine: submit, cancel, delete, let time pass,
finish scripted runs, crash (cutting the journal anywhere in its unsynced tail), restart.

How it runs. The engine lives in a trio run on its own thread, under a `MockClock` whose
autojump is *off* between steps, so nothing happens while hypothesis decides the next
one. Each rule is sent across (`Portal.call`), runs with autojump on, and returns only
once every task in the engine is blocked again (`wait_all_tasks_blocked` with autojump
off). Journal IO runs inline (`inline_threads`) and fsyncs are recorded rather than done
(`TrackingHooks`); trio's scheduler is seeded by hypothesis; durations are uneven so that
no two timers tie (trio breaks ties by memory address); a crash keeps a number of whole
unsynced lines (not a byte count, which would depend on how long the numbers in them
are). So a program replays identically and shrinks well. Invariants are checked on the
live engine after every step (and some, through a commit hook, at every commit):

* an acknowledged run (submit returned) is never lost, and keeps its spec;
* a terminal status never changes; an acknowledged cancel holds;
* replaying the journal from scratch gives exactly the live state;
* the supervisor's queue and actors are exactly the queued and running runs;
* never more runs executing than `max_concurrency`, nor a session's than its limit;
* no run executed by two actors at once, and no terminal event while its runner runs;
* at the end, with every runner released, every run reaches a terminal state.

`HYPOTHESIS_PROFILE=long` runs many more and longer programs.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import attrs
import hypothesis.strategies as st
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, event, settings
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from test_engine_support import (
    Scripted,
    TrackingHooks,
    inline_threads,
    last_segment,
    normalise,
    replay_dir,
    wall,
    watch_terminals,
)

from agentjobs import (
    AlreadyFinished,
    Engine,
    IdempotencyConflict,
    NotFinished,
    Status,
    open_engine,
)
from agentjobs.engine import EngineConfig
from agentjobs.engine.model import TERMINAL
from agentjobs.engine.runners import EchoRunner
from agentjobs.engine.state import spec_to_data

T = TypeVar("T")

LONG = os.environ.get("HYPOTHESIS_PROFILE") == "long"
BASE_CONFIG = EngineConfig(
    durability="fsync",
    max_concurrency=2,
    session_concurrency=1,
    retry_base_s=1.0,
    retry_max_s=8.0,
    grace_period_s=2.003,
    cancel_wait_s=5.011,
)

# Durations are deliberately uneven: two trio timers due at exactly the same instant fire
# in an order that depends on memory addresses (trio breaks deadline ties by `id()`), which
# would make a program behave differently when hypothesis replays it.
BEHAVIOURS = st.sampled_from(
    [
        {"do": "ok"},
        {"do": "fail"},
        {"do": "boom"},
        {"do": "retry"},
        {"do": "retry"},
        {"do": "flaky", "fails": 1},
        {"do": "flaky", "fails": 2, "s": 0.503},
        {"do": "hang"},
        {"do": "stubborn", "cleanup_s": 3.011},
        {"do": "stubborn", "cleanup_s": 45.013},  # outlasts a graceful stop (~2 s + 30 s)
        {"do": "stubborn", "cleanup_s": 45.013},
        {"do": "gate"},
        {"do": "gate"},
        {"do": "sleep", "s": 2.017},
        {"do": "output", "n": 5, "every": 0.301},
    ]
)


class Portal:
    """A trio run on a thread of its own, hosting the engine across restarts and crashes."""

    def __init__(self, data_dir: Path, config: EngineConfig) -> None:
        self.data_dir = data_dir
        self.config = config
        self.clock = trio.testing.MockClock()  # autojump off until a step runs
        self.hooks = TrackingHooks()
        self.runner = Scripted()
        self.engine: Engine | None = None
        self.violations: list[str] = []
        self.error: BaseException | None = None
        self.crash_cut: float | None = None  # set by `crash`: where to cut, as a fraction
        self._token: trio.lowlevel.TrioToken | None = None
        self._leave: trio.Event | None = None
        self.opens = 0  # how many times the engine has been opened
        self._reopened: trio.Event | None = None
        self._stopping = False
        self.bg: trio.Nursery | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        try:
            with inline_threads():
                trio.run(self._main, ready, clock=self.clock)
        except BaseException as exc:  # surfaced by the next `call`
            self.error = exc
            ready.set()

    async def _main(self, ready: threading.Event) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._host)
            while not self.opens:
                await trio.lowlevel.checkpoint()
            # hand over only once the engine has settled: a step that arrived while its
            # start-up tasks still ran would interleave with them differently each time
            await trio.testing.wait_all_tasks_blocked()
            ready.set()

    async def _host(self) -> None:
        """Open the engine, serve steps until asked to leave, close (or crash), repeat."""
        while not self._stopping:
            self._leave = trio.Event()
            async with open_engine(
                self.data_dir,
                runners={"s": self.runner, "echo": EchoRunner()},
                default_runner="s",
                wall_clock=wall,
                journal_hooks=self.hooks.io,
                config=self.config,
            ) as engine:
                self.engine = engine
                watch_terminals(engine, self.runner, into=self.violations)
                async with trio.open_nursery() as bg:
                    self.bg = bg
                    self.opens += 1
                    if self._reopened is not None:
                        self._reopened.set()
                    await self._leave.wait()
                    bg.cancel_scope.cancel()  # cancels still waiting are not acknowledged
            self.bg = None
            if self.crash_cut is not None:
                self._cut_journal(self.crash_cut)
                self.crash_cut = None
                self.hooks.dead = False

    def _cut_journal(self, frac: float) -> None:
        """Keep everything the last fsync covered, and an arbitrary part of the rest.

        `frac` picks how many whole unsynced lines survive, and at which byte the next one
        is torn (0: at its start), rather than one byte offset into the tail, so that its
        meaning does not shift with the lengths of the lines before the cut.
        """
        segment = last_segment(self.data_dir / "journal")
        data = segment.read_bytes()
        synced = self.hooks.synced_size(segment)
        assert synced <= len(data)
        lines = data[synced:].split(b"\n")[:-1]  # complete unsynced lines
        position = frac * (len(lines) + 1)
        keep = min(len(lines), int(position))
        cut = synced + sum(len(line) + 1 for line in lines[:keep])
        if keep < len(lines):
            cut += int((position - keep) * len(lines[keep]))  # tear the next line there
        with open(segment, "r+b") as f:
            f.truncate(cut)
        st_ = segment.stat()
        self.hooks.synced[st_.st_dev, st_.st_ino] = cut  # what survived is on disk now

    def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run one step in the trio thread; return once every engine task is blocked."""
        if self.error is not None:
            raise self.error

        async def step() -> T:
            self.clock.autojump_threshold = 0
            try:
                return await fn()
            finally:
                self.clock.autojump_threshold = math.inf
                await trio.testing.wait_all_tasks_blocked()

        assert self._token is not None
        try:
            return trio.from_thread.run(step, trio_token=self._token)
        except trio.RunFinishedError:
            raise self.error or RuntimeError("the engine's trio run ended") from None

    async def reopen(self, crash_cut: float | None) -> None:
        """Leave the engine (gracefully, or by crashing) and wait until it is open again."""
        assert self.engine is not None and self._leave is not None
        self._reopened = reopened = trio.Event()
        if crash_cut is not None:
            self.crash_cut = crash_cut
            self.hooks.dead = True  # from now on nothing more reaches the disk for sure
            self.engine._abort()
        else:
            self._leave.set()
        await reopened.wait()

    def close(self) -> None:
        if self.error is None and self._token is not None and self._thread.is_alive():

            async def stop() -> None:
                self._stopping = True
                assert self._leave is not None
                self._leave.set()

            trio.from_thread.run(stop, trio_token=self._token)
        self._thread.join(timeout=60)


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self._tmp: Any = None
        self._portal: Portal | None = None
        self.config = BASE_CONFIG
        self.acked: list[str] = []  # run ids, in acknowledgement order
        self.specs: dict[str, dict[str, Any]] = {}
        self.deleted: set[str] = set()
        self.terminal: dict[str, Status] = {}
        self.cancel_acked: set[str] = set()
        self.crashes = 0

    @initialize(
        max_concurrency=st.integers(1, 3),
        session_concurrency=st.sampled_from([None, 1, 2]),
        # zero backoff: a retried run is queued again in the very commit that frees its
        # slot, the tightest hand-back there is
        retry_base_s=st.sampled_from([0.0, 1.0]),
    )
    def open(
        self, max_concurrency: int, session_concurrency: int | None, retry_base_s: float
    ) -> None:
        import tempfile

        self.config = attrs.evolve(
            BASE_CONFIG,
            max_concurrency=max_concurrency,
            session_concurrency=session_concurrency,
            retry_base_s=retry_base_s,
        )
        self._tmp = tempfile.TemporaryDirectory(prefix="agentjobs-stateful-")
        self._portal = Portal(Path(self._tmp.name), self.config)

    @property
    def portal(self) -> Portal:
        assert self._portal is not None
        return self._portal

    @property
    def engine(self) -> Engine:
        assert self.portal.engine is not None
        return self.portal.engine

    def live(self) -> list[str]:
        return [r for r in self.acked if r not in self.deleted]

    def _remember(self, run_id: str, spec: dict[str, Any]) -> None:
        if run_id not in self.specs:
            self.acked.append(run_id)
            self.specs[run_id] = spec

    # -- rules ------------------------------------------------------------------------------

    @rule(
        behaviour=BEHAVIOURS,
        session=st.sampled_from([None, None, "a", "b"]),
        priority=st.integers(0, 2),
        max_attempts=st.integers(1, 3),
        ttl=st.sampled_from([None, None, 3.007, 10.009]),
        timeout=st.sampled_from([None, None, 4.019]),
        key=st.sampled_from([None, None, None, "k1", "k2"]),
        prompt=st.sampled_from(["p", "q"]),
    )
    def submit(
        self,
        behaviour: dict[str, Any],
        session: str | None,
        priority: int,
        max_attempts: int,
        ttl: float | None,
        timeout: float | None,
        key: str | None,
        prompt: str,
    ) -> None:
        async def go() -> None:
            engine = self.engine
            spec = engine.make_spec(
                prompt,
                config=behaviour,
                session_id=session,
                priority=priority,
                max_attempts=max_attempts,
                ttl=ttl,
                timeout=timeout,
                idempotency_key=key,
            )
            try:
                run, replayed = await engine.submit_spec(spec)
            except IdempotencyConflict as exc:
                assert key is not None and exc.run_id in self.specs
                return
            if replayed:
                assert run.id in self.specs
                assert self.specs[run.id]["idempotency_key"] == key
            self._remember(run.id, spec_to_data(run.spec))

        self.portal.call(go)

    @rule(n=st.integers(2, 6), behaviour=BEHAVIOURS, session=st.sampled_from([None, "a"]))
    def burst(self, n: int, behaviour: dict[str, Any], session: str | None) -> None:
        """Concurrent submits: they share group commits."""

        async def go() -> None:
            async def one(i: int) -> None:
                run = await self.engine.submit(f"burst {i}", config=behaviour, session_id=session)
                self._remember(run.id, spec_to_data(run.spec))

            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, i)

        self.portal.call(go)

    @precondition(lambda self: self.live())
    @rule(index=st.integers(0, 10_000), wait=st.sampled_from([0.0, 0.0, 1.031, 29.989]))
    def cancel(self, index: int, wait: float) -> None:
        """Start a cancel in the background; it is acknowledged if and when it returns."""
        live = self.live()
        rid = live[index % len(live)]

        async def go() -> None:
            async def cancel() -> None:
                try:
                    run = await self.engine.cancel(rid, wait=wait)
                except AlreadyFinished:
                    return
                assert run.status is Status.CANCELLED or run.cancel_requested
                self.cancel_acked.add(rid)

            assert self.portal.bg is not None
            self.portal.bg.start_soon(cancel)

        self.portal.call(go)

    @precondition(lambda self: self.running())
    @rule(index=st.integers(0, 10_000), wait=st.sampled_from([0.0, 1.031, 29.989]))
    def cancel_running(self, index: int, wait: float) -> None:
        """The interesting cancels: of a run being executed (often a stubborn one)."""
        running = self.running()
        self.cancel(self.live().index(running[index % len(running)]), wait)

    def running(self) -> list[str]:
        runs = self.engine.state.runs
        return [r for r in self.live() if runs[r].status is Status.RUNNING]

    @precondition(lambda self: self.live())
    @rule(index=st.integers(0, 10_000))
    def delete(self, index: int) -> None:
        live = self.live()
        rid = live[index % len(live)]

        async def go() -> None:
            try:
                await self.engine.delete(rid)
            except NotFinished:
                assert not self.engine.get(rid).finished
                return
            self.deleted.add(rid)

        self.portal.call(go)

    @rule(seconds=st.sampled_from([0.097, 0.509, 1.013, 2.531, 5.023, 12.041]))
    def advance(self, seconds: float) -> None:
        async def go() -> None:
            await trio.sleep(seconds)

        self.portal.call(go)

    @rule(
        index=st.integers(0, 10_000),
        outcome=st.sampled_from(["ok", "ok", "fail", "retry", "boom", "value"]),
    )
    def finish(self, index: int, outcome: str) -> None:
        """Let one run waiting at its gate end the way the test says."""
        waiting = [r for r in self.acked if r in set(self.portal.runner.waiting())]
        if not waiting:
            return
        rid = waiting[index % len(waiting)]

        async def go() -> None:
            self.portal.runner.open(rid, outcome)

        self.portal.call(go)

    @rule(cut=st.floats(0.0, 1.0))
    def crash(self, cut: float) -> None:
        self.crashes += 1
        state = self.engine.state
        running = [state.runs[r] for r in state.by_status[Status.RUNNING]]
        event(f"crash with {min(len(running), 2)} running")
        if any(r.cancel_requested for r in running):
            event("crash while a cancel is being carried out")
        self.portal.call(lambda: self.portal.reopen(crash_cut=cut))
        self._after_reopen()

    @precondition(lambda self: self.running())
    @rule(index=st.integers(0, 10_000), cut=st.floats(0.0, 1.0))
    def cancel_running_then_crash(self, index: int, cut: float) -> None:
        """Crash while an acknowledged cancel is still being carried out (a stubborn runner
        takes its time to stop): the two rules in a row, made likely."""
        self.cancel_running(index, 0.0)
        self.crash(cut)

    @rule()
    def restart(self) -> None:
        self.portal.call(lambda: self.portal.reopen(crash_cut=None))
        self._after_reopen()

    def _after_reopen(self) -> None:
        # an acknowledged cancel of a run that was running is settled by recovery
        for rid in self.cancel_acked - self.deleted:
            assert self.engine.get(rid).status is Status.CANCELLED, rid

    # -- invariants ---------------------------------------------------------------------------

    @invariant()
    def acknowledged_runs_are_never_lost(self) -> None:
        state = self.engine.state
        for rid in self.live():
            run = state.runs.get(rid)
            assert run is not None, f"acknowledged run {rid} is lost"
            assert spec_to_data(run.spec) == self.specs[rid]
        for rid in self.deleted:
            assert rid not in state.runs

    @invariant()
    def terminal_statuses_never_change(self) -> None:
        for rid in self.live():
            run = self.engine.state.runs[rid]
            seen = self.terminal.get(rid)
            if seen is not None:
                assert run.status is seen, f"{rid} went from {seen} to {run.status}"
            elif run.status in TERMINAL:
                self.terminal[rid] = run.status

    @invariant()
    def acknowledged_cancels_hold(self) -> None:
        for rid in self.cancel_acked - self.deleted:
            run = self.engine.state.runs[rid]
            assert run.status is Status.CANCELLED or (
                run.status is Status.RUNNING and run.cancel_requested
            ), (rid, run.status)

    @invariant()
    def replayed_state_equals_live_state(self) -> None:
        state = self.engine.state
        replayed = replay_dir(self.portal.data_dir / "journal", upto=state.last_seq)
        assert normalise(replayed) == normalise(state)

    @invariant()
    def supervisor_agrees_with_state(self) -> None:
        state = self.engine.state
        sup = self.engine.supervisor
        assert set(sup._queued) == set(state.by_status[Status.QUEUED])
        assert set(sup.actors) == set(state.by_status[Status.RUNNING])

    @invariant()
    def limits_hold_and_no_run_runs_twice(self) -> None:
        runner = self.portal.runner
        assert len(self.engine.supervisor.actors) <= self.config.max_concurrency
        assert runner.max_running <= self.config.max_concurrency
        assert runner.max_session <= (self.config.session_concurrency or math.inf)
        assert runner.double == []
        assert self.portal.violations == []

    # -- the end ------------------------------------------------------------------------------

    def teardown(self) -> None:
        if self._portal is None:
            return
        try:
            if self.portal.error is None and self.portal.engine is not None:
                self._everything_finishes()
        finally:
            self.portal.close()
            self._tmp.cleanup()

    def _everything_finishes(self) -> None:
        async def go() -> None:
            self.portal.runner.release_all()
            engine = self.engine
            with trio.fail_after(3600):
                while not all(engine.state.runs[r].finished for r in self.live()):  # noqa: ASYNC110
                    await trio.sleep(1)

        self.portal.call(go)
        self.terminal_statuses_never_change()
        self.acknowledged_cancels_hold()
        self.replayed_state_equals_live_state()
        assert self.engine.supervisor.queued_count == 0
        assert self.engine.supervisor.running_count == 0


EngineMachine.TestCase.settings = settings(
    # a database of its own: examples saved while the engine code was different replay
    # inconsistently (the preconditions look at the engine), so it must be easy to clear
    database=DirectoryBasedExampleDatabase(
        Path(__file__).resolve().parent.parent / ".hypothesis" / "engine-stateful"
    ),
    max_examples=1000 if LONG else 100,
    stateful_step_count=60 if LONG else 30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestEngineStateful = EngineMachine.TestCase
