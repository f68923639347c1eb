"""Reading the marker files of tests/faults/marker_runner.py and judging them.

Why markers and not the server's own word: "a run never ran twice at the same time" is a
claim about processes, so it is checked with what the processes themselves wrote, on a
system-wide monotonic clock, independently of the journal.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import attrs

__all__ = ["Attempt", "overlaps", "read_markers"]


@attrs.frozen(slots=True)
class Attempt:
    """One process started for one attempt of a run."""

    run: str
    attempt: int
    pid: int
    start_ns: int
    stop_ns: int | None  # None: no stop line (still running, or killed hard)
    why: str | None  # done | term | orphan | failed

    @property
    def end(self) -> float:
        """When it stopped; an attempt that never wrote a stop line counts as running
        forever (the conservative choice for finding overlaps)."""
        return math.inf if self.stop_ns is None else float(self.stop_ns)


def read_markers(directory: Path) -> dict[str, list[Attempt]]:
    """Every attempt found in `directory`, by run, ordered by start time."""
    by_run: dict[str, list[Attempt]] = defaultdict(list)
    if not directory.is_dir():
        return {}
    for path in directory.iterdir():
        run, attempt, pid = path.name.rsplit(".", 2)
        start: int | None = None
        stop: int | None = None
        why: str | None = None
        for line in path.read_text(encoding="ascii").splitlines():
            parts = line.split()
            if parts and parts[0] == "start":
                start = int(parts[1])
            elif parts and parts[0] == "stop":
                stop, why = int(parts[1]), parts[2]
        if start is None:  # created but killed before the first line: never did anything
            continue
        by_run[run].append(Attempt(run, int(attempt), int(pid), start, stop, why))
    for attempts in by_run.values():
        attempts.sort(key=lambda a: a.start_ns)
    return dict(by_run)


def overlaps(by_run: dict[str, list[Attempt]]) -> list[tuple[Attempt, Attempt]]:
    """Pairs of attempts of the same run whose lifetimes intersect."""
    found: list[tuple[Attempt, Attempt]] = []
    for attempts in by_run.values():
        latest: Attempt | None = None
        for a in attempts:
            if latest is not None and a.start_ns < latest.end:
                found.append((latest, a))
            if latest is None or a.end > latest.end:
                latest = a
    return found
