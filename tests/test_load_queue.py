"""Queued runs drain with no loss under a concurrency limit of 10 (issue 7, item 5).

Every slot is held by a long run while the submits are acknowledged (fsync durability,
group commit), then the slots are released: every acknowledged run must succeed with its
own result, none may be missing from the listing, and never more than 10 may run at
once. The scenario is tests/faults/load.py's `queue_drain`. CI queues 5,000
(`AGENTJOBS_QUEUE_RUNS` changes it); `benchmarks/faults.py` and AGENTJOBS_SLOW=1 queue
10,000.
"""

from __future__ import annotations

import os
from pathlib import Path

from faults.load import queue_drain

RUNS = int(
    os.environ.get(
        "AGENTJOBS_QUEUE_RUNS", "10000" if os.environ.get("AGENTJOBS_SLOW") == "1" else "5000"
    )
)


async def test_queued_runs_drain_with_no_loss(tmp_path: Path) -> None:
    report = await queue_drain(tmp_path, runs=RUNS, concurrency=10)
    assert report.problems == [], "\n".join(report.problems)
    assert report.acknowledged == report.succeeded == RUNS, report
    assert report.lost == 0 and 1 <= report.max_running <= 10, report
