"""`agentjobs serve`: run the HTTP server (REST + SSE) on top of the engine.

Every flag also reads an `AGENTJOBS_*` environment variable (the flag wins); the table
of options lives in `agentjobs.http.settings` and docs/configuration.md. Settings that must
not start (a bad value, or a non-loopback address without API keys) exit with code 2
before anything is opened.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    from .http.settings import add_arguments

    p: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="run the HTTP server",
        description="Run the agentjobs HTTP server: REST + SSE, PraisonAI-compatible. "
        "Each option can also be set with the AGENTJOBS_* variable shown; a flag wins "
        "over its variable.",
        epilog="Listening on a non-loopback --host needs API keys (--api-keys-file or "
        "AGENTJOBS_API_KEYS) or --insecure-no-auth; see docs/security.md.",
    )
    add_arguments(p)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .http.server import run
    from .http.settings import SettingsError, resolve

    try:
        settings = resolve(args)
    except SettingsError as exc:
        print(f"agentjobs serve: {exc}", file=sys.stderr)
        return 2
    return run(settings)
