"""Per-tenant abuse limits against the real server: 429 + Retry-After, 413, and nothing
recorded by a refused request (so nothing accepted is ever lost to a limit)."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

import httpx
import pytest
import trio
from live_server import assert_problem, open_live_server, wait_status, wait_until

from agentjobs.http.quotas import LimitExceeded, StreamSlots, SubmitRate
from agentjobs.http.settings import SettingsError, resolve

KEY_A = "alice-key-0123456789abcdef"
KEY_B = "bob-key-fedcba9876543210xx"
KEYS = f"alice:{KEY_A},bob:{KEY_B}"
RUNS = "/api/v1/runs"
SLOW = {"delay_s": 30}


def _assert_429(r: httpx.Response, limit: str) -> int:
    body = assert_problem(r, 429, "rate-limited")
    assert body["limit"] == limit
    retry_after = int(r.headers["retry-after"])
    assert retry_after >= 1
    return retry_after


# -- the mechanisms, with a fake clock -----------------------------------------------------


def test_token_bucket_retry_after_comes_from_the_bucket() -> None:
    now = [100.0]
    rate = SubmitRate(0.5, 2, clock=lambda: now[0])
    rate.take("a")
    rate.take("a")
    with pytest.raises(LimitExceeded) as info:
        rate.take("a")
    assert info.value.retry_after == 2  # a whole token takes 1 / 0.5 s
    rate.take("b")  # buckets are per tenant
    now[0] += 1.5  # 0.75 of a token
    with pytest.raises(LimitExceeded) as info:
        rate.take("a")
    assert info.value.retry_after == 1  # ceil(0.25 / 0.5)
    now[0] += 0.5
    rate.take("a")
    now[0] += 1000  # never more than the burst
    rate.take("a")
    rate.take("a")
    with pytest.raises(LimitExceeded):
        rate.take("a")


def test_a_stream_slot_comes_back_even_if_its_body_never_ran() -> None:
    slots = StreamSlots(1)
    slot = slots.acquire("a")
    with pytest.raises(LimitExceeded):
        slots.acquire("a")
    assert slots.acquire("b") is not None

    class Body:
        pass

    body = Body()
    slot.bind(body)
    del body
    gc.collect()
    assert slots.open_count("a") == 0
    slot.release()  # idempotent: closing after collection does not go negative
    assert slots.open_count("a") == 0
    slots.acquire("a")


def test_limit_settings() -> None:
    s = resolve(
        {"tenant_rate": "2.5"},
        {"AGENTJOBS_TENANT_MAX_QUEUED": "10", "AGENTJOBS_TENANT_MAX_STREAMS": "0"},
    )
    assert (s.tenant_rate, s.submit_burst, s.tenant_max_queued) == (2.5, 3, 10)
    assert s.tenant_max_streams is None  # 0: no limit
    assert resolve({"tenant_rate": "5", "tenant_burst": "1"}, {}).submit_burst == 1
    with pytest.raises(SettingsError, match="--tenant-burst: needs --tenant-rate"):
        resolve({"tenant_burst": "3"}, {})
    with pytest.raises(SettingsError, match="--tenant-rate"):
        resolve({"tenant_rate": "-1"}, {})
    assert resolve({"max_prompt_chars": "10"}, {}).engine_config().max_prompt_chars == 10


# -- against the real server ---------------------------------------------------------------


async def test_submit_rate_per_tenant(tmp_path: Path) -> None:
    async with (
        open_live_server(tmp_path, api_keys=KEYS, tenant_rate=1.0, tenant_burst=2) as srv,
        srv.client_for(KEY_A) as a,
        srv.client_for(KEY_B) as b,
    ):
        assert (await a.post(RUNS, json={"prompt": "1"})).status_code == 202
        assert (await a.post(RUNS, json={"prompt": "2"})).status_code == 202
        before = set(srv.engine.state.runs)
        refused = await a.post(RUNS, json={"prompt": "3"}, headers={"Idempotency-Key": "k3"})
        assert _assert_429(refused, "submit-rate") == 1
        # nothing was submitted (runs 1 and 2 may still be writing their own events)
        assert set(srv.engine.state.runs) == before
        assert (await b.post(RUNS, json={"prompt": "b"})).status_code == 202  # own bucket
        await trio.sleep(1.05)
        again = await a.post(RUNS, json={"prompt": "3"}, headers={"Idempotency-Key": "k3"})
        assert again.status_code == 202
        assert "idempotent-replayed" not in again.headers  # the refusal recorded nothing
        assert (await a.get(RUNS)).json()["total"] == 3
        metrics = (await a.get("/metrics")).text
        assert 'agentjobs_http_rejected_total{reason="submit-rate"} 1' in metrics


async def test_queued_runs_per_tenant(tmp_path: Path) -> None:
    async with (
        open_live_server(tmp_path, api_keys=KEYS, tenant_max_queued=2, max_concurrency=1) as srv,
        srv.client_for(KEY_A) as a,
        srv.client_for(KEY_B) as b,
    ):
        key = {"Idempotency-Key": "first"}
        first = await a.post(RUNS, json={"prompt": "1", "config": SLOW}, headers=key)
        running = first.json()["job_id"]
        await wait_status(a, running, "running")
        queued = (await a.post(RUNS, json={"prompt": "2"})).json()["job_id"]
        before = set(srv.engine.state.runs)
        _assert_429(await a.post(RUNS, json={"prompt": "3"}), "tenant-queue")
        assert set(srv.engine.state.runs) == before  # the running run still writes progress
        # a replay creates nothing, so the limit does not stand in its way
        replay = await a.post(RUNS, json={"prompt": "1", "config": SLOW}, headers=key)
        assert replay.status_code == 202 and replay.json()["job_id"] == running
        # the other tenant has its own allowance
        assert (await b.post(RUNS, json={"prompt": "b"})).status_code == 202
        # a place frees when a run ends
        assert (await a.post(f"{RUNS}/{queued}/cancel")).status_code == 200
        assert (await a.post(RUNS, json={"prompt": "4"})).status_code == 202
        _assert_429(await a.post(RUNS, json={"prompt": "5"}), "tenant-queue")
        await a.post(f"{RUNS}/{running}/cancel")


@pytest.mark.parametrize("how", ["single", "batch"])
async def test_a_submit_whose_earlier_run_is_being_deleted_needs_a_place(
    tmp_path: Path, how: str
) -> None:
    """The quota asks the engine whether a submit creates a run (`Engine.new_runs`): a
    key whose run's `deleted` is written but not yet applied replays nothing, so the
    submit needs a place like any new run. (Deciding "replay" from the state alone let
    it through without one.)"""
    async with open_live_server(
        tmp_path, tenant_max_queued=1, durability="fsync", max_concurrency=1
    ) as srv:
        c = srv.client
        key = {"Idempotency-Key": "k"}
        old = (await c.post(RUNS, json={"prompt": "k"}, headers=key)).json()["job_id"]
        await wait_status(c, old, "succeeded")
        slow = (await c.post(RUNS, json={"prompt": "slow", "config": SLOW})).json()["job_id"]
        journal = srv.engine.journal
        real = journal.hooks.fsync
        holding = threading.Event()
        release = threading.Event()

        def held(fd: int) -> None:
            holding.set()
            release.wait(30)
            real(fd)

        answers: list[httpx.Response] = []
        answered = trio.Event()

        async def submit_again() -> None:
            if how == "single":
                answers.append(await c.post(RUNS, json={"prompt": "k"}, headers=key))
            else:
                item = {"prompt": "k", "idempotency_key": "k"}
                answers.append(await c.post(RUNS + "/batch", json={"runs": [item]}))
            answered.set()

        journal.hooks.fsync = held
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(c.delete, f"{RUNS}/{old}")
                await trio.to_thread.run_sync(holding.wait, 30)  # written, not applied
                nursery.start_soon(submit_again)
                with trio.move_on_after(10):  # a 429 comes at once; a run waits for the disk
                    await answered.wait()
                journal.hooks.fsync = real
                release.set()
        finally:
            journal.hooks.fsync = real
            release.set()
        _assert_429(answers[0], "tenant-queue")
        assert [r.id for r in srv.engine.list().runs] == [slow]
        await c.post(f"{RUNS}/{slow}/cancel")


async def test_concurrent_submits_cannot_slip_past_the_queue_limit(tmp_path: Path) -> None:
    # fsync: every submit waits for the disk, so all twelve are in flight at once
    async with open_live_server(tmp_path, tenant_max_queued=3, durability="fsync") as srv:
        codes: list[int] = []

        async def one(i: int) -> None:
            r = await srv.client.post(RUNS, json={"prompt": f"{i}", "config": SLOW})
            codes.append(r.status_code)

        async with trio.open_nursery() as n:
            for i in range(12):
                n.start_soon(one, i)
        assert sorted(codes) == [202] * 3 + [429] * 9
        assert srv.engine.count() == 3
        for run in srv.engine.list(limit=10).runs:
            await srv.client.post(f"{RUNS}/{run.id}/cancel")


async def test_open_streams_per_tenant(tmp_path: Path) -> None:
    async with (
        open_live_server(tmp_path, api_keys=KEYS, tenant_max_streams=1) as srv,
        srv.client_for(KEY_A) as a,
        srv.client_for(KEY_B) as b,
    ):
        job_a = (await a.post(RUNS, json={"prompt": "a", "config": SLOW})).json()["job_id"]
        job_b = (await b.post(RUNS, json={"prompt": "b", "config": SLOW})).json()["job_id"]
        async with a.stream("GET", f"{RUNS}/{job_a}/stream") as first:
            assert first.status_code == 200
            second = await a.get(f"{RUNS}/{job_a}/stream")
            assert _assert_429(second, "tenant-streams") >= 1
            # the other tenant is not affected
            async with b.stream("GET", f"{RUNS}/{job_b}/stream") as other:
                assert other.status_code == 200
            # a finished run's "nothing more" answer (204) and 404s take no slot
            assert (await a.get(f"{RUNS}/run_{'0' * 32}/stream")).status_code == 404
        # closing the stream gives the slot back
        await wait_until(lambda: srv.running.engine.stats()["subscribers"] == 0)
        await a.post(f"{RUNS}/{job_a}/cancel")
        r = await a.get(f"{RUNS}/{job_a}/stream")
        assert r.status_code == 200 and "event: cancelled" in r.text
        await b.post(f"{RUNS}/{job_b}/cancel")


async def test_body_and_prompt_size(tmp_path: Path) -> None:
    async with open_live_server(
        tmp_path, api_keys=KEYS, max_body_bytes=2000, max_prompt_chars=100
    ) as srv:
        async with srv.client_for(KEY_A) as a:
            before = srv.engine.journal.last_seq
            r = await a.post(RUNS, json={"prompt": "x" * 3000})
            assert_problem(r, 413, "payload-too-large")
            r = await a.post(RUNS, json={"prompt": "x" * 101})
            body = assert_problem(r, 422, "validation-error")
            assert body["errors"][0]["field"] == "prompt"
            assert srv.engine.journal.last_seq == before
            assert (await a.post(RUNS, json={"prompt": "x" * 100})).status_code == 202
        # an anonymous oversized body is refused before auth is even considered
        r = await srv.client.post(RUNS, content=b"x" * 3000)
        assert_problem(r, 413, "payload-too-large")


async def test_a_retry_that_overtakes_its_original_is_a_replay_not_a_quota_refusal(
    tmp_path: Path,
) -> None:
    """A client whose answer was slow sends the same key again while the first submit is
    still being made durable: at the tenant's quota, the retry must wait for the original
    and replay it, not take a place of its own (and be refused 429 `tenant-queue`)."""
    async with open_live_server(
        tmp_path, tenant_max_queued=1, durability="fsync", max_concurrency=1
    ) as srv:
        journal = srv.engine.journal
        real = journal.hooks.fsync
        holding, release = threading.Event(), threading.Event()

        def held(fd: int) -> None:
            holding.set()
            release.wait(30)
            real(fd)

        answers: dict[str, httpx.Response] = {}
        body = {"prompt": "k", "config": {"delay_s": 5}}

        async def post(name: str) -> None:
            answers[name] = await srv.client.post(
                "/api/v1/runs", json=body, headers={"Idempotency-Key": "k"}
            )

        journal.hooks.fsync = held
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(post, "first")
                await trio.to_thread.run_sync(holding.wait, 30)  # first is being fsynced
                nursery.start_soon(post, "retry")
                await trio.sleep(0.5)  # the retry reaches the server meanwhile
                journal.hooks.fsync = real
                release.set()
        finally:
            journal.hooks.fsync = real
            release.set()
        first, retry = answers["first"], answers["retry"]
        assert first.status_code == 202, first.text
        assert retry.status_code == 202, retry.text
        assert retry.headers.get("Idempotent-Replayed") == "true"
        assert retry.json()["job_id"] == first.json()["job_id"]
        await srv.client.post(f"/api/v1/runs/{first.json()['job_id']}/cancel")
