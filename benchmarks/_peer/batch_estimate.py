"""Estimate what `POST /api/v1/runs/batch` (designed in docs/benchmarks.md, not built)
could accept, from the per-item costs of today's code, measured in-process.

    .venv/bin/python benchmarks/_peer/batch_estimate.py [--batch 1000] [--batches 20]
        [--http-us 800]

Per item of a batch: validation (`schemas.parse_submit` of one body), `engine.make_spec`,
the engine's share of a submit when 1000 are committed together (`submit_spec` from 1000
tasks at once under `durability=fsync`: one group commit), and the answer
(`views.submit_view` + orjson). Per batch: decoding the array once, one HTTP request
(`--http-us`: the server CPU of one request through hypercorn + quart, from the compare
run's quart-floor row), encoding the array answer.

Two figures: **burst** (acceptance CPU only: runs queue up faster than they execute) and
**sustained** (acceptance plus executing each run: submitted -> started -> succeeded,
measured by submitting `--batches` batches back to back into an engine that runs them with
the echo runner and `--max-concurrency 10`, until all have finished).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from agentjobs.engine import open_engine
from agentjobs.http.schemas import parse_submit
from agentjobs.http.views import Urls, submit_view

BODY = {"prompt": "Summarise the quarterly report in five bullet points for the board."}


def per_item_us(fn: Any, items: list[Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - t0)
    return 1e6 * best / len(items)


async def engine_costs(batch: int, batches: int, workdir: Path) -> dict[str, float]:
    out: dict[str, float] = {}
    async with open_engine(
        workdir / "burst",
        durability="fsync",
        max_concurrency=10,
        max_queue=10 * batch * batches,
    ) as engine:
        bodies = [orjson.dumps(dict(BODY, session_id=f"s{i % 7}")) for i in range(batch)]
        parsed = [parse_submit(b, None) for b in bodies]
        urls = Urls("")
        out["parse_us"] = per_item_us(lambda b: parse_submit(b, None), bodies)
        array = orjson.dumps({"runs": [orjson.loads(b) for b in bodies]})
        t0 = time.perf_counter()
        for _ in range(5):
            orjson.loads(array)
        out["decode_array_us_per_item"] = 1e6 * (time.perf_counter() - t0) / 5 / batch

        def spec_of(p: Any) -> Any:
            b = p.body
            return engine.make_spec(
                b.prompt, config=b.config, session_id=b.session_id, priority=b.priority or 0
            )

        out["make_spec_us"] = per_item_us(spec_of, parsed)
        specs = [spec_of(p) for p in parsed]

        # acceptance only: 1000 concurrent submit_spec calls share one group commit
        runs: list[Any] = []
        cpu_best = float("inf")
        wall_best = float("inf")
        for _ in range(3):
            runs = []
            gc.collect()
            c0, w0 = time.process_time(), time.perf_counter()

            async def one(spec: Any, into: list[Any]) -> None:
                run, _ = await engine.submit_spec(spec)
                into.append(run)

            async with trio.open_nursery() as nursery:
                for spec in specs:
                    nursery.start_soon(one, spec, runs)
            cpu_best = min(cpu_best, time.process_time() - c0)
            wall_best = min(wall_best, time.perf_counter() - w0)
        out["engine_submit_cpu_us"] = 1e6 * cpu_best / batch
        out["engine_submit_wall_ms_per_batch"] = 1e3 * wall_best
        out["fsyncs_per_batch"] = 1.0  # by construction: one group commit (checked below)

        # the proposed Engine.submit_many: one journal.append per item (no task per item),
        # one wait for the shared group commit, then a snapshot per run
        from agentjobs.engine._engine import _snapshot
        from agentjobs.engine.model import EventType, new_run_id
        from agentjobs.engine.state import spec_to_data

        many_best = float("inf")
        for _ in range(3):
            gc.collect()
            c0 = time.process_time()
            journal = engine.journal
            ids = [new_run_id() for _ in specs]
            tickets = [
                journal.append(rid, EventType.SUBMITTED, spec_to_data(spec), sync=True)
                for rid, spec in zip(ids, specs, strict=True)
            ]
            await tickets[-1].wait()
            _ = [_snapshot(engine.state.runs[rid]) for rid in ids]
            many_best = min(many_best, time.process_time() - c0)
        out["submit_many_cpu_us"] = 1e6 * many_best / batch

        def view(run: Any) -> Any:
            return submit_view(run, urls)

        out["view_us"] = per_item_us(view, runs)
        views = [view(r) for r in runs]
        t0 = time.perf_counter()
        for _ in range(5):
            orjson.dumps({"results": [{"status": 202, "run": v} for v in views]})
        out["encode_array_us_per_item"] = 1e6 * (time.perf_counter() - t0) / 5 / batch

    # sustained: batches back to back, each run executed (echo, no delay), until all done
    async with open_engine(
        workdir / "sustained",
        durability="fsync",
        max_concurrency=10,
        max_queue=10 * batch * batches,
    ) as engine:
        specs = [engine.make_spec(BODY["prompt"]) for _ in range(batch)]
        fsyncs0 = engine.journal.stats_fsyncs
        c0, w0 = time.process_time(), time.perf_counter()
        ids: list[str] = []
        accepted_at = 0.0
        for _ in range(batches):

            async def one(spec: Any) -> None:
                run, _ = await engine.submit_spec(spec)
                ids.append(run.id)

            async with trio.open_nursery() as nursery:
                for spec in specs:
                    nursery.start_soon(one, spec)
        accepted_at = time.perf_counter() - w0
        for rid in ids:
            await engine.wait(rid, 600)
        wall = time.perf_counter() - w0
        cpu = time.process_time() - c0
        out["sustained_runs"] = len(ids)
        out["sustained_accept_s"] = accepted_at
        out["sustained_all_done_s"] = wall
        out["sustained_cpu_us_per_run"] = 1e6 * cpu / len(ids)
        out["sustained_fsyncs"] = engine.journal.stats_fsyncs - fsyncs0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--http-us", type=float, default=800.0)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="agentjobs-batch-"))
    try:
        c = trio.run(engine_costs, a.batch, a.batches, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    per_item = (
        c["decode_array_us_per_item"]
        + c["parse_us"]
        + c["make_spec_us"]
        + c["engine_submit_cpu_us"]
        + c["view_us"]
        + c["encode_array_us_per_item"]
    )
    per_batch_us = a.http_us + a.batch * per_item
    burst = a.batch / per_batch_us * 1e6
    per_item_many = per_item - c["engine_submit_cpu_us"] + c["submit_many_cpu_us"]
    burst_many = a.batch / (a.http_us + a.batch * per_item_many) * 1e6
    sustained_cpu = (
        per_item + a.http_us / a.batch + c["sustained_cpu_us_per_run"] - (c["engine_submit_cpu_us"])
    )
    print(f"# batch estimate: {a.batch} runs per request (python {sys.version.split()[0]})")
    print()
    print("| per item | µs |")
    print("| --- | ---: |")
    for key, label in (
        ("decode_array_us_per_item", "decode the JSON array (share)"),
        ("parse_us", "validate one body (parse_submit)"),
        ("make_spec_us", "engine.make_spec"),
        ("engine_submit_cpu_us", "engine.submit_spec, 1000 per group commit (CPU)"),
        ("view_us", "submit_view"),
        ("encode_array_us_per_item", "encode the answer array (share)"),
    ):
        print(f"| {label} | {c[key]:.1f} |")
    print(f"| **acceptance, per item** | **{per_item:.1f}** |")
    print(
        f"| engine: proposed submit_many (journal.append per item, one wait) instead of "
        f"submit_spec | {c['submit_many_cpu_us']:.1f} |"
    )
    print(f"| **acceptance, per item, with submit_many** | **{per_item_many:.1f}** |")
    print(f"| one HTTP request, spread over {a.batch} items | {a.http_us / a.batch:.2f} |")
    print()
    print(
        f"one batch of {a.batch}: wall {c['engine_submit_wall_ms_per_batch']:.1f} ms in the "
        f"engine (one fsync), {per_batch_us / 1e3:.1f} ms CPU in all"
    )
    print(f"burst estimate (acceptance CPU only, one core): {burst:,.0f} accepted runs/s")
    print(f"burst estimate with submit_many: {burst_many:,.0f} accepted runs/s")
    print(
        f"sustained, measured in-process: {c['sustained_runs']:,} runs accepted in "
        f"{c['sustained_accept_s']:.2f} s ({c['sustained_runs'] / c['sustained_accept_s']:,.0f}"
        f"/s), all finished after {c['sustained_all_done_s']:.2f} s "
        f"({c['sustained_runs'] / c['sustained_all_done_s']:,.0f} runs/s), "
        f"{c['sustained_cpu_us_per_run']:.0f} µs CPU per run, {c['sustained_fsyncs']} fsyncs"
    )
    print(
        f"sustained estimate with HTTP and validation added: {1e6 / sustained_cpu:,.0f} runs/s "
        f"({sustained_cpu:.0f} µs CPU per run)"
    )


if __name__ == "__main__":
    main()
