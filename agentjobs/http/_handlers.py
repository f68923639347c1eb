"""Submit, status, result and authentication as plain functions: the one implementation.

Two front ends serve these endpoints: the quart routes (app.py) and the ASGI fast path
(_fastpath.py), which answers the hot requests without quart's per-request machinery.
Their answers must be the same to the byte, so neither holds any of the logic: both
authenticate with `authenticate`, call `handle_submit` / `handle_status` /
`handle_result`, turn errors into problems with `problem_for`, and send the `Answer`
they get back (quart as a `Response`, the fast path as two ASGI messages; both put the
headers in the same order: the answer's own, then `content-type`, then
`content-length`).

Nothing here reads a request object: each front end hands over the header values and
the body reader, so the functions cannot depend on which one called them.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import attrs
import orjson
import trio
from werkzeug.http import parse_options_header

from ..engine import EngineError, NotFinished, RunSpec
from ..engine.ssrf import UnsafeWebhookURL
from .auth import presented_key
from .errors import PROBLEM_CONTENT_TYPE, FieldError, Problem, from_engine_error, validation
from .quotas import LimitExceeded
from .schemas import Submit, parse_submit, parse_wait
from .views import result_view, retry_after, status_view, submit_view

if TYPE_CHECKING:
    from .app import AppState

__all__ = [
    "JSON",
    "Answer",
    "admit_submit",
    "authenticate",
    "handle_result",
    "handle_status",
    "handle_submit",
    "is_json",
    "problem_for",
    "screen_webhooks",
    "spec_from_submit",
    "unauthorized",
]

log = logging.getLogger("agentjobs.http")

JSON = "application/json"


@attrs.frozen(slots=True)
class Answer:
    """A whole response: status, body, content type and the headers before those two.

    `headers` keeps its order: quart sends a response's headers in the order given, then
    `content-type` and `content-length`, and `asgi_headers` reproduces exactly that.
    """

    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, doc: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = ()) -> Answer:
        return cls(status, orjson.dumps(doc), JSON, headers)

    @classmethod
    def problem(cls, problem: Problem, instance: str | None) -> Answer:
        return cls(
            problem.status,
            orjson.dumps(problem.body(instance)),
            PROBLEM_CONTENT_TYPE,
            tuple(problem.headers.items()),
        )

    def asgi_headers(self) -> list[tuple[bytes, bytes]]:
        """The header list quart would send for this answer (see the class docstring)."""
        out = [(name.lower().encode(), value.encode()) for name, value in self.headers]
        out.append((b"content-type", self.content_type.encode()))
        out.append((b"content-length", str(len(self.body)).encode()))
        return out


# -- authentication ---------------------------------------------------------------------


def unauthorized(state: AppState, detail: str, presented: bool, method: str, path: str) -> Problem:
    """A 401 problem, counted in the rejections /metrics shows."""
    state.rejected["unauthorized"] += 1
    log.debug("401 for %s %s: %s", method, path, detail)
    challenge = 'Bearer realm="agentjobs"'
    if presented:
        challenge += ', error="invalid_token"'
    return Problem("unauthorized", detail, headers={"WWW-Authenticate": challenge})


def authenticate(
    state: AppState,
    *,
    authorization: str | None,
    x_api_key: str | None,
    query_key: str | None,
    allow_query: bool,
    method: str,
    path: str,
) -> str | None:
    """The tenant an API request acts for (None when no keys are configured), or raise
    the 401 problem. `query_key` is `?api_key=`, honoured only where `allow_query`."""
    keyring = state.keyring
    if not keyring.enabled:
        return None
    cred = presented_key(authorization, x_api_key, query_key if allow_query else None)
    if cred.problem is not None:
        raise unauthorized(state, cred.problem, True, method, path)
    if cred.key is None:
        if query_key is not None:
            raise unauthorized(
                state,
                "?api_key= is accepted only on GET .../stream, and only when the server "
                "runs with --sse-query-key; send Authorization: Bearer <key> or X-API-Key",
                False,
                method,
                path,
            )
        raise unauthorized(
            state,
            "an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>",
            False,
            method,
            path,
        )
    tenant = keyring.tenant_for(cred.key)
    if tenant is None:
        raise unauthorized(state, "the API key is not valid", True, method, path)
    return tenant


# -- errors -----------------------------------------------------------------------------


def problem_for(exc: Exception, state: AppState, method: str, path: str) -> Problem:
    """The problem answering an error raised by a handler (or by `authenticate`): limits
    are counted for /metrics, engine errors mapped, anything else is a logged 500."""
    if isinstance(exc, Problem):
        return exc
    if isinstance(exc, EngineError):
        return from_engine_error(exc)
    if isinstance(exc, LimitExceeded):
        state.rejected[exc.limit] += 1
        return Problem(
            "rate-limited",
            exc.detail,
            headers={"Retry-After": str(exc.retry_after)},
            extra={"limit": exc.limit},
        )
    log.error("unexpected error on %s %s", method, path, exc_info=exc)
    return Problem("internal-error", f"unexpected {type(exc).__name__}; the server log has details")


# -- runs -------------------------------------------------------------------------------


@lru_cache(maxsize=64)
def _mimetype(content_type: str) -> str:
    """werkzeug's `request.mimetype` for a Content-Type value (clients repeat theirs, so
    the parse is cached)."""
    return parse_options_header(content_type)[0].lower()


def is_json(mimetype: str) -> bool:
    return mimetype == JSON or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def admit_submit(state: AppState, tenant: str | None, content_type: str | None) -> None:
    """The refusals of a submit (one run or a batch) that come before its body is read:
    the tenant's submit rate (one token; a batch settles the rest once its items are
    counted, `SubmitRate.take`), then the media type. The cheapest refusal first, and a
    refused client's body is never parsed."""
    if state.submit_rate is not None:
        state.submit_rate.take(tenant)
    if not is_json(_mimetype(content_type or "")):
        got = content_type or "none"
        raise Problem(
            "unsupported-media-type",
            f"send the body as JSON with Content-Type: application/json (got {got})",
        )


_SCREEN_AT_ONCE = 16  # distinct webhook URLs of one batch screened at once


async def screen_webhooks(state: AppState, urls: Collection[str]) -> dict[str, str]:
    """Each distinct webhook URL through the outbox's SSRF check (which may resolve a host
    name; a batch's, a few at once): the refused ones, with the reason. `spec_from_submit`
    turns a refused one into the item's 422."""
    outbox = state.outbox
    refused: dict[str, str] = {}
    if outbox is None or not urls:
        return refused

    async def check(url: str) -> None:
        try:
            await outbox.check(url)
        except UnsafeWebhookURL as exc:
            refused[url] = exc.reason

    if len(urls) == 1:  # a single submit: no nursery for one lookup
        await check(next(iter(urls)))
        return refused
    limiter = trio.CapacityLimiter(_SCREEN_AT_ONCE)

    async def limited(url: str) -> None:
        async with limiter:
            await check(url)

    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(limited, url)
    return refused


def spec_from_submit(
    state: AppState, tenant: str | None, parsed: Submit, refused: Mapping[str, str]
) -> RunSpec:
    """The engine's spec for a validated submit (`POST /api/v1/runs`, or a batch item).
    Raises the 422 `Problem` for a webhook URL that `screen_webhooks` refused, or the
    engine's `InvalidRequest` / `UnknownRunner`."""
    body = parsed.body
    url = body.webhook_url
    if url is not None and url in refused:
        raise validation([FieldError("webhook_url", refused[url])])
    return state.engine.make_spec(
        body.prompt,
        config=body.config,
        session_id=body.session_id,
        priority=body.priority or 0,
        timeout=body.timeout,
        max_attempts=body.max_attempts,
        runner=body.runner,
        webhook_url=url,
        idempotency_key=parsed.idempotency_key,
        request_hash=parsed.request_hash,
        tenant=tenant,
        ttl=body.ttl,
    )


async def handle_submit(
    state: AppState,
    tenant: str | None,
    *,
    content_type: str | None,
    idempotency_key: str | None,
    read_body: Callable[[], Awaitable[bytes]],
) -> Answer:
    """`POST /api/v1/runs`. `read_body` is called once, after the cheap refusals
    (`admit_submit`). Raises `Problem`, `LimitExceeded` or `EngineError` (see
    `problem_for`)."""
    admit_submit(state, tenant, content_type)
    parsed = parse_submit(await read_body(), idempotency_key)
    url = parsed.body.webhook_url
    refused = await screen_webhooks(state, (url,)) if url is not None else {}
    spec = spec_from_submit(state, tenant, parsed, refused)
    engine = state.engine
    active = state.active_runs
    # the quota holds a place only for a submit that creates a run (not a replay), as the
    # engine decides it (`Engine.new_runs`), once a concurrent submit of the same key has
    # been recorded (`settle`: a retry that overtook its original is a replay)
    if active is not None and spec.idempotency_key is not None:
        await engine.settle((spec,))
    if active is not None and engine.new_runs((spec,)):
        with active.reserve(tenant):  # 429 here: nothing was written
            run, replayed = await engine.submit_spec(spec)
    else:
        run, replayed = await engine.submit_spec(spec)
    urls = state.urls
    location = urls.run(run.id)
    headers: tuple[tuple[str, str], ...] = (
        (("Location", location), ("Retry-After", "2"), ("Idempotent-Replayed", "true"))
        if replayed
        else (("Location", location), ("Retry-After", "2"))
    )
    return Answer.json(submit_view(run, urls), 202, headers)


def handle_status(state: AppState, tenant: str | None, run_id: str) -> Answer:
    """`GET /api/v1/runs/{id}`."""
    engine = state.engine
    run = engine.get(run_id, tenant=tenant)
    return Answer.json(status_view(run, engine.wall(), engine.default_runner))


async def handle_result(
    state: AppState, tenant: str | None, run_id: str, wait_param: str | None
) -> Answer:
    """`GET /api/v1/runs/{id}/result[?wait=SECONDS]`: with a wait, a long-poll that the
    server's shutdown ends early (the answer is then what the run has)."""
    engine = state.engine
    hub = state.hub
    wait = parse_wait(wait_param, state.settings.max_wait)
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
        problem.headers["Retry-After"] = str(retry_after(run, engine.wall()) or 2)
        raise problem
    return Answer.json(result_view(run))
