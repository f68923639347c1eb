"""Errors the engine raises to its callers. Each maps to one HTTP answer in `agentjobs.http`,
but nothing here knows about HTTP: research scripts catch these directly."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "AlreadyFinished",
    "EngineClosed",
    "EngineError",
    "IdempotencyConflict",
    "InvalidRequest",
    "NotFinished",
    "NotFound",
    "QueueFull",
    "RateLimited",
    "StorageUnavailable",
    "UnknownRunner",
]


class EngineError(Exception):
    """Base class of everything the engine raises on purpose."""


class NotFound(EngineError):
    """No such run (or not one the caller's tenant may see: we do not say which)."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run not found: {run_id}")
        self.run_id = run_id


class AlreadyFinished(EngineError):
    """The run is already finished, so it cannot be cancelled."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} is already finished (status: {status})")
        self.run_id = run_id
        self.status = status


class NotFinished(EngineError):
    """The run is not finished yet (no result to give, or cannot be deleted)."""

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(f"run {run_id} is not finished (status: {status})")
        self.run_id = run_id
        self.status = status


class QueueFull(EngineError):
    """Admission refused: the queue is at its limit. Retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RateLimited(EngineError):
    """A per-tenant rate or quota limit was hit. Retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdempotencyConflict(EngineError):
    """The idempotency key was used before with a different request."""

    def __init__(self, key: str, run_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for a different request (run {run_id})"
        )
        self.key = key
        self.run_id = run_id


class InvalidRequest(EngineError):
    """A submit the engine cannot accept; `field` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class UnknownRunner(InvalidRequest):
    def __init__(self, name: str, available: Sequence[str]) -> None:
        super().__init__(
            "runner", f"unknown runner {name!r}; available: {', '.join(sorted(available))}"
        )
        self.name = name
        self.available = tuple(sorted(available))


class StorageUnavailable(EngineError):
    """The journal could not make the change durable; nothing was changed. Retry later."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosed(EngineError):
    """The engine is shutting down and takes no new work."""
