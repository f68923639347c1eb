"""Full-disk faults with a real filesystem: the data dir on a tiny tmpfs.

Why a real tmpfs rather than an injected error: the server then meets ENOSPC where the
kernel really raises it (segment writes, the header of a new segment, side files), in a
subprocess that runs exactly what operators run, with no seam in the code under test.
Mounting needs root (or CAP_SYS_ADMIN); where it is refused the tests skip and the
injected-fault tests (tests/test_faults_storage.py) still run.

`full_disk_cycles` is the scenario, shared by the test and benchmarks/faults.py: fill the
disk with a filler file, submit until submits are refused, check the refusal, delete the
filler, and wait for the server to take submits again by itself.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx

from .server import ServerProcess, start_server

__all__ = [
    "MountUnavailable",
    "StorageReport",
    "fill",
    "free_bytes",
    "full_disk_cycles",
    "tiny_tmpfs",
]

PROBLEM_BASE = "https://agentjobs.dev/problems/"


class MountUnavailable(Exception):
    """This process may not mount a tmpfs here (not root, or a restricted container)."""


@contextlib.contextmanager
def tiny_tmpfs(directory: Path, size: str = "256k") -> Iterator[Path]:
    """Mount a tmpfs of `size` on `directory` for the block; always unmounted after."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise MountUnavailable(f"cannot run mount: {exc}") from None
    if done.returncode != 0:
        raise MountUnavailable(f"mount -t tmpfs refused: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True, timeout=20)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """Write a filler file that leaves about `leave` bytes free on `path`'s filesystem."""
    filler = path / "filler"
    size = max(0, free_bytes(path) - leave)
    with open(filler, "wb") as f, contextlib.suppress(OSError):  # ENOSPC at the end is fine
        f.write(b"\0" * size)
    return filler


@attrs.define(slots=True)
class StorageReport:
    cycles: int = 0
    recoveries: int = 0
    acknowledged: int = 0
    refused: int = 0
    lost: int = 0
    recover_s_max: float = 0.0
    problems: list[str] = attrs.Factory(list)


def _check_refusal(r: httpx.Response, report: StorageReport) -> None:
    """A refused submit must be 503 storage-unavailable problem+json with Retry-After."""
    body: dict[str, Any] = {}
    with contextlib.suppress(ValueError):
        body = r.json()
    ok = (
        r.status_code == 503
        and r.headers.get("content-type") == "application/problem+json"
        and body.get("type") == PROBLEM_BASE + "storage-unavailable"
        and isinstance(body.get("detail"), str)
        and r.headers.get("retry-after", "").isdigit()
    )
    if not ok:
        report.problems.append(f"a refused submit answered {r.status_code} {r.headers} {r.text}")


def full_disk_cycles(
    mount: Path, *, cycles: int = 1, prompt_chars: int = 2000, timeout_s: float = 30.0
) -> StorageReport:
    """Run the full-disk scenario `cycles` times on a server whose data dir is on `mount`.

    Ends with a kill -9 and a restart on the (no longer full) disk, after which every
    acknowledged run must be there and finished.
    """
    report = StorageReport()
    data = mount / "data"
    acked: dict[str, str] = {}  # run id -> prompt
    proc: ServerProcess = start_server(data)
    try:
        with httpx.Client(base_url=proc.url, timeout=20) as client:
            for cycle in range(cycles):
                report.cycles += 1
                filler = fill(mount, leave=24 * 1024)
                refused_at = None
                for n in range(2000):  # bounded: 24 KiB free holds far fewer submits
                    prompt = f"c{cycle} n{n} " + "x" * prompt_chars
                    r = client.post("/api/v1/runs", json={"prompt": prompt})
                    if r.status_code == 202:
                        acked[r.json()["job_id"]] = prompt
                        report.acknowledged += 1
                        continue
                    _check_refusal(r, report)
                    report.refused += 1
                    refused_at = n
                    break
                if refused_at is None:
                    report.problems.append("the disk never filled up")
                    return report
                # still serving while full: reads work, the refusal repeats
                if client.get("/health").status_code != 200:
                    report.problems.append("/health failed while the disk was full")
                r = client.post("/api/v1/runs", json={"prompt": "while full " + "y" * 8000})
                if r.status_code == 202:
                    acked[r.json()["job_id"]] = "while full " + "y" * 8000
                else:
                    _check_refusal(r, report)
                filler.unlink()
                t0 = time.monotonic()
                while True:  # recovers by itself, without a restart
                    prompt = f"c{cycle} after"
                    r = client.post("/api/v1/runs", json={"prompt": prompt})
                    if r.status_code == 202:
                        acked[r.json()["job_id"]] = prompt
                        report.recoveries += 1
                        break
                    if time.monotonic() - t0 > timeout_s:
                        report.problems.append(f"no recovery {timeout_s}s after space returned")
                        return report
                    time.sleep(0.05)
                report.recover_s_max = max(report.recover_s_max, time.monotonic() - t0)
                _wait_finished(client, acked, report, timeout_s)
        # kill -9 on a full disk, and start again on it: the server must come up,
        # serve what it has, refuse submits cleanly and recover once space returns
        filler = fill(mount, leave=0)
        proc.kill()
        proc = start_server(data)
        with httpx.Client(base_url=proc.url, timeout=20) as client:
            for run, prompt in acked.items():
                r = client.get(f"/api/v1/runs/{run}/result")
                if r.status_code != 200 or r.json()["result"] != prompt:
                    report.lost += 1
                    report.problems.append(f"acknowledged {run} after restart: {r.text[:200]}")
            r = client.post("/api/v1/runs", json={"prompt": "on a full disk " + "z" * 4000})
            if r.status_code != 202:
                _check_refusal(r, report)
            filler.unlink()
            t0 = time.monotonic()
            while client.post("/api/v1/runs", json={"prompt": "space again"}).status_code != 202:
                if time.monotonic() - t0 > timeout_s:
                    report.problems.append("no recovery after a restart on a full disk")
                    break
                time.sleep(0.05)
            else:
                report.recoveries += 1
    finally:
        proc.kill()
    verify = subprocess.run(
        [_python(), "-m", "agentjobs", "log", "verify", str(data)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if verify.returncode != 0:
        report.problems.append(f"log verify after the full-disk cycles: {verify.stdout}")
    return report


def _wait_finished(
    client: httpx.Client, acked: dict[str, str], report: StorageReport, timeout_s: float
) -> None:
    """Every acknowledged run finishes with its result once there is space again."""
    deadline = time.monotonic() + timeout_s
    for run, prompt in acked.items():
        while True:
            r = client.get(f"/api/v1/runs/{run}/result")
            if r.status_code == 200:
                if r.json()["result"] != prompt:
                    report.problems.append(f"{run} finished with {r.text[:200]}")
                break
            if time.monotonic() > deadline:
                report.problems.append(f"{run} did not finish after space returned: {r.text}")
                return
            time.sleep(0.05)


def _python() -> str:
    import sys

    return sys.executable
