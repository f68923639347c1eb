"""`agentjobs` command line: one entry point, subcommands defined next to what they drive.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets
`func` (taking the parsed args, returning an exit code). This file only wires them up.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    from . import _cli_client, _cli_log, _cli_serve

    parser = argparse.ArgumentParser(
        prog="agentjobs", description="A durable job server for long-running AI-agent tasks."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _cli_log.register(sub)
    _cli_serve.register(sub)
    _cli_client.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    code: int = func(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
