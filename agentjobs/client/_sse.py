"""A small server-sent events decoder (the WHATWG rules that matter here), fed line by line.

httpx gives us lines (`iter_lines` splits on CR, LF and CRLF); this turns them into frames.
It is sans-IO so that the sync and the async client share it, and so is every decision
about ids: the decoder remembers the last `id:` it saw, which is what a reconnect sends as
`Last-Event-ID`, and the last `retry:` hint, which paces reconnects.
"""

from __future__ import annotations

import attrs

__all__ = ["Frame", "SSEDecoder"]


@attrs.frozen(slots=True)
class Frame:
    """One dispatched event: its id (the last one set, per the spec), name and data text."""

    id: str | None
    event: str
    data: str


@attrs.define(slots=True)
class SSEDecoder:
    last_id: str | None = None
    retry_ms: int | None = None
    _event: str = ""
    _data: list[str] = attrs.field(factory=list)
    _has_data: bool = False

    def feed(self, line: str) -> Frame | None:
        """Take one line (without its line ending); return a frame when one is complete."""
        if line == "":
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment (keep-alive)
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "id":
            if "\0" not in value:
                self.last_id = value or None
        elif name == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None

    def _dispatch(self) -> Frame | None:
        event, data, has_data = self._event or "message", self._data, self._has_data
        self._event = ""
        self._data = []
        self._has_data = False
        if not has_data:
            return None  # e.g. a frame with only `retry:` or only `id:`
        return Frame(self.last_id, event, "\n".join(data))

    def reset_partial(self) -> None:
        """Drop a half-received frame (the connection broke in the middle of it)."""
        self._event = ""
        self._data = []
        self._has_data = False
