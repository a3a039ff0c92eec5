"""Agent sockets, created on a NetnsWorker thread so they live in the pod's namespace.

Every agent socket carries AGENT_MARK: pod egress never captures it, so the agent's own
connections leave the pod as they are.
"""

from __future__ import annotations

import socket

from agent.datapath import abi
from agent.dns.server import IP_RECVORIGDSTADDR
from agent.netns import NetnsWorker

IP_TRANSPARENT = 19  # linux/in.h; not exported by Python's socket module
IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h, Linux >= 4.2
LISTEN_BACKLOG = 4096


def listener(port: int, transparent: bool) -> socket.socket:
    """A listener on 0.0.0.0:port. The tc programs hand it connections for any address
    (bpf_sk_assign); IP_TRANSPARENT lets it accept those not addressed to the pod."""
    # IPPROTO_TCP explicitly: asyncio turns Nagle off only on sockets whose proto says TCP,
    # and accepted sockets inherit the listener's. With Nagle on, a small HTTP/2 frame waits
    # for the peer's delayed ACK: 40 ms on every new connection.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.AGENT_MARK)
        if transparent:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.bind(("0.0.0.0", port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def new_upstream(worker: NetnsWorker, source: tuple[str, int] | None = None) -> socket.socket:
    """An unconnected client socket in the worker's namespace; with `source`, bound
    transparently to that foreign address so the peer sees the original client (used toward
    the pod's own app). Made without a hop to the worker's thread (NetnsWorker.tcp_socket):
    options and the bind work from any thread, only creation does not."""
    return configure_upstream(worker.tcp_socket(), source)


def configure_upstream(sock: socket.socket, source: tuple[str, int] | None) -> socket.socket:
    """new_upstream()'s options on a fresh socket; the socket is closed if one fails."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.AGENT_MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            # The port is picked at connect(), for the 4-tuple: bind() would search for a
            # port free of every socket on that address, TIME_WAIT ones included, and with
            # the thousands a busy client leaves that search cost most of a connection.
            sock.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source[0], 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def dns_listener(port: int) -> socket.socket:
    """The pod's UDP DNS socket on 0.0.0.0:port. pod_ingress hands it the pod's looped DNS
    queries (bpf_sk_assign), whatever nameserver they were sent to; IP_RECVORIGDSTADDR tells
    which, so the answer can come from there."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.AGENT_MARK)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def dns_reply(nameserver: tuple[str, int]) -> socket.socket:
    """A UDP socket bound (transparently) to the nameserver's address, so a reply sent
    through it comes from the address the pod asked, as its resolver requires."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.AGENT_MARK)
        sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        # Several pods' agents (and this one's earlier reply socket) may hold the same
        # nameserver address: each in its own netns, but reuse keeps a rebind after a close
        # from failing while the old one lingers.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(nameserver)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def dns_upstream() -> socket.socket:
    """An unconnected UDP socket for forwarding one query; the mark keeps it uncaptured."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_UDP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.AGENT_MARK)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
