"""Damaging copies of a real journal and judging what start-up and `log repair` make of it.

Why a journal written by the real server: the cases then hold every kind of line the
server writes (header, submitted with config and session, started, progress, output,
cancel, success, failure) with their real sizes, instead of lines a test made up.

The rule being checked (docs/journal-format.md, "Opening"): start-up either recovers
exactly the durable prefix (a torn tail: damage in the last line(s) with no intact line
after it, cut and kept in a side file, with a warning) or refuses with `JournalCorrupt`
naming file:line and changes nothing; `agentjobs log repair` then moves the damage aside
and keeps every event before it (a damaged header alone is rebuilt, keeping every event
after it), after which start-up succeeds.

`open_like_the_server` replays a directory the way the engine does at start (the journal's
open folding every event into a fresh `State`), in-process, so that every one of the
thousands of cases costs a millisecond; the tests then start the real server on a
sample of the cases to show the operator's view (exit code, message, log line).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx

from agentjobs.engine.journal import (
    IOHooks,
    Journal,
    JournalCorrupt,
    decode_line,
    event_from_obj,
)
from agentjobs.engine.model import Event
from agentjobs.engine.state import State, apply

from .server import start_server

__all__ = [
    "Case",
    "Outcome",
    "all_cases",
    "expected_state",
    "make_journal",
    "open_like_the_server",
    "run_case",
    "summarise",
]

SEGMENT = "00000001.jsonl"


def make_journal(work: Path) -> Path:
    """A small journal written by `agentjobs serve`: returns the stopped server's data dir.

    Three runs: one succeeded with progress and output, one failed, one cancelled while
    queued (behind a long run that is cancelled while running).
    """
    data = work / "data"
    proc = start_server(data, "--max-concurrency", "1")
    try:
        with httpx.Client(base_url=proc.url, timeout=20) as c:
            runs = "/api/v1/runs"
            ok = c.post(
                runs,
                json={
                    "prompt": "two words",
                    "session_id": "s1",
                    "config": {"output": True, "delay_s": 0.02, "steps": 2},
                },
            ).json()["job_id"]
            c.get(f"{runs}/{ok}/result", params={"wait": 10})
            bad = c.post(runs, json={"prompt": "fails", "config": {"fail": "boom"}}).json()
            c.get(f"{runs}/{bad['job_id']}/result", params={"wait": 10})
            long = c.post(runs, json={"prompt": "long", "config": {"delay_s": 30}}).json()
            waiting = c.post(runs, json={"prompt": "waits"}).json()
            for _ in range(200):
                if c.get(f"{runs}/{long['job_id']}").json()["status"] == "running":
                    break
                time.sleep(0.01)
            c.post(f"{runs}/{waiting['job_id']}/cancel")
            c.post(f"{runs}/{long['job_id']}/cancel")
        code = proc.terminate()
        if code != 0:
            raise RuntimeError(f"server exited {code}:\n{proc.output}")
    finally:
        proc.kill()
    return data


def lines_of(data: bytes) -> list[bytes]:
    """The journal's lines, each with its newline."""
    return data.splitlines(keepends=True)


def events_of(lines: list[bytes]) -> list[Event]:
    return [event_from_obj(decode_line(line.rstrip(b"\n"))) for line in lines[1:]]


def expected_state(events: list[Event]) -> dict[str, Any]:
    state = State()
    for ev in events:
        apply(state, ev)
    return _view(state)


def _view(state: State) -> dict[str, Any]:
    """What a client can see of each run (the comparison of two states)."""
    return {
        rid: (run.status.value, run.spec, run.result, run.error, run.attempt, run.created_at)
        for rid, run in state.runs.items()
    }


@attrs.frozen(slots=True)
class Case:
    """One way of damaging the journal, and what start-up must do with it.

    `keep`: how many event lines must survive (the durable prefix). `refuse_at`: None for
    a journal that opens (clean, or a torn tail that is cut); else the 1-based line
    numbers the refusal may name (a reordering may be noticed at either line).
    """

    name: str
    mutate: Callable[[bytes], bytes]
    keep: int
    refuse_at: frozenset[int] | None = None
    torn: bool = False


def _truncate(at: int) -> Callable[[bytes], bytes]:
    return lambda data: data[:at]


def _flip(at: int, mask: int) -> Callable[[bytes], bytes]:
    def mutate(data: bytes) -> bytes:
        b = bytearray(data)
        b[at] ^= mask
        return bytes(b)

    return mutate


def _relines(order: Callable[[list[bytes]], list[bytes]]) -> Callable[[bytes], bytes]:
    return lambda data: b"".join(order(lines_of(data)))


def _duplicate(i: int) -> Callable[[list[bytes]], list[bytes]]:
    """Line i+1 (1-based) written twice."""
    return lambda ls: [*ls[: i + 1], ls[i], *ls[i + 1 :]]


def _swap(i: int) -> Callable[[list[bytes]], list[bytes]]:
    """Lines i+1 and i+2 (1-based) in the other order."""
    return lambda ls: [*ls[:i], ls[i + 1], ls[i], *ls[i + 2 :]]


def all_cases(data: bytes) -> Iterator[Case]:
    """Truncation at every offset; byte flips at the start, middle, end and newline of
    every line; every line duplicated; every pair of neighbours swapped."""
    lines = lines_of(data)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    n = len(lines)  # the header is line 1; events are lines 2..n
    for at in range(len(data) + 1):
        complete = sum(1 for s in starts[1:] if s <= at)  # whole lines before `at`
        keep = max(0, complete - 1)
        torn = at not in starts
        yield Case(f"truncate@{at}", _truncate(at), keep, None, torn)
    for i, line in enumerate(lines):
        lineno = i + 1
        body_len = len(line) - 1
        positions = sorted({0, 9, body_len // 2, body_len - 1, body_len})
        for pos in positions:
            for mask in (0x01, 0x20, 0xFF):
                at = starts[i] + pos
                if pos == body_len and lineno == n:
                    # the final newline: a line without its newline is an incomplete
                    # (torn) last line
                    yield Case(f"flip@{at}^{mask:#x}", _flip(at, mask), lineno - 2, None, True)
                    continue
                # damage in line `lineno`; with its newline gone it merges with the next
                last_damaged = lineno + 1 if pos == body_len else lineno
                if last_damaged >= n:  # nothing intact after the damage: a torn tail
                    yield Case(f"flip@{at}^{mask:#x}", _flip(at, mask), lineno - 2, None, True)
                else:
                    refuse = frozenset({lineno})
                    yield Case(f"flip@{at}^{mask:#x}", _flip(at, mask), lineno - 2, refuse)
    for i in range(1, n):  # duplicate each event line: an intact line out of sequence
        yield Case(
            f"duplicate-line-{i + 1}",
            _relines(_duplicate(i)),
            i,
            frozenset({i + 2}),
        )
    for i in range(1, n - 1):  # swap neighbours i+1 and i+2 (1-based)
        yield Case(
            f"swap-lines-{i + 1}-{i + 2}",
            _relines(_swap(i)),
            i - 1,
            frozenset({i + 1, i + 2}),
        )


@attrs.define(slots=True)
class Outcome:
    case: str
    kind: str  # clean | torn | refused | repaired
    problems: list[str] = attrs.Factory(list)


def open_like_the_server(journal_dir: Path) -> tuple[dict[str, Any], Any]:
    """Replay as the engine does at start-up; returns (runs view, replay report).
    Raises JournalCorrupt where the server would refuse to start."""
    state = State()
    # fsync as a no-op: the cases are judged by the bytes, and thousands of real syncs
    # would take minutes; the server's own syncs are exercised by the subprocess cases
    journal = Journal(journal_dir, "fsync", hooks=IOHooks(fsync=_no_sync))
    try:
        report = journal.open(lambda ev: apply(state, ev))
    finally:
        journal.close_files()
    return _view(state), report


def _no_sync(fd: int) -> None:
    pass


def _repair(data_dir: Path) -> tuple[int, str]:
    from agentjobs.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = main(["log", "repair", str(data_dir)])
    return code, out.getvalue()


def run_case(original: Path, work: Path, case: Case, events: list[Event]) -> Outcome:
    """Apply `case` to a copy of the journal in `original` (a data dir) and judge start-up
    and, for a refusal, `log repair` followed by a second start-up."""
    data_dir = work / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)
    journal_dir = data_dir / "journal"
    journal_dir.mkdir(parents=True)
    source = (original / "journal" / SEGMENT).read_bytes()
    damaged = case.mutate(source)
    (journal_dir / SEGMENT).write_bytes(damaged)
    out = Outcome(case.name, "clean")
    want = expected_state(events[: max(0, case.keep)])
    try:
        got, report = open_like_the_server(journal_dir)
    except JournalCorrupt as exc:
        out.kind = "refused"
        if case.refuse_at is None:
            out.problems.append(f"{case.name}: refused ({exc}), expected to open")
            return out
        if exc.line not in case.refuse_at or f"{SEGMENT}:{exc.line}:" not in str(exc):
            out.problems.append(f"{case.name}: refused at {exc}, expected line {case.refuse_at}")
        if (journal_dir / SEGMENT).read_bytes() != damaged:
            out.problems.append(f"{case.name}: a refused open changed the file")
        code, text = _repair(data_dir)
        if code != 0:
            out.problems.append(f"{case.name}: log repair exited {code}: {text}")
            return out
        segment = journal_dir / SEGMENT  # gone when all of it was moved aside
        kept = lines_of(segment.read_bytes()) if segment.exists() else []
        side = {p.name: p.read_bytes() for p in journal_dir.glob("repair-*/*") if p.is_file()}
        # a damaged header alone is moved aside and replaced by a fresh one
        header = side.pop(f"{SEGMENT}.damaged-header", None)
        if header is not None:
            kept = [header, *kept[1:]]
        moved = b"".join(side.values())
        if b"".join(kept) + moved != damaged:
            out.problems.append(f"{case.name}: repair lost bytes (kept + moved != damaged)")
        got, _ = open_like_the_server(journal_dir)
        out.kind = "repaired"
        # every line before the named one passed the checks: all of them must be kept
        # (for a reordering that includes the later event that was read first)
        good = expected_state(events_of(lines_of(damaged)[: exc.line - 1]))
        if exc.line == 1:  # the header holds no event: every (intact) event after it stays
            good = expected_state(events)
        if got != good:
            out.problems.append(f"{case.name}: after repair {len(got)} runs, want {len(good)}")
        return out
    if case.refuse_at is not None:
        out.problems.append(f"{case.name}: opened, expected a refusal at {case.refuse_at}")
        return out
    if got != want:
        out.problems.append(f"{case.name}: opened to {len(got)} runs, want {len(want)}")
    if report.torn_file is not None:
        out.kind = "torn"
        left = (journal_dir / SEGMENT).read_bytes()
        cut = Path(report.torn_file).read_bytes()
        # the cut bytes are kept, none lost: a torn header leaves a fresh header
        whole = cut if report.torn_line == 1 else left + cut
        if whole != damaged:
            out.problems.append(f"{case.name}: kept + cut bytes != the damaged file")
    if case.torn != (report.torn_file is not None):
        out.problems.append(f"{case.name}: torn={report.torn_file is not None}, want {case.torn}")
    again, second = open_like_the_server(journal_dir)  # a second start finds it clean
    if again != want or second.torn_file is not None:
        out.problems.append(f"{case.name}: a second open differs")
    return out


def summarise(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    counts["problems"] = sum(len(o.problems) for o in outcomes)
    return counts
