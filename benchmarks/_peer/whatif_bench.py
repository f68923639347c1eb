"""Measure the proposed optimisations (benchmarks/_peer/whatif.py) against today's server,
with the same interleaved rounds and wrk script as benchmarks/compare.py.

    .venv/bin/python benchmarks/_peer/whatif_bench.py [--rounds 3] [--duration 5]

Submit throughput at 4/16/64 connections for: today's server (fsync, memory), the same
with `--fast-submit` (POST /api/v1/runs answered before quart), and the bare
hypercorn-trio ceiling; then SSE fan-out (500 subscribers on 10 runs of 2 s) with
hypercorn's default backlog (100) and with 2048.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import compare

from _peer import servers
from _peer.servers import Server

HERE = Path(__file__).resolve().parent


def whatif_argv(durability: str, data: Path, *opts: str) -> list[str]:
    base = servers.ours_argv(durability, data, 10)
    serve_args = base[base.index("serve") :]
    return [sys.executable, str(HERE / "whatif.py"), *opts, "--", *serve_args]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--concurrency", default="4,16,64")
    p.add_argument("--fanout-rounds", type=int, default=3)
    p.add_argument("--skip-submit", action="store_true")
    a = p.parse_args()
    s = compare.parse_args(
        [
            "--ours-only",
            "--no-charts",
            "--rounds",
            str(a.rounds),
            "--duration",
            str(a.duration),
            "--concurrency",
            a.concurrency,
        ]
    )
    work = Path(tempfile.mkdtemp(prefix="agentjobs-whatif-"))
    labels = {
        "ours-fsync": "today, fsync",
        "fast-fsync": "fast submit path, fsync",
        "ours-memory": "today, memory",
        "fast-memory": "fast submit path, memory",
        "ceiling": "bare hypercorn-trio (ceiling)",
        "fan-100": "today (backlog 100)",
        "fan-2048": "backlog 2048",
    }
    compare.LABELS.update(labels)
    out = []
    try:
        if not a.skip_submit:
            targets = [
                Server(
                    "ours-fsync",
                    labels["ours-fsync"],
                    "ours",
                    servers.ours_argv("fsync", work / "a", 10),
                ),
                Server(
                    "fast-fsync",
                    labels["fast-fsync"],
                    "ours",
                    whatif_argv("fsync", work / "b", "--fast-submit"),
                ),
                Server(
                    "ours-memory",
                    labels["ours-memory"],
                    "ours",
                    servers.ours_argv("memory", work / "c", 10),
                ),
                Server(
                    "fast-memory",
                    labels["fast-memory"],
                    "ours",
                    whatif_argv("memory", work / "d", "--fast-submit"),
                ),
                Server("ceiling", labels["ceiling"], "ceiling", servers.ceiling_argv("asgi")),
            ]
            for t in targets:
                t.launch(work)
            for t in targets:
                t.wait_ready()
            try:
                gen = compare.choose_generator(s)
                cells = compare.part_submit(s, gen, targets)
            finally:
                for t in targets:
                    t.stop()
            out += [
                f"## What-if: submit throughput (median of {a.rounds} rounds, "
                f"{a.duration:g} s per cell)",
                "",
                compare.report_submit(cells, s, [t.name for t in targets]),
                "",
            ]
        fan = [
            Server(
                "fan-100", labels["fan-100"], "ours", servers.ours_argv("fsync", work / "e", 10)
            ),
            Server(
                "fan-2048",
                labels["fan-2048"],
                "ours",
                whatif_argv("fsync", work / "f", "--backlog", "2048"),
            ),
        ]
        for t in fan:
            t.start(work)
        try:
            results: dict[str, list[dict[str, float]]] = {}
            for r in range(a.fanout_rounds):
                for t in compare.rotate(fan, r):
                    t.settle(60)
                    res = trio.run(compare._fanout, t, 10, 500, 2.0, 50)
                    results.setdefault(t.name, []).append(res)
                    compare.log(f"  fan-out {t.name}: all results {res['all_results_s']:.2f} s")
        finally:
            for t in fan:
                t.stop()
        out += [
            f"## What-if: SSE fan-out (median of {a.fanout_rounds} rounds)",
            "",
            compare.report_fanout(results, [t.name for t in fan]),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(out))


if __name__ == "__main__":
    main()
