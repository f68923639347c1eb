"""The webhook outbox's schedule, durability and bookkeeping, on a fake clock.

Every test here runs under trio's `MockClock` with autojump, so a 24 h retry schedule takes
milliseconds, and replaces the HTTP sender with a fake `send` (real sockets and a virtual
clock do not mix well: timeouts would fire instantly). Real HTTP deliveries to a loopback
receiver are in `test_webhooks_delivery.py`.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from agentjobs import Engine, InvalidRequest, NotFinished, NotFound, open_engine
from agentjobs.engine.model import EventType
from agentjobs.engine.outbox import (
    DeliveryRequest,
    Outbox,
    WebhookSettings,
    backoff_delay,
    parse_tenant_secrets,
    webhook_id,
)
from agentjobs.engine.ssrf import WebhookPolicy
from agentjobs.webhooks import WebhookVerificationError, generate_secret, verify

BASE = 1_800_000_000.0
HOUR = 3600.0
LOCAL = WebhookPolicy.parse("127.0.0.1/32")
URL = "http://127.0.0.1:9001/hook"


def wall() -> float:
    """The engine's wall clock, moving with trio's (mock) clock."""
    return BASE + trio.current_time()


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@attrs.define
class Sent:
    at: float  # wall time of the call
    request: DeliveryRequest

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.request.headers)


@attrs.define
class FakeSend:
    """Answers from `statuses` in turn (then `default`); an exception instance is raised."""

    statuses: list[int | Exception] = attrs.field(factory=list)
    default: int = 200
    duration: float = 0.0
    calls: list[Sent] = attrs.field(factory=list)
    active: int = 0
    peak: int = 0
    peak_by_port: dict[int, int] = attrs.field(factory=dict)
    _by_port: dict[int, int] = attrs.field(factory=dict)

    async def __call__(self, request: DeliveryRequest) -> int:
        self.calls.append(Sent(wall(), request))
        port = request.target.port
        self.active += 1
        self._by_port[port] = self._by_port.get(port, 0) + 1
        self.peak = max(self.peak, self.active)
        self.peak_by_port[port] = max(self.peak_by_port.get(port, 0), self._by_port[port])
        try:
            await trio.sleep(self.duration)
            answer = self.statuses.pop(0) if self.statuses else self.default
            if isinstance(answer, Exception):
                raise answer
            return answer
        finally:
            self.active -= 1
            self._by_port[port] -= 1


def settings(**changes: Any) -> WebhookSettings:
    base: dict[str, Any] = {"policy": LOCAL, "jitter": 0.0}
    base.update(changes)
    return WebhookSettings(**base)


@asynccontextmanager
async def running(engine: Engine, s: WebhookSettings, send: FakeSend) -> AsyncIterator[Outbox]:
    outbox = Outbox(engine, s, send=send, rng=random.Random(7))
    async with trio.open_nursery() as nursery:
        await nursery.start(outbox.run)
        yield outbox
        nursery.cancel_scope.cancel()


async def until(
    pred: Callable[[], bool], timeout: float = 10 * 24 * HOUR, step: float = 0.5
) -> None:
    """Poll `pred` (in virtual time: a coarse `step` keeps day-long waits cheap)."""
    with trio.fail_after(timeout):
        while not pred():  # noqa: ASYNC110 - polling state that has no event to wait on
            await trio.sleep(step)


def hook_of(engine: Engine, run_id: str, tenant: str | None = None) -> Any:
    return engine.get(run_id, tenant=tenant).webhook


async def finished_run(engine: Engine, url: str = URL, **options: Any) -> str:
    run = await engine.submit("hello", webhook_url=url, **options)
    await engine.wait(run.id, tenant=options.get("tenant"))
    return run.id


def gaps(calls: list[Sent]) -> list[float]:
    return [round(b.at - a.at, 3) for a, b in itertools.pairwise(calls)]


# -- the schedule ---------------------------------------------------------------------------


async def test_retries_follow_the_schedule_then_deliver(clock: trio.testing.MockClock) -> None:
    send = FakeSend([500, 502, OSError("connection refused"), 503], default=204)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, settings(), send),
    ):
        rid = await finished_run(engine, session_id="s1")
        await until(lambda: hook_of(engine, rid).delivered)
        history = await engine.events(rid)
    assert gaps(send.calls) == [5.0, 30.0, 120.0, 600.0]
    assert {c.headers["webhook-id"] for c in send.calls} == {webhook_id(rid)}
    assert len({c.request.body for c in send.calls}) == 1  # the same bytes every time
    attempts = [e.data for e in history if e.type is EventType.WEBHOOK_ATTEMPT]
    assert [a["attempt"] for a in attempts] == [1, 2, 3, 4, 5]
    assert [a["ok"] for a in attempts] == [False] * 4 + [True]
    assert [a["status_code"] for a in attempts] == [500, 502, None, 503, 204]
    assert attempts[2]["error"].startswith("connection failed: connection refused")
    assert attempts[0]["error"] == "HTTP 500"
    # each failed attempt says when the next one is due, and the next one came then
    for record, nxt in zip(attempts, send.calls[1:], strict=False):
        assert record["next_attempt_at"] == pytest.approx(nxt.at)
    assert attempts[-1]["next_attempt_at"] is None


async def test_exhausted_delivery_is_marked_failed_after_24h(
    clock: trio.testing.MockClock,
) -> None:
    send = FakeSend(default=500)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, settings(), send) as outbox,
    ):
        rid = await finished_run(engine)
        finished_at = engine.get(rid).completed_at
        assert finished_at is not None
        await until(lambda: hook_of(engine, rid).gave_up, step=60)
        await trio.sleep(3 * 24 * HOUR)  # nothing more happens afterwards
        hook = hook_of(engine, rid)
        history = (await outbox.deliveries(rid)).to_json()
    # 5 s, 30 s, 2 min, 10 min, 1 h, then hourly while within 24 h of the finish
    assert gaps(send.calls)[:5] == [5.0, 30.0, 120.0, 600.0, HOUR]
    assert set(gaps(send.calls)[5:]) == {HOUR}
    assert len(send.calls) == 28
    assert send.calls[-1].at - finished_at <= 24 * HOUR < send.calls[-1].at - finished_at + HOUR
    assert hook.gave_up and not hook.delivered and hook.attempts == 28
    assert hook.next_attempt_at is None and hook.last_status == 500
    assert history["status"] == "failed" and history["attempts"] == 28
    assert history["deliveries"][-1]["next_attempt_at"] is None
    assert outbox.stats.gave_up_total == 1 and outbox.stats.failed_attempts_total == 28


async def test_jitter_spreads_delays_within_bounds(clock: trio.testing.MockClock) -> None:
    send = FakeSend(default=500)
    s = settings(jitter=0.2, max_attempts=8)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, s, send),
    ):
        rid = await finished_run(engine)
        await until(lambda: hook_of(engine, rid).gave_up, step=60)
    bases = [5.0, 30.0, 120.0, 600.0, HOUR, HOUR, HOUR]
    observed = gaps(send.calls)
    assert len(observed) == 7
    for gap, base in zip(observed, bases, strict=True):
        assert 0.8 * base - 0.01 <= gap <= 1.2 * base + 0.01
    assert len(set(observed[4:])) > 1  # not all the same: there is jitter
    rng = random.Random(1)
    delays = [backoff_delay(9, s, rng) for _ in range(200)]
    assert min(delays) >= 0.8 * HOUR and max(delays) <= 1.2 * HOUR


async def test_limits_are_configurable(clock: trio.testing.MockClock) -> None:
    send = FakeSend(default=500)
    s = settings(schedule_s=(1.0, 2.0), repeat_s=10.0, max_total_s=40.0)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, s, send),
    ):
        rid = await finished_run(engine)
        await until(lambda: hook_of(engine, rid).gave_up)
    # at 0, 1, 3, 13, 23, 33; the next would be at 43, past the 40 s window
    assert gaps(send.calls) == [1.0, 2.0, 10.0, 10.0, 10.0]


# -- durability ------------------------------------------------------------------------------


async def test_restart_in_the_middle_of_the_schedule_continues(
    clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    first = FakeSend(default=500)
    s = settings(secret=generate_secret())
    async with (
        open_engine(tmp_path, durability="os", wall_clock=wall) as engine,
        running(engine, s, first),
    ):
        rid = await finished_run(engine)
        await until(lambda: hook_of(engine, rid).attempts == 2)
        due = hook_of(engine, rid).next_attempt_at
    assert gaps(first.calls) == [5.0]
    assert due == pytest.approx(first.calls[-1].at + 30.0)

    await trio.sleep(7.0)  # the server is down for a while
    second = FakeSend([500], default=200)
    async with open_engine(tmp_path, durability="os", wall_clock=wall) as engine:
        hook = hook_of(engine, rid)
        assert hook.attempts == 2 and hook.next_attempt_at == due and not hook.delivered
        async with running(engine, s, second):
            await until(lambda: hook_of(engine, rid).delivered)
            history = await engine.events(rid)
    # resumed when it was due, and the round continued: the 3rd failure waits 2 minutes
    assert second.calls[0].at == pytest.approx(due)
    assert gaps(second.calls) == [120.0]
    assert {c.headers["webhook-id"] for c in first.calls + second.calls} == {webhook_id(rid)}
    for call in second.calls:
        verify(call.request.body, call.headers, s.secret or "", now=call.at)
    attempts = [e.data["attempt"] for e in history if e.type is EventType.WEBHOOK_ATTEMPT]
    assert attempts == [1, 2, 3, 4]


async def test_runs_finished_without_an_outbox_are_delivered_at_start(
    clock: trio.testing.MockClock,
) -> None:
    send = FakeSend()
    async with open_engine(None, durability="memory", wall_clock=wall) as engine:
        ids = [await finished_run(engine) for _ in range(3)]
        plain = await engine.submit("no hook")
        await engine.wait(plain.id)
        await trio.sleep(60)
        async with running(engine, settings(), send):
            await until(lambda: all(hook_of(engine, r).delivered for r in ids))
    assert sorted(c.headers["webhook-id"] for c in send.calls) == sorted(map(webhook_id, ids))
    assert engine.get(plain.id).webhook is None


async def test_deleted_run_gets_no_more_attempts(clock: trio.testing.MockClock) -> None:
    send = FakeSend(default=500)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, settings(), send) as outbox,
    ):
        rid = await finished_run(engine)
        await until(lambda: len(send.calls) == 1)
        await engine.delete(rid)
        await trio.sleep(2 * HOUR)
        assert outbox.pending_count() == 0
    assert len(send.calls) == 1


# -- redelivery and history ------------------------------------------------------------------


async def test_max_attempts_then_redeliver(clock: trio.testing.MockClock) -> None:
    send = FakeSend(default=503)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, settings(max_attempts=3), send) as outbox,
    ):
        rid = await finished_run(engine, tenant="acme")
        await until(lambda: hook_of(engine, rid, "acme").gave_up)
        failed = await outbox.deliveries(rid, tenant="acme")
        assert failed.status == "failed" and len(failed.attempts) == 3
        assert gaps(send.calls) == [5.0, 30.0]

        send.default = 200
        await trio.sleep(HOUR)
        again = await outbox.redeliver(rid, tenant="acme")
        assert again.status == "pending" and len(again.redeliveries) == 1
        await until(lambda: hook_of(engine, rid, "acme").delivered)
        done = (await outbox.deliveries(rid, tenant="acme")).to_json()

        with pytest.raises(NotFound):
            await outbox.redeliver(rid)  # another tenant's run does not exist for us
        with pytest.raises(NotFound):
            await outbox.deliveries(rid, tenant="other")
        plain = await engine.submit("no hook")
        await engine.wait(plain.id)
        with pytest.raises(InvalidRequest):
            await outbox.redeliver(plain.id)
        assert (await outbox.deliveries(plain.id)).status == "none"
        slow = await engine.submit("slow", config={"delay_s": 50}, webhook_url=URL)
        with pytest.raises(NotFinished):
            await outbox.redeliver(slow.id)
        assert (await outbox.deliveries(slow.id)).status == "waiting"
    assert len(send.calls) == 4
    assert send.calls[3].at == pytest.approx(send.calls[2].at + HOUR)
    assert {c.headers["webhook-id"] for c in send.calls} == {webhook_id(rid)}
    assert done["status"] == "delivered" and done["attempts"] == 4
    assert [d["ok"] for d in done["deliveries"]] == [False, False, False, True]
    assert [d["status_code"] for d in done["deliveries"]] == [503, 503, 503, 200]
    assert done["deliveries"][0]["at"].endswith("Z")
    assert done["webhook_id"] == webhook_id(rid) and len(done["redeliveries"]) == 1


async def test_redeliver_resets_the_round_and_window(clock: trio.testing.MockClock) -> None:
    send = FakeSend(default=500)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, settings(max_total_s=100.0), send) as outbox,
    ):
        rid = await finished_run(engine)
        await until(lambda: hook_of(engine, rid).gave_up)
        assert len(send.calls) == 3  # 0, 5, 35; the next (155) is past the window
        await outbox.redeliver(rid)
        await until(lambda: hook_of(engine, rid).gave_up)
    assert len(send.calls) == 6  # a fresh round: its own schedule and its own window
    assert gaps(send.calls)[3:] == [5.0, 30.0]


async def test_redeliver_waits_for_an_attempt_in_flight(clock: trio.testing.MockClock) -> None:
    """An attempt's record must land in the round it belongs to, before the redelivery."""
    send = FakeSend([500], default=200, duration=3.0)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, settings(), send) as outbox,
    ):
        rid = await finished_run(engine)
        await until(lambda: send.active == 1, step=0.1)
        await outbox.redeliver(rid)  # asked while the first attempt is still waiting
        await until(lambda: hook_of(engine, rid).delivered)
        types = [e.type for e in await engine.events(rid)][-3:]
    assert types == [
        EventType.WEBHOOK_ATTEMPT,
        EventType.WEBHOOK_REDELIVER,
        EventType.WEBHOOK_ATTEMPT,
    ]
    assert len(send.calls) == 2  # the redelivery, not the 5 s backoff, made the 2nd call
    assert send.calls[1].at - send.calls[0].at == pytest.approx(3.0)


# -- concurrency -----------------------------------------------------------------------------


async def test_concurrency_is_bounded_per_target_and_overall(
    clock: trio.testing.MockClock,
) -> None:
    send = FakeSend(duration=5.0)
    s = settings(per_target_concurrency=2, max_concurrency=5)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, s, send),
    ):
        ids = []
        for port in (9001, 9002, 9003, 9004):
            for _ in range(4):
                ids.append(await finished_run(engine, f"http://127.0.0.1:{port}/h"))
        await until(lambda: all(hook_of(engine, r).delivered for r in ids))
    assert len(send.calls) == 16
    assert send.peak == 5
    assert max(send.peak_by_port.values()) == 2


async def test_a_slow_target_does_not_stall_the_others(clock: trio.testing.MockClock) -> None:
    release = trio.Event()

    class Gated(FakeSend):
        async def __call__(self, request: DeliveryRequest) -> int:
            if request.target.port == 9001:
                await release.wait()
            return await super().__call__(request)

    send = Gated()
    # a long attempt timeout: the slow receiver's slots must not free themselves meanwhile
    s = settings(per_target_concurrency=2, max_concurrency=3, timeout_s=HOUR)
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, s, send),
    ):
        slow = [await finished_run(engine, "http://127.0.0.1:9001/") for _ in range(6)]
        fast = [await finished_run(engine, "http://127.0.0.1:9002/") for _ in range(4)]
        await until(lambda: all(hook_of(engine, r).delivered for r in fast), timeout=60)
        assert not any(hook_of(engine, r).delivered for r in slow)
        release.set()
        await until(lambda: all(hook_of(engine, r).delivered for r in slow))


# -- what is sent ----------------------------------------------------------------------------


async def test_per_tenant_secrets_sign_their_tenants_runs(clock: trio.testing.MockClock) -> None:
    default, acme = generate_secret(), generate_secret()
    s = settings(secret=default, tenant_secrets={"acme": acme})
    send = FakeSend()
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, s, send),
    ):
        a = await finished_run(engine, tenant="acme")
        b = await finished_run(engine, tenant="other")
        c = await finished_run(engine)
        await until(lambda: len(send.calls) == 3)
    by_id = {c_.headers["webhook-id"]: c_ for c_ in send.calls}
    signed_with = {a: acme, b: default, c: default}
    for rid, secret in signed_with.items():
        call = by_id[webhook_id(rid)]
        assert verify(call.request.body, call.headers, secret, now=call.at)["job_id"] == rid
    wrong = by_id[webhook_id(a)]
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(wrong.request.body, wrong.headers, default, now=wrong.at)


async def test_unsigned_without_a_secret(clock: trio.testing.MockClock) -> None:
    send = FakeSend()
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, settings(), send),
    ):
        rid = await finished_run(engine)
        await until(lambda: len(send.calls) == 1)
    headers = send.calls[0].headers
    assert "webhook-signature" not in headers
    assert headers["webhook-id"] == webhook_id(rid)
    assert headers["webhook-timestamp"] == str(int(send.calls[0].at))
    assert headers["Content-Type"] == "application/json"


async def test_refused_target_gives_up_at_once_for_a_literal(
    clock: trio.testing.MockClock,
) -> None:
    send = FakeSend()
    async with (
        open_engine(None, durability="memory", wall_clock=wall) as engine,
        running(engine, settings(policy=WebhookPolicy()), send),
    ):
        rid = await finished_run(engine, "http://10.0.0.8:8080/hook")
        await until(lambda: hook_of(engine, rid).gave_up)
    hook = hook_of(engine, rid)
    assert send.calls == [] and hook.attempts == 1
    assert hook.last_error.startswith("refused: webhook_url host 10.0.0.8 is a private address")


# -- settings --------------------------------------------------------------------------------


def test_settings_validate_and_hide_secrets() -> None:
    secret = generate_secret()
    s = WebhookSettings(secret=secret, tenant_secrets={"t": secret})
    assert secret not in repr(s)
    assert s.secret_for("t") == secret and s.secret_for(None) == secret
    with pytest.raises(ValueError, match="base64"):
        WebhookSettings(secret="whsec_***")
    with pytest.raises(ValueError, match="tenant 't'"):
        WebhookSettings(tenant_secrets={"t": "nope!"})
    for bad in ({"timeout_s": 0}, {"jitter": 1.5}, {"max_attempts": 0}, {"schedule_s": (-1,)}):
        with pytest.raises(ValueError):
            WebhookSettings(**bad)
    text = f"acme:{secret}\n# comment\nbeta:{secret} {generate_secret()}, gamma:{secret}"
    parsed = parse_tenant_secrets(text)
    assert sorted(parsed) == ["acme", "beta", "gamma"] and len(parsed["beta"].split()) == 2
    with pytest.raises(ValueError, match="entry 1"):
        parse_tenant_secrets("no-colon-here")
    with pytest.raises(ValueError) as info:
        parse_tenant_secrets("acme:whsec_short")
    assert "whsec_short" not in str(info.value)
