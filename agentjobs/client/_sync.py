"""`Client`: the blocking client (httpx.Client). Safe to share between threads."""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import httpx

from ._core import (
    LONG_POLL_FLOOR_S,
    LONG_POLL_S,
    RUNS_PATH,
    Call,
    Outage,
    RetryPolicy,
    StreamState,
    absolute_urls,
    batch_call,
    build_headers,
    check_response,
    check_wait,
    extend_read,
    is_replay,
    list_params,
    make_timeout,
    parse_batch_answer,
    resolve_api_key,
    resolve_base_url,
    run_path,
    should_retry_status,
    should_retry_transport,
    submit_call,
    transport_error,
)
from ._errors import APIError, NotFinished, ServiceUnavailable, TransportError, WaitTimeout
from ._models import BatchResult, Run, RunResult, StreamEvent

__all__ = ["Client", "EventStream"]


class Client:
    """A blocking client for an agentjobs server (or a PraisonAI jobs server).

    `base_url` defaults to `$AGENTJOBS_URL`, else `http://127.0.0.1:8005`; `api_key` to
    `$AGENTJOBS_API_KEY` (sent as `Authorization: Bearer ...`). `timeout` is httpx's, per
    request; long-polls and streams extend the read part as they need. One client holds a
    connection pool: create it once, share it between threads, close it at the end (or use
    it as a context manager).
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout | None = 30.0,
        max_retries: int = 3,
        stream_read_timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = resolve_base_url(base_url)
        self.retry = RetryPolicy(max_retries=max_retries)
        self.stream_read_timeout = stream_read_timeout
        self._timeout = make_timeout(timeout)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=build_headers(resolve_api_key(api_key), headers),
            timeout=self._timeout,
            transport=transport,
        )

    # -- plumbing --------------------------------------------------------------------------

    def _request(self, call: Call) -> tuple[httpx.Response, Any]:
        """Send `call`, retrying per the module rules; the response and its decoded body."""
        attempt = 0
        timeout = (
            extend_read(self._timeout, call.extra_read_s)
            if call.extra_read_s
            else httpx.USE_CLIENT_DEFAULT
        )
        while True:
            try:
                response = self._http.request(
                    call.method,
                    call.path,
                    params=call.params,
                    json=call.json,
                    headers=call.headers,
                    timeout=timeout,
                )
            except httpx.TransportError as exc:
                if attempt < self.retry.max_retries and should_retry_transport(exc, call):
                    time.sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise transport_error(exc, call, self.base_url) from exc
            try:
                return response, check_response(response, call)
            except APIError as err:
                if attempt < self.retry.max_retries and should_retry_status(err.status):
                    time.sleep(self.retry.delay(attempt, err.retry_after))
                    attempt += 1
                    continue
                raise

    def _send(self, call: Call) -> Any:
        return self._request(call)[1]

    # -- the API ---------------------------------------------------------------------------

    def submit(self, prompt: str, **options: Any) -> Run:
        """Submit a run; returns it as accepted (status `queued`).

        Options are the body fields: `config`, `session_id`, `runner`, `timeout`,
        `priority`, `max_attempts`, `webhook_url`, `ttl`. An `idempotency_key` is generated
        unless given, and kept across this call's own retries, so a retry after a lost
        answer returns the same run instead of submitting twice (`Run.replayed` tells).
        """
        response, body = self._request(submit_call(prompt, options))
        run = Run.from_json(body, replayed=is_replay(response))
        return absolute_urls(run, self.base_url)

    def submit_batch(self, runs: Sequence[str | Mapping[str, Any]]) -> BatchResult:
        """Submit many runs in one request (`POST /api/v1/runs/batch`, up to the server's
        `--max-batch`, 1000 by default), recorded in one group commit.

        Each item is a prompt, or a mapping of body fields (`{"prompt": ..., "session_id":
        ...}`, the options of `submit`). Items are independent: the result has one
        `BatchItem` per item, in order, with its `run` or the `error` that refused it
        alone (`raise_for_errors()` raises the first). Each item gets an
        `idempotency_key` unless it has one, so a retry of the whole request after a lost
        answer returns the runs already made (`run.replayed`) instead of making more.
        A refusal of the batch as a whole (422 for its shape, 413, 429, 503 after the
        retries) raises. After a 422 or 413 nothing was submitted; after a 429/503 an
        earlier attempt may have made the runs and lost its answer (docs/client.md).
        """
        response, body = self._request(batch_call(runs))
        return parse_batch_answer(body, response, self.base_url)

    def get(self, run_id: str) -> Run:
        """The run's status and progress now."""
        return Run.from_json(self._send(Call("GET", run_path(run_id), idempotent=True)))

    def result(self, run_id: str, *, wait: float | None = None) -> RunResult:
        """The finished run's outcome (whatever it is: check `ok` / `raise_for_status()`).

        `wait`: seconds to wait for the run to finish first (long-polls, however long;
        a server restart meanwhile is waited out, up to a minute); None asks once.
        Raises `NotFinished` if it is still not finished.
        """
        wait = check_wait(wait, "wait")
        deadline = time.monotonic() + (wait or 0.0)
        outage = Outage()
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            chunk = min(remaining, LONG_POLL_S)
            started = time.monotonic()
            try:
                return self._result_once(run_id, chunk)
            except NotFinished as err:
                outage.over()
                now = time.monotonic()
                if now >= deadline:
                    raise
                if now - started < min(chunk / 2, LONG_POLL_FLOOR_S):
                    # answered at once although asked to wait: a server without long-polls
                    time.sleep(min(err.retry_after or 1.0, deadline - now))
            except (TransportError, ServiceUnavailable):
                # the server is away (restarting?): a waiter keeps waiting, for a while
                pause = outage.pause(time.monotonic(), deadline)
                if pause is None:
                    raise
                time.sleep(pause)

    def _result_once(self, run_id: str, wait: float) -> RunResult:
        params = {"wait": f"{wait:g}"} if wait > 0 else None
        call = Call(
            "GET", run_path(run_id, "/result"), params=params, idempotent=True, extra_read_s=wait
        )
        return RunResult.from_json(self._send(call))

    def wait(self, run_id: str, timeout: float | None = None) -> RunResult:
        """Block until the run is finished and return its outcome. Raises `WaitTimeout`
        (a `TimeoutError`) after `timeout` seconds; None waits as long as it takes."""
        timeout = check_wait(timeout, "timeout")
        try:
            return self.result(run_id, wait=math.inf if timeout is None else timeout)
        except NotFinished:
            raise WaitTimeout(run_id, timeout or 0.0) from None

    def submit_and_wait(
        self, prompt: str, *, timeout: float | None = None, check: bool = True, **options: Any
    ) -> RunResult:
        """Submit, then wait for the outcome. With `check` (the default) a failed run raises
        `RunFailed` and a cancelled one `RunCancelled`. `timeout` as for `wait`."""
        run = self.submit(prompt, **options)
        outcome = self.wait(run.id, timeout)
        return outcome.raise_for_status() if check else outcome

    def cancel(self, run_id: str) -> Run:
        """Cancel a run: a queued one at once, a running one once it has really stopped.
        Raises `AlreadyFinished` for a finished run."""
        return Run.from_json(self._send(Call("POST", run_path(run_id, "/cancel"))))

    def delete(self, run_id: str) -> None:
        """Forget a finished run. Raises `NotFinished` for one that is not finished."""
        self._send(Call("DELETE", run_path(run_id)))

    def list(
        self,
        *,
        status: str | None = None,
        session_id: str | None = None,
        limit: int | None = None,
        page_size: int = 100,
    ) -> Iterator[Run]:
        """Runs newest first, following `next_cursor` page after page; at most `limit`."""
        if page_size < 1:
            raise ValueError("page_size must be at least 1")
        cursor: str | None = None
        seen = 0
        while True:
            size = page_size if limit is None else min(page_size, limit - seen)
            if size <= 0:
                return
            params = list_params(status, session_id, size, cursor)
            page = self._send(Call("GET", RUNS_PATH, params=params, idempotent=True))
            for doc in page.get("jobs", []):
                yield Run.from_json(doc)
                seen += 1
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def stream(
        self, run_id: str, *, after: str | None = None, max_reconnects: int = 8
    ) -> EventStream:
        """Follow the run's events (`StatusEvent`, `ProgressEvent`, `OutputEvent`, ...,
        ending with `ResultEvent`, `ErrorEvent` or `CancelledEvent`).

        A dropped connection is resumed with `Last-Event-ID`, so no event is lost or
        repeated; `after` starts after a known event id. Raises `TransportError` after
        `max_reconnects` attempts in a row without an event.
        """
        state = StreamState(run_id, max_reconnects, last_id=after)
        return EventStream(self._iter_stream(state), state)

    def _iter_stream(self, state: StreamState) -> Generator[StreamEvent, None, None]:
        path = run_path(state.run_id, "/stream")
        call = Call("GET", path, idempotent=True)
        timeout = httpx.Timeout(
            connect=self._timeout.connect,
            read=self.stream_read_timeout,
            write=self._timeout.write,
            pool=self._timeout.pool,
        )
        while True:
            cause: BaseException | None = None
            try:
                with self._http.stream(
                    "GET", path, headers=state.request_headers(), timeout=timeout
                ) as response:
                    if response.status_code == 204:
                        return  # the server says everything was seen already
                    if response.status_code >= 400:
                        response.read()
                        try:
                            check_response(response, call)
                        except APIError as err:
                            if not should_retry_status(err.status):
                                raise
                            cause = err
                    else:
                        for line in response.iter_lines():
                            event = state.feed(line)
                            if event is not None:
                                yield event
                                if event.terminal:
                                    return
            except httpx.TransportError as exc:
                cause = exc
            state.dropped(cause, self.base_url)
            time.sleep(state.delay())

    def health(self) -> dict[str, Any]:
        """`GET /health`: liveness and basic figures."""
        body: dict[str, Any] = self._send(Call("GET", "/health", idempotent=True))
        return body

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<agentjobs.client.Client {self.base_url}>"


class EventStream:
    """The iterator `Client.stream` returns; close it (or use `with`) to stop early."""

    def __init__(self, events: Generator[StreamEvent, None, None], state: StreamState) -> None:
        self._events = events
        self._state = state

    @property
    def last_id(self) -> str | None:
        """Id of the last event received: pass it as `after=` to continue later."""
        return self._state.last_id

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established (resumed) so far."""
        return self._state.reconnects

    def __iter__(self) -> EventStream:
        return self

    def __next__(self) -> StreamEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> EventStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
