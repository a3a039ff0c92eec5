"""BPF_PROG_RUN for tc programs: packet and __sk_buff context in, verdict and context out."""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

_NR_BPF = 321  # x86-64
_BPF_PROG_TEST_RUN = 10
_libc = ctypes.CDLL(None, use_errno=True)


class SkBuff(ctypes.Structure):
    """struct __sk_buff (uapi/linux/bpf.h), as far as test runs use it."""

    _fields_ = [
        ("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32), ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32), ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32), ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32), ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32), ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32), ("cb", ctypes.c_uint32 * 5), ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32), ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32), ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32), ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32), ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4), ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64), ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32), ("gso_segs", ctypes.c_uint32), ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32), ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3), ("hwtstamp", ctypes.c_uint64),
    ]  # fmt: skip


class _TestAttr(ctypes.Structure):
    _fields_ = [
        ("prog_fd", ctypes.c_uint32), ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64), ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32), ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64), ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]  # fmt: skip


@dataclass(frozen=True)
class RunResult:
    retval: int
    packet: bytes
    mark: int
    duration_ns: int


def run_tc(
    prog_fd: int, packet: bytes, mark: int = 0, ifindex: int = 1, repeat: int = 1
) -> RunResult:
    """Runs in the calling thread's netns: socket lookups see that namespace's sockets."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx_in = SkBuff(mark=mark, ifindex=ifindex)
    ctx_out = SkBuff()
    attr = _TestAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=len(data_out),
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
        ctx_size_in=ctypes.sizeof(ctx_in),
        ctx_size_out=ctypes.sizeof(ctx_out),
        ctx_in=ctypes.addressof(ctx_in),
        ctx_out=ctypes.addressof(ctx_out),
    )
    if _libc.syscall(_NR_BPF, _BPF_PROG_TEST_RUN, ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN: {os.strerror(err)}")
    return RunResult(attr.retval, data_out.raw[: attr.data_size_out], ctx_out.mark, attr.duration)
