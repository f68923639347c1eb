"""The HTTP face of the engine: a quart-trio app (REST + SSE) and the `serve` runner.

`create_app(engine, settings)` builds the app around an engine you opened yourself;
`serve(settings)` opens the engine and serves it with hypercorn until told to stop.
"""

from .app import create_app, current_tenant
from .server import RunningServer, serve
from .settings import ServerSettings

__all__ = ["RunningServer", "ServerSettings", "create_app", "current_tenant", "serve"]
