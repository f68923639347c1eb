"""Starting, watching and stopping the servers under test (all on 127.0.0.1, one process each).

Each server is a child process that prints `listening on http://127.0.0.1:PORT` once bound
(ours, and the two launchers in this directory, all bind port 0), so no port is guessed.
Its output goes to a log file in the run's temporary directory. RSS and CPU are read from
/proc/<pid>; "settled" means the server has no queued or running work left and has stopped
using CPU, so one measurement's backlog never runs into the next.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
_LISTENING = re.compile(r"listening on (http://[0-9.]+:\d+)")
_CLK_TCK = os.sysconf("SC_CLK_TCK")

PEER_VENV = Path(
    os.environ.get(
        "AGENTJOBS_BENCH_PEER_VENV",
        Path.home() / ".cache" / "agentjobs-bench" / "praisonai-venv",
    )
)
PEER_REQUIREMENTS = ["praisonai==4.7.19", "fastapi", "uvicorn", "sse-starlette"]
PEER_VERSION_PACKAGES = [
    "praisonai",
    "fastapi",
    "starlette",
    "uvicorn",
    "sse-starlette",
    "pydantic",
    "h11",
    "uvloop",
    "httptools",
]
OURS_VERSION_PACKAGES = ["agentjobs", "trio", "hypercorn", "quart", "quart-trio", "h11", "orjson"]


@dataclass
class Server:
    """A server under test. `kind`: "ours", "praisonai" or "ceiling"."""

    name: str
    label: str
    kind: str
    argv: list[str]
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    log_path: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, workdir: Path, timeout: float = 90.0) -> None:
        self.launch(workdir)
        self.wait_ready(timeout)

    def launch(self, workdir: Path) -> None:
        """Start the process; `wait_ready` then waits for its "listening on" line."""
        self.log_path = workdir / f"{self.name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=workdir,
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        assert self.proc is not None and self.log_path is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            m = _LISTENING.search(text)
            if m:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited at start:\n{text[-2000:]}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.label} did not start within {timeout}s")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    # -- /proc ------------------------------------------------------------------------

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime + stime

    # -- HTTP ---------------------------------------------------------------------------

    def get_json(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def pending(self) -> int:
        """Runs queued or running (0 for the ceiling apps, which keep nothing)."""
        if self.kind == "ours":
            h = self.get_json("/health")
            return int(h["queued"]) + int(h["running"])
        if self.kind == "praisonai":
            h = self.get_json("/health")
            return int(h["executor_stats"]["running_jobs"])  # queued + running tasks
        return 0

    def retained_runs(self) -> int | None:
        """How many runs the server still answers for (list total)."""
        if self.kind == "ours":
            return int(self.get_json("/api/v1/runs?limit=1")["total"])
        if self.kind == "praisonai":
            return int(self.get_json("/api/v1/runs?page_size=1")["total"])
        return None

    def settle(self, max_seconds: float = 60.0, window: float = 0.25) -> float:
        """Wait until no work is pending and the process has (nearly) stopped using CPU:
        under 12 % of a core over `window` seconds. Returns the seconds waited."""
        start = time.monotonic()
        deadline = start + max_seconds
        while time.monotonic() < deadline:
            try:
                if self.pending() == 0:
                    break
            except OSError:
                pass
            time.sleep(0.05)
        last = self.cpu_seconds()
        while time.monotonic() < deadline:
            time.sleep(window)
            now = self.cpu_seconds()
            if now - last <= 0.12 * window:
                break
            last = now
        return time.monotonic() - start


def ours_argv(durability: str, data_dir: Path, max_concurrency: int) -> list[str]:
    exe = Path(sys.executable).with_name("agentjobs")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "agentjobs"]
    return [
        *cmd,
        "serve",
        "--port",
        "0",
        "--runner",
        "echo",
        "--durability",
        durability,
        "--data-dir",
        str(data_dir),
        "--max-concurrency",
        str(max_concurrency),
    ]


def ceiling_argv(app: str) -> list[str]:
    return [sys.executable, str(HERE / "ceiling.py"), "--port", "0", "--app", app]


def peer_argv(venv: Path) -> list[str]:
    return [str(venv / "bin" / "python"), str(HERE / "praisonai_server.py"), "--port", "0"]


# -- the peer's venv ----------------------------------------------------------------------


def ensure_peer_venv(venv: Path = PEER_VENV, log: Any = print) -> Path:
    """Create (or reuse) the venv holding PraisonAI; never touches ours."""
    py = venv / "bin" / "python"
    check = "import praisonai.jobs.server, uvicorn, sse_starlette, fastapi"
    if py.exists():
        ok = subprocess.run([str(py), "-c", check], capture_output=True, timeout=120)
        have = package_versions(py, ["praisonai"]).get("praisonai")
        if ok.returncode == 0 and have == PEER_REQUIREMENTS[0].split("==")[1]:
            return venv
    log(f"creating the PraisonAI venv at {venv} ({' '.join(PEER_REQUIREMENTS)})")
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PEER_REQUIREMENTS],
        check=True,
        timeout=1800,
    )
    subprocess.run([str(py), "-c", check], check=True, timeout=120)
    return venv


def package_versions(python: Path | str, names: list[str]) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try: out[n] = m.version(n)\n"
        "    except m.PackageNotFoundError: pass\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([str(python), "-c", code, *names], capture_output=True, timeout=60)
    try:
        versions: dict[str, str] = json.loads(r.stdout)
    except ValueError:
        versions = {}
    py = subprocess.run(
        [str(python), "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    versions["python"] = py.stdout.strip()
    return versions


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    uname = os.uname()
    fs = "unknown"
    try:
        tmp = tempfile.gettempdir()
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, typ = line.split()[:3]
            if tmp.startswith(mnt) and len(mnt) > len(best):
                best, fs = mnt, f"{typ} on {dev} (mounted at {mnt})"
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": round(mem / 2**30, 1),
        "kernel": f"{uname.sysname} {uname.release}",
        "tmp_fs": fs,
    }


def fsync_probe(directory: Path, n: int = 100, size: int = 4096) -> tuple[float, float]:
    """p50/p90 ms of a bare append + fsync on this disk, now. On the project VM it flips
    between ~0.2 ms and ~4 ms with the neighbours' I/O, and with it every fsync figure.
    (benchmarks/journal.py's `raw_fsync_ms`, with a 4 KiB write.)"""
    from journal import raw_fsync_ms  # benchmarks/journal.py: benchmarks/ is on sys.path

    return raw_fsync_ms(directory, size=size, n=n)


def source_digest() -> str:
    """A short hash of agentjobs/**/*.py as measured (the tree changes between commits)."""
    import hashlib

    h = hashlib.sha1()
    for path in sorted((REPO / "agentjobs").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:12]


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--", "agentjobs"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+local changes in agentjobs/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
