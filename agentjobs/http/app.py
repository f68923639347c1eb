"""The quart-trio application: routes that translate HTTP into `Engine` calls and back.

Handlers are thin on purpose: parse and validate (schemas.py), call one engine method,
render (views.py). Engine errors become problem documents in one place (errors.py), so a
handler never builds an error body itself.

Tenancy: every engine call passes `tenant=current_tenant()`, which the authentication hook
sets before any handler runs (auth.py): the key's tenant, or None when no keys are
configured. The engine answers `NotFound` for another tenant's run, so isolation does not
depend on each handler. `current_tenant()` raises when the hook did not run, so a route
that somehow escaped it fails closed (500) instead of acting as the anonymous tenant.

Layers, outside in: `CorsHeaders` (when CORS is on) -> `FastPath` (submit, status and
result answered without quart, unless `--no-fast-path`; _fastpath.py) -> `RequestGuard`
(body limit, clean connection reuse) -> `CorsPreflight` (preflights answered before auth)
-> quart, whose `before_request` hook authenticates. Per-tenant limits (quotas.py) are
checked in the handlers, before the engine writes anything. Submit, status, result and
authentication live in _handlers.py, called by both the quart routes and the fast path,
so that both answer alike.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import orjson
from quart import Quart, Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .. import __version__
from ..engine import Engine, EngineError, InvalidRequest, Status
from ..engine.outbox import Outbox, delivery_history
from . import batch as batch_api
from . import prometheus
from ._fastpath import FastPath
from ._handlers import (
    Answer,
    handle_result,
    handle_status,
    handle_submit,
    problem_for,
    unauthorized,
)
from ._handlers import authenticate as authenticate_request
from .auth import Credential, KeyRing, presented_key
from .cors import CorsHeaders, CorsPolicy, CorsPreflight
from .errors import Problem, problem_response
from .limits import RequestGuard
from .openapi import spec_bytes
from .quotas import ActiveRuns, LimitExceeded, StreamSlots, SubmitRate
from .schemas import IDEMPOTENCY_HEADER, int_param, parse_list_query
from .settings import ServerSettings
from .sse import HISTORY_PAGE, EventStreamBody, StreamHub, parse_resume, resume_builder
from .views import RUNS_PATH, Urls, status_view

__all__ = ["AppState", "create_app", "current_tenant", "state_of"]

log = logging.getLogger("agentjobs.http")

_STATUSES = tuple(s.value for s in Status)
_JSON = "application/json"
_SSE = "text/event-stream; charset=utf-8"
_EXTENSION_KEY = "agentjobs"
MAX_EVENTS_PAGE = 1000


_TENANT = "agentjobs_tenant"
# Endpoints that never need an API key, and those that show server-wide figures.
_OPEN_ENDPOINTS = frozenset({"health", "openapi"})
_FIGURES_ENDPOINTS = frozenset({"metrics", "stats"})
REJECTION_REASONS = ("unauthorized", "submit-rate", "tenant-queue", "tenant-streams")


def current_tenant() -> str | None:
    """The tenant the current request acts for (None when auth is off).

    Raises RuntimeError when the authentication hook did not run for this request: better
    a 500 than a request served as the anonymous tenant by mistake.
    """
    try:
        tenant: str | None = getattr(g, _TENANT)
    except AttributeError:
        raise RuntimeError("no tenant was established for this request") from None
    return tenant


@attrs.define(slots=True, eq=False)
class AppState:
    """What the handlers share: the engine, the settings, the stream bookkeeping, and the
    auth and limit state (keys, per-tenant counters, refusals by reason for /metrics)."""

    engine: Engine
    settings: ServerSettings
    hub: StreamHub
    urls: Urls
    outbox: Outbox | None = None
    keyring: KeyRing = attrs.Factory(KeyRing)
    cors: CorsPolicy | None = None
    submit_rate: SubmitRate | None = None
    active_runs: ActiveRuns | None = None
    stream_slots: StreamSlots | None = None
    rejected: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(REJECTION_REASONS, 0))
    started: float = attrs.Factory(time.time)
    fast_path: FastPath | None = None  # None with --no-fast-path


def state_of(app: Quart) -> AppState:
    state: AppState = app.extensions[_EXTENSION_KEY]
    return state


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status=status, headers=headers, content_type=_JSON)


def _respond(answer: Answer) -> Response:
    """An `Answer` (_handlers.py) as quart's response; the fast path sends the same bytes."""
    return Response(
        answer.body,
        status=answer.status,
        headers=dict(answer.headers),
        content_type=answer.content_type,
    )


def create_app(
    engine: Engine, settings: ServerSettings | None = None, *, outbox: Outbox | None = None
) -> QuartTrio:
    """Build the app around a running engine (from `open_engine`).

    With an `outbox` (whose `run` the caller starts), submitted webhook URLs are screened
    against its SSRF policy and deliveries can be redelivered; without one, webhook URLs
    are only checked for shape and are delivered by whatever outbox the embedder runs.
    """
    settings = settings or ServerSettings()
    keyring = settings.keyring()
    cors = settings.cors_policy()
    app = QuartTrio("agentjobs")
    # RequestGuard holds each path to its limit; quart's own check only backs it up.
    app.config["MAX_CONTENT_LENGTH"] = max(settings.max_body_bytes, settings.max_batch_bytes)
    app.config["JSON_SORT_KEYS"] = False
    # Long-polls wait up to max_wait; streams switch the timeout off for themselves.
    app.config["RESPONSE_TIMEOUT"] = max(60.0, settings.max_wait + settings.cancel_wait + 30.0)
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    state = AppState(
        engine,
        settings,
        StreamHub(),
        Urls(settings.public_url or ""),
        outbox,
        keyring=keyring,
        cors=cors,
        submit_rate=(
            SubmitRate(settings.tenant_rate, settings.submit_burst)
            if settings.tenant_rate is not None
            else None
        ),
        active_runs=(
            ActiveRuns(engine, settings.tenant_max_queued)
            if settings.tenant_max_queued is not None
            else None
        ),
        stream_slots=(
            StreamSlots(settings.tenant_max_streams)
            if settings.tenant_max_streams is not None
            else None
        ),
    )
    app.extensions[_EXTENSION_KEY] = state
    asgi: Any = app.asgi_app
    if cors is not None:
        asgi = CorsPreflight(asgi, cors)
    batch_limits = dict.fromkeys(
        (batch_api.BATCH_PATH, batch_api.BATCH_PATH + "/"), settings.max_batch_bytes
    )
    asgi = RequestGuard(asgi, settings.max_body_bytes, batch_limits)
    if settings.fast_path:  # submit, status and result without quart (_fastpath.py)
        asgi = state.fast_path = FastPath(asgi, state)
    if cors is not None:
        asgi = CorsHeaders(asgi, cors)
    app.asgi_app = asgi  # type: ignore[method-assign]
    hub = state.hub
    rejected = state.rejected

    def now() -> float:
        return engine.wall()

    # -- authentication -------------------------------------------------------------------

    def refuse(detail: str, presented: bool) -> Problem:
        return unauthorized(state, detail, presented, request.method, request.path)

    def request_key(query_key: str | None = None) -> Credential:
        headers = request.headers
        return presented_key(headers.get("Authorization"), headers.get("X-API-Key"), query_key)

    def may_see_figures() -> bool:
        """Server-wide figures (/metrics, /stats, /health's details): the metrics key when
        there is one, else any API key, else everyone (auth off)."""
        cred = request_key()
        if cred.key is None:
            return not keyring.enabled and keyring.metrics_digest is None
        if keyring.metrics_digest is not None:
            return keyring.is_metrics_key(cred.key)
        return not keyring.enabled or keyring.tenant_for(cred.key) is not None

    @app.before_request
    async def authenticate() -> None:
        """Runs before every handler (and before routing errors): establishes the tenant,
        or answers 401. Preflights never get here when CORS is on (cors.py)."""
        endpoint = request.endpoint
        if endpoint in _OPEN_ENDPOINTS:
            return  # /health, /openapi.json: no tenant
        if request.method == "OPTIONS" and request.url_rule is not None:
            return  # quart's automatic answer (Allow: ...) for a route that exists
        if endpoint in _FIGURES_ENDPOINTS:
            if keyring.metrics_digest is None and not keyring.enabled:
                return
            if not may_see_figures():
                cred = request_key()
                what = "the metrics key" if keyring.metrics_digest is not None else "an API key"
                raise refuse(
                    f"{request.path} needs {what} (Authorization: Bearer <key> or X-API-Key)",
                    presented=cred.key is not None,
                )
            return
        if not keyring.enabled:
            setattr(g, _TENANT, None)
            return
        headers = request.headers
        tenant = authenticate_request(  # the fast path authenticates with the same function
            state,
            authorization=headers.get("Authorization"),
            x_api_key=headers.get("X-API-Key"),
            query_key=request.args.get("api_key"),
            allow_query=settings.sse_query_key and endpoint == "stream",
            method=request.method,
            path=request.path,
        )
        setattr(g, _TENANT, tenant)

    # -- errors ---------------------------------------------------------------------------

    @app.errorhandler(LimitExceeded)
    async def on_limit(exc: LimitExceeded) -> Response:
        return on_error(exc)

    @app.errorhandler(Problem)
    async def on_problem(exc: Problem) -> Response:
        return on_error(exc)

    @app.errorhandler(EngineError)
    async def on_engine_error(exc: EngineError) -> Response:
        return on_error(exc)

    def on_error(exc: Exception) -> Response:
        """Errors as the fast path answers them: one mapping (`problem_for`)."""
        problem = problem_for(exc, state, request.method, request.path)
        return _respond(Answer.problem(problem, request.path))

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
        return on_error(exc)

    def _too_large() -> Problem:
        return Problem(
            "payload-too-large",
            f"the request body is over the limit of {settings.max_body_bytes} bytes",
        )

    # -- runs -----------------------------------------------------------------------------

    # submit, get_run and get_result are _handlers.py's, shared with the fast path; the
    # batch is batch.py's, called the same way as the submit.

    def submit_route(
        handle: Callable[..., Awaitable[Answer]], too_large: Callable[[], Problem]
    ) -> Callable[[], Awaitable[Response]]:
        """A quart route for `handle_submit` or `batch.handle_batch`: the request's
        headers and body reader handed over, its answer sent."""

        async def route() -> Response:
            async def read_body() -> bytes:
                try:
                    return await request.get_data(cache=False, as_text=False, parse_form_data=False)
                except RequestEntityTooLarge:
                    raise too_large() from None

            headers = request.headers
            answer = await handle(
                state,
                current_tenant(),
                content_type=headers.get("Content-Type"),
                idempotency_key=headers.get(IDEMPOTENCY_HEADER),
                read_body=read_body,
            )
            return _respond(answer)

        return route

    submit = submit_route(handle_submit, _too_large)

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

    # Many submits, one group commit (batch.py has the rules).
    submit_batch = submit_route(
        batch_api.handle_batch, lambda: batch_api.too_large(settings.max_batch_bytes)
    )

    for path in (batch_api.BATCH_PATH, batch_api.BATCH_PATH + "/"):
        app.add_url_rule(path, "submit_batch" + path, submit_batch, methods=["POST"])

    @app.get(RUNS_PATH + "/<run_id>")
    async def get_run(run_id: str) -> Response:
        return _respond(handle_status(state, current_tenant(), run_id))

    @app.get(RUNS_PATH + "/<run_id>/result")
    async def get_result(run_id: str) -> Response:
        answer = await handle_result(state, current_tenant(), run_id, request.args.get("wait"))
        return _respond(answer)

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
        # The tenant's stream slot first: a tenant at its limit costs nothing more. Then
        # read only what comes after the resume point; the progress as of it comes from
        # the run's progress trail (O(1) when it has not changed since).
        slot = state.stream_slots.acquire(tenant) if state.stream_slots is not None else None
        start = resume.start_after
        try:
            builder = await resume_builder(engine, run_id, start, tenant=tenant)
            body = EventStreamBody(
                job_id=run_id,
                events=engine.subscribe(run_id, start, tenant=tenant),
                resume=resume,
                hub=hub,
                nursery=app.nursery,
                heartbeat_s=settings.sse_heartbeat,
                on_close=slot.release if slot is not None else None,
                builder=builder,
            )
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        if slot is not None:
            slot.bind(body)  # given back even if the body is never started
        response = Response(body, status=200, content_type=_SSE, headers=headers)
        response.timeout = None
        return response

    @app.get(RUNS_PATH + "/<run_id>/events")
    async def events(run_id: str) -> Response:
        tenant = current_tenant()
        resume = parse_resume(None, request.args.get("after"))
        limit = int_param(request.args, "limit", 1, MAX_EVENTS_PAGE) or 100
        run = engine.get(run_id, tenant=tenant)
        # Paged: the events after the resume point, a page at a time (one more frame than
        # asked for says whether there is more), never the run's whole history.
        after = resume.start_after
        builder = await resume_builder(engine, run_id, after, tenant=tenant)
        page_size = min(HISTORY_PAGE, limit + 1)
        items: list[dict[str, Any]] = []
        more = False
        while not more:
            page = await engine.events(run_id, after, tenant=tenant, limit=page_size)
            for ev in page:
                for frame_id, name, data in resume.unseen(builder, ev):
                    if len(items) == limit:
                        more = True
                        break
                    items.append({"id": frame_id, "event": name, "data": data})
                if more:
                    break
            if len(page) < page_size:
                break
            after = page[-1].seq
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
        """Open to all; the server-wide figures only for callers who may see /metrics
        (with auth on, an anonymous caller learns liveness, not how busy other tenants are)."""
        stats = engine.stats()
        shutting_down = hub.shutting_down.is_set()
        body: dict[str, Any] = {
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
        }
        if may_see_figures():
            body.update(
                {
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
            )
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
                "rejected": dict(rejected),
            }
        )
        return _json(body)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(
            prometheus.render(engine, hub, outbox, rejected),
            status=200,
            content_type=prometheus.CONTENT_TYPE,
        )

    @app.get("/openapi.json")
    async def openapi() -> Response:
        return Response(spec_bytes(), status=200, content_type=_JSON)

    return app
