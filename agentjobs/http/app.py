"""The quart-trio application: routes that translate HTTP into `Engine` calls and back.

Handlers are thin on purpose: parse and validate (schemas.py), call one engine method,
render (views.py). Engine errors become problem documents in one place (errors.py), so a
handler never builds an error body itself.

Tenancy: every engine call passes `tenant=current_tenant()`, which the authentication hook
sets before any handler runs (auth.py): the key's tenant, or None when no keys are
configured. The engine answers `NotFound` for another tenant's run, so isolation does not
depend on each handler. `current_tenant()` raises when the hook did not run, so a route
that somehow escaped it fails closed (500) instead of acting as the anonymous tenant.

Layers, outside in: `CorsHeaders` (when CORS is on) -> `RequestGuard` (body limit, clean
connection reuse) -> `CorsPreflight` (preflights answered before auth) -> quart, whose
`before_request` hook authenticates. Per-tenant limits (quotas.py) are checked in the
handlers, before the engine writes anything.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
import orjson
import trio
from quart import Quart, Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .. import __version__
from ..engine import Engine, EngineError, InvalidRequest, NotFinished, Status
from ..engine.outbox import Outbox, delivery_history
from ..engine.ssrf import UnsafeWebhookURL
from . import prometheus
from .auth import Credential, KeyRing, presented_key
from .cors import CorsHeaders, CorsPolicy, CorsPreflight
from .errors import FieldError, Problem, from_engine_error, problem_response, validation
from .limits import RequestGuard
from .openapi import spec_bytes
from .quotas import ActiveRuns, LimitExceeded, StreamSlots, SubmitRate
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
    keyring = settings.keyring()
    cors = settings.cors_policy()
    app = QuartTrio("agentjobs")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["JSON_SORT_KEYS"] = False
    # Long-polls wait up to max_wait; streams switch the timeout off for themselves.
    app.config["RESPONSE_TIMEOUT"] = max(60.0, settings.max_wait + settings.cancel_wait + 30.0)
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True
    asgi: Any = app.asgi_app
    if cors is not None:
        asgi = CorsPreflight(asgi, cors)
    asgi = RequestGuard(asgi, settings.max_body_bytes)
    if cors is not None:
        asgi = CorsHeaders(asgi, cors)
    app.asgi_app = asgi  # type: ignore[method-assign]
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
    hub = state.hub
    urls = state.urls
    rejected = state.rejected

    def now() -> float:
        return engine.wall()

    # -- authentication -------------------------------------------------------------------

    def unauthorized(detail: str, presented: bool) -> Problem:
        rejected["unauthorized"] += 1
        log.debug("401 for %s %s: %s", request.method, request.path, detail)
        challenge = 'Bearer realm="agentjobs"'
        if presented:
            challenge += ', error="invalid_token"'
        return Problem("unauthorized", detail, headers={"WWW-Authenticate": challenge})

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
                raise unauthorized(
                    f"{request.path} needs {what} (Authorization: Bearer <key> or X-API-Key)",
                    presented=cred.key is not None,
                )
            return
        if not keyring.enabled:
            setattr(g, _TENANT, None)
            return
        query_key = request.args.get("api_key")
        allow_query = settings.sse_query_key and endpoint == "stream"
        cred = request_key(query_key if allow_query else None)
        if cred.problem is not None:
            raise unauthorized(cred.problem, presented=True)
        if cred.key is None:
            if query_key is not None:
                raise unauthorized(
                    "?api_key= is accepted only on GET .../stream, and only when the server "
                    "runs with --sse-query-key; send Authorization: Bearer <key> or X-API-Key",
                    presented=False,
                )
            raise unauthorized(
                "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>",
                presented=False,
            )
        tenant = keyring.tenant_for(cred.key)
        if tenant is None:
            raise unauthorized("the API key is not valid", presented=True)
        setattr(g, _TENANT, tenant)

    # -- errors ---------------------------------------------------------------------------

    @app.errorhandler(LimitExceeded)
    async def on_limit(exc: LimitExceeded) -> Response:
        rejected[exc.limit] += 1
        problem = Problem(
            "rate-limited",
            exc.detail,
            headers={"Retry-After": str(exc.retry_after)},
            extra={"limit": exc.limit},
        )
        return problem_response(problem, request.path)

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

    def is_replay(tenant: str | None, key: str | None) -> bool:
        """Would this submit be answered with an earlier run (no new work)?"""
        if key is None:
            return False
        found = engine.state.find_idempotent(
            tenant, key, now=engine.wall(), window=engine.config.idempotency_window_s
        )
        return found is not None

    async def submit() -> Response:
        tenant = current_tenant()
        if state.submit_rate is not None:
            # First, before the body is even read: the cheapest refusal protects the rest.
            state.submit_rate.take(tenant)
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
            tenant=tenant,
            ttl=body.ttl,
        )
        active = state.active_runs
        if active is not None and not is_replay(tenant, parsed.idempotency_key):
            with active.reserve(tenant):  # 429 here: nothing was written
                run, replayed = await engine.submit_spec(spec)
        else:
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
        slot = state.stream_slots.acquire(tenant) if state.stream_slots is not None else None
        try:
            body = EventStreamBody(
                job_id=run_id,
                events=engine.subscribe(run_id, 0, tenant=tenant),
                resume=resume,
                hub=hub,
                nursery=app.nursery,
                heartbeat_s=settings.sse_heartbeat,
                on_close=slot.release if slot is not None else None,
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
