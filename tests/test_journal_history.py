"""Paged history reads: `Journal.history(run, after, limit)` and `history_at(run, seqs)` give
exactly the slices of a run's full history, for every after/limit, in every
durability, across segments, after a restart (the index rebuilt by replay) and after a
compaction (the index re-pointed at the compacted file); and the index stays compact."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given, settings
from test_journal_support import (
    LONG_CHOICES,
    NO_FSYNC,
    PROFILE,
    FakeClock,
    drive,
    legal_steps,
    make_journal,
)

from agentjobs.engine import journal as journal_mod
from agentjobs.engine.journal import Journal
from agentjobs.engine.model import TERMINAL, Event, EventType

E = EventType


def check_history(journal: Journal, events: list[Event]) -> int:
    """Every paged read of every run against slices of its full history; returns how many
    reads were checked (so a test cannot pass by checking nothing)."""
    checked = 0
    for rid in sorted({e.run for e in events}):
        full = [e for e in events if e.run == rid]
        assert journal.history(rid) == full
        seqs = [e.seq for e in full]
        # history_at: exactly the events at the seqs asked for; seqs of other runs (or
        # of no event) are left out
        assert journal.history_at(rid, seqs) == full
        assert journal.history_at(rid, seqs[1::3]) == full[1::3]
        some = set(seqs[::2])
        absent = sorted(set(range(seqs[-1] + 3)) - set(seqs))[:40]
        asked = sorted(some | set(absent))
        assert journal.history_at(rid, asked) == [e for e in full if e.seq in some]
        assert journal.history_at(rid, []) == []
        checked += 4
        points = sorted({0, 1, *seqs, *(s - 1 for s in seqs), *(s + 1 for s in seqs)})
        points.append(seqs[-1] + 1000)
        limits: list[int | None] = [None, 0, 1, 2, len(full)]
        for after in points:
            tail = [e for e in full if e.seq > after]
            for limit in limits:
                want = tail if limit is None else tail[:limit]
                assert journal.history(rid, after, limit) == want, (rid, after, limit)
                checked += 1
    return checked


@settings(PROFILE, max_examples=15)
@given(choices=LONG_CHOICES)
@pytest.mark.parametrize("durability", ["fsync", "memory"])
async def test_every_page_is_a_slice_of_the_full_history(
    tmp_path: Path, durability: str, choices: list[Any]
) -> None:
    directory = None if durability == "memory" else Path(tempfile.mkdtemp(dir=tmp_path))
    clock = FakeClock()
    steps = legal_steps(choices)
    options: dict[str, Any] = {"segment_bytes": 1024} if directory is not None else {}
    journal, state = make_journal(directory, clock, durability, hooks=NO_FSYNC, **options)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        events = await drive(journal, clock, steps)
        assert check_history(journal, events) > 0
        # compact away the finished runs: the others' histories must read the same
        finished = [r for r, run in state.runs.items() if run.status in TERMINAL]
        dropped = set(finished[::2])
        await journal.compact(dropped)
        kept = [e for e in events if e.run not in dropped and e.run in state.runs]
        for rid in dropped:
            assert journal.history(rid) == []
        # new runs written after the compaction (some into a new segment)
        fresh = [attrs.evolve(step, run="new" + step.run) for step in legal_steps(choices[:10])]
        more = await drive(journal, clock, fresh)
        kept += more
        if kept:
            assert check_history(journal, kept) > 0
        await journal.aclose()
    if directory is None:
        return
    # after a restart the index is rebuilt by replay
    again, _ = make_journal(directory, clock, durability, hooks=NO_FSYNC, **options)
    try:
        if kept:
            assert check_history(again, kept) > 0
    finally:
        again.close_files()


@pytest.mark.parametrize("durability", ["fsync", "memory"])
async def test_long_runs_odd_run_ids_segments_and_compaction(
    tmp_path: Path, durability: str
) -> None:
    """Runs longer than the packed index form, run ids whose line head does not say the
    seq (escapes; longer than the head read) so the reader decodes the whole line,
    output lines skipped by type, a compaction and more lines after it."""
    directory = tmp_path if durability == "fsync" else None
    clock = FakeClock()
    options: dict[str, Any] = {"segment_bytes": 2048} if directory is not None else {}
    journal, _ = make_journal(directory, clock, durability, hooks=NO_FSYNC, **options)
    odd = 'run_"quoted\\slash\u00e9'
    long_id = "run_" + "L" * 300
    runs = ["run_long", odd, long_id, "run_short"]
    events: list[Event] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for rid in runs:
            events.append(await journal.commit(rid, E.SUBMITTED, {"prompt": "p"}))
            events.append(await journal.commit(rid, E.STARTED, {"attempt": 1}))
        for i in range(40):
            rid = runs[i % 3] if i % 5 else "run_long"
            etype = E.PROGRESS if i % 4 == 0 else E.OUTPUT
            data = {"percentage": float(i)} if etype is E.PROGRESS else {"text": f"{i}" * 40}
            events.append(await journal.commit(rid, etype, data))
        events.append(await journal.commit("run_short", E.SUCCEEDED, {"result": 1}))
        assert check_history(journal, events) > 0
        if directory is not None:
            assert len(journal.segments()) > 2
            held = journal._positions
            assert isinstance(held["run_long"], journal_mod.array)  # grew past the inline form
            assert type(held["run_short"]) is bytes  # three positions, packed
        await journal.compact(["run_short"])
        events = [e for e in events if e.run != "run_short"]
        for i in range(12):
            events.append(await journal.commit("run_long", E.OUTPUT, {"text": f"after {i}"}))
        assert check_history(journal, events) > 0
        await journal.aclose()
    if directory is not None:
        again, _ = make_journal(directory, clock, durability, hooks=NO_FSYNC, **options)
        try:
            assert check_history(again, events) > 0
        finally:
            again.close_files()


async def test_a_page_reads_only_its_own_lines(tmp_path: Path) -> None:
    """The first line after `after` is found by binary search over line heads: reading a
    page of the last events of a long run decodes the page, not the run."""
    clock = FakeClock()
    journal, _ = make_journal(tmp_path, clock, "os")
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        await journal.commit("r", E.STARTED, {"attempt": 1})
        out = [await journal.commit("r", E.OUTPUT, {"text": f"{i}"}) for i in range(1000)]
        decoded: list[bytes] = []
        real = journal_mod.decode_line

        def counting(line: bytes) -> dict[str, Any]:
            decoded.append(line)
            return real(line)

        journal_mod.decode_line = counting  # type: ignore[assignment]
        try:
            assert journal.history("r", out[-3].seq, 2) == out[-2:]
            assert len(decoded) == 2
        finally:
            journal_mod.decode_line = real
        await journal.aclose()


def test_limits_must_not_be_negative() -> None:
    journal = Journal(None, "memory")
    journal.open()
    with pytest.raises(ValueError):
        journal.history("r", 0, -1)
    assert journal.history("unknown", 0, 5) == []
    assert journal.history_at("unknown", [5]) == []
