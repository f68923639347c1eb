"""Running the server: engine + app + hypercorn in one trio run, with a clean drain.

Shutdown order (one SIGTERM or SIGINT, or `stop.set()` when embedded):

1. the hub's `shutting_down` is set: `/health` answers 503, every open SSE stream sends a
   final `shutdown` event and ends, long-polls answer with what they have;
2. once the streams are closed (or after `STREAM_DRAIN_S`), hypercorn's shutdown trigger
   fires: it stops accepting and lets in-flight requests finish;
3. leaving `open_engine` gives running runs the grace period, then stops the rest and
   records them as requeued, so the next start resumes them. Exit code 0.

hypercorn is served programmatically (not its CLI), because only then can the app end its
streams before hypercorn cuts connections (stack-notes: the CLI cuts open streams with an
incomplete chunked read after its graceful timeout).
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

import attrs
import trio
from hypercorn.config import Config as HyperConfig
from hypercorn.trio import serve as hypercorn_serve
from quart_trio import QuartTrio

from .. import __version__
from ..engine import Engine, open_engine
from ..engine.journal import JournalError
from ..engine.outbox import Outbox
from ..engine.runners import Runner
from .app import create_app, state_of
from .auth import KeyRing
from .settings import ServerSettings, is_loopback

__all__ = ["RunningServer", "build_runners", "run", "serve"]

log = logging.getLogger("agentjobs.server")

# Start-up failures reported as one line and exit code 1 (no traceback): a port in use, a
# data dir locked by another server or with a corrupt journal.
_START_ERRORS = (OSError, JournalError)

STREAM_DRAIN_S = 5.0  # longest wait for SSE streams to send their final event
HTTP_GRACE_S = 10.0  # hypercorn's graceful timeout for in-flight requests


@attrs.frozen(slots=True)
class RunnerChoice:
    runners: dict[str, Runner]
    default: str


def build_runners(settings: ServerSettings) -> RunnerChoice:
    """The runner set for the settings (`--config`, `--runner`, `--command`, ...).

    Delegates to `agentjobs.engine.runners.config.runners_from_cli`, which owns the TOML
    format and the per-type flags; raises its `RunnerConfigError` with a message naming the
    key to fix.
    """
    from ..engine.runners.config import runners_from_cli

    chosen = runners_from_cli(
        runner=settings.runner,
        config=settings.config,
        openai_base_url=settings.openai_base_url,
        model=settings.model,
        command=settings.command,
        python_target=settings.python_target,
    )
    return RunnerChoice(dict(chosen.runners), chosen.default)


@attrs.frozen(slots=True)
class RunningServer:
    """Handed to whoever started `serve` (tests, embedders) once it listens."""

    urls: list[str]
    engine: Engine
    app: QuartTrio
    stop: trio.Event
    outbox: Outbox

    @property
    def url(self) -> str:
        return self.urls[0]


def _hypercorn_config(settings: ServerSettings) -> HyperConfig:
    config = HyperConfig()
    host = settings.host
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = logging.getLogger("agentjobs.access") if settings.access_log else None
    errorlog = logging.getLogger("hypercorn.error")
    if not errorlog.isEnabledFor(logging.DEBUG):
        errorlog.setLevel(logging.WARNING)  # our own start-up lines replace "Running on ..."
    config.errorlog = errorlog
    config.graceful_timeout = HTTP_GRACE_S
    config.keep_alive_timeout = 75.0  # longer than common client pools' idle timeouts
    config.include_server_header = False
    # hypercorn's default (100) overflows on a burst of new connections, whose clients
    # then wait 1 s, then 3 s, for SYN retransmissions; uvicorn's default is 2048.
    config.backlog = settings.backlog
    return config


def _facts(
    settings: ServerSettings, engine: Engine, urls: list[str], outbox: Outbox, keyring: KeyRing
) -> list[str]:
    """The start-up lines: one fact each, in the order an operator checks them."""
    rec = engine.recovered
    replay = engine.replay_report
    data = (
        "data dir: none (durability memory: nothing is written)"
        if settings.data_path is None
        else f"data dir: {settings.data_path.resolve()}"
        + (f" ({replay.events} events replayed)" if replay is not None else "")
    )
    durability = {
        "fsync": "fsync (each acknowledged change is on disk; group commit)",
        "os": "os (written without fsync: survives a process crash, not a power loss)",
        "memory": "memory (NOTHING survives a restart)",
    }[settings.durability]
    runners = ", ".join(sorted(engine.runners))
    signed = settings.webhook_secret or settings.webhook_secrets_file
    signing = "signed" if signed else "unsigned (no --webhook-secret)"
    return [
        f"agentjobs {__version__} listening on {', '.join(urls)}",
        data,
        f"durability: {durability}",
        f"default runner: {engine.default_runner} (configured: {runners})",
        f"webhooks: {signing}; {outbox.pending_count()} pending deliveries resumed",
        _auth_fact(settings, keyring),
        _limits_fact(settings),
        f"runs recovered: {rec.get('requeued', 0)} requeued, {rec.get('failed', 0)} failed, "
        f"{rec.get('cancelled', 0)} cancelled; {rec.get('queued', 0)} still queued",
    ]


def _auth_fact(settings: ServerSettings, keyring: KeyRing) -> str:
    """One line: who may call, how /metrics is protected, CORS."""
    if keyring.enabled:
        tenants = keyring.tenants
        auth = (
            f"auth: API keys ({len(keyring.entries)} for {len(tenants)} tenant"
            f"{'s' if len(tenants) != 1 else ''})"
        )
    elif is_loopback(settings.host):
        auth = "auth: off (no API keys; loopback only)"
    else:
        auth = "auth: OFF on a non-loopback address (--insecure-no-auth)"
    if keyring.metrics_digest is not None:
        auth += "; /metrics: its own key"
    if settings.sse_query_key:
        auth += "; ?api_key= accepted on streams"
    cors = settings.cors_policy()
    return auth + f"; CORS: {'off' if cors is None else cors.describe()}"


def _limits_fact(settings: ServerSettings) -> str:
    parts = []
    if settings.tenant_max_queued is not None:
        parts.append(f"{settings.tenant_max_queued} queued+running")
    if settings.tenant_rate is not None:
        parts.append(f"{settings.tenant_rate:g} submits/s (burst {settings.submit_burst})")
    if settings.tenant_max_streams is not None:
        parts.append(f"{settings.tenant_max_streams} streams")
    return "limits per tenant: " + (", ".join(parts) if parts else "none")


async def serve(
    settings: ServerSettings,
    *,
    stop: trio.Event | None = None,
    runners: RunnerChoice | None = None,
    print_line: Callable[[str], None] | None = None,
    task_status: trio.TaskStatus[RunningServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Open the engine, serve HTTP until `stop` is set, then drain (see module docstring).

    Raises `SettingsError` before opening anything for settings that must not start, in
    particular a non-loopback `host` without API keys or `insecure_no_auth`.
    """
    keyring = settings.check()
    stop = stop if stop is not None else trio.Event()
    choice = runners if runners is not None else build_runners(settings)
    async with open_engine(
        settings.data_path,
        runners=choice.runners,
        default_runner=choice.default,
        config=settings.engine_config(),
    ) as engine:
        outbox = Outbox(engine, settings.webhook_settings())
        app = create_app(engine, settings, outbox=outbox)
        hub = state_of(app).hub

        async def shutdown_trigger() -> None:
            await stop.wait()
            log.info("shutting down: closing %d open stream(s)", hub.open_streams)
            hub.begin_shutdown()
            if not await hub.wait_closed(STREAM_DRAIN_S):
                log.warning("%d stream(s) did not close in time", hub.open_streams)

        async with trio.open_nursery() as background:
            # Webhooks are delivered while the server runs; deliveries still due when it
            # stops are in the journal and resume at the next start.
            await background.start(outbox.run)
            async with trio.open_nursery() as nursery:
                urls: list[str] = await nursery.start(
                    lambda task_status: hypercorn_serve(
                        app,
                        _hypercorn_config(settings),
                        shutdown_trigger=shutdown_trigger,
                        task_status=task_status,
                    )
                )
                if print_line is not None:
                    for line in _facts(settings, engine, urls, outbox, keyring):
                        print_line(line)
                if not keyring.enabled and not is_loopback(settings.host):
                    log.warning(
                        "listening on %s without authentication (--insecure-no-auth): anyone "
                        "who can reach it can submit, read and delete runs",
                        settings.host,
                    )
                _warn_unknown_tenants(settings, keyring)
                task_status.started(RunningServer(urls, engine, app, stop, outbox))
            background.cancel_scope.cancel()
        if engine.supervisor.running_count:
            log.info(
                "waiting up to %gs for %d running run(s); the rest will be requeued",
                settings.grace_period,
                engine.supervisor.running_count,
            )
    log.info("stopped")


def _warn_unknown_tenants(settings: ServerSettings, keyring: KeyRing) -> None:
    """A per-tenant webhook secret for a tenant no API key maps to is never used: say so
    (a typo there would silently send that tenant's webhooks with the global secret)."""
    if not keyring.enabled:
        return
    known = set(keyring.tenants)
    unknown = sorted(set(settings.webhook_settings().tenant_secrets) - known)
    if unknown:
        log.warning(
            "webhook secrets are configured for tenant(s) with no API key: %s",
            ", ".join(unknown),
        )


def _printer(stream: TextIO) -> Callable[[str], None]:
    def print_line(line: str) -> None:
        print(line, file=stream, flush=True)

    return print_line


async def _main(settings: ServerSettings, runners: RunnerChoice) -> None:
    stop = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def watch_signals() -> None:
                first: float | None = None
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if first is None:
                        first = trio.current_time()
                        log.info(
                            "%s: shutting down (running runs get %gs to finish)",
                            name,
                            settings.grace_period,
                        )
                        stop.set()
                    elif trio.current_time() - first > 1.0:
                        # Not the duplicate a PyInstaller bootloader forwards: a person.
                        log.warning(
                            "%s again: already shutting down; kill -9 is safe if you cannot "
                            "wait (unfinished runs are resumed at the next start)",
                            name,
                        )

            nursery.start_soon(watch_signals)
            await serve(settings, stop=stop, runners=runners, print_line=_printer(sys.stdout))
            nursery.cancel_scope.cancel()


def run(settings: ServerSettings) -> int:
    """Run the server in this process until SIGTERM/SIGINT; returns the exit code."""
    from ..engine.runners.config import RunnerConfigError

    try:
        runners = build_runners(settings)
    except (RunnerConfigError, LookupError) as exc:
        print(f"agentjobs serve: runner configuration: {exc}", file=sys.stderr)
        return 2
    # Signals are ignored at the OS level for the whole life of the process and watched
    # by trio's receiver instead: a second, forwarded copy (PyInstaller's bootloader sends
    # one more to its child) can then never kill the server mid-drain.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        trio.run(_main, settings, runners)
    except Exception as exc:
        leaves = list(_leaves(exc))
        if not all(isinstance(e, _START_ERRORS) for e in leaves):
            raise
        for e in leaves:
            print(f"agentjobs serve: {e}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc
