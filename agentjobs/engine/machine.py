"""The run state machine: every status, every legal move, as one table.

Theory of operation
-------------------

A run's life is a sequence of journal events. Each event type is legal only from certain
statuses and leads to exactly one status; this module owns that relation and nothing else.
It has no IO and no clock, so `state.apply` (live and on replay) and the property tests share
one source of truth.

    (none) --submitted--> QUEUED --started--> RUNNING --succeeded--> SUCCEEDED
                            |  ^                 |  |--failed-----> FAILED
                            |  |                 |  '--cancelled--> CANCELLED
                            |  '--retrying-------|   (a retryable error, attempts left)
                            |  '--requeued-------'   (recovery: running when the process stopped)
                            |--cancelled--> CANCELLED  (cancel of a queued run is immediate)
                            '--failed-----> FAILED     (expired in the queue, or unrunnable)

Some events record facts without moving the run: `progress`, `output` and
`cancel_requested` only while RUNNING; webhook bookkeeping only once finished. A terminal
status never changes again; `deleted` removes a finished run altogether (its status becomes
None, as before `submitted`).

Anything not in the table is a bug in whoever produced the event, and `transition` raises
`IllegalTransition` rather than quietly overwriting state.
"""

from __future__ import annotations

from typing import Final

from .model import EventType, Status

__all__ = ["TRANSITIONS", "IllegalTransition", "is_legal", "transition"]

Q, R = Status.QUEUED, Status.RUNNING
S, F, C = Status.SUCCEEDED, Status.FAILED, Status.CANCELLED
E = EventType

# (status before, event) -> status after. `None` stands for "no such run".
TRANSITIONS: Final[dict[tuple[Status | None, EventType], Status | None]] = {
    (None, E.SUBMITTED): Q,
    # queued
    (Q, E.STARTED): R,
    (Q, E.CANCELLED): C,
    (Q, E.FAILED): F,
    # running
    (R, E.PROGRESS): R,
    (R, E.OUTPUT): R,
    (R, E.CANCEL_REQUESTED): R,
    (R, E.SUCCEEDED): S,
    (R, E.FAILED): F,
    (R, E.CANCELLED): C,
    (R, E.RETRYING): Q,
    (R, E.REQUEUED): Q,
    # finished: only bookkeeping, or removal
    **{(t, E.WEBHOOK_ATTEMPT): t for t in (S, F, C)},
    **{(t, E.WEBHOOK_REDELIVER): t for t in (S, F, C)},
    **{(t, E.DELETED): None for t in (S, F, C)},
}


class IllegalTransition(RuntimeError):
    """An event arrived that the run's current status does not allow: a bug upstream."""

    def __init__(self, run_id: str, status: Status | None, event: EventType) -> None:
        where = status.value if status is not None else "no run"
        super().__init__(f"illegal transition for {run_id}: {event.value!r} from {where!r}")
        self.run_id = run_id
        self.status = status
        self.event = event


def is_legal(status: Status | None, event: EventType) -> bool:
    return (status, event) in TRANSITIONS


def transition(run_id: str, status: Status | None, event: EventType) -> Status | None:
    """The status after `event`, or `IllegalTransition`."""
    try:
        return TRANSITIONS[status, event]
    except KeyError:
        raise IllegalTransition(run_id, status, event) from None
