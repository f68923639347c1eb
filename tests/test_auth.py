"""API keys: parsing, constant-time lookup, 401s, open endpoints, /metrics, bind refusal."""

from __future__ import annotations

import hmac
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from live_server import assert_problem, open_live_server, read_stream

from agentjobs.http.auth import KeyRing, parse_api_keys, presented_key
from agentjobs.http.settings import ServerSettings, SettingsError, resolve

KEY_A = "alice-key-0123456789abcdef"
KEY_A2 = "alice-rotated-key-00000000"
KEY_B = "bob-key-fedcba9876543210xx"
METRICS_KEY = "metrics-key-0123456789abcd"
KEYS = f"alice:{KEY_A},bob:{KEY_B},alice:{KEY_A2}"
RUNS = "/api/v1/runs"


# -- parsing and the key ring (no server) ----------------------------------------------


def test_keys_file_format_and_errors_name_the_line_not_the_key(tmp_path: Path) -> None:
    text = f"# keys\n\nalice:{KEY_A}\n  bob : {KEY_B}  \nalice:{KEY_A2}\n"
    keys = parse_api_keys(text, source="keys.txt", lines=True)
    assert [(k.tenant, k.key) for k in keys] == [
        ("alice", KEY_A),
        ("bob", KEY_B),
        ("alice", KEY_A2),
    ]
    assert KEY_A not in repr(keys)
    secret = "s3cret-s3cret-s3cret-s3cret"
    for text, message in [
        (f"# c\nalice:{KEY_A}\n{secret}\n", "keys.txt line 3 is not tenant:key"),
        (f"alice:{KEY_A}\nbob:\n", "keys.txt line 2 is not tenant:key"),
        ("carol:short\n", "keys.txt line 1: the key of tenant 'carol' is 5 characters"),
        (f"bad tenant:{secret}\n", "keys.txt line 1: tenant name must be"),
        (f"dave:{secret} x\n", "keys.txt line 1: the key of tenant 'dave' must be printable"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_api_keys(text, source="keys.txt", lines=True)
        assert message in str(info.value)
        assert secret not in str(info.value) and "short" not in str(info.value)
    with pytest.raises(ValueError, match=r"entry 2 is empty"):
        parse_api_keys(f"alice:{KEY_A},,bob:{KEY_B}", source="AGENTJOBS_API_KEYS", lines=False)
    with pytest.raises(ValueError, match="listed twice") as twice:
        KeyRing.build(parse_api_keys(f"a:{KEY_A},b:{KEY_A}", source="x", lines=False))
    assert KEY_A not in str(twice.value)
    with pytest.raises(ValueError, match="also an API key"):
        KeyRing.build(parse_api_keys(f"a:{KEY_A}", source="x", lines=False), KEY_A)


def test_settings_read_keys_from_the_variable_and_the_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"bob:{KEY_B}\n")
    env = {"AGENTJOBS_API_KEYS": f"alice:{KEY_A}", "AGENTJOBS_API_KEYS_FILE": str(keys_file)}
    settings = resolve({}, env)
    ring = settings.keyring()
    assert ring.tenants == ["alice", "bob"]
    assert KEY_A not in repr(settings) and KEY_B not in repr(settings)
    keys_file.write_text(f"bob:{KEY_B}\nnonsense\n")
    with pytest.raises(SettingsError, match=re.escape(f"API keys: {keys_file} line 2 is not")):
        resolve({}, env)
    with pytest.raises(SettingsError, match="cannot read"):
        resolve({"api_keys_file": str(tmp_path / "missing")}, {})


def test_lookup_compares_every_key_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing.build(parse_api_keys(KEYS, source="x", lines=False))
    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for presented, tenant in [(KEY_A, "alice"), (KEY_A2, "alice"), (KEY_B, "bob"), ("x", None)]:
        calls.clear()
        assert ring.tenant_for(presented) == tenant
        assert len(calls) == 3  # the first key matching still compares the other two


def test_which_header_counts() -> None:
    assert presented_key(f"Bearer {KEY_A}", None).key == KEY_A
    assert presented_key(f"bearer  {KEY_A} ", None).key == KEY_A
    assert presented_key(None, KEY_B).key == KEY_B
    # a Bearer header alone decides, even next to a right X-API-Key
    assert presented_key("Bearer wrong", KEY_B).key == "wrong"
    # another scheme (a proxy's Basic credentials) is not ours
    assert presented_key("Basic dXNlcjpwYXNz", KEY_B).key == KEY_B
    assert presented_key("Bearer ", None).problem is not None
    assert presented_key(None, " ").problem is not None
    assert presented_key(None, None, "q").source == "query"
    assert presented_key(None, KEY_B, "q").source == "x-api-key"


# -- against the real server ------------------------------------------------------------


def _assert_401(r: httpx.Response, *, invalid: bool) -> None:
    body = assert_problem(r, 401, "unauthorized")
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith("Bearer realm=")
    assert ('error="invalid_token"' in challenge) is invalid
    for key in (KEY_A, KEY_B, KEY_A2, METRICS_KEY):
        assert key not in r.text and key[:-1] not in r.text
    assert body["instance"] == r.request.url.path


async def test_wrong_or_missing_key_is_401_and_both_headers_work(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, api_keys=KEYS) as srv:
        c = srv.client
        job = "run_" + "0" * 32
        for method, path in [
            ("POST", RUNS),
            ("GET", RUNS),
            ("GET", f"{RUNS}/{job}"),
            ("GET", f"{RUNS}/{job}/result"),
            ("GET", f"{RUNS}/{job}/stream"),
            ("GET", f"{RUNS}/{job}/events"),
            ("GET", f"{RUNS}/{job}/webhooks"),
            ("POST", f"{RUNS}/{job}/webhooks/redeliver"),
            ("POST", f"{RUNS}/{job}/cancel"),
            ("DELETE", f"{RUNS}/{job}"),
            ("GET", "/no/such/route"),  # 401 before 404: routes are not probed anonymously
            ("GET", "/metrics"),
            ("GET", "/stats"),
        ]:
            _assert_401(await c.request(method, path, json={"prompt": "x"}), invalid=False)
            wrong = {"Authorization": f"Bearer {KEY_A}x"}
            _assert_401(await c.request(method, path, headers=wrong), invalid=True)
            _assert_401(
                await c.request(method, path, headers={"X-API-Key": KEY_B[:-1]}), invalid=True
            )
        # a wrong Bearer is not rescued by a right X-API-Key (documented)
        r = await c.get(RUNS, headers={"Authorization": "Bearer nope", "X-API-Key": KEY_A})
        _assert_401(r, invalid=True)
        _assert_401(await c.get(RUNS, headers={"Authorization": "Bearer"}), invalid=True)
        # the right key in either header, and every key of a tenant, work
        for headers in (
            {"Authorization": f"Bearer {KEY_A}"},
            {"X-API-Key": KEY_A2},
            {"Authorization": "Basic dXNlcjpwYXNz", "X-API-Key": KEY_A},
        ):
            r = await c.post(RUNS, json={"prompt": "hi"}, headers=headers)
            assert r.status_code == 202, r.text
        listing = (await c.get(RUNS, headers={"X-API-Key": KEY_A})).json()
        assert listing["total"] == 3  # one tenant, three submits through its two keys
        assert (await c.get(RUNS, headers={"X-API-Key": KEY_B})).json()["total"] == 0
        # /metrics and /stats: any API key when no metrics key is set
        assert (await c.get("/metrics", headers={"X-API-Key": KEY_B})).status_code == 200
        assert (await c.get("/stats", headers={"Authorization": f"Bearer {KEY_A}"})).is_success
        # /health and /openapi.json stay open; anonymous health has no server-wide figures
        health = await c.get("/health")
        assert health.status_code == 200
        assert set(health.json()) == {
            "status",
            "store",
            "executor_stats",
            "version",
            "uptime_seconds",
        }
        full = (await c.get("/health", headers={"X-API-Key": KEY_B})).json()
        assert full["runs"] == 3 and "by_status" in full
        assert (await c.get("/health", headers={"X-API-Key": "wrong"})).status_code == 200
        assert (await c.get("/openapi.json")).status_code == 200
        metrics = (await c.get("/metrics", headers={"X-API-Key": KEY_A})).text
        assert "alice" not in metrics and "bob" not in metrics  # no tenant labels
        assert re.search(r'agentjobs_http_rejected_total\{reason="unauthorized"\} [1-9]', metrics)


async def test_metrics_key_is_the_only_key_for_metrics(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, api_keys=KEYS, metrics_key=METRICS_KEY) as srv:
        c = srv.client
        for path in ("/metrics", "/stats"):
            ok = await c.get(path, headers={"Authorization": f"Bearer {METRICS_KEY}"})
            assert ok.status_code == 200
            assert (await c.get(path, headers={"X-API-Key": METRICS_KEY})).status_code == 200
            _assert_401(await c.get(path, headers={"X-API-Key": KEY_A}), invalid=True)
            _assert_401(await c.get(path), invalid=False)
        # the metrics key is not a tenant key
        _assert_401(await c.get(RUNS, headers={"X-API-Key": METRICS_KEY}), invalid=True)
        assert "by_status" in (await c.get("/health", headers={"X-API-Key": METRICS_KEY})).json()
        assert "by_status" not in (await c.get("/health", headers={"X-API-Key": KEY_A})).json()
    # a metrics key without API keys: the API is open, /metrics is not
    async with open_live_server(None, metrics_key=METRICS_KEY) as srv:
        assert (await srv.client.get(RUNS)).status_code == 200
        _assert_401(await srv.client.get("/metrics"), invalid=False)
        r = await srv.client.get("/metrics", headers={"X-API-Key": METRICS_KEY})
        assert r.status_code == 200


async def test_query_key_only_on_streams_and_only_when_enabled(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, api_keys=KEYS, sse_query_key=True) as srv:
        async with srv.client_for(KEY_A) as a:
            job = (await a.post(RUNS, json={"prompt": "q"})).json()["job_id"]
            await a.get(f"{RUNS}/{job}/result", params={"wait": 10})
        status, frames, _ = await read_stream(srv.client, job, params={"api_key": KEY_A})
        assert status == 200 and frames[-1].data["result"] == "q"
        r = await srv.client.get(f"{RUNS}/{job}/stream", params={"api_key": KEY_B})
        assert_problem(r, 404, "not-found")  # a valid key of another tenant
        _assert_401(
            await srv.client.get(f"{RUNS}/{job}/stream", params={"api_key": "x"}), invalid=True
        )
        # anywhere else the query key is refused, with a hint
        r = await srv.client.get(f"{RUNS}/{job}", params={"api_key": KEY_A})
        _assert_401(r, invalid=False)
        assert "--sse-query-key" in r.json()["detail"]
    async with open_live_server(tmp_path, api_keys=KEYS) as srv:
        r = await srv.client.get(f"{RUNS}/{job}/stream", params={"api_key": KEY_A})
        _assert_401(r, invalid=False)


# -- binding a non-loopback address -----------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTJOBS_")}
    env.update(extra)
    return env


def _serve(tmp_path: Path, *args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "agentjobs", "serve", "--port", "0"),
            *("--durability", "memory", "--data-dir", str(tmp_path), *args),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_non_loopback_without_keys_refuses_to_start(tmp_path: Path) -> None:
    for args, env in [
        (["--host", "0.0.0.0"], _env()),
        ([], _env(AGENTJOBS_HOST="::")),
        (["--host", "0.0.0.0", "--metrics-key", METRICS_KEY], _env()),  # not an API key
    ]:
        proc = _serve(tmp_path, *args, env=env)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 2, (args, out, err)
        assert "refusing to listen on" in err and "without API keys" in err
        assert "--insecure-no-auth" in err and "Traceback" not in err
    proc = _serve(tmp_path, "--api-keys-file", str(tmp_path / "nope"), env=_env())
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "--api-keys-file: cannot read" in err


def _listening_port(proc: subprocess.Popen[str]) -> tuple[int, list[str]]:
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("runs recovered:"):
            m = re.search(r"listening on http://[^ ]+:(\d+)", lines[0])
            assert m is not None, lines
            return int(m.group(1)), lines
    raise AssertionError(f"no start-up: {lines}")


def test_non_loopback_starts_with_keys_or_explicit_insecure_flag(tmp_path: Path) -> None:
    """Bound to 0.0.0.0, contacted only through 127.0.0.1, stopped at once."""
    for args, env, api_status in [
        (["--host", "0.0.0.0", "--insecure-no-auth"], _env(), 200),
        (["--host", "0.0.0.0"], _env(AGENTJOBS_INSECURE_NO_AUTH="1"), 200),
        (["--host", "0.0.0.0"], _env(AGENTJOBS_API_KEYS=f"alice:{KEY_A}"), 401),
    ]:
        proc = _serve(tmp_path, *args, env=env)
        try:
            port, lines = _listening_port(proc)
            base = f"http://127.0.0.1:{port}"
            assert httpx.get(base + "/health", timeout=5).status_code == 200
            assert httpx.get(base + RUNS, timeout=5).status_code == api_status
            fact = next(line for line in lines if line.startswith("auth: "))
            if api_status == 200:
                assert fact.startswith("auth: OFF on a non-loopback address")
            else:
                assert fact.startswith("auth: API keys (1 for 1 tenant)")
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                _, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        assert proc.returncode == 0, err
        assert ("without authentication" in err) is (api_status == 200)


def test_serve_refuses_exposed_settings_built_in_code() -> None:
    """Embedders calling `serve(settings)` get the same refusal as the command line."""
    with pytest.raises(SettingsError, match=r"refusing to listen on 10\.1\.2\.3"):
        ServerSettings(host="10.1.2.3").check()
    assert ServerSettings(host="localhost").check().enabled is False
    assert ServerSettings(host="::1").check().enabled is False
    assert ServerSettings(host="0.0.0.0", insecure_no_auth=True).check().enabled is False
    assert ServerSettings(host="0.0.0.0", api_keys=f"a:{KEY_A}").check().tenants == ["a"]


async def test_the_python_client_authenticates_and_is_isolated(tmp_path: Path) -> None:
    from agentjobs.client import AsyncClient, NotFound, Unauthorized
    from agentjobs.http.app import state_of

    async with (
        open_live_server(tmp_path, api_keys=KEYS, tenant_rate=2.0, tenant_burst=1) as srv,
        AsyncClient(srv.url, KEY_A) as alice,
        AsyncClient(srv.url, KEY_B) as bob,
        AsyncClient(srv.url, "", max_retries=0) as nobody,
    ):
        run = await alice.submit("hello")
        # over the rate: the client waits out Retry-After and resubmits with the same
        # Idempotency-Key; the refused attempt recorded nothing, so exactly one run
        second = await alice.submit("again")
        assert second.id != run.id
        assert (await alice.wait(second.id, 10)).result == "again"
        assert [ev.event async for ev in alice.stream(run.id)][-1] == "result"
        with pytest.raises(NotFound):
            await bob.get(run.id)
        with pytest.raises(Unauthorized):
            await nobody.get(run.id)
        assert srv.engine.count(tenant="alice") == 2
        assert state_of(srv.running.app).rejected["submit-rate"] == 1  # the 429 did happen
