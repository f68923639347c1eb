"""Built-in runners and the runner protocol.

`echo` (demos, tests, benchmarks), `command` (a subprocess per run), `python`
(`module:function`, sync or async) and `openai` (any OpenAI-compatible chat endpoint);
`config` builds named sets of them from a TOML file, the environment or CLI flags.
"""

from ._base import RunContext, RunError, Runner, SessionTurn
from .command import CommandRunner
from .config import (
    RunnerConfigError,
    RunnerSet,
    UnknownRunnerError,
    build_runner,
    load_runners,
    runner_from_env,
    runners_from_cli,
    runners_from_mapping,
)
from .echo import EchoRunner
from .openai import OpenAIRunner
from .python import PythonRunner, RunCancelled, ThreadContext

__all__ = [
    "CommandRunner",
    "EchoRunner",
    "OpenAIRunner",
    "PythonRunner",
    "RunCancelled",
    "RunContext",
    "RunError",
    "Runner",
    "RunnerConfigError",
    "RunnerSet",
    "SessionTurn",
    "ThreadContext",
    "UnknownRunnerError",
    "build_runner",
    "load_runners",
    "runner_from_env",
    "runners_from_cli",
    "runners_from_mapping",
]
