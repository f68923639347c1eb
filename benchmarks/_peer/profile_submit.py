"""Profile `agentjobs serve` under the submit load: where does a request's CPU go?

    .venv/bin/pip install py-spy          # profiling only, never a dependency
    .venv/bin/python benchmarks/_peer/profile_submit.py [--durability fsync] [--seconds 20]
        [--connections 16] [--out /tmp/agentjobs-profile]

Starts our server (echo runner) on 127.0.0.1, drives `POST /api/v1/runs` with wrk (or the
Python generator) and samples it with py-spy (`record --format raw --gil`, 100 Hz, pausing the
process for each sample so stacks are whole: only
the thread holding the GIL, so the samples are Python CPU, not threads waiting on a disk). Prints:

* the share of samples per *layer* of the leaf frame (h11, hypercorn, quart/werkzeug, trio,
  our http layer, engine, journal, cattrs, logging, ...): CPU attributed to the code that
  was running;
* the inclusive share of named steps of the hot path (parse_submit, make_spec, submit_spec,
  the journal writer's fold, the runs' actors, quart's dispatch, ...);
* the top self-time functions.

The collapsed stacks are kept in `--out` (flamegraph.pl or speedscope can read them).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _peer import loadgen, servers

LAYERS: list[tuple[str, str]] = [
    ("h11/", "h11 (HTTP parsing/encoding)"),
    ("hypercorn/", "hypercorn"),
    ("quart/", "quart"),
    ("quart_trio/", "quart"),
    ("werkzeug/", "werkzeug (headers, routing)"),
    ("flask/", "quart"),
    ("blinker/", "quart"),
    ("trio/", "trio (scheduler, sockets, threads)"),
    ("outcome/", "trio (scheduler, sockets, threads)"),
    ("agentjobs/http/", "agentjobs http layer"),
    ("agentjobs/engine/journal.py", "agentjobs journal"),
    ("agentjobs/engine/runners/", "agentjobs runners (echo)"),
    ("agentjobs/engine/", "agentjobs engine"),
    ("cattrs", "cattrs (validation)"),
    ("attr/", "attrs"),
    ("attrs/", "attrs"),
    ("logging/", "logging"),
    ("json/", "stdlib json"),
    ("asyncio/", "asyncio"),
    ("contextvars", "contextvars"),
]

STEPS: list[tuple[str, str]] = [
    ("hypercorn: whole connection handling", r"hypercorn/"),
    ("quart: handle_request (everything under the app)", r"handle_request \(quart"),
    ("quart: full_dispatch_request", r"full_dispatch_request"),
    ("quart: before_request hooks (authenticate)", r"authenticate \(.*agentjobs/http/app"),
    ("quart: make_response / finalize", r"finalize_request|make_response"),
    ("RequestGuard (agentjobs/http/limits.py)", r"__call__ \(.*agentjobs/http/limits"),
    ("our submit handler (all of it)", r"submit \(.*agentjobs/http/app"),
    ("  parse_submit (orjson + cattrs + checks)", r"parse_submit"),
    ("  request.get_data", r"get_data"),
    ("  engine.make_spec", r"make_spec"),
    ("  engine.submit_spec (incl. waiting for commit)", r"submit_spec"),
    ("  submit_view + orjson.dumps", r"submit_view|_json \(.*agentjobs/http/app"),
    ("journal.append (encode, crc)", r"append \(.*journal"),
    ("journal writer: _commit_batch", r"_commit_batch"),
    ("engine._on_commit (state fold, bus)", r"_on_commit"),
    ("supervisor (start runs)", r"agentjobs/engine/supervisor"),
    ("actors (run execution, terminal commit)", r"agentjobs/engine/actor"),
    ("echo runner", r"agentjobs/engine/runners/echo"),
    ("logging", r"logging/"),
    ("trio.to_thread (fsync hop)", r"to_thread|run_sync"),
]

# Exclusive attribution: walk each sample's stack from the leaf up; the first frame that
# matches one of these patterns names the phase (so trio/stdlib frames count for whoever
# called them). Samples with no match at all are trio's scheduler itself.
PHASES: list[tuple[str, str]] = [
    ("runs: actors + echo runner (execution)", r"agentjobs/engine/(actor|runners)"),
    ("runs: supervisor (starting them)", r"agentjobs/engine/supervisor"),
    ("engine: fold into state, bus (_on_commit)", r"_on_commit|agentjobs/engine/(state|bus)"),
    ("engine: journal writer, fsync hop", r"agentjobs/engine/journal|to_thread_run_sync"),
    ("handler: parse_submit (orjson + cattrs)", r"parse_submit|agentjobs/http/schemas"),
    ("handler: engine.make_spec", r"make_spec"),
    ("handler: engine.submit_spec (+ journal.append)", r"submit_spec"),
    ("handler: submit_view + orjson + Response", r"submit_view|agentjobs/http/views|_json \("),
    ("handler: quart request.get_data", r"get_data"),
    ("handler: rest of submit()", r"submit \(.*agentjobs/http/app"),
    ("quart: before_request (auth hook)", r"authenticate|preprocess_request"),
    (
        "quart: dispatch, routing, response",
        r"full_dispatch_request|dispatch_request|make_response|finalize_request|werkzeug/",
    ),
    ("quart: request task, contexts, ASGI glue", r"quart_trio/|quart/"),
    ("RequestGuard (agentjobs/http/limits.py)", r"agentjobs/http/limits"),
    ("hypercorn: HTTP/1.1 stream + h11", r"hypercorn/protocol|h11/"),
    ("hypercorn: TCP server, task group, sockets", r"hypercorn/|_run_handler"),
]


def phase_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, pattern in _PHASE_RX:
            if pattern.search(frame):
                return name
    return "trio: scheduler, I/O wait bookkeeping"


_PHASE_RX = [(name, re.compile(p)) for name, p in PHASES]

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def layer_of(frame: str) -> str:
    m = _FRAME.match(frame)
    path = m.group("file") if m else frame
    for needle, name in LAYERS:
        if needle in path:
            return name
    if "site-packages" not in path and "/lib/python3" in path:
        return "stdlib (other)"
    if m and m.group("file").startswith("<"):
        return "generated code (attrs/cattrs)"
    return "other"


def analyse(raw: Path, top: int = 30) -> str:
    stacks: list[tuple[list[str], int]] = []
    for line in raw.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        stacks.append((frames, n))
    total = sum(n for _, n in stacks) or 1
    layers: collections.Counter[str] = collections.Counter()
    selfs: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        if not frames:
            continue
        leaf = frames[-1]
        layers[layer_of(leaf)] += n
        selfs[leaf] += n
    phases: collections.Counter[str] = collections.Counter()
    for frames, n in stacks:
        phases[phase_of(frames)] += n
    steps = []
    for label, pattern in STEPS:
        rx = re.compile(pattern)
        hit = sum(n for frames, n in stacks if any(rx.search(f) for f in frames))
        steps.append((label, hit))
    out = [f"{total} samples (GIL holder)", "", "| layer (leaf frame) | share |"]
    out.append("| --- | ---: |")
    for name, n in layers.most_common():
        out.append(f"| {name} | {100 * n / total:.1f}% |")
    out += ["", "| phase (exclusive, sums to 100%) | share |", "| --- | ---: |"]
    for name, n in phases.most_common():
        out.append(f"| {name} | {100 * n / total:.1f}% |")
    out += ["", "| step (inclusive) | share |", "| --- | ---: |"]
    for label, n in steps:
        out.append(f"| {label} | {100 * n / total:.1f}% |")
    out += ["", f"| top {top} self-time frames | share |", "| --- | ---: |"]
    for frame, n in selfs.most_common(top):
        short = re.sub(r"/[^ ]*/site-packages/", "", frame)
        short = re.sub(r"/[^ ]*/(agentjobs/)", r"\1", short)
        short = re.sub(r"/[^ ]*/lib/python3\.\d+/", "", short)
        out.append(f"| `{short}` | {100 * n / total:.1f}% |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--durability", default="fsync", choices=["fsync", "os", "memory"])
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rate", type=int, default=100)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "agentjobs-profile")
    p.add_argument("--analyse", type=Path, help="only analyse this raw file")
    p.add_argument("--extra", default="", help="extra `agentjobs serve` arguments")
    p.add_argument(
        "--load",
        choices=["submit", "fanout"],
        default="submit",
        help="submit: POST load (wrk); fanout: rounds of 500 SSE subscribers on 10 runs of 2 s",
    )
    a = p.parse_args()
    if a.analyse:
        print(analyse(a.analyse))
        return
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        raise SystemExit("py-spy not found: .venv/bin/pip install py-spy (profiling only)")
    a.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="agentjobs-profile-"))
    argv = servers.ours_argv(a.durability, work / "data", 10) + a.extra.split()
    server = servers.Server("profiled", "agentjobs", "ours", argv)
    server.start(work)
    raw = a.out / f"{a.load}-{a.durability}-c{a.connections}.txt"
    try:
        wrk = loadgen.find_wrk()
        gen = (lambda s: loadgen.run_wrk(wrk, server.url, 4, s)) if wrk else None
        if gen is not None:
            gen(2)  # warm up
        server.settle(30)
        spy_proc = subprocess.Popen(
            [
                spy,
                "record",
                "-p",
                str(server.pid),
                "-r",
                str(a.rate),
                "-d",
                str(a.seconds + 1),
                "--format",
                "raw",
                "-o",
                str(raw),
                "--gil",  # only the thread holding the GIL: CPU, not a worker waiting on fsync
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(0.5)
        cpu0 = server.cpu_seconds()
        if a.load == "fanout":
            import compare
            import trio

            end = time.monotonic() + a.seconds
            rounds = []
            while time.monotonic() < end and len(rounds) < 20:
                rounds.append(trio.run(compare._fanout, server, 10, 500, 2.0, 50))
            res = None
        elif wrk:
            res = loadgen.run_wrk(wrk, server.url, a.connections, a.seconds)
        else:
            res = loadgen.run_pygen(server.url, a.connections, a.seconds)
        cpu = server.cpu_seconds() - cpu0
        _, err = spy_proc.communicate(timeout=a.seconds + 60)
        if spy_proc.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.decode(errors='replace')[-800:]}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if res is None:
        streams = sum(r["subscribers"] for r in rounds)
        connect = [round(r["all_connected_s"], 2) for r in rounds]
        print(
            f"# profile: agentjobs serve --durability {a.durability}, SSE fan-out, "
            f"{len(rounds)} rounds of 500 subscribers; all connected after {connect} s; "
            f"server CPU {1e6 * cpu / max(1, streams):,.0f} µs/stream; "
            f"load {os.getloadavg()[0]:.2f}"
        )
    else:
        print(
            f"# profile: agentjobs serve --durability {a.durability}, {a.connections} "
            f"connections, {a.seconds} s; {res.accepted_per_s:,.0f} accepted/s, server CPU "
            f"{1e6 * cpu / max(1, res.requests):,.0f} µs/request; load {os.getloadavg()[0]:.2f}"
        )
    print(f"raw stacks: {raw}")
    print()
    print(analyse(raw))


if __name__ == "__main__":
    main()
