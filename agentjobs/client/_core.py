"""What the sync and the async client share: requests as data, answers to models or errors,
retry decisions and the stream's resume bookkeeping. No I/O here, so both clients make the
same decisions and the rules live in one place.

Retries. A request is retried only when repeating it cannot do anything twice:
- the connection could not be made (nothing was sent): any request;
- the connection broke after sending: only requests that are idempotent (GETs, and a
  submit, which always carries an `Idempotency-Key`, so the server returns the run the
  first attempt created instead of creating a second one);
- 503 (queue full, storage unavailable, shutting down: the server says nothing was
  changed) and 429: any request, after the `Retry-After` the server asked for.
"""

from __future__ import annotations

import math
import os
import random
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs
import httpx
import orjson

from .. import __version__
from ._errors import TransportError, error_for_response
from ._models import BatchItem, BatchResult, Run, StreamEvent, parse_event
from ._sse import Frame, SSEDecoder

__all__ = [
    "DEFAULT_URL",
    "RUNS_PATH",
    "Call",
    "Outage",
    "RetryPolicy",
    "StreamState",
    "absolute_urls",
    "batch_call",
    "build_headers",
    "parse_batch_answer",
    "resolve_api_key",
    "resolve_base_url",
    "submit_call",
]

DEFAULT_URL: Final = "http://127.0.0.1:8005"
RUNS_PATH: Final = "/api/v1/runs"
URL_ENV: Final = "AGENTJOBS_URL"
KEY_ENV: Final = "AGENTJOBS_API_KEY"
#: Longest single long-poll the client asks for; the server caps it too (`--max-wait`).
LONG_POLL_S: Final = 55.0
#: A long-poll answered faster than this (or than half the wait asked for) was not honoured
#: (an older or PraisonAI server): the client then polls with pauses instead of spinning.
LONG_POLL_FLOOR_S: Final = 0.5
MAX_RETRY_AFTER_S: Final = 30.0
#: While waiting for a run, how long the server may stay unreachable (a restart, a
#: deploy) before the wait gives up with the error.
MAX_OUTAGE_S: Final = 60.0
OUTAGE_PAUSE_S: Final = 1.0

_SUBMIT_FIELDS = (
    "config",
    "session_id",
    "webhook_url",
    "timeout",
    "priority",
    "max_attempts",
    "runner",
    "ttl",
)


def resolve_base_url(base_url: str | None) -> str:
    url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
    return url.rstrip("/")


def resolve_api_key(api_key: str | None) -> str | None:
    if api_key is not None:
        return api_key or None
    return os.environ.get(KEY_ENV) or None


def build_headers(api_key: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    headers = {"User-Agent": f"agentjobs-client/{__version__}", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if extra:
        headers.update(extra)
    return headers


def make_timeout(timeout: float | httpx.Timeout | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    return httpx.Timeout(timeout)


def extend_read(timeout: httpx.Timeout, seconds: float) -> httpx.Timeout:
    """The client's timeout with `seconds` more to read (a long-poll legitimately waits)."""
    read = None if timeout.read is None else timeout.read + seconds
    return httpx.Timeout(connect=timeout.connect, read=read, write=timeout.write, pool=timeout.pool)


@attrs.frozen(slots=True)
class RetryPolicy:
    """How often and how patiently to retry (see the module docstring for *what*)."""

    max_retries: int = 3
    backoff_base: float = 0.2
    backoff_max: float = 5.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds before retry number `attempt` (0-based): the server's `Retry-After`
        when given (capped), else exponential backoff with jitter."""
        if retry_after is not None:
            return min(max(0.0, retry_after), MAX_RETRY_AFTER_S)
        raw = min(self.backoff_max, self.backoff_base * 2.0**attempt)
        return raw * (0.5 + random.random() / 2)


@attrs.frozen(slots=True)
class Call:
    """One API request, as data. `idempotent`: safe to resend after a broken connection."""

    method: str
    path: str
    params: dict[str, str] | None = None
    json: Any = None
    headers: dict[str, str] | None = None
    idempotent: bool = False
    extra_read_s: float = 0.0


def submit_call(prompt: str, options: Mapping[str, Any]) -> Call:
    """The request for a submit. Unknown options are sent as they are, so that the server
    (which knows its own fields) names a misspelt one in a 422 instead of the client
    silently dropping it."""
    opts = dict(options)
    key = opts.pop("idempotency_key", None) or uuid.uuid4().hex
    body: dict[str, Any] = {"prompt": prompt}
    for name in _SUBMIT_FIELDS:
        value = opts.pop(name, None)
        if value is not None:
            body[name] = value
    body.update({k: v for k, v in opts.items() if v is not None})
    return Call(
        "POST", RUNS_PATH, json=body, headers={"Idempotency-Key": str(key)}, idempotent=True
    )


BATCH_PATH: Final = RUNS_PATH + "/batch"


def _batch_item(item: str | Mapping[str, Any]) -> dict[str, Any]:
    """One item of a batch body: a prompt, or a mapping of submit fields (`prompt` and
    any options), with an `idempotency_key` generated unless given."""
    if isinstance(item, str):
        body: dict[str, Any] = {"prompt": item}
    elif isinstance(item, Mapping):
        body = {k: v for k, v in item.items() if v is not None}
    else:
        raise TypeError(f"a batch item is a prompt or a mapping of fields, not {item!r}")
    if not body.get("idempotency_key"):
        body["idempotency_key"] = uuid.uuid4().hex
    return body


def batch_call(runs: Sequence[str | Mapping[str, Any]]) -> Call:
    """The request for a batch submit. Every item carries an idempotency key (generated
    unless given), so the whole request may be resent after a lost answer: items already
    recorded come back as replays instead of running twice."""
    if isinstance(runs, str | bytes) or not isinstance(runs, Sequence):
        raise TypeError("runs must be a sequence of prompts or mappings of submit fields")
    return Call("POST", BATCH_PATH, json={"runs": [_batch_item(r) for r in runs]}, idempotent=True)


def parse_batch_answer(body: Any, response: httpx.Response, base_url: str) -> BatchResult:
    """The batch answer as models: runs for accepted items, typed errors for the others."""
    doc: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    items: list[BatchItem] = []
    url = str(response.url)
    for entry in doc.get("results") or ():
        index = int(entry.get("index", len(items)))
        status = int(entry.get("status", 0))
        if status == 202 and "job_id" in entry:
            fields = dict(entry)
            fields["status"] = entry.get("job_status", "queued")
            run = Run.from_json(fields, replayed=entry.get("replayed") is True)
            items.append(BatchItem(index, status, run=absolute_urls(run, base_url)))
        else:
            error = error_for_response(status, entry.get("problem"), {}, "POST", url)
            items.append(BatchItem(index, status, error=error))
    return BatchResult(items=items)


def run_path(run_id: str, suffix: str = "") -> str:
    if not run_id or "/" in run_id:
        raise ValueError(f"not a run id: {run_id!r}")
    return f"{RUNS_PATH}/{run_id}{suffix}"


def list_params(
    status: str | None, session_id: str | None, limit: int, cursor: str | None
) -> dict[str, str]:
    params = {"limit": str(limit)}
    if status:
        params["status"] = str(status)
    if session_id:
        params["session_id"] = session_id
    if cursor:
        params["cursor"] = cursor
    return params


def decode_body(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text


def check_response(response: httpx.Response, call: Call) -> Any:
    """The decoded body of a success; the typed `APIError` of a failure."""
    body = decode_body(response)
    if response.status_code >= 400:
        raise error_for_response(
            response.status_code, body, response.headers, call.method, str(response.url)
        )
    return body


def absolute_urls(run: Run, base_url: str) -> Run:
    """Make `poll_url` / `stream_url` absolute: the server sends paths unless it was told
    its public URL, and a path is no use to a caller that passes the URL on."""

    def fix(url: str | None) -> str | None:
        return base_url + url if url is not None and url.startswith("/") else url

    return attrs.evolve(run, poll_url=fix(run.poll_url), stream_url=fix(run.stream_url))


def is_replay(response: httpx.Response) -> bool:
    """Did the server answer a submit with an earlier run (same Idempotency-Key)?"""
    return str(response.headers.get("idempotent-replayed", "")).lower() == "true"


def should_retry_status(status: int) -> bool:
    return status in (429, 503)


def should_retry_transport(exc: httpx.TransportError, call: Call) -> bool:
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True  # nothing reached the server
    return call.idempotent


def transport_error(exc: httpx.TransportError, call: Call, base_url: str) -> TransportError:
    where = f"{base_url}{call.path}"
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
        message = f"cannot reach the agentjobs server at {base_url}: {exc or type(exc).__name__}"
    elif isinstance(exc, httpx.TimeoutException):
        message = f"{call.method} {where} timed out ({type(exc).__name__})"
    else:
        message = f"{call.method} {where} failed: {exc or type(exc).__name__}"
    err = TransportError(message, method=call.method, url=where)
    err.__cause__ = exc
    return err


# -- streams ---------------------------------------------------------------------------


@attrs.define(slots=True)
class StreamState:
    """Resume bookkeeping of one followed stream, across reconnects.

    `last_id` is the id of the last frame handed to the caller, sent back as
    `Last-Event-ID` on reconnect, so the server continues after it: nothing is lost and
    nothing repeats. `failures` counts reconnects in a row that produced nothing; any event
    received resets it.
    """

    run_id: str
    max_reconnects: int
    last_id: str | None = None
    failures: int = 0
    finished: bool = False
    decoder: SSEDecoder = attrs.field(factory=SSEDecoder)
    reconnects: int = 0

    def request_headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        return headers

    def feed(self, line: str) -> StreamEvent | None:
        frame = self.decoder.feed(line)
        if frame is None:
            return None
        event = decode_frame(frame)
        if frame.id is not None:
            self.last_id = frame.id
        self.failures = 0
        if event.terminal:
            self.finished = True
        return event

    def dropped(self, cause: BaseException | None, base_url: str) -> None:
        """The connection ended before the terminal event: count it, or give up."""
        self.decoder.reset_partial()
        self.failures += 1
        self.reconnects += 1
        if self.failures > self.max_reconnects:
            what = f": {cause}" if cause else " (the server kept closing the stream)"
            err = TransportError(
                f"lost the stream of {self.run_id} and could not resume it after "
                f"{self.max_reconnects} attempts{what}",
                method="GET",
                url=f"{base_url}{run_path(self.run_id, '/stream')}",
            )
            err.__cause__ = cause
            raise err

    def delay(self) -> float:
        """Pause before the next reconnect: short at first (a cut connection is usually
        back at once), growing, and never beyond the server's `retry:` hint."""
        hint = (self.decoder.retry_ms or 3000) / 1000.0
        if self.failures <= 1:
            return min(0.05, hint)
        return min(hint, 0.1 * 2.0 ** (self.failures - 1)) * (0.5 + random.random() / 2)


def decode_frame(frame: Frame) -> StreamEvent:
    try:
        data = orjson.loads(frame.data) if frame.data else {}
    except orjson.JSONDecodeError:
        data = {"text": frame.data}
    if not isinstance(data, dict):
        data = {"value": data}
    return parse_event(frame.id, frame.event, data)


@attrs.define(slots=True)
class Outage:
    """Tolerance of a waiting loop for a server that is briefly away (restarting)."""

    since: float | None = None

    def over(self) -> None:
        self.since = None

    def pause(self, now: float, deadline: float) -> float | None:
        """Seconds to pause before trying again, or None to give up (raise)."""
        if now >= deadline:
            return None
        if self.since is None:
            self.since = now
        if now - self.since > MAX_OUTAGE_S:
            return None
        return min(OUTAGE_PAUSE_S, deadline - now)


def check_wait(value: float | None, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise TypeError(f"{name} must be a number of seconds or None")
    if value < 0:
        raise ValueError(f"{name} must not be negative")
    return float(value)
