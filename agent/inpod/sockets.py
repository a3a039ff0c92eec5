"""Agent sockets, created on a NetnsWorker thread so they live in the pod's namespace.

Every agent socket carries AGENT_MARK: pod egress never captures it, so the agent's own
connections leave the pod as they are.
"""

from __future__ import annotations

import socket

from agent.datapath import abi

IP_TRANSPARENT = 19  # linux/in.h; not exported by Python's socket module
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


def upstream(source: tuple[str, int] | None = None) -> socket.socket:
    """An unconnected client socket; with `source`, bound transparently to that foreign
    address so the peer sees the original client (used toward the pod's own app)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, abi.AGENT_MARK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            sock.bind((source[0], 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
