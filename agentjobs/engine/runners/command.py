"""`command`: one subprocess per run, for command-line agents and scripts.

The operator configures an argv template; each run starts it in a **new session** (so the
child and everything it spawns share one process group we can signal as a whole), feeds the
prompt on stdin (or substitutes it into the argv), streams stdout line by line as `output`,
and returns stdout (text or JSON) as the result.

Why the care around termination: a run is only `cancelled` once its work has really stopped
(design section 1). CLI agents spawn helpers (shells, language servers, browsers) and some
ignore SIGTERM, so on cancel, timeout, or even after a normal exit we signal the whole group:
SIGTERM, up to `kill_grace_s` for it to go, then SIGKILL, and we reap the child. That cleanup
runs inside a shielded cancel scope with its own deadline, because it happens precisely when
we are being cancelled. A grandchild that calls `setsid()` itself leaves the group and is out
of reach (only a cgroup could follow it); well-behaved agents do not do that.

The other side of a session of its own: when the *server* dies (`kill -9`), nothing stops
the group, and the restarted engine would start the run's next attempt beside it. So, when
the engine has a data dir, each attempt's group is recorded there while it may be alive
(`_orphans.py`: before the spawn, then with its pid and start time), and the engine stops
whatever the records describe before it starts any run. We do not use PR_SET_PDEATHSIG:
it fires when the *thread* that forked the child exits, and trio forks from a worker
thread that exits after 10 s idle, which would kill healthy commands.

Security: the argv is executed directly, never through a shell, unless the operator sets
`shell=True`; then placeholders are shell-quoted. The child gets only the allow-listed
environment variables of the server, plus explicit `env` additions, so server secrets (API
keys) do not leak into agent processes by default.
"""

from __future__ import annotations

import codecs
import contextlib
import fnmatch
import functools
import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Literal

import attrs
import orjson
import trio

from ._base import RunContext, RunError
from ._orphans import AttemptRecord, AttemptRecords
from .config import RunnerConfigError

__all__ = ["DEFAULT_ENV_ALLOW", "CommandRunner"]

log = logging.getLogger("agentjobs.runners.command")

#: Environment variables passed through when the operator gives no `env_allow`: enough for
#: programs to find executables, a home directory, a locale and a temp dir; nothing secret.
DEFAULT_ENV_ALLOW: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_*",
    "TZ",
    "TMPDIR",
)

_PLACEHOLDER = re.compile(r"\{(prompt|run_id|session_id|attempt)\}")
# A line longer than this is streamed in pieces, so one huge line cannot grow memory.
_MAX_LINE_CHARS = 64 * 1024
# After the child exits, how long its output pipes may stay open (held by a straggler
# grandchild) before we stop waiting and terminate the group.
_DRAIN_S = 1.0
# Beyond kill_grace_s, how long the shielded cleanup may take in total (SIGKILL + reap).
_REAP_EXTRA_S = 5.0
_POLL_S = 0.05


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    if math.isnan(value) or value < 0 or (value == 0 and not allow_zero):
        raise RunnerConfigError(f"{name}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):  # a lone string is a classic mistake for a list of strings
        raise RunnerConfigError(f"expected a list of strings, got the string {value!r}")
    return tuple(value)


@attrs.define(slots=True, eq=False)
class CommandRunner:
    """Run a subprocess per run. See the module docstring for the why; options:

    - `argv`: the command and its arguments. Elements may contain `{prompt}`, `{run_id}`,
      `{session_id}` and `{attempt}`; nothing else in braces is touched. With `shell=True`,
      `argv` is one string, a `/bin/sh -c` script, and placeholders are shell-quoted.
    - `prompt_on_stdin`: send the prompt on stdin (then closed). Default: yes, unless an
      argv element uses `{prompt}`; when not, stdin is `/dev/null`.
    - `cwd`: working directory. `env_allow`: server env vars passed through (names, `*`
      globs allowed); `env`: explicit additions. The child also gets `AGENTJOBS_RUN_ID`,
      `AGENTJOBS_ATTEMPT`, `AGENTJOBS_SESSION_ID` (when set) and `AGENTJOBS_CONFIG` (the
      run's config as JSON) so an agent can read per-run settings without a shell.
    - `result`: `"text"` (stdout, stripped) or `"json"` (stdout parsed as JSON; if that
      fails, its last non-empty line).
    - `max_output_bytes`: cap on the stdout kept for the result; streaming goes on past it
      and `metrics.output_truncated` says so.
    - `stderr_tail_bytes`: how much of the end of stderr goes into the failure message.
    - `kill_grace_s`: SIGTERM-to-SIGKILL delay for the process group.
    - `timeout_s`: the runner's own limit (the engine's per-run timeout applies anyway).
    - `retryable_exit_codes`: exit codes that mean "try again" (e.g. 75, EX_TEMPFAIL).
    - `check_executable`: fail at construction if `argv[0]` is not found on the PATH.
    """

    argv: tuple[str, ...] = attrs.field(converter=_str_tuple)
    shell: bool = attrs.field(default=False, kw_only=True)
    cwd: str | None = attrs.field(default=None, kw_only=True)
    env: dict[str, str] = attrs.field(factory=dict, kw_only=True)
    env_allow: tuple[str, ...] = attrs.field(
        default=DEFAULT_ENV_ALLOW, converter=_str_tuple, kw_only=True
    )
    prompt_on_stdin: bool | None = attrs.field(default=None, kw_only=True)
    result: Literal["text", "json"] = attrs.field(default="text", kw_only=True)
    max_output_bytes: int = attrs.field(default=1_000_000, kw_only=True)
    stderr_tail_bytes: int = attrs.field(default=2048, kw_only=True)
    kill_grace_s: float = attrs.field(default=5.0, kw_only=True)
    timeout_s: float | None = attrs.field(default=None, kw_only=True)
    retryable_exit_codes: frozenset[int] = attrs.field(
        default=frozenset(), converter=frozenset, kw_only=True
    )
    check_executable: bool = attrs.field(default=True, kw_only=True)
    _stdin_prompt: bool = attrs.field(init=False, default=True)
    _records: AttemptRecords | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        if not self.argv or not all(isinstance(a, str) for a in self.argv):
            raise RunnerConfigError("argv: expected a non-empty list of strings")
        if self.shell and len(self.argv) != 1:
            raise RunnerConfigError(
                "argv: with shell = true, give exactly one string (the shell command line)"
            )
        if self.result not in ("text", "json"):
            raise RunnerConfigError(f"result: expected 'text' or 'json', got {self.result!r}")
        if self.max_output_bytes < 0:
            raise RunnerConfigError("max_output_bytes: must be >= 0")
        if self.stderr_tail_bytes < 0:
            raise RunnerConfigError("stderr_tail_bytes: must be >= 0")
        _positive("kill_grace_s", self.kill_grace_s, allow_zero=True)
        if self.timeout_s is not None:
            _positive("timeout_s", self.timeout_s)
        if self.cwd is not None and not os.path.isdir(self.cwd):
            raise RunnerConfigError(f"cwd: {self.cwd!r} is not a directory")
        uses_prompt_arg = any("{prompt}" in a for a in self.argv)
        self._stdin_prompt = (
            not uses_prompt_arg if self.prompt_on_stdin is None else self.prompt_on_stdin
        )
        if self.check_executable and not self.shell and "{" not in self.argv[0]:
            exe = self.argv[0]
            path = self._base_env().get("PATH", os.defpath)
            found = (
                os.access(os.path.join(self.cwd or "", exe), os.X_OK)
                if os.sep in exe
                else shutil.which(exe, path=path) is not None
            )
            if not found:
                raise RunnerConfigError(
                    f"argv: executable {exe!r} not found"
                    + ("" if os.sep in exe else " on the PATH passed to the command")
                )

    # ----------------------------------------------------------------- building the call

    def _base_env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if any(fnmatch.fnmatchcase(k, pat) for pat in self.env_allow)
        }
        env.update(self.env)
        return env

    def _argv_for(self, ctx: RunContext) -> list[str]:
        values = {
            "prompt": ctx.prompt,
            "run_id": ctx.run_id,
            "session_id": ctx.session_id or "",
            "attempt": str(ctx.attempt),
        }
        if self.shell:
            script = _PLACEHOLDER.sub(lambda m: shlex.quote(values[m.group(1)]), self.argv[0])
            return ["/bin/sh", "-c", script]
        # One pass per element: text coming from the prompt is never re-substituted.
        return [_PLACEHOLDER.sub(lambda m: values[m.group(1)], a) for a in self.argv]

    def _env_for(self, ctx: RunContext) -> dict[str, str]:
        env = self._base_env()
        env["AGENTJOBS_RUN_ID"] = ctx.run_id
        env["AGENTJOBS_ATTEMPT"] = str(ctx.attempt)
        if ctx.session_id is not None:
            env["AGENTJOBS_SESSION_ID"] = ctx.session_id
        # A config that is not JSON (embedding callers may pass anything) is simply left out.
        with contextlib.suppress(TypeError):
            env["AGENTJOBS_CONFIG"] = orjson.dumps(ctx.config).decode()
        return env

    # ----------------------------------------------------------------- attempt records

    def attach_attempt_records(self, records: AttemptRecords | None) -> None:
        """Record each live process group in `records` (the engine's data dir), or stop
        recording (`None`). Called by the engine at start-up, before any run starts; see
        `_orphans.py` for why (a server killed with `kill -9` leaves the groups running)
        and what recovery does with the records.

        One runner object records for one engine at a time: the last engine opened with
        it (sharing one `CommandRunner` between engines open at the same time on
        different data dirs would put the records of both in the newer one's)."""
        self._records = records

    def detach_attempt_records(self, records: AttemptRecords) -> None:
        """Stop recording in `records`, unless another engine attached its own since."""
        if self._records is records:
            self._records = None

    async def _begin_record(self, ctx: RunContext, env: dict[str, str]) -> AttemptRecord | None:
        """Write the attempt's record (before the spawn), in a worker thread: a mkdir, a
        write and a rename, which must not stall the event loop on a slow disk."""
        records = self._records
        if records is None:
            return None
        begin = functools.partial(
            records.begin,
            ctx.run_id,
            ctx.attempt,
            environ=[f"{k}={env[k]}" for k in ("AGENTJOBS_RUN_ID", "AGENTJOBS_ATTEMPT")],
            grace_s=self.kill_grace_s,
        )
        try:
            # Not abandoned on cancel: a record written after we stopped waiting would
            # be left behind for nobody to remove.
            return await trio.to_thread.run_sync(begin)
        except OSError as exc:
            # Without a record, a crash of the server would leave the process running
            # unseen while the run starts again: do not start it. The next attempt may
            # find the disk in a better state.
            raise RunError(
                f"cannot record the command's process group in {records.directory}: {exc}",
                retryable=True,
            ) from None

    # ----------------------------------------------------------------- running

    async def run(self, ctx: RunContext) -> Any:
        argv = self._argv_for(ctx)
        env = self._env_for(ctx)
        stdin_data = ctx.prompt.encode() if self._stdin_prompt else None
        started = trio.current_time()
        record = await self._begin_record(ctx, env)
        try:
            proc = await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE if stdin_data is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=self.cwd,
                env=env,
                start_new_session=True,
            )
        except BaseException as exc:
            if record is not None:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(record.remove)
            if isinstance(exc, OSError):
                raise RunError(
                    f"cannot start command {argv[0]!r}: {exc.strerror or exc}", retryable=False
                ) from None
            raise
        log.debug("run %s: started pid %d: %s", ctx.run_id, proc.pid, argv[0])

        capture = _Capture(self.max_output_bytes)
        tail = _Tail(self.stderr_tail_bytes)
        timed_out = False
        try:
            if record is not None:
                # A crash since the spawn is covered by the record `begin` wrote (recovery
                # then finds the process by its environment); pin the exact process now,
                # before anything else (shielded: a cancel right now must not skip it;
                # inside the try, so the group is stopped whatever happens).
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(record.started, proc.pid)
            with trio.move_on_after(self.timeout_s or math.inf) as timeout_scope:
                await self._interact(proc, ctx, stdin_data, capture, tail)
            timed_out = timeout_scope.cancelled_caught
        finally:
            # Runs on success, failure and cancellation alike: nothing of the run survives it.
            with trio.CancelScope(shield=True) as cleanup:
                cleanup.deadline = trio.current_time() + self.kill_grace_s + _REAP_EXTRA_S
                await self._terminate_group(proc, ctx.run_id)
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        await pipe.aclose()
            if cleanup.cancelled_caught:  # pragma: no cover - a process stuck in the kernel
                log.error("run %s: pid %d could not be reaped in time", ctx.run_id, proc.pid)
            elif record is not None and not _group_alive(proc.pid):
                # else kept: the next start of the engine stops the group
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(record.remove)
            ctx.metrics.update(
                exit_code=proc.returncode,
                duration_s=round(trio.current_time() - started, 6),
                stdout_bytes=capture.total,
                output_truncated=capture.truncated,
            )

        if timed_out:
            raise RunError(f"command timed out after {self.timeout_s:g} s", retryable=False)
        code = proc.returncode
        assert code is not None
        if code != 0:
            raise RunError(
                self._failure_message(code, tail), retryable=code in self.retryable_exit_codes
            )
        return self._result(capture)

    async def _interact(
        self,
        proc: trio.Process,
        ctx: RunContext,
        stdin_data: bytes | None,
        capture: _Capture,
        tail: _Tail,
    ) -> None:
        """Feed stdin and drain stdout/stderr concurrently (a child blocked on a full pipe
        would otherwise deadlock with us), until the child exits and its pipes close."""
        assert proc.stdout is not None and proc.stderr is not None
        stdout, stderr = proc.stdout, proc.stderr
        pumps_done = trio.Event()
        remaining = 2

        async def pump(coro_fn: Callable[..., Awaitable[None]], *args: Any) -> None:
            nonlocal remaining
            try:
                await coro_fn(*args)
            finally:
                remaining -= 1
                if remaining == 0:
                    pumps_done.set()

        async with trio.open_nursery() as nursery:
            if stdin_data is not None:
                assert proc.stdin is not None
                nursery.start_soon(_feed_stdin, proc.stdin, stdin_data)
            nursery.start_soon(pump, _pump_stdout, stdout, ctx, capture)
            nursery.start_soon(pump, _pump_stderr, stderr, tail)
            await proc.wait()
            # Normally the pipes hit EOF with the child. If a grandchild still holds them,
            # stop waiting after a moment: the group is terminated next, closing them.
            with trio.move_on_after(_DRAIN_S):
                await pumps_done.wait()
            await self._terminate_group(proc, ctx.run_id)

    async def _terminate_group(self, proc: trio.Process, run_id: str) -> None:
        """SIGTERM the process group, give it `kill_grace_s`, then SIGKILL; reap the child.

        Idempotent, and a no-op when the child has exited and left nothing behind.
        """
        pgid = proc.pid
        if proc.returncode is not None and not _group_alive(pgid):
            return
        _signal_group(pgid, signal.SIGTERM)
        with trio.move_on_after(self.kill_grace_s):
            await proc.wait()
            # Grandchildren are not our children: no event tells us they are gone; poll.
            while _group_alive(pgid):  # noqa: ASYNC110
                await trio.sleep(_POLL_S)
            return
        log.warning(
            "run %s: process group %d still alive %.3g s after SIGTERM; sending SIGKILL",
            run_id,
            pgid,
            self.kill_grace_s,
        )
        _signal_group(pgid, signal.SIGKILL)
        await proc.wait()
        # SIGKILL is delivered asynchronously: members may still be exiting. Return only
        # once they are gone, so "cancelled" really means stopped.
        with trio.move_on_after(_REAP_EXTRA_S):
            while _group_alive(pgid):  # noqa: ASYNC110
                await trio.sleep(_POLL_S / 5)

    # ----------------------------------------------------------------- results

    def _failure_message(self, code: int, tail: _Tail) -> str:
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            message = f"command was killed by {name}"
        else:
            message = f"command exited with code {code}"
        stderr = tail.text()
        return f"{message}; stderr: {stderr}" if stderr else f"{message} (no stderr)"

    def _result(self, capture: _Capture) -> Any:
        text = capture.text()
        if self.result == "text":
            return text.strip()
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        lines = [line for line in text.splitlines() if line.strip()]
        if lines:
            try:
                return orjson.loads(lines[-1])
            except orjson.JSONDecodeError:
                pass
        hint = " (output was truncated at max_output_bytes)" if capture.truncated else ""
        snippet = lines[-1][:200] if lines else ""
        raise RunError(f"command output is not JSON{hint}; last line: {snippet!r}", retryable=False)


# --------------------------------------------------------------------------- helpers


@attrs.define(slots=True, eq=False)
class _Capture:
    """Stdout kept for the result, up to a byte limit; counts what went past it."""

    limit: int
    buf: bytearray = attrs.Factory(bytearray)
    total: int = 0
    truncated: bool = False

    def add(self, data: bytes | bytearray) -> None:
        self.total += len(data)
        room = self.limit - len(self.buf)
        if len(data) <= room:
            self.buf += data
        else:
            self.buf += data[: max(room, 0)]
            self.truncated = True

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


@attrs.define(slots=True, eq=False)
class _Tail:
    """The last `limit` bytes of a stream (stderr), for error messages."""

    limit: int
    buf: bytearray = attrs.Factory(bytearray)

    def add(self, data: bytes | bytearray) -> None:
        self.buf += data
        if len(self.buf) > self.limit:
            del self.buf[: len(self.buf) - self.limit]

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace").strip()


async def _feed_stdin(stream: trio.abc.SendStream, data: bytes) -> None:
    """Write the prompt and close stdin (EOF tells the child the prompt is complete)."""
    try:
        async with stream:
            if data:
                await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the child exited or closed stdin without reading it all; its exit code tells


async def _pump_stdout(stream: trio.abc.ReceiveStream, ctx: RunContext, capture: _Capture) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""
    async for chunk in stream:
        capture.add(chunk)
        text = pending + decoder.decode(chunk)
        *lines, pending = text.split("\n")
        for line in lines:
            ctx.output(line + "\n")
        if len(pending) > _MAX_LINE_CHARS:
            ctx.output(pending)
            pending = ""
    rest = pending + decoder.decode(b"", final=True)
    if rest:
        ctx.output(rest)


async def _pump_stderr(stream: trio.abc.ReceiveStream, tail: _Tail) -> None:
    async for chunk in stream:
        tail.add(chunk)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # already gone
    except PermissionError:  # pragma: no cover - a member changed uid (setuid helper)
        log.warning("no permission to send %s to process group %d", sig.name, pgid)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies do not count).

    `killpg(pgid, 0)` alone counts zombies: where PID 1 does not reap orphans (some
    containers), dead grandchildren linger as zombies and would make every cleanup wait
    the full grace period. On Linux we therefore look at the members' states in /proc.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return _group_has_live_member(pgid)


def _group_has_live_member(pgid: int) -> bool:
    try:
        entries = os.listdir("/proc")
    except OSError:  # pragma: no cover - not Linux: trust killpg
        return True
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile, or not ours to read
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) >= 3 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False
