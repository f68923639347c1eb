"""The real server as a subprocess, on a data dir that outlives it.

Why a subprocess: only a separate process can be `kill -9`-ed, have its memory measured
on its own (`/proc/<pid>/status`), and show what an operator sees at start-up (exit code,
message). `live_server.ServerProcess` does the starting (port 0, start-up lines); this
module adds the runner configuration the harness needs and a few probes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from live_server import ServerProcess

__all__ = [
    "MARKER_SCRIPT",
    "ServerProcess",
    "open_files_soft_limit",
    "proc_status_kib",
    "recovered_counts",
    "start_compacting_server",
    "start_server",
    "write_runners_toml",
]

MARKER_SCRIPT = Path(__file__).resolve().parent / "marker_runner.py"


def write_runners_toml(path: Path, marker_dir: Path, *, orphan: str = "exit") -> Path:
    """A runner config with `echo` (the default) and `marker` (tests/faults/marker_runner.py).

    `orphan` is the marker script's behaviour when the server dies under it: "exit" (a
    well-behaved agent) or "stay" (one that goes on working).
    """
    marker_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-I", "-S", str(MARKER_SCRIPT)]
    quoted = ", ".join(f'"{a}"' for a in argv)
    path.write_text(
        f"""default = "echo"

[runners.echo]
type = "echo"

[runners.marker]
type = "command"
argv = [{quoted}]
result = "json"
kill_grace_s = 2
env = {{ MARKER_DIR = "{marker_dir}", MARKER_ORPHAN = "{orphan}" }}
""",
        encoding="utf-8",
    )
    return path


def start_server(
    data_dir: Path, *args: str, config: Path | None = None, start_timeout: float = 30.0
) -> ServerProcess:
    """`python -m agentjobs serve` on 127.0.0.1:<free port>, returned once it serves."""
    extra = ("--config", str(config)) if config is not None else ()
    return ServerProcess(data_dir, *extra, *args, start_timeout=start_timeout)


def proc_status_kib(pid: int, field: str = "VmRSS") -> int:
    """A memory figure of a process from /proc/<pid>/status, in KiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return 0


def recovered_counts(proc: ServerProcess) -> dict[str, int]:
    """The "runs recovered: R requeued, F failed, C cancelled; Q still queued" start-up line."""
    line = proc.wait_for_line(r"^runs recovered: ", 1.0)
    words = line.replace(";", ",").split(":", 1)[1].split(",")
    counts: dict[str, int] = {}
    for word in words:
        parts = word.split()
        counts[parts[-1]] = int(parts[0])  # "3 requeued", ..., "2 still queued"
    return counts


def open_files_soft_limit(wanted: int) -> int:
    """Raise this process' soft RLIMIT_NOFILE towards `wanted` (up to the hard limit);
    returns the limit now in force. Children (servers) inherit it."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft if soft != resource.RLIM_INFINITY else os.sysconf("SC_OPEN_MAX")


def start_compacting_server(data_dir: Path, *args: str, compact_every: float) -> ServerProcess:
    """The real server compacting its own journal every `compact_every` seconds (0: never),
    through `--compact-interval` (the default schedule, hourly, is too seldom for a soak)."""
    every = str(compact_every) if compact_every > 0 else "off"
    return start_server(data_dir, *args, "--compact-interval", every)
