"""Live fan-out of committed events to subscribers, with catch-up from memory or the journal.

`Bus.publish` is called by the engine with each committed batch (after it is durable), so a
subscriber never sees an event that could still be lost. `follow(run_id, after_seq)` first
catches up on the run's past events, then follows live ones. It registers *before* it
catches up, so nothing committed in between is missed, and drops anything at or below the
last seq it yielded, so nothing is repeated at the switch.

**Catch-up from memory.** The bus sees every event of a live run, so it keeps a *tail* of
the recent events of each unfinished run: at most `tail_events` events and `tail_bytes`
(estimated) bytes per run, `tail_total_bytes` for all runs together, the oldest dropped
first. A tail knows its *floor*: every event of its run after the floor is in it (the
floor is 0 when the tail began with the run's `submitted` event and never dropped one). A
catch-up after a seq at or above the floor is served from the tail, with no journal read
and no thread hop; anything older is read from the journal, in pages of `page_size`
events, so a long run's history is never all in memory at once. A tail goes when its run
has ended and its last subscriber has left (or when it no longer fits the budget: then its
run's streams read the journal, as they would without the tail).

**Slow subscribers.** Each subscriber has a bounded buffer. A subscriber that does not keep
up is not allowed to grow memory: once its buffer is full it is marked overflowed, stops
receiving, and on its next read catches up again (from the tail or the journal) instead.
A slow SSE client therefore never holds more than its buffer of live events plus one page
of history, however long it lags.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final

import orjson
import trio

from .model import Event, EventType

__all__ = ["ENDS_STREAM", "Bus"]

E = EventType

ENDS_STREAM: frozenset[EventType] = frozenset(
    {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED, EventType.DELETED}
)
# Events that may begin a tail: those of an unfinished run. Webhook bookkeeping comes after
# the end and must not give a finished run a new tail.
_OPENS_TAIL: Final[frozenset[EventType]] = frozenset(
    {E.SUBMITTED, E.STARTED, E.PROGRESS, E.OUTPUT, E.CANCEL_REQUESTED, E.RETRYING, E.REQUEUED}
)
# Estimated bytes, for the tail budget: what an `Event` with its data dict costs beyond
# the values (measured with tracemalloc: see docs/benchmarks.md), per tail (the `_Tail`,
# its list and its dict slot), per string value beyond its length, per scalar value.
EVENT_OVERHEAD: Final = 420
TAIL_OVERHEAD: Final = 360
_STR_OVERHEAD: Final = 56
_SCALAR_BYTES: Final = 32
_SCALARS: Final = frozenset({int, float, bool, type(None)})

HistoryReader = Callable[[str, int, int], Awaitable[Sequence[Event]]]


def event_bytes(event: Event) -> int:
    """About how much memory an event holds (what the tail budget counts)."""
    size = EVENT_OVERHEAD
    for key, value in event.data.items():
        t = type(value)
        if t is str:
            size += _STR_OVERHEAD + len(key) + len(value)
        elif t in _SCALARS:
            size += _SCALAR_BYTES + len(key)
        else:
            try:
                size += 2 * len(orjson.dumps(value)) + _STR_OVERHEAD + len(key)
            except TypeError:  # pragma: no cover - committed data is JSON by construction
                size += 4096
    return size


class _Subscriber:
    __slots__ = ("buffer", "limit", "overflowed", "wakeup")

    def __init__(self, limit: int) -> None:
        self.buffer: deque[Event] = deque()
        self.limit = limit
        self.overflowed = False
        self.wakeup = trio.Event()

    def push(self, event: Event) -> None:
        if self.overflowed:
            return
        if len(self.buffer) >= self.limit:
            self.overflowed = True
            self.buffer.clear()  # the journal has it all; memory is what we must not spend
        else:
            self.buffer.append(event)
        self.wakeup.set()


class _Tail:
    """The recent events of one live run: every one of its events with seq > floor."""

    __slots__ = ("bytes", "ended", "events", "floor", "sizes")

    def __init__(self, floor: int) -> None:
        self.events: list[Event] = []
        self.sizes: list[int] = []
        self.bytes = TAIL_OVERHEAD
        self.floor = floor
        self.ended = False

    def drop_oldest(self) -> int:
        """Forget the oldest event (the floor moves up to it); return the bytes freed."""
        event = self.events.pop(0)
        size = self.sizes.pop(0)
        self.floor = event.seq
        self.bytes -= size
        return size

    def after(self, seq: int) -> list[Event]:
        """The events with seq > `seq` (the caller checked `seq >= floor`)."""
        i = bisect.bisect_right(self.events, seq, key=_seq_of)
        return self.events[i:]


def _seq_of(event: Event) -> int:
    return event.seq


class Bus:
    """Per-run subscriber sets and tails; `publish` is O(events)."""

    def __init__(
        self,
        *,
        buffer_limit: int = 256,
        page_size: int = 256,
        tail_events: int = 256,
        tail_bytes: int = 256 * 1024,
        tail_total_bytes: int = 32 * 1024 * 1024,
    ) -> None:
        self._subs: dict[str, set[_Subscriber]] = {}
        self._tails: dict[str, _Tail] = {}
        self.buffer_limit = buffer_limit
        self.page_size = page_size
        self.tail_events = tail_events
        self.tail_bytes = tail_bytes
        self.tail_total_bytes = tail_total_bytes
        self.tails_bytes = 0  # estimated bytes held by all tails (<= tail_total_bytes)
        self.overflows = 0
        self.catch_ups_from_tail = 0
        self.catch_ups_from_journal = 0

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    @property
    def tail_count(self) -> int:
        """Runs with a tail right now."""
        return len(self._tails)

    def buffered(self) -> int:
        """Events held in subscriber buffers right now (at most `buffer_limit` each)."""
        return sum(len(sub.buffer) for subs in self._subs.values() for sub in subs)

    def tailed(self) -> int:
        """Events held in tails right now."""
        return sum(len(tail.events) for tail in self._tails.values())

    def publish(self, events: Sequence[Event]) -> None:
        subs = self._subs
        tails = self._tails
        had_tails = bool(tails)
        for event in events:
            run = event.run
            tail = tails.get(run)
            if tail is None and event.type in _OPENS_TAIL and self.tail_events > 0:
                # Every event of the run before this one was committed earlier: the tail
                # holds the whole run only if this is its first event.
                tail = _Tail(0 if event.type is E.SUBMITTED else event.seq - 1)
                tails[run] = tail
                self.tails_bytes += tail.bytes
            if tail is not None:
                self._keep(run, tail, event)
            if subs:
                targets = subs.get(run)
                if targets:
                    for sub in targets:
                        sub.push(event)
        if had_tails and not tails:
            self._tails = {}  # a dict never shrinks: let a burst of live runs go with it

    def _keep(self, run: str, tail: _Tail, event: Event) -> None:
        size = event_bytes(event)
        tail.events.append(event)
        tail.sizes.append(size)
        tail.bytes += size
        self.tails_bytes += size
        while tail.events and (
            len(tail.events) > self.tail_events
            or tail.bytes > self.tail_bytes
            or self.tails_bytes > self.tail_total_bytes
        ):
            self.tails_bytes -= tail.drop_oldest()
        if event.type in ENDS_STREAM:
            tail.ended = True
        if (tail.ended and run not in self._subs) or self.tails_bytes > self.tail_total_bytes:
            self._drop_tail(run)

    def _drop_tail(self, run: str) -> None:
        tail = self._tails.pop(run, None)
        if tail is not None:
            self.tails_bytes -= tail.bytes

    def tail_at(self, run_id: str, seqs: Sequence[int]) -> list[Event] | None:
        """The run's events with exactly these seqs (ascending), from its tail; None if
        the tail does not hold them all (then the journal does)."""
        tail = self._tails.get(run_id)
        if tail is None or not seqs or seqs[0] <= tail.floor:
            return None
        events = tail.events
        out: list[Event] = []
        lo = 0
        for seq in seqs:
            lo = bisect.bisect_left(events, seq, lo, key=_seq_of)
            if lo == len(events) or events[lo].seq != seq:
                return None
            out.append(events[lo])
        return out

    async def follow(
        self,
        run_id: str,
        after_seq: int,
        read_history: HistoryReader,
        finished: Callable[[], int | None],
    ) -> AsyncIterator[Event]:
        """A run's events after `after_seq`: the past (from the run's tail or the journal),
        then live, then stop.

        `finished()` gives the seq of the run's stream-ending event once it has one (else
        None); iteration stops after that event. `read_history(run, after, limit)` gives
        at most `limit` of the run's committed events with seq > after, oldest first.
        """
        sub = _Subscriber(self.buffer_limit)
        subs = self._subs.setdefault(run_id, set())
        subs.add(sub)
        last = after_seq
        try:
            catch_up = True
            while True:
                if catch_up:
                    catch_up = False
                    sub.overflowed = False
                    sub.buffer.clear()
                    tail = self._tails.get(run_id)
                    if tail is not None and tail.floor <= last:
                        # Everything after `last` is in the tail, and everything committed
                        # from now on reaches the buffer: no read, no thread.
                        self.catch_ups_from_tail += 1
                        for event in tail.after(last):
                            last = event.seq
                            yield event
                            if event.type in ENDS_STREAM:
                                return
                    else:
                        self.catch_ups_from_journal += 1
                        page_size = self.page_size
                        while True:
                            page = await read_history(run_id, last, page_size)
                            full = len(page) >= page_size
                            for event in page:
                                if event.seq <= last:
                                    continue
                                last = event.seq
                                yield event
                                if event.type in ENDS_STREAM:
                                    return
                            del page  # not held while the next page is read
                            if not full:
                                break
                    end = finished()
                    if end is not None and last >= end:
                        return
                while not sub.buffer and not sub.overflowed:
                    sub.wakeup = trio.Event()
                    await sub.wakeup.wait()
                if sub.overflowed:
                    self.overflows += 1
                    catch_up = True
                    continue
                event = sub.buffer.popleft()
                if event.seq <= last:
                    continue
                last = event.seq
                yield event
                if event.type in ENDS_STREAM:
                    return
        finally:
            subs.discard(sub)
            if not subs and self._subs.get(run_id) is subs:
                del self._subs[run_id]
                tail = self._tails.get(run_id)
                if tail is not None and tail.ended:
                    self._drop_tail(run_id)
                    if not self._tails:
                        self._tails = {}  # as in `publish`

    def stats(self) -> dict[str, Any]:
        """Figures for tests and metrics."""
        return {
            "subscribers": self.subscriber_count,
            "tails": self.tail_count,
            "tail_events": self.tailed(),
            "tail_bytes": self.tails_bytes,
            "catch_ups_from_tail": self.catch_ups_from_tail,
            "catch_ups_from_journal": self.catch_ups_from_journal,
            "overflows": self.overflows,
        }
