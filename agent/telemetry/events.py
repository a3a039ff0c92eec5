"""The kernel's "socket closed" ring-buffer record (struct sock_closed_event in
bpf/sock_telemetry.c), decoded without any I/O."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Protocol

from agent.datapath import abi

# The C struct's members in its order, as struct format codes. Little-endian, no padding: the
# C struct is laid out to 64 bytes without holes (both checked against the C at import).
_FIELDS = (
    ("cookie", "Q"), ("opened_ns", "Q"), ("closed_ns", "Q"), ("bytes_received", "Q"),
    ("bytes_sent", "Q"), ("local_addr", "4s"), ("remote_addr", "4s"), ("local_port", "H"),
    ("remote_port", "H"), ("srtt_us", "I"), ("total_retrans", "I"), ("passive", "B"),
    ("reserved", "3x"),
)  # fmt: skip
abi.check_packed_struct(_FIELDS, "agent.telemetry.events._FIELDS", "sock_closed_event")
_LAYOUT = struct.Struct("<" + "".join(code for _, code in _FIELDS))
EVENT_SIZE = _LAYOUT.size


class EventError(ValueError):
    """A ring-buffer record that is not a sock_closed_event."""


@dataclass(frozen=True, slots=True)
class SocketClosed:
    cookie: int  # SO_COOKIE of the agent's socket
    opened_ns: int  # CLOCK_MONOTONIC (bpf_ktime_get_ns)
    closed_ns: int
    bytes_received: int  # payload the agent's socket received
    bytes_sent: int  # payload it sent that the peer acknowledged
    local: tuple[str, int]
    remote: tuple[str, int]
    srtt_us: int
    retransmits: int
    passive: bool  # accepted (True) or connected by the agent

    @property
    def duration_ns(self) -> int:
        return self.closed_ns - self.opened_ns


def decode(record: bytes) -> SocketClosed:
    if len(record) != EVENT_SIZE:
        raise EventError(f"telemetry record of {len(record)} bytes, expected {EVENT_SIZE}")
    (cookie, opened, closed, received, sent, local_ip, remote_ip, local_port, remote_port,
     srtt, retrans, passive) = _LAYOUT.unpack(record)  # fmt: skip
    return SocketClosed(
        cookie, opened, closed, received, sent,
        (socket.inet_ntoa(local_ip), local_port), (socket.inet_ntoa(remote_ip), remote_port),
        srtt, retrans, bool(passive),
    )  # fmt: skip


def encode(event: SocketClosed) -> bytes:
    """The record the kernel would write for event (for tests and replay)."""
    return _LAYOUT.pack(
        event.cookie, event.opened_ns, event.closed_ns, event.bytes_received, event.bytes_sent,
        socket.inet_aton(event.local[0]), socket.inet_aton(event.remote[0]), event.local[1],
        event.remote[1], event.srtt_us, event.retransmits, int(event.passive),
    )  # fmt: skip


SO_COOKIE = 57  # <asm-generic/socket.h>; Python's socket module does not name it


class _Socket(Protocol):
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def socket_cookie(sock: _Socket) -> int:
    """The kernel's id for the socket, the same bpf_get_socket_cookie() returns."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
