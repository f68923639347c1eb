"""Attempt records (agentjobs/engine/runners/_orphans.py): what a restart stops, and what not.

Real processes throughout: each test starts process groups the way the `command` runner
does (a session of their own), writes records as a server would have, and checks with
psutil, independently of the code under test, which processes are still alive after
`stop_leftovers`. The end-to-end version (a real server, `kill -9`, restart) is
tests/test_faults_crash.py::test_an_orphaned_attempt_is_stopped_before_the_run_starts_again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import trio
from fakes.context import Recorder

from agentjobs.engine import open_engine
from agentjobs.engine.runners import CommandRunner, RunError
from agentjobs.engine.runners._orphans import (
    AttemptRecord,
    AttemptRecords,
    LeftoverReport,
    boot_id,
    process_start_ticks,
)

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")

# A group leader that starts a grandchild in its group, prints the grandchild's pid, and
# then waits for a line on stdin (or forever). `TERM=ignore` makes both ignore SIGTERM.
LEADER = """
import os, signal, subprocess, sys
if os.environ.get("TERM_MODE") == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
sys.stdin.readline()
"""


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie): psutil's view, not the module's."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Group:
    """A process group started like the command runner starts one: leader + grandchild."""

    def __init__(self, env: dict[str, str] | None = None, *, ignore_term: bool = False) -> None:
        environ = {**os.environ, **(env or {})}
        if ignore_term:
            environ["TERM_MODE"] = "ignore"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LEADER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environ,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        self.pid = self.proc.pid
        self.grandchild = int(self.proc.stdout.readline())

    def end_leader(self) -> None:
        """Let the leader exit (and reap it), leaving the grandchild in the group."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.close()
        self.proc.wait(10)

    def kill(self) -> None:
        for pid in (self.pid, self.grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        self.proc.wait(10)


@pytest.fixture
def groups() -> Iterator[list[Group]]:
    started: list[Group] = []
    yield started
    for group in started:  # nothing a test started outlives it
        group.kill()


def start(groups: list[Group], env: dict[str, str] | None = None, **kwargs: Any) -> Group:
    group = Group(env, **kwargs)
    groups.append(group)
    return group


def record_of(
    records: AttemptRecords, group: Group, run: str = "run_a", attempt: int = 1, **data: Any
) -> Path:
    """A record as the runner writes it, then with `data` overriding fields on disk."""
    rec = records.begin(run, attempt, environ=_env_entries(run, attempt), grace_s=0.3)
    rec.started(group.pid)
    if data:
        current = orjson.loads(rec.path.read_bytes())
        current.update(data)
        rec.path.write_bytes(orjson.dumps(current))
    return rec.path


def _env_entries(run: str, attempt: int) -> list[str]:
    return [f"AGENTJOBS_RUN_ID={run}", f"AGENTJOBS_ATTEMPT={attempt}"]


def _env(run: str, attempt: int) -> dict[str, str]:
    return dict(e.split("=", 1) for e in _env_entries(run, attempt))


async def stop(records: AttemptRecords) -> LeftoverReport:
    return await trio.to_thread.run_sync(records.stop_leftovers)


# ------------------------------------------------------------------ what is stopped


async def test_a_record_of_a_live_group_is_killed(tmp_path: Path, groups: list[Group]) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    group = start(groups, _env("run_a", 1))
    path = record_of(records, group)
    report = await stop(records)
    assert report.stopped == (f"run_a.1 (group {group.pid})",)
    assert group.proc.wait(5) == -15  # SIGTERM did it
    assert not alive(group.grandchild)  # the whole group, not just the leader
    assert not path.exists()
    assert list(records.directory.iterdir()) == []


async def test_a_group_that_ignores_sigterm_gets_sigkill(
    tmp_path: Path, groups: list[Group]
) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    group = start(groups, _env("run_a", 1), ignore_term=True)
    record_of(records, group, grace_s=0.2)
    report = await stop(records)
    assert report.stopped and not report.unstoppable
    assert group.proc.wait(5) == -9
    assert not alive(group.grandchild)


async def test_several_leftovers_are_stopped_together(tmp_path: Path, groups: list[Group]) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    first = start(groups, _env("run_a", 1))
    second = start(groups, _env("run_b", 2))
    record_of(records, first)
    record_of(records, second, run="run_b", attempt=2)
    report = await stop(records)
    assert len(report.stopped) == 2
    assert not any(alive(p) for g in (first, second) for p in (g.pid, g.grandchild))


async def test_a_group_whose_leader_exited_is_killed_when_a_member_carries_the_run(
    tmp_path: Path, groups: list[Group]
) -> None:
    """The command exited, a helper it started lives on in the group (the server died
    before it could terminate the group): the helper inherited the run's environment."""
    records = AttemptRecords(tmp_path / "attempts")
    group = start(groups, _env("run_a", 1))
    record_of(records, group)
    group.end_leader()
    assert alive(group.grandchild)
    report = await stop(records)
    assert report.stopped == (f"run_a.1 (group {group.pid})",)
    with trio.fail_after(5):
        while alive(group.grandchild):  # noqa: ASYNC110 - not our child: poll
            await trio.sleep(0.01)


async def test_a_record_without_a_pid_finds_its_process_by_environment(
    tmp_path: Path, groups: list[Group]
) -> None:
    """The server died between spawning and recording the pid."""
    records = AttemptRecords(tmp_path / "attempts")
    ours = start(groups, _env("run_a", 2))
    other_attempt = start(groups, _env("run_a", 3))
    records.begin("run_a", 2, environ=_env_entries("run_a", 2), grace_s=0.3)
    report = await stop(records)
    assert report.stopped == (f"run_a.2 (group {ours.pid})",)
    assert ours.proc.wait(5) == -15
    assert alive(other_attempt.pid) and alive(other_attempt.grandchild)


# ------------------------------------------------------------------ what is not


async def test_a_stale_record_whose_pid_was_recycled_is_not_killed(
    tmp_path: Path, groups: list[Group]
) -> None:
    """Same pid, another start time: another process now has the pid (and its group)."""
    records = AttemptRecords(tmp_path / "attempts")
    stranger = start(groups, _env("run_a", 1))  # even with our environment: the time rules
    ticks = process_start_ticks(stranger.pid)
    assert ticks is not None
    path = record_of(records, stranger, start=ticks - 1)
    report = await stop(records)
    assert report.stopped == () and report.stale == 1
    assert alive(stranger.pid) and alive(stranger.grandchild)
    assert not path.exists()


async def test_a_leaderless_group_without_the_run_environment_is_not_killed(
    tmp_path: Path, groups: list[Group]
) -> None:
    """The leader is gone and nothing in the group proves it ours: left alone."""
    records = AttemptRecords(tmp_path / "attempts")
    group = start(groups, {"AGENTJOBS_RUN_ID": "run_other"})
    record_of(records, group)
    group.end_leader()
    report = await stop(records)
    assert report.stopped == () and report.stale == 1
    assert alive(group.grandchild)


async def test_a_record_from_another_boot_is_dropped(tmp_path: Path, groups: list[Group]) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    group = start(groups, _env("run_a", 1))
    path = record_of(records, group, boot="00000000-0000-0000-0000-000000000000")
    assert boot_id() not in (None, "00000000-0000-0000-0000-000000000000")
    report = await stop(records)
    assert report.stopped == () and report.stale == 1
    assert alive(group.pid) and not path.exists()


async def test_a_record_of_a_finished_group_is_just_removed(
    tmp_path: Path, groups: list[Group]
) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    group = start(groups, _env("run_a", 1))
    path = record_of(records, group)
    group.kill()
    report = await stop(records)
    assert report == LeftoverReport(records=1, stale=1)
    assert not path.exists()


async def test_unreadable_records_and_cut_writes_are_removed(tmp_path: Path) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    assert await stop(records) == LeftoverReport()  # no directory yet
    records.directory.mkdir()
    (records.directory / "run_a.1.00.json").write_bytes(b'{"run": "run_a", "pi')
    (records.directory / "run_b.1.00.json").write_bytes(b"[1, 2]")
    (records.directory / "run_c.1.00.json.tmp").write_bytes(b"{}")
    assert await stop(records) == LeftoverReport()
    assert list(records.directory.iterdir()) == []


def test_start_ticks_name_one_process() -> None:
    me = psutil.Process()
    ticks = process_start_ticks(me.pid)
    assert ticks is not None
    # psutil derives create_time from the same field: ticks / CLK_TCK + boot time
    hz = os.sysconf("SC_CLK_TCK")
    assert abs(ticks / hz + psutil.boot_time() - me.create_time()) < 1.0
    assert process_start_ticks(2**22 + 12345) is None  # above pid_max: no such process


# ------------------------------------------------------------------ the command runner


async def test_the_command_runner_records_its_group_while_it_runs(tmp_path: Path) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    runner = CommandRunner(["sh", "-c", "echo up; sleep 0.5"])
    runner.attach_attempt_records(records)
    rec = Recorder()
    seen: list[dict[str, Any]] = []

    async def look() -> None:
        await rec.wait_output(lambda text: "up" in text)
        for path in records.directory.iterdir():
            seen.append(orjson.loads(path.read_bytes()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(look)
        await runner.run(rec.ctx(run_id="run_rec", attempt=3))
    assert len(seen) == 1, seen
    data = seen[0]
    assert (data["run"], data["attempt"], data["pid"]) == ("run_rec", 3, data["pgid"])
    assert data["environ"] == ["AGENTJOBS_RUN_ID=run_rec", "AGENTJOBS_ATTEMPT=3"]
    assert data["boot"] == boot_id()
    assert isinstance(data["start"], int)
    assert list(records.directory.iterdir()) == []  # removed once the group was gone


async def test_a_cancelled_command_leaves_no_record(tmp_path: Path) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    runner = CommandRunner(["sh", "-c", "sleep 30 & echo up; wait"], kill_grace_s=0.3)
    runner.attach_attempt_records(records)
    rec = Recorder()
    async with trio.open_nursery() as nursery:

        async def cancel_when_up() -> None:
            await rec.wait_output(lambda text: "up" in text)
            assert len(list(records.directory.iterdir())) == 1
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_when_up)
        await runner.run(rec.ctx())
    assert list(records.directory.iterdir()) == []


async def test_the_record_is_written_off_the_event_loop_before_the_spawn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`begin` (mkdir, write, rename), `started` (/proc reads, write, rename) and `remove`
    run in worker threads, not on trio's thread; still `begin` is done before the command
    runs and `started` has pinned its pid before the runner does anything else."""
    loop_thread = threading.get_ident()
    marker = tmp_path / "ran"
    calls: list[tuple[str, bool, Any]] = []
    real_begin = AttemptRecords.begin
    real_started = AttemptRecord.started
    real_remove = AttemptRecord.remove

    def begin(self: AttemptRecords, *args: Any, **kwargs: Any) -> AttemptRecord:
        record = real_begin(self, *args, **kwargs)
        calls.append(("begin", threading.get_ident() == loop_thread, marker.exists()))
        return record

    def started(self: AttemptRecord, pid: int, pgid: int | None = None) -> None:
        real_started(self, pid, pgid)
        on_disk = orjson.loads(self.path.read_bytes())
        calls.append(("started", threading.get_ident() == loop_thread, on_disk["pid"] == pid))

    def remove(self: AttemptRecord) -> None:
        real_remove(self)
        calls.append(("remove", threading.get_ident() == loop_thread, self.path.exists()))

    monkeypatch.setattr(AttemptRecords, "begin", begin)
    monkeypatch.setattr(AttemptRecord, "started", started)
    monkeypatch.setattr(AttemptRecord, "remove", remove)
    records = AttemptRecords(tmp_path / "attempts")
    runner = CommandRunner(["sh", "-c", f"touch {marker}; echo up"])
    runner.attach_attempt_records(records)
    rec = Recorder()
    await runner.run(rec.ctx(run_id="run_thread"))
    assert rec.text == "up\n" and marker.exists()
    # (name, ran on trio's thread, what it saw: command not started yet / pid on disk /
    # record still there)
    assert calls == [("begin", False, False), ("started", False, True), ("remove", False, False)]
    assert list(records.directory.iterdir()) == []


async def test_a_cancel_while_the_record_is_written_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled while `begin` is still writing in its thread: the record it writes is
    removed and no process outlives the run."""
    writing = threading.Event()
    real_begin = AttemptRecords.begin

    def slow_begin(self: AttemptRecords, *args: Any, **kwargs: Any) -> AttemptRecord:
        writing.set()
        time.sleep(0.3)
        return real_begin(self, *args, **kwargs)

    monkeypatch.setattr(AttemptRecords, "begin", slow_begin)
    records = AttemptRecords(tmp_path / "attempts")
    marker = tmp_path / "ran"
    runner = CommandRunner(["sh", "-c", f"touch {marker}; exec sleep 30"], kill_grace_s=0.3)
    runner.attach_attempt_records(records)
    rec = Recorder()
    async with trio.open_nursery() as nursery:

        async def cancel_while_writing() -> None:
            await trio.to_thread.run_sync(writing.wait, 5)
            nursery.cancel_scope.cancel()

        nursery.start_soon(cancel_while_writing)
        await runner.run(rec.ctx(run_id="run_cancel_begin"))
    assert writing.is_set()
    assert list(records.directory.iterdir()) == []
    leftovers = [
        p.pid
        for p in psutil.process_iter(["environ"])
        if "run_cancel_begin" in str((p.info.get("environ") or {}).get("AGENTJOBS_RUN_ID"))
    ]
    assert leftovers == []


async def test_without_records_nothing_is_written(tmp_path: Path) -> None:
    records = AttemptRecords(tmp_path / "attempts")
    runner = CommandRunner(["true"])
    runner.attach_attempt_records(records)
    runner.detach_attempt_records(records)
    await runner.run(Recorder().ctx())
    assert not records.directory.exists()


async def test_a_command_is_not_started_when_its_group_cannot_be_recorded(
    tmp_path: Path,
) -> None:
    (tmp_path / "attempts").write_text("a file where the directory should be")
    marker = tmp_path / "started"
    runner = CommandRunner(["touch", str(marker)])
    runner.attach_attempt_records(AttemptRecords(tmp_path / "attempts"))
    with pytest.raises(RunError) as info:
        await runner.run(Recorder().ctx())
    assert info.value.retryable
    assert "cannot record" in info.value.message
    assert not marker.exists()


# ------------------------------------------------------------------ the engine


async def test_the_engine_stops_leftovers_before_it_starts_runs(
    tmp_path: Path, groups: list[Group]
) -> None:
    """Records left by a dead server are acted on at open; the engine's own runs are
    recorded while they run; closing the engine detaches the runner."""
    data = tmp_path / "data"
    records = AttemptRecords(data / "attempts")
    orphan = start(groups, _env("run_gone", 1))
    record_of(records, orphan, run="run_gone")
    runner = CommandRunner(
        ["sh", "-c", 'ls "$ATTEMPTS"; sleep 0.2'], env={"ATTEMPTS": str(records.directory)}
    )
    async with open_engine(data, runners={"cmd": runner}) as engine:
        assert orphan.proc.poll() is not None or not alive(orphan.pid)
        assert not alive(orphan.grandchild)
        run = await engine.submit("hi")
        finished = await engine.wait(run.id, timeout=10)
        assert finished.status.value == "succeeded", finished.error
        # the only record while it ran was its own
        (name,) = str(finished.result).split()
        assert name.startswith(f"{run.id}.1.")
    assert list(records.directory.iterdir()) == []
    assert runner._records is None


async def test_an_engine_without_a_data_dir_records_nothing(tmp_path: Path) -> None:
    runner = CommandRunner(["true"])
    async with open_engine(None, durability="memory", runners={"cmd": runner}) as engine:
        assert runner._records is None
        run = await engine.submit("hi")
        assert (await engine.wait(run.id, timeout=10)).status.value == "succeeded"
