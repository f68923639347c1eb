"""The engine: journal, state fold, supervisor, actors, bus. Knows nothing of HTTP."""

from ._engine import Engine, EngineConfig, Page, SubmitOutcome, open_engine
from .errors import (
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
    UnknownRunner,
)
from .model import TERMINAL, Event, EventType, Progress, Run, RunSpec, Status
from .runners import RunContext, RunError, Runner

__all__ = [
    "TERMINAL",
    "AlreadyFinished",
    "Engine",
    "EngineClosed",
    "EngineConfig",
    "EngineError",
    "Event",
    "EventType",
    "IdempotencyConflict",
    "InvalidRequest",
    "NotFinished",
    "NotFound",
    "Page",
    "Progress",
    "QueueFull",
    "RateLimited",
    "Run",
    "RunContext",
    "RunError",
    "RunSpec",
    "Runner",
    "Status",
    "StorageUnavailable",
    "SubmitOutcome",
    "UnknownRunner",
    "open_engine",
]
