"""agentjobs side by side with PraisonAI's jobs server and with the HTTP stack's ceiling.

    .venv/bin/python benchmarks/compare.py                 # the whole comparison (~15-20 min)
    .venv/bin/python benchmarks/compare.py --quick         # CI smoke: seconds, tiny sizes
    .venv/bin/python benchmarks/compare.py --ours-only     # no PraisonAI (no peer venv)
    .venv/bin/python benchmarks/compare.py --parts submit,e2e --rounds 5

One command from a fresh checkout: it creates (or reuses) a separate venv for the peer,
~/.cache/agentjobs-bench/praisonai-venv, with `praisonai==4.7.19 fastapi uvicorn
sse-starlette` (never a dependency of ours), installs wrk with apt-get when it is missing and
we are root (else falls back to a Python generator), and starts, each as one process on
127.0.0.1:

* **praisonai**: PraisonAI's own app (`create_app(executor=...)`, stock in-memory store)
  with a no-op `JobExecutor` under uvicorn (`benchmarks/_peer/praisonai_server.py`);
* **ours-fsync** / **ours-memory**: `agentjobs serve --runner echo --durability fsync|memory
  --max-concurrency 10` (10 = PraisonAI's default concurrency) on a temporary data dir;
* **ceiling**: a bare hypercorn-trio ASGI app answering 202 with a fixed JSON body, and
  **quart**: the same answer from a minimal quart-trio route (`benchmarks/_peer/ceiling.py`).

Parts (`--parts`, default all): `submit` (POST throughput at each `--concurrency`, fixed
duration, medians of `--rounds` interleaved rounds whose server order rotates), `e2e`
(submit, then poll or SSE until the result, 1 and 8 clients), `fanout` (SSE subscribers on
runs of 2 s), `soak` (N runs submitted and finished on a fresh server: RSS at the end),
`engine` (benchmarks/engine.py and benchmarks/journal.py: runs/s with fsync, replay/s),
`batch` (benchmarks/batch.py: `POST /api/v1/runs/batch`, 4 clients x 1,000 runs, fsync;
ours only, PraisonAI has no batch endpoint).

Prints markdown tables (progress goes to stderr), writes docs/img/compare_throughput.png and
docs/img/compare_latency.png (matplotlib, the `bench` extra; skipped if missing), and with
`--json PATH` every raw figure. Figures depend on the machine and on what else runs on it:
the server CPU per request (from /proc) is printed next to each rate because it is the
figure that moves least on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _peer import loadgen, servers
from _peer.loadgen import SUBMIT_BODY, SUBMIT_PATH, Client, LoadResult
from _peer.servers import Server

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"succeeded", "failed", "cancelled"}
MiB = 2**20

LABELS = {
    "praisonai": "PraisonAI (in-memory)",
    "ours-fsync": "agentjobs fsync",
    "ours-memory": "agentjobs memory",
    "quart": "quart-trio minimal route",
    "ceiling": "bare hypercorn-trio (ceiling)",
}


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


@dataclass
class Settings:
    quick: bool
    ours_only: bool
    parts: list[str]
    rounds: int
    duration: float
    concurrency: list[int]
    e2e_seconds: float
    e2e_clients: list[int]
    fanout_subscribers: int
    fanout_runs: int
    fanout_delay: float
    fanout_rounds: int
    soak_runs: int
    soak_memory_mode: bool
    engine_runs: int
    replay_events: int
    batch_seconds: float
    generator: str
    max_concurrency: int
    charts: Path | None
    json_path: Path | None
    peer_venv: Path


def parse_args(argv: Sequence[str] | None = None) -> Settings:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="CI smoke: seconds, tiny sizes")
    p.add_argument("--ours-only", action="store_true", help="skip PraisonAI (no peer venv)")
    p.add_argument("--parts", default="submit,e2e,fanout,soak,engine,batch")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per submit cell (default 6)")
    p.add_argument("--concurrency", help="connections for submit (default 4,16,64)")
    p.add_argument("--e2e-seconds", type=float, help="seconds per end-to-end cell (default 4)")
    p.add_argument("--fanout-subscribers", type=int)
    p.add_argument("--fanout-runs", type=int)
    p.add_argument("--fanout-delay", type=float)
    p.add_argument("--soak-runs", type=int, help="runs for the soak (default 100000)")
    p.add_argument(
        "--soak-memory-mode", action="store_true", help="also soak agentjobs --durability memory"
    )
    p.add_argument("--engine-runs", type=int)
    p.add_argument("--replay-events", type=int)
    p.add_argument("--batch-seconds", type=float, help="seconds per batch round (default 5)")
    p.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    p.add_argument("--max-concurrency", type=int, default=10, help="ours; PraisonAI's is 10")
    p.add_argument("--charts", type=Path, help="directory for the PNGs (default docs/img)")
    p.add_argument("--no-charts", action="store_true")
    p.add_argument("--json", type=Path, help="write every raw figure here")
    p.add_argument("--peer-venv", type=Path, default=servers.PEER_VENV)
    a = p.parse_args(argv)
    q = a.quick

    def pick(value: Any, full: Any, quick: Any) -> Any:
        return value if value is not None else (quick if q else full)

    parts = [x.strip() for x in a.parts.split(",") if x.strip()]
    unknown = set(parts) - {"submit", "e2e", "fanout", "soak", "engine", "batch"}
    if unknown:
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    conc = pick(a.concurrency, "4,16,64", "4,64")
    charts = None if a.no_charts else (a.charts or REPO / "docs" / "img")
    return Settings(
        quick=q,
        ours_only=a.ours_only,
        parts=parts,
        rounds=pick(a.rounds, 3, 1),
        duration=pick(a.duration, 6.0, 1.0),
        concurrency=[int(x) for x in str(conc).split(",")],
        e2e_seconds=pick(a.e2e_seconds, 4.0, 0.5),
        e2e_clients=[1, 8],
        fanout_subscribers=pick(a.fanout_subscribers, 500, 40),
        fanout_runs=pick(a.fanout_runs, 10, 4),
        fanout_delay=pick(a.fanout_delay, 2.0, 0.3),
        fanout_rounds=1 if q else 3,
        soak_runs=pick(a.soak_runs, 100_000, 300),
        soak_memory_mode=a.soak_memory_mode,
        engine_runs=pick(a.engine_runs, 50_000, 1_000),
        replay_events=pick(a.replay_events, 500_000, 10_000),
        batch_seconds=pick(a.batch_seconds, 5.0, 0.5),
        generator=a.generator,
        max_concurrency=a.max_concurrency,
        charts=charts,
        json_path=a.json,
        peer_venv=a.peer_venv,
    )


# -- helpers ------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    vals = [v for v in values if v == v]  # drop NaN
    return statistics.median(vals) if vals else float("nan")


def rotate(items: list[Any], k: int) -> list[Any]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def ratio(ours: float, theirs: float) -> str:
    if not theirs or theirs != theirs or ours != ours:
        return "-"
    return f"{ours / theirs:.2f}x"


def run_body(kind: str, delay: float = 0.0) -> bytes:
    if delay <= 0:
        return SUBMIT_BODY
    if kind == "praisonai":  # the no-op executor sleeps on this prompt
        return json.dumps({"prompt": f"SLEEP:{delay}"}).encode()
    return json.dumps({"prompt": "fan-out", "config": {"delay_s": delay}}).encode()


# -- part 1 and 5: submit throughput and the ceiling ---------------------------------------


@dataclass
class Cell:
    server: str
    connections: int
    results: list[LoadResult] = field(default_factory=list)
    server_cpu_s: list[float] = field(default_factory=list)
    load1: list[float] = field(default_factory=list)

    def med(self, fn: Callable[[LoadResult], float]) -> float:
        return median([fn(r) for r in self.results])

    @property
    def cpu_us_per_accepted(self) -> float:
        vals = [
            1e6 * cpu / r.accepted if r.accepted else float("nan")
            for cpu, r in zip(self.server_cpu_s, self.results, strict=True)
        ]
        return median(vals)

    @property
    def cpu_us_per_request(self) -> float:
        vals = [
            1e6 * cpu / r.requests if r.requests else float("nan")
            for cpu, r in zip(self.server_cpu_s, self.results, strict=True)
        ]
        return median(vals)


class Generator:
    def __init__(self, kind: str, wrk: str | None) -> None:
        self.kind = kind
        self.wrk = wrk

    @property
    def description(self) -> str:
        if self.kind == "wrk":
            assert self.wrk is not None
            return f"{loadgen.wrk_version(self.wrk)}, 1 thread, benchmarks/_peer/submit.lua"
        return "Python selectors generator (benchmarks/_peer/loadgen.py)"

    def run(self, url: str, connections: int, seconds: float) -> LoadResult:
        if self.kind == "wrk":
            assert self.wrk is not None
            return loadgen.run_wrk(self.wrk, url, connections, seconds)
        return loadgen.run_pygen(url, connections, seconds)


def choose_generator(s: Settings) -> Generator:
    wrk = loadgen.find_wrk()
    if s.generator == "python":
        return Generator("python", None)
    if wrk is None and not s.quick:
        wrk = loadgen.install_wrk(log)
    if wrk is None:
        if s.generator == "wrk":
            raise SystemExit("wrk was asked for but is not installed (apt-get install -y wrk)")
        log("wrk is not available: using the Python generator")
        return Generator("python", None)
    return Generator("wrk", wrk)


def part_submit(s: Settings, gen: Generator, targets: list[Server]) -> dict[tuple[str, int], Cell]:
    cells = {(t.name, c): Cell(t.name, c) for t in targets for c in s.concurrency}
    for t in targets:  # first requests pay for imports and caches: not measured
        t.settle(30)
        if not s.quick:
            gen.run(t.url, 4, 1.0)
    total = s.rounds * len(s.concurrency) * len(targets)
    done = 0
    for r in range(s.rounds):
        for ci, c in enumerate(s.concurrency):
            for t in rotate(targets, r + ci):
                t.settle(60)
                cpu0 = t.cpu_seconds()
                res = gen.run(t.url, c, s.duration)
                t.settle(60)  # the runs it accepted are executed: their CPU counts too
                cell = cells[(t.name, c)]
                cell.results.append(res)
                cell.server_cpu_s.append(t.cpu_seconds() - cpu0)
                cell.load1.append(os.getloadavg()[0])
                done += 1
                log(
                    f"  submit [{done}/{total}] round {r + 1} c={c:<3} {t.name:<12} "
                    f"{res.accepted_per_s:8,.0f} accepted/s  {res.req_per_s:8,.0f} req/s  "
                    f"p50 {res.p50_ms:6.2f} ms  p99 {res.p99_ms:7.2f} ms  "
                    f"503 {100 * res.share(503):4.1f}%  load {os.getloadavg()[0]:.2f}"
                )
    return cells


# -- part 2: end to end -------------------------------------------------------------------


async def _e2e(
    url: str, mode: str, clients: int, seconds: float, max_per_client: int
) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    polls = 0
    perf = time.perf_counter
    stop_at = perf() + seconds

    async def one_client() -> None:
        nonlocal failures, polls
        c = Client(url)
        await c.connect()
        try:
            for _ in range(max_per_client):
                if perf() >= stop_at:
                    break
                t0 = perf()
                status, body = await c.request("POST", SUBMIT_PATH, SUBMIT_BODY)
                if status != 202:
                    failures += 1
                    await trio.sleep(0.01)
                    continue
                job = json.loads(body)["job_id"]
                ok = False
                deadline = t0 + 30
                if mode == "poll":
                    while perf() < deadline:
                        polls += 1
                        status, body = await c.request("GET", f"{SUBMIT_PATH}/{job}")
                        if status == 200 and json.loads(body)["status"] in TERMINAL:
                            break
                    status, body = await c.request("GET", f"{SUBMIT_PATH}/{job}/result")
                    ok = status == 200
                elif mode == "sse":
                    sub = Client(url)
                    await sub.connect()
                    ok = await sub.stream_until(f"{SUBMIT_PATH}/{job}/stream")
                else:  # "wait": ours only, one long-poll
                    status, body = await c.request("GET", f"{SUBMIT_PATH}/{job}/result?wait=30")
                    ok = status == 200
                if ok:
                    latencies.append(perf() - t0)
                else:
                    failures += 1
        finally:
            await c.aclose()

    start = perf()
    with trio.move_on_after(seconds + 60):
        async with trio.open_nursery() as nursery:
            for _ in range(clients):
                nursery.start_soon(one_client)
    elapsed = perf() - start
    summary = loadgen.summarize(latencies)
    return {
        "mode": mode,
        "clients": clients,
        "completed": len(latencies),
        "failures": failures,
        "polls": polls,
        "seconds": elapsed,
        "runs_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": summary["p50"] * 1e3,
        "p99_ms": summary["p99"] * 1e3,
    }


def part_e2e(
    s: Settings, targets: list[Server]
) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    modes = ["poll", "sse", "wait"]
    max_per_client = 50 if s.quick else 5000
    for r in range(s.rounds):
        for mode in modes:
            for clients in s.e2e_clients:
                for t in rotate(targets, r):
                    if mode == "wait" and t.kind != "ours":
                        continue  # PraisonAI has no long-poll
                    t.settle(60)
                    res = trio.run(_e2e, t.url, mode, clients, s.e2e_seconds, max_per_client)
                    out.setdefault((t.name, mode, clients), []).append(res)
                    log(
                        f"  e2e round {r + 1} {mode:<4} clients={clients} {t.name:<12} "
                        f"p50 {res['p50_ms']:6.2f} ms  p99 {res['p99_ms']:7.2f} ms  "
                        f"{res['runs_per_s']:6.0f} runs/s  failures {res['failures']}"
                    )
    return out


# -- part 3: SSE fan-out ------------------------------------------------------------------


async def _fanout(
    t: Server, runs: int, subscribers: int, delay: float, connect_limit: int
) -> dict[str, Any]:
    perf = time.perf_counter
    rss_before = t.rss_bytes()
    peak = rss_before
    c = Client(t.url)
    await c.connect()
    t0 = perf()
    ids = []
    for _ in range(runs):
        status, body = await c.request("POST", SUBMIT_PATH, run_body(t.kind, delay))
        if status != 202:
            raise RuntimeError(f"fan-out submit to {t.name} answered {status}: {body[:200]!r}")
        ids.append(json.loads(body)["job_id"])
    await c.aclose()
    connected: list[float] = []
    results: list[float] = []
    failed = 0
    gate = trio.Semaphore(connect_limit)
    finished = trio.Event()

    async def sample() -> None:
        nonlocal peak
        while not finished.is_set():
            peak = max(peak, t.rss_bytes())
            await trio.sleep(0.05)

    async def subscriber(i: int) -> None:
        nonlocal failed
        sub = Client(t.url)
        try:
            async with gate:
                await sub.connect()
            ok = await sub.stream_until(
                f"{SUBMIT_PATH}/{ids[i % runs]}/stream", connected=connected
            )
        except (OSError, loadgen.HTTPError):
            ok = False
        if ok:
            results.append(perf())
        else:
            failed += 1

    with trio.move_on_after(delay + 60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sample)
            async with trio.open_nursery() as subs:
                for i in range(subscribers):
                    subs.start_soon(subscriber, i)
            finished.set()
    rss_after = t.rss_bytes()
    return {
        "subscribers": subscribers,
        "runs": runs,
        "delay_s": delay,
        "got_result": len(results),
        "failed": failed,
        "all_connected_s": (max(connected) - t0) if connected else float("nan"),
        "all_results_s": (max(results) - t0) if results else float("nan"),
        "first_result_s": (min(results) - t0) if results else float("nan"),
        "rss_before_mib": rss_before / MiB,
        "rss_peak_mib": max(peak, rss_after) / MiB,
        "rss_after_mib": rss_after / MiB,
    }


def part_fanout(s: Settings, targets: list[Server]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in range(s.fanout_rounds):
        for t in rotate(targets, r):
            t.settle(60)
            res = trio.run(_fanout, t, s.fanout_runs, s.fanout_subscribers, s.fanout_delay, 50)
            out.setdefault(t.name, []).append(res)
            log(
                f"  fan-out round {r + 1} {t.name:<12} {res['got_result']}/{res['subscribers']} "
                f"got the result; all connected {res['all_connected_s']:.2f} s, all results "
                f"{res['all_results_s']:.2f} s; RSS {res['rss_before_mib']:.0f} -> peak "
                f"{res['rss_peak_mib']:.0f} MiB"
            )
    return out


# -- part 4: soak memory --------------------------------------------------------------------


def part_soak(
    s: Settings, specs: list[tuple[str, str, list[str], int]], workdir: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind, argv, conns in specs:
        t = Server(f"soak-{name}", LABELS.get(name, name), kind, argv)
        t.start(workdir)
        try:
            t.settle(30)
            rss0 = t.rss_bytes()
            cpu0 = t.cpu_seconds()
            max_seconds = 60 if s.quick else 420
            res = loadgen.run_pygen(
                t.url, conns, accepted_target=s.soak_runs, max_seconds=max_seconds
            )
            settle_s = t.settle(120 if not s.quick else 30)
            time.sleep(1.0)
            rss1 = t.rss_bytes()
            retained = t.retained_runs()
            out[name] = {
                "connections": conns,
                "accepted": res.accepted,
                "requests": res.requests,
                "rejected_503": res.statuses.get(503, 0),
                "submit_seconds": res.seconds,
                "accepted_per_s": res.accepted_per_s,
                "settle_seconds": settle_s,
                "pending_at_end": t.pending(),
                "retained_runs": retained,
                "rss_start_mib": rss0 / MiB,
                "rss_end_mib": rss1 / MiB,
                "rss_per_run_bytes": (rss1 - rss0) / max(1, res.accepted),
                "server_cpu_us_per_run": 1e6 * (t.cpu_seconds() - cpu0) / max(1, res.accepted),
            }
            log(
                f"  soak {name:<12} {res.accepted:,} accepted ({res.statuses.get(503, 0):,} x 503) "
                f"in {res.seconds:.0f} s; retained {retained}; RSS {rss0 / MiB:.0f} -> "
                f"{rss1 / MiB:.0f} MiB"
            )
        finally:
            t.stop()
    return out


# -- part 6: the engine alone -------------------------------------------------------------


def part_engine(s: Settings) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "_peer" / "engine_alone.py"),
            "--runs",
            str(s.engine_runs),
            "--replay-events",
            str(s.replay_events),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in out.stdout.splitlines():
        if line.startswith("ENGINE_RESULT "):
            result: dict[str, Any] = json.loads(line.split(" ", 1)[1])
            return result
    return {"error": (out.stderr or out.stdout)[-800:]}


# -- part 7: batch submit ----------------------------------------------------------------


def part_batch(s: Settings) -> list[dict[str, Any]]:
    """`--rounds` rounds of benchmarks/batch.py's measurement (fresh server each), held
    runs (acceptance alone) and executed runs, fsync."""
    import batch  # benchmarks/batch.py, beside this script

    size = 100 if s.quick else 1000
    rows = []
    for r in range(s.rounds):
        for execute in (False, True):
            log(f"batch round {r + 1}: {'executed' if execute else 'held'} runs")
            rows.append(batch.measure(4, size, s.batch_seconds, "fsync", execute))
    return rows


def report_batch(rows: list[dict[str, Any]]) -> str:
    out = []
    for execute in (False, True):
        mine = [r for r in rows if r["execute"] == execute]
        if not mine:
            continue
        us = median([r["server_us_per_run"] or float("nan") for r in mine])
        out.append(
            [
                "executed meanwhile (echo, --max-concurrency 10)"
                if execute
                else "held (acceptance alone)",
                f"{mine[0]['clients']} x {mine[0]['batch']:,}",
                fmt(median([r["accepted_per_s"] for r in mine])),
                fmt(median([r["p50_ms"] for r in mine]), 1),
                fmt(median([r["p99_ms"] for r in mine]), 1),
                str(sum(r["rejected"] + r["failed_batches"] for r in mine)),
                fmt(us, 1),
                fmt(1e6 / us) if us == us else "-",
            ]
        )
    return table(
        [
            "runs",
            "clients x batch",
            "accepted runs/s",
            "p50 ms per batch",
            "p99 ms",
            "refused",
            "server CPU µs/run",
            "runs/s per server core",
        ],
        out,
        "llrrrrrr",
    )


# -- report -------------------------------------------------------------------------------


def table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report_submit(cells: dict[tuple[str, int], Cell], s: Settings, names: list[str]) -> str:
    rows = []
    for c in s.concurrency:
        theirs = cells.get(("praisonai", c))
        ceiling = cells.get(("ceiling", c))
        for name in names:
            cell = cells.get((name, c))
            if cell is None:
                continue
            acc = cell.med(lambda r: r.accepted_per_s)
            vs_theirs = "-"
            if theirs is not None and name.startswith("ours"):
                vs_theirs = ratio(acc, theirs.med(lambda r: r.accepted_per_s))
            vs_ceiling = "-"
            if ceiling is not None and name != "ceiling":
                ceil = ceiling.med(lambda r: r.req_per_s)
                vs_ceiling = f"{100 * acc / ceil:.0f}%" if ceil else "-"
            rows.append(
                [
                    str(c),
                    LABELS.get(name, name),
                    fmt(acc),
                    fmt(cell.med(lambda r: r.req_per_s)),
                    fmt(cell.med(lambda r: r.p50_ms), 2),
                    fmt(cell.med(lambda r: r.p99_ms), 2),
                    fmt(100 * cell.med(lambda r: r.share(503)), 1),
                    fmt(100 * cell.med(lambda r: r.other_non_202_share), 1),
                    fmt(cell.cpu_us_per_request),
                    vs_theirs,
                    vs_ceiling,
                ]
            )
    return table(
        [
            "conns",
            "server",
            "accepted/s",
            "answers/s",
            "p50 ms",
            "p99 ms",
            "503 %",
            "other non-202 %",
            "server CPU µs/answer",
            "ours/theirs",
            "of ceiling",
        ],
        rows,
        "ll" + "r" * 9,
    )


def report_generator(cells: dict[tuple[str, int], Cell], gen: Generator) -> str:
    lines = []
    for (name, c), cell in sorted(cells.items()):
        if name != "ceiling":
            continue
        rate = cell.med(lambda r: r.req_per_s)
        us = cell.med(lambda r: r.gen_cpu_us_per_req)
        cap = 1e6 / us if us == us and us > 0 else float("nan")
        lines.append(
            f"- {c} connections: the generator drove the bare app at {fmt(rate)} req/s using "
            f"{fmt(us, 1)} µs of its own CPU per request (so one core of it could issue "
            f"~{fmt(cap)} req/s)"
        )
    return f"Generator: {gen.description}\n" + "\n".join(lines)


def report_e2e(e2e: dict[tuple[str, str, int], list[dict[str, Any]]], names: list[str]) -> str:
    rows = []
    modes = {
        "poll": "poll status, then /result",
        "sse": "SSE until `result`",
        "wait": "long-poll `/result?wait=30` (ours only)",
    }
    for mode in ("poll", "sse", "wait"):
        for clients in sorted({k[2] for k in e2e}):
            theirs = e2e.get(("praisonai", mode, clients))
            t50 = median([x["p50_ms"] for x in theirs]) if theirs else float("nan")
            for name in names:
                cells = e2e.get((name, mode, clients))
                if not cells:
                    continue
                p50 = median([x["p50_ms"] for x in cells])
                rows.append(
                    [
                        modes[mode],
                        str(clients),
                        LABELS.get(name, name),
                        fmt(p50, 2),
                        fmt(median([x["p99_ms"] for x in cells]), 2),
                        fmt(median([x["runs_per_s"] for x in cells])),
                        str(sum(x["failures"] for x in cells)),
                        ratio(p50, t50) if name.startswith("ours") and theirs else "-",
                    ]
                )
    return table(
        [
            "follow",
            "clients",
            "server",
            "p50 ms",
            "p99 ms",
            "runs/s",
            "failures",
            "p50 ours/theirs",
        ],
        rows,
        "lll" + "r" * 5,
    )


def report_fanout(fan: dict[str, list[dict[str, Any]]], names: list[str]) -> str:
    rows = []
    for name in names:
        cells = fan.get(name)
        if not cells:
            continue
        x = cells[0]
        rows.append(
            [
                LABELS.get(name, name),
                f"{x['subscribers']} on {x['runs']} runs of {x['delay_s']:g} s",
                f"{min(c['got_result'] for c in cells)}/{x['subscribers']}",
                fmt(median([c["all_connected_s"] for c in cells]), 2),
                fmt(median([c["first_result_s"] for c in cells]), 2),
                fmt(median([c["all_results_s"] for c in cells]), 2),
                fmt(median([c["rss_before_mib"] for c in cells]), 0),
                fmt(median([c["rss_peak_mib"] for c in cells]), 0),
            ]
        )
    return table(
        [
            "server",
            "subscribers",
            "got result (worst round)",
            "all connected s",
            "first result s",
            "all have result s",
            "RSS before MiB",
            "RSS peak MiB",
        ],
        rows,
        "ll" + "r" * 6,
    )


def report_soak(soak: dict[str, Any], names: list[str]) -> str:
    rows = []
    for name in names:
        x = soak.get(name)
        if not x:
            continue
        rows.append(
            [
                LABELS.get(name, name),
                f"{x['accepted']:,}",
                f"{x['rejected_503']:,}",
                str(x["connections"]),
                fmt(x["accepted_per_s"]),
                f"{x['retained_runs']:,}" if x["retained_runs"] is not None else "-",
                fmt(x["rss_start_mib"], 0),
                fmt(x["rss_end_mib"], 0),
                fmt(x["rss_per_run_bytes"], 0),
            ]
        )
    return table(
        [
            "server",
            "runs finished",
            "503s",
            "conns",
            "accepted/s",
            "runs still answered for",
            "RSS start MiB",
            "RSS end MiB",
            "bytes/run",
        ],
        rows,
    )


def report_engine(engine: dict[str, Any]) -> str:
    if "error" in engine:
        return f"engine benchmark failed: {engine['error']}"
    t = engine["throughput"]
    rp = engine.get("replay", {})
    rows = [
        [
            "runs/s, fsync, whole lifecycle (benchmarks/engine.py)",
            fmt(t["runs_per_s"]),
            f"{t['runs']:,} runs, {t['submitters']} submitters, {t['cpu_us_per_run']} µs CPU/run, "
            f"{t['events_per_batch']} events per group commit",
        ]
    ]
    if "events_per_s" in rp:
        rows.append(
            [
                "replay events/s with state fold (benchmarks/journal.py)",
                fmt(rp["events_per_s"]),
                f"{rp['events']:,} events, {rp['bytes_per_event']} bytes/event",
            ]
        )
    return table(["engine alone", "figure", "detail"], rows, "lrl")


# -- charts -------------------------------------------------------------------------------

COLORS = {
    "praisonai": "#d62728",
    "ours-fsync": "#1f77b4",
    "ours-memory": "#6baed6",
    "quart": "#9e9e9e",
    "ceiling": "#404040",
}


def charts(
    cells: dict[tuple[str, int], Cell],
    e2e: dict[tuple[str, str, int], list[dict[str, Any]]],
    s: Settings,
    names: list[str],
    subtitle: str,
) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed (pip install -e '.[bench]'): no charts")
        return []
    assert s.charts is not None
    s.charts.mkdir(parents=True, exist_ok=True)
    written = []
    concs = s.concurrency
    shown = [n for n in names if any((n, c) in cells for c in concs)]

    subtitle = textwrap.fill(subtitle, 130)
    fig, ax = plt.subplots(figsize=(10, 5.2))
    width = 0.8 / max(1, len(shown))
    for i, name in enumerate(shown):
        xs = [k + (i - (len(shown) - 1) / 2) * width for k in range(len(concs))]
        acc = [cells[(name, c)].med(lambda r: r.accepted_per_s) for c in concs]
        bars = ax.bar(xs, acc, width, label=LABELS.get(name, name), color=COLORS.get(name))
        ax.bar_label(bars, labels=[fmt(v) for v in acc], fontsize=7, padding=1)
        if name == "praisonai":
            rej = [
                cells[(name, c)].med(lambda r: r.statuses.get(503, 0) / r.seconds) for c in concs
            ]
            ax.bar(
                xs,
                rej,
                width,
                bottom=acc,
                color="none",
                edgecolor=COLORS[name],
                hatch="///",
                label="PraisonAI 503 answers/s",
            )
    ax.set_xticks(range(len(concs)), [f"{c} connections" for c in concs])
    ax.set_ylim(0, ax.get_ylim()[1] * 1.25)  # room for the legend above the bars
    ax.set_ylabel("accepted submits/s (202)")
    ax.set_title(
        f"POST /api/v1/runs throughput (median of {s.rounds} rounds)\n{subtitle}", fontsize=9
    )
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = s.charts / "compare_throughput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    for name in shown:
        if name in ("ceiling", "quart"):
            continue
        p50 = [cells[(name, c)].med(lambda r: r.p50_ms) for c in concs]
        p99 = [cells[(name, c)].med(lambda r: r.p99_ms) for c in concs]
        ax.plot(concs, p50, "o-", color=COLORS.get(name), label=f"{LABELS.get(name, name)} p50")
        ax.plot(
            concs,
            p99,
            "s--",
            color=COLORS.get(name),
            alpha=0.7,
            label=f"{LABELS.get(name, name)} p99",
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("connections")
    ax.set_ylabel("submit latency, ms (all answers)")
    ax.set_title("submit latency per concurrency", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    ax = axes[1]
    groups = [(m, c) for m in ("poll", "sse") for c in s.e2e_clients]
    servers_e2e = [
        n
        for n in ("praisonai", "ours-fsync", "ours-memory")
        if any((n, m, c) in e2e for m, c in groups)
    ]
    width = 0.8 / max(1, len(servers_e2e))
    for i, name in enumerate(servers_e2e):
        xs = [k + (i - (len(servers_e2e) - 1) / 2) * width for k in range(len(groups))]
        vals = [median([x["p50_ms"] for x in e2e.get((name, m, c), [])]) for m, c in groups]
        bars = ax.bar(xs, vals, width, color=COLORS.get(name), label=LABELS.get(name, name))
        ax.bar_label(bars, labels=[fmt(v, 1) for v in vals], fontsize=7, padding=1)
    ax.set_xticks(range(len(groups)), [f"{m}, {c} client{'s' if c > 1 else ''}" for m, c in groups])
    ax.set_ylabel("submit-to-result p50, ms")
    ax.set_title("end to end (lower is better)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(subtitle, fontsize=8)
    fig.tight_layout()
    path = s.charts / "compare_latency.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


# -- main ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    t_start = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="agentjobs-compare-"))
    result: dict[str, Any] = {"settings": {k: str(v) for k, v in asdict(s).items()}}
    load_start = os.getloadavg()
    info = servers.machine_info()
    ours_versions = servers.package_versions(sys.executable, servers.OURS_VERSION_PACKAGES)
    ours_versions["git"] = servers.git_revision()
    ours_versions["source sha1"] = servers.source_digest()
    result.update(machine=info, ours_versions=ours_versions, load_start=load_start)
    fsync_start = servers.fsync_probe(workdir)

    peer_venv = None
    peer_versions: dict[str, str] = {}
    if not s.ours_only:
        try:
            peer_venv = servers.ensure_peer_venv(s.peer_venv, log)
        except (subprocess.SubprocessError, OSError) as exc:
            log(f"could not set up PraisonAI's venv ({exc}); run with --ours-only to skip it")
            return 1
        peer_versions = servers.package_versions(
            peer_venv / "bin" / "python", servers.PEER_VERSION_PACKAGES
        )
        result["peer_versions"] = peer_versions

    needs_submit = "submit" in s.parts
    gen = choose_generator(s) if needs_submit else Generator("python", None)
    data = workdir / "data-fsync"
    specs: list[tuple[str, str, list[str]]] = []
    if peer_venv is not None:
        specs.append(("praisonai", "praisonai", servers.peer_argv(peer_venv)))
    specs.append(("ours-fsync", "ours", servers.ours_argv("fsync", data, s.max_concurrency)))
    if not s.quick:
        specs.append(
            (
                "ours-memory",
                "ours",
                servers.ours_argv("memory", workdir / "unused", s.max_concurrency),
            )
        )
    if needs_submit:
        if not s.quick:
            specs.append(("quart", "ceiling", servers.ceiling_argv("quart")))
        specs.append(("ceiling", "ceiling", servers.ceiling_argv("asgi")))
    names = [n for n, _, _ in specs]

    running: dict[str, Server] = {}
    cells: dict[tuple[str, int], Cell] = {}
    e2e: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    fan: dict[str, list[dict[str, Any]]] = {}
    soak: dict[str, Any] = {}
    engine: dict[str, Any] = {}
    batches: list[dict[str, Any]] = []
    try:
        if any(p in s.parts for p in ("submit", "e2e", "fanout")):
            for name, kind, argv in specs:
                running[name] = Server(name, LABELS[name], kind, argv)
            for t in running.values():
                t.launch(workdir)
            for t in running.values():
                t.wait_ready()
                log(f"started {t.label} at {t.url} (pid {t.pid})")
            for t in running.values():
                t.info["rss_idle_mib"] = t.rss_bytes() / MiB
        if needs_submit:
            log(
                f"submit throughput: {s.rounds} round(s) x {s.concurrency} x {len(running)} "
                f"servers, {s.duration:g} s each, generator {gen.kind}"
            )
            cells = part_submit(s, gen, list(running.values()))
        followers = [running[n] for n in ("praisonai", "ours-fsync", "ours-memory") if n in running]
        if "e2e" in s.parts:
            log("end to end")
            e2e = part_e2e(s, followers)
        if "fanout" in s.parts:
            log("SSE fan-out")
            fan = part_fanout(s, followers)
        for t in running.values():
            t.info["rss_end_mib"] = t.rss_bytes() / MiB
            with contextlib.suppress(OSError):
                t.info["retained_runs"] = t.retained_runs()
    finally:
        for t in running.values():
            t.stop()
    try:
        if "soak" in s.parts:
            log(f"soak: {s.soak_runs:,} runs on fresh servers")
            soak_specs = []
            if peer_venv is not None:
                soak_specs.append(("praisonai", "praisonai", servers.peer_argv(peer_venv), 4))
            soak_specs.append(
                (
                    "ours-fsync",
                    "ours",
                    servers.ours_argv("fsync", workdir / "soak-fsync", s.max_concurrency),
                    16,
                )
            )
            if s.soak_memory_mode:
                soak_specs.append(
                    (
                        "ours-memory",
                        "ours",
                        servers.ours_argv("memory", workdir / "unused", s.max_concurrency),
                        16,
                    )
                )
            soak = part_soak(s, soak_specs, workdir)
        if "engine" in s.parts:
            log("engine alone")
            engine = part_engine(s)
        if "batch" in s.parts:
            log("batch submit")
            batches = part_batch(s)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    fsync_end = servers.fsync_probe(Path(tempfile.gettempdir()))
    load_end = os.getloadavg()
    result.update(fsync_ms={"start": fsync_start, "end": fsync_end})
    elapsed = time.monotonic() - t_start
    result.update(load_end=load_end, elapsed_s=elapsed, generator=gen.description)
    ov, pv = ours_versions, peer_versions
    subtitle = (
        f"{info['cpus']} CPUs ({info['cpu_model']}), load {load_start[0]:.1f}->{load_end[0]:.1f}; "
        f"agentjobs {ov.get('agentjobs', '?')} (trio {ov.get('trio', '?')}, hypercorn "
        f"{ov.get('hypercorn', '?')}, quart-trio {ov.get('quart-trio', '?')})"
        + (
            f" vs praisonai {pv.get('praisonai')} (fastapi {pv.get('fastapi')}, uvicorn "
            f"{pv.get('uvicorn')})"
            if pv
            else ""
        )
    )

    title = "agentjobs alone" if s.ours_only else "agentjobs vs PraisonAI"
    out = [f"# {title} ({'quick' if s.quick else 'full'} run, {elapsed:.0f} s)", ""]
    out.append(
        f"Machine: {info['cpus']} CPUs, {info['cpu_model']}, {info['memory_gib']} GiB, "
        f"{info['kernel']}; /tmp is {info['tmp_fs']}; load average {load_start[0]:.2f} at "
        f"start, {load_end[0]:.2f} at end; a bare 4 KiB append + fsync there took p50 "
        f"{fsync_start[0]:.2f} ms (p90 {fsync_start[1]:.2f}) at start, {fsync_end[0]:.2f} ms "
        f"(p90 {fsync_end[1]:.2f}) at end."
    )
    out.append(
        "Ours: "
        + ", ".join(f"{k} {v}" for k, v in ours_versions.items())
        + f"; `--max-concurrency {s.max_concurrency}`."
    )
    if peer_versions:
        out.append("PraisonAI venv: " + ", ".join(f"{k} {v}" for k, v in peer_versions.items()))
    out.append("")
    if cells:
        out += [
            f"## Submit throughput (POST /api/v1/runs, {s.duration:g} s per cell, median of "
            f"{s.rounds} interleaved rounds)",
            "",
            report_submit(cells, s, names),
            "",
            report_generator(cells, gen),
            "",
        ]
    if e2e:
        out += [
            f"## End to end (submit, then follow to the result; {s.e2e_seconds:g} s per "
            f"cell, median of {s.rounds} rounds)",
            "",
            report_e2e(e2e, names),
            "",
        ]
    if fan:
        out += [
            f"## SSE fan-out (median of {s.fanout_rounds} rounds)",
            "",
            report_fanout(fan, names),
            "",
        ]
    if soak:
        out += [
            f"## Soak: {s.soak_runs:,} runs submitted and finished, fresh server",
            "",
            report_soak(soak, names),
            "",
        ]
        if "praisonai" in soak:
            out.append(
                "PraisonAI's in-memory store keeps at most 1,000 runs (it evicts the oldest "
                "10 % of finished runs beyond that), so its figure is for 1,000 retained runs; "
                "ours keeps every run (and its idempotency key) until `--retention`."
            )
            out.append("")
    if engine:
        out += ["## Engine alone", "", report_engine(engine), ""]
    if batches:
        out += [
            f"## Batch submit (POST /api/v1/runs/batch, fsync, {s.batch_seconds:g} s per "
            f"round, median of {s.rounds}; ours only)",
            "",
            report_batch(batches),
            "",
        ]
    if running:
        out.append(
            "Server RSS after all parts: "
            + "; ".join(
                f"{LABELS[n]} {t.info.get('rss_end_mib', 0):.0f} MiB"
                + (f" ({t.info['retained_runs']:,} runs)" if t.info.get("retained_runs") else "")
                for n, t in running.items()
            )
        )
    text = "\n".join(out)
    print(text, flush=True)

    result.update(
        submit={
            f"{k[0]}@{k[1]}": {
                "results": [asdict(r) for r in v.results],
                "server_cpu_s": v.server_cpu_s,
                "load1": v.load1,
            }
            for k, v in cells.items()
        },
        e2e={f"{k[0]}@{k[1]}@{k[2]}": v for k, v in e2e.items()},
        fanout=fan,
        soak=soak,
        engine=engine,
        batch=batches,
        servers={n: t.info for n, t in running.items()},
        report=text,
    )
    if s.charts is not None and cells:
        for path in charts(cells, e2e, s, names, subtitle):
            log(f"wrote {path}")
    if s.json_path is not None:
        s.json_path.parent.mkdir(parents=True, exist_ok=True)
        s.json_path.write_text(json.dumps(result, indent=1, default=str))
        log(f"wrote {s.json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
