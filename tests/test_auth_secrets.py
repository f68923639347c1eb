"""No secret ends up in logs, the journal, answers or metrics.

One real `agentjobs -v serve` (debug logging and the access log on) with every kind of
secret configured: two tenants' API keys, a metrics key, a global and a per-tenant webhook
secret, an LLM key. A session of requests, many of them failing in the ways most likely to
echo a secret (wrong keys that differ from a real one by a character, an LLM endpoint that
puts the key in its error message, limits, bad bodies), then everything the server wrote
and answered is searched for every secret.
"""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import trio
from fakes.openai_server import Reply, open_fake_openai_server
from live_server import ServerProcess, WebhookReceiver

from agentjobs.webhooks import generate_secret, verify

KEY_A = "alice-key-Zq81mWc0XbT3sLp9"
KEY_B = "bob-key-Yt5nHq2KdV7rJe4uA"
METRICS_KEY = "metrics-key-Pw6cRu1NfG8hZ2"
LLM_KEY = "sk-llm-SECRET-9f8e7d6c5b4a"
RUNS = "/api/v1/runs"


async def test_no_secret_in_logs_journal_answers_or_metrics(tmp_path: Path) -> None:
    webhook_secret = generate_secret()
    alice_webhook_secret = generate_secret()
    (tmp_path / "hook-secrets").write_text(f"alice:{alice_webhook_secret}\n")
    hooks = WebhookReceiver()
    answers: list[str] = []

    def keep(r: httpx.Response) -> httpx.Response:
        answers.append(f"{r.status_code} {dict(r.headers)} {r.text}")
        return r

    async with open_fake_openai_server() as llm:
        (tmp_path / "runners.toml").write_text(
            'default = "echo"\n[runners.echo]\ntype = "echo"\n'
            f'[runners.llm]\ntype = "openai"\nbase_url = "{llm.base_url}"\nmodel = "m"\n'
            'api_key_env = "OPENAI_API_KEY"\n'
        )
        env = {
            "AGENTJOBS_API_KEYS": f"alice:{KEY_A},bob:{KEY_B}",
            "AGENTJOBS_METRICS_KEY": METRICS_KEY,
            "AGENTJOBS_WEBHOOK_SECRET": webhook_secret,
            "AGENTJOBS_WEBHOOK_SECRETS_FILE": str(tmp_path / "hook-secrets"),
            "AGENTJOBS_WEBHOOK_ALLOW": "127.0.0.1/32",
            "AGENTJOBS_TENANT_RATE": "0.2",
            "AGENTJOBS_TENANT_BURST": "6",
            "AGENTJOBS_TENANT_MAX_STREAMS": "1",
            "OPENAI_API_KEY": LLM_KEY,
        }
        args = ("--config", str(tmp_path / "runners.toml"), "--access-log", "--sse-query-key")
        proc = await trio.to_thread.run_sync(
            lambda: ServerProcess(tmp_path / "data", *args, env=env, pre_args=("-v",))
        )
        try:
            llm.enqueue(
                Reply(status=401, error=f"Incorrect API key provided: {LLM_KEY}.", error_code="x")
            )
            async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
                a = {"Authorization": f"Bearer {KEY_A}"}
                b = {"X-API-Key": KEY_B}
                # wrong, near-miss and malformed credentials
                for headers in (
                    {},
                    {"Authorization": f"Bearer {KEY_A}x"},
                    {"Authorization": f"Bearer {KEY_A[:-1]}"},
                    {"X-API-Key": f"{KEY_B}0"},
                    {"X-API-Key": KEY_B.upper()},
                    {"Authorization": f"Token {KEY_A}"},
                    {"X-API-Key": METRICS_KEY},
                ):
                    keep(await c.post(RUNS, json={"prompt": "x"}, headers=headers))
                    keep(await c.get(f"{RUNS}?api_key={KEY_A}x", headers=headers))
                keep(await c.get("/metrics", headers=a))
                keep(await c.get("/metrics", headers={"X-API-Key": METRICS_KEY[:-1]}))
                # work: an LLM run that fails with the key in the endpoint's error, one that
                # succeeds, echo runs with signed webhooks for both tenants
                failed = keep(
                    await c.post(RUNS, json={"prompt": "p", "runner": "llm"}, headers=a)
                ).json()["job_id"]
                ok = keep(
                    await c.post(RUNS, json={"prompt": "q", "runner": "llm"}, headers=a)
                ).json()["job_id"]
                hooked = []
                for headers in (a, b):
                    r = await c.post(
                        RUNS, json={"prompt": "h", "webhook_url": hooks.url}, headers=headers
                    )
                    hooked.append(keep(r).json()["job_id"])
                for job in (failed, ok, *hooked[:1]):
                    keep(await c.get(f"{RUNS}/{job}/result", params={"wait": 10}, headers=a))
                    keep(await c.get(f"{RUNS}/{job}/events", headers=a))
                    keep(await c.get(f"{RUNS}/{job}/stream", params={"api_key": KEY_A}))
                    keep(await c.get(f"{RUNS}/{job}/webhooks", headers=a))
                keep(await c.get(f"{RUNS}/{hooked[1]}/result", params={"wait": 10}, headers=b))
                assert "***" in (await c.get(f"{RUNS}/{failed}", headers=a)).json()["error"]
                deliveries = await trio.to_thread.run_sync(hooks.wait_for, 2)
                bodies = {
                    verify(d["body"], d["headers"], alice_webhook_secret)["job_id"]
                    for d in deliveries
                    if d["body"].find(hooked[0].encode()) >= 0
                }
                assert bodies == {hooked[0]}  # alice's signed with her own secret
                # limits and bad requests
                async with c.stream("GET", f"{RUNS}/{ok}/stream", headers=a):
                    pass
                slow = keep(
                    await c.post(RUNS, json={"prompt": "s", "config": {"delay_s": 5}}, headers=b)
                ).json()["job_id"]
                async with c.stream("GET", f"{RUNS}/{slow}/stream", headers=b) as s1:
                    assert s1.status_code == 200
                    r = keep(await c.get(f"{RUNS}/{slow}/stream", headers=b))
                    assert r.status_code == 429
                keep(await c.post(f"{RUNS}/{slow}/cancel", headers=b))
                for _ in range(25):
                    if keep(await c.post(RUNS, json={"prompt": "r"}, headers=b)).status_code == 429:
                        break
                else:
                    raise AssertionError("the submit rate never applied")
                keep(await c.post(RUNS, content=b"{" * 2_000_000, headers=a))
                keep(
                    await c.post(
                        RUNS, content=b"{nope", headers={**a, "content-type": "application/json"}
                    )
                )
                # a client's own value in a wrong place is echoed back to that client (not
                # kept in the answers below), but never logged or recorded
                await c.get(f"{RUNS}/{ok}/stream", params={"after": KEY_A}, headers=a)
                await c.get(f"{RUNS}/{ok}/stream", headers={**a, "Last-Event-ID": KEY_B})
                keep(await c.get("/metrics", headers={"X-API-Key": METRICS_KEY}))
                keep(await c.get("/stats", headers={"X-API-Key": METRICS_KEY}))
                keep(await c.get("/health", headers=a))
        finally:
            code = await trio.to_thread.run_sync(proc.terminate)
            hooks.close()
    assert code == 0, proc.output
    assert "401 for" in proc.output  # debug logging was really on
    assert " 202 " in proc.output or '" 202 ' in proc.output  # so was the access log

    journal = b"".join(p.read_bytes() for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert hooked[0].encode() in journal  # the journal was really read
    texts = {"log": proc.output, "answers": "\n".join(answers)}
    secrets = {
        "alice's key": KEY_A,
        "bob's key": KEY_B,
        "metrics key": METRICS_KEY,
        "LLM key": LLM_KEY,
        "webhook secret": webhook_secret,
        "alice's webhook secret": alice_webhook_secret,
    }
    for name, secret in list(secrets.items()):
        if secret.startswith("whsec_"):  # the key material itself, however encoded
            raw = base64.b64decode(secret.removeprefix("whsec_"))
            secrets[name + " (base64 body)"] = secret.removeprefix("whsec_")
            secrets[name + " (hex)"] = raw.hex()
    for name, secret in secrets.items():
        core = secret[2:-2]  # catches truncated and near-miss echoes too
        assert core.encode() not in journal, f"{name} is in the journal"
        for where, text in texts.items():
            assert core not in text, f"{name} is in the {where}"
            assert core.upper() not in text, f"{name} (upper case) is in the {where}"
