"""Engine benchmark: no-op runs through the whole lifecycle, and the cost of a queued run.

    .venv/bin/python benchmarks/engine.py                    # both parts, defaults below
    .venv/bin/python benchmarks/engine.py throughput --runs 50000 --submitters 512
    .venv/bin/python benchmarks/engine.py memory --runs 100000 [--tracemalloc]
    .venv/bin/python benchmarks/engine.py throughput --profile /tmp/engine.prof

`throughput`: `--submitters` tasks each submit runs back to back (each submit returns once
its `submitted` event is fsynced: group commit shares one fsync among all waiting) to an
engine with `durability=fsync` and the `echo` runner (no delay): submitted -> started ->
succeeded, three journal events per run, two of them fsynced before anyone is told. Runs/s
is runs / (first submit to last terminal event); latency is from calling `submit` to the
commit of the run's terminal event, per run.

`memory`: `--runs` runs are submitted while one run occupies the only slot, so they all sit
in the queue; the figure is (RSS after - RSS before) / runs, minus the size of one prompt
string (the prompt is the caller's data, not the engine's overhead). `--tracemalloc` counts
Python allocations instead of RSS (slower, but exact and free of allocator slack).

The data directory is a fresh temporary directory (on the same disk as /tmp), removed after.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from typing import Any

import trio

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from agentjobs import Event, EventType, RunContext, open_engine

TERMINAL_TYPES = {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED}


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


async def throughput(
    runs: int, submitters: int, concurrency: int, gc_tuning: bool = True, closed: bool = False
) -> dict[str, Any]:
    submitted_at: dict[str, float] = {}
    finished_at: dict[str, float] = {}

    def on_commit(events: Sequence[Event]) -> None:
        now = time.perf_counter()
        for ev in events:
            if ev.type in TERMINAL_TYPES:
                finished_at[ev.run] = now

    with tempfile.TemporaryDirectory(prefix="agentjobs-bench-") as tmp:
        async with open_engine(
            tmp, durability="fsync", max_concurrency=concurrency, gc_tuning=gc_tuning
        ) as engine:
            engine.add_commit_hook(on_commit)
            all_done = trio.Event()
            per = [
                runs // submitters + (1 if i < runs % submitters else 0) for i in range(submitters)
            ]

            async def submitter(n: int) -> None:
                for _ in range(n):
                    t = time.perf_counter()
                    run = await engine.submit("ping")
                    submitted_at[run.id] = t
                    if closed:
                        await engine.wait(run.id)

            async def watch() -> None:
                while len(finished_at) < runs:  # noqa: ASYNC110 - polling keeps the hook cheap
                    await trio.sleep(0.01)
                all_done.set()

            gc.collect()
            fsyncs0 = engine.journal.stats_fsyncs
            batches0 = engine.journal.stats_batches
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for n in per:
                    nursery.start_soon(submitter, n)
            await all_done.wait()
            elapsed = max(finished_at.values()) - t0
            cpu = time.process_time() - cpu0
            fsyncs = engine.journal.stats_fsyncs - fsyncs0
            batches = engine.journal.stats_batches - batches0
            peak = engine.supervisor.peak_running
            ok = engine.state.count(engine.state.runs[next(iter(submitted_at))].status)
    latencies = sorted(finished_at[r] - submitted_at[r] for r in submitted_at)
    return {
        "runs": runs,
        "mode": "closed" if closed else "open",
        "submitters": submitters,
        "max_concurrency": concurrency,
        "peak_running": peak,
        "succeeded": ok,
        "seconds": round(elapsed, 3),
        "runs_per_s": round(runs / elapsed),
        "cpu_us_per_run": round(1e6 * cpu / runs, 1),
        "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "latency_p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2),
        "latency_mean_ms": round(1000 * statistics.fmean(latencies), 2),
        "fsyncs": fsyncs,
        "batches": batches,
        "events_per_batch": round(3 * runs / max(1, batches), 1),
    }


class Blocker:
    """Holds the only slot so that everything else stays queued."""

    def __init__(self) -> None:
        self.release = trio.Event()

    async def run(self, ctx: RunContext) -> Any:
        await self.release.wait()
        return None


async def memory(runs: int, use_tracemalloc: bool, prompt_len: int) -> dict[str, Any]:
    blocker = Blocker()
    with tempfile.TemporaryDirectory(prefix="agentjobs-bench-") as tmp:
        async with open_engine(
            tmp,
            runners={"block": blocker},
            durability="fsync",
            max_concurrency=1,
            max_queue=runs + 10,
            grace_period_s=0.1,
        ) as engine:
            first = await engine.submit("hold")
            while engine.supervisor.running_count == 0:  # noqa: ASYNC110
                await trio.sleep(0.01)
            prompts = [f"{i:0{prompt_len}d}" for i in range(runs)]  # made before measuring
            prompt_size = sys.getsizeof(prompts[0])
            gc.collect()
            if use_tracemalloc:
                tracemalloc.start()
                base = tracemalloc.get_traced_memory()[0]
            before = rss_bytes()
            t0 = time.perf_counter()

            async def submitter(chunk: list[str]) -> None:
                for p in chunk:
                    await engine.submit(p)

            step = max(1, runs // 256)
            async with trio.open_nursery() as nursery:
                for i in range(0, runs, step):
                    nursery.start_soon(submitter, prompts[i : i + step])
            # (`prompts` stays alive: it is in the baseline; the engine holds its own copies,
            # decoded from the journal lines, and those are what the prompt term subtracts)
            gc.collect()
            seconds = time.perf_counter() - t0
            after = rss_bytes()
            traced = None
            if use_tracemalloc:
                traced = tracemalloc.get_traced_memory()[0] - base
                tracemalloc.stop()
            queued = engine.supervisor.queued_count
            await engine.cancel(first.id)
    per_run = (after - before) / runs
    out: dict[str, Any] = {
        "queued_runs": queued,
        "prompt_chars": prompt_len,
        "prompt_object_bytes": prompt_size,
        "submit_seconds": round(seconds, 2),
        "rss_delta_mib": round((after - before) / 2**20, 1),
        "rss_per_run_bytes": round(per_run),
        "rss_per_run_beyond_prompt_bytes": round(per_run - prompt_size),
    }
    if traced is not None:
        out["traced_per_run_bytes"] = round(traced / runs)
        out["traced_per_run_beyond_prompt_bytes"] = round(traced / runs - prompt_size)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=["throughput", "memory", "all"], default="all")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--submitters", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=512)
    parser.add_argument("--prompt-len", type=int, default=100)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--repeat", type=int, default=1, help="throughput: best of N")
    parser.add_argument("--profile", help="write a cProfile of the throughput part here")
    parser.add_argument(
        "--no-gc-tuning", action="store_true", help="leave the cyclic GC at its defaults"
    )
    parser.add_argument(
        "--closed",
        action="store_true",
        help="each submitter waits for its run to finish before the next (no queue builds up)",
    )
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, trio {trio.__version__}")
    if args.part in ("throughput", "all"):
        runs = args.runs or 50_000
        best: dict[str, Any] | None = None
        for _ in range(args.repeat):
            if args.profile:
                prof = cProfile.Profile()
                result = prof.runcall(
                    trio.run,
                    throughput,
                    runs,
                    args.submitters,
                    args.concurrency,
                    not args.no_gc_tuning,
                    args.closed,
                )
                prof.dump_stats(args.profile)
            else:
                result = trio.run(
                    throughput,
                    runs,
                    args.submitters,
                    args.concurrency,
                    not args.no_gc_tuning,
                    args.closed,
                )
            print("throughput:", result, flush=True)
            if best is None or result["runs_per_s"] > best["runs_per_s"]:
                best = result
        if args.repeat > 1:
            print("best:", best)
    if args.part in ("memory", "all"):
        runs = args.runs or 100_000
        print("memory:", trio.run(memory, runs, args.tracemalloc, args.prompt_len), flush=True)


if __name__ == "__main__":
    main()
