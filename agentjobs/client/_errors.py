"""What the client raises. One base class, so `except agentjobs.client.AgentJobsError` is
enough for a script that only wants to report and stop; finer classes for code that reacts.

Errors from the server are RFC 9457 problem documents: `APIError` carries their fields
(`type`, `title`, `status`, `detail`, plus `errors` for validation problems) and the whole
body. The class is chosen from the problem `type` first (stable, documented slugs) and the
HTTP status second, so a PraisonAI server's plain `{"detail": ...}` bodies map sensibly too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import RunResult

__all__ = [
    "APIError",
    "AgentJobsError",
    "AlreadyFinished",
    "BadRequest",
    "Conflict",
    "IdempotencyConflict",
    "NotFinished",
    "NotFound",
    "RateLimited",
    "RunCancelled",
    "RunFailed",
    "ServerError",
    "ServiceUnavailable",
    "TransportError",
    "Unauthorized",
    "ValidationError",
    "WaitTimeout",
    "error_for_response",
]

PROBLEM_BASE = "https://agentjobs.dev/problems/"


class AgentJobsError(Exception):
    """Base class of every error the client raises on purpose."""


class TransportError(AgentJobsError):
    """The server could not be reached, or the connection broke (after any retries).

    The underlying `httpx` exception is the `__cause__`.
    """

    def __init__(self, message: str, *, method: str = "", url: str = "") -> None:
        super().__init__(message)
        self.method = method
        self.url = url


class APIError(AgentJobsError):
    """The server answered with an error. Fields are those of the problem document."""

    def __init__(
        self,
        *,
        status: int,
        type: str = "about:blank",
        title: str = "",
        detail: str = "",
        instance: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        method: str = "",
        url: str = "",
    ) -> None:
        self.status = status
        self.type = type
        self.title = title
        self.detail = detail
        self.instance = instance
        self.errors = list(errors or [])
        self.body = body
        self.headers = dict(headers or {})
        self.method = method
        self.url = url
        super().__init__(self._message())

    def _message(self) -> str:
        what = self.detail or self.title or "error"
        where = f" ({self.method} {self.url})" if self.method else ""
        return f"{self.status} {what}{where}"

    @property
    def slug(self) -> str | None:
        """The last part of an agentjobs problem `type` (`not-found`, `queue-full`, ...)."""
        if self.type.startswith(PROBLEM_BASE):
            return self.type[len(PROBLEM_BASE) :]
        return None

    @property
    def retry_after(self) -> float | None:
        """Seconds from the `Retry-After` header, when the server sent a number."""
        raw = self.headers.get("retry-after")
        if raw is None:
            return None
        try:
            return max(0.0, float(raw))
        except ValueError:
            return None


class BadRequest(APIError):
    """400: a malformed request (bad JSON, bad query parameter)."""


class Unauthorized(APIError):
    """401/403: a missing or wrong API key."""


class NotFound(APIError):
    """404: no such run (or not one this API key may see)."""


class Conflict(APIError):
    """409: the run is not in a state that allows this."""


class NotFinished(Conflict):
    """409 `not-finished`: no result yet (or cannot delete a run that is not finished)."""


class AlreadyFinished(Conflict):
    """409 `already-finished`: too late to cancel."""


class ValidationError(APIError):
    """422: the request is invalid; `errors` lists `{field, message}` per bad field."""


class IdempotencyConflict(ValidationError):
    """422 `idempotency-conflict`: the key was used before with a different request."""


class RateLimited(APIError):
    """429: slow down; `retry_after` says for how long."""


class ServerError(APIError):
    """5xx: the server failed."""


class ServiceUnavailable(ServerError):
    """503: queue full, storage unavailable or shutting down; nothing was changed."""


class RunFailed(AgentJobsError):
    """The run finished as failed; `result` is its `RunResult` (with `error`)."""

    def __init__(self, result: RunResult) -> None:
        kind = f" ({result.error_kind})" if result.error_kind else ""
        super().__init__(f"run {result.id} failed{kind}: {result.error}")
        self.result = result


class RunCancelled(AgentJobsError):
    """The run was cancelled; `result` is its `RunResult`."""

    def __init__(self, result: RunResult) -> None:
        super().__init__(f"run {result.id} was cancelled: {result.error or 'no reason given'}")
        self.result = result


class WaitTimeout(AgentJobsError, TimeoutError):
    """The run did not finish within the time the caller was willing to wait."""

    def __init__(self, run_id: str, timeout: float) -> None:
        super().__init__(f"run {run_id} did not finish within {timeout:g} s")
        self.run_id = run_id
        self.timeout = timeout


_BY_SLUG: dict[str, type[APIError]] = {
    "not-found": NotFound,
    "not-finished": NotFinished,
    "already-finished": AlreadyFinished,
    "idempotency-conflict": IdempotencyConflict,
    "validation-error": ValidationError,
    "unsupported-field": ValidationError,
    "rate-limited": RateLimited,
    "queue-full": ServiceUnavailable,
    "storage-unavailable": ServiceUnavailable,
    "shutting-down": ServiceUnavailable,
}

_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Unauthorized,
    404: NotFound,
    409: Conflict,
    422: ValidationError,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_for_response(
    status: int, body: Any, headers: Mapping[str, str], method: str, url: str
) -> APIError:
    """The typed error for an error answer, from its problem document (or whatever JSON)."""
    doc: dict[str, Any] = body if isinstance(body, dict) else {}
    type_ = str(doc.get("type") or "about:blank")
    detail = doc.get("detail")
    if not isinstance(detail, str):
        # FastAPI validation lists, PraisonAI's middleware {"error": ...}, or plain text
        if detail is not None:
            detail = str(detail)
        elif isinstance(doc.get("error"), str):
            detail = doc["error"]
        elif isinstance(body, str):
            detail = body.strip()[:500]
        else:
            detail = ""
    errors = doc.get("errors")
    slug = type_[len(PROBLEM_BASE) :] if type_.startswith(PROBLEM_BASE) else None
    cls = _BY_SLUG.get(slug or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else APIError
    return cls(
        status=status,
        type=type_,
        title=str(doc.get("title") or ""),
        detail=detail,
        instance=doc.get("instance") if isinstance(doc.get("instance"), str) else None,
        errors=errors if isinstance(errors, list) else None,
        body=body,
        headers={k.lower(): v for k, v in headers.items()},
        method=method,
        url=url,
    )
