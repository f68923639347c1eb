"""The seed's client snippets (shared/seed/async-jobs-api.txt), verbatim, against our server.

This is the compatibility promise: PraisonAI's documented client code runs unchanged. The
only edit is the address: the snippets say `http://127.0.0.1:8005`, the test server listens
on a free port, so `"http://127.0.0.1:8005...` becomes `f"{BASE}...` and
`API_URL = "http://127.0.0.1:8005"` becomes `API_URL = BASE`; the webhook snippet's
`https://example.com/callback` becomes a loopback receiver's URL (`f"{HOOKS.url}/callback"`),
which the test server is allowed to call and which checks the signed delivery. Names a
snippet uses without
defining (`job_id`, `tasks`) are set up just before it, and its effects are checked after
it. The server is the real one, started as users start it (`python -m agentjobs serve`).
`test_snippets_match_the_seed_file` checks, line by line, that each snippet is here as
the seed has it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from live_server import ServerProcess, WebhookReceiver

from agentjobs.webhooks import generate_secret, verify

SEED = Path(__file__).resolve().parents[2] / "shared" / "seed" / "async-jobs-api.txt"
SECRET = generate_secret()


@pytest.fixture(scope="module")
def HOOKS() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def BASE(tmp_path_factory: pytest.TempPathFactory, HOOKS: WebhookReceiver) -> Iterator[str]:
    data = tmp_path_factory.mktemp("seed") / "data"
    env = {"AGENTJOBS_WEBHOOK_SECRET": SECRET, "AGENTJOBS_WEBHOOK_ALLOW": "127.0.0.1/32"}
    with ServerProcess(data, env=env) as proc:
        yield proc.url
        assert proc.terminate() == 0


# The snippets keep the seed's layout exactly, so the formatter stays out from here on.
# fmt: off


def test_quick_start(BASE: str) -> None:
    import httpx

    API_URL = BASE

    # Submit job
    response = httpx.post(f"{API_URL}/api/v1/runs", json={"prompt": "Analyze data"})
    job = response.json()
    job_id = job["job_id"]

    # Check status
    status = httpx.get(f"{API_URL}/api/v1/runs/{job_id}").json()

    # Get result
    result = httpx.get(f"{API_URL}/api/v1/runs/{job_id}/result").json()

    assert response.status_code == 202
    assert status["job_id"] == job_id
    assert status["status"] in ("queued", "running", "succeeded")
    # the run may not be finished yet; then /result says so, in PraisonAI's words
    assert result.get("result") == "Analyze data" or "not complete" in result["detail"]


def test_submit_job(BASE: str) -> None:
    import httpx

    response = httpx.post(
        f"{BASE}/api/v1/runs",
        json={"prompt": "Your task here"}
    )
    job_id = response.json()["job_id"]

    assert response.status_code == 202
    assert job_id.startswith("run_")


def test_idempotency(BASE: str) -> None:
    first = httpx.post(f"{BASE}/api/v1/runs", json={"prompt": "Task"},
                       headers={"Idempotency-Key": "unique-key-123"}).json()["job_id"]

    response = httpx.post(
        f"{BASE}/api/v1/runs",
        json={"prompt": "Task"},
        headers={"Idempotency-Key": "unique-key-123"}
    )

    assert response.status_code == 202
    assert response.json()["job_id"] == first
    assert response.headers["Idempotent-Replayed"] == "true"


def test_polling(BASE: str) -> None:
    job_id = httpx.post(f"{BASE}/api/v1/runs",
                        json={"prompt": "poll me", "config": {"delay_s": 0.5}}).json()["job_id"]

    import time

    def wait_for_completion(job_id):
        while True:
            status = httpx.get(f"{BASE}/api/v1/runs/{job_id}").json()
            if status["status"] in ("succeeded", "failed", "cancelled"):
                return status
            time.sleep(status.get("retry_after", 2))

    start = time.monotonic()
    final = wait_for_completion(job_id)
    assert final["status"] == "succeeded"
    assert time.monotonic() - start < 5  # retry_after is 1 for a young running run


def test_sse_streaming(BASE: str, capsys: pytest.CaptureFixture[str]) -> None:
    prompt = 'multi\nline "quoted" \\ text'
    job_id = httpx.post(f"{BASE}/api/v1/runs",
                        json={"prompt": prompt, "config": {"delay_s": 0.2, "steps": 2}}
                        ).json()["job_id"]

    with httpx.stream("GET", f"{BASE}/api/v1/runs/{job_id}/stream") as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                print(line[5:])

    payloads = [orjson.loads(p) for p in capsys.readouterr().out.splitlines()]
    assert payloads[0]["status"] == "queued"
    assert payloads[0]["job_id"] == job_id
    assert payloads[-1]["result"] == prompt  # whole, and valid JSON despite the newline


def test_webhook_callback(BASE: str, HOOKS: WebhookReceiver) -> None:
    response = httpx.post(
        f"{BASE}/api/v1/runs",
        json={
            "prompt": "Task",
            "webhook_url": f"{HOOKS.url}/callback"
        }
    )

    assert response.status_code == 202
    job_id = response.json()["job_id"]
    delivery = HOOKS.wait_for(1)[0]
    assert delivery["path"] == "/callback"
    payload = verify(delivery["body"], delivery["headers"], SECRET)  # signed, fresh
    assert payload["job_id"] == job_id
    assert payload["status"] == "succeeded"
    assert payload["result"] == "Task"
    assert payload["completed_at"].endswith("Z")
    assert {"error", "duration_seconds", "event"} <= set(payload)
    history = httpx.get(f"{BASE}/api/v1/runs/{job_id}/webhooks").json()
    assert history["status"] == "delivered"


def test_session_grouping(BASE: str) -> None:
    tasks = ["first task", "second task", "third task"]

    for task in tasks:
        httpx.post(
            f"{BASE}/api/v1/runs",
            json={"prompt": task, "session_id": "project-alpha"}
        )

    listed = httpx.get(f"{BASE}/api/v1/runs", params={"session_id": "project-alpha"}).json()
    assert listed["total"] == 3
    assert [j["session_id"] for j in listed["jobs"]] == ["project-alpha"] * 3


def test_cancel_job(BASE: str) -> None:
    job_id = httpx.post(f"{BASE}/api/v1/runs",
                        json={"prompt": "long", "config": {"delay_s": 60}}).json()["job_id"]

    httpx.post(f"{BASE}/api/v1/runs/{job_id}/cancel")

    assert httpx.get(f"{BASE}/api/v1/runs/{job_id}").json()["status"] == "cancelled"


def test_list_jobs(BASE: str) -> None:
    jobs = httpx.get(f"{BASE}/api/v1/runs").json()

    assert {"jobs", "total", "page", "page_size"} <= set(jobs)
    assert jobs["total"] >= 1
    assert jobs["jobs"][0]["job_id"].startswith("run_")


def test_complete_example(BASE: str, capsys: pytest.CaptureFixture[str]) -> None:
    import httpx  # noqa: I001
    import time

    API_URL = BASE

    def submit_and_wait(prompt):
        # Submit
        response = httpx.post(f"{API_URL}/api/v1/runs", json={"prompt": prompt})
        job_id = response.json()["job_id"]

        # Wait
        while True:
            status = httpx.get(f"{API_URL}/api/v1/runs/{job_id}").json()
            if status["status"] == "succeeded":
                return httpx.get(f"{API_URL}/api/v1/runs/{job_id}/result").json()
            elif status["status"] in ("failed", "cancelled"):
                raise Exception(f"Job {status['status']}")
            time.sleep(2)

    result = submit_and_wait("What is 2+2?")
    print(result["result"])

    assert capsys.readouterr().out == "What is 2+2?\n"


# fmt: on


def _snippets(text: str) -> list[list[str]]:
    """The seed's code blocks: runs of lines between its section titles."""
    title = re.compile(r"^[A-Z][A-Za-z -]*\.?$")  # "Quick Start", the intro sentence...
    blocks: list[list[str]] = [[]]
    for line in text.splitlines():
        if title.match(line):
            blocks.append([])
        else:
            blocks[-1].append(line.rstrip())
    out = []
    for block in blocks:
        while block and not block[0]:
            block.pop(0)
        while block and not block[-1]:
            block.pop()
        if block and not block[0].startswith("python -m uvicorn"):  # the server command
            out.append(block)
    return out


def _as_in_test(line: str) -> str:
    line = line.replace('API_URL = "http://127.0.0.1:8005"', "API_URL = BASE")
    line = line.replace('f"http://127.0.0.1:8005', 'f"{BASE}')
    line = line.replace('"http://127.0.0.1:8005', 'f"{BASE}')
    return line.replace('"https://example.com/callback"', 'f"{HOOKS.url}/callback"')


def test_snippets_match_the_seed_file() -> None:
    """Each seed snippet appears here as one contiguous block, indented into its test."""
    if not SEED.exists():
        pytest.skip(f"{SEED} is not part of this checkout")
    source = [
        re.sub(r"  # noqa: \w+$", "", line.rstrip())
        for line in Path(__file__).read_text().splitlines()
    ]
    blocks = _snippets(SEED.read_text())
    assert len(blocks) == 10  # every snippet but the server command
    for block in blocks:
        wanted = [("    " + _as_in_test(line)) if line else "" for line in block]
        n = len(wanted)
        found = any(source[i : i + n] == wanted for i in range(len(source) - n + 1))
        assert found, "seed snippet not found verbatim:\n" + "\n".join(wanted)
