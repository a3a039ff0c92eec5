"""NetnsWorker's socket stock: sockets of the worker's namespace without a thread hop."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from agent.datapath import abi
from agent.inpod import sockets
from agent.netns import SOCKET_STOCK, NetnsWorker

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="setns(2) needs root (CAP_SYS_ADMIN)")


def test_sockets_come_from_the_stock_and_the_stock_refills() -> None:
    async def main() -> None:
        worker = NetnsWorker("/proc/self/ns/net")
        taken: list[socket.socket] = []
        try:
            for _ in range(SOCKET_STOCK * 3):  # past the stock: made on the thread then
                taken.append(await worker.tcp_socket())
            assert all(s.proto == socket.IPPROTO_TCP for s in taken)
            assert len({s.fileno() for s in taken}) == len(taken)
            for _ in range(100):  # the refill runs on the worker thread
                if len(worker._stock) == SOCKET_STOCK:
                    break
                await asyncio.sleep(0.01)
            assert len(worker._stock) == SOCKET_STOCK
            stocked = list(worker._stock)
        finally:
            for sock in taken:
                sock.close()
            worker.close()
        assert all(s.fileno() == -1 for s in stocked)  # close() closes the stock

    asyncio.run(main())


def test_new_upstream_sets_the_agent_mark_and_binds_transparently() -> None:
    async def main() -> None:
        worker = NetnsWorker("/proc/self/ns/net")
        try:
            sock = await sockets.new_upstream(worker, ("127.0.0.1", 0))
            with sock:
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_MARK) == abi.AGENT_MARK
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
                assert sock.getsockopt(socket.SOL_IP, sockets.IP_TRANSPARENT) == 1
                assert sock.getsockname()[0] == "127.0.0.1" and not sock.getblocking()
        finally:
            worker.close()

    asyncio.run(main())
