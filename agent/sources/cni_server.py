"""The agent's end of the `ambient-cni` socket: a thin asyncio shell around cni/protocol.py.

One request per connection, answered by the agent's handler; a malformed or foreign-version
request gets an error answer and changes nothing. The socket is created mode 0600: only root
(the runtime running the plugin) may enroll pods.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from cni.protocol import MAX_MESSAGE, Answer, ProtocolError, Request, decode_request

log = structlog.get_logger("agent.cni")

READ_TIMEOUT = 10.0

CniHandler = Callable[[Request], Awaitable[Answer]]


class CniServer:
    def __init__(self, path: Path, handler: CniHandler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A socket file left by an agent that died: nobody listens on it any more.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_MESSAGE
        )
        os.chmod(self.path, 0o600)
        log.info("CNI socket listening", path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            try:
                request = decode_request(line)
            except ProtocolError as exc:
                log.warning("CNI request refused", error=str(exc))
                answer = Answer(ok=False, error=str(exc))
            else:
                try:
                    answer = await self._handler(request)
                except Exception as exc:  # a bug must not leave the runtime without an answer
                    log.exception("CNI request failed", op=request.op)
                    answer = Answer(ok=False, error=f"agent error: {exc}")
            writer.write(answer.encode())
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError) as exc:
            # ValueError: a line over the limit. The plugin sees the connection close.
            log.warning("CNI connection dropped", error=str(exc) or type(exc).__name__)
        finally:
            writer.close()
