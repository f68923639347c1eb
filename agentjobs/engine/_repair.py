"""Rebuilding a segment header that alone is damaged, for `agentjobs log repair`.

Why this exists
---------------

A segment's first line is its header: it holds no event, only facts that can be read off
the file's name and its neighbours (the format version, the segment number, the seq the
file starts after). When that line alone is damaged (a flipped bit, garbage, a cut-short
line whose newline was lost), every event line after it is still intact and
acknowledged. Moving the whole segment aside, as the ordinary tail repair does, would
take up to 64 MiB of runs out of the journal for one bad byte. So repair moves only the
damaged header bytes aside and writes a fresh header in their place.

It only does that when the result is certain to be what the writer would have written:

* the damaged bytes must hold no event: no event member (`"run":`, `"type":`, `"data":`)
  and no second line start (`{"crc":"`) in them, and no more bytes than a header has.
  The one exception is a header whose *newline* was damaged: the header and the first
  event are then one physical line, and the event, still intact with its own checksum,
  is found at its line start and kept;
* a header the reader can decode (checksum good) but whose `format` it does not know,
  newer or nonsense, is never rewritten: it is refused. So is a damaged header whose
  bytes still read as a newer format (a flipped digit cannot be told from a journal
  written by a newer agentjobs), and a neighbour whose header is newer;
* every field is derived from the neighbours, never read out of the damaged bytes: the
  format from the previous segment's header (else the next one's, else this reader's);
  `seq` = the last seq of the previous segment (0 for the first segment, as every
  journal starts); `compacted_from`/`seq_end` only for the first segment, and only when
  the damaged bytes still show it was a compacted file (`"compacted_from"` survives a
  flipped bit elsewhere), with `seq_end` taken from the next segment's header.
  `created` is the time of the repair (informational) and `prev_bytes`/`prev_crc` are
  left out (optional: the previous segment is then checked line by line).
  Where a field cannot be derived (a first segment numbered above 1 with no sign of
  compaction: compacted, or the segments before it lost? A first segment that ends
  before the next one starts: events dropped by compaction, or lines lost?) repair
  refuses and says why instead of guessing.

After the header is rebuilt the ordinary rules apply to the rest: damage further on in
the same segment is moved aside by the tail repair as before.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs

from .journal import (
    FORMAT_VERSION,
    MAGIC,
    Damage,
    ScanReport,
    _read_header,
    decode_line,
    encode_line,
    event_from_obj,
    header_obj,
    segment_name,
)

__all__ = [
    "MAX_HEADER_BYTES",
    "HeaderFix",
    "HeaderRefused",
    "apply_header_fix",
    "plan_header_fix",
]

# A header is ~100-230 bytes (every optional member included); a damaged first line
# longer than this may hold an event whose markers were damaged too.
MAX_HEADER_BYTES: Final = 512
_LINE_START: Final = b'{"crc":"'
_EVENT_MARKERS: Final = (b'"run":', b'"type":', b'"data":', _LINE_START)
_FORMAT_RE: Final = re.compile(rb'"format":(\d+)')
_COMPACTED_KEY: Final = b'"compacted_from"'
TMP_SUFFIX: Final = ".repair-tmp"


class HeaderRefused(Exception):
    """The damaged header cannot be rebuilt safely (or must not be: a newer format)."""


@attrs.frozen(slots=True)
class HeaderFix:
    """How to rebuild one segment's header: what goes aside, what stays, the new header."""

    path: Path
    segment: int
    damaged: bytes  # the bytes moved aside (b"" when the header line is missing outright)
    keep_from: int  # offset of the first kept byte in the file
    header: dict[str, Any]
    events: int  # intact events in the kept part up to any further damage
    merged_event: bool  # the first event shared the damaged header's line (newline hit)
    notes: tuple[str, ...] = ()  # how the fields were derived, for the operator


@attrs.define(slots=True)
class _Kept:
    events: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    damaged: bool = False  # stopped at a damaged or out-of-sequence line


def _refuse_unknown_format(where: str, fmt: object) -> None:
    if type(fmt) is not int or fmt < 1:
        raise HeaderRefused(
            f"{where} declares journal format {fmt!r}, which no agentjobs writes; "
            "a header that can be read but not understood is never rewritten"
        )
    if fmt > FORMAT_VERSION:
        raise HeaderRefused(
            f"{where} declares journal format {fmt}, newer than this agentjobs reads "
            f"({FORMAT_VERSION}); use the newer agentjobs (repair never rewrites a newer "
            "header)"
        )


def _scan_kept(data: bytes, start: int) -> _Kept:
    """The intact, in-sequence event lines from `start` on, up to the first that is not."""
    kept = _Kept()
    pos, n = start, len(data)
    while pos < n:
        end = data.find(b"\n", pos)
        if end < 0:
            kept.damaged = True
            break
        try:
            event = event_from_obj(decode_line(data[pos:end]))
        except ValueError:
            kept.damaged = True
            break
        if kept.last_seq is not None and event.seq <= kept.last_seq:
            kept.damaged = True
            break
        if kept.first_seq is None:
            kept.first_seq = event.seq
        kept.last_seq = event.seq
        kept.events += 1
        pos = end + 1
    return kept


def _is_event_line(data: bytes, pos: int) -> bool:
    end = data.find(b"\n", pos)
    if end < 0:
        return False
    try:
        event_from_obj(decode_line(data[pos:end]))
    except ValueError:
        return False
    return True


def _header_only(damaged: bytes) -> bool:
    """Can these damaged bytes be nothing but a header? (No event could hide in them.)"""
    body = damaged[1:]
    return len(damaged) <= MAX_HEADER_BYTES and not any(m in body for m in _EVENT_MARKERS)


def _split(path: Path, data: bytes) -> tuple[bytes, int, bool] | None:
    """(damaged bytes, offset of the first kept byte, first event shared the header's
    line) for a damaged header that holds no event, or None if it may hold one, or is
    intact (its content is then evidence, for the ordinary repair).

    The damaged bytes run up to the first intact event line, found at a line start or
    at a line prefix (`{"crc":"`) inside a line whose newline was damaged; if none is
    found within a header's length, they are the first physical line, and the ordinary
    repair deals with what follows.
    """
    nl = data.find(b"\n")
    first_end = nl if nl >= 0 else len(data)
    first = data[:first_end]
    try:
        obj = decode_line(first)
    except ValueError:
        pass
    else:
        if obj.get("magic") == MAGIC:
            _refuse_unknown_format(f"{path.name}: the header", obj.get("format"))
            return None
        try:
            event_from_obj(obj)
        except ValueError:
            return None
        return b"", 0, False  # the header line is missing: the file starts with an event
    m = _FORMAT_RE.search(first)
    if m is not None and int(m.group(1)) > FORMAT_VERSION:
        raise HeaderRefused(
            f"{path.name}: the damaged header still reads format {int(m.group(1))}, newer "
            f"than this agentjobs reads ({FORMAT_VERSION}); a damaged digit cannot be told "
            "from a journal written by a newer agentjobs, so it is not rewritten"
        )
    window = data[: MAX_HEADER_BYTES + 1]
    candidates = {i + 1 for i, b in enumerate(window) if b == 0x0A}
    candidates.update(i for i in _starts(window) if i > 0)
    for q in sorted(candidates):
        if _is_event_line(data, q):
            if _header_only(data[:q]):
                merged = data[q - 1] != 0x0A
                return data[:q], q, merged
            break  # something before the first intact event may be an event: not ours
    keep_from = first_end + 1 if nl >= 0 else len(data)
    if _header_only(data[:keep_from]):
        return data[:keep_from], keep_from, False
    return None


def _starts(data: bytes) -> list[int]:
    out, at = [], data.find(_LINE_START)
    while at >= 0:
        out.append(at)
        at = data.find(_LINE_START, at + 1)
    return out


def plan_header_fix(directory: Path, report: ScanReport, damage: Damage) -> HeaderFix | None:
    """How to rebuild the header at `damage`, or None if `damage` is not a header that
    alone is damaged (the ordinary tail repair applies). Reads only.

    Raises HeaderRefused when the header must not or cannot safely be rebuilt.
    """
    if damage.line != 1 or damage.offset != 0 or damage.segment not in report.segments:
        return None
    path = damage.path
    data = path.read_bytes()
    if not data:
        return None
    split = _split(path, data)
    if split is None:
        return None
    damaged, keep_from, merged = split
    seg = damage.segment
    segments = report.segments
    i = segments.index(seg)
    compacted = _COMPACTED_KEY in damaged
    kept = _scan_kept(data, keep_from)
    prev = _read_header(directory / segment_name(segments[i - 1])) if i > 0 else None
    nxt = _read_header(directory / segment_name(segments[i + 1])) if i + 1 < len(segments) else None
    if nxt is not None:
        where = f"the next segment's header ({segment_name(segments[i + 1])})"
        _refuse_unknown_format(where, nxt.get("format"))
    notes: list[str] = []
    compacted_from: int | None = None
    seq_end: int | None = None
    if i > 0:
        if compacted:
            raise HeaderRefused(
                f"{path.name}: the damaged header was a compacted file's, yet the segments "
                "before it are still there (an interrupted compaction?); cannot tell which "
                "to keep"
            )
        seq = report.last_seq
        notes.append(f"seq {seq}: the last seq of {segment_name(segments[i - 1])}")
        fmt = prev.get("format") if prev is not None else FORMAT_VERSION
        notes.append(f"format {fmt}: as {segment_name(segments[i - 1])}")
    else:
        seq = 0
        notes.append("seq 0: the first segment of a journal starts after seq 0")
        if seg != 1 and not compacted:
            raise HeaderRefused(
                f"{path.name} is the first segment but not 00000001.jsonl, and its header is "
                "unreadable: it may be a compacted file or the segments before it may be "
                "lost; cannot tell"
            )
        if compacted:
            compacted_from = seg  # replaces nothing still on disk: removes nothing
            notes.append(f"compacted_from {seg}: the damaged header was a compacted file's")
        if nxt is not None and not kept.damaged and type(nxt.get("seq")) is int:
            ends = kept.last_seq if kept.last_seq is not None else seq
            if nxt["seq"] > ends:
                if not compacted:
                    raise HeaderRefused(
                        f"{path.name} ends at seq {ends} but {segment_name(seg + 1)} starts "
                        f"after seq {nxt['seq']}: either compaction dropped its newest events "
                        "(its lost header would have said so) or lines were lost at its end; "
                        "cannot tell"
                    )
                seq_end = nxt["seq"]
                notes.append(f"seq_end {seq_end}: where {segment_name(seg + 1)} starts")
        fmt = nxt.get("format") if nxt is not None else FORMAT_VERSION
        source = segment_name(seg + 1) if nxt is not None else "this agentjobs"
        notes.append(f"format {fmt}: as {source}")
    if kept.first_seq is not None and kept.first_seq <= seq:
        raise HeaderRefused(
            f"{path.name}: its first event (seq {kept.first_seq}) does not follow seq {seq}, "
            "where the segments before it end; cannot rebuild its header consistently"
        )
    header = header_obj(seg, seq, compacted_from=compacted_from, seq_end=seq_end)
    header["format"] = fmt
    return HeaderFix(
        path=path,
        segment=seg,
        damaged=damaged,
        keep_from=keep_from,
        header=header,
        events=kept.events,
        merged_event=merged,
        notes=tuple(notes),
    )


def _fsync_path(path: Path, fsync: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def apply_header_fix(
    fix: HeaderFix, side_dir: Path, *, fsync: Callable[[int], None] = os.fsync
) -> Path | None:
    """Move the damaged header bytes into `side_dir` and put the fresh header in place.

    Crash-safe in this order: the damaged bytes are copied aside (synced), the new file
    is written beside the segment (synced), then renamed over it (atomic) and the
    directory synced. A crash before the rename leaves the segment as it was (and a
    `*.repair-tmp` file that nothing reads): running repair again does it again.
    Returns the side file (None when there were no damaged bytes, a missing header).
    """
    path = fix.path
    data = path.read_bytes()
    side: Path | None = None
    if fix.damaged:
        if data[: fix.keep_from] != fix.damaged:  # pragma: no cover - we hold the lock
            raise HeaderRefused(f"{path.name} changed while it was being repaired")
        side = side_dir / f"{path.name}.damaged-header"
        with open(side, "xb") as f:
            f.write(fix.damaged)
            f.flush()
            fsync(f.fileno())
        _fsync_path(side_dir, fsync)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(encode_line(fix.header))
        f.write(memoryview(data)[fix.keep_from :])
        f.flush()
        fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent, fsync)
    return side
