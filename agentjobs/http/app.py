"""The quart-trio application: routes that translate HTTP into `Engine` calls and back.

Handlers are thin on purpose: parse and validate (schemas.py), call one engine method,
render (views.py). Engine errors become problem documents in one place (errors.py), so a
handler never builds an error body itself.

Tenancy: every engine call passes `tenant=current_tenant()`. Today that is always None
(one tenant); API keys will map to tenants by changing that one function.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import attrs
import orjson
import trio
from quart import Quart, Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .. import __version__
from ..engine import Engine, EngineError, InvalidRequest, NotFinished, Status
from ..engine.outbox import Outbox, delivery_history
from ..engine.ssrf import UnsafeWebhookURL
from . import prometheus
from .errors import FieldError, Problem, from_engine_error, problem_response, validation
from .limits import RequestGuard
from .openapi import spec_bytes
from .schemas import IDEMPOTENCY_HEADER, int_param, parse_list_query, parse_submit, parse_wait
from .settings import ServerSettings
from .sse import EventStreamBody, FrameBuilder, StreamHub, parse_resume
from .views import RUNS_PATH, Urls, result_view, retry_after, status_view, submit_view

__all__ = ["AppState", "create_app", "current_tenant", "state_of"]

log = logging.getLogger("agentjobs.http")

_STATUSES = tuple(s.value for s in Status)
_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_EXTENSION_KEY = "agentjobs"
MAX_EVENTS_PAGE = 1000


def current_tenant() -> str | None:
    """The tenant the current request acts for. One tenant (None) until API keys exist."""
    return None


@attrs.define(slots=True, eq=False)
class AppState:
    """What the handlers share: the engine, the settings, and the stream bookkeeping."""

    engine: Engine
    settings: ServerSettings
    hub: StreamHub
    urls: Urls
    outbox: Outbox | None = None
    started: float = attrs.Factory(time.time)


def state_of(app: Quart) -> AppState:
    state: AppState = app.extensions[_EXTENSION_KEY]
    return state


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, content_type=_JSON)


def _is_json(mimetype: str) -> bool:
    return mimetype == _JSON or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def create_app(
    engine: Engine, settings: ServerSettings | None = None, *, outbox: Outbox | None = None
) -> QuartTrio:
    """Build the app around a running engine (from `open_engine`).

    With an `outbox` (whose `run` the caller starts), submitted webhook URLs are screened
    against its SSRF policy and deliveries can be redelivered; without one, webhook URLs
    are only checked for shape and are delivered by whatever outbox the embedder runs.
    """
    settings = settings or ServerSettings()
    app = QuartTrio("agentjobs")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    # Long-polls wait up to max_wait; streams switch the timeout off for themselves.
    app.config["RESPONSE_TIMEOUT"] = max(60.0, settings.max_wait + settings.cancel_wait + 30.0)
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    guard = RequestGuard(cast(Any, app.asgi_app), settings.max_body_bytes)
    app.asgi_app = guard  # type: ignore[method-assign, assignment]
    state = AppState(engine, settings, StreamHub(), Urls(settings.public_url or ""), outbox)
    app.extensions[_EXTENSION_KEY] = state
    hub = state.hub
    urls = state.urls

    def now() -> float:
        return engine.wall()

    # -- errors ---------------------------------------------------------------------------

    @app.errorhandler(Problem)
    async def on_problem(exc: Problem) -> Response:
        return problem_response(exc, request.path)

    @app.errorhandler(EngineError)
    async def on_engine_error(exc: EngineError) -> Response:
        return problem_response(from_engine_error(exc), request.path)

    @app.errorhandler(HTTPException)
    async def on_http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 404:
            problem = Problem("route-not-found", f"no endpoint at {request.path}")
        elif code == 405:
            allowed: list[str] = sorted(getattr(exc, "valid_methods", None) or ())
            problem = Problem(
                "method-not-allowed",
                f"{request.method} is not allowed on {request.path}",
                headers={"Allow": ", ".join(allowed)} if allowed else None,
            )
        elif code == 413:
            problem = _too_large()
        elif 400 <= code < 500:
            problem = Problem("bad-request", exc.description or "bad request", status=code)
        else:
            problem = Problem("internal-error", exc.description or "internal error", status=code)
        return problem_response(problem, request.path)

    @app.errorhandler(Exception)
    async def on_unexpected(exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.path)
        problem = Problem(
            "internal-error", f"unexpected {type(exc).__name__}; the server log has details"
        )
        return problem_response(problem, request.path)

    def _too_large() -> Problem:
        return Problem(
            "payload-too-large",
            f"the request body is over the limit of {settings.max_body_bytes} bytes",
        )

    # -- runs -----------------------------------------------------------------------------

    async def submit() -> Response:
        if not _is_json(request.mimetype):
            got = request.content_type or "none"
            raise Problem(
                "unsupported-media-type",
                f"send the body as JSON with Content-Type: application/json (got {got})",
            )
        try:
            raw = await request.get_data(cache=False, as_text=False, parse_form_data=False)
        except RequestEntityTooLarge:
            raise _too_large() from None
        parsed = parse_submit(raw, request.headers.get(IDEMPOTENCY_HEADER))
        body = parsed.body
        if body.webhook_url is not None and outbox is not None:
            try:  # resolves the host (asynchronously): where would the delivery go?
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
            tenant=current_tenant(),
            ttl=body.ttl,
        )
        run, replayed = await engine.submit_spec(spec)
        headers = {"Location": urls.run(run.id), "Retry-After": "2"}
        if replayed:
            headers["Idempotent-Replayed"] = "true"
        return _json(submit_view(run, urls), 202, headers)

    async def list_runs() -> Response:
        q = parse_list_query(request.args, _STATUSES)
        tenant = current_tenant()
        try:
            page = engine.list(
                status=q.status,
                session_id=q.session_id,
                tenant=tenant,
                limit=q.limit,
                cursor=q.cursor,
                offset=q.offset,
            )
        except InvalidRequest as exc:
            raise Problem("invalid-parameter", f"{exc.field}: {exc.message}") from None
        total = engine.count(status=q.status, session_id=q.session_id, tenant=tenant)
        t = now()
        default = engine.default_runner
        return _json(
            {
                "jobs": [status_view(r, t, default) for r in page.runs],
                "total": total,
                "page": q.page,
                "page_size": q.limit,
                "next_cursor": page.next_cursor,
            }
        )

    for path in (RUNS_PATH, RUNS_PATH + "/"):
        app.add_url_rule(path, "submit" + path, submit, methods=["POST"])
        app.add_url_rule(path, "list" + path, list_runs, methods=["GET"])

    @app.get(RUNS_PATH + "/<run_id>")
    async def get_run(run_id: str) -> Response:
        run = engine.get(run_id, tenant=current_tenant())
        return _json(status_view(run, now(), engine.default_runner))

    @app.get(RUNS_PATH + "/<run_id>/result")
    async def get_result(run_id: str) -> Response:
        tenant = current_tenant()
        wait = parse_wait(request.args.get("wait"), settings.max_wait)
        run = engine.get(run_id, tenant=tenant)
        if not run.finished and wait > 0 and not hub.shutting_down.is_set():
            scope = trio.CancelScope()
            hub.add_poll(scope)  # cancelled on shutdown: answer now rather than hang
            try:
                with scope:
                    await engine.wait(run_id, wait, tenant=tenant)
            finally:
                hub.remove_poll(scope)
            run = engine.get(run_id, tenant=tenant)
        if not run.finished:
            problem = from_engine_error(NotFinished(run_id, run.status.value))
            problem.headers["Retry-After"] = str(retry_after(run, now()) or 2)
            raise problem
        return _json(result_view(run))

    @app.get(RUNS_PATH + "/<run_id>/stream")
    async def stream(run_id: str) -> Response:
        tenant = current_tenant()
        resume = parse_resume(request.headers.get("Last-Event-ID"), request.args.get("after"))
        run = engine.get(run_id, tenant=tenant)
        if hub.shutting_down.is_set():
            raise Problem(
                "shutting-down", "the server is shutting down", headers={"Retry-After": "5"}
            )
        end = run.terminal_seq
        if end is not None and (resume.seq > end or (resume.seq == end and resume.part is None)):
            # Everything was seen: 204 tells EventSource to stop reconnecting.
            return Response(b"", status=204)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        if request.method == "HEAD":  # quart would iterate the body until the run ends
            return Response(b"", status=200, content_type=_SSE, headers=headers)
        body = EventStreamBody(
            job_id=run_id,
            events=engine.subscribe(run_id, 0, tenant=tenant),
            resume=resume,
            hub=hub,
            nursery=app.nursery,
            heartbeat_s=settings.sse_heartbeat,
        )
        response = Response(body, status=200, content_type=_SSE, headers=headers)
        response.timeout = None
        return response

    @app.get(RUNS_PATH + "/<run_id>/events")
    async def events(run_id: str) -> Response:
        tenant = current_tenant()
        resume = parse_resume(None, request.args.get("after"))
        limit = int_param(request.args, "limit", 1, MAX_EVENTS_PAGE) or 100
        run = engine.get(run_id, tenant=tenant)
        history = await engine.events(run_id, 0, tenant=tenant)
        builder = FrameBuilder(run_id)
        items: list[dict[str, Any]] = []
        more = False
        for ev in history:
            frames = builder.frames(ev)
            n = len(frames)
            for i, (name, data) in enumerate(frames, start=1):
                last = i == n
                if resume.seen(ev.seq, i, last):
                    continue
                if len(items) == limit:
                    more = True
                    break
                items.append(
                    {"id": str(ev.seq) if last else f"{ev.seq}.{i}", "event": name, "data": data}
                )
            if more:
                break
        next_after = items[-1]["id"] if items else (request.args.get("after") or "0")
        return _json(
            {
                "job_id": run_id,
                "status": run.status.value,
                "events": items,
                "next_after": next_after,
                "more": more,
                "finished": run.finished and not more,
            }
        )

    @app.get(RUNS_PATH + "/<run_id>/webhooks")
    async def webhook_history(run_id: str) -> Response:
        history = await delivery_history(engine, run_id, tenant=current_tenant())
        return _json(history.to_json())

    @app.post(RUNS_PATH + "/<run_id>/webhooks/redeliver")
    async def webhook_redeliver(run_id: str) -> Response:
        if outbox is None:
            raise Problem("route-not-found", "webhook delivery is not enabled in this server")
        history = await outbox.redeliver(run_id, tenant=current_tenant())
        return _json(history.to_json())

    @app.post(RUNS_PATH + "/<run_id>/cancel")
    async def cancel(run_id: str) -> Response:
        run = await engine.cancel(run_id, tenant=current_tenant())
        code = 200 if run.status is Status.CANCELLED else 202
        return _json(status_view(run, now(), engine.default_runner), code)

    @app.delete(RUNS_PATH + "/<run_id>")
    async def delete(run_id: str) -> Response:
        await engine.delete(run_id, tenant=current_tenant())
        return Response(b"", status=204)

    # -- service endpoints ----------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        stats = engine.stats()
        shutting_down = hub.shutting_down.is_set()
        body = {
            "status": "shutting_down" if shutting_down else "healthy",
            "store": "memory" if settings.durability == "memory" else "journal",
            "executor_stats": {
                "running_jobs": stats["running"],
                "max_concurrent": stats["max_concurrency"],
                "default_timeout": engine.config.default_timeout,
                "shutdown": shutting_down,
            },
            "version": __version__,
            "uptime_seconds": round(time.time() - state.started, 3),
            "durability": stats["durability"],
            "queued": stats["queued"],
            "running": stats["running"],
            "runs": stats["runs"],
            "by_status": stats["by_status"],
            "default_runner": engine.default_runner,
            "runners": sorted(engine.runners),
            "open_streams": hub.open_streams,
            "webhooks_pending": outbox.pending_count() if outbox is not None else None,
        }
        return _json(body, 503 if shutting_down else 200)

    @app.get("/stats")
    async def stats() -> Response:
        m = engine.metrics
        body = dict(engine.stats())
        body.update(
            {
                "submitted_total": m.submitted_total,
                "finished_total": dict(m.finished_total),
                "retries_total": m.retries_total,
                "cancel_requests_total": m.cancel_requests_total,
                "open_streams": hub.open_streams,
                "streams_total": hub.streams_total,
                "recovered": engine.recovered,
            }
        )
        return _json(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            prometheus.render(engine, hub, outbox), status=200, content_type=prometheus.CONTENT_TYPE
        )

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return Response(spec_bytes(), status=200, content_type=_JSON)

    return app
