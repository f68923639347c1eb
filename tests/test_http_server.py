"""`agentjobs serve` as users run it: start-up lines, settings, SIGTERM drain, restart."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from live_server import Frame, ServerProcess, parse_sse, wait_until

from agentjobs.http.settings import OPTIONS, ServerSettings, SettingsError, resolve

Start = Callable[..., ServerProcess]


def _result(base: str, job: str, wait: float = 10) -> dict[str, object]:
    r = httpx.get(f"{base}/api/v1/runs/{job}/result", params={"wait": wait}, timeout=30)
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def test_start_up_prints_one_fact_per_line(server_process: Start, tmp_path: Path) -> None:
    proc = server_process("--durability", "os", "--max-concurrency", "3")
    head = proc.lines[:8]
    assert head[0].startswith("agentjobs ") and f"listening on {proc.url}" in head[0]
    assert head[1] == f"data dir: {(tmp_path / 'data').resolve()} (0 events replayed)"
    assert head[2].startswith("durability: os ")
    assert head[3] == "default runner: echo (configured: echo)"
    assert head[4] == "webhooks: unsigned (no --webhook-secret); 0 pending deliveries resumed"
    assert head[5] == "auth: off (no API keys; loopback only); CORS: off"
    assert head[6] == "limits per tenant: none"
    assert head[7] == "runs recovered: 0 requeued, 0 failed, 0 cancelled; 0 still queued"
    health = httpx.get(proc.url + "/health").json()
    assert health["executor_stats"]["max_concurrent"] == 3
    assert proc.terminate() == 0


def test_environment_variables_and_flags(server_process: Start) -> None:
    env = {"AGENTJOBS_DURABILITY": "memory", "AGENTJOBS_MAX_CONCURRENCY": "5"}
    proc = server_process("--max-concurrency", "2", env=env)
    assert "durability: memory" in proc.output
    assert "data dir: none" in proc.output
    # the flag wins over the variable
    assert httpx.get(proc.url + "/health").json()["executor_stats"]["max_concurrent"] == 2
    assert proc.terminate() == 0


def test_bad_settings_exit_2_with_a_message(tmp_path: Path) -> None:
    for args, env, needle in [
        (["--durability", "paper"], {}, "--durability: must be one of fsync, os, memory"),
        ([], {"AGENTJOBS_PORT": "eighty"}, "AGENTJOBS_PORT: expected an integer"),
        (["--public-url", "jobs.example.com"], {}, "--public-url: must be an absolute"),
        (["--runner", "nope"], {}, "unknown runner type 'nope'"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "agentjobs", "serve", "--data-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            env={**_clean_env(), **env},
            timeout=30,
        )
        assert done.returncode == 2, (args, done.stderr)
        assert needle in done.stderr, done.stderr


def test_port_in_use_exits_1(server_process: Start, tmp_path: Path) -> None:
    first = server_process("--durability", "memory")
    port = first.url.rsplit(":", 1)[1]
    done = subprocess.run(
        [sys.executable, "-m", "agentjobs", "serve", "--durability", "memory", "--port", port],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
    )
    assert done.returncode == 1
    assert "agentjobs serve:" in done.stderr
    assert "Traceback" not in done.stderr


def test_second_server_on_the_same_data_dir_is_refused(
    server_process: Start, tmp_path: Path
) -> None:
    server_process()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "agentjobs",
            "serve",
            "--port",
            "0",
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=_clean_env(),
    )
    assert done.returncode == 1
    assert "in use by another agentjobs process" in done.stderr


def _clean_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("AGENTJOBS_")}


async def _open_stream(
    client: httpx.AsyncClient, job: str, frames: list[Frame], ended: list[bool], **headers: str
) -> None:
    async with client.stream("GET", f"/api/v1/runs/{job}/stream", headers=headers) as r:
        assert r.status_code == 200
        body = (await r.aread()).decode()  # raises if the server cut the chunked body
    frames.extend(parse_sse(body)[0])
    ended.append(True)


async def test_sigterm_drains_streams_exits_0_and_restart_resumes(
    server_process: Start, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    proc = server_process("--grace-period", "0.5", data_dir=data)
    async with httpx.AsyncClient(base_url=proc.url, timeout=30) as c:
        long = (
            await c.post("/api/v1/runs", json={"prompt": "p", "config": {"delay_s": 2, "steps": 2}})
        ).json()["job_id"]
        quick = (await c.post("/api/v1/runs", json={"prompt": "done"})).json()["job_id"]
        r = await c.get(f"/api/v1/runs/{quick}/result", params={"wait": 10})
        assert r.json()["result"] == "done"
        streams: list[list[Frame]] = [[], [], []]
        ended: list[bool] = []
        async with trio.open_nursery() as nursery:
            for frames in streams:
                nursery.start_soon(_open_stream, c, long, frames, ended)

            async def all_open() -> bool:
                return bool((await c.get("/health")).json()["open_streams"] == 3)

            await wait_until(all_open)
            start = time.monotonic()
            proc.signal(signal.SIGTERM)
            proc.signal(signal.SIGTERM)  # a forwarded duplicate must not kill it
        assert len(ended) == 3
        assert time.monotonic() - start < 5
    code = await trio.to_thread.run_sync(proc.wait, 30)
    assert code == 0, proc.output
    for frames in streams:
        assert frames[-1].event == "shutdown"
        assert frames[-1].id == frames[-2].id
    last_seen = streams[0][-1].id
    assert last_seen is not None
    assert "requeued" in proc.output or "stopped" in proc.output

    # restart: the interrupted run is resumed, the stream continues where it stopped
    again = server_process(data_dir=data)
    assert "runs recovered: 0 requeued" in again.output  # it was requeued at shutdown
    assert "1 still queued" in again.output
    async with httpx.AsyncClient(base_url=again.url, timeout=30) as c:
        async with c.stream(
            "GET", f"/api/v1/runs/{long}/stream", headers={"Last-Event-ID": last_seen}
        ) as r:
            rest = parse_sse((await r.aread()).decode())[0]
        assert rest[-1].event == "result"
        seen_ids = {f.id for f in streams[0][:-1]}
        assert not seen_ids & {f.id for f in rest}  # nothing repeated
        full = parse_sse((await c.get(f"/api/v1/runs/{long}/stream", params={"after": "0"})).text)[
            0
        ]
        assert [f for f in full if f.id not in seen_ids] == rest  # nothing lost
        result = (await c.get(f"/api/v1/runs/{long}/result")).json()
        assert result["status"] == "succeeded"
        assert result["attempt"] == 1  # the interrupted attempt was given back
    assert again.terminate() == 0


def test_restart_keeps_runs_results_and_idempotency(server_process: Start, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = server_process(data_dir=data)
    base = first.url
    key = {"Idempotency-Key": "restart-key"}
    a = httpx.post(f"{base}/api/v1/runs", json={"prompt": "alpha", "session_id": "s"}, headers=key)
    job_a = a.json()["job_id"]
    job_b = httpx.post(
        f"{base}/api/v1/runs", json={"prompt": "beta", "config": {"fail": "no"}}
    ).json()["job_id"]
    res_a = _result(base, job_a)
    res_b = _result(base, job_b)
    listing = httpx.get(f"{base}/api/v1/runs").json()
    assert first.terminate() == 0

    second = server_process(data_dir=data)
    base = second.url
    assert _result(base, job_a) == res_a
    assert _result(base, job_b) == res_b
    assert httpx.get(f"{base}/api/v1/runs").json() == listing
    replay = httpx.post(
        f"{base}/api/v1/runs", json={"prompt": "alpha", "session_id": "s"}, headers=key
    )
    assert replay.status_code == 202
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["job_id"] == job_a
    conflict = httpx.post(f"{base}/api/v1/runs", json={"prompt": "other"}, headers=key)
    assert conflict.status_code == 422
    assert conflict.json()["type"].endswith("/idempotency-conflict")
    assert second.terminate() == 0


def test_agentjobs_console_script_serves(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("agentjobs")
    if not script.exists():
        pytest.skip("the package is not installed with its console script in this environment")
    proc = subprocess.Popen(
        [str(script), "serve", "--port", "0", "--durability", "memory"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_clean_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line
        url = line.split("listening on ")[1].strip()
        assert httpx.get(url + "/health").json()["status"] == "healthy"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C drains like SIGTERM
        assert proc.wait(30) == 0


# -- settings resolution (no server needed) ---------------------------------------------


def test_flag_beats_env_beats_default() -> None:
    s = resolve(
        {"port": "9000"},
        {"AGENTJOBS_PORT": "9100", "AGENTJOBS_HOST": "0.0.0.0", "AGENTJOBS_INSECURE_NO_AUTH": "1"},
    )
    assert s.port == 9000
    assert s.host == "0.0.0.0"
    assert s.insecure_no_auth is True
    assert s.max_concurrency == ServerSettings().max_concurrency
    assert resolve({}, {"AGENTJOBS_ACCESS_LOG": "yes"}).access_log is True
    assert (
        resolve({}, {"AGENTJOBS_SESSION_CONCURRENCY": "1"}).engine_config().session_concurrency == 1
    )
    assert resolve({}, {"AGENTJOBS_MAX_PROMPT_CHARS": "0"}).max_prompt_chars is None
    with pytest.raises(SettingsError, match="AGENTJOBS_GRACE_PERIOD"):
        resolve({}, {"AGENTJOBS_GRACE_PERIOD": "-1"})


def test_every_option_has_a_flag_a_variable_and_a_setting() -> None:
    fields = {f for f in ServerSettings.__attrs_attrs__}
    names = {f.name for f in fields}
    assert {o.name for o in OPTIONS} == names
    for o in OPTIONS:
        assert o.flag == "--" + o.name.replace("_", "-")
        assert o.env == "AGENTJOBS_" + o.name.upper()
        default = getattr(ServerSettings(), o.name)
        assert o.default == default, o.name


def test_compact_interval_reaches_the_engine() -> None:
    assert ServerSettings().engine_config().compact_interval_s == 3600.0
    assert resolve({"compact_interval": "2.5"}, {}).engine_config().compact_interval_s == 2.5
    off = resolve({}, {"AGENTJOBS_COMPACT_INTERVAL": "off"}).engine_config()
    assert off.compact_interval_s is None
    with pytest.raises(SettingsError, match="AGENTJOBS_COMPACT_INTERVAL"):
        resolve({}, {"AGENTJOBS_COMPACT_INTERVAL": "-3"})


async def test_the_server_compacts_on_its_own_schedule(tmp_path: Path) -> None:
    """With `--compact-interval` short and `--retention` shorter, a finished run is dropped
    by the server itself (no `agentjobs log compact`), and its journal shrinks."""
    from live_server import open_live_server, submit

    data = tmp_path / "data"
    async with open_live_server(data, compact_interval=0.3, retention=0.2) as srv:
        job = await submit(srv.client, "to be compacted away")
        done = await srv.client.get(f"/api/v1/runs/{job}/result", params={"wait": 10})
        assert done.json()["status"] == "succeeded"
        with trio.fail_after(20):
            while (await srv.client.get(f"/api/v1/runs/{job}")).status_code != 404:  # noqa: ASYNC110 - polling the API is the point
                await trio.sleep(0.1)
        fresh = await submit(srv.client, "still here")
        assert (await srv.client.get(f"/api/v1/runs/{fresh}")).status_code == 200
