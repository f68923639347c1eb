"""Runs as JSON documents: PraisonAI's field names first, ours after.

PraisonAI clients read `job_id`, `status`, `progress.percentage`, `retry_after`, `result`,
`error`, `duration_seconds`... (reference sections 3 and 14), so those keys are always
present, with null rather than missing. Our additions (`runner`, `attempt`, ...) are extra
keys, which its clients ignore.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..engine import Run, Status
from ..engine.model import isoformat

__all__ = ["Urls", "batch_item_view", "result_view", "retry_after", "status_view", "submit_view"]

RUNS_PATH = "/api/v1/runs"


@attrs.frozen(slots=True)
class Urls:
    """Where a run can be found. `base` is the configured public URL, or "" for relative
    paths: the request's Host header is never used (a forged Host would otherwise end up
    in `Location` and in links that clients follow)."""

    base: str = ""

    def run(self, run_id: str) -> str:
        return f"{self.base}{RUNS_PATH}/{run_id}"

    def stream(self, run_id: str) -> str:
        return f"{self.base}{RUNS_PATH}/{run_id}/stream"


def retry_after(run: Run, now: float) -> int | None:
    """Seconds a poller should wait: 2 while queued, 1-5 while running, null when done.

    Running runs are polled faster while young (1 s in their first 5 s, then one more second
    per 5 s, up to 5), so short runs are not left waiting a full 5 s for their result.
    """
    if run.status is Status.QUEUED:
        return 2
    if run.status is Status.RUNNING:
        started = run.started_at if run.started_at is not None else now
        return min(5, 1 + int(max(0.0, now - started) // 5))
    return None


def _duration(run: Run) -> float | None:
    if run.started_at is None or run.completed_at is None:
        return None
    return round(max(0.0, run.completed_at - run.started_at), 6)


def status_view(run: Run, now: float, default_runner: str) -> dict[str, Any]:
    p = run.progress
    runner = run.spec.runner or default_runner
    return {
        "job_id": run.id,
        "status": run.status.value,
        "progress": {
            "percentage": p.percentage,
            "current_step": p.step,
            "steps_completed": p.steps_completed,
            "steps_total": p.steps_total,
        },
        "created_at": isoformat(run.created_at),
        "started_at": isoformat(run.started_at),
        "completed_at": isoformat(run.completed_at),
        "agent_id": runner,
        "run_id": None,
        "session_id": run.spec.session_id,
        "error": run.error,
        "retry_after": retry_after(run, now),
        # ours
        "runner": runner,
        "attempt": run.attempt,
        "max_attempts": run.spec.max_attempts,
        "priority": run.spec.priority,
        "error_kind": run.error_kind,
        "cancel_requested": run.cancel_requested,
    }


def result_view(run: Run) -> dict[str, Any]:
    return {
        "job_id": run.id,
        "status": run.status.value,
        "result": run.result,
        "result_url": None,
        "metrics": run.metrics,
        "created_at": isoformat(run.created_at),
        "started_at": isoformat(run.started_at),
        "completed_at": isoformat(run.completed_at),
        "duration_seconds": _duration(run),
        "error": run.error,
        # ours
        "error_kind": run.error_kind,
        "session_id": run.spec.session_id,
        "attempt": run.attempt,
    }


def submit_view(run: Run, urls: Urls) -> dict[str, Any]:
    return {
        "job_id": run.id,
        "status": run.status.value,
        "created_at": isoformat(run.created_at),
        "poll_url": urls.run(run.id),
        "stream_url": urls.stream(run.id),
    }


def batch_item_view(index: int, run: Run, replayed: bool, urls: Urls) -> dict[str, Any]:
    """One accepted item of a batch answer: `status` is the HTTP status the item would
    have had alone (202), so that items read alike whether accepted or refused;
    the run's own status is `job_status` (as in problem documents)."""
    return {
        "index": index,
        "status": 202,
        "job_id": run.id,
        "job_status": run.status.value,
        "created_at": isoformat(run.created_at),
        "poll_url": urls.run(run.id),
        "stream_url": urls.stream(run.id),
        "replayed": replayed,
    }
