"""HTTP/1.1 over a plain socket, for requests a well-behaved client library refuses to send
(invalid UTF-8, CR/LF or NUL in a header, unencoded `..` in a path, 100 kB headers).

Every request is sent with `Connection: close` and the answer read to EOF, bounded by a
timeout and a size cap. 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import attrs

__all__ = ["KeepAliveClient", "RawResponse", "get", "post_json", "send"]


@attrs.frozen(slots=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names; a repeated header keeps the last value
    header_names: list[str]  # every name as received, in order (to look for injections)
    body: bytes


def send(port: int, request: bytes, *, timeout: float = 30.0, cap: int = 8 << 20) -> RawResponse:
    """Send `request` as is to 127.0.0.1:`port`; read the whole answer."""
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        buf = bytearray()
        while len(buf) < cap:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break  # the server answered, then closed without reading the rest
            if not chunk:
                break
            buf += chunk
    head, _, body = bytes(buf).partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    names: list[str] = []
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        names.append(name)
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return RawResponse(status, headers, names, body)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        out += rest[:size]
        data = rest[size + 2 :]
    return bytes(out)


def post_json(
    port: int,
    path: str,
    body: bytes,
    *,
    content_type: bytes = b"application/json",
    headers: bytes = b"",
) -> RawResponse:
    """POST `body` (raw bytes) with the given content type and extra raw header lines."""
    request = (
        b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: " + content_type + b"\r\n"
        b"Content-Length: "
        + str(len(body)).encode()
        + b"\r\n"
        + headers
        + b"Connection: close\r\n\r\n"
        + body
    )
    return send(port, request)


def get(port: int, target: bytes, *, method: bytes = b"GET", headers: bytes = b"") -> RawResponse:
    """`method target` with no body; `target` is sent exactly as given (no normalising)."""
    length = b"Content-Length: 0\r\n" if method == b"POST" else b""
    request = (
        method
        + b" "
        + target
        + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + length
        + headers
        + b"Connection: close\r\n\r\n"
    )
    return send(port, request)


class KeepAliveClient:
    """One keep-alive HTTP/1.1 connection over trio, for high-rate loops.

    Why: httpx costs about as much CPU per request as the server does, and on a 2-core
    machine a Python load generator then measures itself. This client only frames a
    request and reads a `Content-Length` answer (what the JSON endpoints send).
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self._stream: Any = None
        self._buf = bytearray()

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        import trio

        if self._stream is None:
            self._stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        await self._stream.send_all(head.encode() + b"\r\n" + (body or b""))
        while b"\r\n\r\n" not in self._buf:
            await self._fill()
        end = self._buf.index(b"\r\n\r\n")
        lines = bytes(self._buf[:end]).split(b"\r\n")
        del self._buf[: end + 4]
        status = int(lines[0].split()[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(self._buf) < length:
            await self._fill()
        payload = bytes(self._buf[:length])
        del self._buf[:length]
        return status, payload

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self._buf += chunk

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None
