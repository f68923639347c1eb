"""The shiv zipapp (`make zipapp`): build it, start the server from it, submit, get the result.

The build runs the same shiv command as the Makefile, on a copy of the source tree (so that
the build leaves nothing in the work tree and concurrent runs do not collide). The zipapp is
then run with `python -I -S`: no site-packages at all, so every import (trio, quart, ...) must
come from inside the zipapp, which is what "self-contained" means.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytest.importorskip(
    "shiv", reason="shiv is not installed: `pip install -e '.[dev]'` (or `make test`) adds it"
)

ROOT = Path(__file__).resolve().parents[1]
SHIV = Path(sys.executable).with_name("shiv")


@pytest.fixture(scope="module")
def zipapp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("zipapp")
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "agentjobs", src / "agentjobs", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = work / "agentjobs.pyz"
    cmd = [
        str(SHIV) if SHIV.exists() else "shiv",
        "--quiet",
        "--reproducible",
        "--compressed",
        "-p",
        "/usr/bin/env python3",
        "-e",
        "agentjobs.cli:main",
        "-o",
        str(out),
        str(src),
    ]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, f"shiv failed:\n{proc.stdout}\n{proc.stderr}"
    assert out.stat().st_size > 100_000
    return out


def _run_env(zipapp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTJOBS_")}
    env["SHIV_ROOT"] = str(zipapp.parent / "shiv-root")
    return env


def _cmd(zipapp: Path, *args: str) -> list[str]:
    # -I: ignore PYTHONPATH and the user site; -S: no site-packages either
    return [sys.executable, "-I", "-S", str(zipapp), *args]


def test_zipapp_runs_without_site_packages(zipapp: Path) -> None:
    proc = subprocess.run(
        _cmd(zipapp, "--help"), capture_output=True, text=True, timeout=60, env=_run_env(zipapp)
    )
    assert proc.returncode == 0, proc.stderr
    assert "serve" in proc.stdout
    # it unpacked its own copy of the dependencies, agentjobs included
    unpacked = list((zipapp.parent / "shiv-root").glob("*/site-packages/agentjobs/__init__.py"))
    assert unpacked, "the zipapp did not unpack its site-packages into SHIV_ROOT"
    assert list((zipapp.parent / "shiv-root").glob("*/site-packages/trio/__init__.py"))


@pytest.fixture
def zipapp_server(zipapp: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    proc = subprocess.Popen(
        _cmd(zipapp, "serve", "--port", "0", "--durability", "memory"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=_run_env(zipapp),
    )
    assert proc.stdout is not None
    lines: list[str] = []
    url = None
    deadline = time.monotonic() + 30
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
    if url is None:
        proc.kill()
        pytest.fail("the server from the zipapp did not start:\n" + "".join(lines))
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_zipapp_serves_submit_and_result(zipapp_server: tuple[str, subprocess.Popen[str]]) -> None:
    url, proc = zipapp_server
    with httpx.Client(base_url=url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "healthy"
        r = http.post("/api/v1/runs", json={"prompt": "from the zipapp"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job_id"]
        deadline = time.monotonic() + 20
        while True:
            res = http.get(f"/api/v1/runs/{job_id}/result")
            if res.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert res.status_code == 200, res.text
        body = res.json()
        assert body["status"] == "succeeded"
        assert body["result"] == "from the zipapp"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0


# -- the PyInstaller binary (`make binary`): ~45-55 s to build, so only on request --------


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("AGENTJOBS_SLOW") != "1",
    reason="builds the PyInstaller binary (~50 s); run with AGENTJOBS_SLOW=1",
)
def test_binary_builds_serves_and_stops_cleanly_on_a_group_sigterm(tmp_path: Path) -> None:
    pyinstaller = Path(sys.executable).with_name("pyinstaller")
    if not pyinstaller.exists():
        pytest.skip("pyinstaller is not installed: `pip install -e '.[dev]'` adds it")
    entry = tmp_path / "agentjobs_main.py"
    entry.write_text("import sys\nfrom agentjobs.cli import main\nsys.exit(main())\n")
    cmd = [
        str(pyinstaller),
        "--noconfirm",
        "--clean",
        "--log-level",
        "WARN",
        "--onefile",
        "--name",
        "agentjobs",
        "--paths",
        str(ROOT),
        "--collect-submodules",
        "agentjobs",
        "--distpath",
        str(tmp_path / "dist"),
        "--workpath",
        str(tmp_path / "build"),
        "--specpath",
        str(tmp_path),
        str(entry),
    ]
    built = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    binary = tmp_path / "dist" / "agentjobs"
    assert binary.stat().st_size > 5_000_000
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTJOBS_", "PYTHON"))}
    # its own session: the SIGTERM below goes to the whole process group, as systemd's
    # default KillMode and a terminal's Ctrl-C do (the bootloader and the server both get it)
    proc = subprocess.Popen(
        [str(binary), "serve", "--port", "0", "--durability", "memory"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    assert proc.stdout is not None
    url = None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    try:
        assert url is not None, "".join(lines)
        with httpx.Client(base_url=url, timeout=30) as http:
            job_id = http.post("/api/v1/runs", json={"prompt": "from the binary"}).json()["job_id"]
            res = http.get(f"/api/v1/runs/{job_id}/result", params={"wait": "20"})
            assert res.status_code == 200, res.text
            assert res.json()["result"] == "from the binary"
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        proc.stdout.close()
