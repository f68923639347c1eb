"""The append-only JSONL event journal: group commit, replay, per-run history.

Why it is shaped like this
--------------------------

* **One writer task.** Callers never touch the file. `append` numbers and encodes an event
  on the caller's side (so an unencodable result fails the caller, not the writer) and
  queues it; the writer task takes *everything queued at that moment* and issues one
  `write` and, if any of those events asked for it under `fsync` durability, one `fsync`.
  So a thousand concurrent submits cost one fsync, not a thousand, and never one thread hop
  per line.
* **Apply after durable.** Only once a batch is on disk (per the durability setting) are
  its events handed, in sequence order, to `on_commit` (the engine folds them into state
  and fans them out to subscribers), and only then are the waiters released. So the
  in-memory state is always exactly the replay of what the journal holds: an event that
  failed to reach the disk was never seen by anyone.
* **A failed write or fsync fails the whole batch.** The file is cut back to where the batch
  began (after an fsync error we do not trust the page cache, as PostgreSQL learned), every
  waiter gets `JournalWriteError`, and the next batch tries again, so the journal heals by
  itself once space returns.

The line format, the header and the torn-tail rule are documented in
`docs/journal-format.md`; keep the two in step.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
import zlib
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, Literal

import attrs
import orjson
import trio

from .model import Event, EventType

__all__ = [
    "FORMAT_VERSION",
    "Durability",
    "Journal",
    "JournalClosed",
    "JournalCorrupt",
    "JournalError",
    "JournalWriteError",
    "decode_line",
    "encode_line",
]

log = logging.getLogger("agentjobs.journal")

FORMAT_VERSION: Final = 1
MAGIC: Final = "agentjobs-journal"
Durability = Literal["fsync", "os", "memory"]
DURABILITIES: Final[tuple[str, ...]] = ("fsync", "os", "memory")

_PREFIX: Final = b'{"crc":"'
_PREFIX_LEN: Final = len(_PREFIX)  # 8
_BODY_AT: Final = _PREFIX_LEN + 8 + 2  # after `{"crc":"xxxxxxxx",`
SEGMENT_RE: Final = re.compile(r"^(\d{8})\.jsonl$")
_SEG_SHIFT: Final = 40  # position = segment << 40 | byte offset

_EVENT_TYPES: Final[dict[str, EventType]] = {t.value: t for t in EventType}


class JournalError(Exception):
    """Base class of journal failures."""


class JournalCorrupt(JournalError):
    """Damage that is not a torn tail: refuse to open, name the place."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


class JournalWriteError(JournalError):
    """The batch holding this append could not be made durable; nothing of it was applied."""


class JournalClosed(JournalError):
    """The journal is closed (engine shutting down)."""


# -- encoding ------------------------------------------------------------------------


def encode_line(obj: dict[str, Any]) -> bytes:
    """`obj` as one journal line: `{"crc":"<crc32 of the rest>",...rest...}\\n`.

    The checksum covers the JSON of the object without the crc member, so verifying a line
    needs no re-encoding: strip the first 18 bytes, put `{` back, crc32 it.
    """
    body = orjson.dumps(obj)
    return b'{"crc":"%08x",' % zlib.crc32(body) + body[1:] + b"\n"


def decode_line(line: bytes) -> dict[str, Any]:
    """The object in a journal line (without its newline), or ValueError saying why not."""
    if not line.startswith(_PREFIX) or line[_BODY_AT - 2 : _BODY_AT] != b'",':
        raise ValueError("not a journal line (no checksum prefix)")
    try:
        crc = int(line[_PREFIX_LEN : _BODY_AT - 2], 16)
    except ValueError:
        raise ValueError("malformed checksum") from None
    body = b"{" + line[_BODY_AT:]
    if zlib.crc32(body) != crc:
        raise ValueError("checksum mismatch")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("line is not a JSON object")
    return obj


def event_from_obj(obj: dict[str, Any]) -> Event:
    try:
        return Event(
            seq=obj["seq"],
            ts=obj["ts"],
            run=obj["run"],
            type=_EVENT_TYPES[obj["type"]],
            data=obj["data"],
        )
    except KeyError as exc:
        raise ValueError(f"missing or unknown field {exc}") from None


def header_obj(segment: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "magic": MAGIC, "segment": segment}


# -- the journal -----------------------------------------------------------------------


class Ticket:
    """A queued append. `await ticket.wait()` returns once it is durable and applied."""

    __slots__ = ("batch", "event", "line", "sync")

    def __init__(self, event: Event, line: bytes, sync: bool) -> None:
        self.event = event
        self.line = line
        self.sync = sync
        self.batch: _Batch | None = None

    async def wait(self) -> Event:
        batch = self.batch
        assert batch is not None
        await batch.done.wait()
        if batch.error is not None:
            raise JournalWriteError(str(batch.error)) from batch.error
        return self.event


@attrs.define(slots=True, eq=False)
class _Batch:
    tickets: list[Ticket] = attrs.Factory(list)
    sync: bool = False
    done: trio.Event = attrs.Factory(trio.Event)
    error: BaseException | None = None


@attrs.define(slots=True, eq=False)
class ReplayReport:
    events: int = 0
    segments: int = 0
    bytes: int = 0
    torn_bytes: int = 0
    seconds: float = 0.0


Opener = Callable[[str, int, int], int]


@attrs.define(slots=True, eq=False)
class IOHooks:
    """The fault-injection seam: how the journal writes and syncs. Tests replace these."""

    write: Callable[[int, bytes], int] = os.write
    fsync: Callable[[int], None] = os.fsync


class Journal:
    """An append-only event log in `directory` (or in memory), written by one task.

    Use: `journal = Journal(dir, durability, on_commit)`, `journal.open(on_replay)` to read
    what is there (folding every event through `on_replay`), then run `journal.run()` in a
    nursery; `append` / `commit` from anywhere in that trio run; `aclose()` at the end.
    """

    def __init__(
        self,
        directory: Path | str | None,
        durability: Durability = "fsync",
        on_commit: Callable[[list[Event]], None] | None = None,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
        hooks: IOHooks | None = None,
    ) -> None:
        if durability not in DURABILITIES:
            raise ValueError(f"durability must be one of {DURABILITIES}, not {durability!r}")
        if durability != "memory" and directory is None:
            raise ValueError("a directory is needed unless durability is 'memory'")
        self.directory = Path(directory) if directory is not None else None
        self.durability: Durability = durability
        self.on_commit = on_commit or (lambda events: None)
        self.segment_bytes = segment_bytes
        self.clock = clock
        self.hooks = hooks or IOHooks()
        self.last_seq = 0
        self._batch = _Batch()  # the batch now filling; the writer swaps in a fresh one
        self._wakeup = trio.Event()
        self._closed = False
        self._fd: int | None = None
        self._segment = 0
        self._size = 0
        self._lock_fd: int | None = None
        # run id -> positions of its lines (file modes) or the lines (memory mode)
        self._positions: dict[str, array[int]] = {}
        self._memory: dict[str, list[bytes]] = {}
        self.stats_batches = 0
        self.stats_events = 0

    # -- opening and replay ------------------------------------------------------------

    def segment_path(self, segment: int) -> Path:
        assert self.directory is not None
        return self.directory / f"{segment:08d}.jsonl"

    def segments(self) -> list[int]:
        if self.directory is None or not self.directory.exists():
            return []
        found = []
        for name in os.listdir(self.directory):
            m = SEGMENT_RE.match(name)
            if m:
                found.append(int(m.group(1)))
        return sorted(found)

    def open(self, on_replay: Callable[[Event], None]) -> ReplayReport:
        """Replay every event on disk through `on_replay`, cut a torn tail, get ready to write.

        Synchronous on purpose: it runs once, before the engine serves anything.
        """
        report = ReplayReport()
        started = time.perf_counter()
        if self.directory is None:
            return report
        self.directory.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        segments = self.segments()
        for i, seg in enumerate(segments):
            last = i == len(segments) - 1
            self._replay_segment(seg, on_replay, report, last=last)
        report.segments = len(segments)
        if segments:
            self._open_segment(segments[-1], new=False)
        else:
            self._open_segment(1, new=True)
        report.seconds = time.perf_counter() - started
        return report

    def _take_lock(self) -> None:
        import fcntl

        assert self.directory is not None
        fd = os.open(self.directory / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise JournalError(
                    f"{self.directory} is in use by another agentjobs process"
                ) from None
            raise
        self._lock_fd = fd

    def _replay_segment(
        self, seg: int, on_replay: Callable[[Event], None], report: ReplayReport, *, last: bool
    ) -> None:
        path = self.segment_path(seg)
        data = path.read_bytes()
        report.bytes += len(data)
        positions = self._positions
        base = seg << _SEG_SHIFT
        pos = 0
        lineno = 0
        n = len(data)
        last_seq = self.last_seq
        while pos < n:
            end = data.find(b"\n", pos)
            lineno += 1
            if end < 0:
                # an incomplete last line: a torn write
                self._cut_tail(path, data, pos, lineno, report, last=last)
                break
            line = data[pos:end]
            try:
                obj = decode_line(line)
                if lineno == 1:
                    self._check_header(obj, seg)
                else:
                    event = event_from_obj(obj)
                    if event.seq <= last_seq:
                        raise ValueError(f"sequence number {event.seq} does not follow {last_seq}")
                    on_replay(event)
                    last_seq = event.seq
                    report.events += 1
                    p = positions.get(event.run)
                    if p is None:
                        positions[event.run] = array("q", (base | pos,))
                    else:
                        p.append(base | pos)
            except ValueError as exc:
                if last and not self._valid_after(data, end + 1):
                    self._cut_tail(path, data, pos, lineno, report, last=last)
                    break
                raise JournalCorrupt(path, lineno, str(exc)) from None
            pos = end + 1
        self.last_seq = last_seq

    @staticmethod
    def _valid_after(data: bytes, pos: int) -> bool:
        """Is there any intact line after `pos`? (If not, the damage is a torn tail.)"""
        n = len(data)
        while pos < n:
            end = data.find(b"\n", pos)
            if end < 0:
                return False
            try:
                decode_line(data[pos:end])
                return True
            except ValueError:
                pos = end + 1
        return False

    def _check_header(self, obj: dict[str, Any], seg: int) -> None:
        if obj.get("magic") != MAGIC:
            raise ValueError("first line is not an agentjobs journal header")
        fmt = obj.get("format")
        if fmt != FORMAT_VERSION:
            raise ValueError(f"journal format {fmt!r} is not supported (this is {FORMAT_VERSION})")

    def _cut_tail(
        self, path: Path, data: bytes, pos: int, lineno: int, report: ReplayReport, *, last: bool
    ) -> None:
        if not last:
            raise JournalCorrupt(path, lineno, "incomplete line in a sealed segment")
        torn = data[pos:]
        side = path.with_name(f"{path.name}.torn-{int(time.time())}")
        side.write_bytes(torn)
        with open(path, "r+b") as f:
            f.truncate(pos)
            os.fsync(f.fileno())
        report.torn_bytes += len(torn)
        log.warning(
            "journal %s: cut a torn tail of %d bytes at line %d (kept in %s)",
            path,
            len(torn),
            lineno,
            side.name,
        )

    def _open_segment(self, seg: int, *, new: bool) -> None:
        path = self.segment_path(seg)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if new:
            header = encode_line(header_obj(seg))
            self.hooks.write(fd, header)
            if self.durability == "fsync":
                self.hooks.fsync(fd)
                self._fsync_dir()
        self._fd = fd
        self._segment = seg
        self._size = os.fstat(fd).st_size

    def _fsync_dir(self) -> None:
        assert self.directory is not None
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- appending ---------------------------------------------------------------------

    def append(
        self, run: str, type: EventType, data: dict[str, Any], *, sync: bool = False
    ) -> Ticket:
        """Queue an event; it is applied once its batch is written (and synced if `sync`)."""
        if self._closed:
            raise JournalClosed("journal is closed")
        self.last_seq += 1
        event = Event(seq=self.last_seq, ts=self.clock(), run=run, type=type, data=data)
        line = encode_line(
            {"seq": event.seq, "ts": event.ts, "run": run, "type": type.value, "data": data}
        )
        ticket = Ticket(event, line, sync)
        batch = self._batch
        ticket.batch = batch
        batch.tickets.append(ticket)
        if sync:
            batch.sync = True
        self._wakeup.set()
        return ticket

    async def commit(self, run: str, type: EventType, data: dict[str, Any]) -> Event:
        """Append and wait until durable (fsync under `fsync` durability) and applied."""
        return await self.append(run, type, data, sync=True).wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task. Runs until `aclose`, then flushes what is queued and returns."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            if self._batch.tickets:
                await self._write_batch()
            if self._closed and not self._batch.tickets:
                return

    async def _write_batch(self) -> None:
        batch, self._batch = self._batch, _Batch()
        tickets = batch.tickets
        try:
            if self.durability != "memory":
                await self._write_file(batch)
            else:
                for t in tickets:
                    self._memory.setdefault(t.event.run, []).append(t.line)
        except OSError as exc:
            batch.error = exc
            log.error("journal write failed (%d events not applied): %s", len(tickets), exc)
        else:
            self.stats_batches += 1
            self.stats_events += len(tickets)
            try:
                self.on_commit([t.event for t in tickets])
            except BaseException as exc:
                batch.error = exc
                batch.done.set()
                raise
        batch.done.set()

    async def _write_file(self, batch: _Batch) -> None:
        fd = self._fd
        assert fd is not None
        start = self._size
        buf = b"".join(t.line for t in batch.tickets)
        sync = batch.sync and self.durability == "fsync"
        try:
            if sync:
                await trio.to_thread.run_sync(self._write_all, fd, buf, True)
            else:
                self._write_all(fd, buf, False)
        except OSError:
            self._undo(fd, start)
            raise
        base = self._segment << _SEG_SHIFT
        positions = self._positions
        pos = start
        for t in batch.tickets:
            p = positions.get(t.event.run)
            if p is None:
                positions[t.event.run] = array("q", (base | pos,))
            else:
                p.append(base | pos)
            pos += len(t.line)
        self._size = pos
        if self._size >= self.segment_bytes:
            await self._rotate()

    def _write_all(self, fd: int, buf: bytes, sync: bool) -> None:
        view = memoryview(buf)
        while view:
            n = self.hooks.write(fd, view)  # type: ignore[arg-type]
            view = view[n:]
        if sync:
            self.hooks.fsync(fd)

    def _undo(self, fd: int, size: int) -> None:
        """Cut the file back to `size` after a failed batch; fatal if even that fails."""
        try:
            os.ftruncate(fd, size)
        except OSError as exc:  # pragma: no cover - the disk is gone
            log.critical("journal: cannot cut back a failed batch: %s", exc)
            self._closed = True
            raise

    async def _rotate(self) -> None:
        fd = self._fd
        assert fd is not None
        if self.durability == "fsync":
            await trio.to_thread.run_sync(self.hooks.fsync, fd)
        os.close(fd)
        self._open_segment(self._segment + 1, new=True)

    # -- reading history -----------------------------------------------------------------

    def history(self, run: str, after_seq: int = 0) -> list[Event]:
        """A run's events with seq > after_seq, oldest first, read back from the journal."""
        out: list[Event] = []
        for line in self._lines(run):
            event = event_from_obj(decode_line(line.rstrip(b"\n")))
            if event.seq > after_seq:
                out.append(event)
        return out

    def _lines(self, run: str) -> Iterator[bytes]:
        if self.durability == "memory":
            yield from self._memory.get(run, ())
            return
        positions = self._positions.get(run)
        if not positions:
            return
        mask = (1 << _SEG_SHIFT) - 1
        files: dict[int, Any] = {}
        try:
            for p in list(positions):
                seg = p >> _SEG_SHIFT
                f = files.get(seg)
                if f is None:
                    f = files[seg] = open(self.segment_path(seg), "rb")  # noqa: SIM115
                f.seek(p & mask)
                yield f.readline()
        finally:
            for f in files.values():
                f.close()

    def forget(self, run: str) -> None:
        """Drop a run's history index (after `deleted`, or compaction)."""
        self._positions.pop(run, None)
        self._memory.pop(run, None)

    # -- closing ------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop taking appends, let the writer flush what is queued, close the file."""
        self._closed = True
        self._wakeup.set()

    def close_files(self) -> None:
        if self._fd is not None:
            if self.durability == "fsync":
                try:
                    self.hooks.fsync(self._fd)
                except OSError as exc:
                    log.error("journal: final fsync failed: %s", exc)
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
