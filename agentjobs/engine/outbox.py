"""The webhook outbox: durable, signed, retried deliveries of every run's terminal state.

Theory of operation
-------------------

The journal is the outbox. A run submitted with a `webhook_url` owes one delivery once it
finishes; the fold (`state._finish`) records that as `run.webhook` (pending, due at
`completed_at`), and every attempt is a `webhook_attempt` event carrying its outcome and,
if it failed and time remains, `next_attempt_at`. So after a crash or a restart the
pending deliveries, and when each is due, are simply part of the replayed state: nothing is
lost and nothing needs a second store. `webhook_redeliver` (asked for by a user) starts a
fresh round.

This actor only *follows* the committed state:

* at start it schedules every pending delivery it finds in `engine.state`;
* a commit hook (called synchronously after each durable batch is folded) reschedules a
  run when its terminal, attempt or redeliver event commits, and forgets deleted runs;
* a single scheduler task sleeps (trio time, so tests can use `MockClock`) until the next
  due delivery, then starts one task per due delivery.

A delivery task re-checks the URL against the SSRF policy (`ssrf.check_url`: DNS can change
between submit and delivery), connects only to the addresses it screened
(`ssrf.PinnedBackend`), POSTs the JSON body signed per the Standard Webhooks scheme
(`agentjobs.webhooks`), never follows redirects, and gives up on the attempt after
`timeout_s`. A 2xx ends the delivery; anything else is retried on the schedule (default 5 s,
30 s, 2 min, 10 min, 1 h, then hourly, each with +-20 % jitter so a receiver coming back
is not hit by every sender at once) until `max_total_s` (24 h) after the round began; then
the delivery is marked failed (`gave_up`) and stays visible.

Concurrency: a limiter per receiver (`host:port`, default 4) is taken *before* the global
limiter (default 32), so deliveries queued behind one slow receiver hold no global slot and
cannot stall the others.

Guarantees: at least once. An attempt is recorded after it happens, so a crash in between
repeats it after restart; `webhook-id` is stable for a run (retries, restarts and
redeliveries alike) so receivers can deduplicate on it. A deleted run gets no further
attempts and no further events (`engine.writable`).
"""

from __future__ import annotations

import base64
import heapq
import itertools
import logging
import math
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal

import attrs
import httpcore
import orjson
import trio

from .. import webhooks
from .errors import EngineClosed, InvalidRequest, NotFinished, NotFound, StorageUnavailable
from .journal import JournalClosed, JournalWriteError
from .model import Event, EventType, Run, Status, isoformat
from .ssrf import (
    DEFAULT_RESOLVE_TIMEOUT,
    PinnedBackend,
    ResolvedTarget,
    UnsafeWebhookURL,
    WebhookPolicy,
    check_url,
    default_ssl_context,
    target_key,
)

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = [
    "DeliveryAttempt",
    "DeliveryHistory",
    "DeliveryRequest",
    "HttpSender",
    "Outbox",
    "SendFn",
    "WebhookSettings",
    "backoff_delay",
    "delivery_history",
    "event_name",
    "parse_tenant_secrets",
    "webhook_id",
    "webhook_payload",
]

log = logging.getLogger("agentjobs.webhooks")
E = EventType

_TERMINAL_EVENTS: Final = frozenset({E.SUCCEEDED, E.FAILED, E.CANCELLED})
_MAX_ERROR_CHARS: Final = 500
_WRITE_RETRY_S: Final = 5.0

DEFAULT_SCHEDULE: Final = (5.0, 30.0, 120.0, 600.0, 3600.0)


def parse_tenant_secrets(text: str) -> dict[str, str]:
    """`tenant:whsec_...` entries, separated by commas or newlines (`#` starts a comment).

    A tenant's value may hold several secrets separated by spaces (during a rotation).
    Raises ValueError naming the line, never echoing a secret.
    """
    out: dict[str, str] = {}
    for number, raw in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tenant, sep, secret = line.partition(":")
        tenant = tenant.strip()
        if not sep or not tenant or not secret.strip():
            raise ValueError(f"webhook secrets entry {number} is not tenant:whsec_<base64>")
        try:
            webhooks.split_secrets(secret)
        except ValueError as exc:
            raise ValueError(f"webhook secret for tenant {tenant!r}: {exc}") from None
        out[tenant] = secret.strip()
    return out


def _frozen_mapping(value: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(dict(value))


@attrs.frozen(slots=True, kw_only=True)
class WebhookSettings:
    """How the outbox signs, screens, times out and retries. Secrets are kept out of repr.

    `secret` signs every delivery (several secrets separated by spaces sign with each, for
    rotation); `tenant_secrets` maps a run's `spec.tenant` to its own secret, which then
    replaces the global one. No secret: deliveries carry `webhook-id` and
    `webhook-timestamp` but no signature.
    """

    secret: str | None = attrs.field(default=None, repr=False)
    tenant_secrets: Mapping[str, str] = attrs.field(
        factory=dict, converter=_frozen_mapping, repr=False
    )
    policy: WebhookPolicy = attrs.field(factory=WebhookPolicy)
    timeout_s: float = 10.0  # one attempt: resolve, connect, send, read the status line
    resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT
    schedule_s: tuple[float, ...] = attrs.field(default=DEFAULT_SCHEDULE, converter=tuple)
    repeat_s: float = 3600.0  # the delay after the schedule is used up
    max_total_s: float = 24 * 3600.0  # no attempt later than this after a round began
    max_attempts: int | None = None  # per round; None: limited by max_total_s only
    jitter: float = 0.2  # each delay is scaled by a random factor in [1 - jitter, 1 + jitter]
    per_target_concurrency: int = 4
    max_concurrency: int = 32
    user_agent: str = "agentjobs-webhooks/0.1"

    def __attrs_post_init__(self) -> None:
        for name in ("timeout_s", "resolve_timeout_s", "repeat_s", "max_total_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"webhook setting {name} must be a positive number")
        if any(not (math.isfinite(d) and d >= 0) for d in self.schedule_s):
            raise ValueError("webhook retry schedule delays must be non-negative numbers")
        if not 0 <= self.jitter < 1:
            raise ValueError("webhook jitter must be in [0, 1)")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("webhook max_attempts must be at least 1")
        if self.per_target_concurrency < 1 or self.max_concurrency < 1:
            raise ValueError("webhook concurrency limits must be at least 1")
        if self.secret is not None:
            webhooks.split_secrets(self.secret)
        for tenant, secret in self.tenant_secrets.items():
            try:
                webhooks.split_secrets(secret)
            except ValueError as exc:
                raise ValueError(f"webhook secret for tenant {tenant!r}: {exc}") from None

    def secret_for(self, tenant: str | None) -> str | None:
        if tenant is not None and tenant in self.tenant_secrets:
            return self.tenant_secrets[tenant]
        return self.secret


def backoff_delay(attempt: int, settings: WebhookSettings, rng: random.Random) -> float:
    """Seconds to wait after the `attempt`-th failed attempt of a round (1-based)."""
    base = (
        settings.schedule_s[attempt - 1]
        if attempt <= len(settings.schedule_s)
        else settings.repeat_s
    )
    if settings.jitter:
        base *= 1.0 + settings.jitter * rng.uniform(-1.0, 1.0)
    return max(0.0, base)


# -- what is sent --------------------------------------------------------------------------


def webhook_id(run_id: str) -> str:
    """The `webhook-id` of a run's delivery: derived from the run, so it never changes."""
    return "msg_" + run_id.removeprefix("run_")


def event_name(run: Run) -> str:
    if run.status is Status.SUCCEEDED:
        return "run.succeeded"
    if run.status is Status.CANCELLED:
        return "run.cancelled"
    if run.error_kind == "timeout":
        return "run.timed_out"
    return "run.failed"


def webhook_payload(run: Run) -> dict[str, Any]:
    """PraisonAI's keys (`job_id, status, result, error, completed_at, duration_seconds`)
    plus `event` and `session_id`. Built from the folded run, so every retry sends the
    same bytes."""
    succeeded = run.status is Status.SUCCEEDED
    return {
        "job_id": run.id,
        "status": run.status.value,
        "result": run.result if succeeded else None,
        "error": None if succeeded else run.error,
        "completed_at": isoformat(run.completed_at),
        "duration_seconds": run.duration,
        "event": event_name(run),
        "session_id": run.spec.session_id,
    }


@attrs.frozen(slots=True)
class DeliveryRequest:
    """One attempt, ready to go: where (screened), what headers, which bytes."""

    target: ResolvedTarget
    headers: tuple[tuple[str, str], ...]
    body: bytes
    timeout: float


SendFn = Callable[[DeliveryRequest], Awaitable[int]]
"""Sends one attempt and returns the HTTP status; raises (OSError, httpcore errors, ...)
when no response came. The outbox's default is `HttpSender`; tests inject fakes."""


class HttpSender:
    """POSTs with httpcore over `PinnedBackend`: only to the screened addresses, Host and
    TLS for the URL's name, no redirects, no proxies from the environment, no keep-alive
    (a new check and pin per attempt), and the response body is never read."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self._ssl = ssl_context

    async def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            # loading the CA bundle is blocking file IO: keep it off the event loop
            self._ssl = await trio.to_thread.run_sync(default_ssl_context)
        return self._ssl

    async def __call__(self, request: DeliveryRequest) -> int:
        target = request.target
        ctx = await self._ssl_context() if target.scheme == "https" else None
        headers = [(b"Host", target.host_header.encode("ascii"))]
        headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in request.headers]
        if target.auth is not None:
            token = base64.b64encode(":".join(target.auth).encode()).decode("ascii")
            headers.append((b"Authorization", f"Basic {token}".encode("ascii")))
        headers.append((b"Content-Length", str(len(request.body)).encode("ascii")))
        url = httpcore.URL(
            scheme=target.scheme.encode("ascii"),
            host=target.host.encode("ascii"),
            port=target.port,
            target=target.target.encode("ascii"),
        )
        t = request.timeout
        async with (
            httpcore.AsyncConnectionPool(
                ssl_context=ctx,
                network_backend=PinnedBackend(target),
                max_connections=1,
                max_keepalive_connections=0,
                retries=0,
            ) as pool,
            pool.stream(
                "POST",
                url,
                headers=headers,
                content=request.body,
                extensions={"timeout": {"connect": t, "read": t, "write": t, "pool": t}},
            ) as response,
        ):
            return response.status


# -- the delivery history (for GET /runs/{id}/webhooks) -------------------------------------

DeliveryStatus = Literal["none", "waiting", "pending", "delivered", "failed"]


@attrs.frozen(slots=True)
class DeliveryAttempt:
    attempt: int
    at: float
    ok: bool
    status_code: int | None
    error: str | None
    next_attempt_at: float | None
    duration_ms: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt,
            "at": isoformat(self.at),
            "ok": self.ok,
            "status_code": self.status_code,
            "error": self.error,
            "duration_ms": self.duration_ms,
            "next_attempt_at": isoformat(self.next_attempt_at),
        }


@attrs.frozen(slots=True)
class DeliveryHistory:
    """A run's webhook delivery, read back from its journal events.

    `status`: `none` (no webhook_url), `waiting` (run not finished), `pending` (due or
    waiting out a backoff), `delivered`, or `failed` (gave up; redeliver to try again).
    """

    run_id: str
    webhook_id: str | None
    status: DeliveryStatus
    next_attempt_at: float | None
    attempts: tuple[DeliveryAttempt, ...]
    redeliveries: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.run_id,
            "webhook_id": self.webhook_id,
            "status": self.status,
            "attempts": len(self.attempts),
            "next_attempt_at": isoformat(self.next_attempt_at),
            "deliveries": [a.to_json() for a in self.attempts],
            "redeliveries": [isoformat(t) for t in self.redeliveries],
        }


def _history_from(run: Run, events: Iterable[Event]) -> DeliveryHistory:
    attempts: list[DeliveryAttempt] = []
    redeliveries: list[float] = []
    for ev in events:
        if ev.type is E.WEBHOOK_ATTEMPT:
            d = ev.data
            attempts.append(
                DeliveryAttempt(
                    attempt=int(d.get("attempt", len(attempts) + 1)),
                    at=ev.ts,
                    ok=bool(d.get("ok")),
                    status_code=d.get("status_code"),
                    error=d.get("error"),
                    next_attempt_at=d.get("next_attempt_at"),
                    duration_ms=d.get("duration_ms"),
                )
            )
        elif ev.type is E.WEBHOOK_REDELIVER:
            redeliveries.append(float(ev.data.get("at", ev.ts)))
    status: DeliveryStatus
    hook = run.webhook
    if run.spec.webhook_url is None:
        status = "none"
    elif not run.finished or hook is None:
        status = "waiting"
    elif hook.delivered:
        status = "delivered"
    elif hook.gave_up:
        status = "failed"
    else:
        status = "pending"
    return DeliveryHistory(
        run_id=run.id,
        webhook_id=webhook_id(run.id) if run.spec.webhook_url is not None else None,
        status=status,
        next_attempt_at=hook.next_attempt_at if status == "pending" and hook else None,
        attempts=tuple(attempts),
        redeliveries=tuple(redeliveries),
    )


async def delivery_history(
    engine: Engine, run_id: str, *, tenant: str | None = None
) -> DeliveryHistory:
    """The delivery history of a run (`NotFound` for an unknown or another tenant's run).

    Works with or without a running outbox: it reads only the journal.
    """
    run = engine.get(run_id, tenant=tenant)
    events = await engine.events(run_id, tenant=tenant)
    return _history_from(run, events)


# -- the outbox -----------------------------------------------------------------------------


@attrs.define(slots=True)
class _Round:
    """Where a delivery round began (finish or redeliver) and how many attempts it had."""

    start: float
    attempts: int = 0


@attrs.define(slots=True, eq=False)
class _Target:
    limiter: trio.CapacityLimiter
    users: int = 0


@attrs.frozen(slots=True)
class _Outcome:
    ok: bool
    status_code: int | None = None
    error: str | None = None
    permanent: bool = False  # no retry can help (e.g. a refused IP literal)


@attrs.define(slots=True)
class OutboxStats:
    """Counters since this outbox started, for `/metrics` (no per-tenant labels)."""

    attempts_total: int = 0
    delivered_total: int = 0
    failed_attempts_total: int = 0
    gave_up_total: int = 0


class Outbox:
    """Delivers terminal-state webhooks for `engine`. Start `run` in the engine's nursery.

    `send` replaces the HTTP sender (tests); `rng` makes jitter reproducible.
    """

    def __init__(
        self,
        engine: Engine,
        settings: WebhookSettings | None = None,
        *,
        send: SendFn | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.engine = engine
        self.settings = settings if settings is not None else WebhookSettings()
        self.stats = OutboxStats()
        self._send: SendFn = send if send is not None else HttpSender()
        self._rng = rng if rng is not None else random.Random()
        self._heap: list[tuple[float, int, str]] = []
        self._due: dict[str, float] = {}
        self._tiebreak = itertools.count()
        self._rounds: dict[str, _Round] = {}
        self._inflight: dict[str, trio.Event] = {}
        self._deferred: set[str] = set()
        self._targets: dict[str, _Target] = {}
        self._limiter = trio.CapacityLimiter(self.settings.max_concurrency)
        self._wakeup = trio.Event()
        self._running = False
        self._hooked = False

    # -- lifecycle -------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until cancelled. Pending deliveries found in the state are resumed."""
        if self._running:
            raise RuntimeError("this outbox is already running")
        self._running = True
        # hook and scan in one synchronous step: no commit can fall between them
        if not self._hooked:
            self.engine.add_commit_hook(self._on_commit)
            self._hooked = True
        resumed = self._scan()
        if resumed:
            log.info("webhooks: resuming %d pending deliveries", resumed)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._schedule_loop(nursery)
        finally:
            # forget everything derived from events: while stopped the hook is deaf, so a
            # later `run` must rebuild it from the state and the journal
            self._running = False
            self._heap.clear()
            self._due.clear()
            self._deferred.clear()
            self._rounds.clear()

    def pending_count(self) -> int:
        """Deliveries scheduled or in flight (for /health and /metrics)."""
        return len(self._due) + len(self._inflight)

    async def check(self, url: str) -> ResolvedTarget:
        """Screen a webhook URL with this outbox's policy (submit-time 422 check)."""
        return await check_url(url, self.settings.policy, timeout=self.settings.resolve_timeout_s)

    # -- following the journal -------------------------------------------------------

    def _pending(self, run: Run) -> bool:
        hook = run.webhook
        return (
            run.spec.webhook_url is not None
            and hook is not None
            and not hook.delivered
            and not hook.gave_up
            and hook.next_attempt_at is not None
            and self.engine.writable(run.id)
        )

    def _scan(self) -> int:
        count = 0
        for run in list(self.engine.state.runs.values()):
            if run.webhook is not None and self._pending(run):
                assert run.webhook.next_attempt_at is not None
                self._schedule(run.id, run.webhook.next_attempt_at)
                count += 1
        return count

    def _on_commit(self, events: Sequence[Event]) -> None:
        """Commit hook: runs inside the journal writer, so it must not block or raise."""
        if not self._running:
            return
        try:
            for ev in events:
                t = ev.type
                if t in _TERMINAL_EVENTS or t is E.WEBHOOK_ATTEMPT or t is E.WEBHOOK_REDELIVER:
                    self._follow(ev)
                elif t is E.DELETED:
                    self._forget(ev.run)
        except Exception:  # pragma: no cover - a bug here must not take the journal down
            log.exception("webhooks: commit hook failed")

    def _follow(self, ev: Event) -> None:
        rid = ev.run
        run = self.engine.state.runs.get(rid)
        if run is None or run.spec.webhook_url is None:
            return
        if ev.type is E.WEBHOOK_ATTEMPT:
            rnd = self._rounds.get(rid)
            if rnd is not None:
                rnd.attempts += 1
        elif ev.type is E.WEBHOOK_REDELIVER:
            self._rounds[rid] = _Round(float(ev.data.get("at", ev.ts)))
        else:
            self._rounds[rid] = _Round(ev.ts)
        if self._pending(run):
            assert run.webhook is not None and run.webhook.next_attempt_at is not None
            self._schedule(rid, run.webhook.next_attempt_at)
        else:
            self._forget(rid)

    def _forget(self, rid: str) -> None:
        self._due.pop(rid, None)
        self._rounds.pop(rid, None)

    def _schedule(self, rid: str, at: float) -> None:
        self._due[rid] = at
        heapq.heappush(self._heap, (at, next(self._tiebreak), rid))
        if len(self._heap) > 64 + 2 * len(self._due):  # drop stale entries now and then
            self._heap = [(a, n, r) for a, n, r in self._heap if self._due.get(r) == a]
            heapq.heapify(self._heap)
        self._wakeup.set()

    async def _schedule_loop(self, nursery: trio.Nursery) -> None:
        while True:
            self._wakeup = trio.Event()
            now = self.engine.wall()
            heap = self._heap
            while heap and heap[0][0] <= now:
                at, _, rid = heapq.heappop(heap)
                if self._due.get(rid) != at:
                    continue  # superseded or forgotten
                del self._due[rid]
                if rid in self._inflight:
                    self._deferred.add(rid)  # look again when the current attempt ends
                    continue
                self._inflight[rid] = trio.Event()
                nursery.start_soon(self._deliver, rid)
            wait = heap[0][0] - now if heap else math.inf
            with trio.move_on_after(wait):
                await self._wakeup.wait()

    # -- delivering ------------------------------------------------------------------

    @asynccontextmanager
    async def _slot(self, key: str) -> AsyncIterator[None]:
        """A per-receiver slot, then a global one (in that order: see the module doc)."""
        target = self._targets.get(key)
        if target is None:
            target = self._targets[key] = _Target(
                trio.CapacityLimiter(self.settings.per_target_concurrency)
            )
        target.users += 1
        try:
            async with target.limiter, self._limiter:
                yield
        finally:
            target.users -= 1
            if target.users == 0:
                del self._targets[key]

    async def _deliver(self, rid: str) -> None:
        try:
            await self._attempt(rid)
        finally:
            self._inflight.pop(rid).set()
            if rid in self._deferred:
                self._deferred.discard(rid)
                run = self.engine.state.runs.get(rid)
                if run is not None and run.webhook is not None and self._pending(run):
                    assert run.webhook.next_attempt_at is not None
                    self._schedule(rid, run.webhook.next_attempt_at)

    async def _round(self, run: Run) -> _Round | None:
        """This round's start and attempts so far; read from the journal after a restart."""
        rnd = self._rounds.get(run.id)
        if rnd is not None:
            return rnd
        try:
            events = await self.engine.events(run.id, tenant=run.spec.tenant)
        except NotFound:
            return None
        assert run.completed_at is not None
        rnd = _Round(run.completed_at)
        for ev in events:
            if ev.type in _TERMINAL_EVENTS:
                rnd = _Round(ev.ts)
            elif ev.type is E.WEBHOOK_REDELIVER:
                rnd = _Round(float(ev.data.get("at", ev.ts)))
            elif ev.type is E.WEBHOOK_ATTEMPT:
                rnd.attempts += 1
        return self._rounds.setdefault(run.id, rnd)

    async def _attempt(self, rid: str) -> None:
        engine = self.engine
        run = engine.state.runs.get(rid)
        if run is None or not self._pending(run):
            return
        rnd = await self._round(run)
        if rnd is None:
            return
        url = run.spec.webhook_url
        assert url is not None
        key = target_key(url)
        async with self._slot(key):
            run = engine.state.runs.get(rid)
            if run is None or not self._pending(run):
                return  # deleted, or redelivered and handled, while we waited for a slot
            started = trio.current_time()
            outcome = await self._try_once(run, url)
            duration_ms = round((trio.current_time() - started) * 1000.0, 1)
        n = rnd.attempts + 1
        now = engine.wall()
        next_at: float | None = None
        if not outcome.ok and not outcome.permanent:
            s = self.settings
            if s.max_attempts is None or n < s.max_attempts:
                candidate = now + backoff_delay(n, s, self._rng)
                if candidate <= rnd.start + s.max_total_s:
                    next_at = candidate
        assert run.webhook is not None
        data: dict[str, Any] = {
            "attempt": run.webhook.attempts + 1,
            "ok": outcome.ok,
            "status_code": outcome.status_code,
            "error": outcome.error,
            "next_attempt_at": next_at,
            "duration_ms": duration_ms,
        }
        if not engine.writable(rid):
            return  # deleted meanwhile: it gets no more events
        try:
            await engine.journal.commit(rid, E.WEBHOOK_ATTEMPT, data)
        except JournalClosed:
            return  # shutting down: the attempt is repeated after restart
        except JournalWriteError as exc:
            log.error("webhooks: cannot record attempt for %s: %s", rid, exc)
            self._schedule(rid, now + _WRITE_RETRY_S)
            return
        self._count(rid, key, n, outcome, next_at, now)

    def _count(
        self, rid: str, key: str, n: int, outcome: _Outcome, next_at: float | None, now: float
    ) -> None:
        stats = self.stats
        stats.attempts_total += 1
        if outcome.ok:
            stats.delivered_total += 1
            log.debug("webhooks: %s delivered to %s (attempt %d)", rid, key, n)
            return
        stats.failed_attempts_total += 1
        if next_at is None:
            stats.gave_up_total += 1
            log.error(
                "webhooks: giving up on %s to %s after attempt %d: %s",
                rid,
                key,
                n,
                outcome.error,
            )
        else:
            log.warning(
                "webhooks: %s to %s failed (attempt %d: %s); next in %.1f s",
                rid,
                key,
                n,
                outcome.error,
                next_at - now,
            )

    async def _try_once(self, run: Run, url: str) -> _Outcome:
        """One attempt, never raising (except cancellation): check, sign, send, classify."""
        s = self.settings
        body = orjson.dumps(webhook_payload(run))
        with trio.move_on_after(s.timeout_s):
            try:
                target = await check_url(url, s.policy, timeout=s.resolve_timeout_s)
            except UnsafeWebhookURL as exc:
                return _Outcome(False, error=f"refused: {exc.reason}", permanent=exc.permanent)
            stamp = int(self.engine.wall())
            headers = {"Content-Type": "application/json", "User-Agent": s.user_agent}
            headers.update(
                webhooks.signature_headers(
                    webhook_id(run.id), stamp, body, s.secret_for(run.spec.tenant)
                )
            )
            request = DeliveryRequest(target, tuple(headers.items()), body, s.timeout_s)
            try:
                status = await self._send(request)
            except httpcore.TimeoutException as exc:
                return _Outcome(False, error=_clip(f"timed out ({type(exc).__name__})"))
            except (httpcore.ConnectError, OSError) as exc:
                return _Outcome(False, error=_clip(f"connection failed: {_describe(exc)}"))
            except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
                return _Outcome(False, error=_clip(f"{type(exc).__name__}: {_describe(exc)}"))
            except Exception as exc:
                log.exception("webhooks: unexpected error delivering %s", run.id)
                return _Outcome(False, error=_clip(f"{type(exc).__name__}: {_describe(exc)}"))
            if 200 <= status < 300:
                return _Outcome(True, status)
            if 300 <= status < 400:
                return _Outcome(False, status, f"HTTP {status} (redirects are not followed)")
            return _Outcome(False, status, f"HTTP {status}")
        return _Outcome(False, error=f"timed out after {s.timeout_s:g} s")

    # -- on demand -------------------------------------------------------------------

    async def deliveries(self, run_id: str, *, tenant: str | None = None) -> DeliveryHistory:
        """The delivery history of a run (for `GET /runs/{id}/webhooks`)."""
        return await delivery_history(self.engine, run_id, tenant=tenant)

    async def redeliver(self, run_id: str, *, tenant: str | None = None) -> DeliveryHistory:
        """Start a new delivery round now (for `POST /runs/{id}/webhooks/redeliver`).

        Allowed whatever the current state (delivered, failed, or pending: it resets the
        backoff and the 24 h window). Raises `NotFound`, `NotFinished`, `InvalidRequest`
        (the run has no webhook_url), `StorageUnavailable` or `EngineClosed`.
        """
        engine = self.engine
        run = engine.get(run_id, tenant=tenant)
        if not run.finished:
            raise NotFinished(run_id, run.status.value)
        if run.spec.webhook_url is None:
            raise InvalidRequest("webhook_url", "this run was submitted without a webhook_url")
        # let an attempt in flight finish first, so its record cannot land in the new round
        while (inflight := self._inflight.get(run_id)) is not None:
            await inflight.wait()
        if not engine.writable(run_id):
            raise NotFound(run_id)
        try:
            await engine.journal.commit(run_id, E.WEBHOOK_REDELIVER, {"at": engine.wall()})
        except JournalWriteError as exc:
            raise StorageUnavailable(f"could not record the redelivery: {exc}") from exc
        except JournalClosed:
            raise EngineClosed("the engine is shutting down") from None
        return await self.deliveries(run_id, tenant=tenant)


def _describe(exc: BaseException) -> str:
    """The first non-empty message down the cause chain: httpcore wraps a TLS failure in
    a bare `ConnectError()`, and "connection failed: " alone would help no one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).strip()
        if text:
            return text if current is exc else f"{type(current).__name__}: {text}"
        current = current.__cause__ or current.__context__
    return type(exc).__name__


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."
