"""`kill -9` at random moments: nothing acknowledged is ever lost.

A child process (`tests/engine_child.py`) runs the engine with `durability=fsync` under
submit and cancel load and reports every acknowledgement on stdout the moment it has it.
The test SIGKILLs it at a random moment, several times, restarting it on the same data
directory each time. After each restart (recovery done) every acknowledged run must be
there with the spec it was acknowledged with, and every acknowledged cancel must hold
(`cancelled`); at the end a last child drains the queue and every run must be finished.

`AGENTJOBS_KILL9_ROUNDS` (default 4) sets the number of kills; `AGENTJOBS_KILL9_SEED`
replays a failing sequence (the seed is in the assertion message).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson

CHILD = Path(__file__).resolve().parent / "engine_child.py"
ROUNDS = int(os.environ.get("AGENTJOBS_KILL9_ROUNDS", "4"))
START_TIMEOUT = 60.0


class Child:
    """A child engine process whose complete stdout lines are collected by a thread."""

    def __init__(self, data_dir: Path, seed: int, mode: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(CHILD), str(data_dir), str(seed), mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.done = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            if not raw.endswith(b"\n"):
                break  # killed mid-line: that acknowledgement never happened
            line = raw.decode().rstrip("\n")
            self.lines.append(line)
            if line == "READY":
                self.ready.set()
            elif line == "DONE":
                self.done.set()

    def wait_for(self, event: threading.Event, timeout: float) -> None:
        if not event.wait(timeout):
            self.proc.kill()
            stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise AssertionError(f"child did not get there in {timeout}s:\n{stderr[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)

    def finish(self, timeout: float) -> None:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=30)
        stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
        assert code == 0, stderr[-3000:]

    def snapshot(self) -> dict[str, tuple[str, bool, dict[str, Any]]]:
        """The `R` lines printed at start (after recovery): run id -> (status, spec)."""
        out = {}
        for line in self.lines:
            if line == "READY":
                break
            if line.startswith("R "):
                _, rid, status, cancel_requested, spec = line.split(" ", 4)
                out[rid] = (status, cancel_requested == "1", orjson.loads(spec))
        return out

    def recovered(self) -> dict[str, int]:
        for line in self.lines:
            if line.startswith("RECOVERED "):
                counts: dict[str, int] = orjson.loads(line.split(" ", 1)[1])
                return counts
        raise AssertionError("no RECOVERED line")


def check_restart(
    child: Child, acked: dict[str, dict[str, Any]], cancels: set[str], seed: int
) -> dict[str, tuple[str, bool, dict[str, Any]]]:
    found = child.snapshot()
    for rid, spec in acked.items():
        assert rid in found, f"seed {seed}: acknowledged run {rid} was lost"
        assert found[rid][2] == spec, f"seed {seed}: {rid} came back with another spec"
    for rid in cancels:
        assert found[rid][0] == "cancelled", (
            f"seed {seed}: acknowledged cancel of {rid} did not hold: {found[rid][0]}"
        )
    return found


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    seed = int(os.environ.get("AGENTJOBS_KILL9_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    data_dir = tmp_path / "data"
    acked: dict[str, dict[str, Any]] = {}
    cancels: set[str] = set()
    recovered_total = 0
    started = time.monotonic()
    for round_ in range(ROUNDS):
        child = Child(data_dir, rng.randrange(2**32), "load")
        child.wait_for(child.ready, START_TIMEOUT)
        check_restart(child, acked, cancels, seed)
        recovered_total += sum(v for k, v in child.recovered().items() if k != "queued")
        time.sleep(rng.uniform(0.3, 1.5))
        child.kill()
        new = 0
        for line in child.lines:
            kind, _, rest = line.partition(" ")
            if kind == "S":
                rid, _, spec = rest.partition(" ")
                acked[rid] = orjson.loads(spec)
                new += 1
            elif kind == "C":
                cancels.add(rest)
        assert new > 0, f"seed {seed}: round {round_} acknowledged nothing"
    child = Child(data_dir, 0, "drain")
    child.wait_for(child.ready, START_TIMEOUT)
    check_restart(child, acked, cancels, seed)
    recovered_total += sum(v for k, v in child.recovered().items() if k != "queued")
    child.wait_for(child.done, 120)
    child.finish(30)
    final: dict[str, str] = {}
    for line in child.lines[child.lines.index("READY") :]:
        if line.startswith("R "):
            _, rid, status, _ = line.split(" ", 3)
            final[rid] = status
    assert set(acked) <= set(final)
    assert all(final[rid] in ("succeeded", "failed", "cancelled") for rid in acked)
    assert all(final[rid] == "cancelled" for rid in cancels)
    # the kills did land mid-flight (otherwise this test proves little)
    assert cancels, f"seed {seed}: no cancel was acknowledged"
    assert recovered_total > 0, f"seed {seed}: no kill found a run running"
    assert time.monotonic() - started < 120
