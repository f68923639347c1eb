"""Server settings: one table of options, read from flags and `AGENTJOBS_*` variables.

Every option is described once, in `OPTIONS`: the `serve` parser, the environment lookup,
`docs/configuration.md` and its test are all driven from that table, so a new knob cannot
be half-wired (a flag without its variable, or an undocumented variable).

Precedence: a command-line flag wins over the environment variable, which wins over the
default. Values from both sources go through the same parser, so `--port x` and
`AGENTJOBS_PORT=x` fail with the same message.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import attrs

from ..engine import EngineConfig
from ..engine.outbox import WebhookSettings, parse_tenant_secrets
from ..engine.ssrf import WebhookPolicy
from .auth import KeyRing, parse_api_keys
from .cors import CorsPolicy

__all__ = [
    "OPTIONS",
    "Option",
    "ServerSettings",
    "SettingsError",
    "add_arguments",
    "is_loopback",
    "resolve",
]

Durability = Literal["fsync", "os", "memory"]
DURABILITIES: tuple[Durability, ...] = ("fsync", "os", "memory")


class SettingsError(ValueError):
    """A setting has a value the server cannot use; the message names flag and variable."""


# -- value parsers (strings in, typed values out; ValueError with a short reason) ---------


def _str(text: str) -> str:
    return text


def _optional_str(text: str) -> str | None:
    return text or None


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise ValueError(f"must be at least {low}, got {value}")
        return value

    return parse


def _port(text: str) -> int:
    value = _int_at_least(0)(text)
    if value > 65535:
        raise ValueError(f"must be a port number (0-65535; 0 picks a free one), got {value}")
    return value


def _optional_int_at_least(low: int) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        if text.strip().lower() in ("", "none", "off", "0"):
            return None
        return _int_at_least(low)(text)

    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number of seconds >= 0, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise ValueError(f"must be more than 0 seconds, got {text!r}")
    return value


def _optional_seconds(text: str) -> float | None:
    if text.strip().lower() in ("", "none", "off", "0"):
        return None
    return _positive_seconds(text)


def _durability(text: str) -> Durability:
    if text not in DURABILITIES:
        raise ValueError(f"must be one of {', '.join(DURABILITIES)}, got {text!r}")
    return text


def _public_url(text: str) -> str | None:
    if not text:
        return None
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"must be an absolute http(s) URL such as https://jobs.example.com, got {text!r}"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"must not have a query or fragment, got {text!r}")
    return text.rstrip("/")


def _optional_rate(text: str) -> float | None:
    if text.strip().lower() in ("", "none", "off", "0"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number per second, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"must be a finite number per second > 0 (0: off), got {text!r}")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


# -- the table ------------------------------------------------------------------------


@attrs.frozen(slots=True)
class Option:
    """One setting: its attribute name, flag, variable, parser, default and help."""

    name: str
    flag: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    metavar: str | None = None
    is_flag: bool = False  # a switch: `--access-log` means true
    negatable: bool = False  # a switch that is on by default: `--no-fast-path` turns it off

    @property
    def off_flag(self) -> str:
        """`--no-<flag>`, for a negatable switch."""
        return "--no-" + self.flag.removeprefix("--")

    @property
    def env(self) -> str:
        return "AGENTJOBS_" + self.name.upper()


_MIB = 1024 * 1024

OPTIONS: tuple[Option, ...] = (
    Option("host", "--host", _str, "127.0.0.1", "address to listen on", "ADDR"),
    Option("port", "--port", _port, 8005, "port to listen on (0: pick a free port)", "PORT"),
    Option(
        "data_dir",
        "--data-dir",
        _str,
        "./agentjobs-data",
        "directory of the journal (created if missing; unused with --durability memory)",
        "DIR",
    ),
    Option(
        "durability",
        "--durability",
        _durability,
        "fsync",
        "fsync: fsync before acknowledging (group commit); os: write without fsync "
        "(survives a process crash, not power loss); memory: no file (tests, benchmarks)",
        "MODE",
    ),
    Option(
        "config",
        "--config",
        _optional_str,
        None,
        "TOML file describing named runners (see docs/configuration.md)",
        "FILE",
    ),
    Option(
        "runner",
        "--runner",
        _optional_str,
        None,
        "default runner: with --config, one of its runner names; without, a runner type "
        "(echo, openai, command, python; default echo)",
        "NAME",
    ),
    Option(
        "model",
        "--model",
        _optional_str,
        None,
        "model for --runner openai (else AGENTJOBS_MODEL)",
        "NAME",
    ),
    Option(
        "openai_base_url",
        "--openai-base-url",
        _optional_str,
        None,
        "endpoint for --runner openai (else OPENAI_BASE_URL, else OpenAI's)",
        "URL",
    ),
    Option(
        "command",
        "--command",
        _optional_str,
        None,
        'command line for --runner command, e.g. "my-agent --json" (prompt on stdin)',
        "CMD",
    ),
    Option(
        "python_target",
        "--python-target",
        _optional_str,
        None,
        "module:function for --runner python",
        "MOD:FN",
    ),
    Option(
        "max_concurrency",
        "--max-concurrency",
        _int_at_least(1),
        8,
        "runs executing at once",
        "N",
    ),
    Option(
        "session_concurrency",
        "--session-concurrency",
        _optional_int_at_least(1),
        None,
        "runs of one session executing at once (1: a session's runs go one at a time, in "
        "order; default: no per-session limit)",
        "N",
    ),
    Option(
        "max_queue",
        "--max-queue",
        _int_at_least(1),
        100_000,
        "queued runs before submits get 503 + Retry-After",
        "N",
    ),
    Option(
        "grace_period",
        "--grace-period",
        _seconds,
        10.0,
        "seconds running runs get to finish on shutdown; the rest are requeued for the next start",
        "SECONDS",
    ),
    Option(
        "default_timeout",
        "--default-timeout",
        _optional_seconds,
        None,
        "timeout of runs that give none (default: none)",
        "SECONDS",
    ),
    Option(
        "max_attempts",
        "--max-attempts",
        _int_at_least(1),
        1,
        "attempts of runs that give no max_attempts (retryable failures only)",
        "N",
    ),
    Option(
        "max_prompt_chars",
        "--max-prompt-chars",
        _optional_int_at_least(1),
        1_000_000,
        "longest prompt accepted, in characters (0: no limit)",
        "N",
    ),
    Option(
        "max_result_bytes",
        "--max-result-bytes",
        _optional_int_at_least(1),
        16 * _MIB,
        "largest result recorded, in bytes of JSON; larger results fail the run (0: no limit)",
        "BYTES",
    ),
    Option(
        "idempotency_window",
        "--idempotency-window",
        _positive_seconds,
        24 * 3600.0,
        "seconds an Idempotency-Key is remembered",
        "SECONDS",
    ),
    Option(
        "retention",
        "--retention",
        _positive_seconds,
        7 * 24 * 3600.0,
        "seconds finished runs are kept before compaction may drop them",
        "SECONDS",
    ),
    Option(
        "compact_interval",
        "--compact-interval",
        _optional_seconds,
        3600.0,
        "seconds between scheduled journal compactions (`off`: only `agentjobs log compact`)",
        "SECONDS",
    ),
    Option(
        "cancel_wait",
        "--cancel-wait",
        _seconds,
        30.0,
        "seconds POST .../cancel waits for a running run to really stop",
        "SECONDS",
    ),
    Option(
        "public_url",
        "--public-url",
        _public_url,
        None,
        "base URL for Location, poll_url and stream_url (default: relative paths; the Host "
        "header is never used)",
        "URL",
    ),
    Option(
        "max_body_bytes",
        "--max-body-bytes",
        _int_at_least(1),
        _MIB,
        "largest request body, in bytes (413 beyond)",
        "BYTES",
    ),
    Option(
        "max_batch",
        "--max-batch",
        _int_at_least(1),
        1000,
        "most runs in one POST /api/v1/runs/batch (422 beyond)",
        "N",
    ),
    Option(
        "max_batch_bytes",
        "--max-batch-bytes",
        _int_at_least(1),
        16 * _MIB,
        "largest POST /api/v1/runs/batch body, in bytes (413 beyond; other requests: "
        "--max-body-bytes)",
        "BYTES",
    ),
    Option(
        "max_wait",
        "--max-wait",
        _seconds,
        60.0,
        "cap on GET .../result?wait=SECONDS long-polls",
        "SECONDS",
    ),
    Option(
        "sse_heartbeat",
        "--sse-heartbeat",
        _positive_seconds,
        15.0,
        "seconds of silence after which a stream sends a keep-alive comment and a heartbeat event",
        "SECONDS",
    ),
    Option(
        "webhook_secret",
        "--webhook-secret",
        _optional_str,
        None,
        "whsec_<base64> secret signing every webhook (several, space-separated, during a "
        "rotation); prefer the variable: flags are visible in ps",
        "SECRET",
    ),
    Option(
        "webhook_secrets_file",
        "--webhook-secrets-file",
        _optional_str,
        None,
        "file of per-tenant webhook secrets, one tenant:whsec_... per line",
        "FILE",
    ),
    Option(
        "webhook_allow",
        "--webhook-allow",
        _optional_str,
        None,
        "private networks and host names webhooks may reach, comma-separated (e.g. "
        "127.0.0.1/32,10.0.0.0/8,hooks.internal); default: public addresses only",
        "LIST",
    ),
    Option(
        "api_keys",
        "--api-keys",
        _optional_str,
        None,
        "API keys, comma-separated tenant:key pairs (a tenant may have several keys); "
        "prefer the variable or --api-keys-file: flags are visible in ps",
        "LIST",
    ),
    Option(
        "api_keys_file",
        "--api-keys-file",
        _optional_str,
        None,
        "file of API keys, one tenant:key per line (# comments, blank lines)",
        "FILE",
    ),
    Option(
        "metrics_key",
        "--metrics-key",
        _optional_str,
        None,
        "key for GET /metrics and /stats (then only this key opens them; without it, any "
        "API key does); prefer the variable",
        "KEY",
    ),
    Option(
        "insecure_no_auth",
        "--insecure-no-auth",
        _bool,
        False,
        "allow a non-loopback --host without API keys (only behind a proxy that "
        "authenticates: anyone who reaches the port can use the API)",
        is_flag=True,
    ),
    Option(
        "sse_query_key",
        "--sse-query-key",
        _bool,
        False,
        "accept the API key as ?api_key= on GET .../stream, for browser EventSource "
        "(URLs end up in proxy logs and browser history: see docs/security.md)",
        is_flag=True,
    ),
    Option(
        "cors_origins",
        "--cors-origins",
        _optional_str,
        None,
        "origins browsers may call the API from, comma-separated "
        "(https://app.example.com,https://b.example), or * for any (none: CORS off)",
        "LIST",
    ),
    Option(
        "tenant_max_queued",
        "--tenant-max-queued",
        _optional_int_at_least(1),
        None,
        "queued + running runs one tenant may have; more submits get 429 + Retry-After "
        "(0: no limit)",
        "N",
    ),
    Option(
        "tenant_rate",
        "--tenant-rate",
        _optional_rate,
        None,
        "submits per second one tenant may make on average (token bucket; 429 + "
        "Retry-After beyond; 0: no limit)",
        "PER_SECOND",
    ),
    Option(
        "tenant_burst",
        "--tenant-burst",
        _optional_int_at_least(1),
        None,
        "submits one tenant may make at once before --tenant-rate applies (default: one "
        "second's worth, at least 1)",
        "N",
    ),
    Option(
        "tenant_max_streams",
        "--tenant-max-streams",
        _optional_int_at_least(1),
        None,
        "event streams one tenant may have open at once; more get 429 (0: no limit)",
        "N",
    ),
    Option(
        "access_log",
        "--access-log",
        _bool,
        False,
        "log one line per request to stderr",
        is_flag=True,
    ),
    Option(
        "backlog",
        "--backlog",
        _int_at_least(1),
        2048,
        "listen backlog: connections the kernel queues before the server accepts them "
        "(capped by net.core.somaxconn); a burst beyond waits for SYN retransmissions",
        "N",
    ),
    Option(
        "fast_path",
        "--fast-path",
        _bool,
        True,
        "answer POST /api/v1/runs, GET /api/v1/runs/{id} and .../result (without ?wait=) "
        "in a lean ASGI layer in front of quart, with identical answers; --no-fast-path "
        "sends every request through quart",
        is_flag=True,
        negatable=True,
    ),
)

_BY_NAME = {o.name: o for o in OPTIONS}


@attrs.frozen(slots=True, kw_only=True)
class ServerSettings:
    """Everything `agentjobs serve` needs; build with `resolve` or directly in tests."""

    host: str = "127.0.0.1"
    port: int = 8005
    data_dir: str = "./agentjobs-data"
    durability: Durability = "fsync"
    config: str | None = None
    runner: str | None = None
    model: str | None = None
    openai_base_url: str | None = None
    command: str | None = None
    python_target: str | None = None
    max_concurrency: int = 8
    session_concurrency: int | None = None
    max_queue: int = 100_000
    grace_period: float = 10.0
    default_timeout: float | None = None
    max_attempts: int = 1
    max_prompt_chars: int | None = 1_000_000
    max_result_bytes: int | None = 16 * _MIB
    idempotency_window: float = 24 * 3600.0
    retention: float = 7 * 24 * 3600.0
    compact_interval: float | None = 3600.0
    cancel_wait: float = 30.0
    public_url: str | None = None
    max_body_bytes: int = _MIB
    max_batch: int = 1000
    max_batch_bytes: int = 16 * _MIB
    max_wait: float = 60.0
    sse_heartbeat: float = 15.0
    webhook_secret: str | None = attrs.field(default=None, repr=False)
    webhook_secrets_file: str | None = None
    webhook_allow: str | None = None
    api_keys: str | None = attrs.field(default=None, repr=False)
    api_keys_file: str | None = None
    metrics_key: str | None = attrs.field(default=None, repr=False)
    insecure_no_auth: bool = False
    sse_query_key: bool = False
    cors_origins: str | None = None
    tenant_max_queued: int | None = None
    tenant_rate: float | None = None
    tenant_burst: int | None = None
    tenant_max_streams: int | None = None
    access_log: bool = False
    backlog: int = 2048
    fast_path: bool = True

    def engine_config(self) -> EngineConfig:
        """The engine's share of the settings."""
        return EngineConfig(
            durability=self.durability,
            max_concurrency=self.max_concurrency,
            session_concurrency=self.session_concurrency,
            max_queue=self.max_queue,
            default_timeout=self.default_timeout,
            default_max_attempts=self.max_attempts,
            max_prompt_chars=self.max_prompt_chars,
            max_result_bytes=self.max_result_bytes,
            idempotency_window_s=self.idempotency_window,
            retention_s=self.retention,
            compact_interval_s=self.compact_interval,
            grace_period_s=self.grace_period,
            cancel_wait_s=self.cancel_wait,
        )

    def webhook_settings(self) -> WebhookSettings:
        """The outbox's share: signing secrets and the SSRF allow-list. Raises ValueError
        (without echoing a secret) for a malformed secret, file or allow-list entry."""
        tenant_secrets: dict[str, str] = {}
        if self.webhook_secrets_file is not None:
            try:
                text = Path(self.webhook_secrets_file).read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(
                    f"--webhook-secrets-file: cannot read {self.webhook_secrets_file}: "
                    f"{exc.strerror or exc}"
                ) from None
            tenant_secrets = parse_tenant_secrets(text)
        return WebhookSettings(
            secret=self.webhook_secret,
            tenant_secrets=tenant_secrets,
            policy=WebhookPolicy.parse(self.webhook_allow),
        )

    def keyring(self) -> KeyRing:
        """The API keys (`--api-keys`, `--api-keys-file`, both may be given) and the metrics
        key. Raises ValueError naming the file line or entry, never the key."""
        keys = []
        if self.api_keys is not None:
            keys += parse_api_keys(
                self.api_keys, source="AGENTJOBS_API_KEYS/--api-keys", lines=False
            )
        if self.api_keys_file is not None:
            try:
                text = Path(self.api_keys_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ValueError(
                    f"--api-keys-file: cannot read {self.api_keys_file}: {reason}"
                ) from None
            keys += parse_api_keys(text, source=self.api_keys_file, lines=True)
        return KeyRing.build(keys, self.metrics_key)

    def cors_policy(self) -> CorsPolicy | None:
        """None when CORS is off (no `--cors-origins`)."""
        return CorsPolicy.parse(self.cors_origins)

    @property
    def submit_burst(self) -> int:
        """`--tenant-burst`, defaulting to one second's worth of `--tenant-rate`."""
        if self.tenant_burst is not None:
            return self.tenant_burst
        return max(1, math.ceil(self.tenant_rate or 1.0))

    def exposure_problem(self, keyring: KeyRing) -> str | None:
        """Why these settings must not start, if they would serve a non-loopback address
        to anyone (no API keys and no explicit `--insecure-no-auth`)."""
        if is_loopback(self.host) or keyring.enabled or self.insecure_no_auth:
            return None
        return (
            f"refusing to listen on {self.host} without API keys: anyone who can reach it "
            "could submit, read and delete runs. Give keys (AGENTJOBS_API_KEYS or "
            "--api-keys-file, see docs/security.md), listen on 127.0.0.1, or, only behind a "
            "proxy that authenticates, pass --insecure-no-auth (AGENTJOBS_INSECURE_NO_AUTH=1)"
        )

    def check(self) -> KeyRing:
        """Every check that needs more than one option; returns the key ring. Raises
        `SettingsError` (used by `resolve`, and by `serve` for settings built directly)."""
        try:
            self.engine_config()  # the engine's own checks, reported before start-up
        except (TypeError, ValueError) as exc:
            raise SettingsError(str(exc)) from None
        try:
            self.webhook_settings()  # secrets and allow-list, likewise
        except ValueError as exc:
            raise SettingsError(f"webhook settings: {exc}") from None
        try:
            keyring = self.keyring()
        except ValueError as exc:
            raise SettingsError(f"API keys: {exc}") from None
        try:
            self.cors_policy()
        except ValueError as exc:
            raise SettingsError(f"--cors-origins: {exc}") from None
        if self.tenant_burst is not None and self.tenant_rate is None:
            raise SettingsError("--tenant-burst: needs --tenant-rate (the refill rate)")
        problem = self.exposure_problem(keyring)
        if problem is not None:
            raise SettingsError(problem)
        return keyring

    @property
    def data_path(self) -> Path | None:
        """The journal directory, or None when nothing is written (memory durability)."""
        return None if self.durability == "memory" else Path(self.data_dir)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option. Defaults stay None so `resolve` can tell 'not given'."""
    for opt in OPTIONS:
        default_text = "none" if opt.default is None else str(opt.default)
        help_text = f"{opt.help} [env {opt.env}; default {default_text}]"
        if opt.is_flag:
            parser.add_argument(
                opt.flag, dest=opt.name, action="store_const", const="true", help=help_text
            )
            if opt.negatable:
                parser.add_argument(
                    opt.off_flag,
                    dest=opt.name,
                    action="store_const",
                    const="false",
                    help=f"turn {opt.flag} off [env {opt.env}=0]",
                )
        else:
            parser.add_argument(opt.flag, dest=opt.name, metavar=opt.metavar, help=help_text)


def resolve(
    args: argparse.Namespace | Mapping[str, str | None] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServerSettings:
    """Settings from flags (strings, None when not given), else the environment, else defaults."""
    env = os.environ if environ is None else environ
    given: Mapping[str, Any]
    if args is None:
        given = {}
    elif isinstance(args, argparse.Namespace):
        given = vars(args)
    else:
        given = args
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = given.get(opt.name)
        source = opt.flag
        if raw is None:
            raw = env.get(opt.env)
            source = opt.env
        if raw is None:
            continue
        try:
            values[opt.name] = opt.parse(str(raw))
        except ValueError as exc:
            raise SettingsError(f"{source}: {exc}") from None
    try:
        settings = ServerSettings(**values)
    except (TypeError, ValueError) as exc:
        raise SettingsError(str(exc)) from None
    settings.check()
    return settings


def is_loopback(host: str) -> bool:
    """Is `host` a loopback address (or `localhost`)? Host names other than `localhost`
    count as not loopback: what they resolve to can change."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def option(name: str) -> Option:
    """The option called `name` (for messages that cite a flag)."""
    return _BY_NAME[name]


def env_names(options: Sequence[Option] = OPTIONS) -> list[str]:
    return [o.env for o in options]
