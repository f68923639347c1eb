"""`agentjobs.client`: talk to an agentjobs server (or a PraisonAI jobs server) over HTTP.

    from agentjobs.client import Client

    with Client("http://127.0.0.1:8005") as client:
        outcome = client.submit_and_wait("Analyze data", timeout=600)
        print(outcome.result)

`Client` blocks (and may be shared between threads); `AsyncClient` is the same API with
`await`, under trio or asyncio. See docs/client.md.
"""

from ..engine.model import Status
from ._async import AsyncClient, AsyncEventStream
from ._errors import (
    AgentJobsError,
    AlreadyFinished,
    APIError,
    BadRequest,
    Conflict,
    IdempotencyConflict,
    NotFinished,
    NotFound,
    RateLimited,
    RunCancelled,
    RunFailed,
    ServerError,
    ServiceUnavailable,
    TransportError,
    Unauthorized,
    ValidationError,
    WaitTimeout,
)
from ._models import (
    BatchItem,
    BatchResult,
    CancelledEvent,
    ErrorEvent,
    HeartbeatEvent,
    OutputEvent,
    Progress,
    ProgressEvent,
    ResultEvent,
    Run,
    RunResult,
    ShutdownEvent,
    StatusEvent,
    StreamEvent,
)
from ._sync import Client, EventStream

__all__ = [
    "APIError",
    "AgentJobsError",
    "AlreadyFinished",
    "AsyncClient",
    "AsyncEventStream",
    "BadRequest",
    "BatchItem",
    "BatchResult",
    "CancelledEvent",
    "Client",
    "Conflict",
    "ErrorEvent",
    "EventStream",
    "HeartbeatEvent",
    "IdempotencyConflict",
    "NotFinished",
    "NotFound",
    "OutputEvent",
    "Progress",
    "ProgressEvent",
    "RateLimited",
    "ResultEvent",
    "Run",
    "RunCancelled",
    "RunFailed",
    "RunResult",
    "ServerError",
    "ServiceUnavailable",
    "ShutdownEvent",
    "Status",
    "StatusEvent",
    "StreamEvent",
    "TransportError",
    "Unauthorized",
    "ValidationError",
    "WaitTimeout",
]
