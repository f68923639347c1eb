"""The OpenAPI document served at `/openapi.json`.

`docs/openapi.yaml` is the copy people read and edit. The server cannot read YAML at run
time (PyYAML is not a runtime dependency) and must find the spec however it is installed
(wheel, zipapp, PyInstaller binary, where data files need extra packaging flags), so the
package carries the same document as JSON inside a Python module, `_openapi_spec.py`.
`tests/test_http_openapi.py` fails when the two differ; regenerate with

    python -m agentjobs.http.openapi_gen docs/openapi.yaml

(needs PyYAML, which the `test` extra installs).
"""

from __future__ import annotations

import functools
from typing import Any

import orjson

__all__ = ["spec", "spec_bytes"]


@functools.cache
def spec_bytes() -> bytes:
    from ._openapi_spec import SPEC_JSON

    return SPEC_JSON.encode()


def spec() -> dict[str, Any]:
    data: dict[str, Any] = orjson.loads(spec_bytes())
    return data
