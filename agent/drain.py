"""One drain and shutdown path for everything long-running in the agent.

- `Drain` holds tasks (a pod's connections, the state followers, the Kubernetes watches).
  Closing it is the one way they end: stop taking new work is the caller's part (close the
  listener, set the stop event), then they get a grace deadline, then the rest is cancelled.
- `ShutdownSteps` holds the undo steps of start-up, registered as each step is done, and
  runs them in reverse. Every step runs even when an earlier one failed: a failure is logged
  and counted, and the next step still runs, so no hook, pin or pod change is left behind
  because of another step's error.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog

log = structlog.get_logger("agent.drain")

# How often a drain with a nudge repeats it while it waits (a watch may be only just opening,
# so asking once is not enough).
NUDGE_INTERVAL = 0.05


async def stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stop`; True when it was set (the caller should end)."""
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


class Drain:
    def __init__(self, name: str = "tasks") -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str | None = None) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def close(self, grace: float, nudge: Callable[[], None] | None = None) -> int:
        """Wait up to `grace` seconds (calling `nudge` meanwhile, if given), then cancel.
        Returns how many were cancelled. A task that failed is logged, never re-raised."""
        tasks = set(self._tasks)
        if not tasks:
            return 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        pending = {task for task in tasks if not task.done()}
        while pending and (left := deadline - loop.time()) > 0:
            if nudge is not None:
                nudge()
            timeout = min(left, NUDGE_INTERVAL) if nudge is not None else left
            _, pending = await asyncio.wait(pending, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        for task in tasks:
            if not task.cancelled() and (error := task.exception()) is not None:
                log.error("task failed", drain=self.name, task=task.get_name(),
                          error=f"{type(error).__name__}: {error}")  # fmt: skip
        return len(pending)


Undo = Callable[[], Awaitable[object] | object]


async def run_step(name: str, undo: Undo, **context: object) -> Exception | None:
    """Run one undo step, sync or async. A failure is logged with the step's name and
    returned, never raised, so the caller goes on with the next step."""
    try:
        result = undo()
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        log.error("undo step failed; the remaining steps still run", step=name,
                  error=f"{type(exc).__name__}: {exc}", **context)  # fmt: skip
        return exc
    return None


class ShutdownSteps:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Undo]] = []
        self.failed: list[str] = []

    def defer(self, name: str, undo: Undo) -> None:
        """Register the undo of a step just done; it runs at shutdown, before those
        registered earlier."""
        self._steps.append((name, undo))

    async def run(self) -> None:
        while self._steps:
            name, undo = self._steps.pop()
            if await run_step(name, undo, during="shutdown") is not None:
                self.failed.append(name)
