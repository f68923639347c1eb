"""Live fan-out of committed events to subscribers, with replay from the journal.

`Bus.publish` is called by the engine with each committed batch (after it is durable), so a
subscriber never sees an event that could still be lost. `subscribe(run_id, after_seq)`
first reads the run's past events back from the journal, then follows live ones. It
registers *before* reading the past, so nothing committed in between is missed, and drops
anything at or below the last seq it yielded, so nothing is repeated at the switch.

Each subscriber has a bounded buffer. A subscriber that does not keep up is not allowed to
grow memory: once its buffer is full it is marked overflowed, stops receiving, and on its
next read catches up from the journal instead. A slow SSE client therefore never holds
more than its buffer of live events, however long it lags; a catch-up holds the part of
the run's history it has yet to send (what the journal gives back in one read: paging that
read needs `Journal.history(run, after, limit)`, which the journal does not offer yet).
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import trio

from .model import Event, EventType

__all__ = ["ENDS_STREAM", "Bus"]

ENDS_STREAM: frozenset[EventType] = frozenset(
    {EventType.SUCCEEDED, EventType.FAILED, EventType.CANCELLED, EventType.DELETED}
)

HistoryReader = Callable[[str, int], Awaitable[Sequence[Event]]]


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


class Bus:
    """Per-run subscriber sets; `publish` is O(events) with no subscribers attached."""

    def __init__(self, *, buffer_limit: int = 256) -> None:
        self._subs: dict[str, set[_Subscriber]] = {}
        self.buffer_limit = buffer_limit
        self.overflows = 0

    @property
    def subscriber_count(self) -> int:
        return sum(len(s) for s in self._subs.values())

    def buffered(self) -> int:
        """Events held in subscriber buffers right now (at most `buffer_limit` each)."""
        return sum(len(sub.buffer) for subs in self._subs.values() for sub in subs)

    def publish(self, events: Sequence[Event]) -> None:
        subs = self._subs
        if not subs:
            return
        for event in events:
            targets = subs.get(event.run)
            if targets:
                for sub in targets:
                    sub.push(event)

    async def follow(
        self,
        run_id: str,
        after_seq: int,
        read_history: HistoryReader,
        finished: Callable[[], int | None],
    ) -> AsyncIterator[Event]:
        """A run's events after `after_seq`: the past from the journal, then live, then stop.

        `finished()` gives the seq of the run's stream-ending event once it has one (else
        None); iteration stops after that event. `read_history(run, after)` gives the run's
        committed events with seq > after, oldest first.
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
                    for event in await read_history(run_id, last):
                        if event.seq <= last:
                            continue
                        last = event.seq
                        yield event
                        if event.type in ENDS_STREAM:
                            return
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
