"""The command-line client, run as users run it (`python -m agentjobs ...` in a subprocess)
against a real server: human output, `--json`, exit codes, and `tail` with live progress
(plain lines when piped, a redrawn bar on a terminal)."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from live_server import ServerProcess

from agentjobs.cli import main
from agentjobs.client import Client, Status

Run = Callable[..., tuple[int, str, str]]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("cli-server")
    args = ("--durability", "memory", "--max-concurrency", "16", "--grace-period", "0")
    with ServerProcess(data, *args) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


def _env(server_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTJOBS_")}
    if server_url is not None:
        env["AGENTJOBS_URL"] = server_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


def cli(
    server: ServerProcess | None, *args: str, stdin: str | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agentjobs", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(server.url if server else None),
    )


@pytest.fixture
def run(
    server: ServerProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., tuple[int, str, str]]:
    """The same `main()` in this process: the checks that need no process of their own
    (output details, the exit-code matrix) without paying ~1 s of start-up each."""
    monkeypatch.setenv("AGENTJOBS_URL", server.url)

    def call(*args: str) -> tuple[int, str, str]:
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 2
        out, err = capsys.readouterr()
        return code, out, err

    return call


def _wait_running(client: Client, run_id: str) -> None:
    deadline = time.monotonic() + 10
    while client.get(run_id).status is not Status.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# -- submit ----------------------------------------------------------------------------


def test_submit_prints_the_id_and_json(
    server: ServerProcess, client: Client, run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = cli(server, "submit", "hello from the cli", "--session", "cli-s1")
    assert p.returncode == 0, p.stderr
    run_id = p.stdout.strip()
    assert run_id.startswith("run_") and "\n" not in run_id
    assert "queued" in p.stderr
    assert client.get(run_id).session_id == "cli-s1"

    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    code, out, err = run("submit", "-", "--json", "--config", '{"delay_s": 0.01}')
    assert code == 0, err
    doc = json.loads(out)
    assert doc["status"] == "queued" and doc["job_id"].startswith("run_")
    assert client.wait(doc["job_id"], timeout=10).result == "from stdin"


def test_submit_wait_exit_codes(server: ServerProcess, run: Run, tmp_path: Path) -> None:
    p = cli(server, "submit", "the answer", "--wait")
    assert p.returncode == 0, p.stderr
    assert p.stdout == "the answer\n"

    code, _, err = run("submit", "x", "--config", '{"fail": "it broke"}', "--wait")
    assert code == 1
    assert "failed" in err and "it broke" in err

    code, out, _ = run("submit", "x", "--config", '{"fail": "json too"}', "--wait", "--json")
    assert code == 1
    assert json.loads(out)["error"] == "json too"

    code, _, err = run(
        "submit", "slow", "--config", '{"delay_s": 30}', "--wait", "--wait-timeout", "0.3"
    )
    assert code == 4
    assert "did not finish" in err

    config = tmp_path / "config.json"
    config.write_text('{"output": true}')
    code, out, err = run("submit", "from a file", "--config", f"@{config}", "--wait", "--json")
    assert code == 0, err
    assert json.loads(out)["result"] == "from a file"


def test_usage_errors_exit_2(server: ServerProcess, run: Run) -> None:
    cases = [
        ("submit", "x", "--config", "{not json"),
        ("submit", "x", "--config", "[1, 2]"),
        ("submit", "x", "--config", "@/no/such/file.json"),
        ("submit", "x", "--wait", "--follow"),  # mutually exclusive
        ("submit", "x", "--wait-timeout", "3"),  # needs --wait or --follow
        ("submit", "x", "--runner", "no-such-runner"),  # the server's 422
        ("submit", "   "),  # empty prompt: the server's 422
        ("status",),  # missing ID
        ("ls", "--limit", "-1"),
        ("ls", "--status", "bogus"),
    ]
    for args in cases:
        code, _, err = run(*args)
        assert code == 2, (args, err)
        assert err.strip(), args
    # and as a real process, with the server's 422 message
    p = cli(server, "submit", "x", "--runner", "nope")
    assert p.returncode == 2
    assert "runner" in p.stderr and "HTTP 422" in p.stderr


def test_unreachable_server_exits_5(run: Run) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        code, _, err = run("status", "run_x", "--server", f"http://127.0.0.1:{s.getsockname()[1]}")
    assert code == 5
    assert "cannot reach" in err


# -- status, result, cancel, delete, ls -----------------------------------------------


def test_status_human_and_json(server: ServerProcess, client: Client, run: Run) -> None:
    r = client.submit("st", config={"delay_s": 30, "steps": 4}, session_id="cli-status")
    _wait_running(client, r.id)
    p = cli(server, "status", r.id)
    assert p.returncode == 0, p.stderr
    first = p.stdout.splitlines()[0]
    assert first.startswith(f"{r.id}  running")
    assert "%" in first and "step 1 of 4" in first
    assert "session   cli-status" in p.stdout

    code, out, _ = run("status", r.id, "--json")
    assert code == 0 and json.loads(out)["status"] == "running"

    code, _, err = run("status", "run_nope")
    assert code == 1 and "not found" in err.lower()
    client.cancel(r.id)


def test_result_exit_codes(server: ServerProcess, client: Client, run: Run) -> None:
    ok = client.submit("res ok")
    client.wait(ok.id, timeout=10)
    p = cli(server, "result", ok.id)
    assert (p.returncode, p.stdout) == (0, "res ok\n")
    code, out, _ = run("result", ok.id, "--json")
    assert code == 0 and json.loads(out)["result"] == "res ok"

    failed = client.submit("x", config={"fail": "bad luck"})
    client.wait(failed.id, timeout=10)
    code, _, err = run("result", failed.id)
    assert code == 1 and "bad luck" in err

    slow = client.submit("x", config={"delay_s": 30})
    code, _, err = run("result", slow.id)
    assert code == 4 and "not finished" in err
    t0 = time.monotonic()
    code, _, _ = run("result", slow.id, "--wait", "0.3")
    assert code == 4 and time.monotonic() - t0 >= 0.3

    code, out, _ = run("cancel", slow.id)
    assert code == 0 and f"{slow.id} cancelled" in out
    p = cli(server, "result", slow.id)
    assert p.returncode == 3 and "cancelled" in p.stderr
    code, _, err = run("cancel", slow.id)  # too late now
    assert code == 1 and "already" in err.lower()

    code, out, _ = run("delete", slow.id, "--json")
    assert code == 0 and json.loads(out) == {"job_id": slow.id, "deleted": True}
    code, _, err = run("result", slow.id)
    assert code == 1 and "not found" in err.lower()


def test_ls(server: ServerProcess, client: Client, run: Run) -> None:
    session = f"cli-ls-{time.monotonic_ns()}"
    ids = [client.submit(f"ls {i}", session_id=session).id for i in range(5)]
    failed = client.submit("x", config={"fail": "f"}, session_id=session)
    for run_id in [*ids, failed.id]:
        client.wait(run_id, timeout=10)

    p = cli(server, "ls", "--session", session)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "PROGRESS", "CREATED", "SESSION"]
    assert [line.split()[0] for line in lines[1:]] == [failed.id, *ids[::-1]]

    code, out, _ = run("ls", "--session", session, "--status", "failed", "--json")
    assert code == 0 and [d["job_id"] for d in json.loads(out)] == [failed.id]

    code, out, _ = run("ls", "--session", session, "--limit", "2", "--json")
    assert len(json.loads(out)) == 2

    code, out, err = run("ls", "--session", "no-such-session")
    assert code == 0 and out == "" and "no runs" in err


# -- following a run ------------------------------------------------------------------


def test_tail_prints_output_and_progress(server: ServerProcess, client: Client, run: Run) -> None:
    r = client.submit("alpha beta gamma", config={"delay_s": 0.8, "steps": 4, "output": True})
    p = cli(server, "tail", r.id)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "alpha beta gamma \n"  # the streamed output, not the result again
    progress = [line for line in p.stderr.splitlines() if line.startswith("[")]
    assert progress[0] == "[  0.0%]  step 1 of 4"
    assert "[ 75.0%]  step 4 of 4" in progress
    assert progress[-1].startswith("[100.0%]")
    assert p.stderr.splitlines()[-1] == "succeeded"

    code, out, err = run("tail", r.id, "--json")
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert events[-1]["event"] == "result"
    assert events[-1]["data"]["result"] == "alpha beta gamma"
    assert {e["event"] for e in events} >= {"status", "progress", "output", "result"}
    assert all(e["id"] for e in events)

    code, out, _ = run("tail", r.id, "--after", events[-2]["id"], "--json")
    assert code == 0
    assert [json.loads(line)["id"] for line in out.splitlines()] == [events[-1]["id"]]
    # after the very last event there is nothing to send; the exit code still tells
    code, out, _ = run("tail", r.id, "--after", events[-1]["id"], "--json")
    assert (code, out) == (0, "")


def test_tail_exit_codes(server: ServerProcess, client: Client, run: Run) -> None:
    failed = client.submit("x", config={"fail": "broken"})
    code, _, err = run("tail", failed.id)
    assert code == 1 and "failed: broken" in err

    slow = client.submit("x", config={"delay_s": 30})
    t0 = time.monotonic()
    code, _, err = run("tail", slow.id, "--wait-timeout", "0.5")
    assert code == 4 and "did not finish" in err
    assert time.monotonic() - t0 < 5

    client.cancel(slow.id)
    code, _, err = run("tail", slow.id)
    assert code == 3 and "cancelled" in err

    code, out, err = run("submit", "follow me", "--follow", "--config", '{"output": true}')
    assert code == 0, err
    assert out == "follow me \n"

    code, _, _ = run("tail", "run_nope")
    assert code == 1


def test_tail_on_a_terminal_draws_a_live_bar(server: ServerProcess, client: Client) -> None:
    run = client.submit("x", config={"delay_s": 0.6, "steps": 3})
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentjobs", "tail", run.id],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env={**_env(server.url), "COLUMNS": "100", "PYTHONIOENCODING": "utf-8"},
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(master)
    assert proc.wait(10) == 0
    screen = b"".join(chunks).decode("utf-8", "replace")
    redraws = screen.count("\r\x1b[2K")
    assert redraws >= 4, screen  # the bar is redrawn in place, not printed line by line
    assert "█" in screen and "░" in screen
    assert "step 2 of 3" in screen
    assert "[  0.0%]" not in screen  # the piped format is not used on a terminal
    assert screen.rstrip().endswith("succeeded")
    assert screen.rstrip().splitlines()[-2].endswith("x")  # the result, on its own line
