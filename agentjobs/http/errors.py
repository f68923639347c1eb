"""RFC 9457 problem details: every error answer of the API, and the engine errors they map.

Each kind of problem has a stable `type` URI, `https://agentjobs.dev/problems/<slug>`, listed
in `PROBLEMS` and documented one by one in docs/api.md (a test checks that every slug is
documented). The URIs are identifiers, not links: clients branch on them without fetching.

`detail` is always a human-readable string, because PraisonAI clients read
`response.json()["detail"]` and print it. Validation problems add `errors`, a list of
`{field, message}` objects, so a program can tell which field to fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import orjson
from quart import Response

from ..engine import (
    AlreadyFinished,
    EngineClosed,
    EngineError,
    IdempotencyConflict,
    InvalidRequest,
    NotFinished,
    NotFound,
    QueueFull,
    RateLimited,
    StorageUnavailable,
)

__all__ = [
    "PROBLEMS",
    "PROBLEM_BASE",
    "FieldError",
    "Problem",
    "ProblemType",
    "from_engine_error",
    "problem_response",
]

PROBLEM_BASE = "https://agentjobs.dev/problems/"
PROBLEM_CONTENT_TYPE = "application/problem+json"


@attrs.frozen(slots=True)
class ProblemType:
    slug: str
    title: str
    status: int

    @property
    def uri(self) -> str:
        return PROBLEM_BASE + self.slug


PROBLEMS: dict[str, ProblemType] = {
    p.slug: p
    for p in (
        ProblemType("bad-request", "Bad request", 400),
        ProblemType("malformed-json", "The request body is not valid JSON", 400),
        ProblemType("invalid-parameter", "A query parameter or header is invalid", 400),
        ProblemType("unauthorized", "A valid API key is required", 401),
        ProblemType("cors-rejected", "Cross-origin request not allowed", 403),
        ProblemType("not-found", "No such run", 404),
        ProblemType("route-not-found", "No such endpoint", 404),
        ProblemType("method-not-allowed", "Method not allowed on this endpoint", 405),
        ProblemType("not-finished", "The run is not finished", 409),
        ProblemType("already-finished", "The run is already finished", 409),
        ProblemType("payload-too-large", "The request body is too large", 413),
        ProblemType("unsupported-media-type", "The request body must be JSON", 415),
        ProblemType("validation-error", "The request is invalid", 422),
        ProblemType("unsupported-field", "A field is not supported by this server", 422),
        ProblemType("idempotency-conflict", "Idempotency key reused with a different body", 422),
        ProblemType("rate-limited", "Too many requests", 429),
        ProblemType("internal-error", "Internal server error", 500),
        ProblemType("queue-full", "The queue is full", 503),
        ProblemType("storage-unavailable", "Storage is unavailable", 503),
        ProblemType("shutting-down", "The server is shutting down", 503),
    )
}


@attrs.frozen(slots=True)
class FieldError:
    """One invalid field: `field` is its name in the request (`prompt`, `Idempotency-Key`)."""

    field: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class Problem(Exception):
    """Raise from a handler to answer with a problem document.

    `status` defaults to the type's; some types (`invalid-parameter`) are used with more
    than one status so that PraisonAI's status codes are kept (400 for a bad `status`
    filter, 422 for an out-of-range page).
    """

    def __init__(
        self,
        slug: str,
        detail: str,
        *,
        status: int | None = None,
        errors: Sequence[FieldError] = (),
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail)
        self.type = PROBLEMS[slug]
        self.detail = detail
        self.status = status if status is not None else self.type.status
        self.errors = tuple(errors)
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def body(self, instance: str | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "type": self.type.uri,
            "title": self.type.title,
            "status": self.status,
            "detail": self.detail,
        }
        if instance is not None:
            doc["instance"] = instance
        if self.errors:
            doc["errors"] = [e.as_dict() for e in self.errors]
        doc.update(self.extra)
        return doc


def validation(errors: Sequence[FieldError]) -> Problem:
    """A 422 naming every invalid field; `detail` lists them in one readable line."""
    detail = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return Problem("validation-error", detail, errors=errors)


def problem_response(problem: Problem, instance: str | None = None) -> Response:
    headers = dict(problem.headers)
    return Response(
        orjson.dumps(problem.body(instance)),
        status=problem.status,
        headers=headers,
        content_type=PROBLEM_CONTENT_TYPE,
    )


def _retry_after(seconds: float) -> str:
    return str(max(1, round(seconds)))


def from_engine_error(exc: EngineError) -> Problem:
    """The HTTP answer for an engine error. Unknown subclasses become 500 (a bug to fix)."""
    if isinstance(exc, NotFound):
        return Problem("not-found", f"Job not found: {exc.run_id}", extra={"job_id": exc.run_id})
    if isinstance(exc, NotFinished):
        return Problem(
            "not-finished",
            f"Job is not complete. Current status: {exc.status}",
            extra={"job_id": exc.run_id, "job_status": exc.status},
        )
    if isinstance(exc, AlreadyFinished):
        return Problem(
            "already-finished",
            f"Job is already complete. Status: {exc.status}",
            extra={"job_id": exc.run_id, "job_status": exc.status},
        )
    if isinstance(exc, IdempotencyConflict):
        return Problem(
            "idempotency-conflict",
            f"Idempotency-Key {exc.key!r} was already used with a different request body "
            f"(job {exc.run_id}); use a new key for a new request",
            extra={"job_id": exc.run_id},
        )
    if isinstance(exc, InvalidRequest):  # includes UnknownRunner
        return validation([FieldError(exc.field, exc.message)])
    if isinstance(exc, QueueFull):
        return Problem(
            "queue-full", str(exc), headers={"Retry-After": _retry_after(exc.retry_after)}
        )
    if isinstance(exc, RateLimited):
        return Problem(
            "rate-limited", str(exc), headers={"Retry-After": _retry_after(exc.retry_after)}
        )
    if isinstance(exc, StorageUnavailable):
        return Problem(
            "storage-unavailable",
            str(exc),
            headers={"Retry-After": _retry_after(exc.retry_after)},
        )
    if isinstance(exc, EngineClosed):
        return Problem("shutting-down", str(exc), headers={"Retry-After": "5"})
    return Problem("internal-error", f"unexpected engine error: {type(exc).__name__}")
