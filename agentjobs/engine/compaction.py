"""Compaction: keep the journal from growing without bound, without ever losing a fact
that the live state still depends on.

What goes
---------

`plan` (pure) picks, from the folded state:

* **drop**: finished runs whose `completed_at` is older than the retention window (default
  7 days), unless their terminal webhook is still being delivered. All their events go.
* **strip_keys**: runs that stay but whose idempotency key has expired (default 24 h after
  submission), or is shadowed (the index no longer points at them: a newer run took the
  key, or took it and was deleted). The key and request hash are removed from their
  `submitted` event, so after a restart the key is free, exactly as
  `State.find_idempotent` already treats it. Stripping shadowed keys keeps a replay exact
  once the newer run's events are gone: otherwise the older run would take the index back.

`Journal.compact` also purges, unasked, the events of runs a user deleted (up to and
including their `deleted` event): they fold to nothing already.

How it stays crash-safe
-----------------------

Only *sealed* segments are rewritten (the journal first rotates, so every event written so
far is sealed; the writer carries on in the new segment meanwhile). Say they are F..N:

1. `build` writes the kept lines into `N.jsonl.compact-tmp` in a worker thread, with a
   header `{"segment": N, "compacted_from": F, "seq": <F's seq>, "seq_end": <N's last>}`,
   and fsyncs it. A crash here leaves a temp file that `open` deletes: nothing changed.
2. `install` renames it over `N.jsonl` (atomic). From this instant the new file *is* the
   journal's F..N: a crash after it leaves F..N-1 behind, and `open` deletes segments in
   [compacted_from, N) as stale before reading anything.
3. `remove_replaced` fsyncs the directory (the rename is durable), deletes F..N-1 and
   fsyncs the directory again.

At every point the journal opens to either the old state or the compacted one, and the
compacted one equals the live state after `apply_report` (tested property). Sequence
numbers stay strictly increasing across it: `seq_end` keeps the highest number of the
replaced range even if its last events were dropped.
"""

from __future__ import annotations

import contextlib
import os
import time
from array import array
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import attrs

from .journal import (
    COMPACT_TMP_SUFFIX,
    SEG_SHIFT,
    JournalCorrupt,
    _fsync_dir,
    decode_line,
    encode_line,
    header_obj,
    segment_name,
)
from .model import TERMINAL, Run
from .state import State

if TYPE_CHECKING:
    from .journal import Journal

__all__ = [
    "DEFAULT_IDEMPOTENCY_WINDOW_S",
    "DEFAULT_RETENTION_S",
    "Built",
    "CompactionPlan",
    "CompactionReport",
    "apply_report",
    "build",
    "compact_memory",
    "compact_state",
    "forget",
    "install",
    "plan",
    "remove_replaced",
    "strip_keys",
]

DEFAULT_RETENTION_S: Final = 7 * 86400.0
DEFAULT_IDEMPOTENCY_WINDOW_S: Final = 86400.0
_STRIPPED: Final = ("idempotency_key", "request_hash")
_DELETED_NEEDLE: Final = b'"type":"deleted"'


# -- deciding (pure) --------------------------------------------------------------------


@attrs.frozen(slots=True)
class CompactionPlan:
    drop: frozenset[str] = frozenset()
    strip_keys: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.drop or self.strip_keys)


def _webhook_pending(run: Run) -> bool:
    hook = run.webhook
    return hook is not None and not hook.delivered and not hook.gave_up


def plan(
    state: State,
    now: float,
    retention_s: float = DEFAULT_RETENTION_S,
    idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
) -> CompactionPlan:
    """Which runs to drop and whose idempotency keys to strip at time `now`.

    Expiry matches `State.find_idempotent`: a key is dead once `created_at + window <= now`.
    A shadowed key (the index points elsewhere, or nowhere) is dead whatever its age.
    """
    drop: set[str] = set()
    for status in TERMINAL:
        for rid in state.by_status[status]:
            run = state.runs[rid]
            done = run.completed_at
            if done is not None and done + retention_s <= now and not _webhook_pending(run):
                drop.add(rid)
    index = state.idempotency
    strip = {
        run.id
        for run in state.runs.values()
        if (key := run.spec.idempotency_key) is not None
        and run.id not in drop
        and (
            run.created_at + idempotency_window_s <= now
            or index.get((run.spec.tenant, key)) != run.id
        )
    }
    return CompactionPlan(frozenset(drop), frozenset(strip))


def forget(state: State, run_ids: Iterable[str]) -> State:
    """Remove runs from every index of `state`, as if their events had never been written.

    This is the state-side twin of dropping their lines: afterwards `state` equals a replay
    of the compacted journal. It also squeezes deleted runs out of the creation order
    (`vacuum`), since compaction purges their events too.
    """
    for rid in run_ids:
        run = state.runs.pop(rid, None)
        if run is None:
            continue
        state.by_status[run.status].pop(rid, None)
        sid = run.spec.session_id
        if sid is not None:
            ids = state.by_session.get(sid)
            if ids is not None:
                ids.pop(rid, None)
                if not ids:
                    del state.by_session[sid]
        key = run.spec.idempotency_key
        if key is not None and state.idempotency.get((run.spec.tenant, key)) == rid:
            del state.idempotency[run.spec.tenant, key]
        state.deleted_in_order += 1
    state.vacuum()
    return state


def strip_keys(state: State, run_ids: Iterable[str]) -> State:
    """Forget the idempotency key (and request hash) of runs, as compaction does on disk."""
    for rid in run_ids:
        run = state.runs.get(rid)
        if run is None or (run.spec.idempotency_key is None and run.spec.request_hash is None):
            continue
        key = run.spec.idempotency_key
        if key is not None and state.idempotency.get((run.spec.tenant, key)) == rid:
            del state.idempotency[run.spec.tenant, key]
        # The one assignment to a Run outside state.py: compaction rewrites history.
        run.spec = attrs.evolve(run.spec, idempotency_key=None, request_hash=None)
    return state


def apply_report(state: State, report: CompactionReport) -> State:
    """Bring live state in line with a finished compaction (use as `on_swap`)."""
    forget(state, report.dropped)
    strip_keys(state, report.stripped)
    return state


async def compact_state(
    journal: Journal,
    state: State,
    now: float,
    *,
    retention_s: float = DEFAULT_RETENTION_S,
    idempotency_window_s: float = DEFAULT_IDEMPOTENCY_WINDOW_S,
    on_swap: Callable[[CompactionReport], None] | None = None,
) -> CompactionReport:
    """Plan against `state`, compact `journal`, and update `state` at the swap.

    `on_swap`, if given, runs right after the state update (same instant, no checkpoint):
    the engine's hook to drop its own per-run bookkeeping.
    """
    chosen = plan(state, now, retention_s, idempotency_window_s)

    def swap(report: CompactionReport) -> None:
        apply_report(state, report)
        for rid in report.dropped:
            journal.forget(rid)
        if on_swap is not None:
            on_swap(report)

    return await journal.compact(chosen.drop, chosen.strip_keys, on_swap=swap)


# -- doing (file work, run in a worker thread) -------------------------------------------


@attrs.define(slots=True, eq=False)
class CompactionReport:
    """What a compaction did (or why it did nothing)."""

    replaced: list[int] = attrs.Factory(list)  # sealed segments rewritten
    segment: int | None = None  # the number of the compacted file
    dropped: set[str] = attrs.Factory(set)  # runs whose events were dropped
    stripped: set[str] = attrs.Factory(set)  # runs whose idempotency key was stripped
    purged_deleted: int = 0  # runs deleted by users whose events were purged
    events_before: int = 0
    events_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    skipped: str | None = None  # why nothing was written, if nothing was

    def summary(self) -> str:
        if self.skipped is not None:
            return f"compaction skipped: {self.skipped}"
        seg = segment_name(self.segment) if self.segment is not None else "memory"
        return (
            f"compacted segments {self.replaced} into {seg}: "
            f"{self.events_before} -> {self.events_after} events, "
            f"{self.bytes_before} -> {self.bytes_after} bytes; dropped {len(self.dropped)} "
            f"runs, purged {self.purged_deleted} deleted runs, stripped {len(self.stripped)} "
            f"idempotency keys ({self.seconds:.2f}s)"
        )


@attrs.define(slots=True, eq=False)
class Built:
    """A compacted file written and synced, not yet installed."""

    directory: Path
    report: CompactionReport
    tmp_path: Path | None  # None: nothing to change, nothing written
    final_path: Path
    positions: dict[str, array[int]] = attrs.Factory(dict)


def _lines(path: Path, data: bytes) -> Iterable[tuple[int, int, int]]:
    """(line number, start, end) of every line after the header; damage raises."""
    pos = data.find(b"\n") + 1
    if pos == 0:
        raise JournalCorrupt(path, 1, "no header line")
    lineno = 1
    n = len(data)
    while pos < n:
        end = data.find(b"\n", pos)
        lineno += 1
        if end < 0:
            raise JournalCorrupt(path, lineno, "incomplete line in a sealed segment")
        yield lineno, pos, end
        pos = end + 1


def _header(path: Path, data: bytes) -> dict[str, Any]:
    end = data.find(b"\n")
    try:
        return decode_line(data[:end]) if end > 0 else {}
    except ValueError as exc:
        raise JournalCorrupt(path, 1, f"header: {exc}") from None


def build(
    directory: Path,
    sealed: list[int],
    drop: Collection[str],
    strip: Collection[str],
    fsync: Callable[[int], None] = os.fsync,
) -> Built:
    """Step 1: write the compacted file for sealed segments F..N as a synced temp file.

    Reads every sealed line again and checks its checksum: damage found now (bit rot in a
    sealed file) stops the compaction rather than being copied or dropped silently.
    """
    report = CompactionReport(replaced=list(sealed))
    last = sealed[-1] if sealed else 0
    final = directory / segment_name(last)
    if not sealed:
        report.skipped = "no sealed segment"
        return Built(directory, report, None, final)
    first = sealed[0]
    paths = [directory / segment_name(s) for s in sealed]

    # Pass 1: where each deleted run's `deleted` event is; the seq range.
    deleted_upto: dict[str, int] = {}
    base_seq = 0
    seq_end = 0
    for i, path in enumerate(paths):
        data = path.read_bytes()
        report.bytes_before += len(data)
        header = _header(path, data)
        if i == 0:
            base_seq = int(header.get("seq", 0))
        seq_end = max(seq_end, int(header.get("seq", 0)), int(header.get("seq_end", 0)))
        hit = data.find(_DELETED_NEEDLE)
        while hit >= 0:
            start = data.rfind(b"\n", 0, hit) + 1
            end = data.find(b"\n", hit)
            if end > start:
                try:
                    obj = decode_line(data[start:end])
                except ValueError:
                    obj = {}
                run, seq = obj.get("run"), obj.get("seq")
                if obj.get("type") == "deleted" and isinstance(run, str) and type(seq) is int:
                    deleted_upto[run] = seq
            hit = data.find(_DELETED_NEEDLE, hit + 1)
        tail_start = data.rfind(b"\n", 0, len(data) - 1) + 1
        if tail_start > 0 and data.endswith(b"\n"):
            with contextlib.suppress(ValueError, TypeError):  # damage: pass 2 names it
                seq_end = max(seq_end, int(decode_line(data[tail_start:-1]).get("seq", 0)))

    # Pass 2: copy what is kept.
    tmp = directory / (final.name + COMPACT_TMP_SUFFIX)
    positions: dict[str, array[int]] = {}
    base = last << SEG_SHIFT
    changed = False
    header_line = encode_line(header_obj(last, base_seq, compacted_from=first, seq_end=seq_end))
    try:
        with open(tmp, "wb") as out:
            out.write(header_line)
            offset = len(header_line)
            for path in paths:
                data = path.read_bytes()
                for lineno, start, end in _lines(path, data):
                    try:
                        obj = decode_line(data[start:end])
                        run, seq, etype = obj["run"], obj["seq"], obj["type"]
                    except (ValueError, KeyError) as exc:
                        raise JournalCorrupt(path, lineno, str(exc)) from None
                    report.events_before += 1
                    if run in drop:
                        report.dropped.add(run)
                        changed = True
                        continue
                    upto = deleted_upto.get(run)
                    if upto is not None and seq <= upto:
                        if seq == upto:
                            report.purged_deleted += 1
                        changed = True
                        continue
                    line = data[start : end + 1]
                    if run in strip and etype == "submitted":
                        body = obj["data"]
                        if any(k in body for k in _STRIPPED):
                            obj["data"] = {k: v for k, v in body.items() if k not in _STRIPPED}
                            line = encode_line(obj)
                            report.stripped.add(run)
                            changed = True
                    p = positions.get(run)
                    if p is None:
                        positions[run] = array("q", (base | offset,))
                    else:
                        p.append(base | offset)
                    out.write(line)
                    offset += len(line)
                    report.events_after += 1
            out.flush()
            if changed:
                fsync(out.fileno())
        report.bytes_after = offset
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if not changed:
        tmp.unlink()
        report.skipped = "nothing to drop or strip"
        return Built(directory, report, None, final)
    report.segment = last
    return Built(directory, report, tmp, final, positions)


def install(built: Built) -> None:
    """Step 2: the atomic switch. From here on the compacted file is the journal."""
    assert built.tmp_path is not None
    os.rename(built.tmp_path, built.final_path)


def remove_replaced(built: Built, fsync: Callable[[int], None] = os.fsync) -> None:
    """Step 3: make the rename durable, then delete the replaced segments."""
    _fsync_dir(built.directory, fsync)
    for seg in built.report.replaced[:-1]:
        (built.directory / segment_name(seg)).unlink(missing_ok=True)
    _fsync_dir(built.directory, fsync)


def compact_memory(
    memory: dict[str, list[bytes]], drop: Collection[str], strip: Collection[str]
) -> CompactionReport:
    """Compaction for `durability="memory"`: the same effect on the in-memory lines."""
    started = time.perf_counter()
    report = CompactionReport()
    for rid in drop:
        lines = memory.pop(rid, None)
        if lines is not None:
            report.dropped.add(rid)
            report.events_before += len(lines)
    for rid in strip:
        lines = memory.get(rid)
        if not lines:
            continue
        for i, line in enumerate(lines):
            obj = decode_line(line[:-1])
            if obj["type"] == "submitted" and any(k in obj["data"] for k in _STRIPPED):
                obj["data"] = {k: v for k, v in obj["data"].items() if k not in _STRIPPED}
                lines[i] = encode_line(obj)
                report.stripped.add(rid)
                break
    report.seconds = time.perf_counter() - started
    return report
