"""Attempt records: which process groups a server's runs own, so a restart can stop them.

Why: the `command` runner starts each run's process in a session of its own, so that a
cancel can signal everything the command spawned as one group. The other side of that
coin is that nothing stops the group when the *server* dies (`kill -9`, OOM killer): the
kernel signals no one, and an agent that does not watch its parent goes on working. The
restarted engine requeues the interrupted run and starts its next attempt, and the run
then runs twice at once, breaking the promise "a run is never executed by two actors at
once" (design section 2).

So each live attempt leaves a small file in `<data_dir>/attempts/` while its process group
may be alive, and the engine, at start-up and before any run is started again, stops the
groups those files describe (`AttemptRecords.stop_leftovers`). The lifecycle of a record:

1. `begin`, **before** the process is spawned: run id, attempt, the environment entries
   the process will carry (`AGENTJOBS_RUN_ID=...`, `AGENTJOBS_ATTEMPT=...`), no pid yet.
   A crash between the spawn and step 2 therefore still leaves a record, and recovery
   finds the process by those environment entries instead (a scan of `/proc/*/environ`).
2. `started(pid)`, right after the spawn: pid, process group, the process' start time
   (field 22 of `/proc/<pid>/stat`) and the kernel's boot id.
3. `remove`, once the group is gone (reaped by the runner, or stopped by recovery).

All three do blocking file IO (and `started` reads `/proc`), so the command runner calls
them in a worker thread, awaiting each before it goes on: the order above still holds.

Killing the wrong process would be worse than the bug, so recovery signals a group only
when it can tell the group is the recorded one:

- the boot id differs: a reboot killed everything; the record is just dropped;
- the recorded pid is alive with the recorded start time: it is our group leader (a
  session leader cannot change its group), so the group is ours;
- the pid is alive with another start time: the pid was recycled, which the kernel does
  not do while a process group of that number exists, so our group is gone: nothing is
  signalled;
- no process has the pid, but members of its group remain (the command exited, its
  children did not): the group is ours only if one of them carries the record's
  environment entries (inherited from the command); otherwise it is left alone.

Records are written with write-then-rename, so a reader never sees half a record, but not
fsynced: only a *process* crash can leave processes behind, and the page cache survives
that; after a power loss there are no processes to stop (and the boot id tells).

Linux only in effect: without `/proc` nothing can be verified, and records are dropped
with a warning rather than acted on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import orjson

__all__ = [
    "AttemptRecord",
    "AttemptRecords",
    "LeftoverReport",
    "boot_id",
    "process_start_ticks",
]

log = logging.getLogger("agentjobs.runners.orphans")

_FORMAT = 1
_SUFFIX = ".json"
_TMP_SUFFIX = ".tmp"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
#: The longest SIGTERM-to-SIGKILL delay recovery grants a leftover group (the record
#: carries its runner's `kill_grace_s`): start-up should not wait minutes on an orphan.
MAX_GRACE_S = 10.0
#: After SIGKILL, how long recovery waits for the group to vanish before giving up on it.
KILL_WAIT_S = 5.0
_POLL_S = 0.02


# --------------------------------------------------------------------------- /proc


@attrs.frozen(slots=True)
class _Proc:
    pid: int
    pgrp: int
    state: bytes
    start: int  # clock ticks since boot


def _parse_stat(raw: bytes, pid: int) -> _Proc | None:
    # "pid (comm) state ppid pgrp session ... starttime(22) ...": comm may hold spaces and
    # parentheses, so fields are counted from the last ")".
    fields = raw[raw.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    try:
        return _Proc(pid, int(fields[2]), fields[0], int(fields[19]))
    except ValueError:
        return None


def _read_proc(pid: int) -> _Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return _parse_stat(f.read(), pid)
    except OSError:
        return None


def _all_procs() -> list[_Proc]:
    procs = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = _read_proc(int(entry))
            if proc is not None:
                procs.append(proc)
    return procs


def _has_environ(pid: int, entries: Sequence[bytes]) -> bool:
    """Whether every one of `entries` (b"NAME=value") is in the process' environment."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = b"\0" + f.read()
    except OSError:  # gone, or another user's
        return False
    return bool(entries) and all(b"\0" + e + b"\0" in environ for e in entries)


def process_start_ticks(pid: int) -> int | None:
    """When the process started, in clock ticks since boot (None: gone, or no /proc).
    With the pid, it names one process for the life of the machine."""
    proc = _read_proc(pid)
    return None if proc is None else proc.start


def boot_id() -> str | None:
    """This boot of the kernel (None without /proc)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _proc_available() -> bool:
    return os.path.isdir("/proc/self")


def _live_groups(pgids: Iterable[int]) -> set[int]:
    """Which of `pgids` still have a member that is not a zombie (a dead orphan stays a
    zombie until PID 1 reaps it, which some container inits never do)."""
    wanted = set(pgids)
    if not wanted:
        return set()
    return {p.pgrp for p in _all_procs() if p.pgrp in wanted and p.state not in (b"Z", b"X")}


# --------------------------------------------------------------------------- records


@attrs.define(slots=True, eq=False)
class AttemptRecord:
    """The record of one attempt's process group. Created by `AttemptRecords.begin`."""

    path: Path
    data: dict[str, Any]

    def started(self, pid: int, pgid: int | None = None) -> None:
        """Add the spawned process (the leader of group `pgid`, by default `pid`).

        Never raises: if this write fails, the record from `begin` still lets recovery
        find the process by its environment, so the run goes on (with a warning)."""
        self.data.update(
            pid=pid,
            pgid=pid if pgid is None else pgid,
            start=process_start_ticks(pid),
            boot=boot_id(),
        )
        try:
            _write_atomically(self.path, self.data)
        except OSError as exc:
            log.warning(
                "run %s: could not add pid %d to its attempt record %s: %s",
                self.data.get("run"),
                pid,
                self.path,
                exc,
            )

    def remove(self) -> None:
        """Forget the record: its process group is gone."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:  # harmless: recovery will find the group gone
            log.warning("could not remove attempt record %s: %s", self.path, exc)


@attrs.frozen(slots=True)
class LeftoverReport:
    """What `stop_leftovers` found and did."""

    records: int = 0  # record files read
    stopped: tuple[str, ...] = ()  # "run_x.2 (group 1234)" for each group stopped
    stale: int = 0  # records whose processes were gone (or not provably ours)
    unstoppable: tuple[str, ...] = ()  # groups still alive after SIGKILL (records kept)


@attrs.frozen(slots=True)
class AttemptRecords:
    """The attempt records of one data dir (`<data_dir>/attempts`).

    Only one engine may use a data dir at a time (the journal's lock), so whatever records
    it finds on opening were left by an earlier process.
    """

    directory: Path

    def begin(
        self, run_id: str, attempt: int, *, environ: Sequence[str], grace_s: float
    ) -> AttemptRecord:
        """Record an attempt about to spawn its process (raises `OSError` if it cannot:
        a process we could not find again after a crash must not be started).

        `environ`: `NAME=value` entries the process (and, by inheritance, its children)
        will carry; they identify it if the server dies before `started` is recorded."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"{_UNSAFE.sub('_', run_id)[:120]}.{attempt}.{secrets.token_hex(4)}{_SUFFIX}"
        data: dict[str, Any] = {
            "format": _FORMAT,
            "run": run_id,
            "attempt": attempt,
            "environ": list(environ),
            "grace_s": grace_s,
            "recorded_at": time.time(),
            "pid": None,
        }
        path = self.directory / name
        _write_atomically(path, data)
        return AttemptRecord(path, data)

    def stop_leftovers(self) -> LeftoverReport:
        """Stop every process group an earlier server left running, and drop the records.

        Blocking (up to the largest recorded grace, at most `MAX_GRACE_S`, plus
        `KILL_WAIT_S`): call it from a worker thread. Groups are signalled together:
        SIGTERM, the grace, SIGKILL to what is left, then a wait until they are gone. A
        record whose group survives even SIGKILL (a process stuck in the kernel) is kept
        and logged, so the next start tries again.
        """
        try:
            paths = sorted(self.directory.iterdir())
        except FileNotFoundError:
            return LeftoverReport()
        records: list[tuple[Path, dict[str, Any]]] = []
        for path in paths:
            if path.name.endswith(_TMP_SUFFIX):  # a write cut short: the old version rules
                _unlink(path)
            elif path.name.endswith(_SUFFIX):
                data = _read_record(path)
                if data is None:
                    _unlink(path)
                else:
                    records.append((path, data))
        if not records:
            return LeftoverReport()
        if not _proc_available():  # pragma: no cover - not Linux
            log.warning(
                "%d attempt records in %s, but without /proc their processes cannot be "
                "verified; dropping them without stopping anything",
                len(records),
                self.directory,
            )
            for path, _ in records:
                _unlink(path)
            return LeftoverReport(records=len(records), stale=len(records))

        procs = _all_procs()
        own = os.getpgrp()
        boot = boot_id()
        targets: dict[Path, tuple[dict[str, Any], set[int]]] = {}
        stale = 0
        for path, data in records:
            if data.get("boot") not in (None, boot):
                groups: set[int] = set()  # recorded before a reboot
            else:
                groups = _groups_of(data, procs) - {own, 0, 1}
            if groups:
                targets[path] = (data, groups)
            else:
                stale += 1
                _unlink(path)
        if not targets:
            return LeftoverReport(records=len(records), stale=stale)

        everything = {g for _, groups in targets.values() for g in groups}
        for data, groups in targets.values():
            log.warning(
                "attempt %s of run %s was left running by an earlier server (process "
                "group %s); stopping it before any run starts",
                data.get("attempt"),
                data.get("run"),
                ", ".join(map(str, sorted(groups))),
            )
        grace = max(_grace_of(data) for data, _ in targets.values())
        alive = _signal_and_wait(everything, signal.SIGTERM, grace)
        if alive:
            log.warning(
                "process groups %s still alive %.3g s after SIGTERM; sending SIGKILL",
                ", ".join(map(str, sorted(alive))),
                grace,
            )
            alive = _signal_and_wait(alive, signal.SIGKILL, KILL_WAIT_S)
        stopped: list[str] = []
        unstoppable: list[str] = []
        for path, (data, groups) in targets.items():
            label = f"{data.get('run')}.{data.get('attempt')}"
            for g in sorted(groups):
                (unstoppable if g in alive else stopped).append(f"{label} (group {g})")
            if groups & alive:
                log.error(
                    "attempt %s: process group %s survived SIGKILL; keeping %s for the next start",
                    label,
                    ", ".join(map(str, sorted(groups & alive))),
                    path,
                )
            else:
                _unlink(path)
        return LeftoverReport(
            records=len(records),
            stopped=tuple(stopped),
            stale=stale,
            unstoppable=tuple(unstoppable),
        )


def _groups_of(data: dict[str, Any], procs: Sequence[_Proc]) -> set[int]:
    """The live process groups provably belonging to a record (see the module doc)."""
    environ = [str(e).encode() for e in data.get("environ") or ()]
    pid = data.get("pid")
    if not isinstance(pid, int):
        # spawned (perhaps) but never recorded: find it by its environment
        return {
            p.pgrp for p in procs if p.state not in (b"Z", b"X") and _has_environ(p.pid, environ)
        }
    pgid = data.get("pgid", pid)
    if not isinstance(pgid, int):
        return set()
    members = [p for p in procs if p.pgrp == pgid and p.state not in (b"Z", b"X")]
    if not members:
        return set()
    leader = next((p for p in procs if p.pid == pid), None)
    if leader is not None:
        # alive with its recorded start time: ours. Another start time: the pid was
        # recycled, so our group had ended (a group's number is never reused while the
        # group exists) and these members belong to a stranger.
        ours = data.get("start") is not None and leader.start == data.get("start")
        return {pgid} if ours and leader.pgrp == pgid else set()
    # the leader is gone, members remain: ours if one of them carries our environment
    if any(_has_environ(p.pid, environ) for p in members):
        return {pgid}
    return set()


def _signal_and_wait(pgids: set[int], sig: signal.Signals, wait_s: float) -> set[int]:
    """Send `sig` to each group; wait up to `wait_s` for them to go; return the living."""
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # pragma: no cover - a member changed its uid
            log.warning("no permission to send %s to process group %d", sig.name, pgid)
    deadline = time.monotonic() + wait_s
    alive = _live_groups(pgids)
    while alive and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        alive = _live_groups(alive)
    return alive


def _grace_of(data: dict[str, Any]) -> float:
    value = data.get("grace_s")
    if isinstance(value, int | float) and value >= 0:
        return min(float(value), MAX_GRACE_S)
    return MAX_GRACE_S


def _write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + _TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(orjson.dumps(data))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        log.warning("unreadable attempt record %s (%s); dropping it", path, exc)
        return None
    if not isinstance(data, dict):
        log.warning("unreadable attempt record %s (not an object); dropping it", path)
        return None
    return data


def _unlink(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:  # pragma: no cover - the directory turned read-only
        log.warning("could not remove %s: %s", path, exc)
