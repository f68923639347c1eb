"""Accepted runs per second through `POST /api/v1/runs/batch` (issue 9), real server.

    .venv/bin/python benchmarks/batch.py                    # 4 clients, batches of 1000, 5 s
    .venv/bin/python benchmarks/batch.py --seconds 3 --clients 2 --batch 500
    .venv/bin/python benchmarks/batch.py --execute          # the runs also execute meanwhile

Starts `agentjobs serve --durability fsync` (as benchmarks/compare.py does, through
`_peer/servers.py`) on 127.0.0.1 with a temporary data dir, then `--clients` concurrent
keep-alive httpx clients post pre-encoded batches of `--batch` runs back to back for
`--seconds`. Prints accepted runs/s, batches/s, latency per batch (p50, p99, max), the
CPU seconds of the server and of this load generator,
so one can see which side was the bottleneck (the machine has few cores: if the generator
uses a large share, the figure is a floor).

By default the runs are *held*, so that the figure is acceptance alone: the server runs
with `--max-concurrency 1` and each run asks the echo runner to wait an hour, so nothing
but one sleeping run executes while batches arrive (they pile up in the queue; the queue
limit is raised to fit). With `--execute` they are no-op echo runs with
`--max-concurrency 10`, executed while the next batches arrive, which shares the server's
core between accepting and executing (docs/benchmarks.md has both figures).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peer import servers

PROMPT = "Summarise the quarterly report in five bullet points for the board."


def batch_body(size: int, execute: bool, client: int) -> bytes:
    """One batch, encoded once and sent again and again (each post makes new runs: the
    items carry no idempotency key)."""
    item: dict[str, Any] = {"prompt": PROMPT, "session_id": f"bench-{client}"}
    if not execute:
        item["config"] = {"delay_s": 3600}
    return orjson.dumps({"runs": [item] * size})


async def client_loop(
    url: str,
    body: bytes,
    until: float,
    latencies: list[float],
    counts: dict[str, int],
) -> None:
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            r = await http.post("/api/v1/runs/batch", content=body, headers=headers)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                counts["failed_batches"] += 1
                counts["last_error"] = r.status_code
                await trio.sleep(0.05)
                continue
            answer = orjson.loads(r.content)
            counts["accepted"] += answer["accepted"]
            counts["rejected"] += answer["rejected"]
            counts["batches"] += 1


async def warm_up(url: str, a: argparse.Namespace) -> None:
    """A short burst from every client, not counted (imports, first allocations)."""
    bodies = [batch_body(a.batch, a.execute, i) for i in range(a.clients)]
    warm: dict[str, int] = dict.fromkeys(("accepted", "rejected", "batches", "failed_batches"), 0)
    async with trio.open_nursery() as nursery:
        for body in bodies:
            nursery.start_soon(client_loop, url, body, time.perf_counter() + 0.3, [], warm)


async def load(url: str, a: argparse.Namespace) -> dict[str, Any]:
    bodies = [batch_body(a.batch, a.execute, i) for i in range(a.clients)]
    counts: dict[str, int] = dict.fromkeys(("accepted", "rejected", "batches", "failed_batches"), 0)
    latencies: list[float] = []
    t0 = time.perf_counter()
    until = t0 + a.seconds
    async with trio.open_nursery() as nursery:
        for body in bodies:
            nursery.start_soon(client_loop, url, body, until, latencies, counts)
    wall = time.perf_counter() - t0
    return {"counts": counts, "latencies": latencies, "wall": wall, "body_bytes": len(bodies[0])}


def measure(
    clients: int = 4,
    batch: int = 1000,
    seconds: float = 5.0,
    durability: str = "fsync",
    execute: bool = False,
) -> dict[str, Any]:
    """Start a server, load it, stop it; every figure `main` prints (also used by
    benchmarks/compare.py's `batch` part)."""
    a = argparse.Namespace(
        clients=clients, batch=batch, seconds=seconds, durability=durability, execute=execute
    )
    work = Path(tempfile.mkdtemp(prefix="agentjobs-batchbench-"))
    argv = servers.ours_argv(durability, work / "data", 10 if execute else 1)
    expected = batch * clients * int(seconds * 100 + 10)  # generous queue room
    argv += ["--max-queue", str(max(100_000, expected)), "--grace-period", "0"]
    argv += ["--max-batch", str(max(1000, batch))]
    server = servers.Server("ours", "agentjobs", "ours", argv)
    try:
        server.start(work)
        trio.run(warm_up, server.url, a)
        cpu_server0 = server.cpu_seconds()
        cpu_client0 = time.process_time()
        stats0 = server.get_json("/stats")
        result = trio.run(load, server.url, a)
        cpu_client = time.process_time() - cpu_client0
        cpu_server = server.cpu_seconds() - cpu_server0
        stats1 = server.get_json("/stats")
    finally:
        code = server.stop()
        shutil.rmtree(work, ignore_errors=True)
    counts = result["counts"]
    lat = sorted(result["latencies"])
    wall = result["wall"]
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] if lat else float("nan")
    return {
        "clients": clients,
        "batch": batch,
        "seconds": seconds,
        "durability": durability,
        "execute": execute,
        "accepted": counts["accepted"],
        "rejected": counts["rejected"],
        "batches": counts["batches"],
        "failed_batches": counts["failed_batches"],
        "wall": wall,
        "accepted_per_s": counts["accepted"] / wall,
        "batches_per_s": counts["batches"] / wall,
        "body_bytes": result["body_bytes"],
        "p50_ms": 1e3 * statistics.median(lat) if lat else float("nan"),
        "p99_ms": 1e3 * p99,
        "max_ms": 1e3 * lat[-1] if lat else float("nan"),
        "submitted": stats1["submitted_total"] - stats0["submitted_total"],
        "exit_code": code,
        "cpu_server_s": cpu_server,
        "cpu_client_s": cpu_client,
        "server_us_per_run": 1e6 * cpu_server / counts["accepted"] if counts["accepted"] else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--batch", type=int, default=1000, help="runs per batch (default 1000)")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds (default 5)")
    p.add_argument(
        "--durability", default="fsync", choices=("fsync", "os", "memory"), help="default fsync"
    )
    p.add_argument("--execute", action="store_true", help="execute the runs meanwhile")
    a = p.parse_args()
    r = measure(a.clients, a.batch, a.seconds, a.durability, a.execute)
    wall = r["wall"]
    print(
        f"# POST /api/v1/runs/batch: {a.clients} clients x batches of {a.batch}, "
        f"{a.seconds:g} s, --durability {a.durability}, runs "
        + ("executed (echo, --max-concurrency 10)" if a.execute else "held (acceptance only)")
    )
    print()
    print(f"accepted runs/s:   {r['accepted_per_s']:,.0f}  ({r['accepted']:,} in {wall:.2f} s)")
    print(f"batches/s:         {r['batches_per_s']:,.1f}  (body {r['body_bytes']:,} bytes)")
    print(
        f"latency per batch: p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
        f"max {r['max_ms']:.1f} ms"
    )
    print(f"refused items:     {r['rejected']}, failed batches: {r['failed_batches']}")
    print(f"server: submitted_total +{r['submitted']:,}, exit code {r['exit_code']}")
    print(
        f"CPU: server {r['cpu_server_s']:.2f} s ({100 * r['cpu_server_s'] / wall:.0f}% of one "
        f"core), load generator {r['cpu_client_s']:.2f} s ({100 * r['cpu_client_s'] / wall:.0f}%)"
    )
    if r["server_us_per_run"]:
        print(
            f"server CPU per accepted run: {r['server_us_per_run']:.1f} µs, i.e. "
            f"{1e6 / r['server_us_per_run']:,.0f} runs/s for a core of its own (the figure that "
            "moves least on a shared machine; the server is one process on one core)"
        )


if __name__ == "__main__":
    main()
