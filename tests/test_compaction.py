# ruff: noqa: ASYNC110, ASYNC240 - tests inspect files and poll threads on purpose
"""Compaction: the plan, the state-side forget, and the file rewrite — which keeps state
equal to live-after-forget, survives a crash between each of its steps, and runs while
the writer keeps appending."""

from __future__ import annotations

import copy
import os
import random
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trio
from hypothesis import event, given, settings
from hypothesis import strategies as st
from test_journal_support import (
    LONG_CHOICES,
    NO_FSYNC,
    PROFILE,
    FakeClock,
    Step,
    drive,
    legal_steps,
    make_journal,
    replay_dir,
    snapshot,
)

from agentjobs.engine import compaction
from agentjobs.engine.compaction import (
    CompactionPlan,
    apply_report,
    compact_state,
    forget,
    plan,
    strip_keys,
)
from agentjobs.engine.journal import (
    IOHooks,
    JournalCorrupt,
    JournalError,
    list_segments,
    segment_name,
)
from agentjobs.engine.model import Event, EventType, RunSpec, Status
from agentjobs.engine.state import State, apply, spec_to_data

E = EventType
DAY = 86400.0
DAY8 = 8 * DAY


def events_state(events: list[tuple[str, EventType, dict[str, object], float]]) -> State:
    state = State()
    for seq, (rid, etype, data, ts) in enumerate(events, start=1):
        apply(state, Event(seq, ts, rid, etype, data))
    return state


def picture(state: State) -> dict[str, object]:
    state.vacuum()
    return snapshot(state, with_last_seq=False)


# -- plan, forget (pure) ---------------------------------------------------------------


def sample_state() -> State:
    hook = "https://h.example"
    return events_state(
        [
            (
                "old_done",
                E.SUBMITTED,
                {"prompt": "p", "session_id": "s", "idempotency_key": "k1"},
                0.0,
            ),
            ("old_done", E.CANCELLED, {"reason": "x"}, 1.0),
            ("old_hook", E.SUBMITTED, {"prompt": "p", "webhook_url": hook}, 2.0),
            ("old_hook", E.CANCELLED, {"reason": "x"}, 3.0),  # webhook still pending
            ("old_gave_up", E.SUBMITTED, {"prompt": "p", "webhook_url": hook}, 4.0),
            ("old_gave_up", E.CANCELLED, {"reason": "x"}, 5.0),
            ("old_gave_up", E.WEBHOOK_ATTEMPT, {"ok": False, "error": "no"}, 6.0),
            ("old_queued", E.SUBMITTED, {"prompt": "p", "idempotency_key": "k2"}, 7.0),
            ("old_running", E.SUBMITTED, {"prompt": "p", "session_id": "s"}, 8.0),
            ("old_running", E.STARTED, {"attempt": 1}, 9.0),
            (
                "new_done",
                E.SUBMITTED,
                {"prompt": "p", "idempotency_key": "k3", "tenant": "t"},
                8 * DAY,
            ),
            ("new_done", E.STARTED, {"attempt": 1}, DAY8),
            ("new_done", E.SUCCEEDED, {"result": 1}, DAY8 + 1),
        ]
    )


def test_plan_drops_old_finished_runs_and_strips_expired_keys() -> None:
    state = sample_state()
    now = 8 * DAY + 10
    chosen = plan(state, now)
    assert chosen.drop == {"old_done", "old_gave_up"}  # old_hook still has a delivery due
    assert chosen.strip_keys == {"old_queued"}  # old_done's key goes with the run
    assert plan(state, now, retention_s=100 * DAY) == CompactionPlan(
        frozenset(), frozenset({"old_done", "old_queued"})
    )
    later = plan(state, 9 * DAY + 2)
    assert later.strip_keys == {"old_queued", "new_done"}
    assert not plan(state, 10.0)  # nothing is old enough yet


def test_plan_strips_keys_the_index_no_longer_points_at() -> None:
    """A key taken over by a newer run (deleted since) must not come back to the older run
    when compaction purges the newer one: strip it now, whatever its age."""
    state = events_state(
        [
            ("a", E.SUBMITTED, {"prompt": "p", "idempotency_key": "k"}, 0.0),
            ("b", E.SUBMITTED, {"prompt": "p", "idempotency_key": "k"}, 1.0),
            ("c", E.SUBMITTED, {"prompt": "p", "idempotency_key": "j"}, 2.0),
            ("d", E.SUBMITTED, {"prompt": "p", "idempotency_key": "j"}, 3.0),
            ("d", E.CANCELLED, {"reason": "x"}, 4.0),
            ("d", E.DELETED, {}, 5.0),
        ]
    )
    assert state.idempotency == {(None, "k"): "b"}
    assert plan(state, 10.0).strip_keys == {"a", "c"}  # shadowed by b; orphaned by d


def test_forget_and_strip_update_every_index() -> None:
    state = sample_state()
    forget(state, ["old_done", "old_running", "nonexistent"])
    strip_keys(state, ["old_queued", "new_done", "nonexistent"])
    assert set(state.runs) == {"old_hook", "old_gave_up", "old_queued", "new_done"}
    assert [r.id for r in state.order] == ["old_hook", "old_gave_up", "old_queued", "new_done"]
    assert state.order_seqs == [r.seq for r in state.order]
    assert "s" not in state.by_session
    assert state.idempotency == {}
    assert state.runs["new_done"].spec.idempotency_key is None
    assert state.runs["new_done"].spec.request_hash is None
    assert all(rid in state.runs for ids in state.by_status.values() for rid in ids)
    assert not state.by_status[Status.RUNNING]
    assert state.deleted_in_order == 0


# -- the rewrite: the property ----------------------------------------------------------


@settings(PROFILE)
@given(
    choices=LONG_CHOICES,
    after=st.sampled_from([0.0, 2 * DAY, 8 * DAY, 30 * DAY]),
    retention_days=st.sampled_from([0.0, 1.0, 7.0]),
)
async def test_compaction_keeps_state_equal_to_live_after_forget(
    tmp_path: Path,
    choices: list[tuple[int, int, int, float]],
    after: float,
    retention_days: float,
) -> None:
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    steps = legal_steps(choices)  # idempotency keys shared between runs, on purpose
    clock = FakeClock()
    journal, live = make_journal(directory, clock, segment_bytes=1024, hooks=NO_FSYNC)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        events = await drive(journal, clock, steps)
        last_seq = journal.last_seq
        before = copy.deepcopy(live)
        now = clock.now + after
        chosen = plan(live, now, retention_s=retention_days * DAY)
        report = await compact_state(journal, live, now, retention_s=retention_days * DAY)
        assert report.dropped == set(chosen.drop)
        assert report.stripped <= set(chosen.strip_keys)
        event(f"dropped runs: {bool(report.dropped)}")
        event(f"stripped keys: {bool(report.stripped)}")
        event(f"purged deleted runs: {bool(report.purged_deleted)}")
        histories = {rid: journal.history(rid) for rid in live.runs}
        # the journal goes on after compaction
        tail = await journal.commit("run_after", E.SUBMITTED, {"prompt": "after"})
        assert tail.seq == last_seq + 1
        await journal.aclose()
    # what was dropped was finished and old; what stayed is untouched
    for rid in report.dropped:
        run = before.runs[rid]
        assert run.finished and run.completed_at is not None
        assert run.completed_at + retention_days * DAY <= now
        assert rid not in live.runs
    expected_state = apply_report(before, report)
    apply(expected_state, tail)
    assert picture(live) == picture(expected_state)
    # the compacted journal replays to exactly that
    replayed, journal2 = replay_dir(directory)
    try:
        assert picture(replayed) == picture(live)
        assert journal2.last_seq == tail.seq  # numbers never go backwards
        for rid, history in histories.items():
            original = [e for e in events if e.run == rid]
            assert journal2.history(rid) == history
            if rid in report.stripped:
                assert history[0].data == {
                    k: v
                    for k, v in original[0].data.items()
                    if k not in ("idempotency_key", "request_hash")
                }
                assert history[1:] == original[1:]
            else:
                assert history == original
        for rid in report.dropped:
            assert journal2.history(rid) == []
    finally:
        journal2.close_files()


# -- crash between the steps -----------------------------------------------------------


def scenario_steps() -> list[Step]:
    rng = random.Random(20261128)
    choices = [
        (rng.randrange(1 << 16), rng.randrange(1 << 16), rng.randrange(1 << 16), 3600.0)
        for _ in range(160)
    ]
    return legal_steps(choices, shared_keys=False)


@pytest.fixture(scope="module")
def sealed_journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """A closed journal whose every event is in a sealed segment, and a `now` for it."""
    directory = tmp_path_factory.mktemp("sealed")

    async def build_it() -> float:
        clock = FakeClock()
        journal, _ = make_journal(directory, clock, segment_bytes=2048)
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            await drive(journal, clock, scenario_steps())
            await journal.seal()
            await journal.aclose()
        return clock.now + 10 * DAY

    now = trio.run(build_it)
    return directory, now


CRASH_POINTS = [
    "built",  # temp file written and synced, not renamed
    "half-built",  # crashed while writing the temp file
    "installed",  # renamed, replaced segments still there
    "one-removed",  # renamed, some replaced segments deleted
    "done",
]


@pytest.mark.parametrize("crash", CRASH_POINTS)
def test_a_crash_between_any_two_steps_opens_to_the_same_state(
    tmp_path: Path, sealed_journal: tuple[Path, float], crash: str
) -> None:
    src, now = sealed_journal
    directory = tmp_path / "j"
    shutil.copytree(src, directory)
    old, j = replay_dir(directory)
    j.close_files()
    chosen = plan(old, now, retention_s=2 * DAY, idempotency_window_s=DAY)
    assert chosen.drop and chosen.strip_keys, "the scenario must exercise both"
    sealed = list_segments(directory)[:-1]
    assert len(sealed) >= 3
    built = compaction.build(directory, sealed, chosen.drop, chosen.strip_keys)
    assert built.tmp_path is not None and built.tmp_path.exists()
    compacted = apply_report(copy.deepcopy(old), built.report)
    expected = old
    if crash == "half-built":
        data = built.tmp_path.read_bytes()
        built.tmp_path.write_bytes(data[: len(data) // 2])
    if crash in ("installed", "one-removed", "done"):
        compaction.install(built)
        expected = compacted
    if crash == "one-removed":
        (directory / segment_name(sealed[1])).unlink()
    if crash == "done":
        compaction.remove_replaced(built)
    state, journal = replay_dir(directory)
    try:
        assert picture(state) == picture(expected)
        left = list_segments(directory)
        if expected is compacted:
            assert left == [sealed[-1], sealed[-1] + 1]  # stale segments removed on open
        else:
            assert left == [*sealed, sealed[-1] + 1]
        assert not list(directory.glob("*.compact-tmp"))
    finally:
        journal.close_files()
    # and it opens the same way a second time
    again, j2 = replay_dir(directory)
    j2.close_files()
    assert picture(again) == picture(expected)


def test_damage_in_a_sealed_segment_stops_compaction_and_changes_nothing(
    tmp_path: Path, sealed_journal: tuple[Path, float]
) -> None:
    src, _ = sealed_journal
    directory = tmp_path / "j"
    shutil.copytree(src, directory)
    sealed = list_segments(directory)[:-1]
    path = directory / segment_name(sealed[1])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x20
    path.write_bytes(bytes(data))
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    with pytest.raises(JournalCorrupt, match=segment_name(sealed[1])):
        compaction.build(directory, sealed, {"x"}, set())
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


# -- compaction while the journal is live ------------------------------------------------


async def test_appends_continue_during_compaction_and_dropped_runs_are_guarded(
    tmp_path: Path,
) -> None:
    in_build = threading.Event()

    def slow_fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".compact-tmp"):
            in_build.set()
            time.sleep(0.2)  # a long compaction: the writer goes on meanwhile
        os.fsync(fd)

    clock = FakeClock()
    journal, live = make_journal(
        tmp_path, clock, segment_bytes=1024, hooks=IOHooks(fsync=slow_fsync)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for i in range(30):
            await journal.commit(f"old{i}", E.SUBMITTED, {"prompt": "p"})
            await journal.commit(f"old{i}", E.CANCELLED, {"reason": "x"})
        await journal.commit("busy", E.SUBMITTED, {"prompt": "p"})
        await journal.commit("busy", E.STARTED, {"attempt": 1})
        clock.now += 30 * DAY
        stop = trio.Event()
        written: list[Event] = []

        async def keep_writing() -> None:
            i = 0
            while not stop.is_set():
                written.append(await journal.append("busy", E.OUTPUT, {"text": f"{i}"}).wait())
                i += 1
                await trio.sleep(0.001)

        async def poke_dropped() -> None:
            while not in_build.is_set():
                await trio.sleep(0.001)
            with pytest.raises(JournalError, match="compacted away"):
                journal.append("old3", E.DELETED, {})

        nursery.start_soon(keep_writing)
        nursery.start_soon(poke_dropped)
        report = await compact_state(journal, live, clock.now)
        stop.set()
        await trio.sleep(0.01)
        assert len(report.dropped) == 30
        assert written, "appends went on while compacting"
        history = journal.history("busy")
        assert [e.seq for e in history] == sorted(e.seq for e in history)
        assert history[2:] == written[: len(history) - 2]
        await journal.aclose()
    replayed, j2 = replay_dir(tmp_path)
    j2.close_files()
    assert picture(replayed) == picture(live)
    assert set(live.runs) == {"busy"}


async def test_history_readers_in_threads_never_see_a_half_swapped_journal(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    journal, live = make_journal(tmp_path, clock, segment_bytes=1024)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for i in range(40):
            await journal.commit(f"old{i}", E.SUBMITTED, {"prompt": "p" * 30})
            await journal.commit(f"old{i}", E.CANCELLED, {"reason": "x"})
        keep = [await journal.commit("keep", E.SUBMITTED, {"prompt": "p"})]
        clock.now += 30 * DAY
        stop = threading.Event()
        seen: list[object] = []

        def reader() -> None:
            while not stop.is_set():
                try:
                    seen.append(journal.history("keep") == keep)
                except Exception as exc:  # any failure is a finding
                    seen.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for _ in range(3):
                await compact_state(journal, live, clock.now)
                await journal.commit(f"x{len(seen)}", E.SUBMITTED, {"prompt": "p"})
                clock.now += 30 * DAY
        finally:
            stop.set()
            thread.join()
        await journal.aclose()
    assert seen and all(x is True for x in seen), {repr(x) for x in seen if x is not True}


async def test_deleted_runs_are_purged_and_numbers_never_go_back(tmp_path: Path) -> None:
    clock = FakeClock()
    journal, live = make_journal(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("gone", E.SUBMITTED, {"prompt": "p", "session_id": "s"})
        await journal.commit("gone", E.CANCELLED, {"reason": "x"})
        await journal.commit("gone", E.DELETED, {})
        await journal.commit("stays", E.SUBMITTED, {"prompt": "p"})
        report = await journal.compact()
        assert report.purged_deleted == 1 and report.events_after == 1
        # everything finished and dropped: the newest seq (5) is dropped too
        await journal.commit("stays", E.CANCELLED, {"reason": "x"})
        clock.now += 30 * DAY
        report2 = await compact_state(journal, live, clock.now)
        assert report2.dropped == {"stays"} and report2.events_after == 0
        assert (await journal.compact()).skipped  # nothing left to do
        await journal.aclose()
    replayed, j2 = replay_dir(tmp_path)
    try:
        assert replayed.runs == {} and j2.last_seq == 5
        assert b'"gone"' not in b"".join(p.read_bytes() for p in tmp_path.glob("*.jsonl"))
    finally:
        j2.close_files()
    j3, _ = make_journal(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(j3.run)
        assert (await j3.commit("new", E.SUBMITTED, {"prompt": "p"})).seq == 6
        await j3.aclose()


async def test_memory_journal_compaction(tmp_path: Path) -> None:
    clock = FakeClock()
    journal, live = make_journal(None, clock, durability="memory")
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        spec = RunSpec(prompt="p", idempotency_key="k", request_hash="h")
        await journal.commit("a", E.SUBMITTED, spec_to_data(spec))
        await journal.commit("b", E.SUBMITTED, {"prompt": "p"})
        await journal.commit("b", E.CANCELLED, {"reason": "x"})
        clock.now += 30 * DAY
        report = await compact_state(journal, live, clock.now)
        assert report.dropped == {"b"} and report.stripped == {"a"}
        assert journal.history("b") == []
        assert "idempotency_key" not in journal.history("a")[0].data
        assert live.runs["a"].spec.idempotency_key is None and set(live.runs) == {"a"}
        await journal.aclose()


async def test_only_one_compaction_at_a_time(tmp_path: Path) -> None:
    journal, _ = make_journal(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("a", E.SUBMITTED, {"prompt": "p"})
        results: list[object] = []

        async def one() -> None:
            try:
                results.append(await journal.compact(["nope"]))
            except JournalError as exc:
                results.append(exc)

        async with trio.open_nursery() as two:
            two.start_soon(one)
            two.start_soon(one)
        assert sum(isinstance(r, JournalError) for r in results) == 1
        await journal.aclose()


async def test_purging_a_deleted_run_does_not_hand_its_key_back_to_an_older_run(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    journal, live = make_journal(tmp_path, clock)
    keyed = {"prompt": "p", "idempotency_key": "k", "tenant": "t"}
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("older", E.SUBMITTED, keyed)
        await journal.commit("newer", E.SUBMITTED, keyed)
        await journal.commit("newer", E.CANCELLED, {"reason": "x"})
        await journal.commit("newer", E.DELETED, {})
        assert live.find_idempotent("t", "k", now=clock.now, window=DAY) is None
        report = await compact_state(journal, live, clock.now)  # keys still fresh
        assert report.purged_deleted == 1 and report.stripped == {"older"}
        await journal.aclose()
    replayed, j2 = replay_dir(tmp_path)
    j2.close_files()
    assert picture(replayed) == picture(live)
    assert replayed.find_idempotent("t", "k", now=clock.now, window=DAY) is None
