"""agent/policy/engine.py without a kernel: when the engine writes a generation, when it
retires the old one, and that it never sleeps for it (a fake stands in for the maps)."""

from __future__ import annotations

import asyncio
from typing import cast

import pytest

from agent.policy import engine
from agent.policy.compiler import CompiledPolicies
from agent.policy.engine import PolicyEngine
from agent.policy.kernel_maps import PolicyMaps
from agent.state.store import MeshState
from agent.state.workload import Protocol, Workload

CART = Workload("uid-cart", "cart", "shop", "cart-sa", ("10.1.0.4",), Protocol.HBONE, "node-1")
WEB = Workload("uid-web", "web", "shop", "web-sa", ("10.1.0.5",), Protocol.HBONE, "node-1")


class FakeMaps:
    """PolicyMaps' write side: generations flip between 0 and 1."""

    def __init__(self) -> None:
        self.generation = 0
        self.journal: list[str] = []

    def write(self, compiled: CompiledPolicies) -> int:
        retired, self.generation = self.generation, 1 - self.generation
        self.journal.append(f"write {self.generation} ({len(compiled.workloads)} workloads)")
        return retired

    def clear_generation(self, gen: int) -> int:
        self.journal.append(f"clear {gen}")
        return 0


@pytest.fixture
def maps(monkeypatch: pytest.MonkeyPatch) -> FakeMaps:
    monkeypatch.setattr(engine, "RETIRE_GRACE", 0.05)
    return FakeMaps()


def test_the_retired_generation_is_cleared_by_a_timer_after_the_grace(maps: FakeMaps) -> None:
    async def scenario() -> list[str]:
        policy = PolicyEngine(cast(PolicyMaps, maps))
        await policy.apply(MeshState((CART,)), [CART])
        returned = list(maps.journal)  # apply returned before the grace was over
        await asyncio.sleep(0.1)
        return returned

    assert asyncio.run(scenario()) == ["write 1 (1 workloads)"]
    assert maps.journal == ["write 1 (1 workloads)", "clear 0"]


def test_the_same_inputs_again_write_nothing(maps: FakeMaps) -> None:
    async def scenario() -> None:
        policy = PolicyEngine(cast(PolicyMaps, maps))
        state = MeshState((CART, WEB))
        await policy.apply(state, [CART])
        await policy.apply(MeshState((CART, WEB)), [CART])  # equal, if not the same object
        await policy.apply(state, [CART, WEB])  # one destination more: a new generation
        policy.close()

    asyncio.run(scenario())
    # The third waited out the grace: the timer retired generation 0 before it was reused.
    assert maps.journal == ["write 1 (1 workloads)", "clear 0", "write 0 (2 workloads)"]


def test_a_change_within_the_grace_reuses_the_generation_only_after_it(maps: FakeMaps) -> None:
    async def scenario() -> None:
        policy = PolicyEngine(cast(PolicyMaps, maps))
        await policy.apply(MeshState((CART,)), [CART])
        await policy.apply(MeshState((CART, WEB)), [CART, WEB])
        await asyncio.sleep(0.1)
        policy.close()

    asyncio.run(scenario())
    # The second write waited out the grace: generation 0 was cleared (the timer fired)
    # before it was written again; then 1 is retired and cleared in turn.
    assert maps.journal == [
        "write 1 (1 workloads)", "clear 0", "write 0 (2 workloads)", "clear 1",
    ]  # fmt: skip


def test_close_cancels_a_pending_retirement(maps: FakeMaps) -> None:
    async def scenario() -> None:
        policy = PolicyEngine(cast(PolicyMaps, maps))
        await policy.apply(MeshState((CART,)), [CART])
        policy.close()  # the datapath closes next: nothing may touch its maps afterwards
        await asyncio.sleep(0.1)

    asyncio.run(scenario())
    assert maps.journal == ["write 1 (1 workloads)"]
