"""Many subscribers and a subscriber that never reads (issue 7, item 5).

- 1,000 SSE streams of one run, all open before it starts (so the fan-out is live, not
  a replay from the journal), each must receive exactly the run's events;
- a raw socket that asks for a stream and never reads, while the run writes ~18 MB of
  output: the server's memory stays flat (the bus drops a slow subscriber's buffer and
  lets it catch up from the journal; hypercorn's writes block on the full socket);
- (xfail) reading one event of a long run does not load the run's whole history.

The scenarios live in tests/faults/load.py (benchmarks/faults.py runs them too).
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
from faults.load import slow_subscriber, sse_fanout
from live_server import open_live_server, read_stream, wait_status

from agentjobs.engine.runners import RunContext


async def test_1000_subscribers_each_get_every_event(tmp_path: Path) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    report = await sse_fanout(tmp_path, subscribers=1000)  # raises the soft limit itself
    assert report.problems == [], "\n".join(report.problems)
    assert report.complete == 1000 and report.events >= 10, report
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= min(2512, hard)


async def test_a_client_that_never_reads_does_not_grow_server_memory(tmp_path: Path) -> None:
    report = await slow_subscriber(tmp_path, lines=60_000, line_bytes=300)
    assert report.problems == [], "\n".join(report.problems)
    assert report.output_bytes >= 18_000_000, report  # far more than socket buffers hold


class BulkRunner:
    """Writes `chunks` output events of 17 KB each (over the actor's 16 KiB coalescing
    limit, so each is an event of its own)."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    async def run(self, ctx: RunContext) -> str:
        for i in range(self.chunks):
            ctx.output(f"{i:06d}" + "x" * 17_000 + "\n")
            await trio.lowlevel.checkpoint()
        return "done"


async def test_reading_the_last_event_does_not_load_the_whole_history(tmp_path: Path) -> None:
    """A reconnect storm after a restart (1,000 clients resuming with Last-Event-ID) or a
    poller of `/events?after=...` on a run with a lot of output would each materialise the
    run's entire history: ~10 MB here per request, for one 17 KB event asked for."""
    async with open_live_server(tmp_path / "data", runners={"bulk": BulkRunner(600)}) as srv:
        run = (await srv.client.post("/api/v1/runs", json={"prompt": "x"})).json()["job_id"]
        await wait_status(srv.client, run, "succeeded", timeout=60)
        events = (await srv.client.get(f"/api/v1/runs/{run}/events?after=0&limit=1000")).json()
        assert len(events["events"]) > 600
        before_last = events["events"][-2]["id"]
        journal = srv.engine.journal
        real, real_at = journal.history, journal.history_at
        sizes: list[int] = []
        looked_back: list[int] = []

        def history(run_id: str, after_seq: int = 0, limit: int | None = None) -> list[Any]:
            out = real(run_id, after_seq, limit)
            sizes.append(len(out))
            return out

        def history_at(run_id: str, *args: Any) -> list[Any]:
            out = real_at(run_id, *args)
            looked_back.append(len(out))
            return out

        journal.history = history  # type: ignore[method-assign]
        journal.history_at = history_at  # type: ignore[method-assign]
        page = await srv.client.get(
            f"/api/v1/runs/{run}/events", params={"after": before_last, "limit": 1}
        )
        assert len(page.json()["events"]) == 1
        status, frames, _ = await read_stream(
            srv.client, run, headers={"Last-Event-ID": before_last}
        )
        assert status == 200 and len(frames) == 1
        assert sizes and max(sizes) <= 256, sizes
        # ... and not page by page from the start either: only the lines after the resume
        # point were decoded (the progress as of it needs no output line, and here no
        # progress event either: the run reported none).
        assert sum(sizes) <= 10, sizes
        assert sum(looked_back) <= 10, looked_back
