"""`agentjobs serve` plus a task that compacts the journal live, every N seconds.

    python tests/faults/compacting_server.py SECONDS [agentjobs serve options...]

SECONDS 0: no compaction.

Why this exists: the server compacts every `EngineConfig.compact_interval_s` (one hour
by default, and no flag or variable sets it), so a 10-minute soak would never see a
compaction. The soak of issue 7 is about memory staying flat *with compaction on*; this
script calls `Engine.compact()` (retention and idempotency window from `--retention` and
`--idempotency-window`) every N seconds around the unchanged server. It uses only public
functions of agentjobs and changes none of them.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from agentjobs.engine.compaction import compact_state
from agentjobs.http.server import RunningServer, serve
from agentjobs.http.settings import add_arguments, resolve

log = logging.getLogger("agentjobs.faults.compactor")


async def main(every: float, argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = resolve(parser.parse_args(argv))
    stop = trio.Event()

    def say(line: str) -> None:
        print(line, flush=True)

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            running: RunningServer = await nursery.start(
                lambda task_status: serve(
                    settings, stop=stop, print_line=say, task_status=task_status
                )
            )

            async def on_signal() -> None:
                async for _ in signals:
                    stop.set()
                    nursery.cancel_scope.deadline = trio.current_time() + 30
                    return

            async def compactor() -> None:
                engine = running.engine
                while every > 0 and not stop.is_set():
                    with trio.move_on_after(every):
                        await stop.wait()
                    if stop.is_set():
                        return
                    compact = getattr(engine, "compact", None)
                    if compact is not None:
                        report = await compact()
                    else:  # an engine from before Engine.compact existed
                        report = await compact_state(
                            engine.journal,
                            engine.state,
                            time.time(),
                            retention_s=settings.retention,
                            idempotency_window_s=settings.idempotency_window,
                        )
                    log.info("compactor: %s", report.summary())

            nursery.start_soon(on_signal)
            nursery.start_soon(compactor)


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    trio.run(main, float(sys.argv[1]), sys.argv[2:])
