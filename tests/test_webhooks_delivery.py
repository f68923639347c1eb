"""Webhook deliveries end to end: real engine, real HTTP, real loopback receivers, real time.

The receiver is a small trio + h11 server on 127.0.0.1 (random port) that answers from a
script of status codes and records every request. Schedules are shortened to tenths of a
second so the whole file runs in a few seconds.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

from agentjobs import Engine, open_engine
from agentjobs.engine.model import WebhookState
from agentjobs.engine.outbox import DeliveryRequest, HttpSender, Outbox, SendFn, WebhookSettings
from agentjobs.engine.ssrf import ResolvedTarget, WebhookPolicy
from agentjobs.webhooks import generate_secret, verify

LOCAL = WebhookPolicy.parse("127.0.0.1/32")


@attrs.define
class Received:
    at: float
    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@attrs.define(eq=False)
class Receiver:
    """Answers `script` in order (then `default`); `delay` before answering; `gate`, if
    set, holds every answer until it is set. Counts concurrent requests."""

    script: list[int] = attrs.field(factory=list)
    default: int = 204
    delay: float = 0.0
    gate: trio.Event | None = None
    extra_headers: list[tuple[str, str]] = attrs.field(factory=list)
    port: int = 0
    requests: list[Received] = attrs.field(factory=list)
    active: int = 0
    peak: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        request: h11.Request | None = None
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    conn.receive_data(bytes(data))
                    if not data and conn.their_state is not h11.DONE:
                        return
                    continue
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
            assert request is not None
            self.active += 1
            self.peak = max(self.peak, self.active)
            try:
                self.requests.append(
                    Received(
                        trio.current_time(),
                        request.method.decode(),
                        request.target.decode(),
                        {k.decode().lower(): v.decode() for k, v in request.headers},
                        body,
                    )
                )
                if self.gate is not None:
                    await self.gate.wait()
                await trio.sleep(self.delay)
                status = self.script.pop(0) if self.script else self.default
                headers = list(self.extra_headers)
                if status != 204:
                    headers.append(("content-length", "0"))
                await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
                await stream.send_all(conn.send(h11.EndOfMessage()))
            finally:
                self.active -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
            pass
        finally:
            await stream.aclose()


@asynccontextmanager
async def receiving(*receivers: Receiver) -> AsyncIterator[None]:
    async with trio.open_nursery() as nursery:
        for receiver in receivers:
            listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            receiver.port = listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, receiver.handle, listeners)
        yield
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def running(
    engine: Engine, settings: WebhookSettings, send: SendFn | None = None
) -> AsyncIterator[Outbox]:
    outbox = Outbox(engine, settings, send=send)
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        yield outbox
        nursery.cancel_scope.cancel()


async def until(pred: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110 - polling state that has no event to wait on
            await trio.sleep(0.01)


def hook(engine: Engine, run_id: str) -> WebhookState:
    """The run's delivery state (a blank one while the run is unfinished)."""
    state = engine.get(run_id).webhook
    return state if state is not None else WebhookState()


def fast(**changes: Any) -> WebhookSettings:
    base: dict[str, Any] = {
        "policy": LOCAL,
        "schedule_s": (0.1, 0.3),
        "repeat_s": 0.3,
        "jitter": 0.0,
        "timeout_s": 2.0,
    }
    base.update(changes)
    return WebhookSettings(**base)


def independent_signature(secret: str, headers: dict[str, str], body: bytes) -> str:
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


async def test_receiver_failing_twice_gets_signed_retries_then_delivery() -> None:
    secret = generate_secret()
    receiver = Receiver(script=[500, 503])
    async with (
        receiving(receiver),
        open_engine(None, durability="memory") as engine,
        running(engine, fast(secret=secret)) as outbox,
    ):
        run = await engine.submit("hi there", webhook_url=receiver.url, session_id="s-1")
        await until(lambda: hook(engine, run.id).delivered)
        history = (await outbox.deliveries(run.id)).to_json()
    reqs = receiver.requests
    assert len(reqs) == 3
    # growing delays between attempts: at least 0.1 s, then at least 0.3 s (lower bounds
    # only: a loaded machine may add to them; the planned delays are checked exactly below)
    first_gap, second_gap = reqs[1].at - reqs[0].at, reqs[2].at - reqs[1].at
    assert first_gap >= 0.1 and second_gap >= 0.3
    assert len({r.headers["webhook-id"] for r in reqs}) == 1
    for r in reqs:
        assert r.method == "POST" and r.target == "/hook"
        assert r.headers["content-type"] == "application/json"
        assert r.headers["host"] == f"127.0.0.1:{receiver.port}"
        assert r.headers["user-agent"].startswith("agentjobs-webhooks/")
        assert verify(r.body, r.headers, secret)["job_id"] == run.id
        assert r.headers["webhook-signature"] == independent_signature(secret, r.headers, r.body)
        assert abs(int(r.headers["webhook-timestamp"]) - engine.wall()) < 60
    payload = reqs[-1].json()
    finished = engine.get(run.id)
    assert payload == {
        "job_id": run.id,
        "status": "succeeded",
        "result": "hi there",
        "error": None,
        "completed_at": payload["completed_at"],
        "duration_seconds": finished.duration,
        "event": "run.succeeded",
        "session_id": "s-1",
    }
    assert payload["completed_at"].endswith("Z")
    assert history["status"] == "delivered"
    assert [d["status_code"] for d in history["deliveries"]] == [500, 503, 204]
    assert [d["ok"] for d in history["deliveries"]] == [False, False, True]
    assert history["deliveries"][0]["next_attempt_at"].endswith("Z")
    planned = [
        datetime.fromisoformat(d["next_attempt_at"]) - datetime.fromisoformat(d["at"])
        for d in history["deliveries"][:2]
    ]
    assert [p.total_seconds() for p in planned] == [
        pytest.approx(0.1, abs=0.02),
        pytest.approx(0.3, abs=0.02),
    ]


async def test_every_terminal_state_is_delivered() -> None:
    receiver = Receiver()
    async with (
        receiving(receiver),
        open_engine(None, durability="memory") as engine,
        running(engine, fast()),
    ):
        url = receiver.url
        ok = await engine.submit("fine", webhook_url=url)
        failed = await engine.submit("x", webhook_url=url, config={"fail": "boom"})
        timed_out = await engine.submit("slow", webhook_url=url, config={"delay_s": 5}, timeout=0.2)
        cancelled = await engine.submit("long", webhook_url=url, config={"delay_s": 30})
        queued = await engine.submit("never", webhook_url=url, config={"delay_s": 30})
        await until(lambda: engine.get(cancelled.id).status.value == "running")
        await engine.cancel(cancelled.id)
        await engine.cancel(queued.id)
        ids = [ok.id, failed.id, timed_out.id, cancelled.id, queued.id]
        await until(lambda: len(receiver.requests) == 5)
    by_job = {r.json()["job_id"]: r.json() for r in receiver.requests}
    assert sorted(by_job) == sorted(ids)
    assert (by_job[ok.id]["event"], by_job[ok.id]["status"]) == ("run.succeeded", "succeeded")
    assert (by_job[failed.id]["event"], by_job[failed.id]["error"]) == ("run.failed", "boom")
    assert by_job[failed.id]["result"] is None
    assert by_job[timed_out.id]["event"] == "run.timed_out"
    assert by_job[timed_out.id]["status"] == "failed" and by_job[timed_out.id]["error"]
    for rid in (cancelled.id, queued.id):
        assert (by_job[rid]["event"], by_job[rid]["status"]) == ("run.cancelled", "cancelled")


async def test_failures_of_every_kind_are_recorded_and_retried() -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connection refused
    slow = Receiver(delay=5.0)
    redirect = Receiver(default=302, extra_headers=[("location", "http://169.254.169.254/")])
    async with receiving(slow, redirect), open_engine(None, durability="memory") as engine:
        settings = fast(timeout_s=0.3, max_attempts=2, schedule_s=(0.05,))
        async with running(engine, settings) as outbox:
            urls = [f"http://127.0.0.1:{dead_port}/x", slow.url, redirect.url]
            runs = [await engine.submit("x", webhook_url=u) for u in urls]
            await until(lambda: all(hook(engine, r.id).gave_up for r in runs))
            histories = [(await outbox.deliveries(r.id)).to_json() for r in runs]
    errors = [[d["error"] for d in h["deliveries"]] for h in histories]
    assert all(h["status"] == "failed" and h["attempts"] == 2 for h in histories)
    assert all(e.startswith("connection failed") for e in errors[0])
    assert errors[1] == ["timed out after 0.3 s"] * 2
    assert errors[2] == ["HTTP 302 (redirects are not followed)"] * 2
    assert len(redirect.requests) == 2  # the Location was never fetched
    assert outbox.stats.gave_up_total == 3


async def test_private_targets_are_refused_at_delivery_unless_allowed(tmp_path: Path) -> None:
    receiver = Receiver()
    async with receiving(receiver):
        async with (
            open_engine(tmp_path, durability="os") as engine,
            running(engine, fast(policy=WebhookPolicy())),
        ):
            run = await engine.submit("x", webhook_url=receiver.url)
            by_name = await engine.submit("x", webhook_url=f"http://localhost:{receiver.port}/")
            await until(lambda: hook(engine, run.id).gave_up)
            await until(lambda: hook(engine, by_name.id).attempts >= 2)
            literal, named = hook(engine, run.id), hook(engine, by_name.id)
        assert receiver.requests == []
        assert literal.attempts == 1  # a literal never changes: no retry
        assert literal.last_error is not None and "loopback" in literal.last_error
        # a name's addresses may change, so it is retried (and refused again)
        assert named.last_error is not None
        assert "resolves to" in named.last_error and not named.gave_up
        # the operator allows loopback and restarts: the pending delivery goes through
        allow = fast(policy=WebhookPolicy.parse("127.0.0.0/8,::1"))
        async with open_engine(tmp_path, durability="os") as engine, running(engine, allow):
            await until(lambda: hook(engine, by_name.id).delivered)
            assert hook(engine, run.id).gave_up  # gave up for good: only a redeliver revives it
    assert len(receiver.requests) == 1


async def test_slow_receiver_does_not_stall_others() -> None:
    gate = trio.Event()
    slow, quick = Receiver(gate=gate), Receiver()
    async with (
        receiving(slow, quick),
        open_engine(None, durability="memory") as engine,
        running(engine, fast(per_target_concurrency=2, max_concurrency=4)),
    ):
        held = [await engine.submit("x", webhook_url=slow.url) for _ in range(5)]
        await until(lambda: slow.active == 2)
        fine = [await engine.submit("x", webhook_url=quick.url) for _ in range(3)]
        await until(lambda: len(quick.requests) == 3)
        assert slow.active == 2 and slow.peak == 2  # the rest wait for that receiver only
        gate.set()
        await until(lambda: all(hook(engine, r.id).delivered for r in held))
        assert all(hook(engine, r.id).delivered for r in fine)
    assert slow.peak == 2 and len(slow.requests) == 5


async def test_restart_mid_schedule_with_a_real_receiver(tmp_path: Any) -> None:
    secret = generate_secret()
    receiver = Receiver(script=[500])
    settings = fast(secret=secret, schedule_s=(1.0,))
    async with receiving(receiver):
        async with open_engine(tmp_path, durability="os") as engine, running(engine, settings):
            run = await engine.submit("persist me", webhook_url=receiver.url)
            await until(lambda: hook(engine, run.id).attempts == 1)
        due = hook(engine, run.id).next_attempt_at
        assert due is not None and len(receiver.requests) == 1
        # the engine is closed with the second attempt pending; a new one picks it up
        async with open_engine(tmp_path, durability="os") as engine, running(engine, settings):
            assert hook(engine, run.id).next_attempt_at == due
            await until(lambda: hook(engine, run.id).delivered)
            assert hook(engine, run.id).attempts == 2
    first, second = receiver.requests
    assert second.at - first.at >= 1.0
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    assert verify(second.body, second.headers, secret)["result"] == "persist me"


async def test_connection_is_pinned_to_the_screened_address() -> None:
    """The URL's name is never resolved again: we dial the checked IP and send its Host."""
    receiver = Receiver(default=201)
    async with receiving(receiver):
        target = ResolvedTarget(
            "http", "hooks.invalid", receiver.port, ("127.0.0.1",), "/p?q=1", ("user", "pw")
        )
        request = DeliveryRequest(target, (("X-Test", "1"),), b"{}", 2.0)
        assert await HttpSender()(request) == 201
    got = receiver.requests[0]
    assert got.headers["host"] == f"hooks.invalid:{receiver.port}"
    assert got.target == "/p?q=1" and got.headers["x-test"] == "1"
    assert got.headers["authorization"] == "Basic " + base64.b64encode(b"user:pw").decode()


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
async def test_any_2xx_is_success(status: int) -> None:
    receiver = Receiver(default=status)
    async with (
        receiving(receiver),
        open_engine(None, durability="memory") as engine,
        running(engine, fast()),
    ):
        run = await engine.submit("x", webhook_url=receiver.url)
        await until(lambda: hook(engine, run.id).delivered)
    assert len(receiver.requests) == 1


def self_signed(tmp_path: Path, name: str) -> tuple[str, str]:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


class StaticResolver(trio.abc.HostnameResolver):
    """DNS for the test: every name in `names` resolves to 127.0.0.1."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    async def getaddrinfo(
        self,
        host: bytes | None,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[Any]:
        if (host or b"").decode() not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    async def getnameinfo(self, sockaddr: Any, flags: int) -> tuple[str, str]:
        raise NotImplementedError


async def test_tls_to_a_pinned_address_still_verifies_the_name(tmp_path: Path) -> None:
    """Dialling the screened IP must not weaken TLS: SNI and the certificate check use the
    URL's host name, so a certificate for another name is refused."""
    cert, key = self_signed(tmp_path, "hooks.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    sni: list[str | None] = []

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sni.append(name)

    server_ctx.sni_callback = record_sni
    receiver = Receiver()
    previous = trio.socket.set_custom_hostname_resolver(
        StaticResolver({"hooks.test", "other.test"})
    )
    try:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                functools.partial(trio.serve_ssl_over_tcp, host="127.0.0.1"),
                receiver.handle,
                0,
                server_ctx,
            )
            port = listeners[0].transport_listener.socket.getsockname()[1]
            send = HttpSender(ssl.create_default_context(cafile=cert))
            settings = fast(max_attempts=1)
            async with (
                open_engine(None, durability="memory") as engine,
                running(engine, settings, send=send),
            ):
                good = await engine.submit("x", webhook_url=f"https://hooks.test:{port}/tls")
                bad = await engine.submit("x", webhook_url=f"https://other.test:{port}/tls")
                await until(lambda: hook(engine, good.id).delivered)
                await until(lambda: hook(engine, bad.id).gave_up)
                error = hook(engine, bad.id).last_error
            nursery.cancel_scope.cancel()
    finally:
        trio.socket.set_custom_hostname_resolver(previous)
    assert error is not None and error.startswith("connection failed")
    assert "CERTIFICATE_VERIFY_FAILED" in error
    assert sorted(n for n in sni if n) == ["hooks.test", "other.test"]
    assert len(receiver.requests) == 1
    assert receiver.requests[0].headers["host"] == f"hooks.test:{port}"
