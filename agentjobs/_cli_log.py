"""`agentjobs log ...`: verify, inspect, compact and repair a journal, offline.

The journal of a data directory lives in `DATA_DIR/journal/` (a path straight to a journal
directory is accepted too). `verify` and `inspect` only read, so they may run beside a live
server (whose last line may then be in flight); `compact` and `repair` change files and
take the directory's lock first, so they refuse to run while a server holds it.

`verify` exit codes: 0 clean; 1 damaged (the server refuses to start: run `log repair`);
3 only a torn tail (the server cuts it at start, keeping the bytes in a side file).

`repair` moves damage and everything after it aside, except a damaged segment header:
that holds no event, so it alone is moved aside and rebuilt from the neighbouring
segments (engine/_repair.py), keeping the segment's events. It refuses (exit 1) a header
of a newer or unknown format, or one it cannot derive safely, and says why.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import trio

from .engine._repair import HeaderFix, HeaderRefused, apply_header_fix, plan_header_fix
from .engine.compaction import (
    DEFAULT_IDEMPOTENCY_WINDOW_S,
    DEFAULT_RETENTION_S,
    compact_state,
    plan,
)
from .engine.journal import (
    LOCK_NAME,
    Damage,
    Journal,
    JournalBusy,
    JournalCorrupt,
    ScanReport,
    acquire_lock,
    decode_line,
    prepare_directory,
    release_lock,
    scan,
    segment_name,
)
from .engine.model import Event, Status, isoformat
from .engine.state import State, apply

__all__ = ["register"]

EXIT_OK = 0
EXIT_DAMAGED = 1
EXIT_USAGE = 2
EXIT_TORN = 3


def register(sub: Any) -> None:
    """Add `log` and its actions to the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "log",
        help="verify, inspect, compact or repair a journal",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="log_command", metavar="ACTION")

    def usage(args: argparse.Namespace) -> int:
        p.print_help()
        return EXIT_USAGE

    p.set_defaults(func=usage)

    v = actions.add_parser(
        "verify", help="check every line and checksum (exit 0 clean, 1 damaged, 3 torn tail)"
    )
    v.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    v.set_defaults(func=cmd_verify)

    i = actions.add_parser("inspect", help="runs and event counts, or one run's events")
    i.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    i.add_argument("--run", metavar="ID", help="print this run's events")
    i.add_argument(
        "--limit", type=int, default=50, help="runs to list, newest first (0: all; default 50)"
    )
    i.set_defaults(func=cmd_inspect)

    c = actions.add_parser(
        "compact", help="drop finished runs past retention and expired idempotency keys"
    )
    c.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    c.add_argument(
        "--retention-days",
        type=float,
        default=DEFAULT_RETENTION_S / 86400,
        help="keep finished runs this long after they finished (default 7)",
    )
    c.add_argument(
        "--idempotency-hours",
        type=float,
        default=DEFAULT_IDEMPOTENCY_WINDOW_S / 3600,
        help="keep idempotency keys this long after submission (default 24)",
    )
    c.add_argument("--dry-run", action="store_true", help="only say what would go")
    c.set_defaults(func=cmd_compact)

    r = actions.add_parser(
        "repair",
        help="move damage aside to a side directory (a damaged header alone: rebuild it), "
        "keep every good event",
    )
    r.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    r.set_defaults(func=cmd_repair)


# -- helpers ---------------------------------------------------------------------------


class _Usage(Exception):
    pass


def journal_dir(data_dir: Path) -> Path:
    """DATA_DIR/journal, or DATA_DIR itself if it is a journal directory."""
    nested = data_dir / "journal"
    if nested.is_dir():
        return nested
    if data_dir.is_dir() and (
        (data_dir / LOCK_NAME).exists() or (data_dir / segment_name(1)).exists()
    ):
        return data_dir
    if data_dir.is_dir() and any(p.suffix == ".jsonl" for p in data_dir.iterdir()):
        return data_dir
    raise _Usage(f"no journal in {data_dir} (expected {nested})")


def lock_held(directory: Path) -> bool:
    """Is a live process holding the directory's lock? (Read-only probe; creates nothing.)"""
    try:
        fd = os.open(directory / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def _err(msg: str) -> None:
    print(f"agentjobs log: {msg}", file=sys.stderr)


def _fold_into(state: State) -> Any:
    def fold(event: Event) -> None:
        apply(state, event)

    return fold


def _tail_bytes(damage: Damage) -> int:
    return damage.path.stat().st_size - damage.offset


def _summary(directory: Path, report: ScanReport) -> str:
    per = report.bytes / report.events if report.events else 0.0
    return (
        f"{directory}: {len(report.segments)} segment(s), {report.events} events, "
        f"{report.bytes} bytes ({per:.0f} bytes/event), last seq {report.last_seq}"
    )


def _run_commands(args: argparse.Namespace, body: Any) -> int:
    try:
        code: int = body(args)
        return code
    except _Usage as exc:
        _err(str(exc))
        return EXIT_DAMAGED
    except JournalBusy as exc:
        _err(f"{exc}; stop the server first")
        return EXIT_DAMAGED


# -- verify ------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    return _run_commands(args, _verify)


def _verify(args: argparse.Namespace) -> int:
    directory = journal_dir(args.data_dir)
    live = lock_held(directory)
    report = scan(directory, _fold_into(State()))
    print(_summary(directory, report))
    for path in report.stale:
        print(f"note: {path.name} is left over from an interrupted compaction (removed at open)")
    damage = report.damage
    if damage is None:
        print("OK: every line is intact, in sequence, and folds into state")
        return EXIT_OK
    if damage.torn:
        note = " (a server is running: the line may still be being written)" if live else ""
        print(
            f"torn tail at {damage}: {_tail_bytes(damage)} bytes{note}; the server cuts it "
            "at start and keeps the bytes in a side file"
        )
        return EXIT_TORN
    print(f"DAMAGED at {damage}")
    print(f"the server will refuse to start; `agentjobs log repair {args.data_dir}`", end=" ")
    try:
        fix = plan_header_fix(directory, report, damage)
    except HeaderRefused as exc:
        print(f"will refuse it: {exc}")
        return EXIT_DAMAGED
    if fix is not None:
        print("rebuilds this header")
        print(f"(only the header is damaged: the {fix.events} intact event(s) after it are kept)")
    else:
        print("moves")
        print("the damaged tail aside (and any later segments), keeping every event before it")
    return EXIT_DAMAGED


# -- inspect ---------------------------------------------------------------------------


def cmd_inspect(args: argparse.Namespace) -> int:
    return _run_commands(args, _inspect)


def _inspect(args: argparse.Namespace) -> int:
    directory = journal_dir(args.data_dir)
    state = State()
    by_type: Counter[str] = Counter()
    per_run: Counter[str] = Counter()
    wanted: list[Event] = []
    run_id = args.run

    def on_event(event: Event) -> None:
        apply(state, event)
        by_type[event.type.value] += 1
        per_run[event.run] += 1
        if event.run == run_id:
            wanted.append(event)

    report = scan(directory, on_event)
    if run_id is not None:
        return _inspect_run(run_id, wanted, state, report)
    print(_summary(directory, report))
    if report.damage is not None:
        kind = "torn tail" if report.damage.torn else "DAMAGED"
        print(f"{kind} at {report.damage} (reading stopped there)")
    print(f"runs: {len(state.runs)}")
    for status in Status:
        print(f"  {status.value:<10} {state.count(status)}")
    print("events by type:")
    for etype, n in sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {etype:<18} {n}")
    limit = args.limit if args.limit > 0 else len(state.runs)
    runs = list(state.newest_first(any_tenant=True))[:limit]
    if runs:
        shown = f"newest {len(runs)} of {len(state.runs)}" if limit < len(state.runs) else "all"
        print(f"runs ({shown}):")
        print(f"  {'id':<36} {'status':<10} {'events':>6}  {'created':<27} session")
        for run in runs:
            print(
                f"  {run.id:<36} {run.status.value:<10} {per_run[run.id]:>6}  "
                f"{isoformat(run.created_at):<27} {run.spec.session_id or '-'}"
            )
    return EXIT_DAMAGED if report.damage is not None and not report.damage.torn else EXIT_OK


def _inspect_run(run_id: str, events: list[Event], state: State, report: ScanReport) -> int:
    if not events:
        _err(f"no events for {run_id} in the journal")
        return EXIT_DAMAGED
    print(f"{run_id}: {len(events)} events")
    for ev in events:
        data = orjson.dumps(ev.data).decode()
        print(f"  {ev.seq:>8}  {isoformat(ev.ts)}  {ev.type.value:<18} {data}")
    run = state.get(run_id)
    if run is None:
        print("  (deleted)")
    else:
        line = f"  status {run.status.value}, attempt {run.attempt}"
        if run.error is not None:
            line += f", error {run.error!r}"
        if run.finished and run.error is None:
            line += f", result {orjson.dumps(run.result).decode()}"
        print(line)
    if report.damage is not None:
        print(f"note: reading stopped at {report.damage}")
    return EXIT_OK


# -- compact ---------------------------------------------------------------------------


def cmd_compact(args: argparse.Namespace) -> int:
    return _run_commands(args, _compact)


def _compact(args: argparse.Namespace) -> int:
    directory = journal_dir(args.data_dir)
    retention = args.retention_days * 86400.0
    window = args.idempotency_hours * 3600.0
    if retention < 0 or window < 0:
        raise _Usage("retention and idempotency window must not be negative")
    return trio.run(_compact_async, directory, retention, window, args.dry_run)


async def _compact_async(directory: Path, retention: float, window: float, dry: bool) -> int:
    state = State()

    def on_commit(events: list[Event]) -> None:
        for e in events:
            apply(state, e)

    journal = Journal(directory, "fsync", on_commit)
    try:
        replayed = journal.open(_fold_into(state))
    except JournalCorrupt as exc:
        _err(f"{exc}\nrun `agentjobs log repair` first")
        return EXIT_DAMAGED
    try:
        if replayed.torn_file is not None:
            print(f"cut a torn tail of {replayed.torn_bytes} bytes (kept in {replayed.torn_file})")
        now = time.time()
        chosen = plan(state, now, retention, window)
        print(
            f"{replayed.events} events, {len(state.runs)} runs: {len(chosen.drop)} finished "
            f"runs past retention, {len(chosen.strip_keys)} expired idempotency keys"
        )
        if dry:
            for rid in sorted(chosen.drop):
                print(f"  would drop {rid}")
            for rid in sorted(chosen.strip_keys):
                print(f"  would strip the idempotency key of {rid}")
            return EXIT_OK
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            try:
                report = await compact_state(
                    journal, state, now, retention_s=retention, idempotency_window_s=window
                )
            finally:
                await journal.aclose()
        print(report.summary())
        return EXIT_OK
    finally:
        journal.close_files()


# -- repair ----------------------------------------------------------------------------


def cmd_repair(args: argparse.Namespace) -> int:
    return _run_commands(args, _repair)


def _count_intact(data: bytes) -> int:
    n = 0
    for line in data.split(b"\n"):
        with contextlib.suppress(ValueError):
            decode_line(line)
            n += 1
    return n


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _SideDir:
    """The one side directory of a repair run, created when something is first moved."""

    def __init__(self, directory: Path) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.path = directory / f"repair-{stamp}-{os.getpid()}"
        self._made = False

    def get(self) -> Path:
        if not self._made:
            self.path.mkdir()
            self._made = True
        return self.path


def _repair(args: argparse.Namespace) -> int:
    directory = journal_dir(args.data_dir)
    lock_fd = acquire_lock(directory)
    try:
        for path in prepare_directory(directory):
            print(f"removed {path.name} (left over from an interrupted compaction)")
        report = scan(directory, _fold_into(State()))
        if report.damage is None:
            print(_summary(directory, report))
            print("nothing to repair: the journal is clean")
            return EXIT_OK
        side = _SideDir(directory)
        # Each step fixes the first damage: a rebuilt header leaves the rest of its
        # segment to be read again, and may uncover damage further on (moved aside by
        # the next step); moving a tail aside leaves nothing after it. So this ends.
        for _ in range(2 * len(report.segments) + 2):
            damage = report.damage
            if damage is None:
                break
            try:
                fix = plan_header_fix(directory, report, damage)
            except HeaderRefused as exc:
                print(f"damage at {damage}")
                _err(f"cannot repair: {exc}")
                _err("the damaged segment was left as it is; earlier steps (if any) are kept")
                return EXIT_DAMAGED
            if fix is not None:
                _rebuild_header(fix, damage, side.get() if fix.damaged else side.path)
            else:
                _move_tail_aside(directory, report, damage, side.get())
            report = scan(directory, _fold_into(State()))
        print(f"journal now: {report.events} events, last seq {report.last_seq}")
        if report.damage is not None:  # pragma: no cover - would be a bug in scan/repair
            _err(f"still damaged at {report.damage}")
            return EXIT_DAMAGED
        kept = f"; what was moved is kept in {side.path}" if side.path.exists() else ""
        print(f"OK: the journal is clean{kept}")
        return EXIT_OK
    finally:
        release_lock(lock_fd)


def _rebuild_header(fix: HeaderFix, damage: Damage, side_dir: Path) -> None:
    """Move a damaged header (only) aside and write a fresh one: the events stay."""
    kept_file = apply_header_fix(fix, side_dir)
    name = fix.path.name
    print(f"damage at {damage}")
    if kept_file is None:
        print(f"{name} has no header line (it starts with an event): wrote a fresh header")
    else:
        print(f"moved the damaged header of {name} ({len(fix.damaged)} bytes) to {kept_file}")
    if fix.merged_event:
        print("  (its newline was damaged: the first event shared its line and is kept)")
    fields = "; ".join(fix.notes)
    print(f"wrote a fresh header for {name}: {fields}")
    print(f"kept the {fix.events} intact event(s) that follow it in {name}")


def _move_tail_aside(directory: Path, report: ScanReport, damage: Damage, side_dir: Path) -> None:
    """Move damage.path[damage.offset:] and every later segment into `side_dir`.

    Order matters for a crash in the middle: first the copy of the tail (synced), then the
    later segments (newest first), then the cut; re-running repair finishes the job.
    """
    path = damage.path
    data = path.read_bytes()
    tail = data[damage.offset :]
    side = side_dir / f"{path.name}.from-line-{damage.line}"
    with open(side, "xb") as f:
        f.write(tail)
        f.flush()
        os.fsync(f.fileno())
    intact = _count_intact(tail)
    later = [s for s in report.segments if s > damage.segment]
    moved_segments: list[tuple[str, int]] = []
    for seg in reversed(later):
        src = directory / segment_name(seg)
        size = src.stat().st_size
        intact += _count_intact(src.read_bytes())
        os.rename(src, side_dir / src.name)
        moved_segments.append((src.name, size))
    _fsync_path(side_dir)
    _fsync_path(directory)
    if damage.offset == 0:
        path.unlink()  # nothing good in it (an unusable header, nothing intact after it)
    else:
        with open(path, "r+b") as f:
            f.truncate(damage.offset)
            os.fsync(f.fileno())
    _fsync_path(directory)
    print(f"damage at {damage}")
    print(f"moved {len(tail)} bytes from {path.name} line {damage.line} to the end into {side}")
    for name, size in reversed(moved_segments):
        print(f"moved later segment {name} ({size} bytes) into {side_dir}")
    if intact:
        print(
            f"{intact} intact line(s) were in the moved part: they are kept in {side_dir}, "
            "not replayed (the events before the damage are all kept)"
        )
