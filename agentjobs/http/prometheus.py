"""`GET /metrics`: the engine's figures in the Prometheus text exposition format (0.0.4).

Written by hand rather than with prometheus_client: the format is a few lines per metric,
the engine already keeps the counters and histograms, and one less dependency matters for
a server that is also shipped as a single binary.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..engine import Engine, Status
from ..engine.metrics import Histogram
from ..engine.outbox import Outbox
from .sse import StreamHub

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _histogram(out: list[str], name: str, help_text: str, hist: Histogram) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} histogram")
    for bound, count in hist.cumulative():
        out.append(f'{name}_bucket{{le="{bound}"}} {count}')
    out.append(f"{name}_sum {hist.total:.6f}")
    out.append(f"{name}_count {hist.count}")


def _single(out: list[str], name: str, kind: str, help_text: str, value: float) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")
    out.append(f"{name} {value:g}")


def render(
    engine: Engine,
    hub: StreamHub,
    outbox: Outbox | None = None,
    rejected: Mapping[str, int] | None = None,
) -> str:
    """The exposition text. Deliberately without tenant labels: a tenant allowed to read
    /metrics must not learn other tenants' names or volumes from it."""
    m = engine.metrics
    stats = engine.stats()
    out: list[str] = []
    _single(out, "agentjobs_queue_depth", "gauge", "Runs waiting to start.", stats["queued"])
    _single(out, "agentjobs_running", "gauge", "Runs executing now.", stats["running"])
    out.append("# HELP agentjobs_runs Runs held, by status.")
    out.append("# TYPE agentjobs_runs gauge")
    for status in Status:
        out.append(f'agentjobs_runs{{status="{status.value}"}} {stats["by_status"][status.value]}')
    _single(
        out,
        "agentjobs_runs_submitted_total",
        "counter",
        "Runs accepted since start (idempotent replays not counted).",
        m.submitted_total,
    )
    out.append("# HELP agentjobs_runs_finished_total Runs finished since start, by status.")
    out.append("# TYPE agentjobs_runs_finished_total counter")
    for status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED):
        out.append(
            f'agentjobs_runs_finished_total{{status="{status.value}"}} '
            f"{m.finished_total.get(status.value, 0)}"
        )
    _single(
        out,
        "agentjobs_retries_total",
        "counter",
        "Retryable failures sent back to the queue.",
        m.retries_total,
    )
    _single(
        out,
        "agentjobs_cancel_requests_total",
        "counter",
        "Cancels of running runs recorded.",
        m.cancel_requests_total,
    )
    _histogram(
        out,
        "agentjobs_queue_wait_seconds",
        "Seconds from submit to first start.",
        m.queue_wait_seconds,
    )
    _histogram(
        out,
        "agentjobs_run_duration_seconds",
        "Seconds from start to finish of finished runs.",
        m.run_seconds,
    )
    _single(
        out, "agentjobs_sse_streams", "gauge", "Open server-sent event streams.", hub.open_streams
    )
    _single(
        out,
        "agentjobs_journal_last_seq",
        "counter",
        "Sequence number of the newest journal event.",
        stats["last_seq"],
    )
    if outbox is not None:
        s = outbox.stats
        _single(
            out,
            "agentjobs_webhooks_pending",
            "gauge",
            "Webhook deliveries scheduled or in flight.",
            outbox.pending_count(),
        )
        for name, value, help_text in (
            ("attempts", s.attempts_total, "Webhook delivery attempts since start."),
            ("delivered", s.delivered_total, "Webhooks delivered (a 2xx answer) since start."),
            ("failed_attempts", s.failed_attempts_total, "Failed webhook attempts since start."),
            ("gave_up", s.gave_up_total, "Webhook deliveries given up since start."),
        ):
            _single(out, f"agentjobs_webhook_{name}_total", "counter", help_text, value)
    if rejected is not None:
        out.append(
            "# HELP agentjobs_http_rejected_total Requests refused by auth or a per-tenant limit."
        )
        out.append("# TYPE agentjobs_http_rejected_total counter")
        for reason, count in rejected.items():
            out.append(f'agentjobs_http_rejected_total{{reason="{reason}"}} {count}')
    return "\n".join(out) + "\n"
