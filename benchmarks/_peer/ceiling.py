"""The HTTP stack's ceiling: hypercorn (trio worker) serving an app that does no work.

    .venv/bin/python benchmarks/_peer/ceiling.py [--port 0] [--app asgi|quart]

* `asgi` (the ceiling): a bare ASGI callable that reads the request body and answers
  202 with a fixed JSON body the size of a submit answer. Nothing else.
* `quart`: a `QuartTrio` app with one `POST /api/v1/runs` route doing the same, to
  split our server's cost into "hypercorn", "quart-trio on top" and "our handler + engine".

hypercorn is configured like `agentjobs serve` (programmatic `hypercorn.trio.serve`, no
access log, no Server header, keep-alive 75 s). Prints `listening on http://...` once bound
and serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

BODY = (
    b'{"job_id":"run_00000000000000000000000000000000","status":"queued",'
    b'"created_at":"2026-11-28T21:35:58.485566Z",'
    b'"poll_url":"/api/v1/runs/run_00000000000000000000000000000000",'
    b'"stream_url":"/api/v1/runs/run_00000000000000000000000000000000/stream"}'
)
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"location", b"/api/v1/runs/run_00000000000000000000000000000000"),
    (b"retry-after", b"2"),
]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    more = True
    while more:  # read the whole body, as a real handler must
        message = await receive()
        if message["type"] != "http.request":
            return
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 202, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


def quart_app() -> Any:
    from quart import Response, request
    from quart_trio import QuartTrio

    app = QuartTrio("ceiling")

    @app.post("/api/v1/runs")
    async def submit() -> Response:
        await request.get_data(cache=False, as_text=False, parse_form_data=False)
        return Response(
            BODY,
            status=202,
            content_type="application/json",
            headers={"Location": "/api/v1/runs/run_0", "Retry-After": "2"},
        )

    return app


async def main(port: int, which: str) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    errorlog = logging.getLogger("hypercorn.error")
    errorlog.setLevel(logging.WARNING)
    config.errorlog = errorlog
    config.keep_alive_timeout = 75.0
    config.include_server_header = False
    app = asgi_app if which == "asgi" else quart_app()
    stop = trio.Event()

    async def trigger() -> None:
        await stop.wait()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(
                lambda task_status: serve(
                    app,  # type: ignore[arg-type]
                    config,
                    shutdown_trigger=trigger,
                    task_status=task_status,
                )
            )
            print(f"ceiling ({which}) listening on {urls[0]}", flush=True)
            async for _ in signals:
                stop.set()
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--app", choices=["asgi", "quart"], default="asgi")
    args = parser.parse_args()
    trio.run(main, args.port, args.app)
    sys.exit(0)
