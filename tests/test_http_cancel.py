"""Cancel over HTTP stops work for real: a running command's processes are gone after 200."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio
from live_server import open_live_server, read_stream, submit, wait_status

from agentjobs.engine.runners import EchoRunner
from agentjobs.engine.runners.command import CommandRunner

# Prints its pid and a child's pid (the child is in the same process group), then waits.
SCRIPT = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    "print('pids', os.getpid(), child.pid, flush=True)\n"
    "time.sleep(60)\n"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it has stopped running, which is what matters
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_cancel_running_command_kills_its_processes(tmp_path: Path) -> None:
    runners = {
        "echo": EchoRunner(),
        "cmd": CommandRunner([sys.executable, "-c", SCRIPT], kill_grace_s=2.0),
    }
    async with open_live_server(tmp_path, runners=runners) as srv:
        c = srv.client
        job = await submit(c, "ignored", runner="cmd")
        await wait_status(c, job, "running")
        pids: list[int] = []
        with trio.fail_after(15):
            while not pids:
                page = (await c.get(f"/api/v1/runs/{job}/events")).json()
                for item in page["events"]:
                    if item["event"] == "output" and "pids" in item["data"]["text"]:
                        pids = [int(p) for p in item["data"]["text"].split()[1:3]]
                await trio.sleep(0.05)
        assert all(_alive(p) for p in pids)

        r = await c.post(f"/api/v1/runs/{job}/cancel")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "cancelled"
        # the answer came after the work stopped: nothing of the run is left
        assert not any(_alive(p) for p in pids), pids
        status, frames, _ = await read_stream(c, job)
        assert status == 200
        assert [f.event for f in frames[-2:]] == ["status", "cancelled"]
        result = (await c.get(f"/api/v1/runs/{job}/result")).json()
        assert result["status"] == "cancelled"
        assert result["metrics"] is None or "exit_code" in result["metrics"]


async def test_cancel_queued_run_never_starts_it(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        blocker = await submit(c, "block", config={"delay_s": 30})
        await wait_status(c, blocker, "running")
        queued = await submit(c, "never")
        r = await c.post(f"/api/v1/runs/{queued}/cancel")
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled"
        await c.post(f"/api/v1/runs/{blocker}/cancel")
        await trio.sleep(0.2)
        status = (await c.get(f"/api/v1/runs/{queued}")).json()
        assert status["status"] == "cancelled"
        assert status["started_at"] is None
        assert status["attempt"] == 0
