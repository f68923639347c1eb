"""The `command` runner with real subprocesses: streaming, results, failures, and cleanup."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest
import trio
from fakes.context import Recorder

from agentjobs.engine.runners import CommandRunner, RunError, RunnerConfigError

GRACE = 0.3  # kill_grace_s for the termination tests: short, to keep the suite fast


def gone(pid: int) -> bool:
    """No such process, or only a zombie (where PID 1 does not reap orphans)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def run(runner: CommandRunner, prompt: str = "hello", **ctx: Any) -> tuple[Any, Recorder]:
    rec = Recorder()
    context = rec.ctx(prompt, **ctx)
    result = await runner.run(context)
    rec.progress.append({"metrics": context.metrics})
    return result, rec


async def fails(runner: CommandRunner, prompt: str = "hello") -> tuple[RunError, dict[str, Any]]:
    ctx = Recorder().ctx(prompt)
    with pytest.raises(RunError) as info:
        await runner.run(ctx)
    return info.value, ctx.metrics


# ------------------------------------------------------------------ streaming and results


async def test_streams_stdout_line_by_line() -> None:
    runner = CommandRunner(["sh", "-c", "echo one; sleep 0.05; echo two; printf three"])
    rec = Recorder()
    ctx = rec.ctx()
    result = await runner.run(ctx)
    assert result == "one\ntwo\nthree"
    assert rec.outputs == ["one\n", "two\n", "three"]
    assert rec.output_times[1] - rec.output_times[0] >= 0.04  # streamed, not at the end
    assert ctx.metrics["exit_code"] == 0
    assert ctx.metrics["duration_s"] > 0
    assert ctx.metrics["output_truncated"] is False


async def test_prompt_goes_to_stdin_by_default() -> None:
    prompt = "line 1\nline 2 with ünïcödé\n" * 3
    result, _ = await run(CommandRunner(["cat"]), prompt)
    assert result == prompt.strip()


async def test_large_prompt_and_output_do_not_deadlock() -> None:
    prompt = "x" * 2_000_000  # far beyond pipe buffers, both ways
    result, rec = await run(CommandRunner(["cat"], max_output_bytes=3_000_000), prompt)
    assert result == prompt
    assert rec.text == prompt


async def test_prompt_as_argument_and_placeholders() -> None:
    runner = CommandRunner(
        [
            sys.executable,
            "-c",
            "import sys, json; print(json.dumps(sys.argv[1:] + [sys.stdin.read()]))",
            "{prompt}",
            "run={run_id} attempt={attempt} session={session_id} {other}",
        ],
        result="json",
    )
    result, _ = await run(runner, "hi {run_id} $(rm -rf /)", run_id="run_x", session_id="s1")
    assert result == [
        "hi {run_id} $(rm -rf /)",  # substituted once, never re-substituted, no shell
        "run=run_x attempt=1 session=s1 {other}",
        "",  # stdin is /dev/null when the prompt is an argument
    ]


async def test_shell_mode_quotes_placeholders() -> None:
    runner = CommandRunner(["printf '%s' {prompt} | tr a-z A-Z"], shell=True)
    result, _ = await run(runner, "it's $HOME; `id`")
    assert result == "IT'S $HOME; `ID`"


async def test_environment_allow_list(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AGENTJOBS_TEST_SECRET", "s3cret")
    monkeypatch.setenv("AGENTJOBS_TEST_OK", "fine")
    runner = CommandRunner(
        [sys.executable, "-c", "import os, json; print(json.dumps(dict(os.environ)))"],
        env_allow=["PATH", "AGENTJOBS_TEST_O*"],
        env={"EXTRA": "1"},
        cwd=str(tmp_path),
        result="json",
    )
    env, _ = await run(runner, config={"temperature": 0.5}, session_id="sess")
    assert "AGENTJOBS_TEST_SECRET" not in env
    assert env["AGENTJOBS_TEST_OK"] == "fine"
    assert env["EXTRA"] == "1"
    assert env["AGENTJOBS_RUN_ID"] == "run_test"
    assert env["AGENTJOBS_SESSION_ID"] == "sess"
    assert json.loads(env["AGENTJOBS_CONFIG"]) == {"temperature": 0.5}
    assert "HOME" not in env


async def test_working_directory(tmp_path: Path) -> None:
    result, _ = await run(CommandRunner(["pwd"], cwd=str(tmp_path)))
    assert result.endswith(tmp_path.name)


async def test_utf8_split_across_reads() -> None:
    result, rec = await run(
        CommandRunner(["sh", "-c", r"printf '\303'; sleep 0.05; printf '\251\n'"])
    )
    assert result == "é"
    assert rec.outputs == ["é\n"]


async def test_json_result_whole_or_last_line() -> None:
    whole = CommandRunner(["sh", "-c", "printf '{\\n  \"a\": [1, 2]\\n}\\n'"], result="json")
    assert (await run(whole))[0] == {"a": [1, 2]}
    last = CommandRunner(
        ["sh", "-c", 'echo "thinking..."; echo \'{"answer": 42}\'; echo'], result="json"
    )
    assert (await run(last))[0] == {"answer": 42}
    bad = CommandRunner(["echo", "not json"], result="json")
    err, _ = await fails(bad)
    assert "not JSON" in err.message
    assert not err.retryable


async def test_output_cap_keeps_streaming_and_says_so() -> None:
    runner = CommandRunner(
        [sys.executable, "-c", "for i in range(2000): print('%049d' % i)"], max_output_bytes=1000
    )
    rec = Recorder()
    ctx = rec.ctx()
    result = await runner.run(ctx)
    assert len(result) <= 1000
    assert result.startswith("0" * 49)
    assert len(rec.text) == 100_000  # streaming went on past the cap
    assert ctx.metrics["output_truncated"] is True
    assert ctx.metrics["stdout_bytes"] == 100_000


async def test_very_long_line_is_streamed_in_pieces() -> None:
    runner = CommandRunner([sys.executable, "-c", "print('y' * 300_000, end='')"])
    result, rec = await run(runner)
    assert len(result) == 300_000
    assert len(rec.outputs) >= 2
    assert max(len(o) for o in rec.outputs) < 200_000


# ------------------------------------------------------------------ failures


async def test_nonzero_exit_reports_code_and_stderr_tail() -> None:
    script = (
        "import sys; sys.stderr.write('EARLY-NOISE ' + 'n' * 10000 + ' the real problem\\n'); "
        "sys.exit(3)"
    )
    err, metrics = await fails(CommandRunner([sys.executable, "-c", script]))
    assert err.message.startswith("command exited with code 3; stderr: ")
    assert err.message.endswith("the real problem")
    assert "EARLY-NOISE" not in err.message  # only the last ~2 KB
    assert len(err.message) < 2200
    assert not err.retryable
    assert metrics["exit_code"] == 3


async def test_retryable_exit_codes() -> None:
    err, _ = await fails(CommandRunner(["sh", "-c", "exit 75"], retryable_exit_codes={75}))
    assert err.retryable
    assert "(no stderr)" in err.message


async def test_killed_by_signal() -> None:
    err, metrics = await fails(CommandRunner(["sh", "-c", "kill -9 $$"]))
    assert "killed by SIGKILL" in err.message
    assert metrics["exit_code"] == -9


async def test_child_not_reading_its_stdin() -> None:
    result, _ = await run(CommandRunner(["true"]), "z" * 1_000_000)
    assert result == ""


async def test_cannot_start() -> None:
    runner = CommandRunner(["/nonexistent/agent"], check_executable=False)
    err, _ = await fails(runner)
    assert "cannot start command '/nonexistent/agent'" in err.message


def test_construction_errors(tmp_path: Path) -> None:
    with pytest.raises(RunnerConfigError, match="executable 'no-such-agent-xyz' not found"):
        CommandRunner(["no-such-agent-xyz"])
    with pytest.raises(RunnerConfigError, match="argv: expected a non-empty list"):
        CommandRunner([])
    with pytest.raises(RunnerConfigError, match="exactly one string"):
        CommandRunner(["echo", "hi"], shell=True)
    with pytest.raises(RunnerConfigError, match="result: expected 'text' or 'json'"):
        CommandRunner(["cat"], result="yaml")  # type: ignore[arg-type]
    with pytest.raises(RunnerConfigError, match="is not a directory"):
        CommandRunner(["cat"], cwd=str(tmp_path / "missing"))
    with pytest.raises(RunnerConfigError, match="the string 'cat'"):
        CommandRunner("cat")  # type: ignore[arg-type]


# ------------------------------------------------------------------ termination

# A shell that ignores SIGTERM and starts a grandchild that inherits the ignored SIGTERM;
# it prints both pids, then waits forever.
STUBBORN = ["sh", "-c", "trap '' TERM; sleep 600 & echo $$ $!; wait; wait"]


async def start_and_read_pids(
    nursery: trio.Nursery, runner: CommandRunner, rec: Recorder, box: dict[str, Any]
) -> tuple[int, int]:
    async def target() -> None:
        try:
            await runner.run(rec.ctx())
        except RunError as exc:
            box["error"] = exc

    nursery.start_soon(target)
    await rec.wait_output(lambda text: text.endswith("\n"))
    child, grandchild = map(int, rec.text.split())
    assert not gone(child) and not gone(grandchild)
    return child, grandchild


async def test_cancel_kills_a_process_group_that_ignores_sigterm() -> None:
    runner = CommandRunner(STUBBORN, kill_grace_s=GRACE)
    rec = Recorder()
    box: dict[str, Any] = {}
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            child, grandchild = await start_and_read_pids(nursery, runner, rec, box)
            started = trio.current_time()
            scope.cancel()
    elapsed = trio.current_time() - started
    assert scope.cancelled_caught
    assert "error" not in box
    # The run only returned once both were dead: SIGTERM ignored, SIGKILL after the grace.
    assert gone(child) and gone(grandchild)
    assert GRACE * 0.9 <= elapsed < GRACE + 3


async def test_runner_timeout_kills_the_group() -> None:
    runner = CommandRunner(STUBBORN, kill_grace_s=GRACE, timeout_s=0.5)
    rec = Recorder()
    box: dict[str, Any] = {}
    async with trio.open_nursery() as nursery:
        child, grandchild = await start_and_read_pids(nursery, runner, rec, box)
    assert "timed out after 0.5 s" in box["error"].message
    assert gone(child) and gone(grandchild)


async def test_engine_deadline_kills_the_group() -> None:
    rec = Recorder()
    runner = CommandRunner(STUBBORN, kill_grace_s=GRACE)
    with trio.move_on_after(0.5) as scope:
        await runner.run(rec.ctx())
    assert scope.cancelled_caught
    child, grandchild = map(int, rec.text.split())
    assert gone(child) and gone(grandchild)


async def test_polite_process_gets_sigterm_and_exits_within_grace() -> None:
    script = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        "    print('got SIGTERM, cleaning up', flush=True); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n"
    )
    rec = Recorder()
    runner = CommandRunner([sys.executable, "-c", script], kill_grace_s=5)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, rec.ctx())
            await rec.wait_output(lambda text: "ready" in text)
            started = trio.current_time()
            scope.cancel()
    assert trio.current_time() - started < 2  # exited on SIGTERM: no wait for the 5 s grace


async def test_stragglers_are_cleaned_up_after_a_normal_exit(tmp_path: Path) -> None:
    # One background process keeps stdout open, one does not; both outlive the shell.
    script = (
        "sleep 600 & echo $! > pids; (sleep 600 >/dev/null 2>&1 &  echo $! >> pids); "
        "cat pids; echo done"
    )
    runner = CommandRunner(["sh", "-c", script], kill_grace_s=GRACE, cwd=str(tmp_path))
    rec = Recorder()
    with trio.fail_after(5):
        result = await runner.run(rec.ctx())
    pids = [int(p) for p in result.split()[:-1]]
    assert result.endswith("done")
    assert len(pids) == 2
    assert all(gone(p) for p in pids)


async def test_no_leftover_processes_after_many_runs() -> None:
    me = psutil.Process(os.getpid())
    before = {p.pid for p in me.children(recursive=True)}
    runner = CommandRunner(["sh", "-c", "sleep 0.01 & echo hi"])
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(run, runner)
    after = {p.pid for p in me.children(recursive=True) if not gone(p.pid)}
    assert after <= before
