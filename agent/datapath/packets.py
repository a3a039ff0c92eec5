"""Build Ethernet/IPv4 frames for BPF_PROG_RUN: the tests' crafted packets and the agent's
policy probes (no scapy: a few struct.pack calls do)."""

from __future__ import annotations

import socket
import struct

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
SYN, ACK = 0x02, 0x10


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(payload: bytes, ethertype: int = ETH_P_IP) -> bytes:
    return (
        b"\x02\x00\x00\x00\x00\x02"
        + b"\x02\x00\x00\x00\x00\x01"
        + struct.pack("!H", ethertype)
        + payload
    )


def ipv4(src: str, dst: str, proto: int, payload: bytes) -> bytes:
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64, proto, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )  # fmt: skip
    header = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
    return header + payload


def tcp4(src: str, sport: int, dst: str, dport: int, flags: int = SYN) -> bytes:
    segment = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, flags, 64240, 0, 0)
    return ethernet(ipv4(src, dst, socket.IPPROTO_TCP, segment))


def udp4(src: str, sport: int, dst: str, dport: int) -> bytes:
    datagram = struct.pack("!HHHH", sport, dport, 8, 0)
    return ethernet(ipv4(src, dst, socket.IPPROTO_UDP, datagram))


def truncated_tcp4(src: str, dst: str) -> bytes:
    """IPv4 header that announces TCP, followed by only 4 bytes of it."""
    return ethernet(ipv4(src, dst, socket.IPPROTO_TCP, b"\x00\x50\x1f\x90"))


def arp() -> bytes:
    return ethernet(b"\x00\x01\x08\x00\x06\x04\x00\x01" + b"\0" * 20, ETH_P_ARP)
