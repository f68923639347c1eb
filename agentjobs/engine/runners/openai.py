"""`openai`: any OpenAI-compatible chat endpoint (OpenAI, vLLM, Ollama, llama.cpp, LM Studio).

One run is one streamed `POST {base_url}/chat/completions`. Tokens are streamed to the run's
`output`, coalesced so that one output call carries up to `coalesce_s` (~50 ms) of tokens:
per-token events would multiply journal writes and SSE frames by ~50 for no visible gain.
The result is the full text; `metrics` gets the model, token usage (when the server sends
the `include_usage` chunk), time to first token and duration.

Errors are classified for the engine's supervisor, which owns retries (with backoff and the
run's attempts): 408/409/429/5xx, connection failures, timeouts and broken streams raise a
retryable `RunError` (with `retry_after` from `Retry-After` / `retry-after-ms`); other 4xx
fail the run with the server's own message. There is deliberately no retry loop in here:
one place decides about retries, and it records each attempt.

Cancellation is trio cancellation: leaving `async with client.stream(...)` closes the
connection at once, so the server stops generating (and billing) immediately.

Secrets: the API key goes into one request header and nowhere else. It is not in `repr()`,
metrics, or error messages (server error texts are scrubbed of it, and httpx exceptions,
which carry the request and its headers, are not chained onto our errors).

Chat sessions: when the run has a `session_id`, earlier turns of that session (from the
engine, oldest first) are sent as user/assistant messages before the new prompt, bounded by
`history_max_turns` and `history_max_chars` (oldest dropped first). For a coherent
conversation the engine must run a session's runs one at a time (`session_concurrency=1`).
"""

from __future__ import annotations

import email.utils
import logging
import math
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from typing import Any

import attrs
import httpx
import orjson
import trio

from ._base import RunContext, RunError
from .config import RunnerConfigError

__all__ = ["DEFAULT_CONFIG_OVERRIDES", "OVERRIDABLE_KEYS", "OpenAIRunner"]

log = logging.getLogger("agentjobs.runners.openai")

#: Request parameters a run's `config` can set, if the operator allows the key.
OVERRIDABLE_KEYS = frozenset(
    {
        "model",
        "temperature",
        "top_p",
        "max_tokens",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "system_prompt",
    }
)
#: Allowed unless the operator says otherwise: sampling knobs. Not `model` (cost and
#: access are the operator's call) and not `system_prompt` (it is often a policy).
DEFAULT_CONFIG_OVERRIDES = frozenset(
    {"temperature", "top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty"}
)

_RETRYABLE_STATUS = frozenset({408, 409, 429})
_MAX_ERROR_BODY = 64 * 1024
_REDACTED = "***"


def _check_range(name: str, value: float | None, lo: float, hi: float) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return f"{name}: expected a number, got {value!r}"
    if not lo <= value <= hi:
        return f"{name}: must be between {lo:g} and {hi:g}, got {value!r}"
    return None


@attrs.define(slots=True, eq=False, repr=False, kw_only=True)
class OpenAIRunner:
    """Stream a chat completion per run. Options (operator level):

    - `model`, `base_url` (up to and including `/v1`), `api_key` (optional; local servers
      rarely need one), `system_prompt`, `temperature`, `top_p`, `max_tokens`.
    - `timeout_s`: longest silence allowed while waiting for data (read/write/pool);
      `connect_timeout_s`: connecting. The run's total duration is the engine's timeout.
    - `allow_config_overrides`: which of `OVERRIDABLE_KEYS` a run's `config` may set
      (default `DEFAULT_CONFIG_OVERRIDES`); a run setting another one fails with a clear
      message rather than silently getting something else. `allowed_models` restricts a
      `model` override to a list; `max_tokens_limit` caps a `max_tokens` override.
    - `use_session_history` (a run can turn it off with `config.use_session_history =
      false`), `history_max_turns`, `history_max_chars`.
    - `include_usage`: ask for the usage chunk (`stream_options`); turn off for servers
      that reject the field. `extra_headers` / `extra_body`: sent with every request
      (e.g. OpenRouter headers, vLLM sampling extensions).
    - `coalesce_s`: output coalescing window. `max_connections`: HTTP pool bound
      (default: unbounded; the engine's concurrency is the real bound).
    """

    model: str
    base_url: str = "https://api.openai.com/v1"
    api_key: str | None = None
    system_prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    timeout_s: float = 600.0
    connect_timeout_s: float = 10.0
    allow_config_overrides: frozenset[str] = attrs.field(
        default=DEFAULT_CONFIG_OVERRIDES, converter=frozenset
    )
    allowed_models: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    max_tokens_limit: int | None = None
    use_session_history: bool = True
    history_max_turns: int = 20
    history_max_chars: int = 20_000
    include_usage: bool = True
    extra_headers: dict[str, str] = attrs.Factory(dict)
    extra_body: dict[str, Any] = attrs.Factory(dict)
    coalesce_s: float = 0.05
    coalesce_max_chars: int = 8192
    max_connections: int | None = None
    _client: httpx.AsyncClient | None = attrs.field(init=False, default=None)
    _endpoint: str = attrs.field(init=False, default="")
    _display: str = attrs.field(init=False, default="")
    _endpoint_display: str = attrs.field(init=False, default="")

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise RunnerConfigError("model: required (a non-empty string)")
        try:
            url = httpx.URL(self.base_url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise RunnerConfigError(f"base_url: not a valid URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise RunnerConfigError(
                f"base_url: expected an http(s) URL like http://127.0.0.1:11434/v1, got "
                f"{self._scrub(str(url.copy_with(username=None, password=None)))!r}"
            )
        self._endpoint = self.base_url.rstrip("/") + "/chat/completions"
        # For messages: no credentials, no query string.
        self._display = str(url.copy_with(username=None, password=None, query=None)).rstrip("/")
        self._endpoint_display = self._display + "/chat/completions"
        for message in (
            _check_range("temperature", self.temperature, 0, 2),
            _check_range("top_p", self.top_p, 0, 1),
        ):
            if message:
                raise RunnerConfigError(message)
        for name, value in (
            ("max_tokens", self.max_tokens),
            ("max_tokens_limit", self.max_tokens_limit),
            ("max_connections", self.max_connections),
        ):
            if value is not None and value < 1:
                raise RunnerConfigError(f"{name}: must be >= 1, got {value}")
        for name, count in (
            ("history_max_turns", self.history_max_turns),
            ("history_max_chars", self.history_max_chars),
        ):
            if count < 0:
                raise RunnerConfigError(f"{name}: must be >= 0, got {count}")
        for name, fvalue in (
            ("timeout_s", self.timeout_s),
            ("connect_timeout_s", self.connect_timeout_s),
            ("coalesce_s", self.coalesce_s),
        ):
            if not fvalue > 0:
                raise RunnerConfigError(f"{name}: must be > 0, got {fvalue}")
        unknown = self.allow_config_overrides - OVERRIDABLE_KEYS
        if unknown:
            raise RunnerConfigError(
                f"allow_config_overrides: unknown key(s) {', '.join(sorted(unknown))} "
                f"(overridable: {', '.join(sorted(OVERRIDABLE_KEYS))})"
            )

    def __repr__(self) -> str:
        key = _REDACTED if self.api_key else None
        return f"OpenAIRunner(base_url={self._display!r}, model={self.model!r}, api_key={key!r})"

    # ----------------------------------------------------------------- lifecycle

    def _get_client(self) -> httpx.AsyncClient:
        # Created on first use, inside the trio loop that will use it, and shared by all
        # runs (one connection pool). No auth on the client: headers go per request.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
                limits=httpx.Limits(
                    max_connections=self.max_connections, max_keepalive_connections=20
                ),
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the connection pool. The runner may be used again afterwards."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> OpenAIRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----------------------------------------------------------------- request building

    def validate_run_config(self, config: Mapping[str, Any]) -> None:
        """Raise `RunError` (non-retryable, naming the key) if a run's `config` asks for
        overrides the operator does not allow. The HTTP layer may call this at submit time
        to answer 422 early; `run()` applies the same check."""
        self._params(config)

    def _params(self, config: Mapping[str, Any]) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.model,
            "system_prompt": self.system_prompt,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
        }
        for key in sorted(OVERRIDABLE_KEYS & config.keys()):
            if key not in self.allow_config_overrides:
                allowed = ", ".join(sorted(self.allow_config_overrides)) or "none"
                raise RunError(
                    f"config.{key}: this runner does not allow overriding {key!r} "
                    f"(allowed: {allowed})"
                )
            params[key] = _checked_override(key, config[key], self)
        return params

    def _history(self, ctx: RunContext) -> list[dict[str, str]]:
        use = ctx.config.get("use_session_history", self.use_session_history)
        if ctx.session_id is None or use is not True or self.history_max_turns == 0:
            return []
        turns: list[tuple[str, str]] = []
        budget = self.history_max_chars
        # Newest first, so that the budget keeps the most recent context.
        for turn in reversed(list(ctx.session_history())):
            if len(turns) >= self.history_max_turns:
                break
            answer = _as_text(turn.result)
            if answer is None:
                continue  # a run without a result (failed, cancelled) is no conversation turn
            cost = len(turn.prompt) + len(answer)
            if cost > budget:
                break
            budget -= cost
            turns.append((turn.prompt, answer))
        messages: list[dict[str, str]] = []
        for prompt, answer in reversed(turns):
            messages.append({"role": "user", "content": prompt})
            messages.append({"role": "assistant", "content": answer})
        return messages

    def _body(self, ctx: RunContext, params: dict[str, Any]) -> tuple[dict[str, Any], int]:
        messages: list[dict[str, str]] = []
        if params["system_prompt"]:
            messages.append({"role": "system", "content": params["system_prompt"]})
        history = self._history(ctx)
        messages.extend(history)
        messages.append({"role": "user", "content": ctx.prompt})
        body: dict[str, Any] = dict(self.extra_body)
        body.update(model=params["model"], messages=messages, stream=True)
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        for key in (
            "temperature",
            "top_p",
            "max_tokens",
            "stop",
            "seed",
            "presence_penalty",
            "frequency_penalty",
        ):
            if params.get(key) is not None:
                body[key] = params[key]
        return body, len(history) // 2

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream", **self.extra_headers}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    # ----------------------------------------------------------------- running

    async def run(self, ctx: RunContext) -> Any:
        params = self._params(ctx.config)
        body, history_turns = self._body(ctx, params)
        metrics = ctx.metrics
        metrics["model"] = params["model"]
        if history_turns:
            metrics["history_turns"] = history_turns
        state = _StreamState(started=trio.current_time())
        out = _Coalescer(ctx.output, self.coalesce_s, self.coalesce_max_chars)
        failure: Exception | None = None
        try:
            # The nursery only hosts the flush timer; errors are carried out of it by hand
            # so that the engine sees a plain RunError, not an ExceptionGroup.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(out.run_timer)
                try:
                    await self._stream(body, state, out)
                except Exception as exc:
                    failure = exc
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            out.flush()
            if state.first_token_at is not None:
                metrics["time_to_first_token_s"] = round(state.first_token_at - state.started, 6)
            metrics["duration_s"] = round(trio.current_time() - state.started, 6)
            if state.model:
                metrics["model"] = state.model
            if state.finish_reason:
                metrics["finish_reason"] = state.finish_reason
            metrics.update(state.usage)
        if failure is not None:
            raise failure
        return "".join(state.parts)

    async def _stream(self, body: dict[str, Any], state: _StreamState, out: _Coalescer) -> None:
        client = self._get_client()
        log.debug(
            "POST %s model=%s messages=%d",
            self._endpoint_display,
            body["model"],
            len(body["messages"]),
        )
        try:
            async with client.stream(
                "POST", self._endpoint, content=orjson.dumps(body), headers=self._json_headers()
            ) as resp:
                state.status = resp.status_code
                if resp.status_code != 200:
                    raise await self._status_error(resp)
                ctype = resp.headers.get("content-type", "")
                if ctype.startswith("application/json"):
                    # A server that ignored `stream: true`: take the whole answer at once.
                    self._on_completion(await _read_capped(resp, 16 * 1024 * 1024), state, out)
                    return
                await self._read_events(resp, state, out)
        except RunError:
            raise
        except httpx.TimeoutException as exc:
            raise RunError(
                f"{self._where(state)}: timed out: {_describe(exc)} (retryable)",
                retryable=True,
            ) from None
        except (httpx.TransportError, httpx.DecodingError) as exc:
            if isinstance(exc, httpx.UnsupportedProtocol):
                raise RunError(f"{self._display}: {self._scrub(_describe(exc))}") from None
            raise RunError(
                f"{self._where(state)}: {self._scrub(_describe(exc))} (retryable)",
                retryable=True,
            ) from None
        except httpx.HTTPError as exc:
            raise RunError(f"{self._display}: {self._scrub(_describe(exc))}") from None

    def _json_headers(self) -> dict[str, str]:
        headers = self._headers()
        headers["Content-Type"] = "application/json"
        return headers

    def _where(self, state: _StreamState) -> str:
        if state.status is None:
            return f"request to {self._display} failed"
        return f"stream from {self._display} broke after {state.chunks} chunk(s)"

    async def _read_events(
        self, resp: httpx.Response, state: _StreamState, out: _Coalescer
    ) -> None:
        data: list[str] = []
        async for line in resp.aiter_lines():
            if line:
                if line.startswith(":"):
                    continue  # SSE comment (keep-alive)
                field, _, value = line.partition(":")
                if field == "data":
                    data.append(value[1:] if value.startswith(" ") else value)
                continue  # `event:`, `id:`, `retry:` carry nothing we need
            if data:
                payload, data = "\n".join(data), []
                if self._on_event(payload, state, out):
                    return
        if data and self._on_event("\n".join(data), state, out):
            return
        if not state.finish_reason:
            raise RunError(
                f"stream from {self._display} ended after {state.chunks} chunk(s) without "
                "completing: no [DONE] and no finish_reason (retryable)",
                retryable=True,
            )

    def _on_event(self, payload: str, state: _StreamState, out: _Coalescer) -> bool:
        """Handle one SSE `data` payload; True at the end of the stream (`[DONE]`)."""
        if payload.strip() == "[DONE]":
            return True
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise RunError(
                f"stream from {self._display} sent a chunk that is not JSON: "
                f"{self._scrub(payload[:200])!r}"
            ) from None
        if not isinstance(chunk, dict):
            return False
        state.chunks += 1
        if "error" in chunk:
            # Some servers (vLLM, OpenRouter) report failures inside a 200 stream.
            raise RunError(
                f"{self._display} reported an error mid-stream: "
                f"{self._scrub(_error_message(chunk))} (retryable)",
                retryable=True,
            )
        self._take_common(chunk, state)
        choices = chunk.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if isinstance(content, str) and content:
                        self._take_text(content, state, out)
                if choice.get("finish_reason"):
                    state.finish_reason = str(choice["finish_reason"])
        return False

    def _on_completion(self, raw: bytes, state: _StreamState, out: _Coalescer) -> None:
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise RunError(f"{self._display} answered with invalid JSON") from None
        if not isinstance(doc, dict):
            raise RunError(f"{self._display} answered with unexpected JSON")
        if "error" in doc:
            raise RunError(f"{self._display}: {self._scrub(_error_message(doc))}")
        self._take_common(doc, state)
        try:
            choice = doc["choices"][0]
            content = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError):
            raise RunError(f"{self._display} answered without choices[0].message") from None
        state.finish_reason = str(choice.get("finish_reason") or "stop")
        if content:
            self._take_text(str(content), state, out)

    @staticmethod
    def _take_common(chunk: dict[str, Any], state: _StreamState) -> None:
        model = chunk.get("model")
        if isinstance(model, str) and model:
            state.model = model
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                value = usage.get(key)
                if isinstance(value, int):
                    state.usage[key] = value

    @staticmethod
    def _take_text(text: str, state: _StreamState, out: _Coalescer) -> None:
        if state.first_token_at is None:
            state.first_token_at = trio.current_time()
        state.parts.append(text)
        out.add(text)

    async def _status_error(self, resp: httpx.Response) -> RunError:
        raw = await _read_capped(resp, _MAX_ERROR_BODY)
        detail = self._scrub(_error_text(raw))
        status = resp.status_code
        try:
            reason = resp.reason_phrase or HTTPStatus(status).phrase
        except ValueError:
            reason = ""
        message = f"{self._display} answered {status} {reason}".rstrip()
        if detail:
            message += f": {detail}"
        if status in _RETRYABLE_STATUS or 500 <= status <= 599:
            retry_after = _retry_after(resp.headers)
            hint = "retryable" + (
                f", retry after {retry_after:g} s" if retry_after is not None else ""
            )
            return RunError(f"{message} ({hint})", retryable=True, retry_after=retry_after)
        return RunError(message, retryable=False)

    def _scrub(self, text: str) -> str:
        """Remove the API key from text that came from elsewhere (server errors echo it)."""
        if self.api_key and self.api_key in text:
            text = text.replace(self.api_key, _REDACTED)
        return text


# --------------------------------------------------------------------------- helpers


@attrs.define(slots=True, eq=False)
class _StreamState:
    started: float
    status: int | None = None
    chunks: int = 0
    parts: list[str] = attrs.Factory(list)
    first_token_at: float | None = None
    model: str | None = None
    finish_reason: str | None = None
    usage: dict[str, int] = attrs.Factory(dict)


class _Coalescer:
    """Buffer streamed text; hand it on when the oldest buffered piece is `interval` old
    (a timer task, so a stalled stream does not hold text back) or the buffer is large."""

    __slots__ = ("_buf", "_deadline", "_emit", "_interval", "_max_chars", "_size", "_wake")

    def __init__(self, emit: Callable[[str], None], interval: float, max_chars: int) -> None:
        self._emit = emit
        self._interval = interval
        self._max_chars = max_chars
        self._buf: list[str] = []
        self._size = 0
        self._deadline: float | None = None
        self._wake = trio.Event()

    def add(self, text: str) -> None:
        self._buf.append(text)
        self._size += len(text)
        if self._size >= self._max_chars:
            self.flush()
        elif self._deadline is None:
            self._deadline = trio.current_time() + self._interval
            self._wake.set()

    def flush(self) -> None:
        if self._buf:
            text = "".join(self._buf)
            self._buf.clear()
            self._size = 0
            self._emit(text)
        self._deadline = None

    async def run_timer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            deadline = self._deadline
            if deadline is None:
                continue
            await trio.sleep_until(deadline)
            if self._deadline == deadline:
                self.flush()


def _checked_override(key: str, value: Any, runner: OpenAIRunner) -> Any:
    where = f"config.{key}"
    if key == "model":
        if not isinstance(value, str) or not value.strip():
            raise RunError(f"{where}: expected a model name (string), got {value!r}")
        if runner.allowed_models and value not in runner.allowed_models:
            raise RunError(
                f"{where}: model {value!r} is not allowed "
                f"(allowed: {', '.join(sorted(runner.allowed_models))})"
            )
        return value
    if key == "system_prompt":
        if value is not None and not isinstance(value, str):
            raise RunError(f"{where}: expected a string, got {value!r}")
        return value
    if key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        lo, hi = {"temperature": (0, 2), "top_p": (0, 1)}.get(key, (-2, 2))
        problem = _check_range(where, value, lo, hi)
        if problem:
            raise RunError(problem)
        return value
    if key in ("max_tokens", "seed"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise RunError(f"{where}: expected an integer, got {value!r}")
        if key == "max_tokens":
            if value < 1:
                raise RunError(f"{where}: must be >= 1, got {value}")
            limit = runner.max_tokens_limit
            if limit is not None and value > limit:
                raise RunError(f"{where}: {value} exceeds this runner's limit of {limit}")
        return value
    # stop
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(v, str) for v in value):
        return value
    raise RunError(f"{where}: expected a string or a list of up to 4 strings, got {value!r}")


def _as_text(result: Any) -> str | None:
    if result is None:
        return None
    if isinstance(result, str):
        return result
    try:
        return orjson.dumps(result).decode()
    except TypeError:
        return str(result)


async def _read_capped(resp: httpx.Response, cap: int) -> bytes:
    buf = bytearray()
    async for chunk in resp.aiter_bytes():
        buf += chunk
        if len(buf) >= cap:
            break
    return bytes(buf[:cap])


def _error_message(doc: Mapping[str, Any]) -> str:
    """The human message of an OpenAI-style error object, or of common variants."""
    err = doc.get("error")
    if isinstance(err, dict):
        message = err.get("message") or err.get("msg")
        if message:
            code = err.get("code") or err.get("type")
            return f"{message} ({code})" if isinstance(code, str) and code else str(message)
    if isinstance(err, str) and err:
        return err
    for key in ("message", "detail"):
        value = doc.get(key)
        if isinstance(value, str) and value:
            return value
    return orjson.dumps(doc).decode()[:500]


def _error_text(raw: bytes) -> str:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", errors="replace").strip()[:500]
    if isinstance(doc, dict):
        return _error_message(doc)
    return str(doc)[:500]


def _retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `Retry-After` (seconds or date)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000
        except ValueError:
            pass
        else:
            if math.isfinite(value):
                return max(0.0, value)
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())
    return max(0.0, value) if math.isfinite(value) else None


def _describe(exc: Exception) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
