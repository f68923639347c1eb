"""Named runners from a TOML file, from the environment, or from CLI flags.

The server runs with a *set* of named runners and a default: a run may ask for one by name
(`"runner": "llm"` in its body), otherwise it gets the default. The set comes from a small
TOML file so that operators can describe several endpoints and agents without code:

```toml
default = "llm"

[runners.fast]
type = "echo"

[runners.llm]
type = "openai"
base_url = "https://api.openai.com/v1"
model = "gpt-4o-mini"
api_key_env = "OPENAI_API_KEY"     # the *name* of an env var; keeps the secret out of the file

[runners.agent]
type = "command"
argv = ["my-agent", "--json"]
result = "json"
env_allow = ["PATH", "HOME"]

[runners.mine]
type = "python"
target = "mypkg.mod:fn"
```

Every validation error is a `RunnerConfigError` that names the offending key
(`runners.llm.temperature: expected a number, got 'hot'`), because a server that refuses to
start must say exactly what to fix. Runners are *constructed* here, so import errors of a
python target, a missing executable or a missing API key variable surface at start-up, not on
the first run.

Top-level keys other than `default` and `runners` are ignored: the same file may carry
sections read by other parts of the server.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from ._base import Runner

if TYPE_CHECKING:
    from .openai import OpenAIRunner

__all__ = [
    "RUNNER_TYPES",
    "RunnerConfigError",
    "RunnerSet",
    "UnknownRunnerError",
    "build_runner",
    "load_runners",
    "runner_from_env",
    "runners_from_cli",
    "runners_from_mapping",
]

RUNNER_TYPES = ("echo", "openai", "command", "python")


class RunnerConfigError(ValueError):
    """A runner cannot be built from its configuration; the message names the key to fix.

    Raised at construction time (start-up), never while a run executes: a run-time problem
    is a `RunError`.
    """


class UnknownRunnerError(LookupError):
    """A run asked for a runner name that is not configured (the HTTP layer answers 422)."""

    def __init__(self, name: str, available: Sequence[str]) -> None:
        self.name = name
        self.available = tuple(available)
        listing = ", ".join(repr(n) for n in self.available) or "none"
        super().__init__(f"unknown runner {name!r}; available: {listing}")


@attrs.frozen(slots=True)
class RunnerSet:
    """The configured runners by name, and which one a run gets when it names none."""

    runners: dict[str, Runner]
    default: str

    def __attrs_post_init__(self) -> None:
        if self.default not in self.runners:
            raise RunnerConfigError(
                f"default: {self.default!r} is not a configured runner "
                f"(configured: {', '.join(sorted(self.runners)) or 'none'})"
            )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.runners)

    def get(self, name: str | None = None) -> Runner:
        """The runner called `name`, or the default for `None`; `UnknownRunnerError` else."""
        key = self.default if name is None else name
        try:
            return self.runners[key]
        except KeyError:
            raise UnknownRunnerError(key, sorted(self.runners)) from None

    async def aclose(self) -> None:
        """Release what runners hold (HTTP connection pools). Call once at shutdown."""
        for runner in self.runners.values():
            aclose = getattr(runner, "aclose", None)
            if aclose is not None:
                await aclose()


# --------------------------------------------------------------------------- loading


def load_runners(path: str | os.PathLike[str]) -> RunnerSet:
    """Read a TOML file and build its runners (see the module docstring for the format)."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise RunnerConfigError(f"{p}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise RunnerConfigError(f"{p}: invalid TOML: {exc}") from None
    return runners_from_mapping(data, base_dir=p.parent, source=str(p))


def runners_from_mapping(
    data: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
) -> RunnerSet:
    """Build a `RunnerSet` from already parsed config data (e.g. a TOML file read elsewhere).

    Relative paths (a command's `cwd`, a python runner's `python_path`) are resolved against
    `base_dir`, normally the directory of the config file, so a config works the same from
    any working directory.
    """
    tables = data.get("runners")
    if tables is None:
        raise RunnerConfigError(f"{source}: no [runners] table")
    if not isinstance(tables, Mapping) or not tables:
        raise RunnerConfigError(f"{source}: runners: expected at least one [runners.NAME] table")
    runners: dict[str, Runner] = {}
    for name, table in tables.items():
        if not isinstance(table, Mapping):
            raise RunnerConfigError(f"{source}: runners.{name}: expected a table")
        try:
            runners[name] = build_runner(name, table, base_dir=base_dir, environ=environ)
        except RunnerConfigError as exc:
            raise RunnerConfigError(f"{source}: {exc}") from exc.__cause__
    default = data.get("default")
    if default is None:
        if len(runners) != 1:
            raise RunnerConfigError(
                f"{source}: default: required when several runners are configured "
                f"(one of {', '.join(runners)})"
            )
        default = next(iter(runners))
    if not isinstance(default, str):
        raise RunnerConfigError(f"{source}: default: expected a runner name (a string)")
    try:
        return RunnerSet(runners=runners, default=default)
    except RunnerConfigError as exc:
        raise RunnerConfigError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------- one runner

# Per type: key -> checker(where, value) returning the value the constructor wants.
_Checker = Callable[[str, Any], Any]


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str):
        raise RunnerConfigError(f"{where}: expected a string, got {value!r}")
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RunnerConfigError(f"{where}: expected true or false, got {value!r}")
    return value


def _int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RunnerConfigError(f"{where}: expected an integer, got {value!r}")
    return value


def _num(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RunnerConfigError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _str_list(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RunnerConfigError(f"{where}: expected a list of strings, got {value!r}")
    return list(value)


def _int_list(where: str, value: Any) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        raise RunnerConfigError(f"{where}: expected a list of integers, got {value!r}")
    return list(value)


def _str_table(where: str, value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise RunnerConfigError(f"{where}: expected a table of strings, got {value!r}")
    return dict(value)


def _table(where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise RunnerConfigError(f"{where}: expected a table, got {value!r}")
    return dict(value)


_ECHO_KEYS: dict[str, _Checker] = {}

_OPENAI_KEYS: dict[str, _Checker] = {
    "base_url": _str,
    "model": _str,
    "api_key": _str,
    "api_key_env": _str,
    "system_prompt": _str,
    "temperature": _num,
    "top_p": _num,
    "max_tokens": _int,
    "timeout_s": _num,
    "connect_timeout_s": _num,
    "allow_config_overrides": _str_list,
    "allowed_models": _str_list,
    "max_tokens_limit": _int,
    "use_session_history": _bool,
    "history_max_turns": _int,
    "history_max_chars": _int,
    "include_usage": _bool,
    "extra_headers": _str_table,
    "extra_body": _table,
    "coalesce_s": _num,
    "max_connections": _int,
}

_COMMAND_KEYS: dict[str, _Checker] = {
    "argv": _str_list,
    "shell": _bool,
    "cwd": _str,
    "env": _str_table,
    "env_allow": _str_list,
    "prompt_on_stdin": _bool,
    "result": _str,
    "max_output_bytes": _int,
    "stderr_tail_bytes": _int,
    "kill_grace_s": _num,
    "timeout_s": _num,
    "retryable_exit_codes": _int_list,
    "check_executable": _bool,
}

_PYTHON_KEYS: dict[str, _Checker] = {
    "target": _str,
    "python_path": _str_list,
    "cancel_grace_s": _num,
    "max_threads": _int,
}

_KEYS: dict[str, dict[str, _Checker]] = {
    "echo": _ECHO_KEYS,
    "openai": _OPENAI_KEYS,
    "command": _COMMAND_KEYS,
    "python": _PYTHON_KEYS,
}

_REQUIRED: dict[str, tuple[str, ...]] = {
    "echo": (),
    "openai": ("model",),
    "command": ("argv",),
    "python": ("target",),
}


def build_runner(
    name: str,
    table: Mapping[str, Any],
    *,
    base_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Runner:
    """Build the runner described by one `[runners.NAME]` table.

    Unknown keys are errors (a typo must not silently fall back to a default); so are
    missing required keys and values of the wrong type. `environ` (default `os.environ`)
    is where `api_key_env` is looked up.
    """
    env = os.environ if environ is None else environ
    prefix = f"runners.{name}"
    kind = table.get("type")
    if kind is None:
        raise RunnerConfigError(f"{prefix}.type: required (one of {', '.join(RUNNER_TYPES)})")
    if kind not in _KEYS:
        raise RunnerConfigError(
            f"{prefix}.type: unknown runner type {kind!r} (one of {', '.join(RUNNER_TYPES)})"
        )
    checkers = _KEYS[kind]
    opts: dict[str, Any] = {}
    for key, value in table.items():
        if key == "type":
            continue
        checker = checkers.get(key)
        if checker is None:
            known = ", ".join(sorted(checkers)) or "none"
            raise RunnerConfigError(
                f"{prefix}.{key}: unknown key for a {kind} runner (known keys: {known})"
            )
        opts[key] = checker(f"{prefix}.{key}", value)
    for key in _REQUIRED[kind]:
        if key not in opts:
            raise RunnerConfigError(f"{prefix}.{key}: required for a {kind} runner")

    base = Path(base_dir) if base_dir is not None else None
    try:
        if kind == "echo":
            from .echo import EchoRunner

            return EchoRunner()
        if kind == "openai":
            return _build_openai(prefix, opts, env)
        if kind == "command":
            from .command import CommandRunner

            if base is not None and isinstance(opts.get("cwd"), str):
                opts["cwd"] = str(base / opts["cwd"])
            if "retryable_exit_codes" in opts:
                opts["retryable_exit_codes"] = frozenset(opts["retryable_exit_codes"])
            argv = opts.pop("argv")
            return CommandRunner(argv, **opts)
        # python
        from .python import PythonRunner

        if base is not None and "python_path" in opts:
            opts["python_path"] = [str(base / p) for p in opts["python_path"]]
        target = opts.pop("target")
        return PythonRunner(target, **opts)
    except RunnerConfigError as exc:
        raise RunnerConfigError(_qualify(prefix, str(exc))) from exc.__cause__


def _qualify(prefix: str, message: str) -> str:
    """Runners name their own options (`temperature: ...`); prefix the table's path."""
    return message if message.startswith(prefix) else f"{prefix}.{message}"


def _build_openai(prefix: str, opts: dict[str, Any], env: Mapping[str, str]) -> OpenAIRunner:
    from .openai import OpenAIRunner

    key_env = opts.pop("api_key_env", None)
    if key_env is not None:
        if "api_key" in opts:
            raise RunnerConfigError(
                f"{prefix}.api_key_env: give either api_key_env or api_key, not both"
            )
        value = env.get(key_env)
        if not value:
            raise RunnerConfigError(
                f"{prefix}.api_key_env: environment variable {key_env} is not set or empty"
            )
        opts["api_key"] = value
    for key in ("allow_config_overrides", "allowed_models"):
        if key in opts:
            opts[key] = frozenset(opts[key])
    return OpenAIRunner(**opts)


# --------------------------------------------------------------------------- env and CLI

DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"


def runner_from_env(
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    environ: Mapping[str, str] | None = None,
    **options: Any,
) -> OpenAIRunner:
    """An `openai` runner from explicit values, else `OPENAI_BASE_URL`, `OPENAI_API_KEY`,
    `AGENTJOBS_MODEL` (the conventional variables, so `agentjobs serve --runner openai`
    works against whatever the shell already points at).

    The base URL defaults to OpenAI's; a model is required (there is no sensible default
    across servers). A key is required only for api.openai.com: local servers (Ollama,
    vLLM, llama.cpp) usually take none.
    """
    from .openai import OpenAIRunner

    env = os.environ if environ is None else environ
    url = base_url or env.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL
    chosen = model or env.get("AGENTJOBS_MODEL")
    if not chosen:
        raise RunnerConfigError("model: no model given; pass --model or set AGENTJOBS_MODEL")
    key = api_key if api_key is not None else (env.get("OPENAI_API_KEY") or None)
    if key is None and "api.openai.com" in url:
        raise RunnerConfigError(
            "api_key: OPENAI_API_KEY is not set, and api.openai.com requires a key"
        )
    return OpenAIRunner(base_url=url, model=chosen, api_key=key, **options)


def runners_from_cli(
    *,
    runner: str | None = None,
    config: str | os.PathLike[str] | None = None,
    openai_base_url: str | None = None,
    model: str | None = None,
    command: str | Sequence[str] | None = None,
    python_target: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> RunnerSet:
    """The runner set for `agentjobs serve` flags, in one place so the CLI stays thin.

    - `--config FILE`: the file's runners; `--runner NAME` then picks the default among
      them (an unknown name is an error listing the configured ones).
    - no config: `--runner` is a runner *type* (default `echo`), built from the flags:
      `openai` from `--openai-base-url`/`--model` and the environment (`runner_from_env`),
      `command` from `--command "my-agent --json"` (split like a shell would, but run
      without one), `python` from `--python-target mod:fn`. The set holds that one runner,
      named after its type.
    """
    if config is not None:
        loaded = load_runners(config)
        if runner is None:
            return loaded
        if runner not in loaded.runners:
            raise UnknownRunnerError(runner, sorted(loaded.runners))
        return RunnerSet(runners=loaded.runners, default=runner)

    kind = runner or "echo"
    built: Runner
    if kind == "echo":
        from .echo import EchoRunner

        built = EchoRunner()
    elif kind == "openai":
        built = runner_from_env(base_url=openai_base_url, model=model, environ=environ)
    elif kind == "command":
        from .command import CommandRunner

        if not command:
            raise RunnerConfigError("command: --runner command needs --command")
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        built = CommandRunner(argv)
    elif kind == "python":
        from .python import PythonRunner

        if not python_target:
            raise RunnerConfigError("target: --runner python needs --python-target mod:fn")
        built = PythonRunner(python_target)
    else:
        raise RunnerConfigError(
            f"runner: unknown runner type {kind!r} (one of {', '.join(RUNNER_TYPES)}); "
            "use --config to define named runners"
        )
    return RunnerSet(runners={kind: built}, default=kind)
