"""PraisonAI's jobs server with a no-op executor, for side-by-side measurements.

Runs in the peer's own venv (`praisonai==4.7.19 fastapi uvicorn sse-starlette`, created
by `benchmarks/compare.py`), never in ours:

    ~/.cache/agentjobs-bench/praisonai-venv/bin/python benchmarks/_peer/praisonai_server.py

The app is PraisonAI's own, built with `praisonai.jobs.server.create_app(executor=...)`
around its stock `InMemoryJobStore(max_jobs=1000)` (its default store) and a `JobExecutor`
subclass whose `_run_agent` returns at once (`"noop: <prompt>"`), so no LLM or agent file
is involved; a prompt `SLEEP:<seconds>` sleeps that long first (SSE fan-out). Everything
else (router, validation, admission cap of 10 x max_concurrent, progress callbacks, SSE)
is stock. Concurrency settings are read from the same variables as PraisonAI's own
`_build_executor` (`PRAISONAI_MAX_CONCURRENT_JOBS`, default 10).

Served by uvicorn on 127.0.0.1, one process, one worker, access log off (as ours). Prints
`listening on http://...` once bound and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from typing import Any


def build_app() -> Any:
    from praisonai.jobs.executor import JobExecutor
    from praisonai.jobs.server import create_app
    from praisonai.jobs.store import InMemoryJobStore

    class NoopExecutor(JobExecutor):  # type: ignore[misc]
        async def _run_agent(self, job: Any) -> Any:
            prompt = job.prompt or ""
            if prompt.startswith("SLEEP:"):
                await asyncio.sleep(float(prompt[6:].split()[0]))
            return f"noop: {prompt}"

    store = InMemoryJobStore(max_jobs=1000)
    executor = NoopExecutor(
        store=store,
        max_concurrent=int(os.environ.get("PRAISONAI_MAX_CONCURRENT_JOBS", "10")),
        default_timeout=int(os.environ.get("PRAISONAI_JOB_TIMEOUT", "3600")),
    )
    return create_app(store=store, executor=executor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args()
    import uvicorn

    logging.basicConfig(level=logging.WARNING)
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY on accepted sockets only when
    # sock.proto says TCP; with proto 0 every keep-alive answer waits ~40 ms for the
    # client's delayed ACK (Nagle), which is not how `uvicorn --port` serves.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(
        build_app(),
        log_level="warning",
        access_log=args.access_log,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    port = sock.getsockname()[1]
    print(f"praisonai listening on http://127.0.0.1:{port}", flush=True)
    server.run(sockets=[sock])
    sys.exit(0)


if __name__ == "__main__":
    main()
