"""Crash under load, at the server level: `kill -9` the real server while clients submit,
cancel and stream, restart it on the same data dir, and check every promise it made.

Why from outside: the durability contract (docs/journal-format.md, design section 2) is a
promise to HTTP clients: "202 means it survives", "200 cancelled means it stays
cancelled". Only a client that records exactly what it was told, and a server that dies
without warning, can check it end to end (journal, engine, HTTP layer and runners).

What a round does (`CrashHarness.run`):

1. start the server (`--config` with the `echo` and `marker` runners, `--max-attempts 3`);
2. check everything acknowledged so far (`_check_promises`): every acknowledged submit is
   there with the same spec (an idempotent repeat of the same request, same key and body,
   must answer 202 `Idempotent-Replayed` with the same run: the server compares the
   request's hash, so prompt, session and config are all checked); every acknowledged
   cancel is `cancelled`; every finished result seen before is unchanged. Submits whose
   answer was lost in the crash are sent again with the same key (a key must never map to
   two runs);
3. load for a random 0.4-2 s: submitters (single and bursts, all with an Idempotency-Key),
   a canceller, a result reader, SSE readers that resume with `Last-Event-ID`;
4. `kill -9`.

After the last round the server is started once more and left to drain: every run must
reach a final state, succeeded runs' results must echo the spec they were submitted with,
every stream read in pieces across the crashes must equal the run's `/events` (no gap, no
duplicate), the marker files must show no run with two live attempts at once, and the
journal (read offline after a clean stop) must hold every acknowledged spec exactly and
pass `agentjobs log verify`.

Problems are collected, not raised, so `benchmarks/faults.py` can count them; the test
asserts there are none.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import httpx
import orjson
import trio

from .load import all_events
from .markers import overlaps, read_markers
from .server import (
    ServerProcess,
    proc_status_kib,
    recovered_counts,
    start_server,
    write_runners_toml,
)

__all__ = ["CrashHarness", "CrashReport", "StreamTrack"]

RUNS = "/api/v1/runs"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
TERMINAL_FRAMES = frozenset({"result", "error", "cancelled"})
NOT_DATA_FRAMES = frozenset({"heartbeat", "shutdown"})
_TRANSPORT = (httpx.TransportError, trio.BrokenResourceError)


@attrs.define(slots=True, eq=False)
class StreamTrack:
    """One run's SSE stream, read in pieces across crashes."""

    run: str
    frames: list[tuple[str, str, Any]] = attrs.Factory(list)  # (id, event, data)
    last_id: str | None = None
    complete: bool = False
    connections: int = 0
    reading: bool = False  # one reader at a time, as one EventSource would


@attrs.define(slots=True, eq=False)
class Submitted:
    key: str
    body: dict[str, Any]
    run: str | None = None


@attrs.define(slots=True)
class CrashReport:
    """What a crash campaign did and found (problems should be empty)."""

    seed: int
    crashes: int = 0
    acknowledged: int = 0
    submits_unanswered: int = 0
    cancels_acknowledged: int = 0
    finished_checked: int = 0
    streams: int = 0
    stream_resumes: int = 0
    attempts: int = 0
    orphans: int = 0
    overlaps: int = 0
    lost: int = 0
    duplicates: int = 0
    recovered: dict[str, int] = attrs.Factory(dict)
    restart_s_max: float = 0.0
    max_rss_kib: int = 0
    seconds: float = 0.0
    problems: list[str] = attrs.Factory(list)


class CrashHarness:
    """See the module docstring. `crashes` kill -9s; `seed` makes the schedule repeatable
    (the timing of a real server is not, so a seed narrows a failure down, no more)."""

    def __init__(
        self,
        work_dir: Path,
        *,
        crashes: int,
        seed: int,
        orphan: str = "exit",
        max_concurrency: int = 6,
        load_s: tuple[float, float] = (0.4, 2.0),
        drain_timeout_s: float = 120.0,
        durability: str = "fsync",
    ) -> None:
        self.work_dir = work_dir
        self.data_dir = work_dir / "data"
        self.marker_dir = work_dir / "markers"
        self.config = write_runners_toml(work_dir / "runners.toml", self.marker_dir, orphan=orphan)
        self.crashes = crashes
        self.rng = random.Random(seed)
        self.max_concurrency = max_concurrency
        self.load_s = load_s
        self.drain_timeout_s = drain_timeout_s
        self.durability = durability
        self.report = CrashReport(seed=seed)
        self.submitted: dict[str, Submitted] = {}  # key -> what was sent (and its run)
        self.acked: dict[str, Submitted] = {}  # run id -> the acknowledged submit
        self.cancels: set[str] = set()  # acknowledged cancels (200 cancelled)
        self.finished: dict[str, tuple[str, Any, Any]] = {}  # run -> (status, result, error)
        self.streams: dict[str, StreamTrack] = {}
        self.proc: ServerProcess | None = None
        self._serial = 0

    # -- the campaign ------------------------------------------------------------------

    def problem(self, text: str) -> None:
        self.report.problems.append(f"seed {self.report.seed}: {text}")

    async def run(self) -> CrashReport:
        started = time.monotonic()
        try:
            for _ in range(self.crashes):
                client = await self._start()
                async with client:
                    await self._check_promises(client)
                    await self._load_then_kill(client)
                self.report.crashes += 1
            client = await self._start()
            async with client:
                await self._check_promises(client)
                await self._drain(client)
                await self._final_checks(client)
            assert self.proc is not None
            code = await trio.to_thread.run_sync(self.proc.terminate)
            if code != 0:
                self.problem(f"clean stop exited {code}:\n{self.proc.output[-2000:]}")
            self._check_journal_offline()
            self._check_markers()
        finally:
            if self.proc is not None:
                self.proc.kill()
        self.report.acknowledged = len(self.acked)
        self.report.cancels_acknowledged = len(self.cancels)
        self.report.finished_checked = len(self.finished)
        self.report.streams = len(self.streams)
        self.report.seconds = round(time.monotonic() - started, 1)
        return self.report

    async def _start(self) -> httpx.AsyncClient:
        t0 = time.monotonic()
        self.proc = proc = await trio.to_thread.run_sync(
            lambda: start_server(
                self.data_dir,
                "--max-attempts",
                "3",
                "--max-concurrency",
                str(self.max_concurrency),
                "--cancel-wait",
                "10",
                "--grace-period",
                "0",
                "--durability",
                self.durability,
                config=self.config,
            )
        )
        self.report.restart_s_max = max(self.report.restart_s_max, time.monotonic() - t0)
        for k, v in recovered_counts(proc).items():
            self.report.recovered[k] = self.report.recovered.get(k, 0) + v
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        return httpx.AsyncClient(base_url=proc.url, timeout=20.0, limits=limits)

    def _sample_rss(self) -> None:
        if self.proc is not None:
            kib = proc_status_kib(self.proc.proc.pid)
            self.report.max_rss_kib = max(self.report.max_rss_kib, kib)

    # -- checks after each restart -----------------------------------------------------

    async def _check_promises(self, client: httpx.AsyncClient) -> None:
        """Everything acknowledged before the crash still holds (module docstring, 2)."""
        limiter = trio.CapacityLimiter(16)
        unanswered = [s for s in self.submitted.values() if s.run is None]

        async def resubmit(s: Submitted) -> None:
            async with limiter:
                await self._submit(client, s, first=False)

        async def check_run(s: Submitted) -> None:
            async with limiter:
                r = await client.post(RUNS, json=s.body, headers={"Idempotency-Key": s.key})
                if r.status_code != 202:
                    self.problem(f"acknowledged run {s.run} lost: repeat answered {r.text}")
                    self.report.lost += 1
                    return
                if r.json()["job_id"] != s.run or r.headers.get("idempotent-replayed") != "true":
                    self.problem(f"acknowledged run {s.run} came back as {r.json()['job_id']}")
                    self.report.lost += 1

        async def check_cancel(run: str) -> None:
            async with limiter:
                r = await client.get(f"{RUNS}/{run}")
                if r.status_code != 200 or r.json()["status"] != "cancelled":
                    self.problem(f"acknowledged cancel of {run} did not hold: {r.text[:300]}")

        async def check_finished(run: str, seen: tuple[str, Any, Any]) -> None:
            async with limiter:
                r = await client.get(f"{RUNS}/{run}/result")
                body = r.json()
                now = (body.get("status"), body.get("result"), body.get("error"))
                if r.status_code != 200 or now != seen:
                    self.problem(f"finished run {run} changed: {seen!r} -> {now!r}")

        async with trio.open_nursery() as nursery:
            for s in unanswered:
                nursery.start_soon(resubmit, s)
        self.report.submits_unanswered += len(unanswered)
        async with trio.open_nursery() as nursery:
            for s in list(self.acked.values()):
                nursery.start_soon(check_run, s)
            for run in list(self.cancels):
                nursery.start_soon(check_cancel, run)
            for run, seen in list(self.finished.items()):
                nursery.start_soon(check_finished, run, seen)
        self._sample_rss()

    # -- load --------------------------------------------------------------------------

    def _new_submit(self) -> Submitted:
        self._serial += 1
        n = self._serial
        rng = self.rng
        body: dict[str, Any] = {"prompt": f"task {n} {rng.getrandbits(32):08x}"}
        if rng.random() < 0.5:
            body["runner"] = "marker"
            body["config"] = {"sleep_s": rng.choice([0.05, 0.2, 0.5, 1.0]), "tick_s": 0.1}
            if rng.random() < 0.05:
                body["config"]["fail"] = True
        else:
            body["config"] = {"delay_s": rng.choice([0, 0.05, 0.3]), "steps": 2, "output": True}
        if rng.random() < 0.5:
            body["session_id"] = f"session-{n % 7}"
        s = Submitted(key=f"k-{self.report.seed}-{n}", body=body)
        self.submitted[s.key] = s
        return s

    async def _submit(self, client: httpx.AsyncClient, s: Submitted, *, first: bool) -> None:
        r = await client.post(RUNS, json=s.body, headers={"Idempotency-Key": s.key})
        if r.status_code != 202:
            if first and r.status_code == 503:
                return  # refused (e.g. queue full): not acknowledged, sent again later
            self.problem(f"submit {s.key} answered {r.status_code}: {r.text[:300]}")
            return
        run = r.json()["job_id"]
        if s.run is not None and s.run != run:
            self.problem(f"idempotency key {s.key} gave two runs: {s.run} and {run}")
            self.report.duplicates += 1
            return
        s.run = run
        self.acked[run] = s

    async def _load_then_kill(self, client: httpx.AsyncClient) -> None:
        rng = self.rng
        load_for = rng.uniform(*self.load_s)
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(self._submitter, client, random.Random(rng.random() + i))
            nursery.start_soon(self._canceller, client, random.Random(rng.random()))
            nursery.start_soon(self._result_reader, client, random.Random(rng.random()))
            for i in range(3):
                nursery.start_soon(self._stream_reader, client, random.Random(rng.random() + i))
            await trio.sleep(load_for)
            self._sample_rss()
            assert self.proc is not None
            self.proc.proc.kill()  # SIGKILL, while everything is in flight
            await trio.to_thread.run_sync(self.proc.kill)  # reap
            nursery.cancel_scope.cancel()

    async def _guard(self, coro: Any) -> bool:
        """Run one request; False if the server went away under it."""
        try:
            await coro
        except _TRANSPORT:
            return False
        return True

    async def _submitter(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        for _ in range(10_000):
            if rng.random() < 0.2:
                batch = [self._new_submit() for _ in range(8)]
                async with trio.open_nursery() as nursery:
                    for s in batch:
                        nursery.start_soon(self._guard, self._submit(client, s, first=True))
            elif not await self._guard(self._submit(client, self._new_submit(), first=True)):
                return
            await trio.sleep(rng.uniform(0.02, 0.15))

    def _open_runs(self) -> list[str]:
        return [r for r in self.acked if r not in self.finished and r not in self.cancels]

    async def _canceller(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        for _ in range(10_000):
            await trio.sleep(rng.uniform(0.05, 0.3))
            candidates = self._open_runs()
            if not candidates:
                continue
            run = rng.choice(candidates[-30:])
            try:
                r = await client.post(f"{RUNS}/{run}/cancel")
            except _TRANSPORT:
                return
            if r.status_code == 200:
                if r.json()["status"] != "cancelled":
                    self.problem(f"cancel of {run} answered 200 but {r.text[:200]}")
                self.cancels.add(run)
            elif r.status_code not in (202, 409):
                self.problem(f"cancel of {run} answered {r.status_code}: {r.text[:300]}")

    async def _result_reader(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        for _ in range(10_000):
            await trio.sleep(rng.uniform(0.01, 0.1))
            candidates = self._open_runs()
            if not candidates:
                continue
            run = rng.choice(candidates)
            try:
                r = await client.get(f"{RUNS}/{run}/result")
            except _TRANSPORT:
                return
            if r.status_code == 200:
                self._record_finished(run, r.json())
            elif r.status_code != 409:
                self.problem(f"result of {run} answered {r.status_code}: {r.text[:300]}")

    def _record_finished(self, run: str, body: dict[str, Any]) -> None:
        now = (body["status"], body.get("result"), body.get("error"))
        seen = self.finished.setdefault(run, now)
        if seen != now:
            self.problem(f"finished run {run} changed: {seen!r} -> {now!r}")

    async def _stream_reader(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        for _ in range(10_000):
            track = self._next_stream(rng)
            if track is None:
                await trio.sleep(0.05)
                continue
            if not await self._read_stream(client, track):
                return

    def _next_stream(self, rng: random.Random) -> StreamTrack | None:
        unfinished = [t for t in self.streams.values() if not t.complete and not t.reading]
        if unfinished and rng.random() < 0.7:
            return rng.choice(unfinished)
        fresh = [r for r in self.acked if r not in self.streams]
        if not fresh or len(self.streams) >= 40 + 10 * self.crashes:
            return rng.choice(unfinished) if unfinished else None
        run = rng.choice(fresh[-20:])
        track = self.streams[run] = StreamTrack(run)
        return track

    async def _read_stream(self, client: httpx.AsyncClient, track: StreamTrack) -> bool:
        """Read (or resume) one stream to its end; False if the server went away."""
        track.reading = True
        try:
            return await self._read_stream_once(client, track)
        finally:
            track.reading = False

    async def _read_stream_once(self, client: httpx.AsyncClient, track: StreamTrack) -> bool:
        headers = {"Last-Event-ID": track.last_id} if track.last_id is not None else {}
        track.connections += 1
        if track.connections > 1:
            self.report.stream_resumes += 1
        try:
            async with client.stream("GET", f"{RUNS}/{track.run}/stream", headers=headers) as r:
                if r.status_code == 204:
                    track.complete = True
                    return True
                if r.status_code != 200:
                    self.problem(f"stream of {track.run} answered {r.status_code}")
                    track.complete = True
                    return True
                fields: dict[str, str] = {}
                async for line in r.aiter_lines():
                    if line == "":
                        if "event" in fields:
                            self._frame(track, fields)
                        fields = {}
                    elif not line.startswith(":"):
                        name, _, value = line.partition(":")
                        fields[name] = value[1:] if value.startswith(" ") else value
        except (*_TRANSPORT, httpx.StreamError):
            return False
        return True

    def _frame(self, track: StreamTrack, fields: dict[str, str]) -> None:
        event = fields["event"]
        frame_id = fields.get("id")
        if frame_id is not None:
            track.last_id = frame_id
        if event in NOT_DATA_FRAMES:
            return
        track.frames.append((frame_id or "", event, orjson.loads(fields.get("data", "null"))))
        if event in TERMINAL_FRAMES:
            track.complete = True

    # -- the end -----------------------------------------------------------------------

    async def _drain(self, client: httpx.AsyncClient) -> None:
        """No new work; wait for every acknowledged run to finish; finish every stream."""
        deadline = trio.current_time() + self.drain_timeout_s
        pending = set(self.acked)
        while pending and trio.current_time() < deadline:
            for run in list(pending):
                r = await client.get(f"{RUNS}/{run}")
                if r.status_code == 200 and r.json()["status"] in TERMINAL:
                    pending.discard(run)
            if pending:
                await trio.sleep(0.2)
        for run in sorted(pending):
            self.problem(f"run {run} did not reach a final state in {self.drain_timeout_s}s")
        for track in self.streams.values():
            for _ in range(3):
                if track.complete:
                    break
                await self._read_stream(client, track)
            if not track.complete:
                self.problem(f"stream of {track.run} never ended")

    async def _final_checks(self, client: httpx.AsyncClient) -> None:
        for run, s in self.acked.items():
            r = await client.get(f"{RUNS}/{run}/result")
            if r.status_code != 200:
                self.problem(f"result of {run} answered {r.status_code} after the drain")
                continue
            body = r.json()
            self._record_finished(run, body)
            status = body["status"]
            if run in self.cancels and status != "cancelled":
                self.problem(f"acknowledged cancel of {run} ended {status}")
            if status == "succeeded":
                self._check_result(run, s, body["result"])
        for track in self.streams.values():
            events = await all_events(client, track.run)
            if track.frames != events:
                self.problem(
                    f"stream of {track.run} read in {track.connections} piece(s) differs "
                    f"from /events: {len(track.frames)} frames vs {len(events)} events; "
                    f"stream ids {[f[0] for f in track.frames]} vs {[e[0] for e in events]}"
                )
        self._sample_rss()

    def _check_result(self, run: str, s: Submitted, result: Any) -> None:
        body = s.body
        if body.get("runner") == "marker":
            seen = (result["prompt"], result["config"], result["session_id"])
            sent = (body["prompt"], body["config"], body.get("session_id"))
            if seen != sent:
                self.problem(f"run {run} ran with {seen!r}, submitted {sent!r}")
        elif result != body["prompt"]:
            self.problem(f"echo run {run} returned {result!r}, submitted {body['prompt']!r}")

    def _check_journal_offline(self) -> None:
        """After a clean stop: `log verify` passes and every acknowledged spec is in the
        journal exactly as sent (prompt, session, config)."""
        from agentjobs.engine.journal import scan
        from agentjobs.engine.state import State, apply

        verify = subprocess.run(
            [sys.executable, "-m", "agentjobs", "log", "verify", str(self.data_dir)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if verify.returncode != 0:
            self.problem(f"log verify exited {verify.returncode}: {verify.stdout[-1000:]}")
        state = State()
        report = scan(self.data_dir / "journal", lambda ev: apply(state, ev))
        if report.damage is not None:
            self.problem(f"journal damaged after a clean stop: {report.damage}")
        for run, s in self.acked.items():
            found = state.runs.get(run)
            if found is None:
                self.problem(f"acknowledged run {run} is not in the journal")
                self.report.lost += 1
                continue
            spec = found.spec
            got = (spec.prompt, spec.config, spec.session_id, spec.idempotency_key)
            want = (s.body["prompt"], s.body.get("config", {}), s.body.get("session_id"), s.key)
            if got != want:
                self.problem(f"journal holds {got!r} for {run}, submitted {want!r}")
            if found.status.value not in TERMINAL:
                self.problem(f"run {run} is {found.status.value} in the journal after the drain")

    def _check_markers(self) -> None:
        by_run = read_markers(self.marker_dir)
        attempts = [a for runs in by_run.values() for a in runs]
        self.report.attempts = len(attempts)
        self.report.orphans = sum(a.why == "orphan" for a in attempts)
        for a, b in overlaps(by_run):
            self.report.overlaps += 1
            self.problem(
                f"run {a.run} ran twice at once: attempt {a.attempt} (pid {a.pid}, "
                f"stopped {a.why}) and attempt {b.attempt} (pid {b.pid})"
            )
        for a in attempts:
            if a.stop_ns is None:
                self.problem(f"attempt {a.attempt} of {a.run} (pid {a.pid}) never stopped")
