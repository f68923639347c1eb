"""`POST /api/v1/runs/batch` against the real server (issue 9), and the client's
`submit_batch` (sync and async).

Items are independent; the batch as a whole (shape, size, content type, the header key,
auth, tenant rate and quota, queue capacity, storage) is refused with nothing written;
idempotency per item and per tenant; the new runs share one group commit.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import httpx
import trio
from live_server import LiveServer, ServerProcess, assert_problem, open_live_server

from agentjobs import Event, EventType
from agentjobs.client import AsyncClient, Client, IdempotencyConflict, ValidationError
from agentjobs.http.app import state_of

BATCH = "/api/v1/runs/batch"
RUNS = "/api/v1/runs"
PROBLEM = "https://agentjobs.dev/problems/"
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"


def _submitted_batches(srv: LiveServer) -> list[list[str]]:
    """Run ids of the `submitted` events of each committed batch, from now on."""
    seen: list[list[str]] = []

    def hook(events: Any) -> None:
        ids = [e.run for e in events if isinstance(e, Event) and e.type is EventType.SUBMITTED]
        if ids:
            seen.append(ids)

    srv.engine.add_commit_hook(hook)
    return seen


async def test_items_are_independent_and_share_one_commit(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, durability="fsync") as srv:
        c = srv.client
        earlier = (
            await c.post(RUNS, json={"prompt": "old"}, headers={"Idempotency-Key": "old"})
        ).json()["job_id"]
        batches = _submitted_batches(srv)
        fsyncs = srv.engine.journal.stats_fsyncs
        runs: list[Any] = [
            {"prompt": "one", "idempotency_key": "k1"},
            {"prompt": "two", "session_id": "s9", "config": {"delay_s": 0}},
            {"promt": "typo"},
            {"prompt": "one", "idempotency_key": "k1"},  # same key, same body: replay
            {"prompt": "ONE", "idempotency_key": "k1"},  # same key, other body: conflict
            {"prompt": "old", "idempotency_key": "old"},  # replay of an earlier submit
            {"prompt": "x", "agent_file": "a.yaml"},  # unsupported-field
            {"prompt": "x", "runner": "nope"},  # the engine's validation
            "just a string",
            {"prompt": "x", "webhook_url": "ftp://example.com/"},
        ]
        r = await c.post(BATCH, json={"runs": runs})
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "application/json"
        body = r.json()
        res = body["results"]
        assert [x["index"] for x in res] == list(range(len(runs)))
        assert [x["status"] for x in res] == [202, 202, 422, 202, 422, 202, 422, 422, 422, 422]
        assert (body["accepted"], body["rejected"]) == (4, 6)
        new = [res[0]["job_id"], res[1]["job_id"]]
        assert [res[0]["replayed"], res[1]["replayed"]] == [False, False]
        assert res[3]["job_id"] == new[0] and res[3]["replayed"] is True
        assert res[5]["job_id"] == earlier and res[5]["replayed"] is True
        for x in (res[0], res[1]):
            assert x["job_status"] == "queued" or x["job_status"] in ("running", "succeeded")
            assert x["poll_url"] == f"{RUNS}/{x['job_id']}"
            assert x["stream_url"] == f"{RUNS}/{x['job_id']}/stream"
            assert x["created_at"].endswith("Z")
        problems = {i: res[i]["problem"] for i in (2, 4, 6, 7, 8, 9)}
        assert problems[2]["type"] == PROBLEM + "validation-error"
        assert {e["field"] for e in problems[2]["errors"]} == {"prompt", "promt"}
        assert problems[4]["type"] == PROBLEM + "idempotency-conflict"
        assert problems[4]["job_id"] == new[0]
        assert problems[6]["type"] == PROBLEM + "unsupported-field"
        assert problems[7]["errors"][0]["field"] == "runner"
        assert problems[8]["errors"][0]["field"] == "$"
        assert problems[9]["errors"][0]["field"] == "webhook_url"
        for p in problems.values():
            assert p["status"] == 422 and isinstance(p["detail"], str) and p["detail"]
        # the two new runs: one group commit, one fsync
        assert batches[0] == new
        assert srv.engine.journal.stats_fsyncs - fsyncs >= 1
        for rid in new:
            got = await c.get(f"{RUNS}/{rid}")
            assert got.status_code == 200
        assert (await c.get(f"{RUNS}/{new[1]}")).json()["session_id"] == "s9"
        # a single submit afterwards sees a batch item's key
        again = await c.post(RUNS, json={"prompt": "one"}, headers={"Idempotency-Key": "k1"})
        assert again.json()["job_id"] == new[0]
        assert again.headers["idempotent-replayed"] == "true"


async def test_the_batch_as_a_whole_is_refused_with_nothing_written(tmp_path: Path) -> None:
    async with open_live_server(
        tmp_path, max_batch=3, max_batch_bytes=4096, max_body_bytes=1024
    ) as srv:
        c = srv.client
        one = {"prompt": "x"}
        json_ct = {"content-type": "application/json"}
        assert_problem(await c.post(BATCH, content=b"{", headers=json_ct), 400, "malformed-json")
        cases: list[tuple[Any, str]] = [
            ({}, "runs"),
            ({"runs": {"prompt": "x"}}, "runs"),
            ({"runs": []}, "runs"),
            ({"runs": [one] * 4}, "runs"),  # over --max-batch
            ({"runs": [one], "extra": 1}, "extra"),
            ([one], "$"),
        ]
        for doc, field in cases:
            body = assert_problem(await c.post(BATCH, json=doc), 422, "validation-error")
            assert body["errors"][0]["field"] == field, body
        body = assert_problem(
            await c.post(BATCH, json={"runs": [one]}, headers={"Idempotency-Key": "k"}),
            422,
            "validation-error",
        )
        assert body["errors"][0]["field"] == "Idempotency-Key"
        assert_problem(
            await c.post(BATCH, content=b"x", headers={"content-type": "text/plain"}),
            415,
            "unsupported-media-type",
        )
        big = {"runs": [{"prompt": "p" * 1500}, {"prompt": "q" * 1500}, {"prompt": "r" * 1500}]}
        body = assert_problem(await c.post(BATCH, json=big), 413, "payload-too-large")
        assert "4096" in body["detail"]
        assert srv.engine.count() == 0
        # over --max-body-bytes (1024) but within --max-batch-bytes: accepted
        fits = {"runs": [{"prompt": "p" * 1200}, {"prompt": "q" * 1200}]}
        r = await c.post(BATCH, json=fits)
        assert r.status_code == 200 and r.json()["accepted"] == 2
        # ... while a single submit keeps its own limit
        assert_problem(await c.post(RUNS, json={"prompt": "p" * 1200}), 413, "payload-too-large")
        # a GET on the path is no batch (and no run)
        assert (await c.get(BATCH)).status_code in (404, 405)


async def test_capacity_is_all_or_nothing(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, max_queue=3, max_concurrency=1) as srv:
        c = srv.client
        blocker = (await c.post(RUNS, json={"prompt": "b", "config": {"delay_s": 30}})).json()
        for _ in range(200):
            if srv.engine.stats()["running"] == 1:
                break
            await trio.sleep(0.01)
        waiting = await c.post(RUNS, json={"prompt": "w"})  # queued behind the blocker
        assert waiting.status_code == 202
        # 3 new runs fit in --max-queue 3 in general, not now (one place is taken)
        r = await c.post(BATCH, json={"runs": [{"prompt": f"q{i}"} for i in range(3)]})
        assert_problem(r, 503, "queue-full")
        assert int(r.headers["retry-after"]) >= 1
        assert srv.engine.count() == 2
        # 4 new runs never fit: a 422 naming `runs`, not a 503 to retry for ever
        r = await c.post(BATCH, json={"runs": [{"prompt": f"q{i}"} for i in range(4)]})
        problem = assert_problem(r, 422, "validation-error")
        assert "--max-queue 3" in str(problem)
        assert srv.engine.count() == 2
        r = await c.post(BATCH, json={"runs": [{"prompt": f"q{i}"} for i in range(2)]})
        assert r.status_code == 200 and r.json()["accepted"] == 2
        await c.post(f"{RUNS}/{blocker['job_id']}/cancel")


async def test_storage_failure_answers_503_and_applies_nothing(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, durability="fsync") as srv:
        journal = srv.engine.journal
        real = journal.hooks.fsync

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        journal.hooks.fsync = failing
        try:
            r = await srv.client.post(
                BATCH, json={"runs": [{"prompt": "a", "idempotency_key": "a"}, {"prompt": "b"}]}
            )
        finally:
            journal.hooks.fsync = real
        assert_problem(r, 503, "storage-unavailable")
        assert "retry-after" in r.headers
        assert srv.engine.count() == 0
        r = await srv.client.post(BATCH, json={"runs": [{"prompt": "a", "idempotency_key": "a"}]})
        assert r.status_code == 200 and r.json()["results"][0]["replayed"] is False


async def test_auth_tenants_rate_and_quota(tmp_path: Path) -> None:
    """A batch of N is N submits: N tokens of the tenant's bucket (one taken before the
    body is read, all N settled at once when counted) and N places of its quota, all or
    none; a batch that could never pass either is a 422 naming `runs`."""
    async with open_live_server(
        tmp_path,
        api_keys=f"a:{KEY_A},b:{KEY_B}",
        tenant_rate=0.001,  # no refill worth speaking of during the test
        tenant_burst=20,
        tenant_max_queued=6,
        max_concurrency=1,
    ) as srv:
        anon = await srv.client.post(BATCH, json={"runs": [{"prompt": "x"}]})
        assert_problem(anon, 401, "unauthorized")
        slow = {"config": {"delay_s": 30}}
        async with srv.client_for(KEY_A) as a, srv.client_for(KEY_B) as b:
            # over the burst: can never pass, so 422 (not a 429 to retry for ever); 19 left
            r = await a.post(BATCH, json={"runs": [{"prompt": "x"}] * 21})
            error = assert_problem(r, 422, "validation-error")["errors"][0]
            assert error["field"] == "runs" and "--tenant-burst 20" in error["message"]
            # 7 new runs > the quota of 6: can never pass either, so 422 too (its 7 tokens
            # are spent); 12 left. Replays take no place: 6 new + 1 replay would fit.
            r = await a.post(BATCH, json={"runs": [{"prompt": f"x{i}", **slow} for i in range(7)]})
            error = assert_problem(r, 422, "validation-error")["errors"][0]
            assert error["field"] == "runs" and "--tenant-max-queued 6" in error["message"]
            assert srv.engine.count(tenant="a") == 0
            r = await a.post(BATCH, json={"runs": [{"prompt": "z", **slow}]})
            assert r.status_code == 200 and r.json()["accepted"] == 1
            assert srv.engine.count(tenant="a") == 1  # 11 tokens left
            # 1 + 6 > 6 now, but not for ever: 429 (its 6 tokens are spent); 5 left
            r = await a.post(BATCH, json={"runs": [{"prompt": f"y{i}", **slow} for i in range(6)]})
            assert assert_problem(r, 429, "rate-limited")["limit"] == "tenant-queue"
            assert srv.engine.count(tenant="a") == 1
            # 6 items need 6 tokens, 5 are there: refused, spending none; 5 left
            r = await a.post(BATCH, json={"runs": [{"prompt": f"w{i}"} for i in range(6)]})
            assert assert_problem(r, 429, "rate-limited")["limit"] == "submit-rate"
            assert int(r.headers["retry-after"]) >= 1
            assert srv.engine.count(tenant="a") == 1
            r = await a.post(BATCH, json={"runs": [{"prompt": f"v{i}"} for i in range(5)]})
            assert r.status_code == 200 and r.json()["accepted"] == 5
            # tenant b has its own bucket and quota, and cannot see a's runs
            r = await b.post(BATCH, json={"runs": [{"prompt": f"b{i}", **slow} for i in range(6)]})
            assert r.status_code == 200 and r.json()["accepted"] == 6
            a_run = (await a.get(RUNS)).json()["jobs"][0]["job_id"]
            assert (await b.get(f"{RUNS}/{a_run}")).status_code == 404
            stats = (await a.get("/stats")).json()
            assert stats["rejected"]["submit-rate"] >= 1 and stats["rejected"]["tenant-queue"] >= 1


async def test_a_client_that_waits_retry_after_gets_its_batch_through(tmp_path: Path) -> None:
    """`Retry-After` on a batch refused by the submit rate is the wait until the whole
    batch fits: waiting exactly that long is enough (the bucket's clock is faked)."""
    async with open_live_server(tmp_path, tenant_rate=1.0, tenant_burst=10) as srv:
        rate = state_of(srv.running.app).submit_rate
        assert rate is not None
        now = [1000.0]
        rate.clock = lambda: now[0]
        for i in range(6):  # 4 tokens left
            assert (await srv.client.post(RUNS, json={"prompt": f"s{i}"})).status_code == 202
        body = {"runs": [{"prompt": f"b{i}"} for i in range(10)]}
        r = await srv.client.post(BATCH, json=body)
        assert assert_problem(r, 429, "rate-limited")["limit"] == "submit-rate"
        assert r.headers["retry-after"] == "6"  # 10 - 4 tokens at 1/s
        assert srv.engine.count() == 6
        now[0] += 6
        r = await srv.client.post(BATCH, json=body)
        assert r.status_code == 200 and r.json()["accepted"] == 10
        assert srv.engine.count() == 16


async def test_same_key_in_two_tenants_makes_two_runs(tmp_path: Path) -> None:
    async with (
        open_live_server(tmp_path, api_keys=f"a:{KEY_A},b:{KEY_B}") as srv,
        srv.client_for(KEY_A) as a,
        srv.client_for(KEY_B) as b,
    ):
        item = {"runs": [{"prompt": "k", "idempotency_key": "same"}]}
        ra = (await a.post(BATCH, json=item)).json()["results"][0]
        rb = (await b.post(BATCH, json=item)).json()["results"][0]
        assert ra["job_id"] != rb["job_id"]
        assert not ra["replayed"] and not rb["replayed"]
        again = (await a.post(BATCH, json=item)).json()["results"][0]
        assert again["job_id"] == ra["job_id"] and again["replayed"]


async def test_webhook_urls_are_screened_per_item(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, webhook_allow="127.0.0.1/32") as srv:
        r = await srv.client.post(
            BATCH,
            json={
                "runs": [
                    {"prompt": "a", "webhook_url": "http://127.0.0.1:9/hook"},
                    {"prompt": "b", "webhook_url": "http://10.0.0.1/hook"},
                    {"prompt": "c", "webhook_url": "http://10.0.0.1/hook"},
                    {"prompt": "d"},
                ]
            },
        )
        res = r.json()["results"]
        assert [x["status"] for x in res] == [202, 422, 422, 202]
        assert res[1]["problem"]["errors"][0]["field"] == "webhook_url"
        assert srv.engine.count() == 2


# -- the client ----------------------------------------------------------------------------


async def test_async_client_submit_batch(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as client:
        result = await client.submit_batch(
            ["plain prompt", {"prompt": "with options", "session_id": "s", "priority": 2}, {}]
        )
        assert len(result) == 3 and (result.accepted, result.rejected) == (2, 1)
        first, second, bad = result.items
        assert first.ok and first.run is not None and first.run.id.startswith("run_")
        assert first.run.poll_url is not None and first.run.poll_url.startswith("http://")
        assert second.run is not None and second.run.session_id is None  # not in the answer
        assert (await client.get(second.run.id)).session_id == "s"
        assert isinstance(bad.error, ValidationError) and bad.status == 422
        assert [r.id for r in result.runs] == [first.run.id, second.run.id]
        assert result.errors == [bad]
        try:
            result.raise_for_errors()
        except ValidationError as exc:
            assert exc is bad.error
        else:
            raise AssertionError("raise_for_errors did not raise")
        # keys given are kept; a resend is a replay, a changed body a conflict
        items = [{"prompt": "k", "idempotency_key": "client-k"}]
        one = await client.submit_batch(items)
        two = await client.submit_batch(items)
        assert one.runs[0].id == two.runs[0].id and two.runs[0].replayed
        three = await client.submit_batch([{"prompt": "other", "idempotency_key": "client-k"}])
        assert isinstance(three.items[0].error, IdempotencyConflict)
        done = await client.wait(first.run.id, timeout=30)
        assert done.result == "plain prompt"


def test_sync_client_submit_batch(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "data", "--durability", "os") as proc:
        with Client(proc.url) as client:
            result = client.submit_batch([f"p{i}" for i in range(50)])
            assert result.accepted == 50 and not result.errors
            assert len({r.id for r in result.runs}) == 50
            assert client.result(result.runs[-1].id, wait=30).result == "p49"
            try:
                client.submit_batch([])
            except ValidationError as exc:
                assert exc.status == 422 and "runs" in exc.detail
            else:
                raise AssertionError("an empty batch was not refused")
        assert httpx.get(proc.url + "/health").status_code == 200
