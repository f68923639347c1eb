"""What a finished run keeps in memory (issue 9): one shared read-only empty `config`, one
shared final `Progress` for runs without steps, status sets and the supervisor's queue
that give their table back after a burst drains, and recurring strings shared across runs.

Each test checks the sharing (identity) or the size (`sys.getsizeof`) directly, and where
it matters that behaviour is unchanged (a runner may still mutate its own config, replay
still equals the live fold)."""

from __future__ import annotations

import copy
import pickle
import sys
from typing import Any

import orjson
import pytest
import trio

from agentjobs import RunContext, Status, open_engine
from agentjobs.engine import state as state_module
from agentjobs.engine.model import (
    DONE_PROGRESS,
    EMPTY_CONFIG,
    NO_PROGRESS,
    Event,
    EventType,
    Progress,
    RunSpec,
)
from agentjobs.engine.state import State, apply, replay, shrink_dict, spec_from_data, spec_to_data

E = EventType
SMALL = 16 * 1024  # bytes: what a dict holding a handful of run ids may take


# -- the shared empty config ---------------------------------------------------------------


def test_specs_without_config_share_one_empty_config() -> None:
    assert RunSpec(prompt="p").config is EMPTY_CONFIG
    assert RunSpec(prompt="p", config={}).config is EMPTY_CONFIG
    assert spec_from_data({"prompt": "p"}).config is EMPTY_CONFIG
    assert spec_from_data(orjson.loads(b'{"prompt":"p","config":{}}')).config is EMPTY_CONFIG
    # a non-empty config is kept as given, as before
    own = {"a": 1}
    assert RunSpec(prompt="p", config=own).config is own


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.__setitem__("k", 1),
        lambda d: d.__delitem__("k"),
        lambda d: d.update({"k": 1}),
        lambda d: d.update(k=1),
        lambda d: d.setdefault("k", 1),
        lambda d: d.pop("k", None),
        lambda d: d.popitem(),
        lambda d: d.clear(),
        lambda d: d.__ior__({"k": 1}),
    ],
)
def test_the_shared_empty_config_cannot_be_changed(mutate: Any) -> None:
    with pytest.raises(TypeError, match="read-only"):
        mutate(RunSpec(prompt="p").config)
    assert EMPTY_CONFIG == {} and len(EMPTY_CONFIG) == 0


def test_the_shared_empty_config_still_behaves_as_an_empty_dict() -> None:
    config = RunSpec(prompt="p").config
    assert isinstance(config, dict)
    assert config == {} and not config and repr(config) == "{}"
    assert orjson.dumps(config) == b"{}"
    assert orjson.dumps({"config": config}) == b'{"config":{}}'
    mine = dict(config)  # a private copy is an ordinary dict
    mine["k"] = 1
    assert mine == {"k": 1} and EMPTY_CONFIG == {}
    assert config | {"k": 1} == {"k": 1}
    # copies of a spec keep sharing it rather than growing a private one
    assert copy.deepcopy(RunSpec(prompt="p")).config is EMPTY_CONFIG
    assert pickle.loads(pickle.dumps(RunSpec(prompt="p"))).config is EMPTY_CONFIG
    # and it is still left out of the `submitted` event, as a default
    assert spec_to_data(RunSpec(prompt="p", config={})) == {"prompt": "p"}


class MutatingRunner:
    """Writes into the config it is given, as a runner is allowed to."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def run(self, ctx: RunContext) -> Any:
        self.seen.append(dict(ctx.config))
        ctx.config["touched"] = True
        return "ok"


async def test_a_runner_gets_a_private_config_it_may_change() -> None:
    runner = MutatingRunner()
    async with open_engine(None, durability="memory", runners={"m": runner}) as engine:
        first = await engine.submit("one")
        assert (await engine.wait(first.id, 10)).status is Status.SUCCEEDED
        second = await engine.submit("two")
        assert (await engine.wait(second.id, 10)).status is Status.SUCCEEDED
        assert engine.state.runs[second.id].spec.config is EMPTY_CONFIG
    assert runner.seen == [{}, {}]  # the first run's write did not reach the second
    assert EMPTY_CONFIG == {}


# -- the shared final progress -------------------------------------------------------------


def _lifecycle(*middle: tuple[EventType, dict[str, Any]]) -> State:
    events = [
        Event(1, 100.0, "run_a", E.SUBMITTED, {"prompt": "p"}),
        Event(2, 101.0, "run_a", E.STARTED, {"attempt": 1}),
    ]
    for etype, data in middle:
        events.append(Event(len(events) + 1, 101.5, "run_a", etype, data))
    events.append(Event(len(events) + 1, 102.0, "run_a", E.SUCCEEDED, {"result": "r"}))
    return replay(events)


def test_a_run_finished_without_steps_shares_the_final_progress() -> None:
    assert _lifecycle().runs["run_a"].progress is DONE_PROGRESS
    # a bare percentage is not a step: it ends at the same shared value
    half = _lifecycle((E.PROGRESS, {"percentage": 50.0}))
    assert half.runs["run_a"].progress is DONE_PROGRESS
    # the value is what a fresh object would have been
    assert Progress(100.0, None, 0, None) == DONE_PROGRESS
    assert Progress() == NO_PROGRESS


def test_a_run_with_steps_keeps_its_own_final_progress() -> None:
    state = _lifecycle(
        (E.PROGRESS, {"percentage": 40.0, "step": "fetch", "steps_completed": 1, "steps_total": 3})
    )
    progress = state.runs["run_a"].progress
    assert progress is not DONE_PROGRESS
    assert progress == Progress(100.0, "fetch", 1, 3)


async def test_a_live_run_shares_the_final_progress_and_config() -> None:
    async with open_engine(None, durability="memory") as engine:
        run = await engine.submit("hello")
        await engine.wait(run.id, 10)
        kept = engine.state.runs[run.id]
        assert kept.status is Status.SUCCEEDED
        assert kept.progress is DONE_PROGRESS
        assert kept.spec.config is EMPTY_CONFIG


# -- dicts that emptied out give their table back ------------------------------------------


def test_shrink_dict_gives_back_the_table_in_place_and_in_order() -> None:
    d = {f"run_{i:05d}": None for i in range(50_000)}
    keep = [f"run_{i:05d}" for i in range(0, 50_000, 5_000)]
    for key in list(d):
        if key not in keep:
            del d[key]
    before = sys.getsizeof(d)
    alias = d
    assert shrink_dict(d) is True
    assert d is alias and list(d) == keep
    assert sys.getsizeof(d) < before / 50
    assert shrink_dict(d) is False  # nothing left to give back
    small = {"a": None, "b": None}
    del small["a"]
    assert shrink_dict(small) is False and small == {"b": None}


def _burst(n: int, *, started: int, finished: int) -> State:
    """n runs submitted at once, then `started` of them started, `finished` of those done."""
    state = State()
    seq = 0

    def add(run: str, etype: EventType, data: dict[str, Any]) -> None:
        nonlocal seq
        seq += 1
        apply(state, Event(seq, float(seq), run, etype, data))

    ids = [f"run_{i:06d}" for i in range(n)]
    for rid in ids:
        add(rid, E.SUBMITTED, {"prompt": "p"})
    for rid in ids[:started]:
        add(rid, E.STARTED, {"attempt": 1})
    for rid in ids[:finished]:
        add(rid, E.SUCCEEDED, {"result": "r"})
    return state


def test_status_sets_give_back_a_drained_burst() -> None:
    state = _burst(20_000, started=20_000, finished=20_000)
    assert sys.getsizeof(state.by_status[Status.QUEUED]) < SMALL
    assert sys.getsizeof(state.by_status[Status.RUNNING]) < SMALL
    assert len(state.by_status[Status.SUCCEEDED]) == 20_000
    # a burst that drained to a few (not to none) is shrunk by the periodic look
    state = _burst(20_000, started=19_990, finished=19_990)
    assert len(state.by_status[Status.QUEUED]) == 10
    assert sys.getsizeof(state.by_status[Status.QUEUED]) < SMALL
    # while the burst is still there, nothing is taken from it
    state = _burst(20_000, started=0, finished=0)
    assert sys.getsizeof(state.by_status[Status.QUEUED]) > 20_000 * 16


def test_vacuum_gives_back_what_deleted_runs_held() -> None:
    state = _burst(20_000, started=20_000, finished=20_000)
    seq = state.last_seq
    ids = list(state.runs)
    for rid in ids[:-5]:
        seq += 1
        apply(state, Event(seq, float(seq), rid, E.DELETED, {}))
    big = sys.getsizeof(state.runs)
    state.vacuum()
    assert list(state.runs) == ids[-5:]
    assert sys.getsizeof(state.runs) < min(big / 20, SMALL)
    assert sys.getsizeof(state.by_status[Status.SUCCEEDED]) < SMALL
    assert [r.id for r in state.order] == ids[-5:]


class GateRunner:
    """Holds the first run until the gate opens, so every later run waits in the queue."""

    def __init__(self) -> None:
        self.gate = trio.Event()

    async def run(self, ctx: RunContext) -> Any:
        await self.gate.wait()
        return "ok"


async def test_the_supervisor_queue_gives_back_a_drained_burst() -> None:
    n = 6_000
    runner = GateRunner()
    async with open_engine(
        None, durability="memory", runners={"g": runner}, max_concurrency=1, max_queue=n + 10
    ) as engine:
        ids: list[str] = []

        async def submitter(k: int) -> None:
            for _ in range(k):
                ids.append((await engine.submit("p")).id)

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(submitter, n // 30)
        sup = engine.supervisor
        assert sup.queued_count == n - 1  # the burst is queued behind the held run
        assert sys.getsizeof(sup._queued) > 20 * n  # what would stay without the shrink
        runner.gate.set()
        for rid in ids:
            await engine.wait(rid, 60)
        assert sup.queued_count == 0
        assert sys.getsizeof(sup._queued) < SMALL
        assert sys.getsizeof(engine.state.by_status[Status.QUEUED]) < SMALL
        assert engine.state.count(Status.SUCCEEDED) == n


# -- recurring strings ---------------------------------------------------------------------


def test_recurring_strings_are_shared_between_runs() -> None:
    body = b'{"prompt":"p","tenant":"acme","runner":"openai","session_id":"s-1"}'
    first, second = orjson.loads(body), orjson.loads(body)
    assert first["tenant"] is not second["tenant"]  # two decoded copies
    original = second["tenant"]
    a, b = spec_from_data(first), spec_from_data(second)
    assert a == b
    assert a.tenant is b.tenant and a.runner is b.runner and a.session_id is b.session_id
    assert second["tenant"] is original  # the event's own data is left as it was

    state = State()
    for i, run in enumerate(("run_a", "run_b")):
        seq = 3 * i
        apply(state, Event(seq + 1, 1.0, run, E.SUBMITTED, {"prompt": "p"}))
        apply(state, Event(seq + 2, 2.0, run, E.STARTED, {"attempt": 1}))
        failed = orjson.loads(b'{"error":"boom","kind":"timeout"}')
        apply(state, Event(seq + 3, 3.0, run, E.FAILED, failed))
    kinds = [state.runs[r].error_kind for r in ("run_a", "run_b")]
    assert kinds == ["timeout", "timeout"] and kinds[0] is kinds[1]


def test_the_string_cache_is_bounded() -> None:
    for i in range(state_module._SHARED_MAX + 10):
        spec = spec_from_data({"prompt": "p", "session_id": f"session-{i}"})
        assert spec.session_id == f"session-{i}"
        assert len(state_module._SHARED) <= state_module._SHARED_MAX
