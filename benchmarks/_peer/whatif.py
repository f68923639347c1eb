"""`agentjobs serve` with proposed optimisations patched in at start-up: a measuring tool
for docs/benchmarks.md "Optimisation notes", NOT product code (nothing under agentjobs/ is
changed; the lead applies what is worth it there).

    .venv/bin/python benchmarks/_peer/whatif.py [--backlog N] [--switch-interval S]
        [--fast-submit] -- serve ARGS...

* `--backlog N`: hypercorn's listen backlog (its default is 100; uvicorn's is 2048). With
  100, a burst of connections overflows the accept queue and the kernel drops SYNs: those
  clients wait 1 s, then 3 s, for the retransmission.
* `--switch-interval S`: `sys.setswitchinterval(S)` (CPython's default is 0.005). The
  journal's fsync runs in a worker thread; under load the event loop rarely blocks, so
  the worker waits up to a whole switch interval for the GIL before it can call fsync,
  and the waiting submits with it.
* `--fast-submit`: `POST /api/v1/runs` answered by a plain ASGI callable in front of quart
  (the same parse_submit -> make_spec -> submit_spec -> submit_view calls and the same
  problem documents on errors), so the request skips quart-trio's per-request nursery,
  tasks, contexts, routing and Response objects, and the RequestGuard's deferral. Only
  taken when no API keys, quotas or CORS are configured (else quart handles it as today).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

Message = MutableMapping[str, Any]
JSON_CT = b"application/json"


def _header(scope: MutableMapping[str, Any], name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k.lower() == name:
            return bytes(v)
    return None


def install_fast_submit() -> None:
    import agentjobs.http.server as srv
    from agentjobs.engine import EngineError
    from agentjobs.engine.ssrf import UnsafeWebhookURL
    from agentjobs.http.app import state_of
    from agentjobs.http.errors import (
        PROBLEM_CONTENT_TYPE,
        FieldError,
        Problem,
        from_engine_error,
        validation,
    )
    from agentjobs.http.schemas import parse_submit
    from agentjobs.http.views import submit_view

    original = srv.create_app

    def create_app(engine: Any, settings: Any, *, outbox: Any = None) -> Any:
        app = original(engine, settings, outbox=outbox)
        state = state_of(app)
        enabled = (
            not state.keyring.enabled
            and state.cors is None
            and state.submit_rate is None
            and state.active_runs is None
        )
        if not enabled:
            return app
        inner: Callable[..., Awaitable[None]] = app.asgi_app
        limit = settings.max_body_bytes
        urls = state.urls
        path_ok = ("/api/v1/runs", "/api/v1/runs/")

        async def send_json(send: Any, status: int, body: bytes, headers: list[Any]) -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [*headers, (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body, "more_body": False})

        async def fast(scope: Message, receive: Any, send: Any) -> None:
            if (
                scope["type"] != "http"
                or scope["method"] != "POST"
                or scope["path"] not in path_ok
                or (_header(scope, b"content-type") or b"").split(b";")[0].strip() != JSON_CT
            ):
                await inner(scope, receive, send)
                return
            declared = _header(scope, b"content-length")
            if declared is None or not declared.isdigit() or int(declared) > limit:
                await inner(scope, receive, send)  # chunked or too large: the usual path
                return
            chunks = []
            more = True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            raw = b"".join(chunks)
            key = _header(scope, b"idempotency-key")
            try:
                parsed = parse_submit(raw, key.decode("latin-1") if key is not None else None)
                body = parsed.body
                if body.webhook_url is not None and outbox is not None:
                    try:
                        await outbox.check(body.webhook_url)
                    except UnsafeWebhookURL as exc:
                        raise validation([FieldError("webhook_url", exc.reason)]) from None
                spec = engine.make_spec(
                    body.prompt,
                    config=body.config,
                    session_id=body.session_id,
                    priority=body.priority or 0,
                    timeout=body.timeout,
                    max_attempts=body.max_attempts,
                    runner=body.runner,
                    webhook_url=body.webhook_url,
                    idempotency_key=parsed.idempotency_key,
                    request_hash=parsed.request_hash,
                    tenant=None,
                    ttl=body.ttl,
                )
                run, replayed = await engine.submit_spec(spec)
            except (Problem, EngineError) as exc:
                problem = exc if isinstance(exc, Problem) else from_engine_error(exc)
                headers = [
                    (k.lower().encode(), str(v).encode()) for k, v in problem.headers.items()
                ]
                await send_json(
                    send,
                    problem.status,
                    orjson.dumps(problem.body(scope["path"])),
                    [(b"content-type", PROBLEM_CONTENT_TYPE.encode()), *headers],
                )
                return
            headers = [
                (b"content-type", JSON_CT),
                (b"location", urls.run(run.id).encode()),
                (b"retry-after", b"2"),
            ]
            if replayed:
                headers.append((b"idempotent-replayed", b"true"))
            await send_json(send, 202, orjson.dumps(submit_view(run, urls)), headers)

        app.asgi_app = fast
        return app

    srv.create_app = create_app


def install_backlog(backlog: int) -> None:
    import agentjobs.http.server as srv

    original = srv._hypercorn_config

    def config(settings: Any) -> Any:
        c = original(settings)
        c.backlog = backlog
        return c

    srv._hypercorn_config = config


def main() -> int:
    argv = sys.argv[1:]
    if "--" not in argv:
        raise SystemExit(
            "usage: whatif.py [--backlog N] [--switch-interval S] [--fast-submit] -- serve ARGS..."
        )
    split = argv.index("--")
    opts, rest = argv[:split], argv[split + 1 :]
    if "--fast-submit" in opts:
        install_fast_submit()
    if "--backlog" in opts:
        install_backlog(int(opts[opts.index("--backlog") + 1]))
    if "--switch-interval" in opts:
        sys.setswitchinterval(float(opts[opts.index("--switch-interval") + 1]))
    from agentjobs.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    sys.exit(main())
