"""Every line the agent prints is one JSON object: structlog's own and the standard
library's (asyncio, aiohttp), with tracebacks as text."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog

from agent import logs


@pytest.fixture
def printed(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """What logs.configure()'s loggers print, for this test only: the root logger and
    structlog are put back as they were."""
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        logs.configure(json_lines=True)
        yield out
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.reset_defaults()


def test_library_and_agent_lines_are_json_with_the_exception_text(printed: io.StringIO) -> None:
    try:
        raise ValueError("the cause")
    except ValueError:
        structlog.get_logger("agent.test").exception("reconcile failed", error="x")
        logging.getLogger("aiohttp.server").exception("Error handling request")
    logging.getLogger("asyncio").info("below the level: not shown")
    lines = [json.loads(line) for line in printed.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["reconcile failed", "Error handling request"]
    assert all("ValueError: the cause" in line["exception"] for line in lines)
    assert lines[1]["logger"] == "aiohttp.server" and lines[1]["level"] == "error"
