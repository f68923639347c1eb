"""Regenerate `_openapi_spec.py` from docs/openapi.yaml (see `agentjobs.http.openapi`).

    python -m agentjobs.http.openapi_gen docs/openapi.yaml

Needs PyYAML (installed by the `test` extra; the server itself does not need it).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import orjson

__all__ = ["main", "render_module"]

MODULE = Path(__file__).with_name("_openapi_spec.py")


def render_module(document: dict[str, Any]) -> str:
    """The source of `_openapi_spec.py` for a parsed OpenAPI document."""
    text = orjson.dumps(document, option=orjson.OPT_INDENT_2).decode()
    if '"""' in text:  # pragma: no cover - only an escaped quote before "" can do this
        raise ValueError('the spec contains """ and cannot be embedded as is')
    return (
        '"""Generated from docs/openapi.yaml by `python -m agentjobs.http.openapi_gen`. '
        'Do not edit."""\n'
        "\n"
        "# ruff: noqa: E501\n"
        "\n"
        'SPEC_JSON = r"""\n' + text + '\n"""\n'
    )


def main(argv: list[str]) -> int:
    yaml = importlib.import_module("yaml")  # a test/dev dependency, not a runtime one

    if len(argv) != 1:
        print("usage: python -m agentjobs.http.openapi_gen docs/openapi.yaml", file=sys.stderr)
        return 2
    document = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8"))
    MODULE.write_text(render_module(document), encoding="utf-8")
    print(f"wrote {MODULE}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
