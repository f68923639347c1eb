"""Shared by the engine, supervisor, bus and property tests (no tests in here).

* `wall()`: a wall clock derived from trio's clock, so `MockClock(autojump_threshold=0)`
  moves journal timestamps, retry backoffs and expiries along with `trio.sleep`.
* `Scripted`: a runner whose behaviour per run is chosen by the test, through the run's
  `config["do"]`, and which watches the engine from the inside: how many runs execute at
  once (globally and per session), in which order they started, whether a run was ever
  executed twice at the same time, and whether it has really stopped.
* `watch_terminals(engine, runner)`: a commit hook that records a violation if a run's
  terminal event is committed while its runner is still executing.
* `normalise(state)`: a comparable picture of a `State` (runs and every index), for
  "replayed state equals live state".
* `read_journal(dir)`: the events on disk, parsed independently of the engine.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from agentjobs import Engine, Event, EventType, RunContext, RunError, open_engine
from agentjobs.engine._iothread import IOThread
from agentjobs.engine.journal import SEGMENT_RE, IOHooks, decode_line, event_from_obj
from agentjobs.engine.runners import EchoRunner
from agentjobs.engine.state import State, apply

WALL0 = 1_800_000_000.0
E = EventType
TERMINAL_EVENTS = frozenset({E.SUCCEEDED, E.FAILED, E.CANCELLED})


def wall() -> float:
    """Wall-clock seconds that follow trio's (mock) clock."""
    return WALL0 + trio.current_time()


@attrs.define(eq=False)
class Gate:
    """A run waiting for the test to say how it ends."""

    event: trio.Event = attrs.Factory(trio.Event)
    outcome: str = "ok"


class Scripted:
    """A runner driven by `config["do"]`:

    * `ok` (default): return the prompt. `sleep`: sleep `config["s"]` seconds, then `ok`.
    * `fail`: `RunError` (not retryable). `retry`: `RunError(retryable=True)`, with
      `config["retry_after"]` if given. `flaky`: retryable failure for the first
      `config["fails"]` attempts (each after sleeping `config["s"]`, if given), then `ok`.
      `boom`: a plain `ValueError`.
    * `hang`: wait until cancelled. `stubborn`: like hang, but once cancelled it takes
      `config["cleanup_s"]` (shielded) to stop, like a process ignoring SIGTERM.
    * `gate`: wait until the test calls `open(run_id, outcome)`; outcome is any of the above.
    * `output`: emit `config["n"]` chunks, sleeping `config["every"]` between them.
    * `value`: return `config["value"]`. `unencodable`: return an `object()`.

    After `release_all()`, `hang`/`gate`/`stubborn` runs (waiting or future) return at once.
    """

    def __init__(self) -> None:
        self.running: Counter[str] = Counter()
        self.sessions: Counter[str] = Counter()
        self.max_running = 0
        self.max_session = 0
        self.started: list[str] = []  # run ids, in start order (one entry per attempt)
        self.attempts: Counter[str] = Counter()
        self.double: list[str] = []  # runs seen executing twice at once: must stay empty
        self.cancelled: list[str] = []  # runs whose runner saw trio cancellation
        self.stopped: list[str] = []  # runs whose runner has finished (any way)
        self.gates: dict[str, Gate] = {}
        self.released = False
        self._release = trio.Event()

    def release_all(self) -> None:
        self.released = True
        self._release.set()
        for gate in self.gates.values():
            gate.outcome = "ok"
            gate.event.set()

    def open(self, run_id: str, outcome: str = "ok") -> None:
        gate = self.gates[run_id]
        gate.outcome = outcome
        gate.event.set()

    def waiting(self) -> list[str]:
        return [r for r, g in self.gates.items() if not g.event.is_set()]

    async def run(self, ctx: RunContext) -> Any:
        rid = ctx.run_id
        if self.running[rid]:
            self.double.append(rid)
        self.running[rid] += 1
        self.max_running = max(self.max_running, sum(1 for v in self.running.values() if v))
        if ctx.session_id is not None:
            self.sessions[ctx.session_id] += 1
            self.max_session = max(self.max_session, self.sessions[ctx.session_id])
        self.started.append(rid)
        self.attempts[rid] += 1
        try:
            return await self._behave(ctx, ctx.config.get("do", "ok"))
        except trio.Cancelled:
            self.cancelled.append(rid)
            raise
        finally:
            self.running[rid] -= 1
            if not self.running[rid]:
                del self.running[rid]
            if ctx.session_id is not None:
                self.sessions[ctx.session_id] -= 1
            self.stopped.append(rid)

    async def _behave(self, ctx: RunContext, do: str) -> Any:
        cfg = ctx.config
        if do == "ok":
            return ctx.prompt
        if do == "sleep":
            await trio.sleep(cfg.get("s", 1.0))
            return ctx.prompt
        if do == "fail":
            raise RunError("scripted failure")
        if do == "retry":
            raise RunError("try again", retryable=True, retry_after=cfg.get("retry_after"))
        if do == "flaky":
            if cfg.get("s"):
                await trio.sleep(cfg["s"])
            if ctx.attempt <= cfg.get("fails", 1):
                raise RunError(f"flaky attempt {ctx.attempt}", retryable=True)
            return ctx.prompt
        if do == "boom":
            raise ValueError("boom")
        if do in ("hang", "stubborn"):
            if self.released:
                return ctx.prompt
            try:
                await self._release.wait()
            except trio.Cancelled:
                if do == "stubborn":
                    with trio.CancelScope(shield=True):
                        await trio.sleep(cfg.get("cleanup_s", 1.0))
                raise
            return ctx.prompt
        if do == "gate":
            if self.released:
                return ctx.prompt
            gate = self.gates[ctx.run_id] = Gate()
            await gate.event.wait()
            del self.gates[ctx.run_id]
            return await self._behave(ctx, gate.outcome)
        if do == "output":
            for i in range(cfg.get("n", 10)):
                ctx.output(f"<{i}>")
                if cfg.get("every"):
                    await trio.sleep(cfg["every"])
            return ctx.prompt
        if do == "value":
            return cfg.get("value")
        if do == "unencodable":
            return object()
        raise AssertionError(f"unknown behaviour {do!r}")


def watch_terminals(engine: Engine, runner: Scripted, into: list[str] | None = None) -> list[str]:
    """A commit hook checking, at every commit, what must hold at every instant:

    * no terminal event is committed while the run's runner is still executing;
    * a committed `started` belongs to an actor the supervisor has registered;
    * every run whose runner is executing is registered (no actor runs unseen by cancel
      or by the concurrency limit), and no more are registered than the limit allows.

    Returns the list the violations are appended to (`into`, if given).
    """
    violations: list[str] = into if into is not None else []
    sup = engine.supervisor
    limit = engine.config.max_concurrency

    def hook(events: Sequence[Event]) -> None:
        for ev in events:
            if ev.type in TERMINAL_EVENTS and runner.running[ev.run]:
                violations.append(f"{ev.type.value} of {ev.run} while its runner ran")
            if ev.type is E.STARTED and ev.run not in sup.actors:
                violations.append(f"started of {ev.run} without a registered actor")
        unseen = [r for r, n in runner.running.items() if n and r not in sup.actors]
        if unseen:
            violations.append(f"runs executing without a registered actor: {unseen}")
        if len(sup.actors) > limit:
            violations.append(f"{len(sup.actors)} actors registered, limit {limit}")

    engine.add_commit_hook(hook)
    return violations


def normalise(state: State) -> dict[str, Any]:
    """Everything a `State` holds, as plain comparable data."""
    return {
        "runs": {rid: attrs.asdict(run, recurse=True) for rid, run in state.runs.items()},
        "order": [r.id for r in state.order if r.id in state.runs],
        "by_status": {s.value: sorted(ids) for s, ids in state.by_status.items()},
        "by_session": {k: sorted(v) for k, v in state.by_session.items() if v},
        "idempotency": sorted(
            (str(t), k, v) for (t, k), v in state.idempotency.items() if v in state.runs
        ),
        "last_seq": state.last_seq,
    }


def read_journal(directory: Path, *, upto: int | None = None) -> list[Event]:
    """Every intact event in the journal's segments (in order), parsed line by line here,
    not by the journal code under test. Stops at an incomplete last line."""
    events: list[Event] = []
    names = sorted(n for n in os.listdir(directory) if SEGMENT_RE.match(n))
    for name in names:
        data = (directory / name).read_bytes()
        for i, line in enumerate(data.split(b"\n")[:-1]):
            obj = decode_line(line)
            if i == 0:
                continue  # the header
            event = event_from_obj(obj)
            if upto is not None and event.seq > upto:
                return events
            events.append(event)
    return events


def replay_dir(directory: Path, *, upto: int | None = None) -> State:
    state = State()
    for ev in read_journal(directory, upto=upto):
        apply(state, ev)
    return state


class TrackingHooks:
    """Journal IO hooks that remember how much of each file the last fsync covered, so a
    test can cut a file anywhere in its unsynced tail (what a power loss may leave).

    `fsync` records instead of syncing (nothing here survives a real power cut anyway,
    and it keeps the tests fast); after `dead = True` (the simulated crash) it records
    nothing more.
    """

    def __init__(self) -> None:
        self.synced: dict[tuple[int, int], int] = {}
        self.dead = False
        self.fsyncs = 0
        self._lock = threading.Lock()
        # what the journal gets (any hook not overridden here keeps its default);
        # bound lambdas, so that subclasses overriding `write`/`fsync` are honoured
        self.io = IOHooks(write=lambda fd, b: self.write(fd, b), fsync=lambda fd: self.fsync(fd))

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.dead:
            return
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            with self._lock:
                self.synced[st.st_dev, st.st_ino] = st.st_size
                self.fsyncs += 1

    def synced_size(self, path: Path) -> int:
        st = path.stat()
        return self.synced.get((st.st_dev, st.st_ino), 0)


def last_segment(directory: Path) -> Path:
    names = sorted(n for n in os.listdir(directory) if SEGMENT_RE.match(n))
    return directory / names[-1]


@contextlib.asynccontextmanager
async def scripted_engine(
    data_dir: Path | None = None, *, runner: Scripted | None = None, **options: Any
) -> AsyncIterator[tuple[Engine, Scripted]]:
    """An engine whose default runner is a `Scripted` (also `echo` is configured), with the
    wall clock following trio's and (with a data dir) `TrackingHooks` for the journal.
    Checks on the way out that no run was executed twice at once and that no terminal
    event was recorded while its runner still ran (see `watch_terminals`)."""
    runner = runner if runner is not None else Scripted()
    options.setdefault("durability", "memory" if data_dir is None else "fsync")
    with contextlib.ExitStack() as stack:
        if data_dir is not None:
            # Under an autojump MockClock, virtual time races ahead whenever every task
            # waits, including while the journal waits for its fsync thread (and a real
            # fsync can take seconds on a busy disk): record syncs instead of doing them,
            # and run the journal's thread work inline, so time moves only when we say.
            hooks = options.setdefault("journal_hooks", TrackingHooks())
            if isinstance(hooks, TrackingHooks):
                options["journal_hooks"] = hooks.io
            stack.enter_context(inline_threads())
        async with open_engine(
            data_dir,
            runners={"s": runner, "echo": EchoRunner()},
            default_runner="s",
            wall_clock=wall,
            **options,
        ) as engine:
            violations = watch_terminals(engine, runner)
            yield engine, runner
    assert not violations
    assert not runner.double


async def until(predicate: Callable[[], bool], timeout: float = 600.0) -> None:
    """Wait (in trio time) until `predicate()` holds."""
    with trio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110 - polling what has no event of its own
            await trio.sleep(0.01)


async def start_order(engine: Engine, ids: Sequence[str]) -> list[str]:
    """`ids` in the order of their first `started` event (the supervisor's decision; runners
    started in the same instant may begin executing in any order)."""
    first: dict[str, int] = {}
    for rid in ids:
        for ev in await engine.events(rid):
            if ev.type is E.STARTED:
                first[rid] = ev.seq
                break
    return sorted(first, key=first.__getitem__)


@contextlib.contextmanager
def inline_threads() -> Iterator[None]:
    """Make `trio.to_thread.run_sync` and the journal writer's own IO thread
    (`IOThread.run_sync`) run their function in the trio thread (after a checkpoint), so
    journal IO cannot let an autojump clock skip ahead."""
    real = trio.to_thread.run_sync
    real_io = IOThread.run_sync

    async def inline(fn: Callable[..., Any], *args: Any, **_: Any) -> Any:
        await trio.lowlevel.checkpoint()
        return fn(*args)

    async def inline_io(_self: IOThread, fn: Callable[..., Any], *args: Any) -> Any:
        return await inline(fn, *args)

    trio.to_thread.run_sync = inline  # type: ignore[assignment]
    IOThread.run_sync = inline_io  # type: ignore[method-assign]
    try:
        yield
    finally:
        trio.to_thread.run_sync = real
        IOThread.run_sync = real_io  # type: ignore[method-assign]
