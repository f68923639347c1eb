"""Tenant isolation against the real server: two API keys, two tenants, every endpoint.

A tenant must not be able to tell another tenant's run from a run that does not exist: the
same 404 `not-found` everywhere, no trace in lists, totals or streams, and idempotency keys
that do not collide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from live_server import (
    WebhookReceiver,
    assert_problem,
    open_live_server,
    read_stream,
    wait_status,
)

KEY_A = "alice-key-0123456789abcdef"
KEY_B = "bob-key-fedcba9876543210xx"
KEYS = f"alice:{KEY_A},bob:{KEY_B}"
RUNS = "/api/v1/runs"


async def _submit(c: httpx.AsyncClient, prompt: str, **fields: Any) -> str:
    r = await c.post(RUNS, json={"prompt": prompt, **fields})
    assert r.status_code == 202, r.text
    job: str = r.json()["job_id"]
    return job


async def _not_found_everywhere(c: httpx.AsyncClient, job: str) -> None:
    """Every per-run endpoint answers exactly as for a run that never existed."""
    ghost = "run_" + "0" * 32
    for run_id in (job, ghost):
        answers = [
            await c.get(f"{RUNS}/{run_id}"),
            await c.get(f"{RUNS}/{run_id}/result"),
            await c.get(f"{RUNS}/{run_id}/result", params={"wait": 0.1}),
            await c.get(f"{RUNS}/{run_id}/stream"),
            await c.get(f"{RUNS}/{run_id}/events"),
            await c.get(f"{RUNS}/{run_id}/webhooks"),
            await c.post(f"{RUNS}/{run_id}/webhooks/redeliver"),
            await c.post(f"{RUNS}/{run_id}/cancel"),
            await c.delete(f"{RUNS}/{run_id}"),
        ]
        for r in answers:
            body = assert_problem(r, 404, "not-found")
            assert body["detail"] == f"Job not found: {run_id}", body
            assert set(body) == {"type", "title", "status", "detail", "instance", "job_id"}


async def test_each_tenant_sees_only_its_own_runs_in_every_endpoint(tmp_path: Path) -> None:
    hooks = WebhookReceiver()
    async with (
        open_live_server(
            tmp_path, api_keys=KEYS, webhook_allow="127.0.0.1/32", max_concurrency=2
        ) as srv,
        srv.client_for(KEY_A) as a,
        srv.client_for(KEY_B, header="x-api-key") as b,
    ):
        hook = hooks.url + "/h"
        done_a = await _submit(a, "alice's secret plan", session_id="s", webhook_url=hook)
        slow_a = await _submit(a, "alice slow", session_id="s", config={"delay_s": 30})
        done_b = await _submit(b, "bob's", session_id="s", webhook_url=hook)
        await wait_status(a, done_a, "succeeded")
        await wait_status(b, done_b, "succeeded")
        await wait_status(a, slow_a, "running")
        await trio.to_thread.run_sync(hooks.wait_for, 2)

        # the owner sees everything
        assert (await a.get(f"{RUNS}/{done_a}/result")).json()["result"] == ("alice's secret plan")
        status, frames, _ = await read_stream(a, done_a)
        assert status == 200 and frames[-1].event == "result"
        assert (await a.get(f"{RUNS}/{done_a}/events")).json()["events"]
        assert (await a.get(f"{RUNS}/{done_a}/webhooks")).json()["status"] == "delivered"

        # the other tenant: as if the runs did not exist
        await _not_found_everywhere(b, done_a)
        await _not_found_everywhere(b, slow_a)
        await _not_found_everywhere(a, done_b)

        # lists, filters and totals hold only the caller's runs
        for client, mine in ((a, {done_a, slow_a}), (b, {done_b})):
            for params in ({}, {"session_id": "s"}, {"page": 1, "page_size": 50}):
                listing = (await client.get(RUNS, params=params)).json()
                assert {j["job_id"] for j in listing["jobs"]} == mine
                assert listing["total"] == len(mine)
            listing = (await client.get(RUNS, params={"status": "succeeded"})).json()
            assert listing["total"] == 1
        # a cursor from one tenant's list does not reveal the other's runs either
        page = (await b.get(RUNS, params={"limit": 1, "cursor": "999999"})).json()
        assert [j["job_id"] for j in page["jobs"]] == [done_b]

        # the other tenant's cancel/delete/redeliver attempts changed nothing
        assert (await a.get(f"{RUNS}/{slow_a}")).json()["status"] == "running"
        assert (await a.get(f"{RUNS}/{done_a}/webhooks")).json()["attempts"] == 1
        # ...and the owner can still do all of it
        assert (await a.post(f"{RUNS}/{slow_a}/cancel")).status_code == 200
        assert (await a.post(f"{RUNS}/{done_a}/webhooks/redeliver")).status_code == 200
        await trio.to_thread.run_sync(hooks.wait_for, 3)
        assert (await a.delete(f"{RUNS}/{done_a}")).status_code == 204
        assert (await b.delete(f"{RUNS}/{done_b}")).status_code == 204
    hooks.close()


async def test_same_idempotency_key_in_two_tenants_makes_two_runs(tmp_path: Path) -> None:
    async with (
        open_live_server(tmp_path, api_keys=KEYS) as srv,
        srv.client_for(KEY_A) as a,
        srv.client_for(KEY_B) as b,
    ):
        key = {"Idempotency-Key": "order-4711"}
        ra = await a.post(RUNS, json={"prompt": "alice's order"}, headers=key)
        rb = await b.post(RUNS, json={"prompt": "bob's order"}, headers=key)
        assert ra.status_code == rb.status_code == 202
        assert "idempotent-replayed" not in rb.headers  # not alice's run
        job_a, job_b = ra.json()["job_id"], rb.json()["job_id"]
        assert job_a != job_b
        # within a tenant the key still works: a replay, and a conflict on another body
        again = await b.post(RUNS, json={"prompt": "bob's order"}, headers=key)
        assert again.headers["idempotent-replayed"] == "true"
        assert again.json()["job_id"] == job_b
        conflict = await b.post(RUNS, json={"prompt": "alice's order"}, headers=key)
        body = assert_problem(conflict, 422, "idempotency-conflict")
        assert body["job_id"] == job_b  # never the other tenant's run
        result_b = await b.get(f"{RUNS}/{job_b}/result", params={"wait": 10})
        assert result_b.json()["result"] == "bob's order"
        assert (await b.get(f"{RUNS}/{job_a}/result")).status_code == 404


async def test_runs_from_before_keys_were_set_belong_to_nobody(tmp_path: Path) -> None:
    """A server that ran without auth and restarts with keys: the old anonymous runs are
    not handed to whichever tenant asks first."""
    async with open_live_server(tmp_path) as srv:
        old = await _submit(srv.client, "from the open days")
        await wait_status(srv.client, old, "succeeded")
    async with open_live_server(tmp_path, api_keys=KEYS) as srv:
        async with srv.client_for(KEY_A) as a:
            await _not_found_everywhere(a, old)
            assert (await a.get(RUNS)).json()["total"] == 0
        assert srv.engine.get(old).status.value == "succeeded"  # still there, just not theirs
