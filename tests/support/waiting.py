"""Waiting in tests for something that happens on its own time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Return once `condition()` is true; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


def eventually(probe: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    """What `probe()` returns once it is not None; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (found := probe()) is None:
        assert time.monotonic() < deadline, f"not seen in {timeout:.0f}s: {what}"
        time.sleep(0.1)
    return found
