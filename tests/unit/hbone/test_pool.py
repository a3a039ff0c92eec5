from __future__ import annotations

import asyncio

from agent.hbone import protocol as p
from agent.hbone.connection import HboneConnection
from agent.hbone.pool import HboneClientPool, PoolKey
from tests.unit.hbone.test_connection import echo

KEY = PoolKey("spiffe://td/ns/a/sa/x", frozenset({"spiffe://td/ns/b/sa/y"}), ("10.0.0.2", 15008),
              "10.0.0.1")  # fmt: skip


async def _serve() -> tuple[asyncio.Server, int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: HboneConnection(p.HboneServer(), on_tunnel=echo), "127.0.0.1", 0
    )
    return server, server.sockets[0].getsockname()[1]


def _dialer(port: int, dials: list[PoolKey]):  # type: ignore[no-untyped-def]
    async def dial(key: PoolKey) -> HboneConnection:
        dials.append(key)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: HboneConnection(p.HboneClient()), "127.0.0.1", port
        )
        await conn.ready()
        return conn

    return dial


def test_200_concurrent_tunnels_share_two_connections() -> None:
    async def main() -> None:
        server, port = await _serve()
        dials: list[PoolKey] = []
        pool = HboneClientPool(_dialer(port, dials))

        opened = asyncio.Event()
        established = 0

        async def one(i: int) -> bytes:
            nonlocal established
            stream, _ = await pool.open_stream(KEY, "10.0.0.2:80", {})
            await stream.established
            established += 1
            if established == 200:
                opened.set()
            await opened.wait()  # all 200 are open at the same time from here
            await stream.write(f"n{i}".encode())
            stream.write_eof()
            got = b""
            while chunk := await stream.read():
                got += chunk
            stream.close()
            return got

        results = await asyncio.gather(*(one(i) for i in range(200)))
        assert results == [f"n{i}".encode() for i in range(200)]
        assert len(dials) == 2  # 100 streams per connection
        await pool.close()
        server.close()

    asyncio.run(main())


def test_different_keys_never_share_and_idle_connections_are_released() -> None:
    async def main() -> None:
        server, port = await _serve()
        dials: list[PoolKey] = []
        pool = HboneClientPool(_dialer(port, dials))
        other = PoolKey("spiffe://td/ns/a/sa/other", KEY.destination_identities, KEY.destination,
                        KEY.source_ip)  # fmt: skip
        for key in (KEY, other, KEY):
            stream, _ = await pool.open_stream(key, "10.0.0.2:80", {})
            await stream.established
            stream.write_eof()
            while await stream.read():
                pass
            stream.close()
        assert dials == [KEY, other]  # the third tunnel reused the first connection
        assert pool.close_idle() == 0  # not idle for 5 minutes yet
        assert pool.close_idle(older_than=0) == 2
        assert not pool.connections(KEY)
        await pool.close()
        server.close()

    asyncio.run(main())
