# ruff: noqa: ASYNC230, ASYNC240 - tests inspect files and poll threads on purpose
"""The journal on disk: line format, replay, the torn-tail rule at every byte offset,
byte flips, segments and their continuity, the directory lock, closing."""

from __future__ import annotations

import enum
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from test_journal_support import NO_FSYNC, PROFILE, FakeClock, make_journal, settings

from agentjobs.engine.journal import (
    FORMAT_VERSION,
    MAGIC,
    IOHooks,
    Journal,
    JournalBusy,
    JournalClosed,
    JournalCorrupt,
    JournalError,
    acquire_lock,
    decode_line,
    encode_line,
    header_obj,
    release_lock,
    scan,
    segment_name,
)
from agentjobs.engine.model import Event, EventType
from agentjobs.engine.state import State, apply

E = EventType


# -- helpers ---------------------------------------------------------------------------


async def write_log(directory: Path, n: int, **kwargs: object) -> list[Event]:
    """A small closed journal with `n` events about a few runs (legal sequences)."""
    journal, _ = make_journal(directory, FakeClock(), **kwargs)  # type: ignore[arg-type]
    events = []
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for i in range(n):
            rid = f"run_{i // 3}"
            kind = (E.SUBMITTED, E.STARTED, E.SUCCEEDED)[i % 3]
            data = {"prompt": f"p{i}"} if kind is E.SUBMITTED else {"result": "é" * (i % 4)}
            if kind is E.STARTED:
                data = {"attempt": 1}
            events.append(await journal.commit(rid, kind, data))
        await journal.aclose()
    return events


def read_events(directory: Path, hooks: IOHooks | None = None) -> tuple[list[Event], Journal]:
    got: list[Event] = []
    journal = Journal(directory, "fsync", hooks=hooks)
    journal.open(got.append)
    return got, journal


def line_starts(data: bytes) -> list[int]:
    """Offsets where each line starts, plus len(data)."""
    starts = [0]
    for i, b in enumerate(data):
        if b == 0x0A:
            starts.append(i + 1)
    return starts


def fresh_copy(src: Path, parent: Path) -> Path:
    d = Path(tempfile.mkdtemp(dir=parent))
    for p in src.iterdir():
        if p.name != "LOCK":
            shutil.copy(p, d / p.name)
    return d


# -- format ----------------------------------------------------------------------------


def test_line_format_checksum_covers_the_object_without_the_crc() -> None:
    obj = {"seq": 1, "ts": 1.5, "run": "r", "type": "submitted", "data": {"prompt": "é\n"}}
    line = encode_line(obj)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert line.startswith(b'{"crc":"')
    parsed = orjson.loads(line)
    crc = parsed.pop("crc")
    assert crc == f"{zlib.crc32(orjson.dumps(parsed)):08x}"
    assert decode_line(line[:-1]) == obj


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda b: b[:-1], "checksum"),
        (lambda b: b.replace(b'"crc"', b'"crd"'), "prefix"),
        (lambda b: b[:8] + b[8:16].upper() + b[16:], "checksum"),
        (lambda b: b"x" + b, "prefix"),
        (lambda b: b.replace(b'"seq":1', b'"seq":2'), "checksum"),
    ],
)
def test_decode_rejects_damaged_lines(mutate: object, why: str) -> None:
    line = encode_line({"seq": 1, "ts": 1.0, "run": "r", "type": "output", "data": {"t": "ab"}})
    bad = mutate(line[:-1])  # type: ignore[operator]
    with pytest.raises(ValueError, match=why):
        decode_line(bad)


async def test_header_and_events_round_trip(tmp_path: Path) -> None:
    events = await write_log(tmp_path, 9)
    data = (tmp_path / segment_name(1)).read_bytes()
    header = decode_line(data.split(b"\n")[0])
    assert header["format"] == FORMAT_VERSION and header["magic"] == MAGIC
    assert header["segment"] == 1 and header["seq"] == 0
    got, journal = read_events(tmp_path)
    journal.close_files()
    assert got == events
    assert [e.seq for e in got] == list(range(1, 10))


async def test_live_events_carry_what_replay_will_see(tmp_path: Path) -> None:
    journal, state = make_journal(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        ev = await journal.commit("r", E.SUBMITTED, {"prompt": "p", "config": {"t": (1, 2)}})
        assert ev.data["config"] == {"t": [1, 2]}  # normalised like the file
        with pytest.raises(TypeError):
            journal.append("r", E.OUTPUT, {"text": object()})
        assert journal.last_seq == 1  # the failed encode took no seq
        ev2 = await journal.commit("r", E.STARTED, {"attempt": 1})
        assert ev2.seq == 2
        await journal.aclose()
    got, j2 = read_events(tmp_path)
    j2.close_files()
    assert got == [ev, ev2]
    assert state.runs["r"].spec.config == {"t": [1, 2]}


async def test_newer_format_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    await write_log(tmp_path, 3)
    path = tmp_path / segment_name(1)
    lines = path.read_bytes().split(b"\n")
    header = decode_line(lines[0])
    header["format"] = FORMAT_VERSION + 1
    path.write_bytes(b"\n".join([encode_line(header)[:-1], *lines[1:]]))
    with pytest.raises(JournalCorrupt, match=r"00000001\.jsonl:1: journal format 2 is newer"):
        read_events(tmp_path)


async def test_event_rejected_by_the_fold_names_its_line(tmp_path: Path) -> None:
    journal, _ = make_journal(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        await journal.aclose()
    # an event the state machine forbids, written behind the journal's back
    path = tmp_path / segment_name(1)
    bad = {"seq": 2, "ts": 2.0, "run": "r", "type": "succeeded", "data": {}}
    with open(path, "ab") as f:
        f.write(encode_line(bad))
    state = State()
    j2 = Journal(tmp_path, "fsync")
    with pytest.raises(JournalCorrupt, match=r"00000001\.jsonl:3: .*illegal transition"):
        j2.open(lambda e: apply(state, e))
    # the lock was released on the way out
    release_lock(acquire_lock(tmp_path))


async def test_an_intact_line_out_of_sequence_is_corruption_not_a_torn_tail(tmp_path: Path) -> None:
    await write_log(tmp_path, 3)
    path = tmp_path / segment_name(1)
    with open(path, "ab") as f:
        f.write(encode_line({"seq": 2, "ts": 9.0, "run": "x", "type": "output", "data": {}}))
    with pytest.raises(JournalCorrupt, match=r":5: sequence number 2 does not follow 3"):
        read_events(tmp_path)


# -- the torn-tail rule ------------------------------------------------------------------


async def test_cut_at_every_byte_offset_opens_to_the_complete_lines(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = tmp_path / "src"
    events = await write_log(src, 5)
    data = (src / segment_name(1)).read_bytes()
    starts = line_starts(data)
    assert starts[-1] == len(data)
    caplog.set_level(logging.WARNING, "agentjobs.journal")
    fast = NO_FSYNC  # fsync is no part of this property, and costs ~4 per offset
    for cut in range(len(data) + 1):
        d = tmp_path / f"cut{cut}"
        d.mkdir()
        (d / segment_name(1)).write_bytes(data[:cut])
        complete = sum(1 for s in starts[1:] if s <= cut)  # lines fully present
        caplog.clear()
        got, journal = read_events(d, fast)
        assert got == events[: max(0, complete - 1)], cut
        line_start = max(s for s in starts if s <= cut)
        torn = cut - line_start
        sides = sorted(d.glob("*.torn-*"))
        if torn:
            assert len(sides) == 1 and sides[0].read_bytes() == data[line_start:cut]
            assert f"{torn} bytes at line {complete + 1}" in caplog.text
        else:
            assert sides == [] and "torn" not in caplog.text
        if cut % 4 and cut not in starts:
            journal.close_files()
            shutil.rmtree(d)
            continue
        # the journal is whole again: writable, and a reopen needs no cut
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            ev = await journal.commit("run_new", E.SUBMITTED, {"prompt": "again"})
            await journal.aclose()
        assert ev.seq == (got[-1].seq if got else 0) + 1
        again, j2 = read_events(d, fast)
        j2.close_files()
        assert again == [*got, ev]
        shutil.rmtree(d)


async def test_damage_before_an_intact_line_refuses_with_file_and_line(tmp_path: Path) -> None:
    await write_log(tmp_path, 6)
    path = tmp_path / segment_name(1)
    data = bytearray(path.read_bytes())
    starts = line_starts(bytes(data))
    data[starts[3] + 30] ^= 0x01  # inside line 4; lines 5.. are intact
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt) as info:
        read_events(tmp_path)
    assert info.value.line == 4 and info.value.path == path
    assert f"{path}:4:" in str(info.value)
    assert list(tmp_path.glob("*.torn-*")) == []  # nothing was cut
    assert path.read_bytes() == bytes(data)


async def test_damaged_last_lines_with_nothing_intact_after_are_a_torn_tail(
    tmp_path: Path,
) -> None:
    events = await write_log(tmp_path, 6)
    path = tmp_path / segment_name(1)
    data = path.read_bytes()
    starts = line_starts(data)
    garbage = b"\x00" * 50 + b"\n" + b'{"crc":"00000000","x":1}\n' + b"\x00" * 10
    path.write_bytes(data + garbage)
    got, journal = read_events(tmp_path)
    journal.close_files()
    assert got == events
    assert path.read_bytes() == data
    (side,) = tmp_path.glob("*.torn-*")
    assert side.read_bytes() == garbage
    assert len(starts) == 8


def expected_after_damage(damaged: bytes) -> tuple[int, bool]:
    """The oracle for one damaged single-segment log, from first principles: the first line
    that does not decode (1-based), and whether an intact line follows it."""
    parts = damaged.split(b"\n")
    complete, rest = parts[:-1], parts[-1]

    def ok(line: bytes) -> bool:
        try:
            decode_line(line)
            return True
        except ValueError:
            return False

    for i, line in enumerate(complete):
        if not ok(line):
            return i + 1, any(ok(x) for x in complete[i + 1 :])
    assert rest, "an undamaged log"
    return len(complete) + 1, False


@settings(PROFILE, max_examples=150)
@given(st.data())
async def test_random_byte_flips_are_detected(tmp_path: Path, data: st.DataObject) -> None:
    src = tmp_path / "flip-src"
    if not src.exists():
        await write_log(src, 6)
    original = (src / segment_name(1)).read_bytes()
    events, j = read_events(src)
    j.close_files()
    starts = line_starts(original)
    offset = data.draw(st.integers(0, len(original) - 1), label="offset")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != original[offset]), label="value")
    damaged = bytearray(original)
    damaged[offset] = value
    d = fresh_copy(src, tmp_path)
    (d / segment_name(1)).write_bytes(bytes(damaged))
    flipped_line = max(i for i, s in enumerate(starts[:-1]) if s <= offset) + 1
    bad_line, intact_after = expected_after_damage(bytes(damaged))
    assert bad_line == flipped_line  # the checksum catches every single-byte change
    if intact_after:
        with pytest.raises(JournalCorrupt) as info:
            read_events(d, NO_FSYNC)
        assert info.value.line == bad_line
        assert (d / segment_name(1)).read_bytes() == bytes(damaged)  # untouched
    else:
        got, journal = read_events(d, NO_FSYNC)
        journal.close_files()
        assert got == events[: max(0, bad_line - 2)]
        (side,) = d.glob("*.torn-*")
        assert side.read_bytes() == bytes(damaged[starts[bad_line - 1] :])
    shutil.rmtree(d)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:8] + b[8:16].upper() + b[16:],  # hex case: same number, other bytes
        lambda b: b.replace(b'"crc"', b'"crd"', 1),
        lambda b: b.replace(b'",', b"',", 1),
        lambda b: b[:-3] + b"}" + b[-3:],
        lambda b: b.replace(b'"seq":', b'"seq" :', 1),
    ],
)
async def test_open_refuses_each_kind_of_damage_in_a_middle_line(
    tmp_path: Path, mutate: object
) -> None:
    await write_log(tmp_path, 6)
    path = tmp_path / segment_name(1)
    lines = path.read_bytes().split(b"\n")
    lines[3] = mutate(lines[3])  # type: ignore[operator]
    assert lines[3][8:16].lower() >= b"a"  # sanity: still looks like a line
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalCorrupt) as info:
        read_events(tmp_path)
    assert info.value.line == 4


# -- segments --------------------------------------------------------------------------


async def test_segments_rotate_at_the_size_limit_and_replay_in_order(tmp_path: Path) -> None:
    events = await write_log(tmp_path, 60, segment_bytes=1024)
    segs = sorted(tmp_path.glob("*.jsonl"))
    assert len(segs) > 3
    expected_seq = 0
    for i, path in enumerate(segs, start=1):
        assert path.name == segment_name(i)
        data = path.read_bytes()
        header = decode_line(data.split(b"\n")[0])
        assert header["segment"] == i and header["seq"] == expected_seq
        if i > 1:  # the sealed predecessor, exactly as it is on disk
            before = segs[i - 2].read_bytes()
            assert header["prev_bytes"] == len(before)
            assert header["prev_crc"] == f"{zlib.crc32(before):08x}"
        lines = data.split(b"\n")[1:-1]
        if lines:
            expected_seq = decode_line(lines[-1])["seq"]
        assert len(data) < 1024 + 200  # one batch (one line here) past the limit at most
    got, journal = read_events(tmp_path)
    try:
        assert got == events
        for rid in {e.run for e in events}:
            assert journal.history(rid) == [e for e in events if e.run == rid]
            assert journal.history(rid, after_seq=events[30].seq) == [
                e for e in events if e.run == rid and e.seq > events[30].seq
            ]
    finally:
        journal.close_files()


async def test_a_missing_middle_segment_is_named(tmp_path: Path) -> None:
    await write_log(tmp_path, 40, segment_bytes=1024)
    (tmp_path / segment_name(2)).unlink()
    with pytest.raises(
        JournalCorrupt, match=r"00000003\.jsonl:1: segment 00000002\.jsonl is missing"
    ):
        read_events(tmp_path)


async def test_damage_in_a_sealed_segment_is_found_line_by_line(tmp_path: Path) -> None:
    """The whole-file CRC in the next header no longer matches, so every line is checked."""
    await write_log(tmp_path, 40, segment_bytes=1024)
    path = tmp_path / segment_name(1)
    lines = path.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b'"seq":', b'"seq" :', 1)  # valid JSON, wrong checksum
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(JournalCorrupt, match=r"00000001\.jsonl:5: checksum mismatch"):
        read_events(tmp_path)


async def test_missing_first_segments_are_named(tmp_path: Path) -> None:
    await write_log(tmp_path, 40, segment_bytes=1024)
    (tmp_path / segment_name(1)).unlink()
    with pytest.raises(JournalCorrupt, match=r"segments before 00000002\.jsonl are missing"):
        read_events(tmp_path)


async def test_cut_anywhere_in_a_sealed_segment_refuses(tmp_path: Path) -> None:
    src = tmp_path / "src"
    await write_log(src, 24, segment_bytes=1024)
    assert len(list(src.glob("*.jsonl"))) >= 3
    sealed = (src / segment_name(1)).read_bytes()
    for cut in range(0, len(sealed), 7):  # every 7th offset keeps it quick
        d = fresh_copy(src, tmp_path)
        (d / segment_name(1)).write_bytes(sealed[:cut])
        with pytest.raises(JournalCorrupt) as info:
            read_events(d)
        text = str(info.value)
        # mid-line: named in segment 1; at a line boundary: segment 2 notices the gap
        assert ("00000001.jsonl:" in text) or ("00000002.jsonl:1:" in text), text
        shutil.rmtree(d)


async def test_empty_final_segment_from_a_crash_at_creation_gets_its_header(
    tmp_path: Path,
) -> None:
    events = await write_log(tmp_path, 40, segment_bytes=1024)
    last = max(int(p.name[:8]) for p in tmp_path.glob("*.jsonl"))
    (tmp_path / segment_name(last + 1)).write_bytes(b"")  # created, crashed before header
    got, journal = read_events(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        ev = await journal.commit("run_z", E.SUBMITTED, {"prompt": "z"})
        await journal.aclose()
    assert got == events
    again, j2 = read_events(tmp_path)
    j2.close_files()
    assert again == [*events, ev]
    header = decode_line((tmp_path / segment_name(last + 1)).read_bytes().split(b"\n")[0])
    assert header["seq"] == events[-1].seq


async def test_header_seq_keeps_numbers_increasing_after_a_failed_batch(tmp_path: Path) -> None:
    """Seqs taken by a failed batch are never reused, and continuity still holds."""
    from agentjobs.engine.journal import IOHooks, JournalWriteError

    fail = {"on": False}

    def write(fd: int, buf: bytes) -> int:
        if fail["on"]:
            raise OSError(28, "No space left on device")
        return os.write(fd, buf)

    journal, _ = make_journal(tmp_path, segment_bytes=1024, hooks=IOHooks(write=write))
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        for i in range(20):
            await journal.commit(f"r{i}", E.SUBMITTED, {"prompt": "x" * 40})
        fail["on"] = True
        with pytest.raises(JournalWriteError):
            await journal.commit("bad", E.SUBMITTED, {"prompt": "x"})
        fail["on"] = False
        for i in range(20, 40):
            await journal.commit(f"r{i}", E.SUBMITTED, {"prompt": "x" * 40})
        await journal.aclose()
    got, j2 = read_events(tmp_path)
    j2.close_files()
    assert len(got) == 40 and "bad" not in {e.run for e in got}
    assert [e.seq for e in got] == [*range(1, 21), *range(22, 42)]


# -- lock, closing, memory -------------------------------------------------------------


async def test_the_data_directory_is_locked(tmp_path: Path) -> None:
    journal, _ = make_journal(tmp_path)
    with pytest.raises(JournalBusy, match=f"pid {os.getpid()}"):
        make_journal(tmp_path)
    with pytest.raises(JournalBusy):
        acquire_lock(tmp_path)
    journal.close_files()
    other, _ = make_journal(tmp_path)
    other.close_files()


async def test_aclose_flushes_queued_appends_then_refuses(tmp_path: Path) -> None:
    journal, state = make_journal(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        tickets = [journal.append(f"r{i}", E.SUBMITTED, {"prompt": "p"}) for i in range(50)]
        await journal.aclose()
        assert all(t.done for t in tickets)
        assert [(await t.wait()).seq for t in tickets] == list(range(1, 51))
        with pytest.raises(JournalClosed):
            journal.append("r", E.SUBMITTED, {"prompt": "p"})
    assert len(state.runs) == 50
    got, j2 = read_events(tmp_path)
    j2.close_files()
    assert len(got) == 50


async def test_a_cancelled_writer_fails_what_was_queued(tmp_path: Path) -> None:
    journal, state = make_journal(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        await journal.commit("r0", E.SUBMITTED, {"prompt": "p"})
        nursery.cancel_scope.cancel()
    ticket = None
    with pytest.raises(JournalClosed):
        ticket = journal.append("r1", E.SUBMITTED, {"prompt": "p"})
    assert ticket is None
    journal.close_files()
    assert list(state.runs) == ["r0"]


async def test_appends_before_open_or_writer_are_refused(tmp_path: Path) -> None:
    journal = Journal(tmp_path, "fsync")
    with pytest.raises(JournalClosed, match="not open"):
        journal.append("r", E.SUBMITTED, {"prompt": "p"})
    with pytest.raises(JournalClosed):
        await journal.run()
    journal.open()
    ticket = journal.append("r", E.SUBMITTED, {"prompt": "p"})
    await journal.aclose()  # the writer never ran: the queued append fails, nobody hangs
    with pytest.raises(JournalClosed):
        await ticket.wait()
    with pytest.raises(JournalError, match="already open"):
        journal.open()


async def test_memory_durability_keeps_history_and_touches_no_file(tmp_path: Path) -> None:
    journal, state = make_journal(None, durability="memory")
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        a = await journal.commit("r", E.SUBMITTED, {"prompt": "p"})
        b = await journal.commit("r", E.STARTED, {"attempt": 1})
        assert journal.history("r") == [a, b]
        assert journal.history("r", after_seq=1) == [b]
        assert journal.segments() == []
        await journal.aclose()
    assert state.runs["r"].attempt == 1
    assert list(tmp_path.iterdir()) == []


async def test_scan_is_read_only_and_reports_the_tail(tmp_path: Path) -> None:
    await write_log(tmp_path, 6)
    path = tmp_path / segment_name(1)
    path.write_bytes(path.read_bytes() + b'{"crc":"12')
    before = path.read_bytes()
    report = scan(tmp_path)
    assert report.damage is not None and report.damage.torn and report.damage.line == 8
    assert report.events == 6 and report.last_seq == 6
    assert path.read_bytes() == before


def test_header_obj_for_a_compacted_file() -> None:
    h = header_obj(7, 10, compacted_from=3, seq_end=99)
    assert (h["segment"], h["seq"], h["compacted_from"], h["seq_end"]) == (7, 10, 3, 99)


def test_the_format_doc_examples_are_real_lines() -> None:
    doc = Path(__file__).resolve().parent.parent / "docs" / "journal-format.md"
    examples = [ln for ln in doc.read_text().splitlines() if ln.startswith('{"crc":"')]
    assert len(examples) == 2
    event, header = (decode_line(ln.encode()) for ln in examples)
    assert event["type"] == "progress" and event["seq"] == 42
    assert header["magic"] == MAGIC and header["format"] == FORMAT_VERSION


class _Level(enum.IntEnum):
    LOW = 1


_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=6)
_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats()  # NaN and infinities included: JSON turns them into null
    | _TEXT
    | st.sampled_from([E.OUTPUT, _Level.LOW])  # str and int subclasses
)
_JSONISH = st.recursive(
    _LEAVES,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(_TEXT, inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(PROFILE, max_examples=60)
@given(datas=st.lists(st.dictionaries(_TEXT, _JSONISH, max_size=4), min_size=1, max_size=5))
async def test_live_events_equal_replayed_events_for_any_json_data(
    tmp_path: Path, datas: list[dict[str, object]]
) -> None:
    directory = Path(tempfile.mkdtemp(dir=tmp_path))
    committed: list[Event] = []
    journal = Journal(directory, "fsync", committed.extend, hooks=NO_FSYNC)
    journal.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        returned = [await journal.commit("r", E.OUTPUT, data) for data in datas]
        await journal.aclose()
    replayed, j2 = read_events(directory, NO_FSYNC)
    j2.close_files()
    # NaN != NaN, so compare the JSON forms, and also the Python types along the way
    assert orjson.dumps([e.data for e in replayed]) == orjson.dumps([e.data for e in committed])
    assert repr(replayed) == repr(committed) == repr(returned)
