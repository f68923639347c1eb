"""A `command` runner script that records when each attempt of a run starts and stops.

Started by the server once per attempt (argv, prompt on stdin). It appends lines to
``$MARKER_DIR/<run id>.<attempt>.<pid>``::

    start <monotonic ns>
    stop <monotonic ns> <why>       why: done | term (SIGTERM: cancelled) | orphan | failed

CLOCK_MONOTONIC is system-wide on Linux, so the lines of different processes compare: the
crash harness proves that no two attempts of one run were alive at the same time.

Behaviour per run, from its config (``AGENTJOBS_CONFIG``, JSON):

- ``sleep_s`` (default 0.2): how long the "work" takes; a line of output every ``tick_s``
  (default 0.1) while it lasts, so streams have something to carry;
- ``lines`` / ``line_bytes``: print that many lines of that size at once (bulk output for
  the memory tests), then finish;
- ``fail``: exit 1 (a failed run).

Why it watches its parent: the server starts it in a new session, so a `kill -9` of the
server does not reach it. With ``MARKER_ORPHAN=exit`` (the harness' default) it notices
the server died (its parent pid changed, or its stdout pipe broke), writes
``stop ... orphan`` and exits, as a well-behaved agent would; with ``MARKER_ORPHAN=stay``
it goes on working like an agent that does not notice, which is what a restarted server
must cope with: it stops the attempt (SIGTERM, so the file ends ``stop ... term``) before
it starts the run again (see
tests/test_faults_crash.py::test_an_orphaned_attempt_is_stopped_before_the_run_starts_again).

The result (stdout's last line, JSON) repeats what the run was given, so the harness can
check that the spec a runner saw is the spec the client submitted.

Standard library only, started with ``python -I -S`` for a fast start.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any


def main() -> int:
    run = os.environ.get("AGENTJOBS_RUN_ID", "unknown")
    attempt = os.environ.get("AGENTJOBS_ATTEMPT", "0")
    session = os.environ.get("AGENTJOBS_SESSION_ID")
    config: dict[str, Any] = json.loads(os.environ.get("AGENTJOBS_CONFIG") or "{}")
    marker_dir = os.environ["MARKER_DIR"]
    stay = os.environ.get("MARKER_ORPHAN", "exit") == "stay"
    parent = os.getppid()
    path = os.path.join(marker_dir, f"{run}.{attempt}.{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def mark(text: str) -> None:
        os.write(fd, f"{text}\n".encode())

    def stop(why: str, code: int) -> None:
        mark(f"stop {time.monotonic_ns()} {why}")
        os._exit(code)

    signal.signal(signal.SIGTERM, lambda signum, frame: stop("term", 143))
    mark(f"start {time.monotonic_ns()}")
    prompt = sys.stdin.read()

    def say(text: str) -> None:
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            if not stay:
                stop("orphan", 0)

    lines = int(config.get("lines", 0))
    if lines:
        chunk = "x" * max(1, int(config.get("line_bytes", 100)))
        for i in range(lines):
            say(f"{i} {chunk}")
    else:
        sleep_s = float(config.get("sleep_s", 0.2))
        tick_s = float(config.get("tick_s", 0.1))
        deadline = time.monotonic() + sleep_s
        next_tick = time.monotonic()
        n = 0
        while (now := time.monotonic()) < deadline:
            if not stay and os.getppid() != parent:
                stop("orphan", 0)
            if now >= next_tick:
                say(f"tick {n}")
                n += 1
                next_tick += tick_s
            time.sleep(min(0.01, max(0.0, deadline - now)))
    if config.get("fail"):
        stop("failed", 1)
    result = {"run": run, "attempt": int(attempt), "prompt": prompt, "config": config}
    result["session_id"] = session
    say(json.dumps(result))
    mark(f"stop {time.monotonic_ns()} done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
