"""Build a `RunContext` for runner tests and record what the runner reports through it."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from agentjobs.engine.runners import RunContext, SessionTurn

__all__ = ["Recorder"]


@attrs.define(eq=False)
class Recorder:
    """Collects a runner's `output` and `progress` calls (with the time and the thread they
    arrived on) and serves a scripted session history."""

    history: Sequence[SessionTurn] = ()
    outputs: list[str] = attrs.Factory(list)
    output_times: list[float] = attrs.Factory(list)
    output_threads: list[int] = attrs.Factory(list)
    progress: list[dict[str, Any]] = attrs.Factory(list)
    history_calls: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    def _on_output(self, text: str) -> None:
        self.outputs.append(text)
        self.output_times.append(trio.current_time())
        self.output_threads.append(threading.get_ident())
        self._changed.set()
        self._changed = trio.Event()

    async def wait_output(self, predicate: Callable[[str], bool], timeout: float = 5) -> None:
        """Wait until `predicate(all output so far)` holds; fail after `timeout` seconds."""
        with trio.fail_after(timeout):
            while not predicate(self.text):
                await self._changed.wait()

    def _on_progress(self, **kwargs: Any) -> None:
        self.progress.append(kwargs)

    def _on_history(self) -> Sequence[SessionTurn]:
        self.history_calls += 1
        return self.history

    @property
    def text(self) -> str:
        return "".join(self.outputs)

    def ctx(
        self,
        prompt: str = "hello",
        *,
        config: dict[str, Any] | None = None,
        session_id: str | None = None,
        run_id: str = "run_test",
        attempt: int = 1,
        max_attempts: int = 1,
    ) -> RunContext:
        return RunContext(
            run_id=run_id,
            prompt=prompt,
            config=config if config is not None else {},
            session_id=session_id,
            attempt=attempt,
            max_attempts=max_attempts,
            report_progress=self._on_progress,
            report_output=self._on_output,
            session_history=self._on_history,
        )
