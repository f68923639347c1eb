"""The engine under load in a child process, for `test_kill9.py` (which SIGKILLs it).

    python tests/engine_child.py DATA_DIR SEED load    # submit and cancel until killed
    python tests/engine_child.py DATA_DIR SEED drain   # take no new work; exit when all done

Protocol on stdout, one line each, flushed at once (a line is only complete if the
process lived to write its newline):

    R <run id> <status> <cancel_requested 0|1> <spec as JSON>   the state found at start
    RECOVERED <counts as JSON>     what recovery did with runs that were running
    READY                          recovery is done
    S <run id> <spec as JSON>      submit returned: the run is acknowledged
    C <run id>                     cancel returned: the cancel is acknowledged
    DONE                           (drain) every run is finished
"""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agentjobs import AlreadyFinished, Engine, NotFound, Status, open_engine
from agentjobs.engine.state import spec_to_data


def say(*parts: Any) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


def dump(engine: Engine) -> None:
    for run in engine.state.runs.values():
        say(
            "R",
            run.id,
            run.status.value,
            int(run.cancel_requested),
            orjson.dumps(spec_to_data(run.spec)).decode(),
        )


async def load(engine: Engine, rng: random.Random) -> None:
    """Submitters and cancellers at once, so group commits are big and kills land
    anywhere: mid-batch, mid-fsync, between a cancel request and its completion."""
    known: list[str] = [r.id for r in engine.state.runs.values() if not r.finished]
    serial = 0

    async def submitter(k: int) -> None:
        nonlocal serial
        while True:
            serial += 1
            config: dict[str, Any] = {"delay_s": rng.choice([0, 0, 0, 0.02, 0.1, 0.3]), "steps": 2}
            if rng.random() < 0.1:
                config["fail"] = True
            run = await engine.submit(
                f"p{k}-{serial}",
                config=config,
                max_attempts=rng.choice([1, 2]),
                priority=rng.randint(0, 2),
                session_id=rng.choice([None] * 8 + ["s1", "s2"]),
            )
            say("S", run.id, orjson.dumps(spec_to_data(run.spec)).decode())
            known.append(run.id)
            await trio.sleep(rng.uniform(0.005, 0.03))  # a few hundred runs a second

    async def canceller() -> None:
        while True:
            await trio.sleep(rng.uniform(0, 0.03))
            if not known:
                continue
            rid = rng.choice(known)
            try:
                await engine.cancel(rid, wait=rng.choice([0, 0.1, 1.0]))
            except (AlreadyFinished, NotFound):
                continue
            say("C", rid)

    async with trio.open_nursery() as nursery:
        for k in range(6):
            nursery.start_soon(submitter, k)
        for _ in range(2):
            nursery.start_soon(canceller)


async def main(data_dir: str, seed: int, mode: str) -> None:
    rng = random.Random(seed)
    async with open_engine(
        data_dir, durability="fsync", max_concurrency=16, session_concurrency=1
    ) as engine:
        dump(engine)
        say("RECOVERED", orjson.dumps(engine.recovered).decode())
        say("READY")
        if mode == "load":
            await load(engine, rng)
        else:
            while any(not r.finished for r in engine.state.runs.values()):  # noqa: ASYNC110
                await trio.sleep(0.05)
            dump(engine)
            say("DONE")
            assert all(
                r.status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
                for r in engine.state.runs.values()
            )


if __name__ == "__main__":
    trio.run(main, sys.argv[1], int(sys.argv[2]), sys.argv[3])
