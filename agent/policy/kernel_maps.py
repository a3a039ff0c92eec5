"""Write compiled policies into the kernel's maps, atomically, and tag HBONE upstream sockets.

A whole policy set is written under the idle generation; then pol_config.gen flips to it in
one array update, so every decision sees either the old set or the new one. The old
generation is deleted after a grace period, once no decision can still be reading it.
"""

from __future__ import annotations

import ctypes
import socket
from typing import Any

from agent.datapath import abi, maps, packets
from agent.datapath.loader import DatapathError, LoadedDatapath
from agent.datapath.prog_run import run_tc
from agent.policy.compiler import MASK_WORDS, TERMS_PER_PAGE, CompiledPolicies, WorkloadTables

_WORD = (1 << 64) - 1  # struct policy_mask's words are __u64 (checked in abi)
# Every map whose key carries a policy generation, read from the C.
_GENERATION_MAPS = abi.maps_keyed_by("gen")

# The members of each struct this module names, all of them in the C's order: a ctypes
# struct takes a name it lacks without a word (as an attribute or keyword), so they are
# checked against the C at import. pol_workload's masks are WorkloadTables' attributes too.
_WORKLOAD_MASKS = ("deny", "allow", "dry_deny", "dry_allow", "identity_default")
_MEMBERS_NAMED = {
    "pol_config": ("gen",),
    "pol_workload_key": ("gen", "addr"),
    "pol_workload": ("wid", "flags", "pages", "reserved", *_WORKLOAD_MASKS),
    "pol_page_key": ("gen", "wid"),
    "pol_identity_key": ("gen", "wid", "identity"),
    "pol_lpm_key": ("prefixlen", "gen", "wid", "addr"),
    "pol_port_key": ("gen", "wid", "port"),
    "pol_term_key": ("gen", "wid", "term"),
    "policy_name": ("name",),
    "policy_stat_key": ("policy", "reason"),
}
for _c_struct, _members in _MEMBERS_NAMED.items():
    abi.check_field_names(_members, "agent.policy.kernel_maps", _c_struct)


def addr_key(ip: str) -> int:
    """An IPv4 address as the kernel stores it (network order in a u32 written by ctypes)."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def _set_mask(target: Any, mask: int) -> None:
    for i in range(MASK_WORDS):
        target.w[i] = (mask >> (64 * i)) & _WORD


_PAGE = (1 << TERMS_PER_PAGE) - 1


def page_of(mask: int, page: int) -> int:
    """The bits of page `page` of a mask that spans every page of a workload's terms."""
    return (mask >> (page * TERMS_PER_PAGE)) & _PAGE


class _UpstreamPeer(ctypes.Structure):
    """struct upstream_peer (bpf/lib/maps.h; checked below at import)."""

    _fields_ = [
        ("identity", ctypes.c_uint32), ("src_addr", ctypes.c_uint32),
        ("policy", ctypes.c_uint32), ("reason", ctypes.c_uint32),
    ]  # fmt: skip


abi.check_ctypes_struct(_UpstreamPeer, "upstream_peer")


def decode_probe_result(result: int) -> tuple[bool, int, int]:
    """policy_probe's return value as (allowed, reason, policy): the allow bit below
    PROBE_REASON_SHIFT, the reason up to PROBE_POLICY_SHIFT, the policy above."""
    reason_mask = (1 << (abi.PROBE_POLICY_SHIFT - abi.PROBE_REASON_SHIFT)) - 1
    allowed = bool(result & ((1 << abi.PROBE_REASON_SHIFT) - 1))
    return (
        allowed,
        (result >> abi.PROBE_REASON_SHIFT) & reason_mask,
        result >> abi.PROBE_POLICY_SHIFT,
    )


class PolicyMaps:
    def __init__(self, datapath: LoadedDatapath) -> None:
        self._dp = datapath
        config = datapath.table("pol_config")
        self.generation = int(config[config.Key(0)].gen)
        self._policy_numbers: dict[str, int] = {}

    def write(self, compiled: CompiledPolicies) -> int:
        """Write the set under the idle generation and flip to it; returns the generation
        now retired, to delete with clear_generation() after a grace period."""
        new = 1 - self.generation
        self._policy_numbers = compiled.policy_numbers
        self.clear_generation(new)  # leftovers of an interrupted earlier write
        for tables in compiled.workloads:
            self._write_workload(new, tables)
        names = self._dp.table("policy_names")
        for key, number in compiled.policy_numbers.items():
            entry = names.Leaf()
            entry.name = key.encode()[: abi.POLICY_NAME_SIZE - 1]  # the NUL stays
            names[names.Key(number)] = entry
        config = self._dp.table("pol_config")
        value = config.Leaf()
        value.gen = new
        config[config.Key(0)] = value  # the flip: one array update
        retired, self.generation = self.generation, new
        return retired

    def _write_workload(self, gen: int, t: WorkloadTables) -> None:
        for page in range(t.pages):
            self._write_page(gen, t, page)

    def _write_page(self, gen: int, t: WorkloadTables, page: int) -> None:
        """Page `page` of W: its masks (the first page under W's addresses in pol_workloads,
        the others in pol_pages), classes and terms, keyed by the page's number."""
        wid = t.wid + page
        workloads = self._dp.table("pol_workloads")
        value = workloads.Leaf()
        value.wid, value.flags, value.pages = t.wid, t.flags, t.pages
        for name in _WORKLOAD_MASKS:
            _set_mask(getattr(value, name), page_of(getattr(t, name), page))
        if page == 0:
            for ip in t.addresses:
                workloads[workloads.Key(gen=gen, addr=addr_key(ip))] = value
        else:
            pages = self._dp.table("pol_pages")
            pages[pages.Key(gen=gen, wid=wid)] = value
        self._write_identities_of_page(t, t.by_identity, gen, page)
        for map_name, classes in (("pol_src_ips", t.by_src), ("pol_dst_ips", t.by_dst)):
            table = self._dp.table(map_name)
            for network, mask in classes.items():
                key = table.Key(
                    prefixlen=abi.POL_LPM_SCOPE_BITS + network.prefixlen, gen=gen, wid=wid,
                    addr=addr_key(str(network.network_address)),
                )  # fmt: skip
                table[key] = self._mask_leaf(table, page_of(mask, page))
        ports = self._dp.table("pol_ports")
        for port, mask in t.by_port.items():
            ports[ports.Key(gen=gen, wid=wid, port=port)] = self._mask_leaf(
                ports, page_of(mask, page)
            )
        terms = self._dp.table("pol_terms")
        first = page * TERMS_PER_PAGE
        for index, term in enumerate(t.terms[first : first + TERMS_PER_PAGE]):
            terms[terms.Key(gen=gen, wid=wid, term=index)] = ctypes.c_uint32(
                self.policy_number(term.policy.key)
            )

    def write_identities(self, t: WorkloadTables, masks: dict[int, int], gen: int | None) -> None:
        """Identity masks for W; with gen None, into the live generation (new identities only
        add keys, so no decision can see a half-written state)."""
        generation = self.generation if gen is None else gen
        for page in range(t.pages):
            self._write_identities_of_page(t, masks, generation, page)

    def _write_identities_of_page(
        self, t: WorkloadTables, masks: dict[int, int], gen: int, page: int
    ) -> None:
        table = self._dp.table("pol_identities")
        default = page_of(t.identity_default, page)
        for number, mask in masks.items():
            if (bits := page_of(mask, page)) != default:  # else the page's default answers
                key = table.Key(gen=gen, wid=t.wid + page, identity=number)
                table[key] = self._mask_leaf(table, bits)

    @staticmethod
    def _mask_leaf(table: Any, mask: int) -> Any:
        leaf = table.Leaf()
        _set_mask(leaf, mask)
        return leaf

    def policy_number(self, key: str) -> int:
        return self._policy_numbers[key]

    def clear_generation(self, gen: int) -> int:
        removed = 0
        for name in _GENERATION_MAPS:
            table = self._dp.table(name)
            for key in [k for k in table if k.gen == gen]:
                del table[key]
                removed += 1
        return removed

    def tag_upstream(self, sock: socket.socket, identity: int, client_ip: str) -> None:
        """Hand the kernel the verified peer of an HBONE tunnel, on the socket that will
        connect to the app: agent_connect4 authorizes that connect() with it."""
        key = ctypes.c_int(sock.fileno())
        value = _UpstreamPeer(identity, addr_key(client_ip))
        try:
            maps.update(self._dp.map_fd("upstream_peers"), key, value, "tagging an upstream socket")
        except maps.MapError as exc:
            raise DatapathError(str(exc)) from exc

    def upstream_decision(self, sock: socket.socket) -> tuple[int, int] | None:
        """(policy number, reason) agent_connect4 wrote back on the socket, if it decided."""
        key = ctypes.c_int(sock.fileno())
        value = _UpstreamPeer()
        if not maps.lookup(self._dp.map_fd("upstream_peers"), key, value):
            return None
        return int(value.policy), int(value.reason)

    def evaluate(
        self, src_ip: str, dst_ip: str, dst_port: int, identity: int
    ) -> tuple[bool, int, int]:
        """(allowed, reason, policy) for a connection, decided by the kernel's authorize()
        through policy_probe (BPF_PROG_RUN), without counting a decision."""
        packet = packets.tcp4(src_ip, 1, dst_ip, dst_port, flags=packets.ACK)
        fd = self._dp.program_fds[abi.POLICY_PROBE_PROGRAM]
        return decode_probe_result(run_tc(fd, packet, mark=identity).retval)

    def decisions(self) -> dict[tuple[int, int], int]:
        """(policy number, reason) -> count, summed over CPUs."""
        stats = self._dp.table("policy_stats")
        return {(int(k.policy), int(k.reason)): sum(v) for k, v in stats.items()}
