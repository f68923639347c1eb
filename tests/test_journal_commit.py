# ruff: noqa: ASYNC110 - tests inspect files and poll threads on purpose
"""Group commit and its failure modes, driven through the IOHooks seam on real files.

Slow fsyncs show batches forming and every waiter released only once its own line is
synced; failing writes, fsyncs, truncates and rotations fail exactly the batch they hit,
apply nothing of it, and the journal heals (or, if it cannot cut back, refuses appends)."""

from __future__ import annotations

import errno
import os
import stat
import threading
import time
import zlib
from pathlib import Path

import pytest
import trio
from test_journal_support import FakeClock, make_journal, replay_dir, snapshot

from agentjobs.engine.journal import (
    IOHooks,
    Journal,
    JournalCorrupt,
    JournalError,
    JournalWriteError,
    decode_line,
    segment_name,
)
from agentjobs.engine.machine import IllegalTransition
from agentjobs.engine.model import Event, EventType
from agentjobs.engine.state import State, apply

E = EventType
ENOSPC = OSError(errno.ENOSPC, "No space left on device")
EIO = OSError(errno.EIO, "Input/output error")


def is_file(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def reopen(directory: Path) -> tuple[list[Event], State]:
    events: list[Event] = []
    state = State()

    def fold(e: Event) -> None:
        events.append(e)
        apply(state, e)

    journal = Journal(directory, "fsync")
    journal.open(fold)
    journal.close_files()
    return events, state


class Gate:
    """Hold the writer's next fsync (in its worker thread) until the test says go."""

    def __init__(self) -> None:
        self.armed = False
        self.entered = threading.Event()
        self.release = threading.Event()

    def pass_through(self) -> None:
        if self.armed:
            self.armed = False
            self.entered.set()
            self.release.wait(10)

    async def wait_entered(self) -> None:
        while not self.entered.is_set():
            await trio.sleep(0.001)


async def test_group_commit_batches_and_releases_each_waiter_after_its_fsync(
    tmp_path: Path,
) -> None:
    synced_upto = [0]
    committed: list[int] = []

    def slow_fsync(fd: int) -> None:
        time.sleep(0.005)  # a slow disk: appends pile up meanwhile
        os.fsync(fd)
        if is_file(fd):
            synced_upto[0] = os.fstat(fd).st_size

    state = State()

    def on_commit(events: list[Event]) -> None:
        for e in events:
            apply(state, e)
            committed.append(e.seq)

    journal = Journal(tmp_path, "fsync", on_commit, hooks=IOHooks(fsync=slow_fsync))
    journal.open()
    path = tmp_path / segment_name(1)
    appenders, rounds = 100, 3
    released = 0

    async def appender(i: int) -> None:
        nonlocal released
        rid = f"run_{i}"
        for etype, data in (
            (E.SUBMITTED, {"prompt": f"p{i}"}),
            (E.STARTED, {"attempt": 1}),
            (E.SUCCEEDED, {"result": i}),
        )[:rounds]:
            ev = await journal.commit(rid, etype, data)
            # released: the line is inside what the last fsync covered, and applied
            assert b'"seq":%d,' % ev.seq in path.read_bytes()[: synced_upto[0]]
            run = state.runs[rid]
            assert run.last_seq >= ev.seq
            released += 1

    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        async with trio.open_nursery() as appenders_nursery:
            for i in range(appenders):
                appenders_nursery.start_soon(appender, i)
        await journal.aclose()
    total = appenders * rounds
    assert released == total
    assert committed == list(range(1, total + 1))  # applied in order, each once
    assert journal.stats_events == total
    assert journal.stats_batches < total / 5, journal.stats_batches  # batches formed
    assert journal.stats_fsyncs <= journal.stats_batches
    events, replayed = reopen(tmp_path)
    assert len(events) == total
    assert snapshot(replayed) == snapshot(state)


async def test_a_failing_fsync_fails_every_append_of_its_batch_and_applies_none(
    tmp_path: Path,
) -> None:
    gate = Gate()
    failures = [0]

    def fsync(fd: int) -> None:
        fail = failures[0] > 0 and is_file(fd)  # decided on entry
        if fail:
            failures[0] -= 1
        gate.pass_through()
        if fail:
            raise EIO
        os.fsync(fd)

    journal, state = make_journal(tmp_path, hooks=IOHooks(fsync=fsync))
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("run_ok0", E.SUBMITTED, {"prompt": "p"})
        gate.armed = True
        nursery.start_soon(journal.commit, "run_ok1", E.SUBMITTED, {"prompt": "p"})
        await gate.wait_entered()  # the writer is inside run_ok1's fsync
        size_before = (tmp_path / segment_name(1)).stat().st_size
        doomed = [
            journal.append(f"run_bad{i}", E.SUBMITTED, {"prompt": "p"}, sync=True)
            for i in range(20)
        ]
        failures[0] = 1  # the next batch's fsync fails
        gate.release.set()
        for t in doomed:
            with pytest.raises(JournalWriteError, match="Input/output error"):
                await t.wait()
        assert journal.stats_failed_batches == 1
        assert not any(rid.startswith("run_bad") for rid in state.runs)
        assert (tmp_path / segment_name(1)).stat().st_size == size_before  # cut back
        after = await journal.commit("run_ok2", E.SUBMITTED, {"prompt": "p"})
        assert after.seq == 23  # the failed batch's numbers are not reused
        await journal.aclose()
    events, replayed = reopen(tmp_path)
    assert [e.run for e in events] == ["run_ok0", "run_ok1", "run_ok2"]
    assert snapshot(replayed) == snapshot(state)
    assert b"run_bad" not in (tmp_path / segment_name(1)).read_bytes()


async def test_a_failing_write_cuts_the_partial_batch_and_the_next_one_succeeds(
    tmp_path: Path,
) -> None:
    plan: list[str] = []  # per write call: "ok" (default), "half" (short write) or "fail"

    def write(fd: int, buf: bytes) -> int:
        how = plan.pop(0) if plan else "ok"
        if how == "fail":
            raise ENOSPC
        if how == "half":
            return os.write(fd, bytes(buf[: len(buf) // 2]))
        return os.write(fd, buf)

    journal, state = make_journal(tmp_path, hooks=IOHooks(write=write))
    path = tmp_path / segment_name(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("run_a", E.SUBMITTED, {"prompt": "p"})
        size = path.stat().st_size
        plan[:] = ["half", "fail"]  # half the batch reaches the file, then ENOSPC
        tickets = [journal.append(f"run_x{i}", E.SUBMITTED, {"prompt": "p"}) for i in range(5)]
        for t in tickets:
            with pytest.raises(JournalWriteError, match="No space left"):
                await t.wait()
        assert path.stat().st_size == size
        assert set(state.runs) == {"run_a"}
        await journal.commit("run_b", E.SUBMITTED, {"prompt": "p"})  # space is back
        await journal.aclose()
    events, replayed = reopen(tmp_path)
    assert [e.run for e in events] == ["run_a", "run_b"]
    assert snapshot(replayed) == snapshot(state)


async def test_after_a_failed_fsync_unsynced_applied_lines_are_written_again(
    tmp_path: Path,
) -> None:
    """Progress written without waiting was applied; a later fsync failure must not lose it
    (the page cache is not trusted), nor may the failed batch show up."""
    failures = [0]

    def fsync(fd: int) -> None:
        if failures[0] and is_file(fd):
            failures[0] -= 1
            raise EIO
        os.fsync(fd)

    journal, state = make_journal(tmp_path, hooks=IOHooks(fsync=fsync), flush_interval=None)
    path = tmp_path / segment_name(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        await journal.commit("r", E.STARTED, {"attempt": 1})
        for pct in (10.0, 20.0):
            await journal.append("r", E.PROGRESS, {"percentage": pct}).wait()
        assert state.runs["r"].progress.percentage == 20.0
        failures[0] = 1
        with pytest.raises(JournalWriteError):
            await journal.commit("r", E.SUCCEEDED, {"result": "lost"})
        # cut back to the last fsync: the progress lines are gone from the file for now
        assert b'"percentage":20.0' not in path.read_bytes()
        with pytest.raises(JournalError, match="unavailable"):
            journal.history("r")
        done = await journal.commit("r", E.SUCCEEDED, {"result": "kept"})
        assert await journal.seal() == 1
        await journal.aclose()
    # the sealed segment's recorded length and CRC match what is on disk after the heal
    sealed = path.read_bytes()
    header = decode_line((tmp_path / segment_name(2)).read_bytes().split(b"\n")[0])
    assert (header["prev_bytes"], header["prev_crc"]) == (
        len(sealed),
        f"{zlib.crc32(sealed):08x}",
    )
    assert [e.type for e in journal_history(tmp_path, "r")] == [
        E.SUBMITTED,
        E.STARTED,
        E.PROGRESS,
        E.PROGRESS,
        E.SUCCEEDED,
    ]
    events, replayed = reopen(tmp_path)
    assert events[-1] == done and replayed.runs["r"].result == "kept"
    assert snapshot(replayed) == snapshot(state)


def journal_history(directory: Path, run: str) -> list[Event]:
    journal = Journal(directory, "fsync")
    journal.open()
    try:
        return journal.history(run)
    finally:
        journal.close_files()


async def test_when_even_the_cut_back_fails_the_journal_refuses_appends(tmp_path: Path) -> None:
    broken = [False]

    def write(fd: int, buf: bytes) -> int:
        if broken[0]:
            os.write(fd, bytes(buf[:10]))
            raise ENOSPC
        return os.write(fd, buf)

    def truncate(fd: int, size: int) -> None:
        if broken[0]:
            raise EIO
        os.ftruncate(fd, size)

    journal, state = make_journal(tmp_path, hooks=IOHooks(write=write, truncate=truncate))
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        broken[0] = True
        with pytest.raises(JournalWriteError):
            await journal.commit("r", E.STARTED, {"attempt": 1})
        broken[0] = False
        with pytest.raises(JournalWriteError, match="broken"):
            journal.append("r", E.STARTED, {"attempt": 1})
        await journal.aclose()
    # a restart sorts the file out: the 10 stray bytes are a torn tail
    events, replayed = reopen(tmp_path)
    assert [e.type for e in events] == [E.SUBMITTED]
    assert snapshot(replayed) == snapshot(state)


async def test_a_failed_rotation_fails_its_batch_and_is_retried(tmp_path: Path) -> None:
    failures = [0]

    def fsync(fd: int) -> None:
        if failures[0] and stat.S_ISDIR(os.fstat(fd).st_mode):
            failures[0] -= 1
            raise ENOSPC
        os.fsync(fd)

    journal, state = make_journal(tmp_path, hooks=IOHooks(fsync=fsync), segment_bytes=1024)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        i = 0
        while journal.current_segment == 1:
            await journal.commit(f"r{i}", E.SUBMITTED, {"prompt": "x" * 100})
            i += 1
            if (tmp_path / segment_name(1)).stat().st_size >= 1024:
                break
        failures[0] = 1  # the new segment's directory fsync fails
        with pytest.raises(JournalWriteError):
            await journal.commit("r_lost", E.SUBMITTED, {"prompt": "p"})
        assert not (tmp_path / segment_name(2)).exists()  # the half-made segment is gone
        assert "r_lost" not in state.runs
        ev = await journal.commit("r_kept", E.SUBMITTED, {"prompt": "p"})
        assert journal.current_segment == 2
        await journal.aclose()
    events, replayed = reopen(tmp_path)
    assert events[-1] == ev and "r_lost" not in replayed.runs
    assert snapshot(replayed) == snapshot(state)


async def test_lines_written_without_waiting_are_synced_by_the_flush_interval(
    tmp_path: Path,
) -> None:
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        os.fsync(fd)

    journal, _ = make_journal(tmp_path, hooks=IOHooks(fsync=fsync), flush_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        await journal.commit("r", E.STARTED, {"attempt": 1})
        before = calls[0]
        await journal.append("r", E.OUTPUT, {"text": "chunk"}).wait()
        assert calls[0] == before  # released after the write alone
        with trio.fail_after(5):
            while calls[0] == before:
                await trio.sleep(0.01)
        await journal.aclose()


async def test_a_steady_stream_of_output_cannot_postpone_the_flush(tmp_path: Path) -> None:
    journal, _ = make_journal(tmp_path, flush_interval=0.05)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        await journal.commit("r", E.STARTED, {"attempt": 1})
        before = journal.stats_fsyncs
        with trio.move_on_after(0.5):
            while journal.stats_fsyncs == before:  # one write every 10 ms, never idle long
                await journal.append("r", E.OUTPUT, {"text": "x"}).wait()
                await trio.sleep(0.01)
        assert journal.stats_fsyncs > before
        await journal.aclose()


async def test_too_many_unsynced_bytes_force_an_fsync(tmp_path: Path) -> None:
    journal, _ = make_journal(tmp_path, flush_interval=None, max_unsynced_bytes=2000)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        await journal.commit("r", E.STARTED, {"attempt": 1})
        before = journal.stats_fsyncs
        for _ in range(30):
            await journal.append("r", E.OUTPUT, {"text": "x" * 100}).wait()
        assert journal.stats_fsyncs > before
        await journal.aclose()


async def test_os_durability_never_fsyncs_but_writes_before_releasing(tmp_path: Path) -> None:
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1

    journal, _ = make_journal(tmp_path, durability="os", hooks=IOHooks(fsync=fsync))
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        ev = await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        assert b'"seq":1,' in (tmp_path / segment_name(1)).read_bytes()
        await journal.aclose()
    assert calls[0] == 0
    events, _ = reopen(tmp_path)
    assert events == [ev]


async def test_an_on_commit_failure_stops_the_writer_and_is_caught_on_reopen(
    tmp_path: Path,
) -> None:
    """An illegal event is durable before the fold rejects it: the engine must check
    legality before appending. The journal stops, and replay names the line."""
    journal, _ = make_journal(tmp_path, FakeClock())
    with pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
            journal.append("r", E.SUCCEEDED, {"result": 1})  # queued from QUEUED: illegal
            await trio.sleep_forever()
    assert info.group_contains(IllegalTransition)
    with pytest.raises(JournalError):
        journal.append("r", E.STARTED, {"attempt": 1})
    journal.close_files()
    with pytest.raises(JournalCorrupt, match=r"00000001\.jsonl:3: .*illegal transition"):
        replay_dir(tmp_path)
