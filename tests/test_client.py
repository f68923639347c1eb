"""`agentjobs.client` against the real server: every method, typed errors, retries that are
safe, stream resume after the connection is cut mid-stream, a shared client in a thread
pool, and the async client under trio and asyncio."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pytest
import trio
from live_server import LiveServer, ServerProcess

from agentjobs.client import (
    AgentJobsError,
    AlreadyFinished,
    APIError,
    AsyncClient,
    BadRequest,
    CancelledEvent,
    Client,
    ErrorEvent,
    IdempotencyConflict,
    NotFinished,
    NotFound,
    OutputEvent,
    ProgressEvent,
    ResultEvent,
    Run,
    RunCancelled,
    RunFailed,
    RunResult,
    ServiceUnavailable,
    ShutdownEvent,
    Status,
    StatusEvent,
    StreamEvent,
    TransportError,
    ValidationError,
    WaitTimeout,
)

PROBLEMS = "https://agentjobs.dev/problems/"


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("client-server")
    args = ("--durability", "memory", "--max-concurrency", "16", "--grace-period", "0")
    with ServerProcess(data, *args) as proc:
        yield proc


@pytest.fixture
def client(server: ServerProcess) -> Iterator[Client]:
    with Client(server.url, timeout=10) as c:
        yield c


class CuttingProxy:
    """A TCP proxy on loopback that a test can use to break connections on purpose.

    `cut_all()` kills every open connection mid-flight (both sides, no goodbye);
    `swallow = n` makes the next n connections pass the request on but drop the answer
    (the server acted, the client never hears). `requests` keeps what each connection
    sent, to check the headers a client used.
    """

    def __init__(self, target_url: str) -> None:
        host, port = target_url.removeprefix("http://").split(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        self.swallow = 0
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            with self._lock:
                swallow = self.swallow > 0
                if swallow:
                    self.swallow -= 1
                self._pairs.append((down, up))
                index = len(self.requests)
                self.requests.append(b"")
            threading.Thread(target=self._upstream, args=(down, up, index), daemon=True).start()
            threading.Thread(target=self._downstream, args=(up, down, swallow), daemon=True).start()

    def _upstream(self, down: socket.socket, up: socket.socket, index: int) -> None:
        try:
            while data := down.recv(65536):
                with self._lock:
                    self.requests[index] += data
                up.sendall(data)
        except OSError:
            pass

    def _downstream(self, up: socket.socket, down: socket.socket, swallow: bool) -> None:
        try:
            while data := up.recv(65536):
                if swallow:
                    break
                down.sendall(data)
        except OSError:
            pass
        self._kill(down, up)

    @staticmethod
    def _kill(*socks: socket.socket) -> None:
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def cut_all(self) -> int:
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            self._kill(*pair)
        return len(pairs)

    def headers_of(self, index: int) -> dict[str, str]:
        head = self.requests[index].split(b"\r\n\r\n", 1)[0].decode("latin-1")
        lines = head.split("\r\n")[1:]
        return {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}

    def close(self) -> None:
        self.listener.close()
        self.cut_all()


@pytest.fixture
def proxy(server: ServerProcess) -> Iterator[CuttingProxy]:
    p = CuttingProxy(server.url)
    yield p
    p.close()


def _ids_key(event_id: str | None) -> tuple[int, int]:
    assert event_id is not None
    seq, _, part = event_id.partition(".")
    return int(seq), int(part) if part else 1_000


# -- every method ------------------------------------------------------------------------


def test_submit_get_result(client: Client, server: ServerProcess) -> None:
    run = client.submit("hello", config={"delay_s": 0.2}, session_id="s-basic")
    assert isinstance(run, Run)
    assert run.id.startswith("run_")
    assert run.status is Status.QUEUED
    assert not run.replayed
    assert isinstance(run.created_at, datetime) and run.created_at.tzinfo is not None
    assert abs((datetime.now(UTC) - run.created_at).total_seconds()) < 60
    # the server sends paths; the client makes them usable on their own
    assert run.poll_url == f"{server.url}/api/v1/runs/{run.id}"
    assert run.stream_url == f"{server.url}/api/v1/runs/{run.id}/stream"

    now = client.get(run.id)
    assert now.id == run.id
    assert now.session_id == "s-basic"
    assert now.status in (Status.QUEUED, Status.RUNNING)

    with pytest.raises(NotFinished) as info:
        client.result(run.id)
    err = info.value
    assert (
        err.status == 409 and err.type == PROBLEMS + "not-finished" and err.slug == "not-finished"
    )
    assert err.title and "not complete" in err.detail
    assert err.retry_after is not None and err.retry_after >= 1
    assert isinstance(err, APIError) and isinstance(err, AgentJobsError)

    outcome = client.result(run.id, wait=10)  # a long-poll, not a sleep loop
    assert outcome.ok and outcome.status is Status.SUCCEEDED
    assert outcome.result == "hello"
    assert outcome.duration_seconds is not None and outcome.duration_seconds >= 0.2
    assert outcome.raise_for_status() is outcome
    finished = client.get(run.id)
    assert finished.finished and finished.progress.percentage == 100.0
    assert finished.retry_after is None


def test_result_wait_spans_several_long_polls_then_wait_timeout(
    client: Client, server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agentjobs.client._sync as sync_client

    monkeypatch.setattr(sync_client, "LONG_POLL_S", 0.2)  # the server caps waits too
    run = client.submit("slow", config={"delay_s": 30})
    requests: list[str] = []
    with Client(server.url) as c:
        c._http.event_hooks["request"] = [lambda r: requests.append(str(r.url))]
        t0 = time.monotonic()
        with pytest.raises(NotFinished):
            c.result(run.id, wait=0.7)
        assert 0.6 < time.monotonic() - t0 < 5
        # several long-polls of at most 0.2 s each, none of them answered early
        assert len(requests) >= 3
        assert all("wait=0." in u for u in requests[:-1]), requests
        with pytest.raises(WaitTimeout) as info:
            c.wait(run.id, timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert info.value.run_id == run.id
    client.cancel(run.id)
    # and a run that finishes while waited on is returned at once
    quick = client.submit("quick", config={"delay_s": 0.3})
    t0 = time.monotonic()
    assert client.result(quick.id, wait=20).result == "quick"
    assert time.monotonic() - t0 < 5


def test_submit_and_wait_outcomes(client: Client) -> None:
    ok = client.submit_and_wait("fine", timeout=20)
    assert ok.result == "fine"

    with pytest.raises(RunFailed) as failed:
        client.submit_and_wait("x", config={"fail": "it broke"}, timeout=20)
    assert failed.value.result.status is Status.FAILED
    assert failed.value.result.error == "it broke"

    unchecked = client.submit_and_wait("x", config={"fail": "again"}, timeout=20, check=False)
    assert not unchecked.ok and unchecked.error == "again"
    with pytest.raises(RunFailed):
        unchecked.raise_for_status()


def test_cancel_and_delete(client: Client) -> None:
    run = client.submit("long", config={"delay_s": 30, "steps": 30})
    deadline = time.monotonic() + 10
    while client.get(run.id).status is not Status.RUNNING:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    cancelled = client.cancel(run.id)
    assert cancelled.status is Status.CANCELLED
    outcome = client.wait(run.id, timeout=10)
    assert outcome.status is Status.CANCELLED
    with pytest.raises(RunCancelled):
        outcome.raise_for_status()
    with pytest.raises(AlreadyFinished) as info:
        client.cancel(run.id)
    assert info.value.status == 409 and info.value.slug == "already-finished"

    queued_long = client.submit("long", config={"delay_s": 30})
    with pytest.raises(NotFinished):
        client.delete(queued_long.id)  # only finished runs can be deleted
    client.cancel(queued_long.id)

    client.delete(run.id)
    with pytest.raises(NotFound) as gone:
        client.get(run.id)
    assert gone.value.status == 404 and run.id in gone.value.detail
    with pytest.raises(NotFound):
        client.delete(run.id)


def test_list_follows_cursors_across_pages(client: Client, server: ServerProcess) -> None:
    session = f"s-list-{time.monotonic_ns()}"
    ids = [client.submit(f"p{i}", session_id=session).id for i in range(7)]
    for run_id in ids:
        client.wait(run_id, timeout=20)
    pages: list[str] = []

    def count(request: object) -> None:
        pages.append(str(getattr(request, "url", "")))

    with Client(server.url) as c:
        c._http.event_hooks["request"] = [count]
        listed = [r.id for r in c.list(session_id=session, page_size=2)]
    assert listed == ids[::-1]  # newest first, every page, nothing twice
    assert len(pages) == 4 and sum("cursor=" in p for p in pages) == 3
    assert [r.id for r in client.list(session_id=session, limit=3, page_size=2)] == ids[::-1][:3]
    assert [r.id for r in client.list(session_id=session, status="failed")] == []
    assert all(r.status is Status.SUCCEEDED for r in client.list(session_id=session))
    with pytest.raises(BadRequest) as bad:
        list(client.list(status="bogus"))
    assert bad.value.status == 400 and "bogus" in bad.value.detail


def test_validation_errors_name_the_field(client: Client) -> None:
    with pytest.raises(ValidationError) as info:
        client.submit("x", bogus_option=1)
    err = info.value
    assert err.status == 422 and err.slug == "validation-error"
    assert [e["field"] for e in err.errors] == ["bogus_option"]
    with pytest.raises(ValidationError) as empty:
        client.submit("   ")
    assert empty.value.errors[0]["field"] == "prompt"
    with pytest.raises(ValueError):
        client.get("bad/id")


def test_idempotency_keys(client: Client) -> None:
    key = f"key-{time.monotonic_ns()}"
    first = client.submit("same", idempotency_key=key)
    again = client.submit("same", idempotency_key=key)
    assert again.id == first.id and again.replayed and not first.replayed
    with pytest.raises(IdempotencyConflict) as info:
        client.submit("different", idempotency_key=key)
    assert info.value.status == 422 and first.id in info.value.detail
    # without a key given, every call gets its own: two submits are two runs
    assert client.submit("same").id != client.submit("same").id


def test_health_and_base_url_from_environment(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENTJOBS_URL", server.url + "/")
    with Client() as c:
        assert c.base_url == server.url
        assert c.health()["status"] == "healthy"


# -- headers, retries, transport failures ----------------------------------------------


def test_api_key_and_idempotency_key_headers(proxy: CuttingProxy) -> None:
    with Client(proxy.url, api_key="s3cret") as c:
        run = c.submit("with headers")
        c.get(run.id)
    submit_headers = proxy.headers_of(0)
    assert submit_headers["authorization"] == "Bearer s3cret"
    assert len(submit_headers["idempotency-key"]) == 32
    assert submit_headers["user-agent"].startswith("agentjobs-client/")


def test_submit_retry_after_a_lost_answer_reuses_the_key(
    proxy: CuttingProxy, client: Client
) -> None:
    session = f"s-retry-{time.monotonic_ns()}"
    proxy.swallow = 2  # the server accepts the run twice over, the client hears nothing
    with Client(proxy.url, max_retries=3) as c:
        run = c.submit("exactly once", session_id=session)
    assert run.replayed  # the third attempt got the run the first attempt created
    keys = {proxy.headers_of(i)["idempotency-key"] for i in range(len(proxy.requests))}
    assert len(proxy.requests) == 3 and len(keys) == 1
    assert [r.id for r in client.list(session_id=session)] == [run.id]


def test_a_lost_answer_is_not_retried_for_cancel(proxy: CuttingProxy, client: Client) -> None:
    run = client.submit("to cancel", config={"delay_s": 30})
    proxy.swallow = 1
    with Client(proxy.url, max_retries=3) as c, pytest.raises(TransportError):
        c.cancel(run.id)
    assert len(proxy.requests) == 1  # not resent: the server did act on it
    assert client.wait(run.id, timeout=10).status is Status.CANCELLED


def test_unreachable_server_is_a_transport_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with Client(f"http://127.0.0.1:{port}", max_retries=1) as c:
            t0 = time.monotonic()
            with pytest.raises(TransportError, match="cannot reach") as info:
                c.get("run_x")
            assert time.monotonic() - t0 < 5
    assert info.value.__cause__ is not None


def test_503_queue_full_is_typed_and_retried(tmp_path: Path) -> None:
    args = ("--durability", "memory", "--max-queue", "1", "--max-concurrency", "1")
    args += ("--grace-period", "0")
    with ServerProcess(tmp_path, *args) as srv, Client(srv.url, max_retries=0) as c:
        a = c.submit("a", config={"delay_s": 30})
        deadline = time.monotonic() + 10
        while c.get(a.id).status is not Status.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        b = c.submit("b", config={"delay_s": 30})
        with pytest.raises(ServiceUnavailable) as info:
            c.submit("c")
        assert info.value.status == 503 and info.value.slug == "queue-full"
        assert info.value.retry_after is not None and info.value.retry_after >= 1
        # with retries, the submit gets in once the queue has room
        timer = threading.Timer(0.3, c.cancel, args=(b.id,))
        timer.start()
        with Client(srv.url, max_retries=4) as patient:
            late = patient.submit("c")
        timer.join()
        assert late.status is Status.QUEUED and not late.replayed
        c.cancel(a.id)


# -- streams -----------------------------------------------------------------------------


def test_stream_yields_typed_events_in_order(client: Client) -> None:
    run = client.submit("a b c", config={"delay_s": 0.4, "steps": 2, "output": True})
    events = list(client.stream(run.id))
    names = [e.event for e in events]
    assert names[0] == "status" and names[-1] == "result"
    assert isinstance(events[0], StatusEvent) and events[0].status is Status.QUEUED
    assert any(isinstance(e, ProgressEvent) and e.steps_total == 2 for e in events)
    assert "".join(e.text for e in events if isinstance(e, OutputEvent)) == "a b c "
    last = events[-1]
    assert isinstance(last, ResultEvent) and last.terminal and last.result == "a b c"
    assert all(e.job_id == run.id for e in events)
    keys = [_ids_key(e.id) for e in events]
    assert keys == sorted(set(keys))
    # a finished run replays the same events; `after=` continues after a given one
    assert [e.id for e in client.stream(run.id)] == [e.id for e in events]
    assert [e.id for e in client.stream(run.id, after=events[2].id)] == [e.id for e in events[3:]]


def test_stream_of_failed_and_cancelled_runs(client: Client) -> None:
    failed = client.submit("x", config={"fail": "nope"})
    last = list(client.stream(failed.id))[-1]
    assert isinstance(last, ErrorEvent) and last.error == "nope" and last.terminal

    slow = client.submit("x", config={"delay_s": 30})
    with client.stream(slow.id) as events:
        first = next(events)
        assert isinstance(first, StatusEvent)
        client.cancel(slow.id)
        rest = list(events)
    assert isinstance(rest[-1], CancelledEvent)
    with pytest.raises(NotFound):
        next(iter(client.stream("run_missing")))


def test_stream_resumes_after_the_connection_is_cut(proxy: CuttingProxy, client: Client) -> None:
    run = client.submit("one two three four", config={"delay_s": 1.2, "steps": 6, "output": True})
    seen: list[StreamEvent] = []
    cuts = 0
    with Client(proxy.url) as c, c.stream(run.id) as events:
        for event in events:
            seen.append(event)
            progress = sum(isinstance(e, ProgressEvent) for e in seen)
            if progress in (2, 4) and cuts < progress // 2:
                cuts += 1
                assert proxy.cut_all() >= 1  # mid-stream, no goodbye
        reconnects = events.reconnects
    assert cuts == 2 and reconnects >= 2
    # nothing lost, nothing repeated: the same events as an uncut reading
    assert [e.id for e in seen] == [e.id for e in client.stream(run.id)]
    assert isinstance(seen[-1], ResultEvent)
    resumed = [proxy.headers_of(i).get("last-event-id") for i in range(len(proxy.requests))]
    assert resumed[0] is None and all(resumed[1:]), resumed


# -- threads, trio, asyncio ---------------------------------------------------------------


def test_one_client_shared_by_a_thread_pool(client: Client) -> None:
    def job(i: int) -> tuple[str, object]:
        outcome = client.submit_and_wait(f"t{i}", config={"delay_s": 0.01 * (i % 4)}, timeout=30)
        return outcome.id, outcome.result

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(job, range(96)))
    assert [r for _, r in results] == [f"t{i}" for i in range(96)]
    assert len({run_id for run_id, _ in results}) == 96


async def test_async_client_under_trio(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("async", config={"delay_s": 0.3, "steps": 3}, session_id="trio")
        assert run.status is Status.QUEUED
        assert (await c.get(run.id)).id == run.id
        with pytest.raises(NotFinished):
            await c.result(run.id)
        events = [e async for e in c.stream(run.id)]
        assert isinstance(events[-1], ResultEvent) and events[-1].result == "async"
        assert (await c.result(run.id, wait=5)).result == "async"
        assert (await c.submit_and_wait("again", timeout=10)).result == "again"
        with pytest.raises(RunFailed):
            await c.submit_and_wait("x", config={"fail": "bad"}, timeout=10)
        slow = await c.submit("slow", config={"delay_s": 30})
        with pytest.raises(WaitTimeout):
            await c.wait(slow.id, timeout=0.2)
        assert (await c.cancel(slow.id)).status is Status.CANCELLED
        with pytest.raises(AlreadyFinished):
            await c.cancel(slow.id)
        await c.delete(slow.id)
        with pytest.raises(NotFound):
            await c.get(slow.id)
        listed = [r.id async for r in c.list(session_id="trio", page_size=1)]
        assert listed == [run.id]
        assert (await c.health())["status"] == "healthy"


async def test_async_stream_resumes_after_the_connection_is_cut(
    live_server: LiveServer,
) -> None:
    proxy = CuttingProxy(live_server.url)
    try:
        async with AsyncClient(proxy.url) as c:
            run = await c.submit("a b", config={"delay_s": 0.8, "steps": 4, "output": True})
            seen: list[StreamEvent] = []
            async with c.stream(run.id) as events:
                async for event in events:
                    seen.append(event)
                    if len(seen) == 3:
                        proxy.cut_all()
                assert events.reconnects >= 1
            full = [e.id async for e in c.stream(run.id)]
        assert [e.id for e in seen] == full
        assert isinstance(seen[-1], ResultEvent)
    finally:
        proxy.close()


def test_async_client_under_asyncio(server: ServerProcess) -> None:
    async def main() -> None:
        async with AsyncClient(server.url) as c:
            outcomes = await asyncio.gather(
                *(c.submit_and_wait(f"a{i}", timeout=20) for i in range(10))
            )
            assert [o.result for o in outcomes] == [f"a{i}" for i in range(10)]
            run = await c.submit("s", config={"delay_s": 0.2, "steps": 2})
            names = [e.event async for e in c.stream(run.id)]
            assert names[-1] == "result"

    asyncio.run(main())


async def test_trio_cancel_scope_ends_a_long_poll(live_server: LiveServer) -> None:
    async with AsyncClient(live_server.url) as c:
        run = await c.submit("slow", config={"delay_s": 30})
        t0 = trio.current_time()
        with trio.move_on_after(0.3):
            await c.wait(run.id)
        assert trio.current_time() - t0 < 2
        assert (await c.cancel(run.id)).status is Status.CANCELLED


def test_wait_and_stream_carry_on_across_a_server_restart(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ("--durability", "os", "--port", str(port), "--grace-period", "0")
    srv = ServerProcess(tmp_path, *args)
    waited: dict[str, object] = {}
    try:
        with Client(srv.url) as c:
            run = c.submit("through a restart", config={"delay_s": 1.0, "steps": 4, "output": True})
            waiter = threading.Thread(
                target=lambda: waited.update(outcome=c.wait(run.id, timeout=60))
            )
            waiter.start()
            seen: list[StreamEvent] = []
            restarted = False
            with c.stream(run.id) as events:
                for event in events:
                    seen.append(event)
                    if not restarted and isinstance(event, ProgressEvent):
                        restarted = True
                        assert srv.terminate() == 0  # the run is requeued, durably
                        time.sleep(3)  # longer than the per-request retries last
                        srv = ServerProcess(tmp_path, *args)  # same port, same journal
            waiter.join(60)
            full = [e.id for e in c.stream(run.id)]
    finally:
        srv.__exit__(None, None, None)
    outcome = waited["outcome"]
    assert isinstance(outcome, RunResult) and outcome.result == "through a restart"
    assert any(isinstance(e, ShutdownEvent) for e in seen)  # the old server said goodbye
    assert isinstance(seen[-1], ResultEvent)
    # every event of the run exactly once, across both servers
    assert [e.id for e in seen if not isinstance(e, ShutdownEvent)] == full
