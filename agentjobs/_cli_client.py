"""`agentjobs submit|status|result|cancel|delete|ls|tail`: the command-line client.

Made for two readers: a person at a terminal (readable output, a live progress bar while
following a run) and a script (`--json`, and exit codes that say how the run ended):

    0 succeeded (or the command did what it was asked)
    1 the run failed, or the server refused the request (no such run, already finished...)
    2 usage: bad arguments, or a request the server found invalid (422)
    3 the run was cancelled
    4 timeout: the run did not finish within --wait / --wait-timeout
    5 the server could not be reached (after retries)
  130 interrupted (Ctrl-C)

Every subcommand takes `--server URL` (else `$AGENTJOBS_URL`, else http://127.0.0.1:8005)
and `--api-key KEY` (else `$AGENTJOBS_API_KEY`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from types import FrameType
from typing import IO, Any, Final

from .client import (
    AgentJobsError,
    APIError,
    BadRequest,
    CancelledEvent,
    Client,
    ErrorEvent,
    NotFinished,
    OutputEvent,
    ProgressEvent,
    ResultEvent,
    RunResult,
    ShutdownEvent,
    Status,
    StatusEvent,
    TransportError,
    ValidationError,
    WaitTimeout,
)

__all__ = ["register"]

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_CANCELLED: Final = 3
EXIT_TIMEOUT: Final = 4
EXIT_UNREACHABLE: Final = 5
EXIT_INTERRUPTED: Final = 130

_EXIT_BY_STATUS: Final = {
    Status.SUCCEEDED: EXIT_OK,
    Status.FAILED: EXIT_FAILED,
    Status.CANCELLED: EXIT_CANCELLED,
}


class _UsageError(Exception):
    pass


class _Deadline(Exception):
    """--wait-timeout passed while following a stream."""


# -- wiring ----------------------------------------------------------------------------


def register(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False)
    conn = common.add_argument_group("server")
    conn.add_argument(
        "--server",
        metavar="URL",
        default=None,
        help="server URL [env AGENTJOBS_URL; default http://127.0.0.1:8005]",
    )
    conn.add_argument(
        "--api-key",
        metavar="KEY",
        default=None,
        help="API key, sent as 'Authorization: Bearer KEY' [env AGENTJOBS_API_KEY]",
    )
    conn.add_argument(
        "--json",
        dest="json_output",
        action="store_true",
        help="print JSON (one document, or one event per line) instead of text",
    )

    p = sub.add_parser(
        "submit",
        parents=[common],
        help="submit a run",
        description="Submit a run. Prints its id; with --wait the outcome, with --follow "
        "its output and progress as they happen.",
    )
    p.add_argument("prompt", help="the prompt ('-' reads it from stdin)")
    p.add_argument("--session", metavar="ID", help="session id (groups runs)")
    p.add_argument(
        "--config", metavar="JSON", help="runner config as a JSON object, or @FILE to read it"
    )
    p.add_argument("--runner", metavar="NAME", help="one of the server's configured runners")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="the run's time limit")
    p.add_argument("--priority", type=int, metavar="N", help="higher runs first (default 0)")
    p.add_argument("--max-attempts", type=int, metavar="N", help="attempts for retryable errors")
    p.add_argument("--webhook-url", metavar="URL", help="called when the run finishes")
    p.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="repeat a submit safely: the same key returns the same run (default: random)",
    )
    how = p.add_mutually_exclusive_group()
    how.add_argument("--wait", action="store_true", help="wait and print the outcome")
    how.add_argument(
        "--follow", action="store_true", help="follow output and progress until it finishes"
    )
    p.add_argument(
        "--wait-timeout",
        type=float,
        metavar="SECONDS",
        help="with --wait/--follow: give up after this long (exit 4)",
    )
    p.set_defaults(func=_guard(cmd_submit))

    p = sub.add_parser("status", parents=[common], help="show a run's status and progress")
    p.add_argument("run_id", metavar="ID")
    p.set_defaults(func=_guard(cmd_status))

    p = sub.add_parser(
        "result",
        parents=[common],
        help="print a finished run's result",
        description="Print the result of a finished run; the exit code tells how it ended.",
    )
    p.add_argument("run_id", metavar="ID")
    p.add_argument(
        "--wait",
        type=float,
        metavar="SECONDS",
        default=None,
        help="wait up to this long for the run to finish (default: do not wait)",
    )
    p.set_defaults(func=_guard(cmd_result))

    p = sub.add_parser("cancel", parents=[common], help="cancel a queued or running run")
    p.add_argument("run_id", metavar="ID")
    p.set_defaults(func=_guard(cmd_cancel))

    p = sub.add_parser("delete", parents=[common], help="forget a finished run")
    p.add_argument("run_id", metavar="ID")
    p.set_defaults(func=_guard(cmd_delete))

    p = sub.add_parser("ls", parents=[common], help="list runs, newest first")
    p.add_argument("--status", choices=[s.value for s in Status], help="only runs in this status")
    p.add_argument("--session", metavar="ID", help="only runs of this session")
    p.add_argument(
        "--limit", type=int, default=20, metavar="N", help="at most N runs (0: all; default 20)"
    )
    p.set_defaults(func=_guard(cmd_ls))

    p = sub.add_parser(
        "tail",
        parents=[common],
        help="follow a run: output as it arrives, live progress",
        description="Follow a run's event stream until it finishes: output goes to stdout "
        "as it arrives, progress and status to stderr (a live bar on a terminal). The exit "
        "code tells how the run ended. A dropped connection is resumed where it stopped.",
    )
    p.add_argument("run_id", metavar="ID")
    p.add_argument("--after", metavar="EVENT_ID", help="start after this event id")
    p.add_argument(
        "--wait-timeout", type=float, metavar="SECONDS", help="give up after this long (exit 4)"
    )
    p.set_defaults(func=_guard(cmd_tail))


def _guard(fn: Callable[[argparse.Namespace, Client], int]) -> Callable[[argparse.Namespace], int]:
    """Open the client, run the command, and turn errors into messages and exit codes."""

    def run(args: argparse.Namespace) -> int:
        if not getattr(args, "verbose", False):
            # httpx logs every request at INFO: noise for a command-line client
            logging.getLogger("httpx").setLevel(logging.WARNING)
        try:
            with Client(args.server, args.api_key) as client:
                return fn(args, client)
        except _UsageError as exc:
            _err(f"agentjobs {args.command}: {exc}")
            return EXIT_USAGE
        except TransportError as exc:
            _err(f"agentjobs {args.command}: {exc}")
            return EXIT_UNREACHABLE
        except (ValidationError, BadRequest) as exc:
            _err(f"agentjobs {args.command}: {_api_message(exc)}")
            return EXIT_USAGE
        except APIError as exc:
            _err(f"agentjobs {args.command}: {_api_message(exc)}")
            return EXIT_UNREACHABLE if exc.status >= 500 else EXIT_FAILED
        except WaitTimeout as exc:
            _err(f"agentjobs {args.command}: {exc}")
            return EXIT_TIMEOUT
        except AgentJobsError as exc:
            _err(f"agentjobs {args.command}: {exc}")
            return EXIT_FAILED
        except KeyboardInterrupt:
            _err("")
            return EXIT_INTERRUPTED

    return run


def _api_message(exc: APIError) -> str:
    text = exc.detail or exc.title or f"HTTP {exc.status}"
    return f"{text} (HTTP {exc.status})"


# -- commands --------------------------------------------------------------------------


def cmd_submit(args: argparse.Namespace, client: Client) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    options: dict[str, Any] = {
        "config": _parse_config(args.config),
        "session_id": args.session,
        "runner": args.runner,
        "timeout": args.timeout,
        "priority": args.priority,
        "max_attempts": args.max_attempts,
        "webhook_url": args.webhook_url,
        "idempotency_key": args.idempotency_key,
    }
    if args.wait_timeout is not None and not (args.wait or args.follow):
        raise _UsageError("--wait-timeout needs --wait or --follow")
    run = client.submit(prompt, **{k: v for k, v in options.items() if v is not None})
    if args.follow:
        if not args.json_output:
            _err(f"{run.id} {run.status.value}")
        return _follow(client, run.id, None, args.wait_timeout, args.json_output)
    if args.wait:
        if not args.json_output:
            _err(f"{run.id} {run.status.value}")
        outcome = client.wait(run.id, args.wait_timeout)
        return _print_outcome(outcome, args.json_output)
    if args.json_output:
        _print_json(run.raw)
    else:
        note = " (idempotent replay: the run already existed)" if run.replayed else ""
        print(run.id)
        _err(f"{run.status.value}{note}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace, client: Client) -> int:
    run = client.get(args.run_id)
    if args.json_output:
        _print_json(run.raw)
        return EXIT_OK
    line = f"{run.id}  {run.status.value}"
    if run.status in (Status.RUNNING, Status.QUEUED) or run.progress.percentage:
        line += f"  {_bar(run.progress.percentage, 20)} {run.progress.percentage:5.1f}%"
        if run.progress.step:
            line += f"  {run.progress.step}"
    print(line)
    rows = [
        ("created", _when(run.created_at)),
        ("started", _when(run.started_at)),
        ("completed", _when(run.completed_at)),
        ("session", run.session_id),
        ("runner", run.runner),
        ("attempt", f"{run.attempt} of {run.max_attempts}" if run.max_attempts else None),
        ("error", f"{run.error} ({run.error_kind})" if run.error_kind else run.error),
    ]
    if run.cancel_requested and not run.finished:
        rows.append(("cancel", "requested"))
    for name, value in rows:
        if value:
            print(f"  {name:<10}{value}")
    return EXIT_OK


def cmd_result(args: argparse.Namespace, client: Client) -> int:
    try:
        outcome = client.result(args.run_id, wait=args.wait)
    except NotFinished as exc:
        if args.json_output:
            _print_json(exc.body)
        waited = f" after waiting {args.wait:g} s" if args.wait else ""
        _err(f"agentjobs result: {args.run_id} is not finished{waited} ({exc.detail})")
        return EXIT_TIMEOUT
    return _print_outcome(outcome, args.json_output)


def cmd_cancel(args: argparse.Namespace, client: Client) -> int:
    run = client.cancel(args.run_id)
    if args.json_output:
        _print_json(run.raw)
    elif run.status is Status.CANCELLED:
        print(f"{run.id} cancelled")
    else:
        print(f"{run.id} {run.status.value} (cancel requested; it is still stopping)")
    return EXIT_OK


def cmd_delete(args: argparse.Namespace, client: Client) -> int:
    client.delete(args.run_id)
    if args.json_output:
        _print_json({"job_id": args.run_id, "deleted": True})
    else:
        print(f"{args.run_id} deleted")
    return EXIT_OK


def cmd_ls(args: argparse.Namespace, client: Client) -> int:
    if args.limit < 0:
        raise _UsageError("--limit must be 0 (all) or more")
    runs = list(client.list(status=args.status, session_id=args.session, limit=args.limit or None))
    if args.json_output:
        _print_json([r.raw for r in runs])
        return EXIT_OK
    if not runs:
        _err("no runs")
        return EXIT_OK
    table = [("ID", "STATUS", "PROGRESS", "CREATED", "SESSION")]
    for r in runs:
        table.append(
            (
                r.id,
                r.status.value,
                f"{r.progress.percentage:.0f}%",
                _when(r.created_at) or "",
                r.session_id or "",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_tail(args: argparse.Namespace, client: Client) -> int:
    return _follow(client, args.run_id, args.after, args.wait_timeout, args.json_output)


# -- following a run -------------------------------------------------------------------


def _follow(
    client: Client, run_id: str, after: str | None, wait_timeout: float | None, as_json: bool
) -> int:
    view = _LiveView(sys.stdout, sys.stderr, tty=sys.stderr.isatty() and not as_json)
    final: Status | None = None
    try:
        with _deadline(wait_timeout), client.stream(run_id, after=after) as events:
            for event in events:
                if as_json:
                    _print_json(
                        {"id": event.id, "event": event.event, "data": event.data}, indent=None
                    )
                    if event.terminal:
                        final = _terminal_status(event)
                    continue
                if isinstance(event, ProgressEvent):
                    view.progress(event.percentage, event.step)
                elif isinstance(event, OutputEvent):
                    view.output(event.text)
                elif isinstance(event, StatusEvent):
                    view.status(event.status)
                elif isinstance(event, ShutdownEvent):
                    view.note("server restarting; resuming the stream...")
                elif isinstance(event, ResultEvent):
                    final = Status.SUCCEEDED
                    view.finish_result(event.result)
                elif isinstance(event, ErrorEvent):
                    final = Status.FAILED
                    view.finish_message(f"failed: {event.error}")
                elif isinstance(event, CancelledEvent):
                    final = Status.CANCELLED
                    view.finish_message(f"cancelled: {event.message}")
    except _Deadline:
        view.clear()
        _err(f"agentjobs: {run_id} did not finish within {wait_timeout:g} s")
        return EXIT_TIMEOUT
    finally:
        view.clear()
    if final is None:
        # The server had nothing more to send (everything after `after` was seen):
        # the run is finished, so ask it how it ended.
        outcome = client.result(run_id)
        final = outcome.status
        if not as_json:
            view.finish_message(outcome.status.value)
    return _EXIT_BY_STATUS.get(final, EXIT_FAILED)


def _terminal_status(event: Any) -> Status:
    if isinstance(event, ResultEvent):
        return Status.SUCCEEDED
    if isinstance(event, CancelledEvent):
        return Status.CANCELLED
    return Status.FAILED


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise `_Deadline` in this (main) thread after `seconds`, even while a read blocks."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _LiveView:
    """Output to stdout as it arrives; progress and status to stderr.

    On a terminal the progress is one bar that redraws in place. The bar is drawn only
    while the output cursor is at the start of a line, so that streamed text (tokens with
    no newline yet) is never broken up by it; it reappears at the next line.
    """

    def __init__(self, out: IO[str], err: IO[str], *, tty: bool) -> None:
        self.out = out
        self.err = err
        self.tty = tty
        self.pct = 0.0
        self.step: str | None = None
        self.bar_shown = False
        self.at_line_start = True
        self.wrote_output = False
        self.state: Status | None = None

    def progress(self, pct: float, step: str | None) -> None:
        self.pct, self.step = pct, step
        if self.tty:
            self._draw()
        else:
            label = f"  {step}" if step else ""
            self.err.write(f"[{pct:5.1f}%]{label}\n")
            self.err.flush()

    def status(self, status: Status) -> None:
        if status is self.state:
            return
        self.state = status
        if status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED):
            return  # said by the terminal event
        if self.tty:
            self._draw()
        else:
            self.err.write(f"status: {status.value}\n")
            self.err.flush()

    def note(self, text: str) -> None:
        self.clear()
        self.err.write(text + "\n")
        self.err.flush()

    def output(self, text: str) -> None:
        if not text:
            return
        self.clear()
        self.out.write(text)
        self.out.flush()
        self.wrote_output = True
        self.at_line_start = text.endswith("\n")
        if self.tty and self.at_line_start:
            self._draw()

    def finish_result(self, result: Any) -> None:
        self.clear()
        if not self.wrote_output:
            self.out.write(_render(result) + "\n")
        elif not self.at_line_start:
            self.out.write("\n")
        self.out.flush()
        self.at_line_start = True
        self.err.write("succeeded\n")
        self.err.flush()

    def finish_message(self, text: str) -> None:
        self.clear()
        if not self.at_line_start:
            self.out.write("\n")
            self.out.flush()
            self.at_line_start = True
        self.err.write(text + "\n")
        self.err.flush()

    def _draw(self) -> None:
        if not self.at_line_start:
            return
        width = shutil.get_terminal_size((80, 24)).columns
        state = self.state.value if self.state else ""
        text = f"{_bar(self.pct, 24)} {self.pct:5.1f}%  {state}"
        if self.step:
            text += f"  {self.step}"
        self.err.write("\r\x1b[2K" + text[: max(10, width - 1)])
        self.err.flush()
        self.bar_shown = True

    def clear(self) -> None:
        if self.bar_shown:
            self.err.write("\r\x1b[2K")
            self.err.flush()
            self.bar_shown = False


# -- small helpers ---------------------------------------------------------------------


def _parse_config(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    text = raw
    if raw.startswith("@"):
        try:
            with open(raw[1:], encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise _UsageError(f"--config: cannot read {raw[1:]}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise _UsageError(f"--config is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise _UsageError('--config must be a JSON object, like \'{"key": "value"}\'')
    return value


def _print_outcome(outcome: RunResult, as_json: bool) -> int:
    if as_json:
        _print_json(outcome.raw)
    elif outcome.status is Status.SUCCEEDED:
        print(_render(outcome.result))
    elif outcome.status is Status.CANCELLED:
        _err(f"{outcome.id} cancelled: {outcome.error or 'no reason given'}")
    else:
        kind = f" ({outcome.error_kind})" if outcome.error_kind else ""
        _err(f"{outcome.id} failed{kind}: {outcome.error}")
    return _EXIT_BY_STATUS.get(outcome.status, EXIT_FAILED)


def _render(value: Any) -> str:
    """A result as a person wants it: strings as they are, anything else as JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False)


def _print_json(value: Any, indent: int | None = 2) -> None:
    print(json.dumps(value, indent=indent, ensure_ascii=False), flush=True)


def _bar(pct: float, width: int) -> str:
    filled = round(max(0.0, min(100.0, pct)) / 100 * width)
    full, empty = ("█", "░") if _can_encode(sys.stderr, "█░") else ("#", "-")
    return "[" + full * filled + empty * (width - filled) + "]"


def _can_encode(stream: IO[str], text: str) -> bool:
    try:
        text.encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def _when(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
