"""agent/drain.py: the one drain (grace, then force) and the shutdown steps (each runs)."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from agent.drain import Drain, ShutdownSteps, stopped_within


def test_shutdown_steps_run_in_reverse_and_every_one_runs_after_failures() -> None:
    ran: list[str] = []

    def failing(name: str) -> None:
        ran.append(name)
        raise RuntimeError(f"{name} broke")

    async def later(name: str) -> None:
        await asyncio.sleep(0)
        ran.append(name)

    steps = ShutdownSteps()
    steps.defer("pins", lambda: ran.append("pins"))
    steps.defer("cgroup", lambda: failing("cgroup"))
    steps.defer("pods", lambda: later("pods"))
    steps.defer("pool", lambda: failing("pool"))
    with capture_logs() as logs:
        asyncio.run(steps.run())
    assert ran == ["pool", "pods", "cgroup", "pins"]
    assert steps.failed == ["pool", "cgroup"]
    assert [(e["step"], e["error"]) for e in logs if e["log_level"] == "error"] == [
        ("pool", "RuntimeError: pool broke"),
        ("cgroup", "RuntimeError: cgroup broke"),
    ]
    asyncio.run(steps.run())  # each step runs once
    assert len(ran) == 4


def test_drain_lets_work_finish_within_the_grace_then_cancels_the_rest() -> None:
    finished: list[str] = []

    async def work(seconds: float, name: str) -> None:
        await asyncio.sleep(seconds)
        finished.append(name)

    async def scenario() -> int:
        drain = Drain()
        drain.spawn(work(0.01, "quick"))
        stuck = drain.spawn(work(60, "stuck"))
        cancelled = await drain.close(0.2)
        assert stuck.cancelled()
        return cancelled

    assert asyncio.run(scenario()) == 1
    assert finished == ["quick"]


def test_drain_nudges_while_it_waits_and_logs_a_failed_task() -> None:
    async def scenario() -> tuple[int, int]:
        stop = asyncio.Event()
        nudges = 0

        def nudge() -> None:
            nonlocal nudges
            nudges += 1
            if nudges == 3:
                stop.set()

        async def broken() -> None:
            raise ValueError("bad record")

        drain = Drain("watches")
        drain.spawn(stop.wait(), name="watch")
        drain.spawn(broken(), name="broken")
        return await drain.close(5.0, nudge=nudge), nudges

    with capture_logs() as logs:
        cancelled, nudges = asyncio.run(scenario())
    assert (cancelled, nudges) == (0, 3)
    (failed,) = [e for e in logs if e["event"] == "task failed"]
    assert (failed["drain"], failed["task"], failed["error"]) == (
        "watches", "broken", "ValueError: bad record",
    )  # fmt: skip


@pytest.mark.parametrize(("set_it", "expected"), [(True, True), (False, False)])
def test_stopped_within(set_it: bool, expected: bool) -> None:
    async def scenario() -> bool:
        stop = asyncio.Event()
        if set_it:
            stop.set()
        return await stopped_within(stop, 0.01)

    assert asyncio.run(scenario()) is expected
