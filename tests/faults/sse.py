"""A minimal SSE client over raw trio sockets, cheap enough to run 1,000 of at once.

Why not httpx: a thousand httpx streams cost more CPU than the server they are meant to
load, on a 2-core machine. This client sends one `GET` with `Connection: close`, reads to
EOF and parses the frames afterwards. 127.0.0.1 only.
"""

from __future__ import annotations

from typing import Any

import orjson
import trio

__all__ = ["Frame", "connect_stream", "parse_frames", "read_stream", "read_to_end"]

Frame = tuple[str, str, Any]  # (id, event, data)


async def connect_stream(
    port: int, path: str, *, last_event_id: str | None = None
) -> trio.SocketStream:
    """Connect and send the request; read the answer with `read_to_end`."""
    extra = f"Last-Event-ID: {last_event_id}\r\n" if last_event_id else ""
    request = (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n{extra}"
        "Connection: close\r\n\r\n"
    ).encode()
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(request)
    except BaseException:
        await stream.aclose()
        raise
    return stream


async def read_to_end(stream: trio.SocketStream, cap: int = 64 << 20) -> tuple[int, list[Frame]]:
    """Read the answer to its end; returns (status, frames without heartbeats)."""
    buf = bytearray()
    async with stream:
        while len(buf) < cap:
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            buf += chunk
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        body = _dechunk(body)
    return status, parse_frames(body)


async def read_stream(
    port: int, path: str, *, last_event_id: str | None = None
) -> tuple[int, list[Frame]]:
    """Open the stream and read it to its end (it ends after the run's last event)."""
    return await read_to_end(await connect_stream(port, path, last_event_id=last_event_id))


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            break
        size = int(data[pos:end].split(b";")[0], 16)
        if size == 0:
            break
        out += data[end + 2 : end + 2 + size]
        pos = end + 2 + size + 2
    return bytes(out)


def parse_frames(body: bytes) -> list[Frame]:
    """SSE frames of a body (comments and heartbeat/shutdown frames left out)."""
    frames: list[Frame] = []
    fields: dict[str, str] = {}
    for raw in body.decode("utf-8").replace("\r\n", "\n").split("\n"):
        if raw == "":
            event = fields.get("event")
            if event is not None and event not in ("heartbeat", "shutdown"):
                frames.append(
                    (fields.get("id", ""), event, orjson.loads(fields.get("data", "null")))
                )
            fields = {}
        elif not raw.startswith(":"):
            name, _, value = raw.partition(":")
            fields[name] = value[1:] if value.startswith(" ") else value
    return frames
