"""Where the memory of finished runs goes: N runs through an in-process engine (fsync,
echo runner, the soak's prompt), all finished, then tracemalloc's top allocation sites.

    .venv/bin/python benchmarks/_peer/memory_breakdown.py [--runs 100000] [--top 20]
        [--no-trace] [--wave N]

The soak in compare.py measures the server's RSS; this says which objects hold it (the
HTTP layer keeps nothing per finished run, so the engine's state and journal index are
the whole story). `--no-trace` skips tracemalloc, whose own bookkeeping otherwise makes
the RSS figure meaningless (and the run ~4x slower): use it for the RSS per run. By
default 64 submitters queue all runs at once (the queue peaks at ~N runs, as in a
burst); `--wave N` submits N runs at a time and waits for them, so the queue stays short
as in the HTTP soak (where submits arrive slower than the engine runs them).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from agentjobs.engine import open_engine

PROMPT = "Summarise the quarterly report in five bullet points for the board."


def rss() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


async def fill(runs: int, top: int, workdir: Path, trace: bool, wave: int | None) -> None:
    async with open_engine(
        workdir, durability="fsync", max_concurrency=10, max_queue=runs + 10
    ) as engine:
        gc.collect()
        rss0 = rss()
        if trace:
            tracemalloc.start(4)
            base = tracemalloc.take_snapshot()
        t0 = time.perf_counter()
        ids: list[str] = []

        async def submitter(n: int) -> None:
            for _ in range(n):
                run = await engine.submit(PROMPT)
                ids.append(run.id)

        per_wave = wave or runs
        left = runs
        while left > 0:
            this = min(per_wave, left)
            left -= this
            start = len(ids)
            k = min(64, this)
            async with trio.open_nursery() as nursery:
                for i in range(k):
                    nursery.start_soon(submitter, this // k + (i < this % k))
            for rid in ids[start:]:
                await engine.wait(rid, 600)
        gc.collect()
        n = len(ids)
        if not trace:
            grew = rss() - rss0
            print(
                f"# {n:,} runs finished in {time.perf_counter() - t0:.0f} s (waves of"
                f" {per_wave:,}); RSS +{grew / 2**20:.1f} MiB ({grew / n:,.0f} B/run)"
            )
            return
        snap = tracemalloc.take_snapshot()
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        gc.collect()
        rss1 = rss()
        grew = rss1 - rss0
        print(
            f"# {n:,} runs finished in {time.perf_counter() - t0:.0f} s (waves of"
            f" {per_wave:,}); RSS +{grew / 2**20:.0f} MiB ({grew / n:,.0f} B/run, tracemalloc"
            f" overhead included); traced {traced / 2**20:.0f} MiB ({traced / n:,.0f} B/run)"
        )
        print()
        print("| allocation site (grouped by line) | MiB | bytes/run |")
        print("| --- | ---: | ---: |")
        stats: list[Any] = snap.compare_to(base, "lineno")
        for st in stats[:top]:
            frame = st.traceback[0]
            name = frame.filename
            for marker in ("site-packages/", "agentjobs/", "lib/python3.11/"):
                if marker in name:
                    name = (marker if marker == "agentjobs/" else "") + name.split(marker, 1)[1]
                    break
            size = st.size_diff
            print(f"| `{name}:{frame.lineno}` | {size / 2**20:.1f} | {size / n:,.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--no-trace", action="store_true", help="RSS only, without tracemalloc")
    p.add_argument("--wave", type=int, default=None, help="submit N runs at a time")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agentjobs-mem-"))
    try:
        trio.run(fill, a.runs, a.top, work, not a.no_trace, a.wave)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
