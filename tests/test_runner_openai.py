"""The `openai` runner against a real loopback HTTP server speaking the streaming wire format."""

from __future__ import annotations

import email.utils
import logging
import socket
import time
import traceback
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
from fakes.context import Recorder
from fakes.openai_server import FakeOpenAIServer, Reply, open_fake_openai_server

from agentjobs.engine.runners import (
    OpenAIRunner,
    RunError,
    RunnerConfigError,
    SessionTurn,
)

KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAIServer]:
    async with open_fake_openai_server() as srv:
        yield srv


@pytest.fixture
async def runner(server: FakeOpenAIServer) -> AsyncIterator[OpenAIRunner]:
    r = OpenAIRunner(base_url=server.base_url, model="fake-model", api_key=KEY)
    try:
        yield r
    finally:
        await r.aclose()


async def run_expecting_error(runner: OpenAIRunner, rec: Recorder, **ctx: Any) -> RunError:
    with pytest.raises(RunError) as info:
        await runner.run(rec.ctx(**ctx))
    return info.value


def assert_no_key(*things: Any) -> None:
    for thing in things:
        if isinstance(thing, BaseException):
            text = "".join(traceback.format_exception(thing))
        else:
            text = repr(thing)
        assert KEY not in text


# ------------------------------------------------------------------ streaming and result


async def test_streams_coalesced_output_and_returns_full_text(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    text = " ".join(f"word{i}" for i in range(40))
    server.enqueue(Reply(text=text, token_delay_s=0.01))
    rec = Recorder()
    result = await runner.run(rec.ctx("say forty words"))

    assert result == text
    assert rec.text == text
    # 40 tokens over ~0.4 s with a 50 ms window: a handful of output calls, not 40.
    assert 2 <= len(rec.outputs) <= 15, rec.outputs
    assert all(rec.outputs)


async def test_output_is_flushed_by_the_timer_while_the_stream_is_quiet(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    # Two tokens, then silence: they must still reach subscribers within ~50 ms.
    server.enqueue(Reply(text="first second third", stall_after=2))
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run, rec.ctx())
        await rec.wait_output(lambda text: text == "first second", timeout=3)
        nursery.cancel_scope.cancel()


async def test_usage_and_timing_metrics(server: FakeOpenAIServer, runner: OpenAIRunner) -> None:
    server.enqueue(
        Reply(
            text="a b c",
            first_token_delay_s=0.1,
            usage={"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
            model="fake-model-2025",
        )
    )
    rec = Recorder()
    ctx = rec.ctx()
    await runner.run(ctx)

    m = ctx.metrics
    assert m["model"] == "fake-model-2025"  # what the server says it ran
    assert (m["prompt_tokens"], m["completion_tokens"], m["total_tokens"]) == (11, 3, 14)
    assert m["finish_reason"] == "stop"
    assert 0.1 <= m["time_to_first_token_s"] <= m["duration_s"]
    assert server.requests[0].json["stream_options"] == {"include_usage": True}


async def test_no_usage_requested_when_disabled(server: FakeOpenAIServer) -> None:
    async with OpenAIRunner(base_url=server.base_url, model="m", include_usage=False) as r:
        ctx = Recorder().ctx()
        assert await r.run(ctx) == Reply().text
    assert "stream_options" not in server.requests[0].json
    assert "prompt_tokens" not in ctx.metrics
    assert "authorization" not in server.requests[0].headers  # no key configured: none sent


async def test_request_body_and_headers(server: FakeOpenAIServer) -> None:
    r = OpenAIRunner(
        base_url=server.base_url + "/",
        model="m1",
        api_key=KEY,
        system_prompt="You are terse.",
        temperature=0.2,
        max_tokens=64,
        extra_headers={"X-Title": "agentjobs-tests"},
        extra_body={"top_k": 5},
    )
    async with r:
        await r.run(Recorder().ctx("What is 2+2?"))
    req = server.requests[0]
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["x-title"] == "agentjobs-tests"
    body = req.json
    assert body["model"] == "m1"
    assert body["stream"] is True
    assert body["temperature"] == 0.2
    assert body["max_tokens"] == 64
    assert body["top_k"] == 5
    assert "top_p" not in body
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ]


async def test_a_server_ignoring_stream_true_is_understood(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    body = (
        b'{"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"plain"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":2,"completion_tokens":1,'
        b'"total_tokens":3}}'
    )
    server.enqueue(Reply(body=body, content_type="application/json"))
    rec = Recorder()
    ctx = rec.ctx()
    assert await runner.run(ctx) == "plain"
    assert rec.text == "plain"
    assert ctx.metrics["total_tokens"] == 3


# ------------------------------------------------------------------ run config overrides


async def test_allowed_overrides_are_applied(server: FakeOpenAIServer) -> None:
    r = OpenAIRunner(
        base_url=server.base_url,
        model="base",
        temperature=0.7,
        allow_config_overrides={"model", "temperature", "max_tokens"},
        allowed_models={"base", "big"},
        max_tokens_limit=100,
    )
    async with r:
        ctx = Recorder().ctx(config={"model": "big", "temperature": 0, "max_tokens": 50})
        await r.run(ctx)
    body = server.requests[0].json
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("big", 0, 50)
    assert ctx.metrics["model"] == "big"


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"model": "other"}, "does not allow overriding 'model'"),
        ({"system_prompt": "be evil"}, "does not allow overriding 'system_prompt'"),
        ({"temperature": 5}, "config.temperature: must be between 0 and 2"),
        ({"temperature": "hot"}, "config.temperature: expected a number"),
        ({"max_tokens": 10_000}, "exceeds this runner's limit of 1000"),
        ({"max_tokens": 0}, "config.max_tokens: must be >= 1"),
        ({"stop": [1, 2]}, "config.stop: expected a string or a list"),
    ],
)
async def test_disallowed_or_invalid_overrides_fail_without_a_request(
    server: FakeOpenAIServer, config: dict[str, Any], fragment: str
) -> None:
    async with OpenAIRunner(base_url=server.base_url, model="m", max_tokens_limit=1000) as r:
        err = await run_expecting_error(r, Recorder(), config=config)
        with pytest.raises(RunError):
            r.validate_run_config(config)
    assert fragment in err.message
    assert not err.retryable
    assert server.requests == []


async def test_model_override_outside_allowed_models(server: FakeOpenAIServer) -> None:
    r = OpenAIRunner(
        base_url=server.base_url,
        model="a",
        allow_config_overrides={"model"},
        allowed_models={"a", "b"},
    )
    err = await run_expecting_error(r, Recorder(), config={"model": "c"})
    assert "model 'c' is not allowed (allowed: a, b)" in err.message


# ------------------------------------------------------------------ HTTP errors


async def test_429_is_retryable_with_retry_after(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    server.enqueue(
        Reply(status=429, headers={"Retry-After": "7"}, error="Rate limit reached for requests")
    )
    err = await run_expecting_error(runner, Recorder())
    assert err.retryable
    assert err.retry_after == 7.0
    assert "429 Too Many Requests: Rate limit reached for requests" in err.message
    assert "(retryable, retry after 7 s)" in err.message


async def test_retry_after_ms_and_http_date(server: FakeOpenAIServer, runner: OpenAIRunner) -> None:
    server.enqueue(Reply(status=429, headers={"retry-after-ms": "1500", "Retry-After": "9"}))
    err = await run_expecting_error(runner, Recorder())
    assert err.retry_after == 1.5

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.enqueue(Reply(status=503, headers={"Retry-After": when}))
    err = await run_expecting_error(runner, Recorder())
    assert err.retryable
    assert err.retry_after is not None and 25 <= err.retry_after <= 31


async def test_500_is_retryable(server: FakeOpenAIServer, runner: OpenAIRunner) -> None:
    server.enqueue(Reply(status=500, error="The server had an error", error_type="server_error"))
    err = await run_expecting_error(runner, Recorder())
    assert err.retryable
    assert err.retry_after is None
    assert "500 Internal Server Error: The server had an error" in err.message


async def test_400_fails_with_the_servers_message(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    server.enqueue(
        Reply(
            status=400,
            error="This model's maximum context length is 8192 tokens.",
            error_code="context_length_exceeded",
        )
    )
    err = await run_expecting_error(runner, Recorder())
    assert not err.retryable
    assert "400 Bad Request" in err.message
    assert "maximum context length is 8192 tokens" in err.message
    assert "context_length_exceeded" in err.message


async def test_non_json_error_body(server: FakeOpenAIServer, runner: OpenAIRunner) -> None:
    server.enqueue(Reply(status=404, body=b"<html>no such route</html>", content_type="text/html"))
    err = await run_expecting_error(runner, Recorder())
    assert not err.retryable
    assert "404 Not Found: <html>no such route</html>" in err.message


async def test_broken_stream_is_retryable(server: FakeOpenAIServer, runner: OpenAIRunner) -> None:
    server.enqueue(Reply(text="one two three four", drop_after=2))
    rec = Recorder()
    err = await run_expecting_error(runner, rec)
    assert err.retryable
    assert "broke after" in err.message
    assert "incomplete chunked read" in err.message
    assert rec.text == "one two"  # what did arrive was streamed


async def test_stream_ending_without_done_is_retryable(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    server.enqueue(Reply(send_done=False))
    err = await run_expecting_error(runner, Recorder())
    assert err.retryable
    assert "without completing" in err.message


async def test_error_inside_the_stream(server: FakeOpenAIServer, runner: OpenAIRunner) -> None:
    server.enqueue(Reply(text="partial", mid_stream_error=f"backend crashed, key {KEY}"))
    err = await run_expecting_error(runner, Recorder())
    assert err.retryable
    assert "backend crashed" in err.message
    assert_no_key(err)


async def test_connection_refused_is_retryable() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with OpenAIRunner(base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=KEY) as r:
        err = await run_expecting_error(r, Recorder())
    assert err.retryable
    assert f"request to http://127.0.0.1:{port}/v1 failed" in err.message
    assert_no_key(err)


async def test_silence_beyond_timeout_is_a_retryable_error(server: FakeOpenAIServer) -> None:
    server.enqueue(Reply(stall_after=1))
    async with OpenAIRunner(base_url=server.base_url, model="m", timeout_s=0.3) as r:
        with trio.fail_after(5):
            err = await run_expecting_error(r, Recorder())
    assert err.retryable
    assert "timed out" in err.message
    req = server.requests[0]
    with trio.fail_after(2):
        await req.done.wait()
    assert req.disconnected


# ------------------------------------------------------------------ cancellation


async def test_cancel_mid_stream_closes_the_connection_at_once(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    server.enqueue(Reply(text=" ".join(["tok"] * 1000), token_delay_s=0.02))
    rec = Recorder()
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(runner.run, rec.ctx())
            await rec.wait_output(bool, timeout=3)
            cancelled_at = trio.current_time()
            scope.cancel()
    assert scope.cancelled_caught

    req = server.requests[0]
    with trio.fail_after(2):
        await req.done.wait()
    assert req.disconnected
    assert req.disconnected_at is not None
    assert req.disconnected_at - cancelled_at < 0.5
    assert req.chunks_sent < 1000


async def test_cancel_before_first_token(server: FakeOpenAIServer, runner: OpenAIRunner) -> None:
    server.enqueue(Reply(first_token_delay_s=30))
    with trio.move_on_after(0.2) as scope:
        await runner.run(Recorder().ctx())
    assert scope.cancelled_caught
    req = server.requests[0]
    with trio.fail_after(2):
        await req.done.wait()
    assert req.disconnected


# ------------------------------------------------------------------ chat sessions


async def test_session_history_is_sent_as_messages(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    runner.system_prompt = "sys"
    rec = Recorder(
        history=[
            SessionTurn("My name is Ada.", "Nice to meet you, Ada."),
            SessionTurn("failed turn", None),  # no result: not a conversation turn
            SessionTurn("Give me JSON", {"answer": 42}),
        ]
    )
    ctx = rec.ctx("What is my name?", session_id="sess-1")
    await runner.run(ctx)
    assert server.requests[0].messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada."},
        {"role": "user", "content": "Give me JSON"},
        {"role": "assistant", "content": '{"answer":42}'},
        {"role": "user", "content": "What is my name?"},
    ]
    assert ctx.metrics["history_turns"] == 2


async def test_session_history_bounds_drop_oldest_first(server: FakeOpenAIServer) -> None:
    turns = [SessionTurn(f"q{i}", f"a{i}" * 10) for i in range(10, 30)]  # 33 chars each
    by_turns = OpenAIRunner(base_url=server.base_url, model="m", history_max_turns=5)
    by_chars = OpenAIRunner(base_url=server.base_url, model="m", history_max_chars=100)
    for r in (by_turns, by_chars):
        async with r:
            await r.run(Recorder(history=turns).ctx("now", session_id="s"))

    def asked(i: int) -> list[Any]:
        return [m["content"] for m in server.requests[i].messages if m["role"] == "user"]

    assert asked(0) == ["q25", "q26", "q27", "q28", "q29", "now"]
    assert asked(1) == ["q27", "q28", "q29", "now"]  # 3 turns of 33 chars fit in 100


async def test_no_history_without_session_or_when_turned_off(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    rec = Recorder(history=[SessionTurn("old", "answer")])
    await runner.run(rec.ctx("no session"))
    await runner.run(rec.ctx("off", session_id="s", config={"use_session_history": False}))
    runner.use_session_history = False
    await runner.run(rec.ctx("operator off", session_id="s"))
    assert [len(r.messages) for r in server.requests] == [1, 1, 1]
    assert rec.history_calls == 0


# ------------------------------------------------------------------ secrets and config


async def test_api_key_never_leaks(
    server: FakeOpenAIServer, runner: OpenAIRunner, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    assert_no_key(runner, str(runner))
    server.enqueue(
        Reply(status=401, error=f"Incorrect API key provided: {KEY}.", error_code="invalid_api_key")
    )
    err = await run_expecting_error(runner, Recorder())
    assert not err.retryable
    assert "Incorrect API key provided: ***" in err.message
    server.enqueue(Reply(status=500, body=f"proxy error for {KEY}".encode()))
    err2 = await run_expecting_error(runner, Recorder())
    ctx = Recorder().ctx()
    await runner.run(ctx)
    assert_no_key(err, err2, ctx.metrics)
    assert KEY not in caplog.text


def test_constructor_validation() -> None:
    with pytest.raises(RunnerConfigError, match="base_url: expected an http"):
        OpenAIRunner(base_url="ftp://example.com/v1", model="m")
    with pytest.raises(RunnerConfigError, match="model: required"):
        OpenAIRunner(model=" ")
    with pytest.raises(RunnerConfigError, match="temperature: must be between 0 and 2"):
        OpenAIRunner(model="m", temperature=3)
    with pytest.raises(RunnerConfigError, match="allow_config_overrides: unknown key"):
        OpenAIRunner(model="m", allow_config_overrides={"api_key"})
    with pytest.raises(RunnerConfigError, match="timeout_s: must be > 0"):
        OpenAIRunner(model="m", timeout_s=0)
    creds = OpenAIRunner(base_url="https://user:pw@example.com/v1", model="m")
    assert "pw" not in repr(creds)


async def test_concurrent_runs_share_one_client_and_aclose_resets_it(
    server: FakeOpenAIServer, runner: OpenAIRunner
) -> None:
    server.default = Reply(text="x y z", token_delay_s=0.02)
    results: list[Any] = []

    async def one() -> None:
        results.append(await runner.run(Recorder().ctx()))

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(one)
    assert results == ["x y z"] * 5
    await runner.aclose()
    assert await runner.run(Recorder().ctx()) == "x y z"  # a fresh client after aclose
    assert server.errors == []
