"""A real, scriptable OpenAI-compatible HTTP server on 127.0.0.1, for tests.

It speaks just enough HTTP/1.1 (h11 on raw trio sockets, no framework) to serve
`POST /v1/chat/completions` with `stream: true` the way OpenAI does: SSE `data:` chunks with
`choices[0].delta.content`, a final chunk with `finish_reason`, a usage chunk when the client
asked for `stream_options.include_usage`, then `data: [DONE]`. Raw sockets rather than an
ASGI server because the tests need exact control of the wire: drop the TCP connection in
the middle of a chunked body, stall forever, and notice the moment the client hangs up.

Usage (inside a trio test):

    async with open_fake_openai_server() as server:
        server.enqueue(Reply(text="Hello there"), Reply(status=429, headers={"Retry-After": "3"}))
        runner = OpenAIRunner(base_url=server.base_url, model="fake-model")
        ...
        req = server.requests[0]          # headers, JSON body, disconnected?
        await req.done.wait()

Replies are taken from the queue in order; when it is empty, `server.default` answers (or
`server.handler(request)` if set). Run it by hand with `python tests/fakes/openai_server.py
[PORT]` to point a real agentjobs server at it.
"""

from __future__ import annotations

import itertools
import re
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import h11
import orjson
import trio

__all__ = ["FakeOpenAIServer", "RecordedRequest", "Reply", "open_fake_openai_server"]

CHAT_PATH = "/v1/chat/completions"


@attrs.define
class Reply:
    """What the server does for one request.

    - `text` (split into word-sized tokens) or explicit `chunks`: the streamed answer.
    - `status` != 200: answer with that status and an OpenAI error body built from
      `error` (or the raw `body`), plus `headers` (e.g. `{"Retry-After": "2"}`).
    - `first_token_delay_s`, `token_delay_s`: pacing.
    - `stall_after=N`: send N content chunks, then nothing more until the client leaves.
    - `drop_after=N`: send N content chunks, then close the TCP connection mid-body.
    - `usage`: override the usage numbers; `send_usage=False` never sends a usage chunk.
    - `send_done=False`: end the body without `data: [DONE]` (and without finish_reason).
    - `mid_stream_error`: after the content, send `data: {"error": {...}}` in the stream.
    - `content_type`: of a 200 answer (e.g. "application/json" with a raw `body`).
    """

    text: str = "Hello from the fake model."
    chunks: Sequence[str] | None = None
    status: int = 200
    headers: dict[str, str] = attrs.Factory(dict)
    error: str = "something went wrong"
    error_type: str = "invalid_request_error"
    error_code: str | None = None
    body: bytes | None = None
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    stall_after: int | None = None
    drop_after: int | None = None
    usage: dict[str, int] | None = None
    send_usage: bool = True
    send_done: bool = True
    finish_reason: str = "stop"
    mid_stream_error: str | None = None
    model: str | None = None
    content_type: str = "text/event-stream"

    def tokens(self) -> list[str]:
        if self.chunks is not None:
            return list(self.chunks)
        return re.findall(r"\s*\S+", self.text) or [self.text]


@attrs.define(eq=False)
class RecordedRequest:
    """One request as the server saw it, and how its answer went."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None
    reply: Reply | None = None
    chunks_sent: int = 0
    #: The client closed the connection before the answer was complete.
    disconnected: bool = False
    disconnected_at: float | None = None
    #: Set when the server is done with this request (answered, or the client left).
    done: trio.Event = attrs.Factory(trio.Event)

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.json.get("messages", [])) if isinstance(self.json, dict) else []


@attrs.define(eq=False)
class FakeOpenAIServer:
    default: Reply = attrs.Factory(Reply)
    handler: Callable[[RecordedRequest], Reply] | None = None
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[RecordedRequest] = attrs.Factory(list)
    #: Unexpected exceptions in connection handlers (a test may assert it stays empty).
    errors: list[BaseException] = attrs.Factory(list)
    connections: int = 0
    _queue: deque[Reply] = attrs.Factory(deque)
    _arrived: trio.Event = attrs.Factory(trio.Event)
    _ids: Any = attrs.Factory(lambda: itertools.count(1))

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def enqueue(self, *replies: Reply) -> None:
        self._queue.extend(replies)

    async def wait_for_requests(self, n: int = 1) -> RecordedRequest:
        """Wait until at least `n` requests have arrived; return the n-th."""
        while len(self.requests) < n:
            await self._arrived.wait()
        return self.requests[n - 1]

    def _pick(self, req: RecordedRequest) -> Reply:
        if self._queue:
            return self._queue.popleft()
        if self.handler is not None:
            return self.handler(req)
        return self.default

    # ------------------------------------------------------------------ connections

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                req = await self._read_request(conn, stream)
                if req is None:
                    return
                try:
                    keep = await self._respond(conn, stream, req)
                finally:
                    req.done.set()
                if not keep or conn.our_state is not h11.DONE:
                    return
                if conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            pass
        except Exception as exc:  # pragma: no cover - a bug in the fake; surface it
            self.errors.append(exc)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_request(
        self, conn: h11.Connection, stream: trio.SocketStream
    ) -> RecordedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
        assert head is not None
        headers = {k.decode().lower(): v.decode() for k, v in head.headers}
        try:
            doc = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            doc = None
        req = RecordedRequest(
            method=head.method.decode(),
            path=head.target.decode(),
            headers=headers,
            body=bytes(body),
            json=doc,
        )
        self.requests.append(req)
        self._arrived.set()
        self._arrived = trio.Event()
        return req

    async def _send(self, conn: h11.Connection, stream: trio.SocketStream, event: Any) -> None:
        data = conn.send(event)
        if data:
            await stream.send_all(data)

    async def _respond(
        self, conn: h11.Connection, stream: trio.SocketStream, req: RecordedRequest
    ) -> bool:
        """Answer one request; False when the connection must not be reused."""
        if req.method != "POST" or req.path.split("?")[0] != CHAT_PATH:
            await self._send_json(conn, stream, 404, {"error": {"message": "not found"}})
            return True
        reply = self._pick(req)
        req.reply = reply
        if reply.status != 200:
            body = reply.body
            if body is None:
                err: dict[str, Any] = {"message": reply.error, "type": reply.error_type}
                err["code"] = reply.error_code
                body = orjson.dumps({"error": err})
            await self._send_raw(conn, stream, reply.status, body, reply.headers)
            return True
        if reply.body is not None:
            await self._send_raw(
                conn, stream, 200, reply.body, {"Content-Type": reply.content_type, **reply.headers}
            )
            return True
        return await self._stream_answer(conn, stream, req, reply)

    async def _send_json(
        self, conn: h11.Connection, stream: trio.SocketStream, status: int, doc: Any
    ) -> None:
        await self._send_raw(conn, stream, status, orjson.dumps(doc), {})

    async def _send_raw(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        status: int,
        body: bytes,
        headers: dict[str, str],
    ) -> None:
        hdrs = {"Content-Type": "application/json", **headers, "Content-Length": str(len(body))}
        await self._send(conn, stream, h11.Response(status_code=status, headers=list(hdrs.items())))
        await self._send(conn, stream, h11.Data(data=body))
        await self._send(conn, stream, h11.EndOfMessage())

    async def _stream_answer(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        req: RecordedRequest,
        reply: Reply,
    ) -> bool:
        doc = req.json if isinstance(req.json, dict) else {}
        model = reply.model or str(doc.get("model") or "fake-model")
        include_usage = bool((doc.get("stream_options") or {}).get("include_usage"))
        completion_id = f"chatcmpl-fake{next(self._ids)}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _sse(
                {
                    "id": completion_id,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                }
            )

        headers = [
            ("Content-Type", reply.content_type),
            ("Cache-Control", "no-cache"),
            *reply.headers.items(),
        ]
        await self._send(conn, stream, h11.Response(status_code=200, headers=headers))
        completed = False

        async def send_body() -> None:
            nonlocal completed
            await self._send(
                conn, stream, h11.Data(data=chunk({"role": "assistant", "content": ""}))
            )
            if reply.first_token_delay_s:
                await trio.sleep(reply.first_token_delay_s)
            tokens = reply.tokens()
            for i, token in enumerate(tokens):
                if reply.drop_after is not None and i >= reply.drop_after:
                    await stream.aclose()  # mid-body: the client sees an incomplete chunked read
                    return
                if reply.stall_after is not None and i >= reply.stall_after:
                    await trio.sleep_forever()
                if i and reply.token_delay_s:
                    await trio.sleep(reply.token_delay_s)
                await self._send(conn, stream, h11.Data(data=chunk({"content": token})))
                req.chunks_sent += 1
            if reply.mid_stream_error is not None:
                err = {"error": {"message": reply.mid_stream_error, "type": "server_error"}}
                await self._send(conn, stream, h11.Data(data=_sse(err)))
            if reply.send_done:
                await self._send(conn, stream, h11.Data(data=chunk({}, reply.finish_reason)))
                if include_usage and reply.send_usage:
                    usage = reply.usage or _usage(doc, tokens)
                    usage_chunk = {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": usage,
                    }
                    await self._send(conn, stream, h11.Data(data=_sse(usage_chunk)))
                await self._send(conn, stream, h11.Data(data=b"data: [DONE]\n\n"))
            await self._send(conn, stream, h11.EndOfMessage())
            completed = True

        async with trio.open_nursery() as nursery:

            async def watch_client() -> None:
                # The request is fully read, so the client has nothing more to send while it
                # waits for this answer: readable now means it hung up.
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    data = b""
                except trio.ClosedResourceError:
                    return  # we closed it ourselves (drop_after)
                if data:  # pragma: no cover - a pipelining client; hand it to h11
                    conn.receive_data(data)
                    await trio.sleep_forever()
                _mark_disconnected(req)
                nursery.cancel_scope.cancel()

            async def body_then_stop() -> None:
                try:
                    await send_body()
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    if reply.drop_after is None:
                        _mark_disconnected(req)
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch_client)
            nursery.start_soon(body_then_stop)
        return completed


def _mark_disconnected(req: RecordedRequest) -> None:
    if not req.disconnected:
        req.disconnected = True
        req.disconnected_at = trio.current_time()


def _sse(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def _usage(doc: dict[str, Any], tokens: list[str]) -> dict[str, int]:
    words = sum(len(str(m.get("content", "")).split()) for m in doc.get("messages", []))
    prompt = max(1, words)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(tokens),
        "total_tokens": prompt + len(tokens),
    }


@asynccontextmanager
async def open_fake_openai_server(
    default: Reply | None = None, *, port: int = 0
) -> AsyncIterator[FakeOpenAIServer]:
    """Start a fake server on 127.0.0.1 (a free port unless given); stop it on exit."""
    server = FakeOpenAIServer(default=default or Reply())
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    server.port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, server.serve_connection, listeners)
        try:
            yield server
        finally:
            nursery.cancel_scope.cancel()


async def _main(port: int) -> None:  # pragma: no cover - manual use
    async with open_fake_openai_server(Reply(token_delay_s=0.05), port=port) as server:
        print(f"fake OpenAI server at {server.base_url}", flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":  # pragma: no cover
    trio.run(_main, int(sys.argv[1]) if len(sys.argv) > 1 else 8765)
