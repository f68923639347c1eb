"""Shared fixtures: real servers on 127.0.0.1 with a random port and a temporary data dir.

- `live_server`: the real app under hypercorn, in the test's own trio run, with the echo
  runner and `os` durability. Gives `.url`, `.client` (an `httpx.AsyncClient` with that
  base URL) and `.engine`. For other options use `open_live_server` from
  `tests/live_server.py` directly (`async with open_live_server(tmp_path, ...) as srv:`).
- `server_process`: a factory for `python -m agentjobs serve` subprocesses (what users
  run): `proc = server_process("--durability", "os")`; every process it started is
  stopped (SIGTERM, then SIGKILL) after the test.

Both are generic on purpose: any test module may use them.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from live_server import LiveServer, ServerProcess, open_live_server


@pytest.fixture
async def live_server(tmp_path: Path) -> AsyncIterator[LiveServer]:
    async with open_live_server(tmp_path / "data") as srv:
        yield srv


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(
        *args: str,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
        pre_args: tuple[str, ...] = (),
    ) -> ServerProcess:
        proc = ServerProcess(data_dir or tmp_path / "data", *args, env=env, pre_args=pre_args)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.__exit__(None, None, None)
