"""`docs/embedding.md` starts with a complete example: it must run as written, and write
nowhere but a temporary directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "embedding.md"


def first_python_block(text: str) -> str:
    match = re.search(r"^```python\n(.*?)^```", text, re.S | re.M)
    assert match is not None, "docs/embedding.md has no python block"
    return match.group(1)


def test_the_first_example_in_embedding_md_runs_as_written(tmp_path: Path) -> None:
    code = first_python_block(DOC.read_text())
    assert "open_engine" in code and "trio.run(main)" in code
    script = tmp_path / "example.py"
    script.write_text(code)
    cwd = tmp_path / "cwd"
    tmp = tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "succeeded {'shouted': 'HELLO DURABLE WORLD', 'attempt': 1}" in out
    assert "{'shouted': 'TRY AGAIN', 'attempt': 2}" in out
    assert "\ncancelled\n" in out
    assert len(re.findall(r"^run_\w+ (succeeded|cancelled) \d$", out, re.M)) == 3
    assert list(cwd.iterdir()) == [] and list(tmp.iterdir()) == []  # nothing left behind
