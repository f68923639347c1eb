"""What a stream's catch-up costs: from the bus's in-memory tail of a live run against a
journal read in a worker thread (what every new SSE stream paid before, in fsync mode).

    .venv/bin/python benchmarks/history_catchup.py [--events 20] [--streams 2000]

An in-process engine (fsync durability) runs one run that writes `--events` output
events, then waits; `--streams` subscribers join it from the start one after another and
read until they are caught up. Printed: CPU and wall time per catch-up, tail on and off
(interleaved, two rounds each), and the bus's figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentjobs import RunContext
from agentjobs.engine import open_engine


class Gated:
    def __init__(self, events: int) -> None:
        self.events = events
        self.gate = trio.Event()
        self.ready = trio.Event()

    async def run(self, ctx: RunContext) -> str:
        for i in range(self.events):
            ctx.output(f"line {i}\n")
            await trio.sleep(0.06)  # one output event each (the actor coalesces 50 ms)
        self.ready.set()
        await self.gate.wait()
        return "ok"


async def measure(tail_events: int, events: int, streams: int) -> None:
    runner = Gated(events)
    with tempfile.TemporaryDirectory() as d:
        async with open_engine(
            d, runners={"g": runner}, default_runner="g", durability="fsync"
        ) as engine:
            engine.bus.tail_events = tail_events
            run = await engine.submit("x")
            await runner.ready.wait()
            await trio.sleep(0.2)
            last = engine.get(run.id).last_seq
            cpu0, wall0 = time.process_time(), time.perf_counter()
            for _ in range(streams):
                follow = engine.subscribe(run.id, 0)
                async for ev in follow:
                    if ev.seq >= last:
                        break
                await follow.aclose()  # type: ignore[attr-defined]
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            print(
                f"| tail {'on ' if tail_events else 'off'} | {last} | {cpu / streams * 1e6:,.0f}"
                f" | {wall / streams * 1e6:,.0f} | {engine.bus.stats()} |"
            )
            runner.gate.set()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--events", type=int, default=20)
    p.add_argument("--streams", type=int, default=2000)
    a = p.parse_args()
    print("| catch-up | events | µs CPU each | µs wall each | bus |")
    print("| --- | ---: | ---: | ---: | --- |")
    for tail in (256, 0, 256, 0):
        trio.run(measure, tail, a.events, a.streams)


if __name__ == "__main__":
    main()
