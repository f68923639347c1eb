"""`POST /api/v1/runs/batch`: many submits in one request and one group commit.

The design is in docs/benchmarks.md ("Design: `POST /api/v1/runs/batch`"); the contract
is in docs/api.md. In short: each item is exactly a `POST /api/v1/runs` body, validated
by the same code (`schemas.validate_submit`, `Engine.make_spec`) and screened the same way
(webhook URLs through the outbox's SSRF check); items are independent (a bad item is a 422
*in the answer* and does not stop the others); everything that concerns the batch as a
whole (its shape, the tenant's rate and quota, the queue's capacity, the storage) refuses
the whole request with nothing written. The new runs are recorded by
`Engine.submit_many`: one journal batch, one write and one fsync for all of them.

Per-tenant limits count a batch of N items as N submits: N tokens of the submit-rate
bucket (all or none, its `Retry-After` the wait until all N are there), and N places of
the active-runs quota (only the items that would create a run, as `Engine.new_runs`
counts them: replays and invalid items take none), reserved all or none before anything
is written. A batch that could never pass one of them (more items than the bucket's
burst, more new runs than the quota) is a 422 that says so rather than a 429 that would
be retried for ever.

The parts it shares with `POST /api/v1/runs` are _handlers.py's: the refusals before the
body (`admit_submit`), the webhook screen (`screen_webhooks`) and the spec
(`spec_from_submit`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

from ..engine import EngineError, RunSpec
from ._handlers import Answer, admit_submit, screen_webhooks, spec_from_submit
from .errors import FieldError, Problem, from_engine_error, validation
from .schemas import IDEMPOTENCY_HEADER, Submit, parse_batch, validate_submit
from .views import batch_item_view

if TYPE_CHECKING:
    from .app import AppState

__all__ = ["BATCH_PATH", "handle_batch", "header_refused", "submit_batch", "too_large"]

BATCH_PATH = "/api/v1/runs/batch"


def header_refused() -> Problem:
    """The `Idempotency-Key` header on a batch: which item would it belong to?"""
    return validation(
        [
            FieldError(
                IDEMPOTENCY_HEADER,
                "is not accepted on POST /api/v1/runs/batch (it would be ambiguous): give "
                "each item its own idempotency_key field",
            )
        ]
    )


def too_large(limit: int) -> Problem:
    return Problem(
        "payload-too-large",
        f"the batch body is over the limit of {limit} bytes (--max-batch-bytes); split it",
    )


def _item_problem(index: int, problem: Problem) -> dict[str, Any]:
    return {"index": index, "status": problem.status, "problem": problem.body()}


async def handle_batch(
    state: AppState,
    tenant: str | None,
    *,
    content_type: str | None,
    idempotency_key: str | None,
    read_body: Callable[[], Awaitable[bytes]],
) -> Answer:
    """`POST /api/v1/runs/batch`, called as `handle_submit` is: the same refusals before
    the body is read (`admit_submit`: one rate token, the media type), then the
    `Idempotency-Key` header refused, then the body (`read_body` raises the 413)."""
    admit_submit(state, tenant, content_type)
    if idempotency_key is not None:
        raise header_refused()
    return Answer.json(await submit_batch(state, tenant, await read_body()))


def _never_fits(detail: str) -> Problem:
    """A batch that no wait could let through a per-tenant limit: a 422 naming `runs`,
    not a 429 that a client would retry for ever."""
    return validation([FieldError("runs", f"{detail}; split it")])


async def submit_batch(state: AppState, tenant: str | None, raw: bytes) -> dict[str, Any]:
    """Validate, screen and submit a batch body (already size-checked, its first rate
    token taken); the answer's JSON. Raises `Problem`, `LimitExceeded` or `EngineError`
    for the batch as a whole (then nothing was written)."""
    engine = state.engine
    items = parse_batch(raw, state.settings.max_batch)
    n = len(items)
    rate = state.submit_rate
    if rate is not None and n > 1:
        if n > rate.burst:
            raise _never_fits(
                f"has {n} items, more than this tenant may submit at once "
                f"(--tenant-burst {rate.burst})"
            )
        rate.take(tenant, n, taken=1)  # the first token was taken before the body was read

    results: list[dict[str, Any] | None] = [None] * n
    valid: list[tuple[int, Submit]] = []
    for i, item in enumerate(items):
        try:
            valid.append((i, validate_submit(item, None)))
        except Problem as exc:
            results[i] = _item_problem(i, exc)

    refused = await screen_webhooks(
        state, {s.body.webhook_url for _, s in valid if s.body.webhook_url is not None}
    )
    specs: list[RunSpec] = []
    where: list[int] = []
    for i, parsed in valid:
        try:
            specs.append(spec_from_submit(state, tenant, parsed, refused))
        except Problem as exc:  # its webhook URL was refused
            results[i] = _item_problem(i, exc)
            continue
        except EngineError as exc:  # InvalidRequest, UnknownRunner
            results[i] = _item_problem(i, from_engine_error(exc))
            continue
        where.append(i)

    if specs:
        active = state.active_runs
        await engine.settle(specs)  # same-key submits in flight: theirs are replays
        fresh = engine.new_runs(specs)
        max_queue = engine.config.max_queue
        if fresh > max_queue:
            raise _never_fits(
                f"would create {fresh} runs, more than the server queues at all "
                f"(--max-queue {max_queue})"
            )
        if active is not None and fresh > active.limit:
            raise _never_fits(
                f"would create {fresh} runs, more than this tenant may have queued or "
                f"running (--tenant-max-queued {active.limit})"
            )
        with active.reserve(tenant, fresh) if active is not None and fresh else nullcontext():
            outcomes = await engine.submit_many(specs)
        urls = state.urls
        for i, outcome in zip(where, outcomes, strict=True):
            if outcome.error is not None:
                results[i] = _item_problem(i, from_engine_error(outcome.error))
            else:
                assert outcome.run is not None
                results[i] = batch_item_view(i, outcome.run, outcome.replayed, urls)

    accepted = sum(1 for r in results if r is not None and r["status"] == 202)
    return {"accepted": accepted, "rejected": n - accepted, "results": results}
