"""The "engine alone" row: calls benchmarks/engine.py and benchmarks/journal.py (owned by
the engine work; imported, never copied) and prints one JSON line.

    .venv/bin/python benchmarks/_peer/engine_alone.py [--runs 50000] [--replay-events 500000]

* runs/s: `engine.throughput(runs, submitters=512, concurrency=512)`: no-op `echo` runs
  through the whole lifecycle (submitted, started, succeeded) with `durability=fsync`.
* replay events/s: `journal.write_replay_journal` then `journal.bench_replay(fold=True)`
  (best of 3): journal open with checksums, decoding and the state fold, as at start-up.

If those functions are not there (the files changed), falls back to running
`benchmarks/engine.py throughput` as a subprocess and parsing its `throughput:` line.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH.parent))


def _load(name: str) -> Any:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def engine_throughput(runs: int) -> dict[str, Any]:
    import trio

    try:
        mod = _load("engine")
        result: dict[str, Any] = trio.run(mod.throughput, runs, 512, 512)
        result["how"] = "benchmarks/engine.py throughput() (imported)"
        return result
    except (AttributeError, TypeError, ImportError) as exc:
        out = subprocess.run(
            [sys.executable, str(BENCH / "engine.py"), "throughput", "--runs", str(runs)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        for line in out.stdout.splitlines():
            if line.startswith("throughput:"):
                result = ast.literal_eval(line.split(":", 1)[1].strip())
                result["how"] = f"benchmarks/engine.py subprocess (import failed: {exc})"
                return result
        raise RuntimeError(f"engine benchmark gave no result: {out.stderr[-500:]}") from exc


def replay(events: int) -> dict[str, Any]:
    import trio

    mod = _load("journal")
    base = Path(tempfile.mkdtemp(prefix="agentjobs-compare-replay-"))
    try:
        directory = base / "replay"
        written = trio.run(mod.write_replay_journal, directory, events)
        best = None
        for _ in range(3):
            n, secs, cpu, nbytes = mod.bench_replay(directory, True)
            if best is None or secs < best[1]:
                best = (n, secs, cpu, nbytes)
        assert best is not None
        n, secs, cpu, nbytes = best
        return {
            "events": n,
            "written": written,
            "seconds": round(secs, 3),
            "events_per_s": round(n / secs),
            "events_per_cpu_s": round(n / cpu) if cpu else None,
            "bytes_per_event": round(nbytes / n) if n else None,
            "how": "benchmarks/journal.py bench_replay(fold=True), best of 3",
        }
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50_000)
    parser.add_argument("--replay-events", type=int, default=500_000)
    args = parser.parse_args()
    out: dict[str, Any] = {"throughput": engine_throughput(args.runs)}
    try:
        out["replay"] = replay(args.replay_events)
    except (AttributeError, TypeError, ImportError) as exc:
        out["replay"] = {"error": f"benchmarks/journal.py not usable: {exc}"}
    print("ENGINE_RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
