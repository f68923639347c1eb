"""CORS: off by default, preflights answered before auth, headers on every allowed answer."""

from __future__ import annotations

from pathlib import Path

import pytest
from live_server import assert_problem, open_live_server

from agentjobs.http.cors import CorsPolicy
from agentjobs.http.settings import SettingsError, resolve

KEY = "alice-key-0123456789abcdef"
APP = "https://app.example.com"
RUNS = "/api/v1/runs"


def _preflight(origin: str, method: str = "POST", headers: str = "") -> dict[str, str]:
    out = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        out["Access-Control-Request-Headers"] = headers
    return out


async def test_cors_off_preflight_is_not_401_and_grants_nothing(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, api_keys=f"alice:{KEY}") as srv:
        c = srv.client
        r = await c.options(RUNS, headers=_preflight(APP, "POST", "authorization,content-type"))
        assert r.status_code == 200  # quart's automatic OPTIONS answer, not auth's 401
        assert "access-control-allow-origin" not in r.headers
        r = await c.get(RUNS, headers={"Origin": APP, "X-API-Key": KEY})
        assert r.status_code == 200
        assert "access-control-allow-origin" not in r.headers


async def test_preflight_before_auth_and_headers_on_every_answer(tmp_path: Path) -> None:
    origins = f"{APP}, https://b.example:8443"
    async with open_live_server(
        tmp_path, api_keys=f"alice:{KEY}", cors_origins=origins, max_body_bytes=1000
    ) as srv:
        c = srv.client
        asked = "Authorization, Content-Type, Idempotency-Key, X-API-Key, Last-Event-ID"
        for path in (RUNS, f"{RUNS}/run_x/stream", "/metrics"):
            r = await c.options(path, headers=_preflight(APP, "POST", asked))
            assert r.status_code == 204, r.text
            assert r.headers["access-control-allow-origin"] == APP
            allowed = {
                h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")
            }
            assert allowed >= {h.strip().lower() for h in asked.split(",")}
            assert {"GET", "POST", "DELETE"} <= set(
                r.headers["access-control-allow-methods"].replace(" ", "").split(",")
            )
            assert "origin" in r.headers["vary"].lower()
            assert "access-control-allow-credentials" not in r.headers
        r = await c.options(RUNS, headers=_preflight("https://b.example:8443", "DELETE"))
        assert r.headers["access-control-allow-origin"] == "https://b.example:8443"

        # refused preflights: another origin, a method or header we do not take
        for headers, needle in [
            (_preflight("https://evil.example"), "origin 'https://evil.example'"),
            (_preflight("https://b.example"), "origin"),  # the port is part of the origin
            (_preflight("null"), "origin"),
            (_preflight(APP, "PUT"), "method 'PUT'"),
            (_preflight(APP, "GET", "x-secret-header"), "x-secret-header"),
        ]:
            r = await c.options(RUNS, headers=headers)
            body = assert_problem(r, 403, "cors-rejected")
            assert needle in body["detail"]
            assert "access-control-allow-origin" not in r.headers

        # actual requests: refusals are readable by the page too (401, 413, 429 ...)
        r = await c.get(RUNS, headers={"Origin": APP})
        assert_problem(r, 401, "unauthorized")
        assert r.headers["access-control-allow-origin"] == APP
        exposed = {h.strip() for h in r.headers["access-control-expose-headers"].split(",")}
        assert exposed >= {"Location", "Retry-After", "Idempotent-Replayed"}
        big = await c.post(
            RUNS,
            content=b"x" * 5000,
            headers={"Origin": APP, "X-API-Key": KEY, "Content-Type": "application/json"},
        )
        assert_problem(big, 413, "payload-too-large")
        assert big.headers["access-control-allow-origin"] == APP
        ok = await c.post(
            RUNS,
            json={"prompt": "hi"},
            headers={"Origin": APP, "Authorization": f"Bearer {KEY}", "Idempotency-Key": "k"},
        )
        assert ok.status_code == 202
        assert ok.headers["access-control-allow-origin"] == APP
        assert ok.headers["vary"] == "Origin"
        job = ok.json()["job_id"]
        async with c.stream(
            "GET", f"{RUNS}/{job}/stream", headers={"Origin": APP, "X-API-Key": KEY}
        ) as s:
            assert s.status_code == 200
            assert s.headers["access-control-allow-origin"] == APP
            await s.aread()
        # another origin: served (CORS is enforced by browsers) but granted nothing
        other = await c.get(RUNS, headers={"Origin": "https://evil.example", "X-API-Key": KEY})
        assert other.status_code == 200
        assert "access-control-allow-origin" not in other.headers
        assert other.headers["vary"] == "Origin"


async def test_any_origin(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, api_keys=f"alice:{KEY}", cors_origins="*") as srv:
        r = await srv.client.options(RUNS, headers=_preflight("https://anyone.example"))
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "*"
        r = await srv.client.get(RUNS, headers={"Origin": "http://x.test:3000", "X-API-Key": KEY})
        assert r.headers["access-control-allow-origin"] == "*"
        assert "access-control-allow-credentials" not in r.headers


def test_origin_settings() -> None:
    policy = CorsPolicy.parse("HTTPS://App.Example.com:443,http://localhost:3000")
    assert policy is not None
    assert policy.allows("https://app.example.com")
    assert policy.allows("http://localhost:3000")
    assert not policy.allows("http://localhost:3001")
    assert not policy.allows("http://app.example.com")
    assert CorsPolicy.parse("") is None
    for bad, needle in [
        ("*,https://a.example", "do not combine"),
        ("app.example.com", "is not an origin"),
        ("https://a.example/path", "without path"),
    ]:
        with pytest.raises(SettingsError, match=needle):
            resolve({"cors_origins": bad}, {})
    assert resolve({}, {"AGENTJOBS_CORS_ORIGINS": APP}).cors_policy() == CorsPolicy(
        frozenset({APP})
    )


async def test_plain_options_needs_no_key_only_on_existing_routes(tmp_path: Path) -> None:
    async with open_live_server(tmp_path, api_keys=f"alice:{KEY}") as srv:
        r = await srv.client.options(f"{RUNS}/run_x")
        assert r.status_code == 200 and "DELETE" in r.headers["allow"]
        assert_problem(await srv.client.options("/secret/path"), 401, "unauthorized")
