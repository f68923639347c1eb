"""A damaged journal at start-up (issue 7, item 3), on copies of a journal the server wrote.

Every truncation offset, byte flips in every line (start, middle, end, newline), every
line duplicated, every pair of neighbouring lines swapped: start-up either recovers
exactly the durable prefix (a torn tail, cut and kept in a side file) or refuses naming
file:line without changing anything, and `agentjobs log repair` then moves the damage
aside, keeps every line before it, and the journal opens. Judged in-process for all
cases (tests/faults/corruption.py), then with the real `agentjobs serve` for a sample, to
show what an operator sees: the exit code, the message, the warning.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from faults.corruption import (
    SEGMENT,
    all_cases,
    events_of,
    lines_of,
    make_journal,
    run_case,
    summarise,
)
from faults.server import start_server
from faults.storage import MountUnavailable, tiny_tmpfs


@pytest.fixture(scope="module")
def real_journal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding a small journal written by `agentjobs serve` (16 lines)."""
    return make_journal(tmp_path_factory.mktemp("journal"))


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """Where the damaged copies go: a tmpfs when we may mount one (thousands of copies
    and the repair command's fsyncs cost nothing there), else the test's tmp dir."""
    try:
        with tiny_tmpfs(tmp_path / "ram", "64m") as mount:
            yield mount
    except MountUnavailable:
        yield tmp_path


def test_every_damage_recovers_the_durable_prefix_or_refuses_and_repairs(
    real_journal: Path, scratch: Path
) -> None:
    raw = (real_journal / "journal" / SEGMENT).read_bytes()
    events = events_of(lines_of(raw))
    cases = list(all_cases(raw))
    outcomes = [run_case(real_journal, scratch, case, events) for case in cases]
    problems = [p for o in outcomes for p in o.problems]
    assert problems == [], "\n".join(problems[:40])
    counts = summarise(outcomes)
    assert counts["torn"] > len(raw) // 2, counts  # most truncations cut a torn tail
    assert counts["clean"] >= len(lines_of(raw)), counts  # cuts on line boundaries
    assert counts["repaired"] > 100, counts


def _serve(data: Path) -> subprocess.CompletedProcess[str]:
    """`agentjobs serve` on a journal it must refuse: it exits by itself."""
    return subprocess.run(
        [sys.executable, "-m", "agentjobs", "serve", "--port", "0", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _log(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentjobs", "log", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _copy(real: Path, to: Path, mutate: bytes) -> Path:
    data = to / "data"
    (data / "journal").mkdir(parents=True)
    (data / "journal" / SEGMENT).write_bytes(mutate)
    return data


def _run_ids(lines: list[bytes]) -> list[str]:
    return list(dict.fromkeys(e.run for e in events_of(lines)))


def test_the_server_cuts_a_torn_tail_and_says_so(real_journal: Path, tmp_path: Path) -> None:
    raw = (real_journal / "journal" / SEGMENT).read_bytes()
    lines = lines_of(raw)
    torn = b"".join(lines[:-1]) + lines[-1][:40]  # a crash in the middle of the last write
    data = _copy(real_journal, tmp_path, torn)
    assert _log("verify", str(data)).returncode == 3  # "only a torn tail"
    proc = start_server(data)
    try:
        assert "cut a torn tail of 40 bytes at line 16" in proc.output
        with httpx.Client(base_url=proc.url, timeout=10) as c:
            for run in _run_ids(lines[:-1]):
                assert c.get(f"/api/v1/runs/{run}").status_code == 200
            # the last durable line of the long run was its cancel request: recovery
            # keeps that promise
            long_run = events_of(lines[:-1])[-1].run
            assert c.get(f"/api/v1/runs/{long_run}").json()["status"] == "cancelled"
    finally:
        proc.kill()


@pytest.mark.parametrize("damage", ["flip", "duplicate"])
def test_the_server_refuses_damage_with_file_and_line_then_repair_lets_it_start(
    real_journal: Path, tmp_path: Path, damage: str
) -> None:
    raw = (real_journal / "journal" / SEGMENT).read_bytes()
    lines = lines_of(raw)
    if damage == "flip":
        bad = bytearray(lines[6])
        bad[30] ^= 0x04
        damaged = [*lines[:6], bytes(bad), *lines[7:]]
    else:
        damaged = [*lines[:7], lines[6], *lines[7:]]  # line 8 repeats line 7
    line = 7 if damage == "flip" else 8
    data = _copy(real_journal, tmp_path, b"".join(damaged))
    refused = _serve(data)
    assert refused.returncode == 1, refused
    assert f"{SEGMENT}:{line}:" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert _log("verify", str(data)).returncode == 1
    repaired = _log("repair", str(data))
    assert repaired.returncode == 0, repaired
    assert f"line {line}" in repaired.stdout
    proc = start_server(data)
    try:
        with httpx.Client(base_url=proc.url, timeout=10) as c:
            kept = _run_ids(damaged[: line - 1])
            for run in kept:
                assert c.get(f"/api/v1/runs/{run}").status_code == 200
            listed = c.get("/api/v1/runs", params={"limit": 100}).json()["total"]
            assert listed == len(kept)
    finally:
        proc.kill()


def test_repair_of_a_damaged_header_keeps_the_intact_events(
    real_journal: Path, tmp_path: Path
) -> None:
    """Issue 7: repair "moves the damage aside and keeps every good event". The header
    of segment N holds no event; it can be rebuilt (segment number from the file name,
    `seq` from the previous segment's last event, or 0 for segment 1) and the damaged
    header kept in the side directory."""
    raw = (real_journal / "journal" / SEGMENT).read_bytes()
    lines = lines_of(raw)
    header = bytearray(lines[0])
    header[20] ^= 0x01
    data = _copy(real_journal, tmp_path, bytes(header) + b"".join(lines[1:]))
    assert _serve(data).returncode == 1
    assert _log("repair", str(data)).returncode == 0
    proc = start_server(data)
    try:
        with httpx.Client(base_url=proc.url, timeout=10) as c:
            total = c.get("/api/v1/runs", params={"limit": 100}).json()["total"]
    finally:
        proc.kill()
    assert total == len(_run_ids(lines))
