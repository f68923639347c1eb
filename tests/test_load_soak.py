"""Submit/finish/delete cycles with the journal compacted live (issue 7, item 5).

`agentjobs serve` compacts every `--compact-interval` seconds (an hour by default, too
seldom for a soak), so the soak runs the real server with `--compact-interval 5` and
`--retention 2`. CI runs 8 s (does compaction under load keep every promise?);
AGENTJOBS_SLOW=1 or `benchmarks/faults.py --long` runs 10 minutes and requires the RSS
of the second half to stay within 10 % of the first half's peak.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
from faults.load import soak

from agentjobs import NotFound, open_engine
from agentjobs.engine import EngineConfig


async def test_short_soak_with_live_compaction(tmp_path: Path) -> None:
    report = await soak(tmp_path, seconds=8.0, check_flat=False)
    assert report.problems == [], "\n".join(report.problems)
    assert report.cycles > 200 and report.compactions >= 1, report


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("AGENTJOBS_SLOW") != "1", reason="a 10-minute soak; AGENTJOBS_SLOW=1"
)
async def test_ten_minute_soak_memory_stays_flat(tmp_path: Path) -> None:
    report = await soak(tmp_path, seconds=600.0)
    assert report.problems == [], "\n".join(report.problems)


async def test_a_running_engine_compacts_finished_runs_past_retention(tmp_path: Path) -> None:
    """design.md section 2: "finished runs older than the retention window are compacted
    away (rewrite + atomic rename), on a size/age trigger and by a CLI command": without
    it memory and disk grow with every run ever finished."""
    config = EngineConfig(durability="os", retention_s=0.2, compact_interval_s=0.3)
    async with open_engine(tmp_path / "data", config=config) as engine:
        runs = [await engine.submit(f"r{i}") for i in range(5)]
        for run in runs:
            await engine.wait(run.id)
        with trio.move_on_after(5):
            while engine.state.runs:  # noqa: ASYNC110 - compaction signals nothing
                await trio.sleep(0.1)
        for run in runs:
            with pytest.raises(NotFound):
                engine.get(run.id)
        journal = tmp_path / "data" / "journal"
        text = b"".join(p.read_bytes() for p in journal.glob("*.jsonl"))
        assert not any(run.id.encode() in text for run in runs)
