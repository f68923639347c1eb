"""Load and slow-client scenarios against the real server (issue 7, item 5).

Shared by tests/test_load_*.py (small, CI) and benchmarks/faults.py (--long). Each
scenario starts its own server subprocess, so that its memory is its own (VmRSS from
/proc) and nothing else runs in its event loop; each returns a report whose `problems`
must be empty. Every loop is bounded in count and in time.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio

from .rawhttp import KeepAliveClient
from .server import (
    ServerProcess,
    open_files_soft_limit,
    proc_status_kib,
    start_compacting_server,
    start_server,
    write_runners_toml,
)
from .sse import Frame, connect_stream, read_stream, read_to_end

__all__ = [
    "FanoutReport",
    "QueueReport",
    "SlowReport",
    "SoakReport",
    "all_events",
    "queue_drain",
    "slow_subscriber",
    "soak",
    "sse_fanout",
]

RUNS = "/api/v1/runs"


def _port(proc: ServerProcess) -> int:
    return int(proc.url.rsplit(":", 1)[1])


async def _start(data: Path, *args: str, config: Path | None = None) -> ServerProcess:
    return await trio.to_thread.run_sync(lambda: start_server(data, *args, config=config))


async def _stop(proc: ServerProcess, problems: list[str]) -> None:
    code = await trio.to_thread.run_sync(proc.terminate)
    if code != 0:
        problems.append(f"server exited {code}: {proc.output[-2000:]}")
    if "Traceback" in proc.output:
        problems.append(f"traceback in the server log: {proc.output[-3000:]}")


async def all_events(client: httpx.AsyncClient, run: str) -> list[Frame]:
    """A run's whole event list from `/events` (every page)."""
    out: list[Frame] = []
    after = "0"
    for _ in range(10_000):
        r = await client.get(f"{RUNS}/{run}/events", params={"after": after, "limit": 1000})
        body = r.json()
        out += [(e["id"], e["event"], e["data"]) for e in body["events"]]
        if not body["more"]:
            break
        after = body["next_after"]
    return out


async def _wait_health(
    client: httpx.AsyncClient, key: str, predicate: Any, timeout: float
) -> dict[str, Any]:
    with trio.move_on_after(timeout):
        while True:
            health: dict[str, Any] = (await client.get("/health")).json()
            if predicate(health[key]):
                return health
            await trio.sleep(0.05)
    last: dict[str, Any] = (await client.get("/health")).json()
    return last


# -- 1,000 subscribers -------------------------------------------------------------------


@attrs.define(slots=True)
class FanoutReport:
    subscribers: int = 0
    events: int = 0
    complete: int = 0
    connect_s: float = 0.0
    deliver_s: float = 0.0
    max_rss_kib: int = 0
    problems: list[str] = attrs.Factory(list)


async def sse_fanout(work: Path, subscribers: int = 1000, words: int = 30) -> FanoutReport:
    """`subscribers` streams of one run, all connected before it starts; every one must
    receive exactly the run's events (compared with `/events`)."""
    report = FanoutReport(subscribers=subscribers)
    limit = open_files_soft_limit(subscribers * 2 + 512)
    if limit < subscribers * 2 + 256:
        report.problems.append(f"open-file limit {limit} is too low for {subscribers} streams")
        return report
    proc = await _start(work / "data", "--max-concurrency", "1", "--durability", "os")
    try:
        port = _port(proc)
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as client:
            blocker = await client.post(RUNS, json={"prompt": "hold", "config": {"delay_s": 60}})
            blocker_id = blocker.json()["job_id"]
            prompt = " ".join(f"w{i}" for i in range(words))
            target = await client.post(
                RUNS,
                json={"prompt": prompt, "config": {"output": True, "delay_s": 1.0, "steps": 20}},
            )
            run = target.json()["job_id"]
            results: list[tuple[int, list[Frame]] | BaseException] = []
            connected = trio.Semaphore(64)  # bounds concurrent connects (listen backlog)
            t0 = time.monotonic()

            async def subscriber() -> None:
                try:
                    async with connected:
                        stream = await connect_stream(port, f"{RUNS}/{run}/stream")
                    results.append(await read_to_end(stream))
                except (OSError, trio.BrokenResourceError) as exc:
                    results.append(exc)

            async with trio.open_nursery() as nursery:
                for _ in range(subscribers):
                    nursery.start_soon(subscriber)
                health = await _wait_health(client, "open_streams", lambda n: n >= subscribers, 60)
                report.connect_s = round(time.monotonic() - t0, 2)
                if health["open_streams"] < subscribers:
                    report.problems.append(f"only {health['open_streams']} streams opened")
                report.max_rss_kib = proc_status_kib(proc.proc.pid)
                t1 = time.monotonic()
                await client.post(f"{RUNS}/{blocker_id}/cancel")
                with trio.move_on_after(120) as scope:
                    while len(results) < subscribers:
                        await trio.sleep(0.05)
                        report.max_rss_kib = max(report.max_rss_kib, proc_status_kib(proc.proc.pid))
                if scope.cancelled_caught:
                    report.problems.append(f"{len(results)} of {subscribers} streams ended")
                    nursery.cancel_scope.cancel()
                report.deliver_s = round(time.monotonic() - t1, 2)
            expected = await all_events(client, run)
            report.events = len(expected)
            for res in results:
                if isinstance(res, BaseException):
                    report.problems.append(f"a subscriber failed: {res!r}")
                elif res != (200, expected):
                    report.problems.append(
                        f"a subscriber got {res[0]} and {len(res[1])} frames, want {len(expected)}"
                    )
                else:
                    report.complete += 1
        await _stop(proc, report.problems)
    finally:
        proc.kill()
    del report.problems[20:]
    return report


# -- a subscriber that never reads ---------------------------------------------------------


@attrs.define(slots=True)
class SlowReport:
    output_bytes: int = 0
    streamed_bytes: int = 0
    warmup_runs: int = 0
    baseline_rss_kib: int = 0
    max_rss_kib: int = 0
    growth_kib: int = 0
    problems: list[str] = attrs.Factory(list)


async def slow_subscriber(
    work: Path,
    lines: int = 60_000,
    line_bytes: int = 300,
    clients: int = 1,
    limit_kib: int = 10 * 1024,
) -> SlowReport:
    """`clients` raw sockets each ask for the stream of a run that writes `lines` x
    `line_bytes` of output, and never read (all stay open to the end); the server's RSS
    may not grow by `limit_kib` over its warmed-up baseline.

    The baseline is taken on a warmed-up server: the first few runs of this size grow
    the RSS by about twice their output each, then it stays put (the allocator keeps
    freed memory in per-thread arenas and reuses it). Warm-up runs of the same size, read
    by a client that keeps up, go until one grows RSS by less than 2 MiB (at most 8), so
    that what is left to measure is what the slow clients cost.
    """
    report = SlowReport()
    config = write_runners_toml(work / "runners.toml", work / "markers")
    proc = await _start(work / "data", "--durability", "os", config=config)
    socks: list[socket.socket] = []
    try:
        port = _port(proc)
        pid = proc.proc.pid
        body: dict[str, Any] = {"prompt": "bulk", "runner": "marker"}
        body["config"] = {"lines": lines, "line_bytes": line_bytes}
        async with httpx.AsyncClient(base_url=proc.url, timeout=60) as client:
            for _ in range(8):
                before = proc_status_kib(pid)
                warm = (await client.post(RUNS, json=body)).json()["job_id"]
                await read_stream(port, f"{RUNS}/{warm}/stream")
                report.warmup_runs += 1
                if proc_status_kib(pid) - before < 2048:
                    break
            report.baseline_rss_kib = report.max_rss_kib = proc_status_kib(pid)
            runs = []
            for _ in range(clients):
                run = (await client.post(RUNS, json=body)).json()["job_id"]
                runs.append(run)
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.connect(("127.0.0.1", port))
                sock.sendall(
                    f"GET {RUNS}/{run}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
                )
                with trio.move_on_after(180) as scope:
                    while True:
                        report.max_rss_kib = max(report.max_rss_kib, proc_status_kib(pid))
                        r = await client.get(f"{RUNS}/{run}")
                        if r.json()["status"] in ("succeeded", "failed", "cancelled"):
                            break
                        await trio.sleep(0.05)
                if scope.cancelled_caught:
                    report.problems.append("a bulk run did not finish in 180 s")
            for _ in range(10):  # a few more samples once the output has all gone out
                report.max_rss_kib = max(report.max_rss_kib, proc_status_kib(pid))
                await trio.sleep(0.1)
            health = (await client.get("/health")).json()
            if health["open_streams"] != clients:
                report.problems.append(f"{health['open_streams']} streams open, want {clients}")
            for sock in socks:
                sock.close()
            # once the clients are gone, the server lets go of their streams
            health = await _wait_health(client, "open_streams", lambda n: n == 0, 30)
            if health["open_streams"] != 0:
                report.problems.append("an abandoned stream was never closed")
            for run in runs:
                result = (await client.get(f"{RUNS}/{run}/result")).json()
                report.output_bytes += int(result.get("metrics", {}).get("stdout_bytes", 0))
                events = await all_events(client, run)
                report.streamed_bytes += sum(len(d["text"]) for _, e, d in events if e == "output")
        await _stop(proc, report.problems)
    finally:
        for sock in socks:
            sock.close()
        proc.kill()
    report.growth_kib = report.max_rss_kib - report.baseline_rss_kib
    want = clients * lines * line_bytes
    if report.output_bytes < want or report.streamed_bytes != report.output_bytes:
        report.problems.append(
            f"{report.streamed_bytes} bytes of output events for {report.output_bytes} "
            f"bytes of stdout ({clients} x {lines} lines)"
        )
    if report.growth_kib > limit_kib:
        report.problems.append(
            f"server RSS grew {report.growth_kib} KiB (limit {limit_kib}) while clients that "
            f"never read were sent {report.output_bytes} bytes"
        )
    return report


# -- a deep queue ------------------------------------------------------------------------


@attrs.define(slots=True)
class QueueReport:
    runs: int = 0
    acknowledged: int = 0
    succeeded: int = 0
    lost: int = 0
    max_running: int = 0
    submit_s: float = 0.0
    drain_s: float = 0.0
    max_rss_kib: int = 0
    problems: list[str] = attrs.Factory(list)


async def queue_drain(
    work: Path, runs: int = 10_000, concurrency: int = 10, durability: str = "fsync"
) -> QueueReport:
    """Hold every slot, queue `runs` runs, release the slots: all must succeed, never
    more than `concurrency` at once, and none may be missing."""
    report = QueueReport(runs=runs)
    proc = await _start(
        work / "data", "--max-concurrency", str(concurrency), "--durability", durability
    )
    try:
        pid = proc.proc.pid
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        async with httpx.AsyncClient(base_url=proc.url, timeout=60, limits=limits) as client:
            blockers = []
            for _ in range(concurrency):
                r = await client.post(RUNS, json={"prompt": "hold", "config": {"delay_s": 300}})
                blockers.append(r.json()["job_id"])
            await _wait_health(client, "running", lambda n: n == concurrency, 30)
            acked: dict[str, str] = {}
            t0 = time.monotonic()
            todo = iter(range(runs))

            async def submitter() -> None:
                conn = KeepAliveClient(_port(proc))
                try:
                    for n in todo:
                        prompt = f"q{n}"
                        body = orjson.dumps({"prompt": prompt, "session_id": f"s{n % 50}"})
                        status, answer = await conn.request("POST", RUNS, body)
                        if status != 202:
                            report.problems.append(f"submit {n}: {status} {answer[:200]!r}")
                            continue
                        acked[orjson.loads(answer)["job_id"]] = prompt
                finally:
                    await conn.aclose()

            async with trio.open_nursery() as nursery:
                for _ in range(16):
                    nursery.start_soon(submitter)
            report.submit_s = round(time.monotonic() - t0, 2)
            report.acknowledged = len(acked)
            health = (await client.get("/health")).json()
            if health["queued"] != len(acked):
                report.problems.append(f"{health['queued']} queued, {len(acked)} acknowledged")
            t1 = time.monotonic()
            for b in blockers:
                await client.post(f"{RUNS}/{b}/cancel")
            with trio.move_on_after(600) as scope:
                while True:
                    health = (await client.get("/health")).json()
                    report.max_running = max(report.max_running, health["running"])
                    report.max_rss_kib = max(report.max_rss_kib, proc_status_kib(pid))
                    if health["queued"] == 0 and health["running"] == 0:
                        break
                    await trio.sleep(0.05)
            report.drain_s = round(time.monotonic() - t1, 2)
            if scope.cancelled_caught:
                report.problems.append(f"the queue did not drain in 600 s: {health}")
            seen: dict[str, str] = {}
            cursor: str | None = None
            for _ in range(runs // 1000 + 5):
                params: dict[str, Any] = {"limit": 1000}
                if cursor:
                    params["cursor"] = cursor
                page = (await client.get(RUNS, params=params)).json()
                seen.update({j["job_id"]: j["status"] for j in page["jobs"]})
                cursor = page["next_cursor"]
                if not cursor:
                    break
            report.succeeded = sum(seen.get(r) == "succeeded" for r in acked)
            report.lost = sum(r not in seen for r in acked)
            for run in list(acked)[:: max(1, runs // 50)]:  # a sample of results, whole
                result = (await client.get(f"{RUNS}/{run}/result")).json()
                if result["result"] != acked[run]:
                    report.problems.append(f"{run}: result {result['result']!r}")
        await _stop(proc, report.problems)
    finally:
        proc.kill()
    if report.lost or report.succeeded != runs:
        report.problems.append(f"{report.succeeded} of {runs} succeeded, {report.lost} lost")
    if report.max_running > concurrency:
        report.problems.append(f"{report.max_running} ran at once, limit {concurrency}")
    del report.problems[20:]
    return report


# -- the soak ------------------------------------------------------------------------------


@attrs.define(slots=True)
class SoakReport:
    seconds: float = 0.0
    cycles: int = 0
    rss_kib: list[tuple[float, int]] = attrs.Factory(list)  # (elapsed s, VmRSS)
    first_half_max_kib: int = 0
    second_half_max_kib: int = 0
    journal_bytes: int = 0
    compactions: int = 0
    problems: list[str] = attrs.Factory(list)


async def soak(
    work: Path, seconds: float = 600.0, delete: bool = True, check_flat: bool = True
) -> SoakReport:
    """Submit/finish(/delete) cycles for `seconds` with the journal compacted live
    (the real server with `--compact-interval 5`); the
    RSS of the second half may exceed the first half's peak by at most 10 %."""
    report = SoakReport()
    proc = await _start_compacting(work / "data", compact_every=5.0)
    try:
        pid = proc.proc.pid
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as client:
            t0 = time.monotonic()
            next_sample = 0.0
            n = 0

            async def cycle(k: int) -> None:
                nonlocal n
                r = await client.post(
                    RUNS,
                    json={"prompt": f"soak {k} " + "x" * 200, "config": {"output": True}},
                    headers={"Idempotency-Key": f"soak-{k}"},
                )
                if r.status_code != 202:
                    report.problems.append(f"submit {k}: {r.status_code}")
                    return
                run = r.json()["job_id"]
                res = await client.get(f"{RUNS}/{run}/result", params={"wait": 10})
                if res.status_code != 200:
                    report.problems.append(f"{run} unfinished: {res.text[:200]}")
                    return
                if delete and k % 2 == 0:
                    d = await client.delete(f"{RUNS}/{run}")
                    if d.status_code not in (204, 404):
                        report.problems.append(f"delete {run}: {d.status_code}")
                n += 1

            while (elapsed := time.monotonic() - t0) < seconds and len(report.problems) < 20:
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(cycle, report.cycles)
                        report.cycles += 1
                if elapsed >= next_sample:
                    report.rss_kib.append((round(elapsed, 1), proc_status_kib(pid)))
                    next_sample += max(1.0, seconds / 120)
            report.seconds = round(time.monotonic() - t0, 1)
        report.compactions = sum("scheduled compacted" in line for line in proc.err_lines)
        report.journal_bytes = sum(
            p.stat().st_size for p in (work / "data" / "journal").glob("*.jsonl")
        )
        await _stop(proc, report.problems)
    finally:
        proc.kill()
    half = report.seconds / 2
    first = [kib for t, kib in report.rss_kib if t <= half]
    second = [kib for t, kib in report.rss_kib if t > half]
    report.first_half_max_kib = max(first, default=0)
    report.second_half_max_kib = max(second, default=0)
    if check_flat and report.second_half_max_kib > report.first_half_max_kib * 1.10:
        report.problems.append(
            f"RSS not flat: first half peak {report.first_half_max_kib} KiB, second half "
            f"peak {report.second_half_max_kib} KiB"
        )
    if report.compactions == 0:
        report.problems.append("no compaction ran during the soak")
    return report


async def _start_compacting(data: Path, compact_every: float) -> ServerProcess:
    return await trio.to_thread.run_sync(
        lambda: start_compacting_server(
            data,
            "--durability",
            "fsync",
            "--retention",
            "2",
            "--idempotency-window",
            "2",
            compact_every=compact_every,
        )
    )
