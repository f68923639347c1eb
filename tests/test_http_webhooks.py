"""Webhooks over HTTP: the submit-time SSRF check, delivery, history and redelivery."""

from __future__ import annotations

from pathlib import Path

import trio
from live_server import (
    WebhookReceiver,
    assert_problem,
    open_live_server,
    submit,
    wait_status,
    wait_until,
)

from agentjobs.webhooks import generate_secret, verify


async def test_private_webhook_urls_are_refused_at_submit(tmp_path: Path) -> None:
    async with open_live_server(tmp_path) as srv:
        for url in ("http://127.0.0.1:9/hook", "http://10.1.2.3/hook", "http://[::1]/x"):
            r = await srv.client.post("/api/v1/runs", json={"prompt": "x", "webhook_url": url})
            problem = assert_problem(r, 422, "validation-error")
            assert problem["errors"][0]["field"] == "webhook_url"
            assert "--webhook-allow" in problem["detail"]
        assert srv.engine.stats()["runs"] == 0


async def test_delivery_history_and_redelivery(tmp_path: Path) -> None:
    secret = generate_secret()
    with WebhookReceiver() as hooks:
        async with open_live_server(
            tmp_path, webhook_allow="127.0.0.1/32", webhook_secret=secret, max_concurrency=1
        ) as srv:
            c = srv.client
            job = await submit(c, "hooked", webhook_url=hooks.url + "/done")
            first = (await trio.to_thread.run_sync(hooks.wait_for, 1))[0]
            payload = verify(first["body"], first["headers"], secret)
            assert payload["job_id"] == job
            assert payload["status"] == "succeeded"
            assert payload["result"] == "hooked"

            async def delivered() -> bool:
                body = (await c.get(f"/api/v1/runs/{job}/webhooks")).json()
                return bool(body["status"] == "delivered")

            await wait_until(delivered)
            history = (await c.get(f"/api/v1/runs/{job}/webhooks")).json()
            assert history["attempts"] == 1
            assert history["deliveries"][0]["status_code"] == 204
            assert history["webhook_id"] == first["headers"]["webhook-id"]

            r = await c.post(f"/api/v1/runs/{job}/webhooks/redeliver")
            assert r.status_code == 200
            assert r.json()["redeliveries"]
            second = (await trio.to_thread.run_sync(hooks.wait_for, 2))[1]
            assert second["headers"]["webhook-id"] == first["headers"]["webhook-id"]
            assert second["body"] == first["body"]

            # a run without a webhook, an unfinished run, an unknown run
            plain = await submit(c, "no hook")
            await wait_status(c, plain, "succeeded")
            assert (await c.get(f"/api/v1/runs/{plain}/webhooks")).json()["status"] == "none"
            r = await c.post(f"/api/v1/runs/{plain}/webhooks/redeliver")
            assert assert_problem(r, 422, "validation-error")["errors"][0]["field"] == (
                "webhook_url"
            )
            slow = await submit(c, "slow", webhook_url=hooks.url, config={"delay_s": 30})
            waiting = (await c.get(f"/api/v1/runs/{slow}/webhooks")).json()
            assert waiting["status"] == "waiting"
            assert_problem(
                await c.post(f"/api/v1/runs/{slow}/webhooks/redeliver"), 409, "not-finished"
            )
            missing = "run_" + "0" * 32
            assert_problem(await c.get(f"/api/v1/runs/{missing}/webhooks"), 404, "not-found")
            await c.post(f"/api/v1/runs/{slow}/cancel")
            # a cancel is a terminal state too: it is delivered (PraisonAI sent none)
            third = (await trio.to_thread.run_sync(hooks.wait_for, 3))[2]
            assert verify(third["body"], third["headers"], secret)["status"] == "cancelled"
            # the receiver has the body before the outbox has recorded its answer

            async def counted() -> bool:
                return "agentjobs_webhook_delivered_total 3" in (await c.get("/metrics")).text

            await wait_until(counted, 5)
