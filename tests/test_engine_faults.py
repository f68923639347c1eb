"""The engine when the disk fails: nothing is acknowledged that is not durable, nothing
durable is forgotten, and the engine carries on once the disk is back."""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest
import trio
from test_engine_support import TrackingHooks, normalise, replay_dir, scripted_engine, until
from trio.testing import MockClock

from agentjobs import EventType, Status, StorageUnavailable, open_engine
from agentjobs.engine import _engine
from agentjobs.engine.journal import Durability, Journal, Ticket

E = EventType


class FailingHooks(TrackingHooks):
    """Writes and/or fsyncs fail with ENOSPC while the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_writes = False
        self.fail_writes_with: bytes | None = None  # only writes containing these bytes
        self.fail_fsyncs = False

    def write(self, fd: int, data: bytes) -> int:
        marker = self.fail_writes_with
        if self.fail_writes or (marker is not None and marker in bytes(data)):
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.fail_fsyncs:
            raise OSError(errno.EIO, "I/O error")
        super().fsync(fd)


async def test_a_submit_that_cannot_be_made_durable_is_refused(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hooks = FailingHooks()
    async with scripted_engine(tmp_path, journal_hooks=hooks) as (engine, _):
        hooks.fail_fsyncs = True
        with pytest.raises(StorageUnavailable):
            await engine.submit("x")
        assert engine.count() == 0
        hooks.fail_fsyncs = False
        run = await engine.submit("y")
        assert (await engine.wait(run.id)).status is Status.SUCCEEDED
        assert normalise(replay_dir(tmp_path / "journal")) == normalise(engine.state)


async def test_a_start_that_cannot_be_recorded_is_tried_again(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hooks = FailingHooks()
    async with scripted_engine(tmp_path, journal_hooks=hooks) as (engine, runner):
        hooks.fail_writes_with = b'"type":"started"'  # `started` is written without fsync
        run = await engine.submit("x")
        await trio.sleep(2.5)
        assert engine.get(run.id).status is Status.QUEUED and run.id not in runner.started
        assert engine.supervisor.queued_count == 1  # still queued, tried again each second
        hooks.fail_writes_with = None
        done = await engine.wait(run.id)
        assert (done.status, done.attempt) == (Status.SUCCEEDED, 1)
        types = [e.type for e in await engine.events(run.id)]
        assert types == [E.SUBMITTED, E.STARTED, E.SUCCEEDED]
        assert normalise(replay_dir(tmp_path / "journal")) == normalise(engine.state)


async def test_a_result_waits_for_the_disk_to_come_back(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hooks = FailingHooks()
    async with scripted_engine(tmp_path, journal_hooks=hooks) as (engine, runner):
        run = await engine.submit("x", config={"do": "gate"})
        await until(lambda: run.id in runner.waiting())
        hooks.fail_fsyncs = True
        runner.open(run.id)
        await trio.sleep(30)  # the actor keeps trying, with backoff
        assert engine.get(run.id).status is Status.RUNNING
        assert engine.supervisor.running_count == 1  # the slot stays taken meanwhile
        hooks.fail_fsyncs = False
        done = await engine.wait(run.id, timeout=10)
        assert done.status is Status.SUCCEEDED
        assert normalise(replay_dir(tmp_path / "journal")) == normalise(engine.state)


async def test_a_cancel_that_cannot_be_recorded_is_refused_and_changes_nothing(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hooks = FailingHooks()
    async with scripted_engine(tmp_path, journal_hooks=hooks, max_concurrency=1) as (
        engine,
        runner,
    ):
        running = await engine.submit("r", config={"do": "hang"})
        queued = await engine.submit("q")
        await until(lambda: running.id in runner.running)
        hooks.fail_fsyncs = True
        with pytest.raises(StorageUnavailable):
            await engine.cancel(queued.id)
        with pytest.raises(StorageUnavailable):
            await engine.cancel(running.id)
        assert engine.get(queued.id).status is Status.QUEUED
        got = engine.get(running.id)
        assert got.status is Status.RUNNING and not got.cancel_requested
        assert running.id in runner.running  # not stopped: the cancel was not acknowledged
        hooks.fail_fsyncs = False
        assert (await engine.cancel(queued.id)).status is Status.CANCELLED
        assert (await engine.cancel(running.id)).status is Status.CANCELLED


async def test_gc_tuning_is_applied_while_open_and_undone_after(autojump_clock: MockClock) -> None:
    before = gc.get_threshold()
    async with open_engine(None, durability="memory") as outer:
        assert gc.get_threshold()[0] == max(before[0], _engine._GCTuning.THRESHOLD0)
        async with open_engine(None, durability="memory"):
            pass
        assert gc.get_threshold()[0] == max(before[0], _engine._GCTuning.THRESHOLD0)
        await outer.submit("x")
    assert gc.get_threshold() == before
    async with open_engine(None, durability="memory", gc_tuning=False):
        assert gc.get_threshold() == before


@pytest.mark.parametrize("durability", ["os", "memory"])
async def test_committed_batches_are_freed_by_reference_counting(
    tmp_path: Path, durability: Durability
) -> None:
    """A batch and its tickets must not point at each other once the batch is committed
    (`_commit_batch` empties `batch.tickets`; a ticket keeps its batch for `done` and
    `error`): otherwise every batch, with its encoded lines and decoded event data,
    waits for the cyclic GC instead of being freed by reference counting."""
    journal = Journal(tmp_path / "journal" if durability != "memory" else None, durability)
    journal.open(lambda event: None)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            for i in range(20):
                await journal.commit("run_x", E.OUTPUT, {"text": "x" * 1000 + str(i)})
            gc.collect()
            leaked = [o for o in gc.garbage if isinstance(o, Ticket)]
        finally:
            gc.set_debug(0)
            gc.garbage.clear()
            gc.enable()
        await journal.aclose()
    assert leaked == []
