"""Journal benchmark: group-commit throughput and ack latency, replay speed, bytes per event.

    .venv/bin/python benchmarks/journal.py [--seconds 3] [--replay-events 1000000]

* **Appends**: N concurrent appenders (1, 10, 100), each in a loop `await journal.commit(...)`
  of a `submitted` event for a fresh run, for `--seconds` per setting and durability: the
  journal alone, then (fold = yes) with the state fold as `on_commit`, as in the engine.
  Reports committed events/s, batches (= fsyncs under `fsync`), ack latency p50/p99
  (append to waiter released) and process CPU per event (the figure that does not depend
  on how busy a shared machine is). A bare write+fsync is timed first: with A appenders
  each waiting for its own commit, no writer can beat A / that latency.
* **Replay**: a journal of `--replay-events` events in realistic proportions (per run:
  submitted, started, 4 progress, output, succeeded), written through the journal itself,
  then opened (a) without a fold: checksums, decoding, events, history index; and (b) with
  the state fold, as the engine starts.
* **Compaction**: dropping half the runs of that journal.

Targets (issue 2): fsync group commit >= 50,000 events/s at 100 appenders; replay >=
300,000 events/s. Prints figures only; the tests never assert time.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import trio

from agentjobs.engine import compaction
from agentjobs.engine.journal import Journal
from agentjobs.engine.model import Event, EventType, RunSpec
from agentjobs.engine.state import State, apply, spec_to_data

E = EventType
SPEC = spec_to_data(
    RunSpec(
        prompt="Summarise the attached quarterly report in five bullet points.",
        session_id="session-0042",
        webhook_url="https://hooks.example.com/agentjobs",
        timeout=600.0,
    )
)


def raw_fsync_ms(directory: Path, size: int = 100 * 178, n: int = 200) -> tuple[float, float]:
    """p50/p90 of a bare write+fsync of one 100-event batch: the disk's own floor.

    With A appenders each waiting for its commit, no writer can beat A / this latency.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "raw.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    times = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            os.write(fd, b"x" * size)
            os.fsync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        path.unlink()
    return percentile(times, 50) * 1e3, percentile(times, 90) * 1e3


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(p / 100 * (len(values) - 1))))
    return values[k]


async def bench_appends(
    durability: str, appenders: int, seconds: float, directory: Path | None, fold: bool
) -> dict[str, float]:
    state = State()

    def on_commit(events: list[Event]) -> None:
        for e in events:
            apply(state, e)

    journal = Journal(directory, durability, on_commit if fold else None)  # type: ignore[arg-type]
    journal.open()
    latencies: list[float] = []
    stop_at = 0.0
    perf = time.perf_counter

    async def appender(i: int) -> None:
        n = 0
        while perf() < stop_at:
            n += 1
            t0 = perf()
            await journal.commit(f"run_{i}_{n}", E.SUBMITTED, SPEC)
            latencies.append(perf() - t0)

    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        start = perf()
        cpu = time.process_time()
        stop_at = start + seconds
        async with trio.open_nursery() as inner:
            for i in range(appenders):
                inner.start_soon(appender, i)
        elapsed = perf() - start
        cpu = time.process_time() - cpu
        await journal.aclose()
    return {
        "events": journal.stats_events,
        "rate": journal.stats_events / elapsed,
        "batches": journal.stats_batches,
        "fsyncs": journal.stats_fsyncs,
        "p50_ms": percentile(latencies, 50) * 1e3,
        "p99_ms": percentile(latencies, 99) * 1e3,
        "cpu_us": cpu / max(1, journal.stats_events) * 1e6,
    }


async def write_replay_journal(directory: Path, target: int) -> int:
    """Write ~`target` events through the journal (durability os, big bursts)."""
    journal = Journal(directory, "os")
    journal.open()
    written = 0
    run = 0
    out = "chunk of streamed model output, " * 3
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        while written < target:
            ticket = None
            for _ in range(500):
                run += 1
                rid = f"run_{run:012d}"
                journal.append(rid, E.SUBMITTED, SPEC)
                journal.append(rid, E.STARTED, {"attempt": 1})
                for k in range(4):
                    journal.append(
                        rid,
                        E.PROGRESS,
                        {"percentage": 25.0 * k, "step": f"step {k}", "steps_completed": k},
                    )
                journal.append(rid, E.OUTPUT, {"text": out})
                ticket = journal.append(
                    rid,
                    E.SUCCEEDED,
                    {"result": {"summary": "five bullets"}, "metrics": {"tokens": 812}},
                )
                written += 8
                if written >= target:
                    break
            assert ticket is not None
            await ticket.wait()
        await journal.aclose()
    return written


def bench_replay(directory: Path, fold: bool) -> tuple[int, float, float, int]:
    """(events, wall seconds, CPU seconds, bytes) of one `Journal.open`."""
    state = State()
    journal = Journal(directory, "fsync")
    gc.collect()
    t0, c0 = time.perf_counter(), time.process_time()
    report = journal.open((lambda e: apply(state, e)) if fold else None)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    journal.close_files()
    return report.events, elapsed, cpu, report.bytes


async def bench_compaction(directory: Path) -> compaction.CompactionReport:
    state = State()
    journal = Journal(directory, "fsync")
    journal.open(lambda e: apply(state, e))
    drop = {rid for i, rid in enumerate(state.runs) if i % 2 == 0}
    async with trio.open_nursery() as nursery:
        await nursery.start(journal.run)
        report = await journal.compact(drop)
        await journal.aclose()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per append setting")
    parser.add_argument("--replay-events", type=int, default=1_000_000)
    parser.add_argument("--dir", type=Path, default=None, help="where to put journals")
    parser.add_argument("--skip-appends", action="store_true")
    parser.add_argument(
        "--fsync-series",
        type=int,
        default=0,
        metavar="N",
        help="then N runs of fsync at 100 appenders, each after a raw fsync timing",
    )
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="agentjobs-bench-", dir=args.dir))
    load = os.getloadavg()
    print(
        f"# journal benchmark: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, "
        f"load average {load[0]:.2f} at start, journals in {base}"
    )
    try:
        p50, p90 = raw_fsync_ms(base)
        print(
            f"raw write+fsync of a 100-event batch on this disk: p50 {p50:.2f} ms, p90 "
            f"{p90:.2f} ms (so 100 waiting appenders cannot exceed {100 / p50 * 1e3:,.0f}/s)"
        )
        if not args.skip_appends:
            print()
            print(
                "| durability | appenders | fold | events/s | batches | fsyncs "
                "| ack p50 ms | ack p99 ms | CPU µs/event |"
            )
            print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
            durabilities = ("fsync", "os", "memory")
            settings = [(d, n, False) for d in durabilities for n in (1, 10, 100)]
            settings += [(d, 100, True) for d in durabilities]
            for durability, appenders, fold in settings:
                d = None if durability == "memory" else base / f"a-{durability}-{appenders}"
                r = trio.run(bench_appends, durability, appenders, args.seconds, d, fold)
                print(
                    f"| {durability} | {appenders} | {'yes' if fold else 'no'} "
                    f"| {r['rate']:,.0f} | {r['batches']:,.0f} | {r['fsyncs']:,.0f} "
                    f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us']:.1f} |",
                    flush=True,
                )
                if d is not None:
                    shutil.rmtree(d)
        if args.fsync_series:
            print()
            print(
                "| raw fsync p50 / p90 ms | events/s | batches | ack p50 / p99 ms | CPU µs/event |"
            )
            print("| --- | ---: | ---: | ---: | ---: |")
            for i in range(args.fsync_series):
                p50, p90 = raw_fsync_ms(base)
                d = base / f"series-{i}"
                r = trio.run(bench_appends, "fsync", 100, args.seconds, d, False)
                print(
                    f"| {p50:.2f} / {p90:.2f} | {r['rate']:,.0f} | {r['batches']:,.0f} "
                    f"| {r['p50_ms']:.2f} / {r['p99_ms']:.2f} | {r['cpu_us']:.1f} |",
                    flush=True,
                )
                shutil.rmtree(d)
        if args.replay_events <= 0:
            return
        rdir = base / "replay"
        t0 = time.perf_counter()
        n = trio.run(write_replay_journal, rdir, args.replay_events)
        wrote = time.perf_counter() - t0
        print()
        print(f"wrote {n:,} events in {wrote:.1f}s ({n / wrote:,.0f}/s, os durability, bursts)")
        print()
        print(
            "| replay (best of 3) | events | wall s | events/s | CPU s | events/CPU-s "
            "| bytes/event |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for fold in (False, True):
            runs = [bench_replay(rdir, fold) for _ in range(3)]
            events, secs, cpu, nbytes = min(runs, key=lambda r: r[1])
            label = "journal + state fold" if fold else "journal (checksums, events, index)"
            print(
                f"| {label} | {events:,} | {secs:.2f} | {events / secs:,.0f} | {cpu:.2f}"
                f" | {events / cpu:,.0f} | {nbytes / events:.0f} |",
                flush=True,
            )
        report = trio.run(bench_compaction, rdir)
        print()
        print(f"compaction (drop half the runs): {report.summary()}")
        print(f"load average at end: {os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
