"""The REST endpoints against a real server: answers, PraisonAI field names, every error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from live_server import (
    LiveServer,
    assert_problem,
    open_live_server,
    submit,
    wait_status,
    wait_until,
)

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
STATUS_KEYS = {
    "job_id",
    "status",
    "progress",
    "created_at",
    "started_at",
    "completed_at",
    "agent_id",
    "run_id",
    "session_id",
    "error",
    "retry_after",
}
RESULT_KEYS = {
    "job_id",
    "status",
    "result",
    "result_url",
    "metrics",
    "created_at",
    "started_at",
    "completed_at",
    "duration_seconds",
    "error",
}
SLOW = {"config": {"delay_s": 30}}


async def _result(client: httpx.AsyncClient, job_id: str, wait: float = 10) -> dict[str, Any]:
    r = await client.get(f"/api/v1/runs/{job_id}/result", params={"wait": wait})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


# -- submit, status, result ------------------------------------------------------------


async def test_submit_answers_202_with_location_and_praisonai_fields(
    live_server: LiveServer,
) -> None:
    r = await live_server.client.post("/api/v1/runs", json={"prompt": "hello"})
    assert r.status_code == 202
    body = r.json()
    assert set(body) >= {"job_id", "status", "created_at", "poll_url", "stream_url"}
    job_id = body["job_id"]
    assert re.fullmatch(r"run_[0-9a-f]{32}", job_id)
    assert body["status"] in ("queued", "running", "succeeded")
    assert ISO_Z.match(body["created_at"])
    # No public URL configured: relative links, never built from the Host header.
    assert r.headers["location"] == f"/api/v1/runs/{job_id}"
    assert body["poll_url"] == f"/api/v1/runs/{job_id}"
    assert body["stream_url"] == f"/api/v1/runs/{job_id}/stream"
    assert r.headers["retry-after"] == "2"
    assert "idempotent-replayed" not in r.headers
    result = await _result(live_server.client, job_id)
    assert set(result) >= RESULT_KEYS
    assert result["status"] == "succeeded"
    assert result["result"] == "hello"
    assert result["error"] is None
    assert isinstance(result["duration_seconds"], float)
    for key in ("created_at", "started_at", "completed_at"):
        assert ISO_Z.match(result[key]), result[key]


async def test_status_fields_and_retry_after_per_status(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        blocker = await submit(c, "block", config={"delay_s": 30, "steps": 3})
        queued = await submit(c, "wait", session_id="s1")
        await wait_status(c, blocker, "running")

        async def progress_reported() -> bool:  # written in the background, ~50 ms later
            body = (await c.get(f"/api/v1/runs/{blocker}")).json()
            return bool(body["progress"]["steps_total"])

        await wait_until(progress_reported, 5)
        running = (await c.get(f"/api/v1/runs/{blocker}")).json()
        assert set(running) >= STATUS_KEYS
        assert 1 <= running["retry_after"] <= 5
        assert ISO_Z.match(running["started_at"])
        assert running["completed_at"] is None
        assert running["progress"]["steps_total"] == 3
        assert running["progress"]["current_step"] == "step 1 of 3"
        q = (await c.get(f"/api/v1/runs/{queued}")).json()
        assert q["status"] == "queued"
        assert q["retry_after"] == 2
        assert q["session_id"] == "s1"
        assert q["started_at"] is None
        assert q["progress"] == {
            "percentage": 0.0,
            "current_step": None,
            "steps_completed": 0,
            "steps_total": None,
        }
        r = await c.post(f"/api/v1/runs/{blocker}/cancel")
        assert r.status_code == 200
        done = await wait_status(c, queued, "succeeded")
        assert done["retry_after"] is None
        assert done["progress"]["percentage"] == 100.0


async def test_result_409_until_finished_then_long_poll(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_wait=0.3) as srv:
        c = srv.client
        job = await submit(c, "later", config={"delay_s": 0.6})
        r = await c.get(f"/api/v1/runs/{job}/result")
        body = assert_problem(r, 409, "not-finished")
        assert body["detail"].startswith("Job is not complete. Current status: ")
        assert r.headers["retry-after"] in {"1", "2", "3", "4", "5"}
        # wait is capped at max_wait (0.3 s here), so a long wait still answers soon
        start = trio.current_time()
        r = await c.get(f"/api/v1/runs/{job}/result", params={"wait": 100})
        assert 0.2 <= trio.current_time() - start < 0.6
        if r.status_code == 409:
            await wait_status(c, job, "succeeded")
            r = await c.get(f"/api/v1/runs/{job}/result", params={"wait": 0.3})
        assert r.status_code == 200
        assert r.json()["result"] == "later"


async def test_result_long_poll_returns_as_soon_as_the_run_finishes(
    live_server: LiveServer,
) -> None:
    c = live_server.client
    job = await submit(c, "soon", config={"delay_s": 0.3})
    start = trio.current_time()
    r = await c.get(f"/api/v1/runs/{job}/result", params={"wait": 20})
    assert r.status_code == 200
    assert trio.current_time() - start < 5
    assert r.json()["result"] == "soon"


@pytest.mark.parametrize("wait", ["-1", "soon", "nan", "inf"])
async def test_result_rejects_a_bad_wait(live_server: LiveServer, wait: str) -> None:
    job = await submit(live_server.client)
    r = await live_server.client.get(f"/api/v1/runs/{job}/result", params={"wait": wait})
    body = assert_problem(r, 400, "invalid-parameter")
    assert body["errors"][0]["field"] == "wait"


async def test_result_is_200_for_failed_and_cancelled_runs(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        failed = await submit(c, "x", config={"fail": "it broke\non two lines"})
        body = await _result(c, failed)
        assert body["status"] == "failed"
        assert body["error"] == "it broke\non two lines"
        assert body["result"] is None
        blocker = await submit(c, "block", **SLOW)
        queued = await submit(c, "never")
        assert (await c.post(f"/api/v1/runs/{queued}/cancel")).status_code == 200
        body = await _result(c, queued)
        assert body["status"] == "cancelled"
        assert body["started_at"] is None
        assert body["duration_seconds"] is None
        await c.post(f"/api/v1/runs/{blocker}/cancel")


async def test_timeout_fails_the_run(live_server: LiveServer) -> None:
    job = await submit(live_server.client, "slow", timeout=0.2, config={"delay_s": 5})
    body = await _result(live_server.client, job)
    assert body["status"] == "failed"
    assert "timed out" in body["error"]
    assert body["error_kind"] == "timeout"


async def test_unknown_run_is_404_on_every_run_endpoint(live_server: LiveServer) -> None:
    c = live_server.client
    missing = "run_" + "0" * 32
    for method, path in [
        ("GET", ""),
        ("GET", "/result"),
        ("GET", "/stream"),
        ("GET", "/events"),
        ("POST", "/cancel"),
        ("DELETE", ""),
    ]:
        r = await c.request(method, f"/api/v1/runs/{missing}{path}")
        body = assert_problem(r, 404, "not-found")
        assert body["detail"] == f"Job not found: {missing}"


# -- validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": 1}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": "x", "sesion_id": "typo"}, "sesion_id"),
        ({"prompt": "x", "timeout": 0}, "timeout"),
        ({"prompt": "x", "timeout": -5}, "timeout"),
        ({"prompt": "x", "timeout": "5"}, "timeout"),
        ({"prompt": "x", "ttl": 0}, "ttl"),
        ({"prompt": "x", "priority": True}, "priority"),
        ({"prompt": "x", "priority": 1.5}, "priority"),
        ({"prompt": "x", "max_attempts": 0}, "max_attempts"),
        ({"prompt": "x", "max_attempts": 101}, "max_attempts"),
        ({"prompt": "x", "config": [1, 2]}, "config"),
        ({"prompt": "x", "config": "a=b"}, "config"),
        ({"prompt": "x", "session_id": 7}, "session_id"),
        ({"prompt": "x", "session_id": ""}, "session_id"),
        ({"prompt": "x", "runner": "nope"}, "runner"),
        ({"prompt": "x", "webhook_url": "ftp://example.com/x"}, "webhook_url"),
        ({"prompt": "x", "webhook_url": "not a url"}, "webhook_url"),
        ({"prompt": "x", "idempotency_key": ""}, "idempotency_key"),
        ({"prompt": "x", "idempotency_key": "a" * 256}, "idempotency_key"),
        ({"prompt": "x", "idempotency_key": "line\nbreak"}, "idempotency_key"),
        ({"prompt": "x", "idempotency_key": "caf\u00e9"}, "idempotency_key"),
        ([{"prompt": "x"}], "$"),
        ("just a string", "$"),
    ],
)
async def test_invalid_submits_are_422_naming_the_field(
    live_server: LiveServer, body: Any, field: str
) -> None:
    r = await live_server.client.post("/api/v1/runs", json=body)
    problem = assert_problem(r, 422, "validation-error")
    assert field in [e["field"] for e in problem["errors"]], problem
    assert field in problem["detail"]


async def test_every_unknown_field_is_named(live_server: LiveServer) -> None:
    r = await live_server.client.post("/api/v1/runs", json={"prompt": "x", "foo": 1, "bar": 2})
    problem = assert_problem(r, 422, "validation-error")
    assert sorted(e["field"] for e in problem["errors"]) == ["bar", "foo"]


async def test_praisonai_fields_are_accepted_when_unset(live_server: LiveServer) -> None:
    body = {
        "prompt": "compatible",
        "agent_file": None,
        "agent_yaml": None,
        "framework": None,
        "recipe_name": None,
        "recipe_config": {},
        "idempotency_scope": "none",
        "config": {},
        "timeout": 3600,
        "session_id": None,
        "webhook_url": None,
        "idempotency_key": None,
    }
    r = await live_server.client.post("/api/v1/runs", json=body)
    assert r.status_code == 202, r.text
    assert (await _result(live_server.client, r.json()["job_id"]))["result"] == "compatible"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("agent_file", "agents.yaml"),
        ("agent_yaml", "roles: {}"),
        ("framework", "praisonai"),
        ("recipe_name", "summarise"),
        ("recipe_config", {"a": 1}),
        ("idempotency_scope", "global"),
    ],
)
async def test_praisonai_fields_with_values_are_refused_clearly(
    live_server: LiveServer, field: str, value: Any
) -> None:
    r = await live_server.client.post("/api/v1/runs", json={"prompt": "x", field: value})
    problem = assert_problem(r, 422, "unsupported-field")
    assert [e["field"] for e in problem["errors"]] == [field]
    assert field in problem["detail"]


async def test_malformed_json_is_400(live_server: LiveServer) -> None:
    for raw in (b'{"prompt": "x"', b"", b"\xff\xfe", b'{"prompt": "x"} trailing'):
        r = await live_server.client.post(
            "/api/v1/runs", content=raw, headers={"content-type": "application/json"}
        )
        assert_problem(r, 400, "malformed-json")


async def test_wrong_content_type_is_415(live_server: LiveServer) -> None:
    c = live_server.client
    r = await c.post("/api/v1/runs", data={"prompt": "x"})  # a form, as `curl -d` sends
    body = assert_problem(r, 415, "unsupported-media-type")
    assert "application/x-www-form-urlencoded" in body["detail"]
    r = await c.post("/api/v1/runs", content=b'{"prompt":"x"}')  # no content type at all
    assert_problem(r, 415, "unsupported-media-type")
    r = await c.post(
        "/api/v1/runs",
        content=b'{"prompt":"x"}',
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert r.status_code == 202


async def test_body_over_the_limit_is_413_before_parsing(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_body_bytes=1000) as srv:
        c = srv.client
        big = b'{"prompt": "' + b"x" * 2000 + b'"}'
        r = await c.post("/api/v1/runs", content=big, headers={"content-type": "application/json"})
        assert_problem(r, 413, "payload-too-large")

        async def chunks() -> Any:  # no Content-Length: the limit applies while reading
            yield b'{"prompt": "'
            for _ in range(20):
                yield b"y" * 100
            yield b'"}'

        r = await c.post(
            "/api/v1/runs", content=chunks(), headers={"content-type": "application/json"}
        )
        assert_problem(r, 413, "payload-too-large")
        # just under the limit is fine
        ok = b'{"prompt": "' + b"z" * 900 + b'"}'
        r = await c.post("/api/v1/runs", content=ok, headers={"content-type": "application/json"})
        assert r.status_code == 202
        assert srv.engine.stats()["runs"] == 1


async def test_prompt_over_the_limit_is_422(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_prompt_chars=10) as srv:
        r = await srv.client.post("/api/v1/runs", json={"prompt": "x" * 11})
        problem = assert_problem(r, 422, "validation-error")
        assert problem["errors"][0]["field"] == "prompt"
        assert "limit of 10" in problem["detail"]


async def test_queue_full_is_503_with_retry_after(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1, max_queue=1) as srv:
        c = srv.client
        blocker = await submit(c, "block", **SLOW)
        await wait_status(c, blocker, "running")
        await submit(c, "fills the queue")
        r = await c.post("/api/v1/runs", json={"prompt": "one too many"})
        assert_problem(r, 503, "queue-full")
        assert int(r.headers["retry-after"]) >= 1


async def test_storage_failure_is_503_and_records_nothing(live_server: LiveServer) -> None:
    journal = live_server.engine.journal

    def broken_write(fd: int, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    before = live_server.engine.stats()["runs"]
    saved = journal.hooks.write
    journal.hooks.write = broken_write
    try:
        r = await live_server.client.post("/api/v1/runs", json={"prompt": "x"})
    finally:
        journal.hooks.write = saved
    body = assert_problem(r, 503, "storage-unavailable")
    assert "No space left" in body["detail"]
    assert int(r.headers["retry-after"]) >= 1
    assert live_server.engine.stats()["runs"] == before
    assert (await live_server.client.post("/api/v1/runs", json={"prompt": "x"})).status_code == 202


async def test_routing_errors_are_problems(live_server: LiveServer) -> None:
    c = live_server.client
    assert_problem(await c.get("/api/v2/nothing"), 404, "route-not-found")
    r = await c.put("/api/v1/runs")
    assert_problem(r, 405, "method-not-allowed")
    assert "POST" in r.headers["allow"]


# -- idempotency -----------------------------------------------------------------------


async def test_idempotency_key_replays_the_original_run(live_server: LiveServer) -> None:
    c = live_server.client
    body = {"prompt": "Task", "timeout": 5}
    first = await c.post("/api/v1/runs", json=body, headers={"Idempotency-Key": "k-123"})
    assert first.status_code == 202
    assert "idempotent-replayed" not in first.headers
    job = first.json()["job_id"]
    await _result(c, job)
    # same body (5.0 == 5, an explicit null == absent): the original run, marked replayed
    again = await c.post(
        "/api/v1/runs",
        json={"prompt": "Task", "timeout": 5.0, "session_id": None},
        headers={"Idempotency-Key": "k-123"},
    )
    assert again.status_code == 202
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["location"] == f"/api/v1/runs/{job}"
    assert again.json()["job_id"] == job
    assert again.json()["status"] == "succeeded"
    # the body's idempotency_key is the same key
    body_key = await c.post("/api/v1/runs", json={**body, "idempotency_key": "k-123"})
    assert body_key.json()["job_id"] == job
    # different body, same key: refused
    r = await c.post("/api/v1/runs", json={"prompt": "Other"}, headers={"Idempotency-Key": "k-123"})
    problem = assert_problem(r, 422, "idempotency-conflict")
    assert problem["job_id"] == job
    # no key: a new run each time
    assert (await submit(c, "Task")) != (await submit(c, "Task"))
    assert live_server.engine.metrics.submitted_total == 3


async def test_header_key_wins_over_body_key(live_server: LiveServer) -> None:
    c = live_server.client
    a = await c.post(
        "/api/v1/runs",
        json={"prompt": "x", "idempotency_key": "body"},
        headers={"Idempotency-Key": "header"},
    )
    b = await c.post("/api/v1/runs", json={"prompt": "x"}, headers={"Idempotency-Key": "header"})
    assert b.headers["idempotent-replayed"] == "true"
    assert b.json()["job_id"] == a.json()["job_id"]
    c2 = await c.post("/api/v1/runs", json={"prompt": "x", "idempotency_key": "body"})
    assert "idempotent-replayed" not in c2.headers
    assert c2.json()["job_id"] != a.json()["job_id"]


async def test_concurrent_submits_with_one_key_make_one_run(live_server: LiveServer) -> None:
    c = live_server.client
    ids: list[str] = []

    async def one() -> None:
        r = await c.post("/api/v1/runs", json={"prompt": "once"}, headers={"Idempotency-Key": "k"})
        assert r.status_code == 202
        ids.append(r.json()["job_id"])

    async with trio.open_nursery() as nursery:
        for _ in range(20):
            nursery.start_soon(one)
    assert len(set(ids)) == 1
    assert live_server.engine.metrics.submitted_total == 1


async def test_invalid_idempotency_header_is_422(live_server: LiveServer) -> None:
    for key in ("", "k" * 256, "tab\there"):
        r = await live_server.client.post(
            "/api/v1/runs", json={"prompt": "x"}, headers={"Idempotency-Key": key}
        )
        problem = assert_problem(r, 422, "validation-error")
        assert problem["errors"][0]["field"] == "Idempotency-Key"


# -- list --------------------------------------------------------------------------------


async def test_list_newest_first_with_filters_and_pages(live_server: LiveServer) -> None:
    c = live_server.client
    ids = [await submit(c, f"p{i}", session_id="alpha" if i % 2 else "beta") for i in range(7)]
    failed = await submit(c, "f", config={"fail": True})
    await _result(c, failed)
    for job in ids:
        await _result(c, job)
    everything = list(reversed([*ids, failed]))

    body = (await c.get("/api/v1/runs")).json()
    assert [j["job_id"] for j in body["jobs"]] == everything
    assert body["total"] == 8
    assert body["page"] == 1
    assert body["page_size"] == 20
    assert body["next_cursor"] is None
    assert set(body["jobs"][0]) >= STATUS_KEYS

    # trailing slash works too (PraisonAI redirects; we answer)
    slash = (await c.get("/api/v1/runs/")).json()
    assert [j["job_id"] for j in slash["jobs"]] == everything

    alpha = (await c.get("/api/v1/runs", params={"session_id": "alpha"})).json()
    assert [j["job_id"] for j in alpha["jobs"]] == [i for i in everything if i in ids[1::2]]
    assert alpha["total"] == 3
    only_failed = (await c.get("/api/v1/runs", params={"status": "failed"})).json()
    assert [j["job_id"] for j in only_failed["jobs"]] == [failed]
    both = (
        await c.get("/api/v1/runs", params={"status": "succeeded", "session_id": "beta"})
    ).json()
    assert both["total"] == 4

    # PraisonAI's page / page_size (offset pages with a total)
    seen: list[str] = []
    for page in (1, 2, 3):
        body = (await c.get("/api/v1/runs", params={"page": page, "page_size": 3})).json()
        assert body["page"] == page
        assert body["page_size"] == 3
        assert body["total"] == 8
        seen += [j["job_id"] for j in body["jobs"]]
    assert seen == everything

    # cursor pages
    seen = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        body = (await c.get("/api/v1/runs", params=params)).json()
        seen += [j["job_id"] for j in body["jobs"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert body["page"] is None or body["page"] == 1
    assert seen == everything


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"status": "bogus"}, 400),
        ({"limit": "x"}, 400),
        ({"cursor": "not-a-cursor"}, 400),
        ({"page": 0}, 422),
        ({"page_size": 0}, 422),
        ({"page_size": 1001}, 422),
        ({"limit": 0}, 422),
        ({"limit": 5, "page_size": 6}, 400),
        ({"cursor": "5", "page": 2}, 400),
    ],
)
async def test_list_rejects_bad_parameters(
    live_server: LiveServer, params: dict[str, Any], status: int
) -> None:
    r = await live_server.client.get("/api/v1/runs", params=params)
    assert_problem(r, status, "invalid-parameter")


async def test_bad_status_filter_keeps_praisonai_message(live_server: LiveServer) -> None:
    r = await live_server.client.get("/api/v1/runs", params={"status": "bogus"})
    assert r.json()["detail"].startswith("Invalid status: bogus. Valid values: ")


# -- cancel and delete -------------------------------------------------------------------


async def test_cancel_queued_is_immediate_and_finished_is_409(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        blocker = await submit(c, "block", **SLOW)
        queued = await submit(c, "queued")
        r = await c.post(f"/api/v1/runs/{queued}/cancel")
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "cancelled"
        assert body["retry_after"] is None
        assert ISO_Z.match(body["completed_at"])
        r = await c.post(f"/api/v1/runs/{queued}/cancel")
        problem = assert_problem(r, 409, "already-finished")
        assert problem["detail"] == "Job is already complete. Status: cancelled"
        await c.post(f"/api/v1/runs/{blocker}/cancel")


async def test_cancel_running_waits_until_stopped(live_server: LiveServer) -> None:
    c = live_server.client
    job = await submit(c, "long", **SLOW)
    await wait_status(c, job, "running")
    start = trio.current_time()
    r = await c.post(f"/api/v1/runs/{job}/cancel")
    assert trio.current_time() - start < 5
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert live_server.engine.stats()["running"] == 0
    result = await _result(c, job)
    assert result["status"] == "cancelled"
    assert result["error"] == "cancelled by user"


async def test_delete_finished_only(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        running = await submit(c, "block", **SLOW)
        await wait_status(c, running, "running")
        queued = await submit(c, "queued")
        for job, status in ((running, "running"), (queued, "queued")):
            r = await c.delete(f"/api/v1/runs/{job}")
            problem = assert_problem(r, 409, "not-finished")
            assert status in problem["detail"]
        await c.post(f"/api/v1/runs/{running}/cancel")
        done = await _result(c, queued)
        assert done["status"] == "succeeded"
        r = await c.delete(f"/api/v1/runs/{queued}")
        assert r.status_code == 204
        assert r.content == b""
        assert_problem(await c.get(f"/api/v1/runs/{queued}"), 404, "not-found")
        assert_problem(await c.delete(f"/api/v1/runs/{queued}"), 404, "not-found")
        listed = (await c.get("/api/v1/runs")).json()
        assert [j["job_id"] for j in listed["jobs"]] == [running]


async def test_delete_frees_the_idempotency_key(live_server: LiveServer) -> None:
    c = live_server.client
    h = {"Idempotency-Key": "reuse-me"}
    first = (await c.post("/api/v1/runs", json={"prompt": "a"}, headers=h)).json()["job_id"]
    await _result(c, first)
    assert (await c.delete(f"/api/v1/runs/{first}")).status_code == 204
    again = await c.post("/api/v1/runs", json={"prompt": "a"}, headers=h)
    assert "idempotent-replayed" not in again.headers
    assert again.json()["job_id"] != first


# -- links -------------------------------------------------------------------------------


async def test_links_use_the_public_url_never_the_host_header(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, public_url="https://jobs.example.com/base") as srv:
        r = await srv.client.post(
            "/api/v1/runs", json={"prompt": "x"}, headers={"Host": "evil.example:9"}
        )
        job = r.json()["job_id"]
        assert r.headers["location"] == f"https://jobs.example.com/base/api/v1/runs/{job}"
        assert r.json()["stream_url"] == f"https://jobs.example.com/base/api/v1/runs/{job}/stream"
        assert "evil" not in r.text


# -- events page -------------------------------------------------------------------------


async def test_events_pages_match_the_stream_ids(live_server: LiveServer) -> None:
    c = live_server.client
    job = await submit(c, "a b c", config={"delay_s": 0.1, "steps": 2, "output": True})
    await _result(c, job)
    full = (await c.get(f"/api/v1/runs/{job}/events")).json()
    assert full["finished"] is True
    assert full["more"] is False
    names = [e["event"] for e in full["events"]]
    assert names[0] == "status"
    assert names[-3:] == ["status", "progress", "result"]
    assert full["events"][-1]["data"]["result"] == "a b c"
    ids = [e["id"] for e in full["events"]]
    assert full["next_after"] == ids[-1]
    # page through two at a time with `after`
    paged: list[str] = []
    after = "0"
    while True:
        page = (
            await c.get(f"/api/v1/runs/{job}/events", params={"after": after, "limit": 2})
        ).json()
        paged += [e["id"] for e in page["events"]]
        after = page["next_after"]
        if not page["more"]:
            break
    assert paged == ids
    assert_problem(
        await c.get(f"/api/v1/runs/{job}/events", params={"after": "x"}), 400, "invalid-parameter"
    )


# -- service endpoints -------------------------------------------------------------------


async def test_health_keeps_praisonai_shape(live_server: LiveServer) -> None:
    r = await live_server.client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "healthy"
    assert set(body["executor_stats"]) >= {
        "running_jobs",
        "max_concurrent",
        "default_timeout",
        "shutdown",
    }
    assert body["durability"] == "os"
    assert body["default_runner"] == "echo"


async def test_stats_works(live_server: LiveServer) -> None:
    await _result(live_server.client, await submit(live_server.client))
    body = (await live_server.client.get("/stats")).json()
    assert body["submitted_total"] == 1
    assert body["finished_total"] == {"succeeded": 1}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in metrics")


async def test_metrics_in_prometheus_text(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_concurrency=1) as srv:
        c = srv.client
        await _result(c, await submit(c, "one"))
        await _result(c, await submit(c, "two", config={"fail": True}))
        blocker = await submit(c, "block", **SLOW)
        await wait_status(c, blocker, "running")
        await submit(c, "queued")
        r = await c.get("/metrics")
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.text
        assert _metric(text, "agentjobs_queue_depth") == 1
        assert _metric(text, "agentjobs_running") == 1
        assert _metric(text, "agentjobs_runs_submitted_total") == 4
        assert _metric(text, 'agentjobs_runs_finished_total{status="succeeded"}') == 1
        assert _metric(text, 'agentjobs_runs_finished_total{status="failed"}') == 1
        assert _metric(text, "agentjobs_queue_wait_seconds_count") == 3
        assert _metric(text, 'agentjobs_queue_wait_seconds_bucket{le="+Inf"}') == 3
        assert _metric(text, "agentjobs_run_duration_seconds_count") == 2
        assert "# TYPE agentjobs_run_duration_seconds histogram" in text
        # every sample line is `name{labels} value`
        for line in text.splitlines():
            if not line.startswith("#"):
                assert re.fullmatch(r'[a-z_]+(\{[a-z_]+="[^"]*"\})? [0-9.e+-]+', line), line
        await c.post(f"/api/v1/runs/{blocker}/cancel")


async def test_engine_closed_is_503(live_server: LiveServer) -> None:
    live_server.engine.accepting = False  # what the engine does while it stops
    try:
        r = await live_server.client.post("/api/v1/runs", json={"prompt": "x"})
    finally:
        live_server.engine.accepting = True
    assert_problem(r, 503, "shutting-down")
    assert r.headers["retry-after"] == "5"
