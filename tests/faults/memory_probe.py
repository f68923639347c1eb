"""How much resident memory output-heavy runs leave behind, in a fresh process.

    python tests/faults/memory_probe.py GC_TUNING(0|1) RUNS

Prints the growth of VmRSS, in KiB, over `RUNS` runs that each print ~18 MB through the
`command` runner (after one warm-up run). A fresh process because a pytest process that
has already run other tests has free heap to absorb the growth and hides it.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agentjobs import open_engine
from agentjobs.engine import EngineConfig
from agentjobs.engine.runners import CommandRunner

MARKER_SCRIPT = Path(__file__).resolve().parent / "marker_runner.py"
OUTPUT = {"lines": 60_000, "line_bytes": 300}  # ~18 MB of stdout per run


def rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def main(gc_tuning: bool, runs: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        runner = CommandRunner(
            [sys.executable, "-I", "-S", str(MARKER_SCRIPT)],
            result="json",
            env={"MARKER_DIR": tmp},
        )
        config = EngineConfig(durability="os", gc_tuning=gc_tuning)
        async with open_engine(Path(tmp) / "data", runners={"m": runner}, config=config) as eng:
            first = await eng.submit("warm-up", config=OUTPUT)
            await eng.wait(first.id)
            baseline = rss_kib()
            for i in range(runs):
                run = await eng.submit(f"bulk {i}", config=OUTPUT)
                done = await eng.wait(run.id)
                # its JSON result line is past max_output_bytes (1 MB), so it failed;
                # the output went through the journal all the same, which is the point
                assert done.finished, done
            print(rss_kib() - baseline, flush=True)


if __name__ == "__main__":
    trio.run(main, sys.argv[1] == "1", int(sys.argv[2]))
