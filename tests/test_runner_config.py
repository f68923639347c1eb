"""Named runners from TOML, the environment and CLI flags; validation names the key."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from fakes.context import Recorder
from fakes.openai_server import Reply, open_fake_openai_server

from agentjobs.engine.runners import (
    CommandRunner,
    EchoRunner,
    OpenAIRunner,
    PythonRunner,
    RunnerConfigError,
    RunnerSet,
    UnknownRunnerError,
    build_runner,
    load_runners,
    runner_from_env,
    runners_from_cli,
)

EXAMPLE = """
default = "llm"

[server]            # other sections belong to other parts of the server
port = 8080

[runners.fast]
type = "echo"

[runners.llm]
type = "openai"
base_url = "http://127.0.0.1:11434/v1"
model = "llama3.2"
api_key_env = "AGENTJOBS_TEST_KEY"
temperature = 0.3
allow_config_overrides = ["temperature", "model"]
allowed_models = ["llama3.2", "qwen2.5"]

[runners.agent]
type = "command"
argv = ["cat"]
result = "json"
env_allow = ["PATH", "HOME"]
cwd = "work"
retryable_exit_codes = [75]
kill_grace_s = 2

[runners.mine]
type = "python"
target = "plugin_mod:answer"
python_path = ["plugins"]
"""


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(sys, "path", list(sys.path))  # python_path entries are undone
    monkeypatch.delitem(sys.modules, "plugin_mod", raising=False)
    monkeypatch.setenv("AGENTJOBS_TEST_KEY", "sk-from-env-123")
    (tmp_path / "work").mkdir()
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "plugin_mod.py").write_text("def answer(ctx):\n    return 42\n")
    (tmp_path / "agentjobs.toml").write_text(EXAMPLE)
    return tmp_path


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agentjobs.toml"
    path.write_text(text)
    return path


def test_loads_the_example(config_dir: Path) -> None:
    rs = load_runners(config_dir / "agentjobs.toml")
    assert rs.default == "llm"
    assert rs.names == ("fast", "llm", "agent", "mine")
    assert isinstance(rs.get("fast"), EchoRunner)

    llm = rs.get()
    assert isinstance(llm, OpenAIRunner)
    assert (llm.model, llm.temperature, llm.api_key) == ("llama3.2", 0.3, "sk-from-env-123")
    assert llm.allow_config_overrides == {"temperature", "model"}
    assert "sk-from-env-123" not in repr(rs)

    agent = rs.get("agent")
    assert isinstance(agent, CommandRunner)
    assert agent.argv == ("cat",)
    assert agent.result == "json"
    assert agent.cwd == str(config_dir / "work")  # relative to the config file
    assert agent.retryable_exit_codes == {75}

    mine = rs.get("mine")
    assert isinstance(mine, PythonRunner)


async def test_loaded_runners_run(config_dir: Path) -> None:
    rs = load_runners(config_dir / "agentjobs.toml")
    assert await rs.get("mine").run(Recorder().ctx()) == 42
    assert await rs.get("agent").run(Recorder().ctx('{"x": 1}')) == {"x": 1}
    assert await rs.get("fast").run(Recorder().ctx("echo me")) == "echo me"


async def test_openai_from_config_against_the_fake_server(tmp_path: Path) -> None:
    async with open_fake_openai_server(Reply(text="configured")) as server:
        path = write(
            tmp_path,
            f'[runners.llm]\ntype = "openai"\nbase_url = "{server.base_url}"\nmodel = "m"\n',
        )
        rs = load_runners(path)
        assert rs.default == "llm"  # the only runner is the default
        try:
            assert await rs.get().run(Recorder().ctx()) == "configured"
        finally:
            await rs.aclose()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[runners.a]\ntype = "magic"', "runners.a.type: unknown runner type 'magic'"),
        ("[runners.a]\nmodel = 'x'", "runners.a.type: required"),
        ('[runners.a]\ntype = "openai"', "runners.a.model: required for a openai runner"),
        (
            '[runners.a]\ntype = "openai"\nmodel = "m"\ntemprature = 1',
            "runners.a.temprature: unknown key for a openai runner",
        ),
        (
            '[runners.a]\ntype = "openai"\nmodel = "m"\ntemperature = "hot"',
            "runners.a.temperature: expected a number, got 'hot'",
        ),
        (
            '[runners.a]\ntype = "openai"\nmodel = "m"\ntemperature = 9',
            "runners.a.temperature: must be between 0 and 2",
        ),
        (
            '[runners.a]\ntype = "openai"\nmodel = "m"\napi_key_env = "AGENTJOBS_UNSET_VAR_XYZ"',
            "runners.a.api_key_env: environment variable AGENTJOBS_UNSET_VAR_XYZ is not set",
        ),
        (
            '[runners.a]\ntype = "openai"\nmodel = "m"\napi_key = "k"\napi_key_env = "HOME"',
            "give either api_key_env or api_key",
        ),
        ('[runners.a]\ntype = "command"\nargv = "cat"', "runners.a.argv: expected a list"),
        (
            '[runners.a]\ntype = "command"\nargv = ["cat"]\nshell = "yes"',
            "runners.a.shell: expected true or false",
        ),
        (
            '[runners.a]\ntype = "command"\nargv = ["no-such-agent-xyz"]',
            "runners.a.argv: executable 'no-such-agent-xyz' not found",
        ),
        (
            '[runners.a]\ntype = "command"\nargv = ["cat"]\nmax_output_bytes = 1.5',
            "runners.a.max_output_bytes: expected an integer",
        ),
        (
            '[runners.a]\ntype = "python"\ntarget = "no_such_mod_xyz:f"',
            "runners.a.target: cannot import module 'no_such_mod_xyz'",
        ),
        ('[runners.a]\ntype = "echo"\ndelay = 1', "runners.a.delay: unknown key for a echo runner"),
        ("[runners]", "runners: expected at least one"),
        ("x = 1", "no [runners] table"),
        ('[runners.a]\ntype = "echo"\n[runners.b]\ntype = "echo"', "default: required when"),
        ('default = "c"\n[runners.a]\ntype = "echo"', "default: 'c' is not a configured runner"),
        ("runners = [", "invalid TOML"),
    ],
)
def test_validation_errors_name_the_key(tmp_path: Path, toml: str, message: str) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(RunnerConfigError) as info:
        load_runners(path)
    assert message in str(info.value)
    assert str(info.value).startswith(str(path))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RunnerConfigError, match="no such file"):
        load_runners(tmp_path / "nope.toml")


def test_build_runner_directly() -> None:
    runner = build_runner(
        "llm",
        {"type": "openai", "model": "m", "api_key_env": "K"},
        environ={"K": "sk-x"},
    )
    assert isinstance(runner, OpenAIRunner)
    assert runner.api_key == "sk-x"


def test_runner_set_lookup() -> None:
    rs = RunnerSet(runners={"b": EchoRunner(), "a": EchoRunner()}, default="b")
    assert rs.get() is rs.get("b")
    with pytest.raises(UnknownRunnerError) as info:
        rs.get("zzz")
    assert info.value.available == ("a", "b")
    assert str(info.value) == "unknown runner 'zzz'; available: 'a', 'b'"


# ------------------------------------------------------------------ environment and CLI


def test_runner_from_env() -> None:
    env = {
        "OPENAI_BASE_URL": "http://localhost:8000/v1",
        "OPENAI_API_KEY": "sk-env",
        "AGENTJOBS_MODEL": "qwen",
    }
    r = runner_from_env(environ=env)
    assert (r.base_url, r.model, r.api_key) == ("http://localhost:8000/v1", "qwen", "sk-env")
    r2 = runner_from_env(base_url="http://other:1/v1", model="x", environ=env)
    assert (r2.base_url, r2.model) == ("http://other:1/v1", "x")
    assert runner_from_env(environ={"AGENTJOBS_MODEL": "m", "OPENAI_BASE_URL": "http://h/v1"})
    with pytest.raises(RunnerConfigError, match="pass --model or set AGENTJOBS_MODEL"):
        runner_from_env(environ={})
    with pytest.raises(RunnerConfigError, match="OPENAI_API_KEY is not set"):
        runner_from_env(environ={"AGENTJOBS_MODEL": "gpt-4o-mini"})


@pytest.mark.parametrize(
    ("kwargs", "kind"),
    [
        ({}, EchoRunner),
        ({"runner": "echo"}, EchoRunner),
        (
            {"runner": "openai", "openai_base_url": "http://127.0.0.1:11434/v1", "model": "m"},
            OpenAIRunner,
        ),
        ({"runner": "command", "command": "cat -u"}, CommandRunner),
        ({"runner": "python", "python_target": "json:dumps"}, PythonRunner),
    ],
)
def test_runners_from_cli_flags(kwargs: dict[str, Any], kind: type) -> None:
    rs = runners_from_cli(environ={}, **kwargs)
    assert isinstance(rs.get(), kind)
    assert rs.names == (kwargs.get("runner", "echo"),)


def test_runners_from_cli_errors_and_config(config_dir: Path) -> None:
    with pytest.raises(RunnerConfigError, match="needs --command"):
        runners_from_cli(runner="command")
    with pytest.raises(RunnerConfigError, match="needs --python-target"):
        runners_from_cli(runner="python")
    with pytest.raises(RunnerConfigError, match="unknown runner type 'gpt'"):
        runners_from_cli(runner="gpt")
    cfg = config_dir / "agentjobs.toml"
    assert runners_from_cli(config=cfg).default == "llm"
    assert runners_from_cli(config=cfg, runner="fast").default == "fast"
    with pytest.raises(UnknownRunnerError, match="available: 'agent', 'fast', 'llm', 'mine'"):
        runners_from_cli(config=cfg, runner="nope")


def test_toml_examples_in_the_docs_are_valid() -> None:
    import re
    import tomllib

    docs = Path(__file__).parent.parent / "docs" / "runners.md"
    blocks = re.findall(r"```toml\n(.*?)```", docs.read_text(), flags=re.S)
    assert len(blocks) >= 6
    env = {"OPENAI_API_KEY": "sk-doc", "VLLM_KEY": "k"}
    built = 0
    for block in blocks:
        for name, table in tomllib.loads(block).get("runners", {}).items():
            if table["type"] in ("openai", "echo"):
                build_runner(name, table, environ=env)
                built += 1
    assert built >= 6
