"""`agentjobs log verify | inspect | compact | repair` on real data directories."""

from __future__ import annotations

import contextlib
import functools
import io
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import event, given
from hypothesis import strategies as st
from test_journal_support import PROFILE, FakeClock, make_journal, replay_dir

from agentjobs.cli import main
from agentjobs.engine.journal import (
    FORMAT_VERSION,
    MAGIC,
    Journal,
    acquire_lock,
    decode_line,
    encode_line,
    header_obj,
    release_lock,
    segment_name,
)
from agentjobs.engine.model import Event, EventType
from agentjobs.engine.state import State, apply

E = EventType


def build_data_dir(data_dir: Path, *, segment_bytes: int = 1024) -> list[Event]:
    """DATA_DIR/journal with a few finished, one running and one keyed run."""
    directory = data_dir / "journal"

    async def go() -> list[Event]:
        clock = FakeClock(1_700_000_000.0)
        journal, _ = make_journal(directory, clock, segment_bytes=segment_bytes)
        events = []
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            for i in range(6):
                rid = f"run_done{i}"
                events.append(await journal.commit(rid, E.SUBMITTED, {"prompt": f"p{i}"}))
                events.append(await journal.commit(rid, E.STARTED, {"attempt": 1}))
                events.append(await journal.commit(rid, E.SUCCEEDED, {"result": i}))
            keyed = {"prompt": "k", "idempotency_key": "key-1", "request_hash": "h"}
            events.append(await journal.commit("run_keyed", E.SUBMITTED, keyed))
            events.append(await journal.commit("run_busy", E.SUBMITTED, {"prompt": "b"}))
            events.append(await journal.commit("run_busy", E.STARTED, {"attempt": 1}))
            await journal.aclose()
        return events

    return trio.run(go)


def cli(*argv: str) -> int:
    return main(["log", *argv])


def test_verify_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_data_dir(tmp_path)
    assert cli("verify", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "21 events" in out and "OK" in out


def test_verify_names_file_and_line_of_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path)
    path = tmp_path / "journal" / segment_name(1)
    data = bytearray(path.read_bytes())
    second_line = data.index(b"\n") + 1
    data[second_line + 40] ^= 0x04
    path.write_bytes(bytes(data))
    assert cli("verify", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED at {path}:2: checksum mismatch" in out
    assert "log repair" in out


def test_verify_reports_a_torn_tail_separately(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path, segment_bytes=1 << 20)
    path = tmp_path / "journal" / segment_name(1)
    path.write_bytes(path.read_bytes() + b'{"crc":"0000')
    assert cli("verify", str(tmp_path)) == 3
    out = capsys.readouterr().out
    assert f"torn tail at {path}:23: incomplete last line: 12 bytes" in out
    assert path.read_bytes().endswith(b'{"crc":"0000')  # verify changes nothing


def test_inspect_summary_and_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_data_dir(tmp_path)
    assert cli("inspect", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "runs: 8" in out
    assert "succeeded  6" in out and "running    1" in out and "queued     1" in out
    assert "submitted          8" in out and "started            7" in out
    assert out.index("run_busy") < out.index("run_keyed") < out.index("run_done5")  # newest first
    assert cli("inspect", str(tmp_path), "--run", "run_done2") == 0
    out = capsys.readouterr().out
    assert "run_done2: 3 events" in out
    assert "2023-11-14T22:13:20" in out  # ISO-8601 UTC timestamps
    assert "Z  submitted" in out and '{"result":2}' in out
    assert "status succeeded, attempt 1, result 2" in out
    assert cli("inspect", str(tmp_path), "--run", "run_nope") == 1


def test_compact_drops_old_runs_and_strips_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path)  # events from 2023: far older than any retention
    assert cli("compact", str(tmp_path), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "6 finished runs past retention, 1 expired idempotency keys" in out
    assert "would drop run_done0" in out
    assert cli("compact", str(tmp_path), "--retention-days", "7", "--idempotency-hours", "1") == 0
    out = capsys.readouterr().out
    assert "dropped 6 runs" in out and "stripped 1 idempotency keys" in out
    state, journal = replay_dir(tmp_path / "journal")
    journal.close_files()
    assert set(state.runs) == {"run_keyed", "run_busy"}
    assert state.runs["run_keyed"].spec.idempotency_key is None
    assert cli("verify", str(tmp_path)) == 0


def test_compact_and_repair_refuse_while_a_server_holds_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path)
    lock = acquire_lock(tmp_path / "journal")
    try:
        assert cli("compact", str(tmp_path)) == 1
        assert "in use by another agentjobs process" in capsys.readouterr().err
        assert cli("repair", str(tmp_path)) == 1
        assert "stop the server first" in capsys.readouterr().err
        assert cli("verify", str(tmp_path)) == 0  # reading is fine
    finally:
        release_lock(lock)


def test_repair_moves_the_damaged_tail_and_later_segments_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    segments = sorted(jdir.glob("*.jsonl"))
    assert len(segments) >= 3
    path = segments[1]
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:20] + b"X" + lines[2][21:]  # line 3 of segment 2 is damaged
    path.write_bytes(b"\n".join(lines))
    kept_seq = decode_line(lines[1])["seq"]
    assert cli("repair", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"damage at {path}:3: checksum mismatch" in out
    assert f"moved later segment {segments[2].name}" in out
    assert "intact line(s) were in the moved part" in out
    assert "journal now: " in out and "OK" in out
    (side_dir,) = jdir.glob("repair-*")
    assert (side_dir / f"{path.name}.from-line-3").read_bytes().startswith(lines[2])
    assert (side_dir / segments[2].name).exists()
    state, journal = replay_dir(jdir)
    try:
        assert journal.last_seq == kept_seq
        kept = [e for e in events if e.seq <= kept_seq]
        assert {e.run for e in kept} == set(state.runs)
    finally:
        journal.close_files()
    assert cli("verify", str(tmp_path)) == 0
    assert cli("repair", str(tmp_path)) == 0
    assert "nothing to repair" in capsys.readouterr().out


# -- repair of a damaged header (issue 7, bug b) -----------------------------------------
#
# A header holds no event: when it alone is damaged, repair moves only its bytes aside,
# writes a fresh one derived from the neighbours, and keeps every intact event after it.
# Damage further on in the same segment is then moved aside as any other damage.


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _replayed(jdir: Path) -> list[tuple[int, str, str, dict[str, Any]]]:
    """The events the engine sees when it opens the journal (open + the state fold)."""
    seen: list[Event] = []
    state = State()

    def on_replay(event: Event) -> None:
        apply(state, event)
        seen.append(event)

    journal = Journal(jdir, "fsync")
    journal.open(on_replay)
    journal.close_files()
    return [_key(e) for e in seen]


def _key(e: Event) -> tuple[int, str, str, dict[str, Any]]:
    return (e.seq, e.run, e.type.value, e.data)


def _side_files(jdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in jdir.glob("repair-*/*")}


def _snapshot(jdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(jdir.iterdir()) if p.is_file()}


def _flip(line: bytes, at: int, mask: int = 0x01) -> bytes:
    return line[:at] + bytes([line[at] ^ mask]) + line[at + 1 :]


# How a header line (with its newline) is damaged.
HEADER_DAMAGE: dict[str, Callable[[bytes], bytes]] = {
    "crc digit flipped": lambda h: _flip(h, 10),
    "garbled": lambda h: h[:30] + b"\x00\xff#" * 5 + h[45:],
    "closing brace flipped": lambda h: _flip(h, len(h) - 2, 0x20),
    "newline flipped (merges with the first event)": lambda h: h[:-1] + b"*",
    "cut short, newline lost": lambda h: h[: len(h) // 2],
    "cut short, newline kept": lambda h: h[: len(h) // 2] + b"\n",
    "a byte turned into a newline": lambda h: h[:40] + b"\n" + h[41:],
    "missing altogether": lambda h: b"",
}


@pytest.mark.parametrize("damage", list(HEADER_DAMAGE))
@pytest.mark.parametrize("seg", [1, 2, 3])  # the first, a sealed later one, the active one
def test_repair_of_a_damaged_header_keeps_every_event(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seg: int, damage: str
) -> None:
    events = build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    assert [p.name for p in sorted(jdir.glob("*.jsonl"))] == [segment_name(s) for s in (1, 2, 3)]
    path = jdir / segment_name(seg)
    lines = _lines(path)
    old_header = decode_line(lines[0][:-1])
    bad_header = HEADER_DAMAGE[damage](lines[0])
    damaged = bad_header + b"".join(lines[1:])
    path.write_bytes(damaged)
    others = {n: b for n, b in _snapshot(jdir).items() if n != path.name}

    assert cli("verify", str(tmp_path)) == 1
    assert f"{path}:1:" in capsys.readouterr().out
    assert cli("repair", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"wrote a fresh header for {path.name}" in out
    assert f"kept the {len(lines) - 1} intact event(s)" in out

    # the damaged bytes went aside, nothing else did; every other file is untouched
    side = _side_files(jdir)
    if bad_header:
        assert side == {
            f"{path.name}.damaged-header": damaged[: len(damaged) - len(b"".join(lines[1:]))]
        }
    else:
        assert side == {}
    new_lines = _lines(path)
    assert side.get(f"{path.name}.damaged-header", b"") + b"".join(new_lines[1:]) == damaged
    assert {n: b for n, b in _snapshot(jdir).items() if n != path.name} == others

    # the fresh header says what the old one said (but when it was made and prev_*)
    header = decode_line(new_lines[0][:-1])
    assert header["format"] == FORMAT_VERSION and header["magic"] == MAGIC
    assert (header["segment"], header["seq"]) == (seg, old_header["seq"])
    assert "compacted_from" not in header and "seq_end" not in header

    assert _replayed(jdir) == [_key(e) for e in events]
    assert cli("verify", str(tmp_path)) == 0
    capsys.readouterr()
    assert cli("repair", str(tmp_path)) == 0
    assert "nothing to repair" in capsys.readouterr().out


@pytest.mark.parametrize("seg", [1, 2, 3])
def test_repair_of_a_damaged_header_a_damaged_line_and_a_torn_tail_in_one_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seg: int
) -> None:
    """The header is rebuilt, the events before the damaged line stay, the damaged line
    and everything after it (the torn tail, later segments) go aside as before."""
    events = build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    path = jdir / segment_name(seg)
    lines = _lines(path)
    assert len(lines) >= 4
    torn = lines[-1][: len(lines[-1]) // 2]  # a write cut short by a crash
    body = [lines[1], _flip(lines[2], len(lines[2]) // 2, 0x04), *lines[3:]]
    if seg == 3:
        body.append(torn)  # the active segment: a torn line after the last one
    else:
        body[-1] = torn  # a sealed segment: its last line is cut short
    damaged = _flip(lines[0], 10) + b"".join(body)
    path.write_bytes(damaged)
    kept_seq = decode_line(lines[1][:-1])["seq"]

    assert cli("repair", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"wrote a fresh header for {path.name}" in out
    assert f"damage at {path}:3: checksum mismatch" in out
    side = _side_files(jdir)
    assert (
        side[f"{path.name}.damaged-header"]
        + b"".join(_lines(path)[1:])
        + side[f"{path.name}.from-line-3"]
        == damaged
    )
    later = {segment_name(s) for s in range(seg + 1, 4)}
    assert later <= set(side)  # later segments moved aside whole
    assert not any((jdir / name).exists() for name in later)

    assert _replayed(jdir) == [_key(e) for e in events if e.seq <= kept_seq]
    assert cli("verify", str(tmp_path)) == 0


def test_a_damaged_header_that_may_hide_an_event_is_not_rebuilt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The header's newline is lost *and* the first event, now sharing its line, is
    damaged: an event is lost, so the segment goes aside as any other damage (nothing
    after a lost event is replayed: it may depend on what was lost)."""
    events = build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    path = jdir / segment_name(2)
    lines = _lines(path)
    path.write_bytes(lines[0][:-1] + b"*" + _flip(lines[1], 40) + b"".join(lines[2:]))
    first_lost = decode_line(lines[1][:-1])["seq"]
    assert cli("repair", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "fresh header" not in out
    assert not path.exists() and not (jdir / segment_name(3)).exists()
    assert _replayed(jdir) == [_key(e) for e in events if e.seq < first_lost]
    assert cli("verify", str(tmp_path)) == 0


def _header_line(seg: int, seq: int, **fields: Any) -> bytes:
    obj = header_obj(seg, seq)
    obj.update(fields)
    return encode_line(obj)


@pytest.mark.parametrize("seg", [1, 2])
@pytest.mark.parametrize("fmt", [FORMAT_VERSION + 1, 0, "1", None])
def test_repair_refuses_a_readable_header_of_a_format_it_does_not_know(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], seg: int, fmt: object
) -> None:
    """Decision (docs/journal-format.md): a header that decodes (its checksum is good)
    but declares a newer format, or no format this reader knows, is written that way on
    purpose: repair never rewrites it, changes nothing and says why."""
    build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    path = jdir / segment_name(seg)
    lines = _lines(path)
    path.write_bytes(_header_line(seg, 0 if seg == 1 else 9, format=fmt) + b"".join(lines[1:]))
    before = _snapshot(jdir)
    assert cli("verify", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert "will refuse it" in out
    assert cli("repair", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "cannot repair" in err and f"declares journal format {fmt!r}" in err
    if fmt == FORMAT_VERSION + 1:
        assert "newer than this agentjobs reads" in err
    assert _snapshot(jdir) == before and not list(jdir.glob("repair-*"))


def test_repair_refuses_a_damaged_header_that_reads_as_a_newer_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad checksum, but the bytes still say format 2: a flipped digit cannot be told
    from a journal a newer agentjobs wrote, so the header is not rewritten as format 1."""
    build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    path = jdir / segment_name(2)
    data = path.read_bytes()
    needle = b'"format":%d' % FORMAT_VERSION
    path.write_bytes(data.replace(needle, b'"format":%d' % (FORMAT_VERSION + 1), 1))
    before = _snapshot(jdir)
    assert cli("repair", str(tmp_path)) == 1
    assert "still reads format 2" in capsys.readouterr().err
    assert _snapshot(jdir) == before


def test_repair_refuses_a_header_it_cannot_derive_from_its_neighbours(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Segment 2 starts with events that do not follow segment 1 (copies of segment
    1's): no header written for it could make them consistent."""
    build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    one = _lines(jdir / segment_name(1))
    path = jdir / segment_name(2)
    path.write_bytes(_flip(_lines(path)[0], 10) + b"".join(one[1:]))
    before = _snapshot(jdir)
    assert cli("repair", str(tmp_path)) == 1
    assert "its first event (seq 1) does not follow seq 9" in capsys.readouterr().err
    assert _snapshot(jdir) == before


def test_repair_refuses_a_damaged_compacted_header_with_segments_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A compacted file's header (it still shows `compacted_from`) with segments before
    it: an interrupted compaction whose stale segments could not be recognised. Which
    to keep cannot be told."""
    build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    path = jdir / segment_name(2)
    header = _header_line(2, 9, compacted_from=1, seq_end=18)
    path.write_bytes(_flip(header, 10) + b"".join(_lines(path)[1:]))
    before = _snapshot(jdir)
    assert cli("repair", str(tmp_path)) == 1
    assert "an interrupted compaction?" in capsys.readouterr().err
    assert _snapshot(jdir) == before


def _compacted_data_dir(data_dir: Path, segment_bytes: int) -> tuple[Path, list[Event]]:
    """A journal compacted offline whose newest sealed events were dropped: the
    compacted file's `seq_end` is above its last event. Returns (its path, the events)."""
    directory = data_dir / "journal"

    async def go() -> list[Event]:
        journal, _ = make_journal(
            directory, FakeClock(1_700_000_000.0), segment_bytes=segment_bytes
        )
        out = []
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            out.append(await journal.commit("run_kept", E.SUBMITTED, {"prompt": "stays"}))
            for i in range(6):  # finished long ago: compaction drops them
                rid = f"run_old{i}"
                out.append(await journal.commit(rid, E.SUBMITTED, {"prompt": f"p{i}"}))
                out.append(await journal.commit(rid, E.STARTED, {"attempt": 1}))
                out.append(await journal.commit(rid, E.SUCCEEDED, {"result": i}))
            await journal.aclose()
        return out

    events = trio.run(go)
    assert cli("compact", str(data_dir)) == 0
    first = sorted(directory.glob("*.jsonl"))[0]
    header = decode_line(_lines(first)[0][:-1])
    assert header["seq_end"] == events[-1].seq > events[0].seq
    return first, events


@pytest.mark.parametrize("segment_bytes", [1024, 1 << 20])  # compacted into segment N>1, 1
@pytest.mark.parametrize("key_survives", [True, False])
def test_repair_of_a_damaged_compacted_header(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], segment_bytes: int, key_survives: bool
) -> None:
    """A compacted first segment: while the damaged bytes still show `compacted_from`,
    the header is rebuilt with `seq_end` from the next segment (sequence numbers of the
    dropped events are not used again); once that is gone too, it cannot be told from a
    segment that lost lines (or a journal missing its first segments): refused."""
    path, events = _compacted_data_dir(tmp_path, segment_bytes)
    jdir = path.parent
    capsys.readouterr()
    lines = _lines(path)
    key_at = lines[0].index(b'"compacted_from"')
    at = 10 if key_survives else key_at + 3
    path.write_bytes(_flip(lines[0], at, 0x20) + b"".join(lines[1:]))
    before = _snapshot(jdir)
    code = cli("repair", str(tmp_path))
    out, err = capsys.readouterr()
    if not key_survives:
        assert code == 1
        assert "cannot tell" in err
        assert _snapshot(jdir) == before
        return
    assert code == 0, err
    header = decode_line(_lines(path)[0][:-1])
    seg = int(path.stem)
    assert header["compacted_from"] == seg and header["seq"] == 0
    assert header["seq_end"] == events[-1].seq
    assert f"seq_end {events[-1].seq}" in out
    state, journal = replay_dir(jdir)
    try:
        assert set(state.runs) == {"run_kept"}
        assert journal.last_seq == events[-1].seq  # the next event is numbered after it
    finally:
        journal.close_files()
    assert cli("verify", str(tmp_path)) == 0


@functools.cache
def _template() -> tuple[Path, tuple[Event, ...]]:
    """One journal of three segments, built once for every hypothesis example."""
    where = Path(tempfile.mkdtemp(prefix="agentjobs-repair-"))
    return where, tuple(build_data_dir(where, segment_bytes=1024))


HEADER_HIT = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True), st.booleans()),
    st.tuples(
        st.just("junk"),
        st.floats(0, 1, exclude_max=True),
        st.binary(min_size=1, max_size=40).map(
            lambda b: bytes(c for c in b if c not in b'"{') or b"?"
        ),
    ),
)


@PROFILE
@given(
    seg=st.integers(1, 3),
    hit=HEADER_HIT,
    middle=st.none() | st.tuples(st.integers(1, 20), st.integers(0, 400), st.integers(1, 255)),
    torn=st.none() | st.integers(1, 60),
)
def test_repair_of_header_damage_property(
    seg: int,
    hit: tuple[str, float, Any],
    middle: tuple[int, int, int] | None,
    torn: int | None,
) -> None:
    """Any damage to one header, optionally with a damaged event line in the same segment
    and a torn tail on the journal: repair either refuses (only for a header that reads
    as a newer format) having changed nothing, or leaves a journal that verifies clean and
    replays exactly the events before the first damaged event line (all of them if only
    the header and the tail were hit), with every byte kept (kept + moved = damaged)."""
    template, events = _template()
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch) / "data"
        shutil.copytree(template, data_dir)
        jdir = data_dir / "journal"
        path = jdir / segment_name(seg)
        lines = _lines(path)
        h = lines[0]
        kind, where, arg = hit
        at = int(where * len(h))
        if kind == "flip":
            bad = _flip(h, at, arg)
        elif kind == "cut":
            bad = h[:at] + (b"\n" if arg else b"")
        else:
            bad = h[:at] + arg + h[at + len(arg) :]
        body = list(lines[1:])
        lost_from: int | None = None  # seq of the first event that must not be replayed
        if middle is not None:
            k = middle[0] % len(body)
            line = body[k]
            body[k] = _flip(line, middle[1] % len(line), middle[2])
            lost_from = decode_line(line[:-1])["seq"]
        path.write_bytes(bad + b"".join(body))
        final = jdir / segment_name(3)
        if torn is not None:
            last = _lines(final)[-1]
            final.write_bytes(final.read_bytes() + last[: min(torn, len(last) - 1)])
        before = _snapshot(jdir)
        code, out, err = _run_cli("repair", str(data_dir))
        event("refused" if code else "header rebuilt" if "fresh header" in out else "moved")
        if code != 0:
            assert code == 1 and "newer than this agentjobs reads" in err, err
            assert _snapshot(jdir) == before
            return
        # no byte lost: what is left (without the fresh headers) and what was moved
        # (before anything opens the journal: an emptied one gets a new segment 1)
        moved = sum(len(b) for b in _side_files(jdir).values())
        left = 0
        for name, data in _snapshot(jdir).items():
            if name.endswith(".jsonl"):
                fresh = name == path.name and "fresh header" in out
                left += len(data) - (len(_lines(jdir / name)[0]) if fresh else 0)
        assert left + moved == sum(len(b) for n, b in before.items() if n.endswith(".jsonl"))
        assert _run_cli("verify", str(data_dir))[0] == 0
        want = [_key(e) for e in events if lost_from is None or e.seq < lost_from]
        assert _replayed(jdir) == want, out


def _run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["log", *argv])
    return code, out.getvalue(), err.getvalue()


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("verify", str(tmp_path / "nowhere")) == 1
    assert "no journal in" in capsys.readouterr().err
    assert cli() == 2


def test_the_console_entry_point(tmp_path: Path) -> None:
    build_data_dir(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "agentjobs", "log", "verify", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
