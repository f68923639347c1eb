"""Timestamps on the wire: `isoformat` is on every answer's hot path, so it is written for
speed; this pins it to the obvious (slower) definition."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from agentjobs.engine.model import isoformat


@given(st.floats(min_value=0, max_value=2**35, allow_nan=False, allow_infinity=False))
def test_isoformat_is_utc_with_microseconds_and_a_z(ts: float) -> None:
    expected = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert isoformat(ts) == expected


def test_isoformat_examples() -> None:
    assert isoformat(None) is None
    assert isoformat(0.0) == "1970-01-01T00:00:00.000000Z"
    assert isoformat(1764370000.5) == "2025-11-28T22:46:40.500000Z"
