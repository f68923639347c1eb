"""`kill -9` of the real server under load loses nothing it acknowledged (issue 7, item 1).

The engine-level version (tests/test_kill9.py) kills an engine in a child process; this
one kills `agentjobs serve` itself while HTTP clients submit, cancel and stream, so the
whole path from socket to disk is covered. The harness is tests/faults/crash.py.

`AGENTJOBS_CRASHES` sets the number of kills (default 3 here; benchmarks/faults.py --long
does 25); `AGENTJOBS_CRASH_SEED` replays a schedule (the seed is in every problem line).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path

import httpx
import pytest
import trio
from faults.crash import CrashHarness
from faults.markers import overlaps, read_markers
from faults.server import start_server, write_runners_toml


def _seed() -> int:
    return int(os.environ.get("AGENTJOBS_CRASH_SEED", random.randrange(2**32)))


async def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    crashes = int(os.environ.get("AGENTJOBS_CRASHES", "3"))
    harness = CrashHarness(tmp_path, crashes=crashes, seed=_seed())
    report = await harness.run()
    assert report.problems == [], "\n".join(report.problems[:30])
    # the campaign did what it claims (otherwise it proves little)
    assert report.crashes == crashes
    assert report.acknowledged >= 5 * crashes, report
    assert report.cancels_acknowledged > 0, report
    assert report.stream_resumes > 0, report
    assert report.attempts > 0, report
    assert report.streams > 0 and report.finished_checked > 0, report


async def test_an_orphaned_attempt_is_stopped_before_the_run_starts_again(
    tmp_path: Path,
) -> None:
    """A run's command is still working (it does not watch its parent) when the server is
    SIGKILLed; after the restart the run is requeued and started again. The design's
    promise "a run is never executed by two actors at once" needs the old process group
    gone before the new attempt starts: the runner records each group in the data dir
    (`<data_dir>/attempts/`) and recovery stops what is left before any run starts."""
    markers = tmp_path / "markers"
    config = write_runners_toml(tmp_path / "runners.toml", markers, orphan="stay")
    data = tmp_path / "data"
    proc = await trio.to_thread.run_sync(
        lambda: start_server(data, "--max-attempts", "3", config=config)
    )
    try:
        async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
            r = await client.post(
                "/api/v1/runs",
                json={"prompt": "long", "runner": "marker", "config": {"sleep_s": 4.0}},
            )
            assert r.status_code == 202, r.text
            run = r.json()["job_id"]
            with trio.fail_after(10):
                # the marker file is written by another process: nothing to wait on but it
                while not any(p.name.startswith(run + ".1.") for p in markers.iterdir()):  # noqa: ASYNC110
                    await trio.sleep(0.02)
        await trio.to_thread.run_sync(proc.kill)
        killed_at = time.monotonic_ns()
        proc = await trio.to_thread.run_sync(
            lambda: start_server(data, "--max-attempts", "3", config=config)
        )
        async with httpx.AsyncClient(base_url=proc.url, timeout=10) as client:
            r = await client.get(f"/api/v1/runs/{run}/result", params={"wait": 20})
            assert r.json()["status"] == "succeeded", r.text
        by_run = read_markers(markers)
        assert len(by_run[run]) == 2, by_run
        first = by_run[run][0]
        assert first.start_ns < killed_at  # the attempt really was running at the kill
        assert overlaps(by_run) == [], by_run
    finally:
        await trio.to_thread.run_sync(proc.kill)
        # the orphan of this test must not outlive it
        for attempts in read_markers(markers).values():
            for a in attempts:
                if a.stop_ns is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(a.pid, 9)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("AGENTJOBS_SLOW") != "1", reason="25 kill -9s (~3 min); AGENTJOBS_SLOW=1"
)
@pytest.mark.parametrize("durability", ["fsync", "os"])
async def test_kill_9_long_campaign(tmp_path: Path, durability: str) -> None:
    """`os` durability makes the same promise for a process crash (the page cache
    survives it); only a power loss tells the two apart."""
    harness = CrashHarness(tmp_path, crashes=25, seed=_seed(), durability=durability)
    report = await harness.run()
    assert report.problems == [], "\n".join(report.problems[:30])
    assert report.crashes == 25
