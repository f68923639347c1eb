"""Schemathesis against docs/openapi.yaml and the live server (issue 7, item 4).

For every operation of the spec, schemathesis generates requests (valid ones and, in its
negative mode, invalid ones) and checks each answer: never a 5xx, a status code the spec
lists for that operation, the declared content type, the declared headers, and a body that
matches the declared schema. The server is the real `agentjobs serve` subprocess; after
the run it must still be healthy and stop cleanly (exit 0).

`AGENTJOBS_FUZZ_EXAMPLES` sets hypothesis' max_examples per operation (25 by default, CI;
benchmarks/faults.py --long uses 300).

Generated bodies never keep a `webhook_url`: a public URL would make the server call out
of the machine, and this harness only ever talks to 127.0.0.1. (Webhook URL validation
has its own tests.)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from faults.server import ServerProcess, start_server
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "docs" / "openapi.yaml"
MAX_EXAMPLES = int(os.environ.get("AGENTJOBS_FUZZ_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

schema = schemathesis.openapi.from_path(SPEC)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("fuzz") / "data"
    proc = start_server(data, "--durability", "os", "--max-wait", "1", "--sse-heartbeat", "1")
    try:
        yield proc
        # whatever was thrown at it, it still serves and stops cleanly
        assert httpx.get(proc.url + "/health", timeout=10).status_code == 200
        code = proc.terminate()
        assert code == 0, proc.output[-3000:]
        assert "Traceback" not in proc.output, proc.output[-3000:]
    finally:
        proc.kill()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.generate],
    derandomize=os.environ.get("AGENTJOBS_FUZZ_RANDOM") != "1",
)
def test_every_operation_answers_per_the_spec(
    case: schemathesis.Case[Any], fuzz_server: ServerProcess
) -> None:
    if isinstance(case.body, dict):
        bodies = [case.body]
        items = case.body.get("runs")  # POST /api/v1/runs/batch: each item is a body
        if isinstance(items, list):
            bodies += [item for item in items if isinstance(item, dict)]
        for body in bodies:
            body.pop("webhook_url", None)
            config = body.get("config")
            if isinstance(config, dict):  # the echo runner's knobs: no hour-long runs
                for knob in ("delay_s", "steps"):
                    config.pop(knob, None)
    response = case.call(base_url=fuzz_server.url, timeout=30)
    case.validate_response(response, checks=CHECKS)
