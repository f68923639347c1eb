"""The SSE stream: PraisonAI's event names, valid JSON, exact resume, fan-out, liveness."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import trio
from live_server import (
    Frame,
    LiveServer,
    assert_problem,
    open_live_server,
    parse_sse,
    read_stream,
    submit,
    wait_status,
    wait_until,
)

MULTI = {"delay_s": 0.2, "steps": 4, "output": True}


async def _finished_run(c: httpx.AsyncClient, prompt: str = "one two three", **fields: Any) -> str:
    job = await submit(c, prompt, **fields)
    r = await c.get(f"/api/v1/runs/{job}/result", params={"wait": 20})
    assert r.status_code == 200
    return job


async def test_stream_replays_a_finished_run_with_praisonai_events(
    live_server: LiveServer,
) -> None:
    c = live_server.client
    job = await _finished_run(c, config=MULTI)
    async with c.stream("GET", f"/api/v1/runs/{job}/stream") as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        text = (await r.aread()).decode()
    assert text.startswith("retry: 3000\n")
    frames, _ = parse_sse(text)
    names = [f.event for f in frames]
    # the engine coalesces reports made within 50 ms, so the number of progress frames
    # varies between 1 and 4; everything else is fixed
    assert names[:3] == ["status", "status", "progress"]
    assert names[-3:] == ["status", "progress", "result"]
    # one output frame, among the progress frames (the engine flushes a pending output
    # before a pending progress report, so it may come just before the last progress)
    assert sorted(set(names[2:-3])) == ["output", "progress"]
    assert names.count("output") == 1
    assert [f.data["status"] for f in frames if f.event == "status"] == [
        "queued",
        "running",
        "succeeded",
    ]
    for f in frames:
        assert f.id is not None
        assert f.data["job_id"] == job
    progress = [f.data for f in frames if f.event == "progress"]
    percentages = [p["percentage"] for p in progress]
    assert percentages == sorted(percentages)
    assert percentages[-1] == 100.0
    assert set(percentages) <= {0.0, 25.0, 50.0, 75.0, 100.0}
    for p in progress:
        assert set(p) == {"percentage", "step", "steps_completed", "steps_total", "job_id"}
        assert p["steps_total"] == 4
    assert [f.data["text"] for f in frames if f.event == "output"] == ["one two three "]
    assert frames[-1].data["result"] == "one two three"
    # ids: the journal seq; the frames of one event end with the plain seq
    ids = [f.id for f in frames]
    assert len(set(ids)) == len(ids)
    last_seq = ids[-1]
    assert ids[-3:] == [f"{last_seq}.1", f"{last_seq}.2", last_seq]


@pytest.mark.parametrize("how", ["header", "query"])
async def test_resume_after_every_id_gives_exactly_the_rest(
    live_server: LiveServer, how: str
) -> None:
    c = live_server.client
    job = await _finished_run(c, config=MULTI)
    _, full, _ = await read_stream(c, job)
    assert len(full) >= 7
    for i, frame in enumerate(full):
        assert frame.id is not None
        if how == "header":
            status, rest, _ = await read_stream(c, job, headers={"Last-Event-ID": frame.id})
        else:
            status, rest, _ = await read_stream(c, job, params={"after": frame.id})
        if i == len(full) - 1:
            assert status == 204  # nothing left: EventSource stops reconnecting
            assert rest == []
        else:
            assert status == 200
            assert rest == full[i + 1 :], (frame.id, [f.id for f in rest])
    # `after=0` (and an empty Last-Event-ID) is the whole stream
    assert (await read_stream(c, job, params={"after": "0"}))[1] == full
    # the header wins over the query
    _, rest, _ = await read_stream(
        c, job, headers={"Last-Event-ID": full[5].id or ""}, params={"after": "0"}
    )
    assert rest == full[6:]


async def test_resume_while_live_loses_and_repeats_nothing(live_server: LiveServer) -> None:
    """Reconnect mid-run after every frame received so far; the pieces add up exactly."""
    c = live_server.client
    job = await submit(c, "a b c d", config={"delay_s": 1.0, "steps": 5, "output": True})
    got: list[Frame] = []
    last_id: str | None = None
    with trio.fail_after(20):
        while True:
            headers = {"Last-Event-ID": last_id} if last_id else {}
            async with c.stream("GET", f"/api/v1/runs/{job}/stream", headers=headers) as r:
                if r.status_code == 204:
                    break
                assert r.status_code == 200
                buf = ""
                async for chunk in r.aiter_text():
                    buf += chunk
                    if "\n\n" in buf:
                        frames, _ = parse_sse(buf[: buf.rindex("\n\n") + 2])
                        if frames:
                            got.extend(frames)
                            last_id = frames[-1].id
                            break  # hang up after the first frames and reconnect
            if got and got[-1].event == "result":
                break
    _, reference, _ = await read_stream(c, job)
    assert got == reference


@pytest.mark.parametrize(
    "result",
    [
        'line one\nline "two"\r\n\ttabbed \\ backslash \\n not a newline',
        "unicode: \u00e9\u00e8 \u4e2d\u6587 \U0001f600 \u2028 \u2029 \x00 \x1f",
        "x" * 5000 + "\n" + "y" * 5000,
        "data: fake frame\n\nevent: result\ndata: {}\n\n",
    ],
)
async def test_payloads_are_valid_json_and_never_truncated(
    live_server: LiveServer, result: str
) -> None:
    c = live_server.client
    job = await _finished_run(c, result, config={"output": True})
    async with c.stream("GET", f"/api/v1/runs/{job}/stream") as r:
        raw = (await r.aread()).decode()
    data_lines = [line for line in raw.split("\n") if line.startswith("data:")]
    for line in data_lines:
        orjson.loads(line[5:])  # every data line is JSON on its own
    frames, _ = parse_sse(raw)
    assert frames[-1].event == "result"
    assert frames[-1].data["result"] == result
    assert len([f for f in frames if f.event == "result"]) == 1


async def test_failed_and_cancelled_runs_end_with_their_event(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        failed = await _finished_run(c, "x", config={"fail": 'broken "badly"\nreally'})
        _, frames, _ = await read_stream(c, failed)
        assert [f.event for f in frames[-2:]] == ["status", "error"]
        assert frames[-2].data["status"] == "failed"
        assert frames[-1].data["error"] == 'broken "badly"\nreally'

        blocker = await submit(c, "block", config={"delay_s": 30})
        queued = await submit(c, "never runs")
        await c.post(f"/api/v1/runs/{queued}/cancel")
        _, frames, _ = await read_stream(c, queued)
        assert [f.event for f in frames] == ["status", "status", "cancelled"]
        assert frames[1].data["status"] == "cancelled"
        assert frames[2].data["message"] == "cancelled by user"
        await c.post(f"/api/v1/runs/{blocker}/cancel")


async def test_live_stream_sees_a_queued_cancel_at_once(tmp_path: Path) -> None:
    """PraisonAI bug 12: its stream noticed a cancelled queued job up to 5 s late."""
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        blocker = await submit(c, "block", config={"delay_s": 30})
        queued = await submit(c, "waiting")
        frames: list[Frame] = []

        async def watch() -> None:
            frames.extend((await read_stream(c, queued))[1])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.sleep(0.2)
            start = trio.current_time()
            await c.post(f"/api/v1/runs/{queued}/cancel")
            await wait_until(lambda: bool(frames), 1)
            assert trio.current_time() - start < 1
        assert frames[-1].event == "cancelled"
        await c.post(f"/api/v1/runs/{blocker}/cancel")


async def test_idle_stream_sends_keepalive_and_heartbeat(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1, sse_heartbeat=0.2) as srv:
        c = srv.client
        job = await submit(c, "quiet", config={"delay_s": 0.9})
        async with c.stream("GET", f"/api/v1/runs/{job}/stream") as r:
            text = (await r.aread()).decode()
        frames, comments = parse_sse(text)
        beats = [f for f in frames if f.event == "heartbeat"]
        assert len(beats) >= 2
        assert ": keepalive" in comments
        for beat in beats:
            assert beat.data["timestamp"].endswith("Z")
            assert beat.id is not None
        # a heartbeat repeats the last id, so resuming from it loses nothing
        real = [f for f in frames if f.event != "heartbeat"]
        for i, f in enumerate(frames):
            if f.event == "heartbeat":
                before = [g for g in frames[:i] if g.event != "heartbeat"]
                assert f.id == (before[-1].id if before else "0")
        assert real == (await read_stream(c, job))[1]


async def test_bad_last_event_id_is_400(live_server: LiveServer) -> None:
    job = await _finished_run(live_server.client)
    for bad in ("abc", "-1", "1.0", "1.2.3", "1e3"):
        r = await live_server.client.get(
            f"/api/v1/runs/{job}/stream", headers={"Last-Event-ID": bad}
        )
        assert_problem(r, 400, "invalid-parameter")


async def test_two_hundred_subscribers_all_get_every_event(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        blocker = await submit(c, "hold", config={"delay_s": 30})
        job = await submit(c, "w1 w2 w3 w4 w5", config=MULTI)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
        results: list[list[Frame]] = []
        async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=60) as many:

            async def subscriber() -> None:
                status, frames, _ = await read_stream(many, job)
                assert status == 200
                results.append(frames)

            async with trio.open_nursery() as nursery:
                for _ in range(200):
                    nursery.start_soon(subscriber)
                await wait_until(lambda: srv.engine.bus.subscriber_count == 200, 30)
                # every subscriber is attached before the run starts: all of it is live
                await c.post(f"/api/v1/runs/{blocker}/cancel")
        assert len(results) == 200
        reference = (await read_stream(c, job))[1]
        assert [f.event for f in reference][-1] == "result"
        for frames in results:
            assert frames == reference
        assert srv.engine.bus.subscriber_count == 0


async def test_client_disconnect_releases_the_subscription(tmp_path: Path) -> None:
    async with open_live_server(tmp_path) as srv:
        c = srv.client
        job = await submit(c, "long", config={"delay_s": 30})
        hub = srv.running.app.extensions["agentjobs"].hub
        async with c.stream("GET", f"/api/v1/runs/{job}/stream") as r:
            async for chunk in r.aiter_text():
                if "running" in chunk:
                    break
            assert hub.open_streams == 1
            assert srv.engine.bus.subscriber_count == 1
        await wait_until(lambda: not (hub.open_streams or srv.engine.bus.subscriber_count), 5)
        await c.post(f"/api/v1/runs/{job}/cancel")


async def test_server_shutdown_ends_streams_with_a_final_event(tmp_path: Path) -> None:
    frames: list[Frame] = []
    async with open_live_server(tmp_path, durability="os") as srv:
        c = srv.client
        job = await submit(c, "long", config={"delay_s": 30})
        await wait_status(c, job, "running")
        done = trio.Event()

        async def watch() -> None:
            frames.extend((await read_stream(c, job))[1])  # a complete read: no exception
            done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await wait_until(lambda: srv.engine.bus.subscriber_count == 1, 5)
            r = await c.get("/health")
            assert r.json()["open_streams"] == 1
            srv.running.stop.set()
            with trio.fail_after(5):
                await done.wait()
    assert frames[-1].event == "shutdown"
    assert frames[-1].id == frames[-2].id  # resuming from it continues after the last event
    assert "reconnect" in frames[-1].data["message"]


async def test_head_answers_at_once_without_streaming(live_server: LiveServer) -> None:
    c = live_server.client
    job = await submit(c, "long", config={"delay_s": 30})
    with trio.fail_after(5):
        r = await c.head(f"/api/v1/runs/{job}/stream")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    await c.post(f"/api/v1/runs/{job}/cancel")
