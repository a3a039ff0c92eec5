"""The global budget for HBONE bytes received and not yet relayed: past it, the connection
that took the total over stops reading, and every paused one reads again once it falls."""

from __future__ import annotations

from typing import Any, cast

from agent.hbone.connection import HboneConnection, MemoryBudget


class Conn:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def as_conn(conn: Conn) -> HboneConnection:
    return cast(HboneConnection, cast(Any, conn))


def test_over_the_budget_a_connection_pauses_until_relays_catch_up() -> None:
    budget = MemoryBudget(limit=100)
    a, b = Conn(), Conn()
    budget.take(60, as_conn(a))
    budget.take(30, as_conn(b))
    assert a.reading and b.reading
    budget.take(20, as_conn(b))  # 110 > 100: b took it over
    assert a.reading and not b.reading
    budget.give(5)
    assert not b.reading  # 105: still over
    budget.give(10)
    assert b.reading and budget.used == 95


def test_a_closed_connection_is_never_resumed() -> None:
    budget = MemoryBudget(limit=10)
    a = Conn()
    budget.take(20, as_conn(a))
    budget.forget(as_conn(a))
    a.reading = False
    budget.give(20)
    assert not a.reading and budget.used == 0
