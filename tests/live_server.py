"""Real servers for tests: in-process (fast, inspectable) or as a subprocess (signals, exit).

Both listen on 127.0.0.1 on a port the OS picks (`--port 0`), so tests never collide on a
port and never race for a "free" one: the server prints the address it actually bound.

In-process (inside the test's trio run; you get the engine too)::

    async with open_live_server(tmp_path, max_concurrency=2) as srv:
        r = await srv.client.post("/api/v1/runs", json={"prompt": "hi"})
        srv.engine.stats()

As a subprocess (`python -m agentjobs serve ...`, what a user runs)::

    with ServerProcess(tmp_path / "data", "--durability", "os") as proc:
        httpx.get(proc.url + "/health")
        code = proc.terminate()    # SIGTERM, wait, return the exit code

The fixtures in conftest.py wrap both.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import httpx
import orjson
import trio

from agentjobs.engine import Engine
from agentjobs.engine.runners import EchoRunner, Runner
from agentjobs.http.server import RunnerChoice, RunningServer, serve
from agentjobs.http.settings import ServerSettings

__all__ = [
    "Frame",
    "LiveServer",
    "ServerProcess",
    "WebhookReceiver",
    "assert_problem",
    "open_live_server",
    "parse_sse",
    "read_stream",
    "submit",
    "wait_status",
    "wait_until",
]

_LISTENING = re.compile(r"listening on (http://\S+?)(,|$)")


@attrs.define(slots=True, eq=False)
class LiveServer:
    """An in-process server: its base URL, an httpx client bound to it, and the engine."""

    url: str
    client: httpx.AsyncClient
    running: RunningServer
    settings: ServerSettings

    @property
    def engine(self) -> Engine:
        return self.running.engine

    def client_for(self, key: str, *, header: str = "bearer") -> httpx.AsyncClient:
        """A new client presenting `key` (`header`: "bearer" or "x-api-key"); close it
        with `async with`."""
        headers = {"Authorization": f"Bearer {key}"} if header == "bearer" else {"X-API-Key": key}
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=30.0)


@asynccontextmanager
async def open_live_server(
    data_dir: Path | str | None,
    *,
    runners: Mapping[str, Runner] | None = None,
    default_runner: str | None = None,
    client_timeout: float = 30.0,
    **settings: Any,
) -> AsyncIterator[LiveServer]:
    """Serve the real app with hypercorn on 127.0.0.1:<random port> for the block.

    `settings` are `ServerSettings` fields (`durability="memory"`, `sse_heartbeat=0.2`...);
    `runners` replaces the default `{"echo": EchoRunner()}`. On exit the server drains as on
    SIGTERM (streams get their final event, runs get the grace period, default 0 here).
    """
    settings.setdefault("port", 0)
    settings.setdefault("host", "127.0.0.1")
    settings.setdefault("grace_period", 0.0)
    if data_dir is None:
        settings.setdefault("durability", "memory")
    else:
        settings.setdefault("durability", "os")
        settings.setdefault("data_dir", str(data_dir))
    config = ServerSettings(**settings)
    chosen: dict[str, Runner] = dict(runners) if runners is not None else {"echo": EchoRunner()}
    choice = RunnerChoice(chosen, default_runner or next(iter(chosen)))
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        running: RunningServer = await nursery.start(
            lambda task_status: serve(config, stop=stop, runners=choice, task_status=task_status)
        )
        async with httpx.AsyncClient(base_url=running.url, timeout=client_timeout) as client:
            try:
                yield LiveServer(running.url, client, running, config)
            finally:
                stop.set()


class ServerProcess:
    """`python -m agentjobs serve` in a subprocess, on a free port, output collected."""

    def __init__(
        self,
        data_dir: Path | str,
        *args: str,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 20.0,
        pre_args: tuple[str, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.args = args
        self.lines: list[str] = []
        self.err_lines: list[str] = []
        self._cond = threading.Condition()
        full_env = dict(os.environ)
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        if env:
            full_env.update(env)
        cmd = [
            sys.executable,
            "-m",
            "agentjobs",
            *pre_args,  # options of `agentjobs` itself, e.g. -v
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--data-dir",
            str(self.data_dir),
            *args,
        ]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=full_env,
        )
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True),
            threading.Thread(
                target=self._read, args=(self.proc.stderr, self.err_lines), daemon=True
            ),
        ]
        for t in self._readers:
            t.start()
        try:
            line = self.wait_for_line(_LISTENING, start_timeout)
            self.wait_for_line(r"^runs recovered: ", start_timeout)  # the last start-up fact
        except Exception:
            self.kill()
            raise
        m = _LISTENING.search(line)
        assert m is not None
        self.url: str = m.group(1)

    def _read(self, stream: Any, into: list[str]) -> None:
        for line in stream:
            with self._cond:
                into.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def output(self) -> str:
        return "\n".join(self.lines) + "\n--- stderr ---\n" + "\n".join(self.err_lines)

    def wait_for_line(self, pattern: re.Pattern[str] | str, timeout: float = 10.0) -> str:
        """The first stdout line matching `pattern`, waiting up to `timeout` seconds."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.proc.poll() is not None:
                    raise TimeoutError(
                        f"no line matching {rx.pattern!r} (exit code {self.proc.poll()}):\n"
                        + self.output
                    )
                self._cond.wait(min(remaining, 0.1))

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return code

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for a clean exit; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc.poll() is None:
            try:
                self.terminate(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


# -- helpers for talking to the server --------------------------------------------------

PROBLEM_BASE = "https://agentjobs.dev/problems/"


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem of this status and type; returns its body."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"] == "application/problem+json", response.headers
    body: dict[str, Any] = response.json()
    assert body["type"] == PROBLEM_BASE + slug, body
    assert body["status"] == status
    assert isinstance(body["title"], str) and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]  # PraisonAI clients print it
    return body


@attrs.frozen(slots=True)
class Frame:
    """One server-sent event as a client sees it."""

    id: str | None
    event: str
    data: Any  # parsed JSON


def parse_sse(text: str) -> tuple[list[Frame], list[str]]:
    """Frames and comment lines of an SSE body, per the WHATWG parsing rules we rely on."""

    frames: list[Frame] = []
    comments: list[str] = []
    fields: dict[str, list[str]] = {}
    for line in text.replace("\r\n", "\n").split("\n"):
        if line == "":
            if "data" in fields or "event" in fields:
                data = "\n".join(fields.get("data", []))
                frames.append(
                    Frame(
                        fields["id"][-1] if "id" in fields else None,
                        fields.get("event", ["message"])[-1],
                        orjson.loads(data),
                    )
                )
            fields = {}
            continue
        if line.startswith(":"):
            comments.append(line)
            continue
        name, _, value = line.partition(":")
        fields.setdefault(name, []).append(value[1:] if value.startswith(" ") else value)
    return frames, comments


async def read_stream(
    client: httpx.AsyncClient,
    job_id: str,
    *,
    headers: Mapping[str, str] | None = None,
    params: Mapping[str, str] | None = None,
) -> tuple[int, list[Frame], list[str]]:
    """Read a run's whole SSE stream (it ends after the terminal event)."""
    async with client.stream(
        "GET", f"/api/v1/runs/{job_id}/stream", headers=headers, params=params
    ) as r:
        body = (await r.aread()).decode()
    frames, comments = parse_sse(body)
    return r.status_code, frames, comments


async def submit(client: httpx.AsyncClient, prompt: str = "hello", **fields: Any) -> str:
    r = await client.post("/api/v1/runs", json={"prompt": prompt, **fields})
    assert r.status_code == 202, r.text
    job_id: str = r.json()["job_id"]
    return job_id


async def wait_status(
    client: httpx.AsyncClient, job_id: str, *statuses: str, timeout: float = 10.0
) -> dict[str, Any]:
    """Poll until the run has one of `statuses`; returns its status document."""
    with trio.fail_after(timeout):
        while True:
            r = await client.get(f"/api/v1/runs/{job_id}")
            assert r.status_code == 200, r.text
            body: dict[str, Any] = r.json()
            if body["status"] in statuses:
                return body
            await trio.sleep(0.01)


async def wait_until(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, interval: float = 0.01
) -> None:
    """Poll `check` (sync or async) until it is true; fail after `timeout` seconds.

    For conditions that have no event to wait on from outside the server (counts of
    streams or subscribers, a status reached over HTTP)."""
    with trio.fail_after(timeout):
        while True:
            outcome = check()
            if not isinstance(outcome, bool):
                outcome = await outcome
            if outcome:
                return
            await trio.sleep(interval)


class WebhookReceiver:
    """A loopback HTTP server that records the webhooks POSTed to it (in a thread, so sync
    and async tests alike can use it). Answers `status` (default 204) to each delivery.

        with WebhookReceiver() as hooks:
            ... submit with "webhook_url": hooks.url + "/callback" ...
            delivery = hooks.wait_for(1)[0]      # {"path", "headers", "body"}
    """

    def __init__(self, status: int = 204) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.status = status
        self.deliveries: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = self.rfile.read(length)
                with receiver._cond:
                    receiver.deliveries.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                    receiver._cond.notify_all()
                self.send_response(receiver.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def wait_for(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Block until `count` deliveries arrived; returns them all."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.deliveries) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(self.deliveries)} of {count} webhooks arrived")
                self._cond.wait(remaining)
            return list(self.deliveries)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
