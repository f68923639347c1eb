"""`agentjobs log verify | inspect | compact | repair` on real data directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import trio
from test_journal_support import FakeClock, make_journal, replay_dir

from agentjobs.cli import main
from agentjobs.engine.journal import acquire_lock, decode_line, release_lock, segment_name
from agentjobs.engine.model import Event, EventType

E = EventType


def build_data_dir(data_dir: Path, *, segment_bytes: int = 1024) -> list[Event]:
    """DATA_DIR/journal with a few finished, one running and one keyed run."""
    directory = data_dir / "journal"

    async def go() -> list[Event]:
        clock = FakeClock(1_700_000_000.0)
        journal, _ = make_journal(directory, clock, segment_bytes=segment_bytes)
        events = []
        async with trio.open_nursery() as nursery:
            await nursery.start(journal.run)
            for i in range(6):
                rid = f"run_done{i}"
                events.append(await journal.commit(rid, E.SUBMITTED, {"prompt": f"p{i}"}))
                events.append(await journal.commit(rid, E.STARTED, {"attempt": 1}))
                events.append(await journal.commit(rid, E.SUCCEEDED, {"result": i}))
            keyed = {"prompt": "k", "idempotency_key": "key-1", "request_hash": "h"}
            events.append(await journal.commit("run_keyed", E.SUBMITTED, keyed))
            events.append(await journal.commit("run_busy", E.SUBMITTED, {"prompt": "b"}))
            events.append(await journal.commit("run_busy", E.STARTED, {"attempt": 1}))
            await journal.aclose()
        return events

    return trio.run(go)


def cli(*argv: str) -> int:
    return main(["log", *argv])


def test_verify_clean(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_data_dir(tmp_path)
    assert cli("verify", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "21 events" in out and "OK" in out


def test_verify_names_file_and_line_of_damage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path)
    path = tmp_path / "journal" / segment_name(1)
    data = bytearray(path.read_bytes())
    second_line = data.index(b"\n") + 1
    data[second_line + 40] ^= 0x04
    path.write_bytes(bytes(data))
    assert cli("verify", str(tmp_path)) == 1
    out = capsys.readouterr().out
    assert f"DAMAGED at {path}:2: checksum mismatch" in out
    assert "log repair" in out


def test_verify_reports_a_torn_tail_separately(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path, segment_bytes=1 << 20)
    path = tmp_path / "journal" / segment_name(1)
    path.write_bytes(path.read_bytes() + b'{"crc":"0000')
    assert cli("verify", str(tmp_path)) == 3
    out = capsys.readouterr().out
    assert f"torn tail at {path}:23: incomplete last line: 12 bytes" in out
    assert path.read_bytes().endswith(b'{"crc":"0000')  # verify changes nothing


def test_inspect_summary_and_one_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_data_dir(tmp_path)
    assert cli("inspect", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "runs: 8" in out
    assert "succeeded  6" in out and "running    1" in out and "queued     1" in out
    assert "submitted          8" in out and "started            7" in out
    assert out.index("run_busy") < out.index("run_keyed") < out.index("run_done5")  # newest first
    assert cli("inspect", str(tmp_path), "--run", "run_done2") == 0
    out = capsys.readouterr().out
    assert "run_done2: 3 events" in out
    assert "2023-11-14T22:13:20" in out  # ISO-8601 UTC timestamps
    assert "Z  submitted" in out and '{"result":2}' in out
    assert "status succeeded, attempt 1, result 2" in out
    assert cli("inspect", str(tmp_path), "--run", "run_nope") == 1


def test_compact_drops_old_runs_and_strips_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path)  # events from 2023: far older than any retention
    assert cli("compact", str(tmp_path), "--dry-run") == 0
    out = capsys.readouterr().out
    assert "6 finished runs past retention, 1 expired idempotency keys" in out
    assert "would drop run_done0" in out
    assert cli("compact", str(tmp_path), "--retention-days", "7", "--idempotency-hours", "1") == 0
    out = capsys.readouterr().out
    assert "dropped 6 runs" in out and "stripped 1 idempotency keys" in out
    state, journal = replay_dir(tmp_path / "journal")
    journal.close_files()
    assert set(state.runs) == {"run_keyed", "run_busy"}
    assert state.runs["run_keyed"].spec.idempotency_key is None
    assert cli("verify", str(tmp_path)) == 0


def test_compact_and_repair_refuse_while_a_server_holds_the_lock(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path)
    lock = acquire_lock(tmp_path / "journal")
    try:
        assert cli("compact", str(tmp_path)) == 1
        assert "in use by another agentjobs process" in capsys.readouterr().err
        assert cli("repair", str(tmp_path)) == 1
        assert "stop the server first" in capsys.readouterr().err
        assert cli("verify", str(tmp_path)) == 0  # reading is fine
    finally:
        release_lock(lock)


def test_repair_moves_the_damaged_tail_and_later_segments_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    segments = sorted(jdir.glob("*.jsonl"))
    assert len(segments) >= 3
    path = segments[1]
    lines = path.read_bytes().split(b"\n")
    lines[2] = lines[2][:20] + b"X" + lines[2][21:]  # line 3 of segment 2 is damaged
    path.write_bytes(b"\n".join(lines))
    kept_seq = decode_line(lines[1])["seq"]
    assert cli("repair", str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"damage at {path}:3: checksum mismatch" in out
    assert f"moved later segment {segments[2].name}" in out
    assert "intact line(s) were in the moved part" in out
    assert "journal now: " in out and "OK" in out
    (side_dir,) = jdir.glob("repair-*")
    assert (side_dir / f"{path.name}.from-line-3").read_bytes().startswith(lines[2])
    assert (side_dir / segments[2].name).exists()
    state, journal = replay_dir(jdir)
    try:
        assert journal.last_seq == kept_seq
        kept = [e for e in events if e.seq <= kept_seq]
        assert {e.run for e in kept} == set(state.runs)
    finally:
        journal.close_files()
    assert cli("verify", str(tmp_path)) == 0
    assert cli("repair", str(tmp_path)) == 0
    assert "nothing to repair" in capsys.readouterr().out


def test_repair_of_a_damaged_header_moves_the_whole_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_data_dir(tmp_path, segment_bytes=1024)
    jdir = tmp_path / "journal"
    path = jdir / segment_name(2)
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    assert cli("verify", str(tmp_path)) == 1
    assert cli("repair", str(tmp_path)) == 0
    assert not path.exists()
    assert [p.name for p in jdir.glob("*.jsonl")] == [segment_name(1)]
    assert cli("verify", str(tmp_path)) == 0


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("verify", str(tmp_path / "nowhere")) == 1
    assert "no journal in" in capsys.readouterr().err
    assert cli() == 2


def test_the_console_entry_point(tmp_path: Path) -> None:
    build_data_dir(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "agentjobs", "log", "verify", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
