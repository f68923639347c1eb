"""`echo`: returns the prompt. For demos, tests and benchmarks.

Config: `delay_s` (sleep that long in total), `steps` (split the delay into that many progress
steps, default 1), `fail` (true: fail the run; a string: fail with that message),
`retryable` (with `fail`: ask for a retry), `output` (true: stream the prompt word by word).
"""

from __future__ import annotations

from typing import Any

import trio

from ._base import RunContext, RunError

__all__ = ["EchoRunner"]


class EchoRunner:
    async def run(self, ctx: RunContext) -> Any:
        cfg = ctx.config
        delay = float(cfg.get("delay_s", 0) or 0)
        steps = max(1, int(cfg.get("steps", 1) or 1))
        if delay > 0:
            for i in range(steps):
                ctx.progress(
                    100.0 * i / steps,
                    f"step {i + 1} of {steps}",
                    steps_completed=i,
                    steps_total=steps,
                )
                await trio.sleep(delay / steps)
        if cfg.get("output"):
            for word in ctx.prompt.split():
                ctx.output(word + " ")
        fail = cfg.get("fail")
        if fail:
            message = fail if isinstance(fail, str) else "echo failure requested by config"
            raise RunError(message, retryable=bool(cfg.get("retryable")))
        return ctx.prompt
