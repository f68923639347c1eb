"""docs/openapi.yaml is valid, served as is, and true: every answer matches it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import trio
import yaml
from live_server import LiveServer, WebhookReceiver, open_live_server, wait_status, wait_until
from openapi_spec_validator import validate

from agentjobs.http import openapi
from agentjobs.http.openapi_gen import MODULE, render_module

ROOT = Path(__file__).resolve().parents[1]
DOCS_SPEC = ROOT / "docs" / "openapi.yaml"


def _docs_spec() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(DOCS_SPEC.read_text(encoding="utf-8"))
    return data


def test_spec_is_valid_openapi() -> None:
    validate(_docs_spec())


def test_packaged_copy_is_the_docs_spec() -> None:
    """Fails when docs/openapi.yaml was edited without regenerating the package copy:
    run `python -m agentjobs.http.openapi_gen docs/openapi.yaml`."""
    assert openapi.spec() == _docs_spec()
    assert MODULE.read_text(encoding="utf-8") == render_module(_docs_spec())


async def test_served_spec_is_the_docs_spec(live_server: LiveServer) -> None:
    r = await live_server.client.get("/openapi.json")
    assert r.status_code == 200
    assert r.json() == _docs_spec()


class SpecChecker:
    """Validates responses against the spec and records which answers were seen."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.routes: list[tuple[re.Pattern[str], str]] = []
        for template in spec["paths"]:
            rx = re.escape(template).replace(r"\{job_id\}", "[^/]+")
            self.routes.append((re.compile(f"^{rx}$"), template))
        self.seen: set[tuple[str, str, str]] = set()

    def operation(self, method: str, path: str) -> tuple[str, dict[str, Any]]:
        for rx, template in self.routes:
            if rx.match(path):
                op = self.spec["paths"][template].get(method.lower())
                assert op is not None, f"{method} {template} is not in the spec"
                return template, op
        raise AssertionError(f"{path} is not in the spec")

    def schema_validator(self, schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
        root = {**schema, "components": self.spec["components"]}
        return jsonschema.Draft202012Validator(
            root, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
        )

    def check(self, r: httpx.Response) -> httpx.Response:
        method = r.request.method
        path = r.request.url.path.rstrip("/") or "/"
        template, op = self.operation(method, path)
        status = str(r.status_code)
        assert status in op["responses"], f"{method} {template} answered undocumented {status}"
        answer = op["responses"][status]
        if "$ref" in answer:
            answer = self.resolve(answer["$ref"])
        content = answer.get("content")
        if content is None:
            assert r.content == b"", f"{method} {template} {status} should have no body"
        else:
            ctype = r.headers["content-type"].split(";")[0]
            assert ctype in content, f"{method} {template} {status}: {ctype} not documented"
            if ctype.endswith("json"):
                self.schema_validator(content[ctype]["schema"]).validate(r.json())
        for name in answer.get("headers", {}):
            if name in ("Idempotent-Replayed",):
                continue  # only on replays
            assert name.lower() in r.headers, f"{method} {template} {status}: no {name} header"
        self.seen.add((op["operationId"], method, status))
        return r

    def resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self.spec
        for part in ref.lstrip("#/").split("/"):
            node = node[part]
        assert isinstance(node, dict)
        return node


async def test_every_endpoint_answers_as_documented(tmp_path: Path) -> None:
    spec = _docs_spec()
    checker = SpecChecker(spec)
    hooks = WebhookReceiver()
    async with open_live_server(
        tmp_path, max_concurrency=1, max_queue=3, max_wait=0.2, webhook_allow="127.0.0.1/32"
    ) as srv:
        c = srv.client

        async def call(method: str, url: str, **kw: Any) -> httpx.Response:
            return checker.check(await c.request(method, url, **kw))

        runs = "/api/v1/runs"
        done = (await call("POST", runs, json={"prompt": "hi", "session_id": "s"})).json()["job_id"]
        await call("GET", f"{runs}/{done}/result", params={"wait": 0.2})
        await wait_status(c, done, "succeeded")
        await call("GET", f"{runs}/{done}/result")
        await call("GET", f"{runs}/{done}")
        await call("GET", runs)
        await call("GET", runs + "/", params={"limit": 1})
        await call("GET", runs, params={"page": 1, "page_size": 5, "status": "succeeded"})
        await call("GET", f"{runs}/{done}/events")
        await call("GET", f"{runs}/{done}/events", params={"after": "1", "limit": 1})
        await call("GET", f"{runs}/{done}/stream")
        last = (await c.get(f"{runs}/{done}/events")).json()["next_after"]
        await call("GET", f"{runs}/{done}/stream", headers={"Last-Event-ID": last})  # 204
        await call("POST", f"{runs}/{done}/cancel")  # 409
        await call("GET", f"{runs}/{done}/webhooks")  # status none
        await call("POST", f"{runs}/{done}/webhooks/redeliver")  # 422: no webhook_url
        hooked = (
            await call("POST", runs, json={"prompt": "h", "webhook_url": hooks.url + "/h"})
        ).json()["job_id"]
        await trio.to_thread.run_sync(hooks.wait_for, 1)
        await call("GET", f"{runs}/{hooked}/webhooks")
        await call("POST", f"{runs}/{hooked}/webhooks/redeliver")
        await trio.to_thread.run_sync(hooks.wait_for, 2)
        await call("POST", runs, json={"prompt": "x", "webhook_url": "http://10.0.0.1/"})  # 422
        batch = {"runs": [{"prompt": "b1"}, {"promt": "typo"}]}
        await call("POST", runs + "/batch", json=batch)  # 200: one 202 item, one 422 item
        await call("POST", runs + "/batch", json={"runs": []})  # 422
        replay = await call(
            "POST", runs, json={"prompt": "k"}, headers={"Idempotency-Key": "spec-key"}
        )
        replay = await call(
            "POST", runs, json={"prompt": "k"}, headers={"Idempotency-Key": "spec-key"}
        )
        assert replay.headers["idempotent-replayed"] == "true"
        await call("POST", runs, json={"prompt": "j"}, headers={"Idempotency-Key": "spec-key"})

        blocker = (
            await call("POST", runs, json={"prompt": "b", "config": {"delay_s": 30}})
        ).json()["job_id"]
        await wait_status(c, blocker, "running")
        queued = (await call("POST", runs, json={"prompt": "q"})).json()["job_id"]
        await call("GET", f"{runs}/{queued}/result")  # 409
        await call("GET", f"{runs}/{queued}")
        await call("DELETE", f"{runs}/{queued}")  # 409
        await call("POST", f"{runs}/{queued}/webhooks/redeliver")  # 409
        await call("POST", f"{runs}/{queued}/cancel")  # 200
        await call("DELETE", f"{runs}/{queued}")  # 204
        await call("POST", runs, json={"prompt": "fill 1"})
        await call("POST", runs, json={"prompt": "fill 2"})
        await call("POST", runs, json={"prompt": "fill 3"})
        await call("POST", runs, json={"prompt": "full"})  # 503 queue full

        # errors
        await call("POST", runs, json={"prompt": ""})  # 422
        await call("POST", runs, json={"prompt": "x", "agent_file": "a.yaml"})  # 422
        await call("POST", runs, content=b"{", headers={"content-type": "application/json"})
        await call("POST", runs, content=b"x=1", headers={"content-type": "text/plain"})
        await call(
            "POST", runs, content=b"x" * 2_000_000, headers={"content-type": "application/json"}
        )
        await call("GET", runs, params={"status": "nope"})  # 400
        await call("GET", runs, params={"page_size": 0})  # 422
        await call("GET", f"{runs}/run_{'0' * 32}")  # 404
        await call("GET", f"{runs}/run_{'0' * 32}/result")
        await call("GET", f"{runs}/run_{'0' * 32}/stream")
        await call("GET", f"{runs}/run_{'0' * 32}/events")
        await call("POST", f"{runs}/run_{'0' * 32}/cancel")
        await call("DELETE", f"{runs}/run_{'0' * 32}")
        await call("GET", f"{runs}/{done}/result", params={"wait": "x"})  # 400
        await call("GET", f"{runs}/{done}/stream", params={"after": "x"})  # 400
        await call("GET", f"{runs}/{done}/events", params={"after": "x"})  # 400
        await call("GET", f"{runs}/{done}/events", params={"limit": 0})  # 422

        # the running run: cancel waits until it stopped
        await call("POST", f"{runs}/{blocker}/cancel")
        await call("GET", "/health")
        await call("GET", "/stats")
        await call("GET", "/metrics")
        await call("GET", "/openapi.json")
        stats = srv.engine.stats
        await wait_until(lambda: not (stats()["queued"] or stats()["running"]))
    hooks.close()

    operations = {
        op["operationId"]
        for item in spec["paths"].values()
        for key, op in item.items()
        if key in ("get", "post", "put", "delete", "patch")
    }
    answered = {op for op, _, status in checker.seen if status.startswith("2")}
    assert answered == operations, operations - answered
    statuses = {status for _, _, status in checker.seen}
    assert statuses >= {"200", "202", "204", "400", "404", "409", "413", "415", "422", "503"}


async def test_submit_schema_agrees_with_the_server(live_server: LiveServer) -> None:
    """Every body the server accepts is valid against SubmitRequest, and every body the
    schema rejects is refused by the server."""
    spec = _docs_spec()
    validator = SpecChecker(spec).schema_validator(
        spec["paths"]["/api/v1/runs"]["post"]["requestBody"]["content"]["application/json"][
            "schema"
        ]
    )
    bodies: list[Any] = [
        {"prompt": "x"},
        {"prompt": "x", "config": {"a": [1]}, "session_id": "s", "timeout": 1.5},
        {"prompt": "x", "priority": -3, "max_attempts": 2, "ttl": 10, "runner": "echo"},
        {"prompt": "x", "recipe_config": {}, "agent_file": None, "idempotency_scope": "none"},
        {"prompt": "x", "webhook_url": "https://example.com/hook"},
        {"prompt": ""},
        {"prompt": 5},
        {"prompt": "x", "extra": 1},
        {"prompt": "x", "timeout": 0},
        {"prompt": "x", "max_attempts": 0},
        {"prompt": "x", "recipe_config": {"a": 1}},
        {"prompt": "x", "framework": "crewai"},
        {"prompt": "x", "idempotency_scope": "global"},
        {"prompt": "x", "config": []},
        {"config": {}},
        [],
    ]
    for body in bodies:
        r = await live_server.client.post("/api/v1/runs", json=body)
        schema_ok = validator.is_valid(body)
        if r.status_code == 202:
            assert schema_ok, body
        elif not schema_ok:
            assert r.status_code == 422, (body, r.text)


@pytest.mark.parametrize("path", ["api.md", "configuration.md", "security.md"])
def test_docs_exist(path: str) -> None:
    assert (ROOT / "docs" / path).stat().st_size > 1000


def test_api_docs_cover_every_problem_type_and_endpoint() -> None:
    from agentjobs.http.errors import PROBLEM_BASE, PROBLEMS

    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for slug, problem in PROBLEMS.items():
        assert f"{PROBLEM_BASE}{slug}" in text or f"`{slug}`" in text, slug
        assert str(problem.status) in text
    for template, item in _docs_spec()["paths"].items():
        for method in item:
            if method in ("get", "post", "delete"):
                assert f"{method.upper()} {template}" in text, f"{method.upper()} {template}"


def test_configuration_docs_cover_every_option() -> None:
    from agentjobs.http.settings import OPTIONS

    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    for opt in OPTIONS:
        assert opt.flag in text, opt.flag
        assert opt.env in text, opt.env


async def test_auth_and_limit_answers_are_documented(tmp_path: Path) -> None:
    """401s everywhere a key is needed, the 429s of each limit, and the open endpoints."""
    spec = _docs_spec()
    checker = SpecChecker(spec)
    key = "alice-key-0123456789abcdef"
    async with open_live_server(
        tmp_path,
        api_keys=f"alice:{key}",
        metrics_key="metrics-key-0123456789abcd",
        tenant_rate=0.01,
        tenant_burst=3,
        tenant_max_streams=1,
        sse_query_key=True,
    ) as srv:
        c = srv.client
        authed = {"X-API-Key": key}

        async def call(method: str, url: str, **kw: Any) -> httpx.Response:
            return checker.check(await c.request(method, url, **kw))

        runs = "/api/v1/runs"
        job = "run_" + "0" * 32
        for method, path in [
            ("POST", runs),
            ("GET", runs),
            ("GET", f"{runs}/{job}"),
            ("DELETE", f"{runs}/{job}"),
            ("GET", f"{runs}/{job}/result"),
            ("GET", f"{runs}/{job}/stream"),
            ("GET", f"{runs}/{job}/events"),
            ("POST", f"{runs}/{job}/cancel"),
            ("GET", f"{runs}/{job}/webhooks"),
            ("POST", f"{runs}/{job}/webhooks/redeliver"),
            ("GET", "/stats"),
            ("GET", "/metrics"),
        ]:
            assert (await call(method, path)).status_code == 401
        await call("GET", "/health")
        await call("GET", "/openapi.json")
        slow = (
            await call(
                "POST", runs, json={"prompt": "s", "config": {"delay_s": 30}}, headers=authed
            )
        ).json()["job_id"]
        async with c.stream("GET", f"{runs}/{slow}/stream", params={"api_key": key}) as first:
            assert first.status_code == 200
            assert (await call("GET", f"{runs}/{slow}/stream", headers=authed)).status_code == 429
        statuses = []
        for i in range(4):
            statuses.append(
                (await call("POST", runs, json={"prompt": f"{i}"}, headers=authed)).status_code
            )
        assert 429 in statuses
        await c.post(f"{runs}/{slow}/cancel", headers=authed)
    seen = {(op, status) for op, _, status in checker.seen}
    assert {("streamRun", "429"), ("submitRun", "429"), ("metrics", "401")} <= seen
