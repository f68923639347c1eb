"""Built-in runners and the runner protocol."""

from ._base import RunContext, RunError, Runner, SessionTurn
from .echo import EchoRunner

__all__ = ["EchoRunner", "RunContext", "RunError", "Runner", "SessionTurn"]
