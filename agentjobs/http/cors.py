"""CORS: which web pages may call the API from a browser. Off unless origins are configured.

Two small ASGI layers rather than a dependency (quart-cors): the policy is a few lines, and
where it sits matters more than how it is written.

* `CorsPreflight` sits *inside* the request guard (limits.py), in front of quart: a
  preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is answered there,
  before routing and before authentication, because browsers never send credentials on a
  preflight (PraisonAI answered them 401, so no browser could call it; its bug 15).
* `CorsHeaders` sits *outside* everything, so every answer to an allowed origin carries
  `Access-Control-Allow-Origin`, including 401s, 429s and the guard's own 413s: a page can
  then read why it was refused instead of seeing an opaque network error.

**No credentials mode.** `Access-Control-Allow-Credentials` is never sent: the API does not
use cookies or HTTP authentication, and an `Authorization` or `X-API-Key` header set by a
script does not need it. So `*` is safe to allow (any page may call the API with a key its
user gives it, none can use a key it does not have: there is no ambient authority, hence no
CSRF). `*` cannot be combined with named origins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import attrs
import orjson

from .errors import PROBLEM_CONTENT_TYPE, Problem

__all__ = ["ALLOWED_HEADERS", "EXPOSED_HEADERS", "CorsHeaders", "CorsPolicy", "CorsPreflight"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

ALLOWED_METHODS = ("GET", "HEAD", "POST", "DELETE")
ALLOWED_HEADERS = (
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "Last-Event-ID",
    "X-API-Key",
    "Accept",
    "Cache-Control",  # sent by some EventSource polyfills
)
EXPOSED_HEADERS = ("Location", "Retry-After", "Idempotent-Replayed", "WWW-Authenticate")
MAX_AGE_S = 600
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _normalise(origin: str) -> str:
    """`scheme://host[:port]` in lower case, without a default port (as browsers send it)."""
    parts = urlsplit(origin.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"{origin!r} is not an origin like https://app.example.com")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(
            f"{origin!r}: an origin is scheme://host[:port], without path, query or user"
        )
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{origin!r} has an invalid port") from None
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


@attrs.frozen(slots=True)
class CorsPolicy:
    """The allowed origins (normalised), or `any_origin` for `*`."""

    origins: frozenset[str] = frozenset()
    any_origin: bool = False

    @classmethod
    def parse(cls, text: str | None) -> CorsPolicy | None:
        """None (CORS off) for no text; ValueError for an origin that is not one."""
        if text is None or not text.strip():
            return None
        items = [t.strip() for t in text.split(",") if t.strip()]
        if "*" in items:
            if len(items) > 1:
                raise ValueError("* allows every origin; do not combine it with named origins")
            return cls(any_origin=True)
        return cls(frozenset(_normalise(t) for t in items))

    def allows(self, origin: str) -> bool:
        if self.any_origin:
            return True
        try:
            return _normalise(origin) in self.origins
        except ValueError:
            return False  # "null" (sandboxed pages, file://) and junk

    def describe(self) -> str:
        return "any origin (*)" if self.any_origin else ", ".join(sorted(self.origins))

    def allow_origin_value(self, origin: str) -> str:
        return "*" if self.any_origin else origin


def _header(scope: MutableMapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            text: str = value.decode("latin-1")
            return text
    return None


def is_preflight(scope: MutableMapping[str, Any]) -> bool:
    return (
        scope.get("method") == "OPTIONS"
        and _header(scope, b"origin") is not None
        and _header(scope, b"access-control-request-method") is not None
    )


class CorsPreflight:
    """Answers preflights itself; passes everything else to the app (see module docstring)."""

    def __init__(self, app: ASGIApp, policy: CorsPolicy) -> None:
        self.app = app
        self.policy = policy
        self._allowed_headers = {h.lower() for h in ALLOWED_HEADERS}

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_preflight(scope):
            await self.app(scope, receive, send)
            return
        origin = _header(scope, b"origin") or ""
        method = (_header(scope, b"access-control-request-method") or "").strip().upper()
        requested = [
            h.strip().lower()
            for h in (_header(scope, b"access-control-request-headers") or "").split(",")
            if h.strip()
        ]
        refused: str | None = None
        if not self.policy.allows(origin):
            refused = f"origin {origin!r} is not allowed to call this API (--cors-origins)"
        elif method not in ALLOWED_METHODS:
            refused = f"method {method!r} is not allowed (allowed: {', '.join(ALLOWED_METHODS)})"
        else:
            extra = [h for h in requested if h not in self._allowed_headers]
            if extra:
                refused = (
                    f"header(s) {', '.join(extra)} not allowed "
                    f"(allowed: {', '.join(ALLOWED_HEADERS)})"
                )
        vary = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"
        if refused is not None:
            problem = Problem("cors-rejected", refused)
            body = orjson.dumps(problem.body(scope.get("path")))
            headers = [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"vary", vary),
            ]
            await send({"type": "http.response.start", "status": 403, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        headers = [
            (b"access-control-allow-origin", self.policy.allow_origin_value(origin).encode()),
            (b"access-control-allow-methods", ", ".join(ALLOWED_METHODS).encode()),
            (b"access-control-allow-headers", ", ".join(ALLOWED_HEADERS).encode()),
            (b"access-control-max-age", str(MAX_AGE_S).encode()),
            (b"vary", vary),
            (b"content-length", b"0"),
        ]
        await send({"type": "http.response.start", "status": 204, "headers": headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class CorsHeaders:
    """Adds the CORS answer headers to every response to an allowed origin (and `Vary:
    Origin` to every response, so a shared cache never hands one origin's answer to
    another)."""

    def __init__(self, app: ASGIApp, policy: CorsPolicy) -> None:
        self.app = app
        self.policy = policy
        self._expose = ", ".join(EXPOSED_HEADERS).encode()

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        origin = _header(scope, b"origin") if scope["type"] == "http" else None
        if origin is None or is_preflight(scope):
            await self.app(scope, receive, send)
            return
        allowed = self.policy.allows(origin)
        value = self.policy.allow_origin_value(origin).encode()

        async def decorating_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", ())
                    if k.lower() not in (b"access-control-allow-origin", b"vary")
                ]
                vary = [v for k, v in message.get("headers", ()) if k.lower() == b"vary"]
                if not self.policy.any_origin:
                    vary.append(b"Origin")
                if vary:
                    headers.append((b"vary", b", ".join(vary)))
                if allowed:
                    headers.append((b"access-control-allow-origin", value))
                    headers.append((b"access-control-expose-headers", self._expose))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, decorating_send)
