"""The fast path (agentjobs/http/_fastpath.py) answers exactly as quart does.

Differential: two real servers with the same settings, one with the fast path (the
default) and one with `fast_path=False`, get the same table of requests in the same order.
Every answer is compared: status, every header but `date` (names as sent, values and order), and
the body, after run ids are replaced by labels (each server makes its own ids) and
timestamps by a placeholder. The rejection counters behind /metrics are compared after
every request, and the fast-path server's counter says whether the fast path answered:
each row states whether it must (so a change that quietly sends everything to quart, or
answers something unusual in the fast path, fails here too).
"""

from __future__ import annotations

import argparse
import re
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import httpx
import orjson
import pytest
import trio
from live_server import LiveServer, open_live_server, wait_until

from agentjobs.engine import Status, StorageUnavailable
from agentjobs.http.app import state_of
from agentjobs.http.server import _hypercorn_config
from agentjobs.http.settings import ServerSettings, add_arguments, resolve

KEY_A = "alice-key-0123456789abcdef"
KEY_B = "bob-key-fedcba9876543210xx"
KEYS = f"alice:{KEY_A},bob:{KEY_B}"
RUNS = "/api/v1/runs"
ALICE = {"Authorization": f"Bearer {KEY_A}"}
BOB = {"X-API-Key": KEY_B}
JSON = {"Content-Type": "application/json"}
UNKNOWN = "run_" + "0" * 32

_TIMESTAMP = re.compile(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")
_DURATION = re.compile(rb'"(duration_seconds|duration_s)":[0-9.e-]+')


def _json(doc: Any) -> bytes:
    return orjson.dumps(doc)


@attrs.frozen(slots=True)
class Req:
    """One row: a request and whether the fast path must answer it. `{label}` in the path
    stands for that run's id on each server; `label` names the run a 202 creates."""

    method: str
    path: str
    headers: dict[str, str] = attrs.field(factory=dict)
    body: bytes | None = None
    chunked: bool = False
    fast: bool = True
    label: str | None = None


@attrs.define(slots=True)
class Side:
    srv: LiveServer
    ids: dict[str, str] = attrs.field(factory=dict)

    @property
    def answered(self) -> int:
        fast = state_of(self.srv.running.app).fast_path
        return -1 if fast is None else fast.answered

    @property
    def rejected(self) -> dict[str, int]:
        return dict(state_of(self.srv.running.app).rejected)

    def path(self, template: str) -> str:
        return template.format(**self.ids) if "{" in template else template

    def normalise(self, r: httpx.Response) -> tuple[int, list[tuple[str, str]], bytes]:
        body = r.content
        head = r.request.method == "HEAD"
        assert head or int(r.headers["content-length"]) == len(body), r.headers
        for label, run_id in self.ids.items():
            body = body.replace(run_id.encode(), f"<{label}>".encode())
        body = _DURATION.sub(rb'"\1":"<d>"', _TIMESTAMP.sub(b"<ts>", body))
        headers = []
        for raw_name, raw_value in r.headers.raw:  # as sent: names keep their case
            name, value = raw_name.decode("latin-1"), raw_value.decode("latin-1")
            if name == "date" or (name == "content-length" and not head):
                continue
            for label, run_id in self.ids.items():
                value = value.replace(run_id, f"<{label}>")
            if name == "retry-after" and int(value) > 60:
                value = "<long>"  # the submit-rate wait: ~1/rate minus the elapsed seconds
            headers.append((name, value))
        return r.status_code, headers, body


async def _send(side: Side, client: httpx.AsyncClient, req: Req) -> httpx.Response:
    content: Any = req.body
    if req.chunked:
        data = req.body or b""

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 100):
                yield data[i : i + 100]

        content = chunks()
    r = await client.request(req.method, side.path(req.path), headers=req.headers, content=content)
    await r.aread()
    if r.status_code == 202 and req.method == "POST":
        run_id = r.json()["job_id"]
        if run_id not in side.ids.values():
            side.ids[req.label or f"auto{len(side.ids)}"] = run_id
    return r


@attrs.define(slots=True)
class Pair:
    fast: Side
    slow: Side
    fast_client: httpx.AsyncClient
    slow_client: httpx.AsyncClient
    rows: int = 0

    async def check(self, req: Req) -> httpx.Response:
        """Send `req` to both servers; assert identical answers; return the fast one's."""
        before = self.fast.answered
        r_fast = await _send(self.fast, self.fast_client, req)
        r_slow = await _send(self.slow, self.slow_client, req)
        self.rows += 1
        where = f"{req.method} {req.path} {req.headers} {req.body!r:.80}"
        assert self.fast.normalise(r_fast) == self.slow.normalise(r_slow), where
        assert self.fast.answered - before == (1 if req.fast else 0), where
        assert self.fast.rejected == self.slow.rejected, where
        return r_fast

    async def run(self, rows: Sequence[Req]) -> list[httpx.Response]:
        return [await self.check(req) for req in rows]

    async def until(self, label: str, check: Callable[[Any], bool]) -> None:
        """Wait (through the engines, not HTTP) until the run `label` satisfies `check`."""
        sides = (self.fast, self.slow)
        await wait_until(lambda: all(check(s.srv.engine.state.runs[s.ids[label]]) for s in sides))

    def both(self, action: Callable[[LiveServer], None]) -> None:
        action(self.fast.srv)
        action(self.slow.srv)


@asynccontextmanager
async def open_pair(**settings: Any) -> AsyncIterator[Pair]:
    async with (
        open_live_server(None, **settings) as fast,
        open_live_server(None, fast_path=False, **settings) as slow,
    ):
        assert state_of(fast.running.app).fast_path is not None
        assert state_of(slow.running.app).fast_path is None
        # Clients without default credentials: each row says what it presents.
        async with (
            httpx.AsyncClient(base_url=fast.url, timeout=30) as fc,
            httpx.AsyncClient(base_url=slow.url, timeout=30) as sc,
        ):
            yield Pair(Side(fast), Side(slow), fc, sc)


def _submit(doc: Any, headers: dict[str, str] | None = None, **kw: Any) -> Req:
    return Req("POST", RUNS, {**JSON, **ALICE, **(headers or {})}, _json(doc), **kw)


LONG = {"delay_s": 60}


async def test_submit_status_and_result_with_api_keys() -> None:
    async with open_pair(api_keys=KEYS, max_concurrency=1, max_body_bytes=4096) as pair:
        # Runs in every state: succeeded, failed, running, queued, cancelled.
        await pair.run(
            [
                _submit({"prompt": "done"}, label="done"),
                _submit({"prompt": "x", "config": {"fail": "boom"}}, label="failed"),
            ]
        )
        await pair.until("done", lambda run: run.finished)
        await pair.until("failed", lambda run: run.finished)
        await pair.run(
            [
                _submit({"prompt": "long", "config": LONG}, label="running"),
                _submit({"prompt": "waits", "config": LONG}, label="queued"),
                _submit({"prompt": "cancel me", "config": LONG}, label="cancelled"),
            ]
        )
        await pair.until("running", lambda run: run.status is Status.RUNNING)
        await pair.run(
            [
                Req("GET", RUNS + "/{running}", ALICE),
                Req("GET", RUNS + "/{running}/result", ALICE),  # 409, Retry-After 1
                Req("POST", RUNS + "/{cancelled}/cancel", ALICE, fast=False),
            ]
        )
        rows = [
            # status and result of each run, by its owner
            *(Req("GET", f"{RUNS}/{{{label}}}", ALICE) for label in _STATES),
            *(Req("GET", f"{RUNS}/{{{label}}}/result", ALICE) for label in _STATES),
            # tenant isolation: bob sees none of alice's runs
            Req("GET", RUNS + "/{done}", BOB),
            Req("GET", RUNS + "/{done}/result", BOB),
            Req("GET", f"{RUNS}/{UNKNOWN}", ALICE),
            Req("GET", f"{RUNS}/{UNKNOWN}/result", ALICE),
            # authentication
            Req("GET", RUNS + "/{done}"),
            Req("GET", RUNS + "/{done}/result", {"Authorization": "Bearer wrong-key-000000000000"}),
            Req("GET", RUNS + "/{done}", {"Authorization": "Bearer"}),
            Req("GET", RUNS + "/{done}", {"X-API-Key": ""}),
            Req("GET", RUNS + "/{done}", {"Authorization": "Basic abc", **BOB}),
            Req("GET", RUNS + "/{done}", {"Authorization": "Basic abc"}),
            Req("GET", RUNS + "/{done}", {"Authorization": "Bearer nope-nope-nope-nope", **BOB}),
            Req("GET", RUNS + "/{done}", {"authorization": f"bearer {KEY_A}"}),
            _submit({"prompt": "p"}, {"Authorization": "Bearer not-a-key-0000000000"}),
            Req("POST", RUNS, JSON, b'{"prompt": "no key"}'),
            Req("POST", RUNS, {**JSON, "X-API-Key": KEY_B}, b'{"prompt": "bob"}'),
            # submits: validation, content types, idempotency
            Req("POST", RUNS, {**JSON, **ALICE}, b'{"prompt": '),
            _submit({"prompt": 1}),
            _submit({"prompt": "p", "sesion_id": "s"}),
            _submit(["prompt"]),
            _submit({"prompt": "p", "agent_file": "a.yaml"}),
            _submit({"prompt": "p", "idempotency_scope": "global"}),
            _submit({"prompt": "p", "runner": "nope"}),
            _submit({"prompt": "p", "webhook_url": "ftp://example.com/hook"}),
            _submit({"prompt": "p", "webhook_url": "http://127.0.0.1:9/hook"}),
            _submit({"prompt": "p", "timeout": -1}),
            _submit({"prompt": "p", "priority": True}),
            Req("POST", RUNS, {"Content-Type": "text/plain", **ALICE}, b'{"prompt": "p"}'),
            Req("POST", RUNS, ALICE, b'{"prompt": "p"}'),
            Req(
                "POST",
                RUNS,
                {"Content-Type": "Application/JSON; charset=utf-8", **ALICE},
                b'{"prompt": "p"}',
            ),
            Req(
                "POST",
                RUNS,
                {"Content-Type": "application/vnd.x+json", **ALICE},
                b'{"prompt": "p"}',
            ),
            Req("POST", RUNS + "/", {**JSON, **ALICE}, b'{"prompt": "slash"}'),
            _submit({"prompt": "same"}, {"Idempotency-Key": "k-1"}, label="idem"),
            _submit({"prompt": "same"}, {"Idempotency-Key": "k-1"}),
            _submit({"prompt": "other"}, {"Idempotency-Key": "k-1"}),
            _submit({"prompt": "same", "idempotency_key": "k-1"}),
            _submit({"prompt": "body key", "idempotency_key": "k-2"}, label="idem2"),
            _submit({"prompt": "body key", "idempotency_key": "k-2"}),
            Req(
                "POST",
                RUNS,
                {**JSON, **BOB, "Idempotency-Key": "k-1"},
                b'{"prompt": "same"}',
                label="bobidem",
            ),
            _submit({"prompt": "p"}, {"Idempotency-Key": "k\x7f"}),
            _submit({"prompt": "p"}, {"Idempotency-Key": "k" * 256}),
            _submit({"prompt": "p" * 5000}, fast=False),  # declared over the limit: the guard's 413
            # not for the fast path: quart answers, the same way on both servers
            Req(
                "POST", RUNS, {**JSON, **ALICE}, b'{"prompt": "chunked"}', chunked=True, fast=False
            ),
            Req(
                "POST",
                RUNS,
                {**JSON, **ALICE},
                _json({"prompt": "c" * 5000}),
                chunked=True,
                fast=False,
            ),
            Req("POST", RUNS + "?api_key=" + KEY_A, JSON, b'{"prompt": "q"}', fast=False),
            Req("POST", RUNS + "?x=1", {**JSON, **ALICE}, b'{"prompt": "q"}', fast=False),
            Req("GET", RUNS + "/{done}/result?wait=0", ALICE, fast=False),
            Req("GET", RUNS + "/{queued}/result?wait=0.05", ALICE, fast=False),
            Req("GET", RUNS + "/{done}?api_key=" + KEY_A, fast=False),
            Req("GET", RUNS + "/nope", ALICE, fast=False),
            Req("GET", RUNS + "/{done}/", ALICE, fast=False),
            Req("GET", RUNS + "/{done}", {**ALICE, **JSON}, b"{}", fast=False),
            Req("HEAD", RUNS + "/{done}", ALICE, fast=False),
            Req("PUT", RUNS + "/{done}", ALICE, fast=False),
            Req("POST", RUNS + "/{done}", {**JSON, **ALICE}, b"{}", fast=False),
            Req("GET", RUNS, ALICE, fast=False),
        ]
        await pair.run(rows)
        # every run keeps the same tenant on both servers
        for side in (pair.fast, pair.slow):
            assert side.srv.engine.state.runs[side.ids["bobidem"]].spec.tenant == "bob"
            assert side.srv.engine.state.runs[side.ids["idem"]].spec.tenant == "alice"
        assert pair.fast.rejected["unauthorized"] > 5


_STATES = ("done", "failed", "running", "queued", "cancelled")


async def test_per_tenant_limits_answer_alike() -> None:
    async with open_pair(
        api_keys=KEYS,
        max_concurrency=1,
        tenant_rate=0.001,
        tenant_burst=4,
        tenant_max_queued=2,
    ) as pair:
        await pair.run(
            [
                _submit({"prompt": "a", "config": LONG}, label="a1"),
                _submit({"prompt": "b", "config": LONG}, {"Idempotency-Key": "b"}, label="a2"),
                _submit({"prompt": "c"}),  # 429 tenant-queue: alice has 2 queued or running
                _submit({"prompt": "b", "config": LONG}, {"Idempotency-Key": "b"}),  # replay
                _submit({"prompt": "d"}),  # 429 submit-rate: alice spent her burst
                Req("POST", RUNS, {**BOB, "Content-Type": "text/plain"}, b"x"),  # a token, 415
                Req("POST", RUNS, {**BOB, **JSON}, b"{"),  # a token, 400
                Req("POST", RUNS, {**BOB, **JSON}, b'{"prompt": "e"}'),
                Req("POST", RUNS, {**BOB, **JSON}, b'{"prompt": "f"}'),
                Req("POST", RUNS, {**BOB, **JSON}, b'{"prompt": "g"}'),  # 429 submit-rate
                Req("POST", RUNS, JSON, b'{"prompt": "anonymous"}'),  # 401 before any limit
            ]
        )
        rejected = pair.fast.rejected
        assert rejected["submit-rate"] == 2 and rejected["tenant-queue"] == 1, rejected


async def test_without_keys_with_cors_and_engine_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    origin = {"Origin": "https://app.example.com"}
    async with open_pair(
        max_concurrency=1, max_queue=1, cors_origins="https://app.example.com"
    ) as pair:
        long = {**JSON, **origin}
        await pair.check(Req("POST", RUNS, long, _json({"prompt": "r", "config": LONG}), label="r"))
        await pair.until("r", lambda run: run.status is Status.RUNNING)
        await pair.run(
            [
                Req("POST", RUNS, long, _json({"prompt": "q", "config": LONG}), label="q"),
                Req("POST", RUNS, {**JSON, **origin}, b'{"prompt": "full"}'),  # 503 queue-full
                Req("GET", RUNS + "/{q}", origin),
                Req("GET", RUNS + "/{q}/result", {"Origin": "https://evil.example"}),
                Req("GET", f"{RUNS}/{UNKNOWN}", {**origin, "X-API-Key": KEY_A}),
                Req(
                    "OPTIONS", RUNS, {**origin, "Access-Control-Request-Method": "POST"}, fast=False
                ),
            ]
        )

        def unavailable(srv: LiveServer) -> None:
            async def submit_spec(spec: Any) -> Any:
                raise StorageUnavailable("the disk is full", retry_after=7.2)

            monkeypatch.setattr(srv.engine, "submit_spec", submit_spec)

        def broken(srv: LiveServer) -> None:
            def get(run_id: str, *, tenant: str | None = None) -> Any:
                raise RuntimeError("a bug")

            monkeypatch.setattr(srv.engine, "get", get)

        pair.both(unavailable)
        await pair.check(Req("POST", RUNS, {**JSON, **origin}, b'{"prompt": "disk"}'))
        pair.both(broken)
        await pair.check(Req("GET", RUNS + "/{r}", origin))
        await pair.check(Req("GET", RUNS + "/{r}/result"))


async def test_a_refused_submit_leaves_the_connection_usable() -> None:
    """A 401 answered before a large body was read: the body is drained first, so the same
    keep-alive connection serves the next request (limits.py's hang)."""
    async with open_live_server(None, api_keys=KEYS, max_body_bytes=2_000_000) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        body = _json({"prompt": "x" * 1_500_000})

        def exchange() -> list[bytes]:
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(body)}\r\n\r\n".encode()
                    + body
                    + b"GET /api/v1/runs/"
                    + UNKNOWN.encode()
                    + b" HTTP/1.1\r\nHost: x\r\n"
                    b"X-API-Key: " + KEY_B.encode() + b"\r\n\r\n"
                )
                data = b""
                while data.count(b"HTTP/1.1 ") < 2 or not data.endswith(b"}"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            return re.findall(rb"HTTP/1\.1 (\d{3}) ", data)

        before = state_of(srv.running.app).fast_path
        assert before is not None and before.answered == 0
        statuses = await trio.to_thread.run_sync(exchange)
        assert statuses == [b"401", b"404"]
        assert before.answered == 2


# -- settings ---------------------------------------------------------------------------


def test_fast_path_and_backlog_settings() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert resolve(parser.parse_args([]), {}).fast_path is True
    assert resolve(parser.parse_args(["--no-fast-path"]), {}).fast_path is False
    assert resolve(parser.parse_args([]), {"AGENTJOBS_FAST_PATH": "0"}).fast_path is False
    assert resolve(parser.parse_args(["--fast-path"]), {"AGENTJOBS_FAST_PATH": "off"}).fast_path
    assert resolve(parser.parse_args([]), {}).backlog == 2048
    settings = resolve(parser.parse_args(["--backlog", "64"]), {})
    assert _hypercorn_config(settings).backlog == 64
    assert _hypercorn_config(ServerSettings()).backlog == 2048
    with pytest.raises(Exception, match="AGENTJOBS_BACKLOG"):
        resolve({}, {"AGENTJOBS_BACKLOG": "0"})
