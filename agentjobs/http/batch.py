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
bucket (all or none; a batch larger than the bucket's burst could never pass, so it is a
422 that says so rather than a 429 that would be retried for ever), and N places of the
active-runs quota (only the items that would create a run: replays and invalid items take
none), reserved all or none before anything is written.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import trio

from ..engine import EngineError, RunSpec
from ..engine.ssrf import UnsafeWebhookURL
from .errors import FieldError, Problem, from_engine_error, validation
from .schemas import IDEMPOTENCY_HEADER, Submit, parse_batch, validate_submit
from .views import batch_item_view

if TYPE_CHECKING:
    from .app import AppState

__all__ = ["BATCH_PATH", "header_refused", "submit_batch", "too_large"]

BATCH_PATH = "/api/v1/runs/batch"
# Distinct webhook URLs of one batch screened at once (each may resolve a host name).
_SCREEN_AT_ONCE = 16


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


async def _screen(state: AppState, urls: set[str]) -> dict[str, str]:
    """Each distinct webhook URL through the outbox's SSRF check, a few at once: the
    refused ones, with the reason."""
    outbox = state.outbox
    refused: dict[str, str] = {}
    if outbox is None or not urls:
        return refused
    limiter = trio.CapacityLimiter(_SCREEN_AT_ONCE)

    async def check(url: str) -> None:
        async with limiter:
            try:
                await outbox.check(url)
            except UnsafeWebhookURL as exc:
                refused[url] = exc.reason

    async with trio.open_nursery() as nursery:
        for url in urls:
            nursery.start_soon(check, url)
    return refused


def _new_runs(state: AppState, specs: list[RunSpec]) -> int:
    """How many of `specs` would create a run (not a replay of an earlier one, nor of an
    earlier item): the places the tenant's quota must hold."""
    engine = state.engine
    now = engine.wall()
    window = engine.config.idempotency_window_s
    seen: set[tuple[str | None, str]] = set()
    count = 0
    for spec in specs:
        key = spec.idempotency_key
        if key is None:
            count += 1
            continue
        if (spec.tenant, key) in seen:
            continue
        seen.add((spec.tenant, key))
        if engine.state.find_idempotent(spec.tenant, key, now=now, window=window) is None:
            count += 1
    return count


async def submit_batch(state: AppState, tenant: str | None, raw: bytes) -> dict[str, Any]:
    """Validate, screen and submit a batch body (already size-checked, its first rate
    token taken); the answer's JSON. Raises `Problem`, `LimitExceeded` or `EngineError`
    for the batch as a whole (then nothing was written)."""
    engine = state.engine
    settings = state.settings
    items = parse_batch(raw, settings.max_batch)
    n = len(items)
    rate = state.submit_rate
    if rate is not None and n > 1:
        if n > rate.burst:
            raise validation(
                [
                    FieldError(
                        "runs",
                        f"has {n} items, more than this tenant may submit at once "
                        f"(--tenant-burst {rate.burst}); split it",
                    )
                ]
            )
        rate.take(tenant, n - 1)  # the first token was taken before the body was read

    results: list[dict[str, Any] | None] = [None] * n
    valid: list[tuple[int, Submit]] = []
    for i, item in enumerate(items):
        try:
            valid.append((i, validate_submit(item, None)))
        except Problem as exc:
            results[i] = _item_problem(i, exc)

    refused = await _screen(
        state, {s.body.webhook_url for _, s in valid if s.body.webhook_url is not None}
    )
    specs: list[RunSpec] = []
    where: list[int] = []
    make_spec = engine.make_spec
    for i, parsed in valid:
        body = parsed.body
        if body.webhook_url is not None and body.webhook_url in refused:
            unsafe = validation([FieldError("webhook_url", refused[body.webhook_url])])
            results[i] = _item_problem(i, unsafe)
            continue
        try:
            spec = make_spec(
                body.prompt,
                config=body.config,
                session_id=body.session_id,
                priority=body.priority or 0,
                timeout=body.timeout,
                max_attempts=body.max_attempts,
                runner=body.runner,
                webhook_url=body.webhook_url,
                idempotency_key=parsed.idempotency_key,
                request_hash=parsed.request_hash,
                tenant=tenant,
                ttl=body.ttl,
            )
        except EngineError as exc:  # InvalidRequest, UnknownRunner
            results[i] = _item_problem(i, from_engine_error(exc))
            continue
        specs.append(spec)
        where.append(i)

    if specs:
        active = state.active_runs
        fresh = _new_runs(state, specs) if active is not None else 0
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
