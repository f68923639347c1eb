"""Storage faults at the server level (issue 7, item 2): a full disk and failing syncs.

- On a real, tiny tmpfs (a subprocess server, no seam): submits are refused with 503
  `storage-unavailable` problem+json and `Retry-After` once the disk is full, nothing
  acknowledged is lost, and the server takes submits again by itself when space returns;
  it also restarts on a full disk. Skipped where mounting is not permitted.
- With faults injected at the journal's IOHooks seam (an in-process server, so the seam
  is reachable without changing the code under test): a write failing with ENOSPC or an
  fsync failing with EIO is never answered as success, for a submit or a cancel, and the
  refused change does not exist after a restart either. The journal-level behaviour
  (cut-back, re-write after a failed fsync) is tested in tests/test_engine_faults.py.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from faults.storage import MountUnavailable, full_disk_cycles, tiny_tmpfs
from live_server import assert_problem, open_live_server, submit, wait_status

from agentjobs.engine import journal as journal_mod

RUNS = "/api/v1/runs"


def test_full_tmpfs_refuses_cleanly_loses_nothing_and_recovers(tmp_path: Path) -> None:
    try:
        with tiny_tmpfs(tmp_path / "disk", "256k") as mount:
            report = full_disk_cycles(mount, cycles=2)
    except MountUnavailable as exc:
        pytest.skip(f"no tmpfs here ({exc}); the injected-fault tests cover the server")
    assert report.problems == [], "\n".join(report.problems)
    assert report.cycles == 2 and report.recoveries == 3, report
    assert report.refused >= 2 and report.acknowledged > 0 and report.lost == 0, report


class Faults:
    """Switchable failures for the journal's write and fsync (every journal the process
    opens while the fixture is active gets them; the server does not pass hooks itself)."""

    def __init__(self) -> None:
        self.write_error: int | None = None
        self.fsync_error: int | None = None
        self.failed = 0

    def write(self, fd: int, data: bytes) -> int:
        if self.write_error is not None:
            self.failed += 1
            raise OSError(self.write_error, os.strerror(self.write_error))
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.fsync_error is not None:
            self.failed += 1
            raise OSError(self.fsync_error, os.strerror(self.fsync_error))
        os.fsync(fd)


@pytest.fixture
def faults(monkeypatch: pytest.MonkeyPatch) -> Faults:
    f = Faults()
    real = journal_mod.IOHooks

    def hooks() -> journal_mod.IOHooks:
        return real(write=f.write, fsync=f.fsync)

    monkeypatch.setattr(journal_mod, "IOHooks", hooks)
    return f


def _fail_write(f: Faults) -> None:
    f.write_error = errno.ENOSPC


def _fail_fsync(f: Faults) -> None:
    f.fsync_error = errno.EIO


@pytest.mark.parametrize("fail", [_fail_write, _fail_fsync], ids=["write-ENOSPC", "fsync-EIO"])
async def test_a_change_that_did_not_reach_the_disk_is_never_acknowledged(
    tmp_path: Path, faults: Faults, fail: Callable[[Faults], None]
) -> None:
    data = tmp_path / "data"
    opts: dict[str, Any] = {"durability": "fsync", "max_concurrency": 1}
    async with open_live_server(data, **opts) as srv:
        c = srv.client
        blocker = await submit(c, "blocker", config={"delay_s": 60})
        await wait_status(c, blocker, "running")
        queued = await submit(c, "queued")
        kept = await submit(c, "kept")
        fail(faults)
        refused = await c.post(RUNS, json={"prompt": "refused"}, headers={"Idempotency-Key": "k1"})
        body = assert_problem(refused, 503, "storage-unavailable")
        assert refused.headers["retry-after"].isdigit()
        assert "durably" in body["detail"]
        cancel = await c.post(f"{RUNS}/{queued}/cancel")
        assert_problem(cancel, 503, "storage-unavailable")
        assert (await c.get(f"{RUNS}/{queued}")).json()["status"] == "queued"
        assert (await c.get("/health")).status_code == 200  # still serving reads
        total = (await c.get(RUNS)).json()["total"]
        assert total == 3  # the refused submit made no run
        assert faults.failed > 0
        faults.write_error = faults.fsync_error = None
        with trio.fail_after(10):  # heals by itself: the same request now goes through
            while True:
                again = await c.post(
                    RUNS, json={"prompt": "refused"}, headers={"Idempotency-Key": "k1"}
                )
                if again.status_code == 202:
                    break
                await trio.sleep(0.05)
        assert again.headers.get("idempotent-replayed") is None  # a new run: none was made
        r = await c.post(f"{RUNS}/{queued}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        r = await c.post(f"{RUNS}/{blocker}/cancel")
        assert r.status_code == 200
        await wait_status(c, kept, "succeeded")
    async with open_live_server(data, **opts) as srv:
        page = (await srv.client.get(RUNS, params={"limit": 100})).json()
        finals = {}
        for job in page["jobs"]:
            r = await srv.client.get(f"{RUNS}/{job['job_id']}/result")
            finals[job["job_id"]] = (r.json()["status"], r.json()["result"])
        assert page["total"] == 4, page  # the refused submit and cancel left no trace
        assert finals[blocker][0] == finals[queued][0] == "cancelled"
        assert finals[kept] == ("succeeded", "kept")
        assert sorted(finals.values(), key=str)[-1] == ("succeeded", "refused")
