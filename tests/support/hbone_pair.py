"""An HBONE client and server over loopback TCP, without TLS: for tests of the HBONE shell
and of what runs on its streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from agent.hbone import protocol as p
from agent.hbone.connection import HboneConnection, TunnelHandler


@asynccontextmanager
async def hbone_pair(handler: TunnelHandler) -> AsyncIterator[HboneConnection]:
    """A ready client connected to a server that hands each CONNECT to `handler`; both closed
    at the end."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HboneConnection(p.HboneServer(), on_tunnel=handler), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    _, client = await loop.create_connection(lambda: HboneConnection(p.HboneClient()),
                                             "127.0.0.1", port)  # fmt: skip
    assert isinstance(client, HboneConnection)
    try:
        await client.ready()
        yield client
    finally:
        client.close()
        server.close()
        await server.wait_closed()
