"""Server-sent events: a run's journal as a resumable stream of PraisonAI-named events.

**Mapping.** Each journal event becomes zero or more SSE frames, named as PraisonAI names
them (reference section 6) so its clients keep working:

    submitted, started, retrying, requeued  ->  status {status, job_id, ...}
    progress                                ->  progress {percentage, step, steps_completed,
                                                          steps_total}
    output                                  ->  output {text}
    succeeded                               ->  status, progress (100), result {result}
    failed                                  ->  status, error {error}
    cancelled                               ->  status, cancelled {message}
    cancel_requested, webhook bookkeeping   ->  nothing

**Ids.** Frames carry the journal sequence number of the event they come from. When one
event gives several frames, the last one has the plain id `"<seq>"` and the ones before it
`"<seq>.1"`, `"<seq>.2"`...; so "resume after id X" is exact for every id a client can
have seen: after `"<seq>"` means after the whole event, after `"<seq>.k"` means the frames
of that event after its k-th. `Last-Event-ID` (what `EventSource` sends on reconnect) and
`?after=` take the same ids; the header wins. A finished run whose last frame was already
seen answers 204, which tells `EventSource` to stop reconnecting.

Progress frames always carry every progress key, so a stream that resumes needs the run's
progress as of its resume point. `resume_builder` gets it from `Engine.progress_at`,
without reading the history for it: the run's current progress when it has not changed
since the resume point, else a mark of the run's progress trail plus at most 15 `progress`
events read by seq (never the output lines between them). The stream then reads only what
comes after the resume point.

**Payloads** are encoded with orjson, which escapes newlines and control characters, so
every `data:` is one line of valid JSON whatever the result holds, and results are never
truncated (PraisonAI bugs 9 and 10).

**Liveness.** After `heartbeat` seconds of silence a stream sends a `: keepalive` comment
and a `heartbeat` event (a vanished client is noticed only when a write fails). On server
shutdown every stream sends a final `shutdown` event and ends cleanly, so clients reconnect
(with `Last-Event-ID`) to the restarted server instead of seeing a truncated response.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import Any

import attrs
import orjson
import trio
from quart.wrappers.response import ResponseBody

from ..engine import Engine, Event, EventType
from ..engine.model import Progress, isoformat
from .errors import FieldError, Problem

__all__ = [
    "HISTORY_PAGE",
    "EventStreamBody",
    "FrameBuilder",
    "ResumePoint",
    "StreamHub",
    "encode_frame",
    "parse_resume",
    "resume_builder",
]

log = logging.getLogger("agentjobs.http.sse")
E = EventType

RETRY_MS = 3000
SHUTDOWN_RETRY_MS = 5000
_COALESCE_BYTES = 64 * 1024
_ID_RE = re.compile(r"^(0|[1-9][0-9]{0,18})(?:\.([1-9][0-9]{0,2}))?$")


class StreamHub:
    """What the server knows about its open streams and long-polls, for a clean shutdown.

    `begin_shutdown()` sets `shutting_down` (streams send their final event and end) and
    cancels every registered long-poll scope (they answer with what they have); the
    server then waits for `open_streams` to reach zero before it stops hypercorn.
    """

    def __init__(self) -> None:
        self.shutting_down = trio.Event()
        self.open_streams = 0
        self.streams_total = 0
        self._idle = trio.Event()
        self._idle.set()
        self._polls: set[trio.CancelScope] = set()

    def stream_opened(self) -> None:
        self.open_streams += 1
        self.streams_total += 1
        if self.open_streams == 1:
            self._idle = trio.Event()

    def stream_closed(self) -> None:
        self.open_streams -= 1
        if self.open_streams == 0:
            self._idle.set()

    def add_poll(self, scope: trio.CancelScope) -> None:
        if self.shutting_down.is_set():
            scope.cancel()
        self._polls.add(scope)

    def remove_poll(self, scope: trio.CancelScope) -> None:
        self._polls.discard(scope)

    def begin_shutdown(self) -> None:
        self.shutting_down.set()
        for scope in self._polls:
            scope.cancel()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait until no stream is open (True) or `timeout` passes (False)."""
        with trio.move_on_after(timeout):
            await self._idle.wait()
            return True
        return False


@attrs.frozen(slots=True)
class ResumePoint:
    """The last frame a client has seen: `seq`, and `part` when it was not the last frame
    of that event (None: the whole event was seen)."""

    seq: int = 0
    part: int | None = None

    @property
    def start_after(self) -> int:
        """The seq to read events after: frames of event `seq` are still due when only
        some of its frames were seen."""
        return self.seq if self.part is None else max(0, self.seq - 1)

    def seen(self, seq: int, part: int, last_part: bool) -> bool:
        if seq != self.seq:
            return seq < self.seq
        if self.part is None:
            return True
        return not last_part and part <= self.part

    def unseen(self, builder: FrameBuilder, ev: Event) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """The frames of `ev` (from `builder`) a client at this point has not seen, as
        (frame id, event name, data): what both a stream and an `/events` page send."""
        frames = builder.frames(ev)
        n = len(frames)
        for i, (name, data) in enumerate(frames, start=1):
            last = i == n
            if not self.seen(ev.seq, i, last):
                yield (str(ev.seq) if last else f"{ev.seq}.{i}"), name, data


def parse_resume(last_event_id: str | None, after: str | None) -> ResumePoint:
    """`Last-Event-ID` header or `?after=`: "<seq>" or "<seq>.<part>"; empty is the start."""
    source, raw = ("Last-Event-ID", last_event_id) if last_event_id else ("after", after)
    if not raw:
        return ResumePoint()
    m = _ID_RE.match(raw.strip())
    if m is None:
        raise Problem(
            "invalid-parameter",
            f"{source}: {raw!r} is not an event id of this stream (ids look like 12 or 12.1)",
            errors=[FieldError(source, "expected an event id such as 12 or 12.1")],
        )
    part = int(m.group(2)) if m.group(2) else None
    return ResumePoint(int(m.group(1)), part)


def encode_frame(frame_id: str, event: str, data: dict[str, Any]) -> bytes:
    """One SSE frame. orjson escapes control characters, so `data` is always one line."""
    return (
        b"id: "
        + frame_id.encode()
        + b"\nevent: "
        + event.encode()
        + b"\ndata: "
        + orjson.dumps(data)
        + b"\n\n"
    )


class FrameBuilder:
    """Turns one run's journal events, in order, into (event name, data) frames."""

    __slots__ = ("job_id", "percentage", "step", "steps_completed", "steps_total")

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self._reset_progress()

    def _reset_progress(self) -> None:
        self.percentage = 0.0
        self.step: str | None = None
        self.steps_completed = 0
        self.steps_total: int | None = None

    def seed_progress(self, progress: Progress) -> None:
        """Start from a run's folded `Progress` (see `Engine.progress_at`)."""
        self.percentage = float(progress.percentage)
        self.step = progress.step
        self.steps_completed = progress.steps_completed
        self.steps_total = progress.steps_total

    def _fold(self, d: dict[str, Any]) -> None:
        self.percentage = float(d.get("percentage", self.percentage))
        self.step = d.get("step", self.step)
        self.steps_completed = d.get("steps_completed", self.steps_completed)
        self.steps_total = d.get("steps_total", self.steps_total)

    def _progress(self) -> dict[str, Any]:
        return {
            "percentage": self.percentage,
            "step": self.step or "",
            "steps_completed": self.steps_completed,
            "steps_total": self.steps_total,
            "job_id": self.job_id,
        }

    def _status(self, status: str, ev: Event, **extra: Any) -> tuple[str, dict[str, Any]]:
        data: dict[str, Any] = {
            "status": status,
            "job_id": self.job_id,
            "timestamp": isoformat(ev.ts),
        }
        data.update(extra)
        return ("status", data)

    def frames(self, ev: Event) -> list[tuple[str, dict[str, Any]]]:
        t = ev.type
        d = ev.data
        if t is E.OUTPUT:
            return [("output", {"text": d.get("text", ""), "job_id": self.job_id})]
        if t is E.PROGRESS:
            self._fold(d)
            return [("progress", self._progress())]
        if t is E.SUBMITTED:
            return [self._status("queued", ev)]
        if t is E.STARTED:
            self._reset_progress()
            return [self._status("running", ev, attempt=d.get("attempt"))]
        if t is E.RETRYING:
            return [self._status("queued", ev, error=d.get("error"), retrying=True)]
        if t is E.REQUEUED:
            return [self._status("queued", ev, reason=d.get("reason"))]
        if t is E.SUCCEEDED:
            self.percentage = 100.0
            return [
                self._status("succeeded", ev),
                ("progress", self._progress()),
                (
                    "result",
                    {"result": d.get("result"), "job_id": self.job_id, "metrics": d.get("metrics")},
                ),
            ]
        if t is E.FAILED:
            return [
                self._status("failed", ev),
                ("error", {"error": d.get("error"), "kind": d.get("kind"), "job_id": self.job_id}),
            ]
        if t is E.CANCELLED:
            return [
                self._status("cancelled", ev),
                (
                    "cancelled",
                    {"message": d.get("reason") or "Job was cancelled", "job_id": self.job_id},
                ),
            ]
        return []  # cancel_requested, webhook bookkeeping, deleted: nothing to show


PROGRESS_KEYS = ("percentage", "step", "steps_completed", "steps_total")
HISTORY_PAGE = 256  # events per history read (/events pages)


async def resume_builder(
    engine: Engine, run_id: str, after_seq: int, *, tenant: str | None = None
) -> FrameBuilder:
    """A `FrameBuilder` in the state it has after the run's events up to `after_seq`.

    The same fold as reading every event from the start, at the cost of at most a few
    `progress` events read by seq (none when the progress has not changed since
    `after_seq`): `Engine.progress_at`.
    """
    builder = FrameBuilder(run_id)
    if after_seq > 0:
        builder.seed_progress(await engine.progress_at(run_id, after_seq, tenant=tenant))
    return builder


class _Marker:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


_END = _Marker("end")
_SHUTDOWN = _Marker("shutdown")
_Item = tuple[str, bytes] | _Marker  # a frame with its id, or a marker


class EventStreamBody(ResponseBody):
    """The response body of `GET .../stream`.

    The events are produced by a pump task in the app's nursery (not inside this body, so
    no nursery spans a `yield`), and handed over through a small channel. Quart iterates
    the body in the connection's task; when the client disconnects that task is cancelled
    and `__aexit__` cancels the pump, which unsubscribes from the bus at once.
    """

    def __init__(
        self,
        *,
        job_id: str,
        events: AsyncIterator[Event],
        resume: ResumePoint,
        hub: StreamHub,
        nursery: trio.Nursery,
        heartbeat_s: float,
        on_close: Callable[[], None] | None = None,
        builder: FrameBuilder | None = None,
    ) -> None:
        self.job_id = job_id
        self.builder = builder if builder is not None else FrameBuilder(job_id)
        self.on_close = on_close
        self.events = events
        self.resume = resume
        self.hub = hub
        self.nursery = nursery
        self.heartbeat_s = heartbeat_s
        self.last_id = f"{resume.seq}.{resume.part}" if resume.part else str(resume.seq)
        self._send, self._recv = trio.open_memory_channel[_Item](16)
        self._scope = trio.CancelScope()
        self._started = False
        self._done = False
        self._registered = False

    # -- the ResponseBody protocol --------------------------------------------------------

    async def __aenter__(self) -> EventStreamBody:
        self.hub.stream_opened()
        self._registered = True
        self.nursery.start_soon(self._pump)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._scope.cancel()
        self._recv.close()
        if self._registered:
            self._registered = False
            self.hub.stream_closed()
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()  # e.g. gives the tenant's stream slot back

    def __aiter__(self) -> EventStreamBody:
        return self

    async def __anext__(self) -> bytes:
        if not self._started:
            self._started = True
            return f"retry: {RETRY_MS}\n: stream of {self.job_id}\n\n".encode()
        if self._done:
            raise StopAsyncIteration
        with trio.move_on_after(self.heartbeat_s):
            try:
                item = await self._recv.receive()
            except trio.EndOfChannel:
                raise StopAsyncIteration from None
            return self._collect(item)
        return b": keepalive\n\n" + encode_frame(
            self.last_id, "heartbeat", {"timestamp": isoformat(time.time()), "job_id": self.job_id}
        )

    def _collect(self, item: _Item) -> bytes:
        """This item and whatever else is already waiting, as one chunk (fewer writes)."""
        out: list[bytes] = []
        size = 0
        while True:
            if isinstance(item, _Marker):
                self._done = True
                if item is _SHUTDOWN:
                    out.append(self._shutdown_frame())
                break
            frame_id, frame = item
            self.last_id = frame_id
            out.append(frame)
            size += len(frame)
            if size >= _COALESCE_BYTES:
                break
            try:
                item = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        return b"".join(out)

    def _shutdown_frame(self) -> bytes:
        data = {
            "message": "the server is shutting down; reconnect with Last-Event-ID to resume",
            "timestamp": isoformat(time.time()),
            "job_id": self.job_id,
        }
        return f"retry: {SHUTDOWN_RETRY_MS}\n".encode() + encode_frame(
            self.last_id, "shutdown", data
        )

    # -- the producer ---------------------------------------------------------------------

    async def _pump(self) -> None:
        send = self._send
        with self._scope:
            try:
                async with send, trio.open_nursery() as nursery:

                    async def on_shutdown() -> None:
                        await self.hub.shutting_down.wait()
                        forward_scope.cancel()
                        await send.send(_SHUTDOWN)
                        nursery.cancel_scope.cancel()

                    forward_scope = trio.CancelScope()
                    nursery.start_soon(on_shutdown)
                    with forward_scope:
                        await self._forward()
                        await send.send(_END)
                    nursery.cancel_scope.cancel()
            except* (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client went away
            except* Exception:
                log.exception("stream of %s failed; closing it", self.job_id)
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            with trio.CancelScope(shield=True):
                await aclose()

    async def _forward(self) -> None:
        builder = self.builder
        resume = self.resume
        send = self._send
        async for ev in self.events:
            for frame_id, name, data in resume.unseen(builder, ev):
                await send.send((frame_id, encode_frame(frame_id, name, data)))
