"""The fault, load and fuzz harness of issue 7, run end to end, with a table of figures.

    .venv/bin/python benchmarks/faults.py            # the CI sizes (~3 min)
    .venv/bin/python benchmarks/faults.py --long     # the long setting (~20 min)
    .venv/bin/python benchmarks/faults.py --only crash,storage --json out.json

Runs the same scenarios as tests/test_faults_*.py, tests/test_fuzz_*.py and
tests/test_load_*.py (their code is in tests/faults/), at the chosen sizes, and prints one
table that docs/reliability.md quotes. Exit code 1 if any scenario found a problem (the
problems are printed under the table). Only 127.0.0.1 is ever contacted; every loop is
bounded. Needs root for the tmpfs scenarios (full disk; without it they are reported as
skipped).

Sizes (default / --long): crash 3 / 25 kill -9s, with fsync and with os durability;
full disk 2 / 6 cycles; corruption every case of a 16-line journal (both); schemathesis
25 / 300 examples per operation; 1,000 SSE subscribers (both); 1 / 4 never-reading
clients, each sent 18 MB of output; 10,000 queued runs (both); soak 10 s / 600 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tests/faults and tests/live_server.py
sys.path.insert(1, str(ROOT))

import attrs  # noqa: E402
import orjson  # noqa: E402
import trio  # noqa: E402
from faults.corruption import (  # noqa: E402
    SEGMENT,
    all_cases,
    events_of,
    lines_of,
    make_journal,
    run_case,
    summarise,
)
from faults.crash import CrashHarness  # noqa: E402
from faults.load import queue_drain, slow_subscriber, soak, sse_fanout  # noqa: E402
from faults.storage import MountUnavailable, full_disk_cycles, tiny_tmpfs  # noqa: E402

SCENARIOS = ("crash", "crash-os", "storage", "corruption", "fuzz", "sse", "slow", "queue", "soak")


@attrs.define
class Sizes:
    crashes: int
    storage_cycles: int
    fuzz_examples: int
    subscribers: int
    slow_clients: int
    queue_runs: int
    soak_s: float


SHORT = Sizes(3, 2, 25, 1000, 1, 10_000, 10.0)
LONG = Sizes(25, 6, 300, 1000, 4, 10_000, 600.0)


@attrs.define
class Row:
    scenario: str
    figure: str
    value: str


@attrs.define
class Results:
    rows: list[Row] = attrs.Factory(list)
    problems: list[str] = attrs.Factory(list)
    raw: dict[str, Any] = attrs.Factory(dict)
    seconds: dict[str, float] = attrs.Factory(dict)

    def add(self, scenario: str, figure: str, value: object) -> None:
        self.rows.append(Row(scenario, figure, str(value)))


def _mib(kib: int) -> str:
    return f"{kib / 1024:.0f} MiB"


async def crash(
    work: Path, sizes: Sizes, out: Results, seed: int, durability: str = "fsync"
) -> None:
    harness = CrashHarness(work, crashes=sizes.crashes, seed=seed, durability=durability)
    report = await harness.run()
    name = "crash" if durability == "fsync" else f"crash ({durability})"
    out.raw[name] = attrs.asdict(report)
    out.problems += report.problems
    if durability != "fsync":
        out.add(
            name,
            "kill -9s survived / runs acknowledged / lost / overlaps",
            f"{report.crashes} / {report.acknowledged} / {report.lost} / {report.overlaps}",
        )
        return
    out.add("crash", "kill -9s survived (restarts that kept every promise)", report.crashes)
    out.add("crash", "runs acknowledged (202)", report.acknowledged)
    out.add(
        "crash", "submits whose answer was lost in a kill (sent again)", report.submits_unanswered
    )
    out.add("crash", "cancels acknowledged (200 cancelled)", report.cancels_acknowledged)
    out.add("crash", "acknowledged runs lost", report.lost)
    out.add("crash", "idempotency keys that made two runs", report.duplicates)
    out.add(
        "crash", "attempts started / orphaned by a kill", f"{report.attempts} / {report.orphans}"
    )
    out.add("crash", "overlapping attempts of one run", report.overlaps)
    rec = report.recovered
    out.add(
        "crash",
        "recovered at restart: requeued / failed / cancelled",
        f"{rec.get('requeued', 0)} / {rec.get('failed', 0)} / {rec.get('cancelled', 0)}",
    )
    out.add(
        "crash",
        "streams checked / resumed with Last-Event-ID",
        f"{report.streams} / {report.stream_resumes}",
    )
    out.add("crash", "slowest restart", f"{report.restart_s_max:.2f} s")
    out.add("crash", "max server RSS", _mib(report.max_rss_kib))


async def storage(work: Path, sizes: Sizes, out: Results, seed: int) -> None:
    def body() -> None:
        try:
            with tiny_tmpfs(work / "disk", "256k") as mount:
                report = full_disk_cycles(mount, cycles=sizes.storage_cycles)
        except MountUnavailable as exc:
            out.add("storage", "full-disk cycles", f"skipped ({exc})")
            return
        out.raw["storage"] = attrs.asdict(report)
        out.problems += report.problems
        out.add("storage", "full-disk cycles (+1 restart on a full disk)", report.cycles)
        out.add(
            "storage",
            "recoveries without restart / after restart",
            f"{min(report.recoveries, report.cycles)} / {report.recoveries - report.cycles}",
        )
        out.add("storage", "submits refused with 503 storage-unavailable", report.refused)
        out.add("storage", "acknowledged / lost", f"{report.acknowledged} / {report.lost}")
        out.add(
            "storage",
            "slowest recovery after space returned",
            f"{report.recover_s_max * 1000:.0f} ms",
        )

    await trio.to_thread.run_sync(body)


async def corruption(work: Path, sizes: Sizes, out: Results, seed: int) -> None:
    def body() -> None:
        real = make_journal(work / "journal")
        raw = (real / "journal" / SEGMENT).read_bytes()
        events = events_of(lines_of(raw))
        cases = list(all_cases(raw))
        try:
            with tiny_tmpfs(work / "ram", "64m") as scratch:
                outcomes = [run_case(real, scratch, c, events) for c in cases]
        except MountUnavailable:
            outcomes = [run_case(real, work / "scratch", c, events) for c in cases]
        counts = summarise(outcomes)
        out.raw["corruption"] = counts
        out.problems += [p for o in outcomes for p in o.problems][:20]
        out.add(
            "corruption",
            f"cases on a {len(raw)}-byte, {len(lines_of(raw))}-line journal",
            len(cases),
        )
        out.add(
            "corruption",
            "opened clean / torn tail cut / refused then repaired",
            f"{counts.get('clean', 0)} / {counts.get('torn', 0)} / {counts.get('repaired', 0)}",
        )
        out.add("corruption", "cases mishandled", counts["problems"])

    await trio.to_thread.run_sync(body)


async def fuzz(work: Path, sizes: Sizes, out: Results, seed: int) -> None:
    env = dict(os.environ, AGENTJOBS_FUZZ_EXAMPLES=str(sizes.fuzz_examples))
    if sizes.fuzz_examples > 25:
        env["AGENTJOBS_FUZZ_RANDOM"] = "1"  # explore beyond the derandomized CI examples
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "tests/test_fuzz_api.py",
        "tests/test_fuzz_inputs.py",
    ]
    done = await trio.to_thread.run_sync(
        lambda: subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    )
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    failed = int(m.group(1)) if (m := re.search(r"(\d+) failed", summary)) else 0
    if done.returncode != 0:
        out.problems.append(f"fuzz tests failed: {done.stdout[-3000:]}")
    out.raw["fuzz"] = {"summary": summary, "examples_per_operation": sizes.fuzz_examples}
    out.add(
        "fuzz",
        f"schemathesis operations x {sizes.fuzz_examples} examples + hostile inputs",
        f"{passed} passed, {failed} failed",
    )


async def sse(work: Path, sizes: Sizes, out: Results, seed: int) -> None:
    report = await sse_fanout(work, subscribers=sizes.subscribers)
    out.raw["sse"] = attrs.asdict(report)
    out.problems += report.problems
    out.add("sse", "subscribers that got every event", f"{report.complete} of {report.subscribers}")
    out.add(
        "sse",
        "events per stream / time to deliver to all",
        f"{report.events} / {report.deliver_s:.1f} s",
    )
    out.add("sse", "max server RSS with all streams open", _mib(report.max_rss_kib))


async def slow(work: Path, sizes: Sizes, out: Results, seed: int) -> None:
    report = await slow_subscriber(work, clients=sizes.slow_clients)
    out.raw["slow"] = attrs.asdict(report)
    out.problems += report.problems
    out.add(
        "slow client",
        f"output sent to {sizes.slow_clients} client(s) that never read (all held open)",
        f"{report.output_bytes / 1e6:.0f} MB",
    )
    out.add("slow client", "server RSS growth meanwhile", f"{report.growth_kib / 1024:.1f} MiB")


async def queue(work: Path, sizes: Sizes, out: Results, seed: int) -> None:
    report = await queue_drain(work, runs=sizes.queue_runs, concurrency=10)
    out.raw["queue"] = attrs.asdict(report)
    out.problems += report.problems
    out.add(
        "queue",
        "runs queued behind 10 slots / succeeded / lost",
        f"{report.acknowledged} / {report.succeeded} / {report.lost}",
    )
    out.add("queue", "most running at once (limit 10)", report.max_running)
    out.add(
        "queue",
        "submit time (fsync) / drain time",
        f"{report.submit_s:.1f} s / {report.drain_s:.1f} s",
    )
    out.add("queue", "max server RSS", _mib(report.max_rss_kib))


async def soak_(work: Path, sizes: Sizes, out: Results, seed: int) -> None:
    report = await soak(work, seconds=sizes.soak_s, check_flat=sizes.soak_s >= 120)
    out.raw["soak"] = attrs.asdict(report)
    out.problems += report.problems
    out.add(
        "soak",
        "duration / submit-finish(-delete) cycles",
        f"{report.seconds:.0f} s / {report.cycles}",
    )
    out.add(
        "soak",
        "compactions / journal size at the end",
        f"{report.compactions} / {report.journal_bytes / 1024:.0f} KiB",
    )
    out.add(
        "soak",
        "RSS peak first half / second half",
        f"{_mib(report.first_half_max_kib)} / {_mib(report.second_half_max_kib)}",
    )


async def crash_os(work: Path, sizes: Sizes, out: Results, seed: int) -> None:
    await crash(work, sizes, out, seed, durability="os")


RUNNERS: dict[str, Callable[[Path, Sizes, Results, int], Awaitable[None]]] = {
    "crash": crash,
    "crash-os": crash_os,
    "storage": storage,
    "corruption": corruption,
    "fuzz": fuzz,
    "sse": sse,
    "slow": slow,
    "queue": queue,
    "soak": soak_,
}


async def main_async(names: list[str], sizes: Sizes, seed: int, out: Results) -> None:
    with tempfile.TemporaryDirectory(prefix="agentjobs-faults-") as tmp:
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            t0 = time.monotonic()
            print(f"... {name}", file=sys.stderr, flush=True)
            try:
                await RUNNERS[name](work, sizes, out, seed)
            except Exception as exc:  # a scenario that crashed is a finding too
                out.problems.append(f"{name}: {type(exc).__name__}: {exc}")
            out.seconds[name] = round(time.monotonic() - t0, 1)


def render(out: Results, setting: str, seed: int) -> str:
    lines = [
        f"agentjobs fault harness, {setting} setting, seed {seed}",
        "",
        "| scenario | figure | value |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {r.scenario} | {r.figure} | {r.value} |" for r in out.rows]
    took = ", ".join(f"{k} {v:.0f} s" for k, v in out.seconds.items())
    lines += ["", f"time: {took}", f"problems: {len(out.problems)}"]
    lines += [f"  - {p}" for p in out.problems[:50]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help="the long setting (~20 min)")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--seed", type=int, default=None, help="crash schedule seed")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    # the journal's warnings (thousands of torn tails cut on purpose) are not news here
    logging.basicConfig(level=logging.ERROR)
    sizes = LONG if args.long else SHORT
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    out = Results()
    trio.run(main_async, names, sizes, seed, out)
    setting = "long" if args.long else "short"
    print(render(out, setting, seed))
    if args.json:
        payload = {
            "setting": setting,
            "seed": seed,
            "sizes": attrs.asdict(sizes),
            "rows": [attrs.asdict(r) for r in out.rows],
            "seconds": out.seconds,
            "problems": out.problems,
            "raw": out.raw,
        }
        args.json.write_bytes(orjson.dumps(payload, option=orjson.OPT_INDENT_2))
    return 1 if out.problems else 0


if __name__ == "__main__":
    sys.exit(main())
