"""Load generators and small HTTP clients for `benchmarks/compare.py` (127.0.0.1 only).

* `run_wrk`: wrk (Debian's package) with `submit.lua`: a fixed ~80-byte POST body, answers
  counted per status code. One wrk thread; its own CPU use is measured (rusage of the
  child) so the report can show it is not the bottleneck.
* `run_pygen`: the fallback when wrk is missing, and the count-bounded submitter of the
  soak test: one thread, non-blocking sockets and `selectors`, pre-encoded requests, a
  minimal response parser (status line + Content-Length). No pipelining, keep-alive.
* `Client`: a keep-alive HTTP/1.1 client on trio sockets for the end-to-end and SSE
  tests; same code against every server, so its overhead is the same for both.

Every loop here is bounded in time and in count.
"""

from __future__ import annotations

import json
import os
import re
import resource
import selectors
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import trio

HERE = Path(__file__).resolve().parent
LUA = HERE / "submit.lua"
SUBMIT_PATH = "/api/v1/runs"
# The body submit.lua sends (keep the two in step): 80 bytes, a prompt and nothing else,
# which both servers accept.
SUBMIT_BODY = b'{"prompt":"Summarise the quarterly report in five bullet points for the board."}'
_RESULT_RE = re.compile(r"^COMPARE_RESULT (\{.*\})\s*$", re.M)


@dataclass
class LoadResult:
    """One fixed-duration (or fixed-count) run of a load generator against one server."""

    generator: str
    connections: int
    seconds: float
    requests: int
    statuses: dict[int, int]
    socket_errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    gen_cpu_s: float  # CPU the generator itself used
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return self.statuses.get(202, 0)

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    @property
    def req_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def share(self, status: int) -> float:
        return self.statuses.get(status, 0) / self.requests if self.requests else 0.0

    @property
    def other_non_202_share(self) -> float:
        other = sum(n for s, n in self.statuses.items() if s not in (202, 503))
        return other / self.requests if self.requests else 0.0

    @property
    def gen_cpu_us_per_req(self) -> float:
        return 1e6 * self.gen_cpu_s / self.requests if self.requests else float("nan")


# -- wrk ---------------------------------------------------------------------------------


def find_wrk() -> str | None:
    return shutil.which("wrk")


def install_wrk(log: Any = print) -> str | None:
    """`apt-get install -y wrk` (Debian's package) when we are root and apt exists."""
    if find_wrk():
        return find_wrk()
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    log("wrk not found: installing it with apt-get (Debian package 'wrk')")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"]):
        subprocess.run(cmd, env=env, capture_output=True, timeout=300, check=False)
        if cmd[1] == "update":
            subprocess.run(
                ["apt-get", "install", "-y", "-q", "wrk"],
                env=env,
                capture_output=True,
                timeout=300,
                check=False,
            )
        if find_wrk():
            break
    return find_wrk()


def wrk_version(wrk: str) -> str:
    out = subprocess.run([wrk, "--version"], capture_output=True, text=True, timeout=10)
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "wrk (unknown version)"


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_wrk(wrk: str, url: str, connections: int, seconds: float) -> LoadResult:
    cpu0 = _children_cpu()
    out = subprocess.run(
        [
            wrk,
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(LUA),
            url.rstrip("/") + SUBMIT_PATH,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    cpu = _children_cpu() - cpu0
    m = _RESULT_RE.search(out.stdout)
    if m is None:
        raise RuntimeError(f"wrk gave no result (exit {out.returncode}): {out.stderr[-500:]}")
    r = json.loads(m.group(1))
    errors = r["errors"]
    lat = r["latency_us"]
    return LoadResult(
        generator="wrk",
        connections=connections,
        seconds=r["duration_us"] / 1e6,
        requests=int(r["requests"]),
        statuses={int(k): int(v) for k, v in r["statuses"].items()},
        socket_errors=errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        p50_ms=lat["p50"] / 1e3,
        p90_ms=lat["p90"] / 1e3,
        p99_ms=lat["p99"] / 1e3,
        gen_cpu_s=cpu,
    )


# -- the Python fallback generator --------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class _Conn:
    __slots__ = ("buf", "sock", "t0")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.t0 = 0.0


def run_pygen(
    url: str,
    connections: int,
    seconds: float | None = None,
    *,
    accepted_target: int | None = None,
    max_seconds: float = 600.0,
    body: bytes = SUBMIT_BODY,
    path: str = SUBMIT_PATH,
) -> LoadResult:
    """Closed-loop POSTs on `connections` keep-alive sockets, for `seconds` or until
    `accepted_target` 202s (never longer than `max_seconds`)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sel = selectors.DefaultSelector()
    statuses: dict[int, int] = {}
    latencies: list[float] = []
    errors = 0
    in_flight = 0
    perf = time.perf_counter
    cpu0 = time.process_time()
    start = perf()
    stop_at = start + (seconds if seconds is not None else max_seconds)
    hard_stop = start + max_seconds

    def want_more() -> bool:
        if perf() >= stop_at:
            return False
        return accepted_target is None or statuses.get(202, 0) + in_flight < accepted_target

    def open_conn() -> _Conn:
        s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        c = _Conn(s)
        sel.register(s, selectors.EVENT_READ, c)
        return c

    def send(c: _Conn) -> None:
        nonlocal in_flight
        c.t0 = perf()
        _send_all(c.sock, request)
        in_flight += 1

    conns = [open_conn() for _ in range(connections)]
    for c in conns:
        if want_more():
            send(c)
    while in_flight and perf() < hard_stop:
        for key, _ in sel.select(timeout=1.0):
            c = key.data
            try:
                data = c.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:  # the server closed: count it, reconnect
                errors += 1
                in_flight -= 1
                sel.unregister(c.sock)
                c.sock.close()
                if want_more():
                    send(open_conn())
                continue
            c.buf += data
            while True:
                end = c.buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                head = c.buf[:end]
                length = _content_length(head)
                total = end + 4 + length
                if len(c.buf) < total:
                    break
                status = int(head[9:12])
                now = perf()
                statuses[status] = statuses.get(status, 0) + 1
                latencies.append(now - c.t0)
                c.buf = c.buf[total:]
                in_flight -= 1
                if want_more():
                    send(c)
                break
    elapsed = perf() - start
    cpu = time.process_time() - cpu0
    for key in list(sel.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    sel.close()
    return LoadResult(
        generator="python",
        connections=connections,
        seconds=elapsed,
        requests=sum(statuses.values()),
        statuses=statuses,
        socket_errors=errors,
        p50_ms=percentile(latencies, 50) * 1e3,
        p90_ms=percentile(latencies, 90) * 1e3,
        p99_ms=percentile(latencies, 99) * 1e3,
        gen_cpu_s=cpu,
    )


def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    deadline = time.monotonic() + 10
    while view:
        try:
            n = sock.send(view)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("send stalled") from None
            time.sleep(0.0005)
            continue
        view = view[n:]


def _content_length(head: bytes) -> int:
    i = head.lower().find(b"\r\ncontent-length:")
    if i < 0:
        return 0
    j = head.find(b"\r\n", i + 2)
    return int(head[i + 17 : j if j > 0 else None].strip())


# -- an async keep-alive client (end to end, SSE) -----------------------------------------


class HTTPError(Exception):
    pass


class Client:
    """One keep-alive HTTP/1.1 connection; `request` and `stream_until` on it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.stream: trio.SocketStream | None = None
        self.buf = bytearray()

    async def connect(self) -> None:
        self.stream = await trio.open_tcp_stream(self.host, self.port)
        self.buf = bytearray()

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()
            self.stream = None

    async def _fill(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise HTTPError("connection closed by the server")
        self.buf += data

    async def _send(self, method: str, path: str, body: bytes | None) -> None:
        if self.stream is None:
            await self.connect()
        assert self.stream is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        await self.stream.send_all(head.encode() + b"\r\n" + (body or b""))

    async def _head(self) -> tuple[int, bytes]:
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return int(head[9:12]), head
            await self._fill()

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        await self._send(method, path, body)
        status, head = await self._head()
        low = head.lower()
        if b"transfer-encoding: chunked" in low:
            out = bytearray()
            while True:
                while (i := self.buf.find(b"\r\n")) < 0:
                    await self._fill()
                size = int(bytes(self.buf[:i]).split(b";")[0], 16)
                while len(self.buf) < i + 2 + size + 2:
                    await self._fill()
                out += self.buf[i + 2 : i + 2 + size]
                del self.buf[: i + 2 + size + 2]
                if size == 0:
                    return status, bytes(out)
        length = _content_length(head)
        while len(self.buf) < length:
            await self._fill()
        data = bytes(self.buf[:length])
        del self.buf[:length]
        if b"connection: close" in low:
            await self.aclose()
        return status, data

    async def stream_until(
        self, path: str, marker: bytes = b"event: result", connected: list[float] | None = None
    ) -> bool:
        """GET an event stream and read until a complete `marker` event; True if seen.
        Closes the connection afterwards (both servers end the stream after `result`)."""
        try:
            await self._send("GET", path, None)
            status, _ = await self._head()
            if connected is not None:
                connected.append(time.perf_counter())
            if status != 200:
                return False
            start = 0
            while True:
                i = self.buf.find(marker, start)
                if i >= 0:
                    j = self.buf.find(b"\n\n", i)
                    k = self.buf.find(b"\r\n\r\n", i)
                    if j >= 0 or k >= 0:
                        return True
                else:
                    start = max(0, len(self.buf) - len(marker))
                try:
                    await self._fill()
                except HTTPError:
                    return self.buf.find(marker) >= 0
        finally:
            await self.aclose()


def summarize(values: Iterable[float]) -> dict[str, float]:
    vals = list(values)
    if not vals:
        return {"n": 0, "p50": float("nan"), "p99": float("nan"), "mean": float("nan")}
    return {
        "n": len(vals),
        "p50": percentile(vals, 50),
        "p99": percentile(vals, 99),
        "mean": statistics.fmean(vals),
    }
