"""agentjobs: a durable, asynchronous job server for long-running AI-agent tasks.

Embed the engine directly::

    async with agentjobs.open_engine("./data") as engine:
        run = await engine.submit("hello")
        run = await engine.wait(run.id)

or run the HTTP server with `agentjobs serve`.
"""

from ._background import BackgroundEngine
from .engine import (
    TERMINAL,
    AlreadyFinished,
    Engine,
    EngineClosed,
    EngineConfig,
    EngineError,
    Event,
    EventType,
    IdempotencyConflict,
    InvalidRequest,
    NotFinished,
    NotFound,
    Page,
    Progress,
    QueueFull,
    RateLimited,
    Run,
    RunContext,
    RunError,
    Runner,
    RunSpec,
    Status,
    StorageUnavailable,
    SubmitOutcome,
    UnknownRunner,
    open_engine,
)

__version__ = "0.1.0"

__all__ = [
    "TERMINAL",
    "AlreadyFinished",
    "BackgroundEngine",
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
    "__version__",
    "open_engine",
]
