"""The fast path: submit, status and result answered without quart's per-request machinery.

**Why.** Profiling a submit (docs/benchmarks.md, "Optimisation notes") showed quart-trio's
per-request work (a nursery and two tasks, app and request contexts, werkzeug routing,
request and response objects) costing as much CPU as our handler and the engine together.
The three requests a client makes most (`POST /api/v1/runs`, `GET /api/v1/runs/{id}`,
`GET /api/v1/runs/{id}/result`) are answered here instead, straight from the ASGI
messages; everything else goes on to the usual stack. `--no-fast-path` turns it off.

**Same answers.** This layer holds no endpoint logic: it authenticates with
`_handlers.authenticate`, calls the same `handle_submit` / `handle_status` /
`handle_result` as the quart routes, maps errors with the same `problem_for`, and sends
the `Answer` with the header order quart uses. A differential test
(tests/test_http_fastpath.py) sends one table of requests to a server with the fast path
and one without, and compares status, headers and body.

**What it takes.** Only requests whose answer cannot depend on what quart does beyond the
handler: method `POST` on `/api/v1/runs[/]` or `GET` on `/api/v1/runs/run_<32 hex>[/result]`;
no query string (so no `?wait=` long-poll, no `?api_key=`); no `root_path`; a body framed
by `Content-Length` within the body limit (a chunked body, or one declared over the limit,
goes to `RequestGuard`, whose 413 is then the answer), and none at all on a GET. HEAD,
OPTIONS and everything else pass through unchanged. CORS needs nothing here: this layer
sits inside `CorsHeaders`, which decorates its answers as it decorates quart's.

**Bodies and hangs.** A submit's body is read here, counted against the same limit as
`RequestGuard` counts it. When the answer comes before the body was read (a 401, 429 or
415), the rest is read and dropped before the answer goes out, and the answer is sent as
the guard sends it (limits.py explains the keep-alive hang this prevents). A client that
leaves before its body arrived gets nothing, as with quart.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import TYPE_CHECKING, Any

from ._handlers import Answer, authenticate, handle_result, handle_status, handle_submit
from ._handlers import problem_for as _problem_for
from .limits import (
    ASGIApp,
    Message,
    Receive,
    RequestGuard,
    Send,
    content_length,
    finish_response,
    read_rest,
    refusal,
)
from .schemas import IDEMPOTENCY_HEADER
from .views import RUNS_PATH

if TYPE_CHECKING:
    from .app import AppState

__all__ = ["FastPath"]

_SUBMIT_PATHS = frozenset({RUNS_PATH, RUNS_PATH + "/"})
_RUN_PREFIX = RUNS_PATH + "/"
_RUN_ID = re.compile(r"run_[0-9a-f]{32}")  # engine ids (model.new_run_id); others: quart
_RESULT = "/result"

_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_CONTENT_TYPE = b"content-type"
_AUTHORIZATION = b"authorization"
_X_API_KEY = b"x-api-key"
_IDEMPOTENCY_KEY = IDEMPOTENCY_HEADER.lower().encode()
_WANTED = frozenset(
    {
        _CONTENT_LENGTH,
        _TRANSFER_ENCODING,
        _CONTENT_TYPE,
        _AUTHORIZATION,
        _X_API_KEY,
        _IDEMPOTENCY_KEY,
    }
)


class _ClientGone(Exception):
    """The client disconnected before its body was complete: nothing is answered."""


class _Overflow(Exception):
    """More body than the limit arrived (cannot happen with a Content-Length within it,
    which h11 enforces; handled as the guard handles it, should a server not enforce it)."""


def _headers(scope: MutableMapping[str, Any]) -> dict[bytes, bytes]:
    """The first value of each header this layer reads, as quart's `headers.get` gives
    the first of repeated headers."""
    found: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        name = name.lower()
        if name in _WANTED and name not in found:
            found[name] = value
    return found


def _text(value: bytes | None) -> str | None:
    """A header value as quart decodes it (latin-1)."""
    return None if value is None else value.decode("latin-1")


def _messages(answer: Answer) -> list[Message]:
    return [
        {"type": "http.response.start", "status": answer.status, "headers": answer.asgi_headers()},
        {"type": "http.response.body", "body": answer.body, "more_body": False},
    ]


class FastPath:
    """The ASGI layer (see the module docstring). `guard` is the `RequestGuard` in front
    of quart: what this layer does not answer goes to it, and its body limits apply."""

    def __init__(self, guard: RequestGuard, state: AppState) -> None:
        self.app: ASGIApp = guard
        self.guard = guard
        self.state = state
        self.answered = 0  # requests answered here (tests check that the path is taken)

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("query_string") and not scope.get("root_path"):
            method = scope["method"]
            path: str = scope["path"]
            if method == "POST":
                if path in _SUBMIT_PATHS and await self._submit(scope, path, receive, send):
                    return
            elif method == "GET" and path.startswith(_RUN_PREFIX):
                rest = path[len(_RUN_PREFIX) :]
                if rest.endswith(_RESULT):
                    run_id, result = rest[: -len(_RESULT)], True
                else:
                    run_id, result = rest, False
                if _RUN_ID.fullmatch(run_id) and await self._get(scope, path, run_id, result, send):
                    return
        await self.app(scope, receive, send)

    def _tenant(self, headers: dict[bytes, bytes], method: str, path: str) -> str | None:
        """As the quart hook authenticates an API endpoint called without a query string."""
        if not self.state.keyring.enabled:
            return None
        return authenticate(
            self.state,
            authorization=_text(headers.get(_AUTHORIZATION)),
            x_api_key=_text(headers.get(_X_API_KEY)),
            query_key=None,
            allow_query=False,
            method=method,
            path=path,
        )

    async def _get(
        self, scope: MutableMapping[str, Any], path: str, run_id: str, result: bool, send: Send
    ) -> bool:
        headers = _headers(scope)
        if _TRANSFER_ENCODING in headers or headers.get(_CONTENT_LENGTH, b"0") != b"0":
            return False  # a GET with a body: let quart and the guard deal with it
        state = self.state
        try:
            tenant = self._tenant(headers, "GET", path)
            if result:
                answer = await handle_result(state, tenant, run_id, None)
            else:
                answer = handle_status(state, tenant, run_id)
        except Exception as exc:
            answer = Answer.problem(_problem_for(exc, state, "GET", path), path)
        self.answered += 1
        # The (empty) body was complete before the app was called: nothing to drain.
        start, body = _messages(answer)
        await send(start)
        await send(body)
        return True

    async def _submit(
        self, scope: MutableMapping[str, Any], path: str, receive: Receive, send: Send
    ) -> bool:
        headers = _headers(scope)
        if _TRANSFER_ENCODING in headers:
            return False  # chunked: counted by the guard as it arrives
        declared = content_length(scope)
        if declared is None:
            return False
        limit = self.guard.path_limits.get(path, self.guard.limit)
        if declared > limit:
            return False  # the guard refuses it (413) before anything else
        state = self.state
        received = 0
        body_done = False

        async def read_body() -> bytes:
            nonlocal received, body_done
            chunks: list[bytes] = []
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    if message["type"] == "http.disconnect":
                        raise _ClientGone
                    continue
                chunk: bytes = message.get("body", b"")
                received += len(chunk)
                if received > limit:
                    raise _Overflow
                chunks.append(chunk)
                if not message.get("more_body", False):
                    body_done = True
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        self.answered += 1
        try:
            tenant = self._tenant(headers, "POST", path)
            answer = await handle_submit(
                state,
                tenant,
                content_type=_text(headers.get(_CONTENT_TYPE)),
                idempotency_key=_text(headers.get(_IDEMPOTENCY_KEY)),
                read_body=read_body,
            )
        except _ClientGone:
            return True
        except _Overflow:
            await finish_response(receive, send, refusal(scope, limit), body_done=False)
            return True
        except Exception as exc:
            answer = Answer.problem(_problem_for(exc, state, "POST", path), path)
        if not body_done:
            # Answered before the body was read (401, 429, 415): read the rest first, so
            # that the connection can serve the client's next request (limits.py).
            outcome = await read_rest(receive, limit)
            if outcome == "gone":
                return True
            body_done = outcome == "done"
        await finish_response(receive, send, _messages(answer), body_done=body_done)
        return True
