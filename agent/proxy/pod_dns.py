"""One enrolled pod's DNS proxy (ztunnel's, on 15053): agent/dns/ answers, this module holds
what lives in the pod's netns.

UDP queries reach the pod's 15053 socket through pod_ingress (the pod's queries to port 53
are looped back there, whatever the nameserver); TCP queries to port 53 arrive on 15001 like
any captured connection, and the outbound handler hands them here. Answers to UDP queries go
out from a socket bound to the nameserver's address, so the pod's resolver takes them; names
the mesh does not know are forwarded to that nameserver from inside the pod's netns (the
agent's mark keeps the forward uncaptured), so the pod sees what it would have seen.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket

from agent.datapath import abi
from agent.dns.answer import Transport
from agent.dns.names import MeshNames
from agent.dns.server import Address, DnsProxy, UdpService
from agent.inpod import sockets
from agent.proxy.pod import Pod, connect_from
from agent.state.store import MeshState, StateStore

# Nameservers a pod's resolver uses are few (resolv.conf allows three); past this many reply
# sockets the oldest is closed, so a pod querying many addresses cannot pile them up.
MAX_REPLY_SOCKETS = 8


class MeshNamesCache:
    """MeshNames of the current state, built once per snapshot and shared by every pod."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._built: tuple[MeshState, MeshNames] | None = None

    def __call__(self) -> MeshNames:
        state = self._store.current
        if self._built is None or self._built[0] is not state:
            self._built = (state, MeshNames.of(state))
        return self._built[1]


class PodDns:
    """Owns the pod's 15053 socket (created in its netns by start(), closed by close())."""

    def __init__(
        self, pod: Pod, sock: socket.socket, names: MeshNamesCache, counts: collections.Counter[str]
    ) -> None:
        self._pod = pod
        self._sock = sock
        self._proxy = DnsProxy(names, self._forward, counts=counts)
        self._replies: collections.OrderedDict[Address, socket.socket] = collections.OrderedDict()
        self._udp: UdpService = self._proxy.serve_udp(
            sock, lambda: self._pod.workload.namespace, self._reply_socket
        )

    @classmethod
    async def start(
        cls, pod: Pod, names: MeshNamesCache, counts: collections.Counter[str]
    ) -> PodDns:
        sock = await pod.worker.run(sockets.dns_listener, abi.PORT_DNS)
        try:
            return cls(pod, sock, names, counts)
        except BaseException:
            sock.close()
            raise

    async def handle_tcp(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, nameserver: Address
    ) -> None:
        await self._proxy.handle_tcp(reader, writer, self._pod.workload.namespace, nameserver)

    def close(self) -> None:
        self._udp.close()  # before the socket, whose fd the loop watches
        self._sock.close()
        for sock in self._replies.values():
            sock.close()
        self._replies.clear()

    def _reply_socket(self, nameserver: Address) -> socket.socket:
        sock = self._replies.get(nameserver)
        if sock is not None:
            self._replies.move_to_end(nameserver)
            return sock
        # A bind in the pod's netns: a few microseconds on its thread, once per nameserver.
        sock = self._pod.worker.call(lambda: sockets.dns_reply(nameserver))
        self._replies[nameserver] = sock
        if len(self._replies) > MAX_REPLY_SOCKETS:
            _, oldest = self._replies.popitem(last=False)
            oldest.close()
        return sock

    async def _forward(self, query: bytes, nameserver: Address, transport: Transport) -> bytes:
        """The nameserver's response, asked from inside the pod (DnsProxy bounds the time)."""
        loop = asyncio.get_running_loop()
        if transport == "tcp":
            sock = await connect_from(self._pod.worker, nameserver)
            reader, writer = await asyncio.open_connection(sock=sock)
            try:
                writer.write(len(query).to_bytes(2, "big") + query)
                await writer.drain()
                length = int.from_bytes(await reader.readexactly(2), "big")
                return await reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise ConnectionError("the nameserver closed the connection") from exc
            finally:
                writer.close()
        sock = await self._pod.worker.run(sockets.dns_upstream)
        with contextlib.closing(sock):
            await loop.sock_connect(sock, nameserver)
            await loop.sock_sendall(sock, query)
            return await loop.sock_recv(sock, 65535)
