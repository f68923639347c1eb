"""An ASGI wrapper in front of quart: the request body limit, and answers that never hang.

**The hang it prevents.** When the app answers before the client has finished sending its
body (a 413 while reading, or any endpoint that ignores a body), hypercorn 0.18 closes the
connection from inside the app's task; quart-trio cancels that task as soon as hypercorn
reports the disconnect, which cancels the close half-way. The socket then stays open and
the client's next keep-alive request on it hangs forever (reproduced: a chunked body over
the limit, or a 500 kB body sent to `GET /health`, followed by any request). So the last
message of every response is held back until the app has returned, and sent from here, in
a task nobody cancels; while it is sent, what the client still sends is read and dropped
(hypercorn hands it over through a small bounded queue and would block if nobody read).

**The body limit.** A declared `Content-Length` over the limit is refused before anything
is read. A body without one (chunked) is counted as it arrives; past the limit the app is
told the client went away (so it stops reading at once) and the 413 is sent from here. A
413 closes the connection (`Connection: close`): the unread rest of the body makes it
unusable for a next request anyway.

`read_rest`, `finish_response` and `refusal` are also the fast path's (_fastpath.py), so
that its answers drain and refuse bodies exactly as the guard does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any

import orjson
import trio

from .errors import PROBLEM_CONTENT_TYPE, Problem

__all__ = ["RequestGuard", "content_length", "finish_response", "read_rest", "refusal"]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

_DRAIN_S = 5.0  # longest we read and drop a client's unwanted body after answering


class RequestGuard:
    """`limit` applies to every path but those in `path_limits` (exact paths), which have
    their own (`POST /api/v1/runs/batch`: `--max-batch-bytes`)."""

    def __init__(
        self, app: ASGIApp, limit: int, path_limits: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.limit = limit
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.limit)
        declared = content_length(scope)
        if declared is not None and declared > limit:
            await finish_response(receive, send, refusal(scope, limit), body_done=False)
            return

        received = 0
        overflow = False
        body_done = False
        started = False
        last: list[Message] = []

        async def guarded_receive() -> Message:
            nonlocal received, overflow, body_done
            if overflow:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    overflow = True
                    return {"type": "http.disconnect"}
                if not message.get("more_body", False):
                    body_done = True
            elif message["type"] == "http.disconnect":
                body_done = True
            return message

        async def deferring_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                last.append(message)  # sent once the app has returned (module docstring)
                return
            await send(message)

        await self.app(scope, guarded_receive, deferring_send)
        if overflow and not started:
            await finish_response(receive, send, refusal(scope, limit), body_done=False)
        elif last:
            if not body_done:
                # The app ignored (part of) the body: read the rest so that the connection
                # can serve the client's next request, as the response did not say it closes.
                outcome = await read_rest(receive, limit)
                if outcome == "gone":
                    return
                body_done = outcome == "done"
            await finish_response(receive, send, last, body_done=body_done)


async def read_rest(receive: Receive, limit: int) -> str:
    """Drop the rest of the request body: "done", "gone" (client left) or "too much"."""
    dropped = 0
    with trio.move_on_after(_DRAIN_S):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return "gone"
            dropped += len(message.get("body", b""))
            if not message.get("more_body", False):
                return "done"
            if dropped > limit:
                break
    return "too much"


async def finish_response(
    receive: Receive, send: Send, messages: list[Message], *, body_done: bool
) -> None:
    """Send an answer's messages. If the client may still be sending its body, read and
    drop it meanwhile (hypercorn would block on its full queue otherwise), for at most
    `_DRAIN_S` once the answer is out."""
    if body_done:  # the usual case: the connection is recycled, nothing to drain
        for message in messages:
            await send(message)
        return
    async with trio.open_nursery() as nursery:

        async def discard() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        nursery.start_soon(discard)
        for message in messages:
            await send(message)
        # hypercorn reports the disconnect once the answer is out; do not wait longer
        nursery.cancel_scope.deadline = trio.current_time() + _DRAIN_S


def refusal(scope: MutableMapping[str, Any], limit: int) -> list[Message]:
    """The 413 answer for a body over `limit` (it closes the connection)."""
    problem = Problem("payload-too-large", f"the request body is over the limit of {limit} bytes")
    body = orjson.dumps(problem.body(scope.get("path")))
    return [
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        },
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


def content_length(scope: MutableMapping[str, Any]) -> int | None:
    """The declared body length (the first `Content-Length`), or None when there is none
    or it is not a plain decimal number (h11 refuses such a request before the app sees
    it; were one to get through, its body is counted as it arrives). The guard's and the
    fast path's: one reading of the header."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None
