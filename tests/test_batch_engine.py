"""`Engine.submit_many`: a batch of submits in one group commit (issue 9).

What must hold: every new run of a batch lands in one journal batch (one write, one
fsync); a batch that cannot be made durable applies nothing; idempotency per item follows
`submit_spec` (replay, conflict, a key twice in one batch, a key a concurrent submit is
recording); capacity is all or nothing; and replaying the journal gives the live state.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from test_engine_support import (
    TrackingHooks,
    normalise,
    read_journal,
    replay_dir,
    scripted_engine,
)
from trio.testing import MockClock

from agentjobs import (
    EngineClosed,
    Event,
    EventType,
    IdempotencyConflict,
    NotFound,
    QueueFull,
    Run,
    Status,
    StorageUnavailable,
    SubmitOutcome,
    open_engine,
)
from agentjobs.engine.journal import IOHooks

E = EventType
SUBMITTED = b'"type":"submitted"'


class CountingHooks(TrackingHooks):
    """Counts the writes that carry `submitted` lines, and fsyncs; fails fsyncs on demand."""

    def __init__(self) -> None:
        super().__init__()
        self.submit_writes: list[int] = []  # submitted lines per write
        self.fail_fsyncs = False

    def write(self, fd: int, data: bytes) -> int:
        n = bytes(data).count(SUBMITTED)
        if n:
            self.submit_writes.append(n)
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.fail_fsyncs:
            raise OSError(errno.EIO, "I/O error")
        super().fsync(fd)


def _ids(outcomes: Sequence[SubmitOutcome]) -> list[str]:
    return [o.run.id for o in outcomes if o.run is not None]


async def test_a_batch_lands_in_one_write_and_one_fsync(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hooks = CountingHooks()
    async with scripted_engine(tmp_path, journal_hooks=hooks) as (engine, _):
        batches: list[list[Event]] = []
        engine.add_commit_hook(lambda events: batches.append(list(events)))
        engine.supervisor.admitting = False  # no `started` events mixed into the count
        specs = [engine.make_spec(f"p{i}", session_id=f"s{i % 3}") for i in range(300)]
        fsyncs = hooks.fsyncs
        outcomes = await engine.submit_many(specs)
        assert hooks.fsyncs == fsyncs + 1
        assert hooks.submit_writes == [300]
        submitted = [[e.run for e in b if e.type is E.SUBMITTED] for b in batches]
        assert [len(b) for b in submitted if b] == [300]
        ids = _ids(outcomes)
        assert submitted[0] == ids  # in the order given
        assert len(set(ids)) == 300
        assert all(not o.replayed and o.error is None and o.ok for o in outcomes)
        assert all(o.run is not None and o.run.status is Status.QUEUED for o in outcomes)
        assert [o.run.spec.prompt for o in outcomes if o.run is not None] == [
            f"p{i}" for i in range(300)
        ]
        assert engine.metrics.submitted_total == 300
        engine.supervisor.admitting = True
        engine.supervisor.wake()
        for rid in ids[:5]:
            assert (await engine.wait(rid)).status is Status.SUCCEEDED


async def test_a_batch_that_cannot_be_made_durable_applies_nothing(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    hooks = CountingHooks()
    async with scripted_engine(tmp_path, journal_hooks=hooks) as (engine, _):
        before = await engine.submit("before")
        await engine.wait(before.id)
        specs = [engine.make_spec(f"p{i}", idempotency_key=f"k{i}") for i in range(50)]
        hooks.fail_fsyncs = True
        with pytest.raises(StorageUnavailable):
            await engine.submit_many(specs)
        assert engine.count() == 1  # only `before`
        assert engine.stats()["queued"] == 0
        assert not engine._pending_keys and engine._submitting == 0
        hooks.fail_fsyncs = False
        # the keys were not taken by the failed batch: the same batch now creates the runs
        outcomes = await engine.submit_many(specs)
        assert not any(o.replayed for o in outcomes)
        assert engine.count() == 51
        live = normalise(engine.state)
        assert normalise(replay_dir(tmp_path / "journal")) == live


async def test_idempotency_per_item(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        first = await engine.submit("a", idempotency_key="k1")
        specs = [
            engine.make_spec("a", idempotency_key="k1"),  # replay of an earlier run
            engine.make_spec("DIFFERENT", idempotency_key="k1"),  # conflict with it
            engine.make_spec("b", idempotency_key="k2"),  # new
            engine.make_spec("b", idempotency_key="k2"),  # same key, same body: replay
            engine.make_spec("c", idempotency_key="k2"),  # same key, other body: conflict
            engine.make_spec("b", idempotency_key="k2", tenant="other"),  # other tenant
            engine.make_spec("d"),  # no key
        ]
        out = await engine.submit_many(specs)
        assert out[0].run is not None and out[0].run.id == first.id and out[0].replayed
        assert isinstance(out[1].error, IdempotencyConflict) and out[1].run is None
        assert out[1].error.run_id == first.id and not out[1].ok
        assert out[2].run is not None and not out[2].replayed
        new_k2 = out[2].run.id
        assert out[3].run is not None and out[3].run.id == new_k2 and out[3].replayed
        assert isinstance(out[4].error, IdempotencyConflict) and out[4].error.run_id == new_k2
        assert out[5].run is not None and out[5].run.id != new_k2 and not out[5].replayed
        assert out[5].run.spec.tenant == "other"
        assert out[6].run is not None and not out[6].replayed
        assert engine.count() == 3  # first, k2, d; the other tenant's run is apart
        assert engine.count(tenant="other") == 1
        # and a single submit afterwards sees the batch's key
        again, replayed = await engine.submit_spec(engine.make_spec("b", idempotency_key="k2"))
        assert replayed and again.id == new_k2


class HeldFsync:
    """Journal hooks whose fsyncs, once `armed`, wait in the writer's thread until
    `release` (real clock): a batch that is written but not yet durable nor applied."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.release = threading.Event()
        self.holding = threading.Event()
        self.hooks = IOHooks(fsync=self.fsync)

    def fsync(self, fd: int) -> None:
        if self.armed.is_set() and not self.release.is_set():
            self.holding.set()
            self.release.wait(30)
        os.fsync(fd)

    async def wait_holding(self) -> None:
        await trio.to_thread.run_sync(self.holding.wait, 30)


async def test_a_key_being_recorded_by_a_concurrent_submit_is_waited_for(
    tmp_path: Path,
) -> None:
    """Real clock: the single submit's fsync is held in its thread until we let go."""
    held = HeldFsync()
    async with open_engine(tmp_path, journal_hooks=held.hooks) as engine:
        held.armed.set()
        spec = engine.make_spec("same", idempotency_key="k")
        results: list[tuple[Run, bool]] = []

        async def single() -> None:
            results.append(await engine.submit_spec(spec))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(single)
            await held.wait_holding()
            assert (None, "k") in engine._pending_keys
            batch_done = trio.Event()
            outcomes: list[SubmitOutcome] = []

            async def batch() -> None:
                outcomes.extend(await engine.submit_many([spec, engine.make_spec("other")]))
                batch_done.set()

            nursery.start_soon(batch)
            await trio.sleep(0.2)
            assert not batch_done.is_set()  # waiting for the key, not deciding without it
            held.release.set()
        (run, replayed) = results[0]
        assert not replayed
        assert outcomes[0].replayed and outcomes[0].run is not None
        assert outcomes[0].run.id == run.id
        assert outcomes[1].run is not None and not outcomes[1].replayed
        assert engine.count() == 2


@pytest.mark.parametrize("how", ["single", "many"])
async def test_a_cancelled_submitter_keeps_its_key_until_its_run_is_recorded(
    tmp_path: Path, how: str
) -> None:
    """The first submit of a key is cancelled (its HTTP client went away) while its
    `submitted` event waits for the disk: the event is recorded all the same, so a
    concurrent submit of the key must go on waiting for it and replay it, not find the
    key free and record a second run."""
    held = HeldFsync()
    async with open_engine(tmp_path, journal_hooks=held.hooks) as engine:
        engine.supervisor.admitting = False
        spec = engine.make_spec("same", idempotency_key="k")
        first = trio.CancelScope()
        second: list[tuple[Run, bool]] = []

        async def submit_first() -> None:
            with first:
                if how == "single":
                    await engine.submit_spec(spec)
                else:
                    await engine.submit_many([spec])

        async def submit_second() -> None:
            second.append(await engine.submit_spec(spec))

        held.armed.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit_first)
            await held.wait_holding()
            nursery.start_soon(submit_second)
            await trio.sleep(0.1)
            first.cancel()
            await trio.sleep(0.1)
            assert (None, "k") in engine._pending_keys  # still being recorded
            assert not second
            held.release.set()
        ((run, replayed),) = second
        assert replayed
        assert [r.id for r in engine.list().runs] == [run.id]
        assert not engine._pending_keys and engine._submitting == 0


async def test_closing_the_engine_under_a_cancelled_submitter_does_not_hang(
    tmp_path: Path,
) -> None:
    """The cancelled submitter waits, shielded, for its batch: the engine's close still
    goes through (the writer resolves the batch), and the run is on disk."""
    held = HeldFsync()
    answers: list[tuple[Run, bool]] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as outside:  # the submitter lives outside the engine
            submitter = trio.CancelScope()
            async with open_engine(tmp_path, journal_hooks=held.hooks) as engine:
                engine.supervisor.admitting = False
                spec = engine.make_spec("p", idempotency_key="k")

                async def submit() -> None:
                    with submitter:
                        answers.append(await engine.submit_spec(spec))

                held.armed.set()
                outside.start_soon(submit)
                await held.wait_holding()
                submitter.cancel()
                threading.Timer(0.2, held.release.set).start()  # the disk comes back later
            # closed while the submitter waited
    assert answers and not answers[0][1]
    async with open_engine(tmp_path) as engine:
        assert [r.id for r in engine.list().runs] == [answers[0][0].id]


async def test_new_runs_is_the_submits_own_decision(autojump_clock: MockClock) -> None:
    """`Engine.new_runs` counts what `submit_many` would create: no key, or the first
    item of a key with no live earlier run; a run being deleted replays nothing."""
    async with scripted_engine() as (engine, _):
        done = await engine.submit("a", idempotency_key="k")
        await engine.wait(done.id)
        specs = [
            engine.make_spec("a", idempotency_key="k"),  # replay
            engine.make_spec("DIFFERENT", idempotency_key="k"),  # conflict
            engine.make_spec("n"),  # new
            engine.make_spec("b", idempotency_key="k2"),  # new
            engine.make_spec("b", idempotency_key="k2"),  # replay of the item before
            engine.make_spec("b", idempotency_key="k2", tenant="t"),  # another tenant's: new
        ]
        assert engine.new_runs(specs) == 3
        assert engine.new_runs([]) == 0
        engine._gone.add(done.id)  # as `delete` does until its event is applied
        assert engine.new_runs(specs[:1]) == 1
        (outcome,) = await engine.submit_many(specs[:1])
        assert outcome.run is not None and outcome.run.id != done.id and not outcome.replayed
        assert engine.new_runs(specs[:1]) == 0  # now the new run answers for the key


async def test_capacity_is_all_or_nothing(autojump_clock: MockClock, tmp_path: Path) -> None:
    async with scripted_engine(tmp_path, max_queue=5) as (engine, _):
        engine.supervisor.admitting = False  # keep them queued
        kept = await engine.submit_many([engine.make_spec(f"q{i}") for i in range(3)])
        assert engine.stats()["queued"] == 3
        with pytest.raises(QueueFull) as info:
            await engine.submit_many([engine.make_spec(f"x{i}") for i in range(3)])
        assert info.value.retry_after > 0
        assert engine.count() == 3
        on_disk = [e for e in read_journal(tmp_path / "journal") if e.type is E.SUBMITTED]
        assert [e.run for e in on_disk] == _ids(kept)
        # replays take no place: two new runs plus a replay fit in the two places left
        key = engine.make_spec("q0", idempotency_key="kk")
        await engine.submit_many([key])
        out = await engine.submit_many([key, engine.make_spec("y")])
        assert out[0].replayed and not out[1].replayed
        assert engine.stats()["queued"] == 5


async def test_empty_and_closed(autojump_clock: MockClock) -> None:
    async with scripted_engine() as (engine, _):
        assert await engine.submit_many([]) == []
        spec = engine.make_spec("x")
    with pytest.raises(EngineClosed):
        await engine.submit_many([spec])


async def test_replay_after_restart_equals_live_state(
    autojump_clock: MockClock, tmp_path: Path
) -> None:
    async with scripted_engine(tmp_path, max_concurrency=2) as (engine, _):
        ids: list[str] = []
        for b in range(4):
            specs = [
                engine.make_spec(
                    f"b{b}-{i}",
                    config={"do": "ok" if i % 3 else "fail"},
                    session_id=f"s{i % 2}",
                    priority=i % 3,
                    idempotency_key=f"k{b}-{i}" if i % 2 else None,
                    webhook_url="https://example.com/h" if i == 0 else None,
                )
                for i in range(20)
            ]
            ids += _ids(await engine.submit_many(specs))
        for rid in ids[:10]:
            await engine.wait(rid)
        live = normalise(engine.state)
        assert normalise(replay_dir(tmp_path / "journal")) == live
    async with scripted_engine(tmp_path) as (engine, _):
        reopened = normalise(engine.state)
    # runs queued at shutdown are still queued; those running were requeued (an event)
    assert reopened["runs"].keys() == live["runs"].keys()
    assert normalise(replay_dir(tmp_path / "journal")) == reopened


async def test_a_run_gone_before_its_submitter_looks_is_not_found_not_a_crash(
    autojump_clock: MockClock,
) -> None:
    """The submitter resumes after its batch was applied; whatever removed the run in
    between (a delete, a compaction), the answer is `NotFound` for that item, never a
    KeyError (which the HTTP layer would turn into a 500 for a durable run)."""
    async with scripted_engine() as (engine, _):
        engine.supervisor.admitting = False
        doomed: set[str] = set()

        def vanish(events: Sequence[Event]) -> None:
            for ev in events:
                if ev.type is E.SUBMITTED and ev.data.get("prompt") == "gone":
                    doomed.add(ev.run)
                    engine.state.runs.pop(ev.run, None)  # as if deleted meanwhile

        engine.add_commit_hook(vanish)
        specs = [engine.make_spec("kept"), engine.make_spec("gone")]
        kept, gone = await engine.submit_many(specs)
        assert kept.ok and kept.run is not None and kept.run.spec.prompt == "kept"
        assert gone.run is None and isinstance(gone.error, NotFound)
        assert str(gone.error).endswith(next(iter(doomed)))
        with pytest.raises(NotFound):
            await engine.submit_spec(engine.make_spec("gone"))
        engine.supervisor.admitting = True
