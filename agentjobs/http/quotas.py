"""Per-tenant abuse limits: submit rate, runs in flight, open streams.

All three are decided in the HTTP layer, *before* the engine is asked to record anything,
so a refused request (429 + `Retry-After`) has written nothing and nothing accepted is ever
lost to a limit. They are keyed by tenant (None when auth is off: then they limit the one
anonymous tenant, which is still useful on a shared loopback).

* `SubmitRate`: a token bucket per tenant (`--tenant-rate` per second, `--tenant-burst`
  at once). `Retry-After` is the time until the bucket holds the tokens asked for (one,
  or a batch's N) again.
* `ActiveRuns`: how many queued + running runs each tenant has, kept current from the
  engine's commit hook (O(1) per event) instead of scanning the queue on every submit;
  submits on their way to the journal are counted as reservations, so concurrent submits
  cannot all slip under the limit. `Retry-After` is adaptive: the recent interval between
  that tenant's runs finishing (each one frees a place), 1 to 60 s.
* `StreamSlots`: open SSE streams per tenant. A slot is taken in the handler (so the check
  and the count cannot race) and given back when the stream body closes, or, should the
  body never be started (the client left first), when it is garbage-collected.
"""

from __future__ import annotations

import math
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import attrs
import trio

from ..engine import Engine, Event, EventType, Status

__all__ = ["ActiveRuns", "LimitExceeded", "StreamSlot", "StreamSlots", "SubmitRate"]

_ACTIVE = (Status.QUEUED, Status.RUNNING)
_SKIP = frozenset({EventType.OUTPUT, EventType.PROGRESS})
_DEPARTURES_KEPT = 8


class LimitExceeded(Exception):
    """A per-tenant limit refused the request; `retry_after` is in whole seconds (>= 1)."""

    def __init__(self, limit: str, detail: str, retry_after: float) -> None:
        super().__init__(detail)
        self.limit = limit
        self.detail = detail
        self.retry_after = max(1, math.ceil(retry_after))


@attrs.define(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class SubmitRate:
    """A token bucket per tenant: `rate` tokens a second, at most `burst` stored."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = trio.current_time
    ) -> None:
        if not rate > 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str | None, _Bucket] = {}

    def take(self, tenant: str | None, n: int = 1, *, taken: int = 0) -> None:
        """Spend `n` tokens (a batch of n submits), or raise `LimitExceeded` (spending
        nothing). `n` must not exceed `burst`: the bucket never holds more.

        `taken` of the `n` were spent earlier by this same request (a batch takes one
        before its body is read, `_handlers.admit_submit`, and the rest once its items
        are counted): they are given back first and the `n` taken at once, so that a
        refusal spends nothing and its `Retry-After` is the wait until all `n` are there.
        Taking the rest alone would give the wait for `n - taken`, and a client that
        waits exactly that would find itself `taken` short, every time.
        """
        now = self.clock()
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(float(self.burst), now)
        bucket.tokens = min(
            float(self.burst), bucket.tokens + taken + (now - bucket.stamp) * self.rate
        )
        bucket.stamp = now
        if bucket.tokens >= n:
            bucket.tokens -= n
            return
        wait = (n - bucket.tokens) / self.rate
        raise LimitExceeded(
            "submit-rate",
            f"over the submit rate of {self.rate:g}/s (burst {self.burst}) for this tenant; "
            "retry after the time in Retry-After",
            wait,
        )


class ActiveRuns:
    """Queued + running runs per tenant, followed through the engine's commit hook."""

    def __init__(
        self, engine: Engine, limit: int, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.engine = engine
        self.limit = limit
        self.clock = clock
        self._tenant_of: dict[str, str | None] = {}
        self._counts: dict[str | None, int] = {}
        self._reserved: dict[str | None, int] = {}
        self._departures: dict[str | None, deque[float]] = {}
        runs = engine.state.runs
        for status in _ACTIVE:
            for run_id in engine.state.by_status[status]:
                self._add(run_id, runs[run_id].spec.tenant)
        engine.add_commit_hook(self._on_commit)

    def _add(self, run_id: str, tenant: str | None) -> None:
        if run_id not in self._tenant_of:
            self._tenant_of[run_id] = tenant
            self._counts[tenant] = self._counts.get(tenant, 0) + 1

    def _remove(self, run_id: str) -> None:
        if run_id not in self._tenant_of:
            return
        tenant = self._tenant_of.pop(run_id)
        left = self._counts[tenant] - 1
        if left:
            self._counts[tenant] = left
        else:
            del self._counts[tenant]
        times = self._departures.get(tenant)
        if times is None:
            times = self._departures[tenant] = deque(maxlen=_DEPARTURES_KEPT)
        times.append(self.clock())

    def _on_commit(self, events: Sequence[Event]) -> None:
        runs = self.engine.state.runs
        for ev in events:
            if ev.type in _SKIP:
                continue
            run = runs.get(ev.run)
            if run is not None and run.status in _ACTIVE:
                self._add(ev.run, run.spec.tenant)
            else:
                self._remove(ev.run)

    def count(self, tenant: str | None) -> int:
        """Active runs of `tenant` plus its submits being recorded right now."""
        return self._counts.get(tenant, 0) + self._reserved.get(tenant, 0)

    def _retry_hint(self, tenant: str | None, places: int = 1) -> float:
        """Seconds until `places` places are likely free: the tenant's recent time between
        finishes, times the places missing; at least 1 s, at most 60 s."""
        times = self._departures.get(tenant)
        if not times or len(times) < 2:
            return 2.0
        interval = (self.clock() - times[0]) / len(times)
        return min(60.0, max(1.0, interval * places))

    @contextmanager
    def reserve(self, tenant: str | None, n: int = 1) -> Iterator[None]:
        """Hold `n` places (a batch: all or none) while the submits are recorded, or raise
        `LimitExceeded`."""
        if self.count(tenant) + n > self.limit:
            raise LimitExceeded(
                "tenant-queue",
                (
                    f"this tenant already has {self.limit} queued or running runs (the limit); "
                    "wait for some to finish"
                    if n == 1
                    else f"this tenant has {self.count(tenant)} queued or running runs and "
                    f"the limit is {self.limit}: a batch of {n} does not fit (nothing was "
                    "submitted); wait for some to finish, or send fewer"
                ),
                self._retry_hint(tenant, self.count(tenant) + n - self.limit),
            )
        self._reserved[tenant] = self._reserved.get(tenant, 0) + n
        try:
            yield
        finally:
            left = self._reserved[tenant] - n
            if left:
                self._reserved[tenant] = left
            else:
                del self._reserved[tenant]


STREAM_RETRY_AFTER_S = 5.0


class StreamSlot:
    """One open stream's place; `release` is idempotent (called on close and on GC)."""

    __slots__ = ("__weakref__", "_owner", "tenant")

    def __init__(self, owner: StreamSlots, tenant: str | None) -> None:
        self._owner: StreamSlots | None = owner
        self.tenant = tenant

    def release(self) -> None:
        owner, self._owner = self._owner, None
        if owner is not None:
            owner._release(self.tenant)

    def bind(self, body: object) -> None:
        """Give the slot back when `body` is collected, if nobody released it before."""
        weakref.finalize(body, self.release)


class StreamSlots:
    """Open streams per tenant, at most `limit` each."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str | None, int] = {}

    def open_count(self, tenant: str | None) -> int:
        return self._open.get(tenant, 0)

    def acquire(self, tenant: str | None) -> StreamSlot:
        if self._open.get(tenant, 0) >= self.limit:
            raise LimitExceeded(
                "tenant-streams",
                f"this tenant already has {self.limit} event streams open (the limit); "
                "close one, or poll GET .../events instead",
                STREAM_RETRY_AFTER_S,
            )
        self._open[tenant] = self._open.get(tenant, 0) + 1
        return StreamSlot(self, tenant)

    def _release(self, tenant: str | None) -> None:
        left = self._open[tenant] - 1
        if left:
            self._open[tenant] = left
        else:
            del self._open[tenant]
