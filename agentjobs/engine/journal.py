"""The append-only JSONL event journal: group commit, replay, per-run history.

Why it is shaped like this
--------------------------

* **One writer task.** Callers never touch the file. `append` numbers and encodes an event
  on the caller's side (so an unencodable result fails the caller, not the writer) and
  queues it; the writer task takes *everything queued at that moment* and issues one
  `write` and, if any of those events asked for it under `fsync` durability, one `fsync`
  (in a worker thread, so the event loop never blocks on the disk). A thousand concurrent
  submits cost one fsync, not a thousand, and never one thread hop per line.
* **Apply after durable.** Only once a batch is on disk (per the durability setting) are
  its events handed, in sequence order, to `on_commit` (the engine folds them into state
  and fans them out), and only then are the waiters released. So the in-memory state is
  always the replay of what the journal holds: an event that failed to reach the disk was
  never seen by anyone.
* **What you get back is what replay sees.** The event handed to `on_commit` carries the
  data decoded from the encoded line, not the caller's object, so a tuple that became a
  list (or any other JSON normalisation) looks the same live and after a restart.
* **A failed write or fsync fails the whole batch** and is never reported as success. The
  file is cut back to where the batch began. After a failed *fsync* we do not trust the
  page cache (PostgreSQL's lesson: the kernel may have dropped dirty pages and will not say
  so again), so the file is cut back to the last successful fsync and the already-applied,
  not-yet-synced lines (progress and output written without waiting) are written again
  from memory before anything else. The next batch retries, so the journal heals by itself
  once space returns. If even cutting back fails, the journal is *broken*: every later
  append fails until the process restarts and replay sorts the file out.
* **Damage is never skipped.** On open, an incomplete last line (a crash mid-write), or
  damage in the final segment with no intact line after it, is a torn tail: it is cut, the
  cut bytes are kept in a side file and a warning says how many bytes at which line.
  Anything else (a bad line with intact lines after it, a gap in the segments or in the
  sequence numbers, an event the state fold rejects) raises `JournalCorrupt` naming
  file:line; `agentjobs log repair` moves such a tail aside explicitly.
* **Segments** rotate at a size limit. Each header records the sequence number the file
  starts after, so a sealed segment that lost lines at its end is noticed when the next
  one is read, and seq numbers never go backwards even after compaction dropped the
  newest events of a sealed range.

The line format, the header, segments, compaction and the torn-tail rule are documented in
`docs/journal-format.md`; keep the two in step.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import fcntl
import gc
import logging
import os
import re
import sys
import time
import zlib
from array import array
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal, TypeAlias, TypeVar

import attrs
import orjson
import trio

from ._iothread import IOThread
from .model import Event, EventType

if TYPE_CHECKING:
    from .compaction import CompactionReport

__all__ = [
    "DURABILITIES",
    "FORMAT_VERSION",
    "MAGIC",
    "Damage",
    "Durability",
    "IOHooks",
    "Journal",
    "JournalBusy",
    "JournalClosed",
    "JournalCorrupt",
    "JournalError",
    "JournalWriteError",
    "ReplayReport",
    "ScanReport",
    "Ticket",
    "acquire_lock",
    "decode_line",
    "encode_line",
    "event_from_obj",
    "header_obj",
    "list_segments",
    "prepare_directory",
    "release_lock",
    "scan",
    "segment_name",
]

log = logging.getLogger("agentjobs.journal")

FORMAT_VERSION: Final = 1
MAGIC: Final = "agentjobs-journal"
Durability = Literal["fsync", "os", "memory"]
DURABILITIES: Final[tuple[str, ...]] = ("fsync", "os", "memory")

LOCK_NAME: Final = "LOCK"
COMPACT_TMP_SUFFIX: Final = ".compact-tmp"
_PREFIX: Final = b'{"crc":"'
_PREFIX_LEN: Final = len(_PREFIX)  # 8
_BODY_AT: Final = _PREFIX_LEN + 8 + 2  # after `{"crc":"xxxxxxxx",`
_CRC_BRACE: Final = zlib.crc32(b"{")  # crc32 state after the `{` the body starts with
SEGMENT_RE: Final = re.compile(r"^(\d{8})\.jsonl$")
SEG_SHIFT: Final = 40  # position = segment << 40 | byte offset (segments up to 1 TiB)
_OFFSET_MASK: Final = (1 << SEG_SHIFT) - 1

_EVENT_TYPES: Final[dict[str, EventType]] = {t.value: t for t in EventType}
# The history index: a run's line positions as packed native int64s in a `bytes` while it
# has at most this many (57 B for three, against 120 B for an `array('q')` that has grown
# to three), then an `array('q')` that appends in place.
_INLINE_POSITIONS: Final = 8
_INLINE_BYTES: Final = 8 * _INLINE_POSITIONS
_BYTEORDER: Final = sys.byteorder
Positions: TypeAlias = "bytes | array[int]"
# The start of an event line as `append` (and compaction) write it: enough to learn its
# seq and type without reading or decoding the rest. A line it does not match is decoded.
_HEAD_RE: Final = re.compile(
    rb'\{"crc":"[0-9a-f]{8}","seq":([0-9]+),"ts":[-+.0-9eE]+,'
    rb'"run":"(?:[^"\\]|\\.)*","type":"([a-z_]+)"'
)
_HEAD_READ: Final = 256  # bytes read to match _HEAD_RE (run ids are short)
_EXACT_SCALARS: Final = frozenset({str, int, bool, type(None)})
_INF: Final = float("inf")


def _json_exact_flat(data: dict[str, Any]) -> bool:
    """Would a JSON round trip give `data` back unchanged? Cheaply, for flat dicts only.

    True when every key is a `str` and every value an exact `str`, `int`, `bool`, None or
    finite float (no subclasses: an IntEnum or a str subclass comes back as its base
    type; NaN and infinities come back as null). Nested values answer False: the caller
    then round-trips for real.
    """
    if type(data) is not dict:
        return False
    for k, v in data.items():
        t = type(v)
        if type(k) is not str:
            return False
        if t in _EXACT_SCALARS or (t is float and -_INF < v < _INF):
            continue
        return False
    return True


# -- the history index -------------------------------------------------------------


def _index_add(index: dict[str, Positions], run: str, position: int) -> None:
    """Record one more line of `run` (positions only ever grow, in file order)."""
    held = index.get(run)
    if held is None:
        index[run] = position.to_bytes(8, _BYTEORDER)
    elif isinstance(held, array):
        held.append(position)
    elif len(held) < _INLINE_BYTES:
        index[run] = held + position.to_bytes(8, _BYTEORDER)
    else:
        grown = array("q")
        grown.frombytes(held)
        grown.append(position)
        index[run] = grown


def _as_array(held: Positions) -> array[int]:
    """The positions as an array: a copy for the packed form, the index's own otherwise.

    Never a memoryview of an `array`: an exported buffer would stop the writer from
    appending to it.
    """
    if isinstance(held, array):
        return held
    out = array("q")
    out.frombytes(held)
    return out


def _shrink(positions: array[int]) -> Positions:
    """The compact form of a freshly built array (replay, compaction)."""
    return positions.tobytes() if len(positions) <= _INLINE_POSITIONS else positions


def _last_position(held: Positions) -> int:
    if isinstance(held, array):
        return held[-1]
    return int.from_bytes(held[-8:], _BYTEORDER)


T = TypeVar("T")


class JournalError(Exception):
    """Base class of journal failures."""


class JournalCorrupt(JournalError):
    """Damage that is not a torn tail: refuse to open, name the place."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class JournalWriteError(JournalError):
    """The batch holding this append could not be made durable; nothing of it was applied."""


class JournalClosed(JournalError):
    """The journal is closed (engine shutting down) or was never opened."""


class JournalBusy(JournalError):
    """The data directory is locked by another live process (or another Journal)."""


# -- encoding ------------------------------------------------------------------------


def encode_line(obj: dict[str, Any]) -> bytes:
    """`obj` as one journal line: `{"crc":"<crc32 of the rest>",...rest...}\\n`.

    The checksum covers the JSON of the object without the crc member, so verifying a line
    needs no re-encoding: crc32 the bytes after the 18-byte prefix, continuing from `{`.
    """
    body = orjson.dumps(obj)
    return b'{"crc":"%08x",' % zlib.crc32(body) + body[1:] + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """The object in a journal line (without its newline), or ValueError saying why not.

    The slow, precise path (used for headers, tools and diagnosis); replay has an inlined
    fast path that accepts exactly the same lines.
    """
    if not line.startswith(_PREFIX) or line[_BODY_AT - 2 : _BODY_AT] != b'",':
        raise ValueError("not a journal line (no checksum prefix)")
    crc = zlib.crc32(memoryview(line)[_BODY_AT:], _CRC_BRACE)
    if line[_PREFIX_LEN : _BODY_AT - 2] != b"%08x" % crc:
        raise ValueError("checksum mismatch")
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):  # pragma: no cover - the prefix makes it an object
        raise ValueError("line is not a JSON object")
    del obj["crc"]
    return obj


def event_from_obj(obj: dict[str, Any]) -> Event:
    """An `Event` from a decoded line, or ValueError naming what is missing or wrong."""
    try:
        seq, ts, run, etype, data = obj["seq"], obj["ts"], obj["run"], obj["type"], obj["data"]
    except KeyError as exc:
        raise ValueError(f"missing field {exc}") from None
    if type(seq) is not int or seq <= 0:
        raise ValueError(f"bad seq {seq!r}")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise ValueError(f"bad ts {ts!r}")
    if not isinstance(run, str):
        raise ValueError(f"bad run id {run!r}")
    if not isinstance(data, dict):
        raise ValueError("data is not an object")
    try:
        return Event(seq=seq, ts=ts, run=run, type=_EVENT_TYPES[etype], data=data)
    except (KeyError, TypeError):
        raise ValueError(f"unknown event type {etype!r}") from None


def header_obj(
    segment: int,
    seq: int,
    *,
    created: float | None = None,
    compacted_from: int | None = None,
    seq_end: int | None = None,
    prev: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """The first line of a segment.

    `seq`: every event in this file (and after it) has a greater sequence number; for a
    segment that follows another it equals the last seq of the one before, which is how a
    sealed segment that lost lines at its end is caught. A compacted file also has
    `compacted_from` (the first segment it replaces) and `seq_end` (the last seq of the
    range it replaces, which may have been dropped). A segment started by rotation also
    records the sealed one's exact length and CRC-32 (`prev_bytes`, `prev_crc`): when the
    sealed file still matches them, replay checks it with one whole-file CRC instead of
    one per line (a mismatch, e.g. after compaction rewrote it, means per-line checks).
    """
    obj: dict[str, Any] = {"format": FORMAT_VERSION, "magic": MAGIC, "segment": segment}
    obj["seq"] = seq
    obj["created"] = time.time() if created is None else created
    if compacted_from is not None:
        obj["compacted_from"] = compacted_from
        obj["seq_end"] = seq if seq_end is None else seq_end
    if prev is not None:
        obj["prev_bytes"], obj["prev_crc"] = prev[0], f"{prev[1]:08x}"
    return obj


def segment_name(segment: int) -> str:
    return f"{segment:08d}.jsonl"


def list_segments(directory: Path) -> list[int]:
    """Segment numbers present in `directory`, ascending (side and temp files ignored)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = []
    for name in names:
        m = SEGMENT_RE.match(name)
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def _read_header(path: Path) -> dict[str, Any] | None:
    """The decoded header of a segment, or None if it has no intact one."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
    except FileNotFoundError:
        return None
    if not first.endswith(b"\n"):
        return None
    try:
        obj = decode_line(first[:-1])
    except ValueError:
        return None
    return obj if obj.get("magic") == MAGIC else None


def _fsync_dir(directory: Path, fsync: Callable[[int], None] = os.fsync) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        fsync(dfd)
    finally:
        os.close(dfd)


# -- the lock ------------------------------------------------------------------------


def acquire_lock(directory: Path) -> int:
    """Take the exclusive lock on a journal directory; return its fd (keep it open).

    `flock` dies with its process, so a lock that cannot be taken means a live process
    (a server, or a maintenance command) is using the directory. The pid is written into
    the file only as a hint for the error message.
    """
    fd = os.open(directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        try:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
        finally:
            os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise JournalBusy(
                f"{directory} is in use by another agentjobs process (pid {holder})"
            ) from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(fd: int) -> None:
    os.close(fd)  # closing the only descriptor of the open file releases the flock


# -- scanning (open, verify, inspect, repair) ------------------------------------------


@attrs.frozen(slots=True)
class Damage:
    """Where a journal stops being readable, and whether open may cut it as a torn tail."""

    path: Path
    segment: int
    line: int  # 1-based line number in the segment (1 is the header)
    offset: int  # byte offset of that line in the segment
    reason: str
    torn: bool  # True when it is the final segment's tail with no intact line after it

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


@attrs.define(slots=True, eq=False)
class _SegmentScan:
    last_seq: int
    events: int
    damage: Damage | None
    header: dict[str, Any] | None


def _intact_line_after(data: bytes, pos: int) -> bool:
    """Is there any intact line at or after `pos`? If not, damage before it is a torn tail."""
    n = len(data)
    while pos < n:
        end = data.find(b"\n", pos)
        if end < 0:
            return False
        try:
            decode_line(data[pos:end])
            return True
        except ValueError:
            pos = end + 1
    return False


def _scan_segment(
    path: Path,
    seg: int,
    data: bytes,
    last_seq: int,
    on_event: Callable[[Event], object] | None,
    positions: dict[str, array[int]] | None,
    *,
    final: bool,
    expect_seq: int | None,
    verified: bool = False,
) -> _SegmentScan:
    """Read one segment: check every line, hand events to `on_event`, index positions.

    The hot loop of replay. It avoids per-line copies (checksums over a memoryview,
    orjson parses the line in place) and defers every diagnosis to a slow path: only a line
    that fails the fast checks is looked at again to say precisely what is wrong with it.
    `verified`: the whole file matched the length and CRC recorded when it was sealed, so
    every line is byte for byte what the writer wrote and the per-line checks are skipped.
    """
    n = len(data)
    if n == 0:
        return _SegmentScan(last_seq, 0, None, None)
    end = data.find(b"\n")
    if end < 0:
        return _SegmentScan(
            last_seq, 0, Damage(path, seg, 1, 0, "incomplete header line", final), None
        )
    try:
        header = decode_line(data[:end])
    except ValueError as exc:
        torn = final and not _intact_line_after(data, end + 1)
        return _SegmentScan(last_seq, 0, Damage(path, seg, 1, 0, f"header: {exc}", torn), None)
    problem = _check_header(header, seg, expect_seq)
    if problem is not None:
        return _SegmentScan(last_seq, 0, Damage(path, seg, 1, 0, problem, False), header)
    last_seq = max(last_seq, header["seq"])

    mv = memoryview(data)
    find = data.find
    crc32 = zlib.crc32
    loads = orjson.loads
    types = _EVENT_TYPES
    new_event = Event
    base = seg << SEG_SHIFT
    pos = end + 1
    lineno = 1
    events = 0
    damage: Damage | None = None
    while pos < n:
        end = find(b"\n", pos)
        lineno += 1
        if end < 0:
            damage = Damage(path, seg, lineno, pos, "incomplete last line", final)
            break
        try:
            if not verified and data[pos : pos + _BODY_AT] != b'{"crc":"%08x",' % crc32(
                mv[pos + _BODY_AT : end], _CRC_BRACE
            ):
                raise ValueError
            obj = loads(mv[pos:end])
            seq = obj["seq"]
            if seq <= last_seq or type(seq) is not int:
                raise ValueError
            run = obj["run"]
            event = new_event(seq, obj["ts"], run, types[obj["type"]], obj["data"])
            if type(event.data) is not dict or type(run) is not str:
                raise ValueError
        except (ValueError, KeyError, TypeError):
            damage = _diagnose(path, seg, data, pos, end, lineno, last_seq, final)
            break
        if on_event is not None:
            try:
                on_event(event)
            except Exception as exc:
                reason = f"event seq {seq} ({obj['type']} of {run}) rejected: {exc}"
                damage = Damage(path, seg, lineno, pos, reason, False)
                break
        if positions is not None:
            p = positions.get(run)
            if p is None:
                positions[run] = array("q", (base | pos,))
            else:
                p.append(base | pos)
        last_seq = seq
        events += 1
        pos = end + 1
    seq_end = header.get("seq_end")
    if type(seq_end) is int:
        last_seq = max(last_seq, seq_end)
    return _SegmentScan(last_seq, events, damage, header)


def _check_header(header: dict[str, Any], seg: int, expect_seq: int | None) -> str | None:
    if header.get("magic") != MAGIC:
        return "first line is not an agentjobs journal header"
    fmt = header.get("format")
    if type(fmt) is not int or fmt < 1:
        return f"bad journal format {fmt!r}"
    if fmt > FORMAT_VERSION:
        return f"journal format {fmt} is newer than this agentjobs reads ({FORMAT_VERSION})"
    if header.get("segment") != seg:
        return f"header says segment {header.get('segment')!r}, the file name says {seg}"
    hseq = header.get("seq")
    if type(hseq) is not int or hseq < 0:
        return f"bad header seq {hseq!r}"
    if expect_seq is not None and hseq != expect_seq:
        if hseq > expect_seq:
            return (
                f"this segment starts after seq {hseq} but the previous one ends at seq "
                f"{expect_seq}: lines are missing at the end of segment {seg - 1:08d}"
            )
        return f"this segment starts after seq {hseq}, before the previous one ends ({expect_seq})"
    return None


def _diagnose(
    path: Path,
    seg: int,
    data: bytes,
    pos: int,
    end: int,
    lineno: int,
    last_seq: int,
    final: bool,
) -> Damage:
    """Say precisely what is wrong with the line at data[pos:end] (the slow path)."""
    try:
        obj = decode_line(data[pos:end])
    except ValueError as exc:
        # unreadable: a torn tail if nothing intact follows it in the final segment
        torn = final and not _intact_line_after(data, end + 1)
        return Damage(path, seg, lineno, pos, str(exc), torn)
    # an intact line that is not a valid event is a bug or tampering, never a torn write
    try:
        event = event_from_obj(obj)
    except ValueError as exc:
        return Damage(path, seg, lineno, pos, str(exc), False)
    if event.seq <= last_seq:
        reason = f"sequence number {event.seq} does not follow {last_seq}"
        return Damage(path, seg, lineno, pos, reason, False)
    return Damage(path, seg, lineno, pos, "unreadable line", False)  # pragma: no cover


def prepare_directory(
    directory: Path, *, dry_run: bool = False, fsync: Callable[[int], None] = os.fsync
) -> list[Path]:
    """Finish or undo an interrupted compaction; return the files removed (or to remove).

    A leftover `*.compact-tmp` means a compaction died before its atomic rename: the old
    segments are intact, so the temp file goes. A segment whose header says
    `compacted_from: F` replaced segments F .. itself-1, which are stale once it exists.
    """
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in sorted(names):
        if name.endswith(COMPACT_TMP_SUFFIX):
            removed.append(directory / name)
    segments = list_segments(directory)
    stale: set[int] = set()
    for seg in reversed(segments):
        if seg in stale:
            continue
        header = _read_header(directory / segment_name(seg))
        if header is None:
            continue
        start = header.get("compacted_from")
        if type(start) is int and start < seg:
            stale.update(s for s in segments if start <= s < seg)
    removed.extend(directory / segment_name(s) for s in sorted(stale))
    if not dry_run and removed:
        for path in removed:
            path.unlink(missing_ok=True)
            log.warning("journal: removed %s (left over from an interrupted compaction)", path)
        _fsync_dir(directory, fsync)
    return removed


@attrs.define(slots=True, eq=False)
class ScanReport:
    """What `scan` found: how much is readable, and the first damage if any."""

    segments: list[int] = attrs.Factory(list)
    events: int = 0
    bytes: int = 0
    last_seq: int = 0
    damage: Damage | None = None
    stale: list[Path] = attrs.Factory(list)  # files open() would remove first
    last_header: dict[str, Any] | None = None  # header of the final segment, if intact


def scan(
    directory: Path,
    on_event: Callable[[Event], object] | None = None,
    *,
    positions: dict[str, array[int]] | None = None,
    skip_stale: bool = True,
) -> ScanReport:
    """Read a journal directory without changing it, stopping at the first damage.

    Shared by `Journal.open` (which then cuts a torn tail or raises) and the `log`
    commands (which report, or move the damage aside). Events go to `on_event` in order;
    an exception from it is damage at that line (replay would fail there too).
    """
    report = ScanReport()
    stale = prepare_directory(directory, dry_run=True) if skip_stale else []
    report.stale = stale
    stale_names = {p.name for p in stale}
    segments = [s for s in list_segments(directory) if segment_name(s) not in stale_names]
    report.segments = segments
    last_seq = 0
    for i, seg in enumerate(segments):
        path = directory / segment_name(seg)
        final = i == len(segments) - 1
        if i > 0 and seg != segments[i - 1] + 1:
            missing = segment_name(segments[i - 1] + 1)
            report.damage = Damage(path, seg, 1, 0, f"segment {missing} is missing", False)
            break
        data = path.read_bytes()
        report.bytes += len(data)
        verified = False
        if not final:
            after = _read_header(directory / segment_name(segments[i + 1]))
            verified = (
                after is not None
                and after.get("prev_bytes") == len(data)
                and after.get("prev_crc") == f"{zlib.crc32(data):08x}"
            )
        res = _scan_segment(
            path,
            seg,
            data,
            last_seq,
            on_event,
            positions,
            final=final,
            expect_seq=last_seq if i > 0 else None,
            verified=verified,
        )
        report.events += res.events
        last_seq = res.last_seq
        if final:
            report.last_header = res.header
        header = res.header
        if i == 0 and header is not None and seg != 1 and "compacted_from" not in header:
            reason = f"segments before {segment_name(seg)} are missing"
            report.damage = Damage(path, seg, 1, 0, reason, False)
            break
        if res.damage is not None:
            report.damage = res.damage
            break
        if header is None and not final:
            report.damage = Damage(path, seg, 1, 0, "empty segment (no header)", False)
            break
    report.last_seq = last_seq
    return report


# -- the journal -----------------------------------------------------------------------


class Ticket:
    """A queued append. `await ticket.wait()` returns once it is durable and applied.

    A ticket points at its batch, never the other way round once the writer took the
    batch (`_commit_batch` empties `batch.tickets`): no reference cycle, so a committed
    batch with its lines and decoded data is freed by reference counting as soon as its
    waiters are done, not by a later cyclic collection.
    """

    __slots__ = ("batch", "event", "line")

    def __init__(self, event: Event, line: bytes, batch: _Batch) -> None:
        self.event = event
        self.line = line
        self.batch = batch

    @property
    def done(self) -> bool:
        return self.batch.done.is_set()

    async def wait(self) -> Event:
        """The committed event, or `JournalWriteError`/`JournalClosed` if it was not."""
        batch = self.batch
        await batch.done.wait()
        error = batch.error
        if error is not None:
            if isinstance(error, JournalClosed):
                raise JournalClosed(str(error)) from error
            raise JournalWriteError(str(error)) from error
        return self.event


class _Batch:
    """Appends that share one write (and at most one fsync), and one wake-up for waiters."""

    __slots__ = ("done", "error", "sync", "tickets")

    def __init__(self) -> None:
        self.tickets: list[Ticket] = []
        self.sync = False
        self.done = trio.Event()
        self.error: BaseException | None = None


class _RunLines:
    """Random access to one run's journal lines through the history index.

    In memory durability the lines are the index; in the file modes each is a seek into
    its segment (a file opened once per segment per read). Sees the lines indexed when it
    was opened, not the ones the writer adds meanwhile.
    """

    __slots__ = ("_files", "_journal", "_lines", "_n", "_positions", "run")

    def __init__(self, journal: Journal, run: str) -> None:
        self._journal = journal
        self.run = run
        self._files: dict[int, Any] = {}
        self._lines: list[bytes] | None = None
        self._positions: array[int] | None = None
        if journal.durability == "memory":
            self._lines = journal._memory.get(run, [])
            self._n = len(self._lines)
        else:
            held = journal._positions.get(run)
            self._positions = _as_array(held) if held is not None else array("q")
            self._n = len(self._positions)

    def __enter__(self) -> _RunLines:
        return self

    def __exit__(self, *exc: object) -> None:
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def __len__(self) -> int:
        return self._n

    def _file(self, k: int) -> Any:
        assert self._positions is not None
        p = self._positions[k]
        seg = p >> SEG_SHIFT
        f = self._files.get(seg)
        if f is None:
            f = self._files[seg] = open(self._journal.segment_path(seg), "rb")  # noqa: SIM115
        f.seek(p & _OFFSET_MASK)
        return f

    def line(self, k: int) -> bytes:
        if self._lines is not None:
            return self._lines[k]
        line: bytes = self._file(k).readline()
        return line

    def head(self, k: int) -> tuple[int, str] | None:
        """(seq, type) of line k from its first bytes, or None if they do not say."""
        if self._lines is not None:
            m = _HEAD_RE.match(self._lines[k])
        else:
            m = _HEAD_RE.match(self._file(k).read(_HEAD_READ))
        if m is None:
            return None
        return int(m.group(1)), m.group(2).decode("ascii")

    def event(self, k: int) -> Event:
        line = self.line(k)
        if not line.endswith(b"\n"):
            raise JournalError(f"history of {self.run} is unavailable for now (write error)")
        event = event_from_obj(decode_line(line[:-1]))
        if event.run != self.run:
            raise JournalError(f"history of {self.run}: index points at a line of {event.run}")
        return event

    def first_after(self, seq: int, lo: int = 0) -> int:
        """Index of the first line with a seq above `seq` (len when there is none), at or
        after line `lo` (the caller knows the ones before are at or below `seq`)."""
        hi = self._n
        if seq <= 0:
            return lo
        while lo < hi:
            mid = (lo + hi) // 2
            head = self.head(mid)
            at = head[0] if head is not None else self.event(mid).seq
            if at <= seq:
                lo = mid + 1
            else:
                hi = mid
        return lo


@attrs.define(slots=True, eq=False)
class ReplayReport:
    durability: str = "fsync"
    events: int = 0
    segments: int = 0
    bytes: int = 0
    last_seq: int = 0
    torn_bytes: int = 0
    torn_line: int | None = None
    torn_file: Path | None = None  # the side file keeping the cut bytes
    removed: list[Path] = attrs.Factory(list)  # leftovers of an interrupted compaction
    seconds: float = 0.0


@attrs.define(slots=True, eq=False)
class IOHooks:
    """The fault-injection seam: how the journal writes and syncs. Tests replace these.

    `fsync` is also used for directory syncs (rotation, compaction, open) so an injected
    failure reaches every durability step; `truncate` cuts a failed batch back.
    """

    write: Callable[[int, bytes], int] = os.write
    fsync: Callable[[int], None] = os.fsync
    truncate: Callable[[int, int], None] = os.ftruncate


class Journal:
    """An append-only event log in `directory` (or in memory), written by one task.

    Use: `journal = Journal(dir, durability, on_commit)`, `journal.open(on_replay)` to read
    what is there (folding every event through `on_replay`), then run `journal.run()` in a
    nursery; `append` / `commit` from anywhere in that trio run; `aclose()` at the end.
    """

    def __init__(
        self,
        directory: Path | str | None,
        durability: Durability = "fsync",
        on_commit: Callable[[list[Event]], None] | None = None,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
        hooks: IOHooks | None = None,
        flush_interval: float | None = 1.0,
        max_unsynced_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        if durability != "memory" and directory is None:
            raise ValueError("a directory is needed unless durability is 'memory'")
        if segment_bytes < 1024:
            raise ValueError("segment_bytes must be at least 1024")
        self.directory = Path(directory) if directory is not None else None
        self.durability: Durability = durability
        self.on_commit = on_commit or (lambda events: None)
        self.segment_bytes = segment_bytes
        self.clock = clock
        self.hooks = hooks or IOHooks()
        # Under fsync durability, lines written without waiting (progress, output) are
        # synced at the latest this often, and before this many bytes pile up.
        self.flush_interval = flush_interval
        self.max_unsynced_bytes = max_unsynced_bytes
        self.last_seq = 0  # the last seq handed out by append (or read by open)
        self._opened = False
        self._closed = False
        self._running = False
        # the writer's blocking IO, while it runs (see _iothread.py for why not to_thread)
        self._io_thread = IOThread("agentjobs-journal")
        self._broken: BaseException | None = None
        self._pending: _Batch | None = None
        self._wakeup = trio.Event()
        self._writer_done: trio.Event | None = None
        self._seal_requests: list[tuple[trio.Event, list[BaseException | int]]] = []
        # the file being written
        self._fd: int | None = None
        self._segment = 0
        self._size = 0  # bytes written and applied (the file's length unless _rewrite)
        self._durable = 0  # bytes known to be on disk per the durability setting
        self._header_len = 0
        self._crc = 0  # CRC-32 of the segment's first _size bytes (recorded when sealed)
        self._unsynced: list[bytes] = []  # applied, written, not yet fsynced (fsync mode)
        self._unsynced_bytes = 0
        self._unsynced_since: float | None = None  # trio time of the oldest unsynced write
        self._rewrite = False  # the file was cut back to _durable; _unsynced must go again
        self._written_seq = 0  # seq of the last line written to a file
        self._lock_fd: int | None = None
        # run id -> positions of its lines (file modes) or the lines (memory mode)
        # (packed in a `bytes` while short, an `array('q')` beyond: see _index_add)
        self._positions: dict[str, Positions] = {}
        self._memory: dict[str, list[bytes]] = {}
        self._compacting = False
        self._generation = 0  # odd while compaction swaps files (see `history`)
        self._guard: Collection[str] = ()  # runs being compacted away: appends refused
        self.stats_batches = 0
        self.stats_events = 0
        self.stats_fsyncs = 0
        self.stats_failed_batches = 0

    # -- opening and replay ------------------------------------------------------------

    def segment_path(self, segment: int) -> Path:
        assert self.directory is not None
        return self.directory / segment_name(segment)

    def segments(self) -> list[int]:
        if self.directory is None:
            return []
        return list_segments(self.directory)

    @property
    def current_segment(self) -> int:
        return self._segment

    def disk_bytes(self) -> int:
        """Bytes of all segments on disk (for a size-based compaction trigger)."""
        total = 0
        for seg in self.segments():
            with contextlib.suppress(FileNotFoundError):  # raced with compaction
                total += self.segment_path(seg).stat().st_size
        return total

    def open(self, on_replay: Callable[[Event], object] | None = None) -> ReplayReport:
        """Replay every event on disk through `on_replay`, cut a torn tail, get ready to write.

        Synchronous on purpose: it runs once, before the engine serves anything. Takes the
        data directory's exclusive lock for the life of the journal. An exception raised by
        `on_replay` (say the state fold rejects an event) becomes `JournalCorrupt` naming
        the line. The cyclic garbage collector is paused while reading: replay allocates
        millions of objects and no cycles, and a collection pass every 700 allocations
        would cost about half the replay time.
        """
        if self._opened:
            raise JournalError("journal is already open")
        report = ReplayReport(durability=self.durability)
        started = time.perf_counter()
        if self.directory is None:
            self._opened = True
            log.info("journal: durability=memory (nothing survives a restart)")
            return report
        directory = self.directory
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = acquire_lock(directory)
        try:
            report.removed = prepare_directory(directory, fsync=self.hooks.fsync)
            gc_was_enabled = gc.isenabled()
            gc.disable()
            built: dict[str, array[int]] = {}
            try:
                res = scan(directory, on_replay, positions=built, skip_stale=False)
                self._positions = {run: _shrink(arr) for run, arr in built.items()}
                del built
            finally:
                if gc_was_enabled:
                    gc.enable()
            report.events, report.bytes, report.segments = res.events, res.bytes, len(res.segments)
            damage = res.damage
            if damage is not None:
                if not damage.torn:
                    raise JournalCorrupt(damage.path, damage.line, damage.reason)
                self._cut_tail(damage, report)
            self.last_seq = self._written_seq = report.last_seq = res.last_seq
            if not res.segments:
                self._start_segment(1)
            elif damage is not None and damage.line == 1:
                self._start_segment(res.segments[-1])  # the header itself was torn
            elif res.last_header is None:
                self._start_segment(res.segments[-1])  # an empty file: crashed at creation
            else:
                self._continue_segment(res.segments[-1])
        except BaseException:
            self._positions.clear()
            self.last_seq = self._written_seq = 0
            self._release_files()
            raise
        self._opened = True
        report.seconds = time.perf_counter() - started
        rate = report.events / report.seconds if report.seconds else 0.0
        log.info(
            "journal %s: durability=%s, %d segments, %d events replayed in %.2fs (%.0f/s)",
            directory,
            self.durability,
            report.segments,
            report.events,
            report.seconds,
            rate,
        )
        return report

    def _cut_tail(self, damage: Damage, report: ReplayReport) -> None:
        """Cut a torn tail, keeping the cut bytes in a side file first (nothing is lost)."""
        path = damage.path
        with open(path, "rb") as f:
            f.seek(damage.offset)
            torn = f.read()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        side = path.with_name(f"{path.name}.torn-{stamp}-{time.time_ns() % 10**9:09d}")
        fsync = self.hooks.fsync
        with open(side, "xb") as f:
            f.write(torn)
            f.flush()
            fsync(f.fileno())
        assert self.directory is not None
        _fsync_dir(self.directory, fsync)
        with open(path, "r+b") as f:
            f.truncate(damage.offset)
            fsync(f.fileno())
        report.torn_bytes = len(torn)
        report.torn_line = damage.line
        report.torn_file = side
        log.warning(
            "journal %s: cut a torn tail of %d bytes at line %d (%s); the bytes are kept in %s",
            path,
            len(torn),
            damage.line,
            damage.reason,
            side.name,
        )

    def _start_segment(self, seg: int) -> None:
        fd, header = self._create_segment(seg, None)
        self._fd, self._segment = fd, seg
        self._size = self._durable = self._header_len = len(header)
        self._crc = zlib.crc32(header)

    def _continue_segment(self, seg: int) -> None:
        path = self.segment_path(seg)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._fd, self._segment = fd, seg
        data = path.read_bytes()
        self._size = self._durable = len(data)
        self._header_len = data.find(b"\n") + 1
        self._crc = zlib.crc32(data)

    def _create_segment(self, seg: int, prev: tuple[int, int] | None) -> tuple[int, bytes]:
        """Create segment `seg` with its header (synced under fsync durability).

        On any failure the half-made file is removed again, so a failed rotation leaves
        the journal as it was and the next batch simply tries again.
        """
        path = self.segment_path(seg)
        header = encode_line(header_obj(seg, self._written_seq, prev=prev))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            self._write_all(fd, header)
            if self.durability == "fsync":
                self.hooks.fsync(fd)
                assert self.directory is not None
                _fsync_dir(self.directory, self.hooks.fsync)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):  # the disk is gone; open() copes
                path.unlink()
            raise
        return fd, header

    # -- appending ---------------------------------------------------------------------

    def append(
        self, run: str, type: EventType, data: dict[str, Any], *, sync: bool = False
    ) -> Ticket:
        """Queue an event; it is applied once its batch is written (and synced if `sync`).

        Raises at once (nothing queued) if `data` cannot be encoded as JSON, if the
        journal is closed or broken, or if `run` is being compacted away.
        """
        if not self._opened or self._closed:
            raise JournalClosed("journal is closed" if self._opened else "journal is not open")
        if self._broken is not None:
            raise JournalWriteError(f"journal is broken: {self._broken}")
        if run in self._guard:
            raise JournalError(f"{run} is being compacted away")
        seq = self.last_seq + 1
        ts = self.clock()
        # orjson writes an enum as its value (cheaper than `type.value`'s descriptor)
        body = orjson.dumps({"seq": seq, "ts": ts, "run": run, "type": type, "data": data})
        if not _json_exact_flat(data):
            data = orjson.loads(body)["data"]  # exactly what replay will see
        self.last_seq = seq
        line = b'{"crc":"%08x",' % zlib.crc32(body) + body[1:] + b"\n"
        batch = self._pending
        if batch is None:
            batch = self._pending = _Batch()
            self._wakeup.set()
        ticket = Ticket(Event(seq, ts, run, type, data), line, batch)
        batch.tickets.append(ticket)
        if sync:
            batch.sync = True
        return ticket

    async def commit(self, run: str, type: EventType, data: dict[str, Any]) -> Event:
        """Append and wait until durable (fsync under `fsync` durability) and applied."""
        return await self.append(run, type, data, sync=True).wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Runs until `aclose`, then flushes what is queued and returns.

        If it is cancelled instead, queued appends fail with `JournalClosed` (nobody is
        left waiting forever) and the journal refuses further appends.
        """
        if not self._opened:
            raise JournalClosed("open() the journal before running its writer")
        if self._running:
            raise JournalError("the journal writer is already running")
        self._running = True
        self._writer_done = done = trio.Event()
        if self.durability != "memory":
            self._io_thread.start()
        task_status.started()
        try:
            while True:
                batch = self._pending
                if batch is not None:
                    self._pending = None
                    await self._commit_batch(batch)
                    continue
                if self._seal_requests:
                    await self._serve_seal_requests()
                    continue
                if self._closed:
                    break
                self._wakeup = trio.Event()
                deadline = self._flush_deadline()
                if deadline is not None:
                    with trio.move_on_at(deadline):
                        await self._wakeup.wait()
                    if self._pending is None and trio.current_time() >= deadline:
                        await self._flush()
                else:
                    await self._wakeup.wait()
        finally:
            self._closed = True
            self._running = False
            self._io_thread.stop()
            self._fail_pending(JournalClosed("journal writer stopped"))
            done.set()

    async def _offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking IO off the event loop: in the writer's own thread while the writer
        runs, else (a seal with no writer) in trio's thread cache."""
        if self._io_thread.running:
            return await self._io_thread.run_sync(fn, *args)
        return await trio.to_thread.run_sync(fn, *args)

    def _flush_deadline(self) -> float | None:
        """When lines written without waiting must be synced by (trio time), if any are.

        Counted from the first unsynced write, so a steady stream of output cannot keep
        postponing it.
        """
        since = self._unsynced_since
        if since is None or self.flush_interval is None or self._broken is not None:
            return None
        return since + self.flush_interval

    def _note_unsynced(self) -> None:
        if not self._unsynced_bytes:
            self._unsynced_since = None
        elif self._unsynced_since is None:
            self._unsynced_since = trio.current_time()

    def _fail_pending(self, error: BaseException) -> None:
        batch, self._pending = self._pending, None
        if batch is not None:
            batch.tickets = []
            batch.error = error
            batch.done.set()
        requests, self._seal_requests = self._seal_requests, []
        for event, outcome in requests:
            outcome.append(error)
            event.set()

    async def _commit_batch(self, batch: _Batch) -> None:
        tickets, batch.tickets = batch.tickets, []  # no batch <-> ticket cycle (see Ticket)
        ok = False
        try:
            if self._broken is not None:
                raise JournalWriteError(f"journal is broken: {self._broken}")
            if self.durability == "memory":
                memory = self._memory
                for t in tickets:
                    memory.setdefault(t.event.run, []).append(t.line)
            else:
                buf = b"".join([t.line for t in tickets])
                fsync = self.durability == "fsync"
                deadline = self._flush_deadline()
                sync = fsync and (
                    batch.sync
                    or self._unsynced_bytes + len(buf) > self.max_unsynced_bytes
                    or (deadline is not None and trio.current_time() >= deadline)
                )
                rotate = self._size >= self.segment_bytes
                if sync or (fsync and (rotate or self._rewrite)):
                    start = await self._offload(self._io, buf, sync, rotate)
                else:
                    start = self._io(buf, sync, rotate)
                self._index(tickets, start)
                self._note_unsynced()
            self._written_seq = tickets[-1].event.seq
            ok = True
        except (OSError, JournalError) as exc:
            batch.error = exc
            self.stats_failed_batches += 1
            log.error("journal: a batch of %d events failed, none applied: %s", len(tickets), exc)
        finally:
            if not ok and batch.error is None:  # cancelled or crashed mid-way
                batch.error = JournalClosed("journal writer stopped")
            if not ok:
                batch.done.set()
        if not ok:
            return
        self.stats_batches += 1
        self.stats_events += len(tickets)
        try:
            self.on_commit([t.event for t in tickets])
        except BaseException as exc:
            # Durable but not applied: state no longer matches the file. Stop everything.
            self._broken = exc
            batch.error = exc
            raise
        finally:
            batch.done.set()

    def _index(self, tickets: list[Ticket], start: int) -> None:
        base = self._segment << SEG_SHIFT
        positions = self._positions
        pos = start
        for t in tickets:
            _index_add(positions, t.event.run, base | pos)
            pos += len(t.line)

    def _io(self, buf: bytes, sync: bool, rotate: bool) -> int:
        """Write one batch (in a worker thread if it syncs); return its start offset.

        In order: re-write lines cut back after an earlier fsync failure, rotate if the
        segment is full, write, fsync. Any failure leaves the file as long as the last
        good state and raises; the in-memory bookkeeping changes only on success.
        """
        fd = self._fd
        assert fd is not None
        if self._rewrite:
            self._write_or_cut(fd, b"".join(self._unsynced), self._durable)
            self._rewrite = False
        if rotate:
            self._rotate_io()
            fd = self._fd
            assert fd is not None
        start = self._size
        self._write_or_cut(fd, buf, start)
        end = start + len(buf)
        crc = zlib.crc32(buf, self._crc)
        if sync:
            self._sync(fd, end)
        elif self.durability == "fsync":
            if buf:
                self._unsynced.append(buf)
                self._unsynced_bytes += len(buf)
        else:
            self._durable = end
        self._size = end
        self._crc = crc
        return start

    def _write_or_cut(self, fd: int, buf: bytes, start: int) -> None:
        try:
            self._write_all(fd, buf)
        except OSError:
            self._truncate(fd, start)
            raise

    def _sync(self, fd: int, end: int) -> None:
        """fsync; on success everything up to `end` is durable, on failure the file is cut
        back to the last durable byte (the rest is written again later) and it raises."""
        try:
            self.hooks.fsync(fd)
        except OSError:
            self._cut_to_durable(fd)
            raise
        self.stats_fsyncs += 1
        self._durable = end
        self._unsynced.clear()
        self._unsynced_bytes = 0

    def _cut_to_durable(self, fd: int) -> None:
        """After a failed fsync: keep only what is known durable; re-write the rest later."""
        self._truncate(fd, self._durable)
        self._rewrite = bool(self._unsynced)

    def _write_all(self, fd: int, buf: bytes) -> None:
        view = memoryview(buf)
        while view:
            n = self.hooks.write(fd, view)  # type: ignore[arg-type]
            if n <= 0:
                raise OSError(errno.EIO, "write wrote nothing")
            view = view[n:]

    def _truncate(self, fd: int, size: int) -> None:
        """Cut the file back after a failed batch; if even that fails the journal is broken."""
        try:
            self.hooks.truncate(fd, size)
        except OSError as exc:
            self._broken = exc
            log.critical("journal: cannot cut back a failed batch, refusing appends: %s", exc)
            raise JournalWriteError(f"journal is broken: {exc}") from exc

    def _rotate_io(self) -> None:
        """Seal the current segment (synced) and start the next one."""
        fd = self._fd
        assert fd is not None
        if self.durability == "fsync" and (self._unsynced_bytes or self._size > self._durable):
            self._sync(fd, self._size)
        seg = self._segment + 1
        new_fd, header = self._create_segment(seg, (self._size, self._crc))
        try:
            os.close(fd)
        except OSError as exc:  # pragma: no cover - the data was synced already
            log.warning("journal: closing sealed segment failed: %s", exc)
        self._fd, self._segment = new_fd, seg
        self._size = self._durable = self._header_len = len(header)
        self._crc = zlib.crc32(header)

    async def _flush(self) -> None:
        """Sync lines written without waiting (progress, output) after `flush_interval`."""
        try:
            await self._offload(self._io, b"", True, False)
        except (OSError, JournalError) as exc:
            self._unsynced_since = trio.current_time()  # try again one interval later
            log.error("journal: background fsync failed (will retry): %s", exc)
        else:
            self._note_unsynced()

    async def seal(self) -> int:
        """Make every event committed so far live in a sealed segment; return the last one.

        Served by the writer between batches, so whatever was queued before the request
        is written first, into the segment being sealed (and the writer's worker thread is
        never racing with us); done directly when no writer runs.
        """
        if not self._running:
            if self._pending is not None:
                raise JournalError("appends are queued but the journal writer is not running")
            await self._seal_now()
            return self._segment - 1
        done = trio.Event()
        outcome: list[BaseException | int] = []
        self._seal_requests.append((done, outcome))
        self._wakeup.set()
        await done.wait()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    async def _seal_now(self) -> None:
        if self._broken is not None:
            raise JournalWriteError(f"journal is broken: {self._broken}")
        if self._size > self._header_len or self._rewrite:
            await self._offload(self._io, b"", False, True)
            self._note_unsynced()

    async def _serve_seal_requests(self) -> None:
        requests, self._seal_requests = self._seal_requests, []
        result: BaseException | int
        try:
            await self._seal_now()
            result = self._segment - 1
        except (OSError, JournalError) as exc:
            result = exc
        for event, outcome in requests:
            outcome.append(result)
            event.set()

    # -- compaction ----------------------------------------------------------------------

    async def compact(
        self,
        drop: Collection[str] = (),
        strip_keys: Collection[str] = (),
        *,
        on_swap: Callable[[CompactionReport], None] | None = None,
    ) -> CompactionReport:
        """Rewrite the sealed segments without `drop` runs (and deleted runs), stripping
        the idempotency key of `strip_keys` runs' `submitted` events. See `compaction.py`.

        `on_swap(report)` runs at the instant the new file replaces the old ones, with no
        checkpoint in between: the engine forgets the dropped runs there, so no task ever
        sees state and journal disagree. Appends for `drop` runs fail while this runs.
        """
        from . import compaction

        if not self._opened or self._closed:
            raise JournalClosed("journal is closed")
        if self._compacting:
            raise JournalError("a compaction is already running")
        self._compacting = True
        drop = frozenset(drop)
        strip = frozenset(strip_keys)
        self._guard = drop
        try:
            if self.directory is None:
                report = compaction.compact_memory(self._memory, drop, strip)
                if on_swap is not None:
                    on_swap(report)
                return report
            started = time.perf_counter()
            last = await self.seal()
            sealed = [s for s in self.segments() if s <= last]
            built = await trio.to_thread.run_sync(
                compaction.build, self.directory, sealed, drop, strip, self.hooks.fsync
            )
            report = built.report
            if built.tmp_path is None:
                report.seconds = time.perf_counter() - started
                return report
            conflict = [
                r
                for r in drop
                if (p := self._positions.get(r)) and (_last_position(p) >> SEG_SHIFT) > last
            ]
            if conflict:  # pragma: no cover - the guard and the seal order prevent this
                built.tmp_path.unlink(missing_ok=True)
                raise JournalError(f"runs written after sealing, not compacted: {conflict}")
            # The swap: rename, re-point the index, tell the engine. No checkpoint here,
            # and history readers in worker threads see an odd generation meanwhile.
            self._generation += 1
            try:
                compaction.install(built)
                self._swap_positions(built.positions, last)
            finally:
                self._generation += 1
            if on_swap is not None:
                on_swap(report)
            try:
                await trio.to_thread.run_sync(compaction.remove_replaced, built, self.hooks.fsync)
            except OSError as exc:
                log.error("journal: compaction installed, but cleaning up failed: %s", exc)
            report.seconds = time.perf_counter() - started
            log.info("journal: %s", report.summary())
            return report
        finally:
            self._compacting = False
            self._guard = ()

    def _swap_positions(self, built: dict[str, array[int]], last: int) -> None:
        """Index = the compacted file's positions + whatever was written after `last`."""
        limit = ((last + 1) << SEG_SHIFT) - 1
        merged: dict[str, Positions] = {}
        for run, held in self._positions.items():
            new = built.get(run)
            if _last_position(held) <= limit:
                if new is not None:
                    merged[run] = _shrink(new)
                continue
            arr = _as_array(held)
            i = bisect.bisect_right(arr, limit)
            tail = arr[i:]
            merged[run] = _shrink(new + tail if new is not None else tail)
        self._positions = merged

    # -- reading history -----------------------------------------------------------------

    def history(self, run: str, after_seq: int = 0, limit: int | None = None) -> list[Event]:
        """A run's events with seq > after_seq, oldest first, at most `limit` of them.

        A page costs what it holds, not what came before it: the first line after
        `after_seq` is found by binary search over the run's index (about log2(n) short
        reads of a line's head), then only the lines of the page are read and decoded.
        Only events already committed (applied) are returned. Safe to call from a worker
        thread: a compaction swapping files underneath is detected (the index generation
        is odd while a swap is in progress and changes across it) and the read retried.
        """
        if limit is not None and limit < 0:
            raise ValueError("limit must not be negative")
        return self._consistent(run, lambda: self._read_after(run, after_seq, limit))

    def history_at(self, run: str, seqs: Sequence[int]) -> list[Event]:
        """The run's events with exactly these seqs (ascending), oldest first; a seq the
        run has no event at is left out.

        For the few `progress` events a resuming stream folds (their seqs are known from
        the run's `ProgressTrail`): each is found by binary search over the run's index
        from where the one before it was, so a handful of events costs a handful of
        binary searches whatever lies between them (100,000s of output lines, say).
        """
        return self._consistent(run, lambda: self._read_at(run, seqs))

    def _consistent(self, run: str, read: Callable[[], list[Event]]) -> list[Event]:
        for _ in range(100):
            gen = self._generation
            if gen & 1:
                time.sleep(0.0005)
                continue
            try:
                events = read()
            except (OSError, ValueError, JournalError):
                if self._generation != gen:
                    continue
                raise
            if self._generation == gen:
                return events
        raise JournalError(f"history of {run}: the journal kept changing underneath")

    def _read_after(self, run: str, after_seq: int, limit: int | None) -> list[Event]:
        with _RunLines(self, run) as lines:
            n = len(lines)
            i = lines.first_after(after_seq)
            stop = n if limit is None else min(n, i + limit)
            events = [lines.event(k) for k in range(i, stop)]
        if events and events[0].seq <= after_seq:  # the heads searched are not checksummed
            raise JournalError(f"history of {run}: line heads disagree with their lines")
        return events

    def _read_at(self, run: str, seqs: Sequence[int]) -> list[Event]:
        out: list[Event] = []
        with _RunLines(self, run) as lines:
            lo = 0
            for seq in seqs:
                k = lines.first_after(seq - 1, lo)
                if k >= len(lines):
                    break
                event = lines.event(k)
                if event.seq < seq:  # the heads searched are not checksummed
                    raise JournalError(f"history of {run}: line heads disagree with their lines")
                if event.seq == seq:
                    out.append(event)
                    k += 1
                lo = k
        return out

    def runs_indexed(self) -> int:
        """How many runs have history in the index (for tests and metrics)."""
        return len(self._memory) if self.durability == "memory" else len(self._positions)

    def forget(self, run: str) -> None:
        """Drop a run's history index (after `deleted`, or compaction)."""
        self._positions.pop(run, None)
        self._memory.pop(run, None)

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop taking appends, let the writer flush what is queued, close the files."""
        self._closed = True
        self._wakeup.set()
        if self._running and self._writer_done is not None:
            await self._writer_done.wait()
        else:
            self._fail_pending(JournalClosed("journal closed before its writer ran"))
        self.close_files()

    def close_files(self) -> None:
        """Sync what was written without waiting, close the segment, release the lock.

        Call it only once the writer has stopped (`aclose` does); it is idempotent.
        """
        self._closed = True
        if (
            self._fd is not None
            and self.durability == "fsync"
            and self._broken is None
            and (self._unsynced_bytes or self._rewrite)
        ):
            try:
                self._io(b"", True, False)
            except (OSError, JournalError) as exc:
                log.error("journal: final fsync failed: %s", exc)
        self._release_files()

    def _release_files(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        lock_fd, self._lock_fd = self._lock_fd, None
        if lock_fd is not None:
            release_lock(lock_fd)
