"""Numbers the kernel programs and the agent must agree on.

Marks and ports live here and reach the C code as -D defines; verdict reasons live in
bpf/lib/reasons.h and are read from there. Either way each fact has one source.
"""

from __future__ import annotations

import enum
import os
import re
from pathlib import Path

# Sockets the agent opens carry this mark, so pod egress never captures them (Istio's 1337).
AGENT_MARK = 0x539
# Packets the tc programs hand to a local socket; the pod netns routes them to `lo`.
DELIVER_MARK = 0x111
MARK_MASK = 0xFFF
# Pod-netns routing table holding `local 0.0.0.0/0 dev lo` for DELIVER_MARK packets.
DELIVER_ROUTE_TABLE = 133
DELIVER_RULE_PRIORITY = 32764

PORT_OUTBOUND = 15001
PORT_INBOUND = 15006
PORT_HBONE = 15008

BPF_DIR = Path(os.environ.get("AMBIENT_BPF_DIR", Path(__file__).resolve().parents[2] / "bpf"))
BPFFS_ROOT = Path("/sys/fs/bpf")
DEFAULT_PIN_DIR = BPFFS_ROOT / "ambient"

PROGRAM_FILES = ("pod_tc.c", "agent_connect.c", "policy_probe.c")
TC_PROGRAMS = ("pod_ingress", "pod_egress")
CGROUP_CONNECT4_PROGRAM = "agent_connect4"
POLICY_PROBE_PROGRAM = "policy_probe"  # BPF_PROG_RUN only
PROGRAMS = (*TC_PROGRAMS, CGROUP_CONNECT4_PROGRAM, POLICY_PROBE_PROGRAM)
MAPS = (
    "pods", "capture_exclude_ports", "verdicts", "pol_config", "pol_workloads", "pol_identities",
    "pol_src_ips", "pol_dst_ips", "pol_ports", "pol_terms", "workload_identities", "policy_stats",
    "upstream_peers", "policy_names",
)  # fmt: skip

# Flag bits of struct pod_info.flags.
POD_CAPTURE = 0x1


def cflags() -> list[str]:
    return [
        f"-DAGENT_MARK={AGENT_MARK:#x}",
        f"-DDELIVER_MARK={DELIVER_MARK:#x}",
        f"-DPORT_OUTBOUND={PORT_OUTBOUND}",
        f"-DPORT_INBOUND={PORT_INBOUND}",
        f"-DPORT_HBONE={PORT_HBONE}",
    ]


def read_reasons(header: Path) -> dict[str, int]:
    body = re.search(r"enum verdict_reason\s*\{(.*?)\};", header.read_text(), re.S)
    if body is None:
        raise RuntimeError(f"{header}: no enum verdict_reason")
    found = {m[1]: int(m[2]) for m in re.finditer(r"^\s*(\w+)\s*=\s*(\d+),", body[1], re.M)}
    found.pop("VERDICT_REASON_MAX", None)
    return found


class VerdictReason(enum.IntEnum):
    """Why a tc program passed, steered or dropped a packet: enum verdict_reason in
    bpf/lib/reasons.h, which is the authority (checked below at import)."""

    PASS_NOT_TCP4 = 0
    PASS_AGENT_MARK = 1
    PASS_EXCLUDED_PORT = 2
    PASS_NOT_ENROLLED = 3
    REDIRECT_OUTBOUND = 4
    DELIVER_OUTBOUND_LISTENER = 5
    DELIVER_OUTBOUND_ESTABLISHED = 6
    DELIVER_INBOUND_LISTENER = 7
    PASS_INBOUND_ESTABLISHED = 8
    PASS_HBONE = 9
    PASS_INBOUND_OTHER = 10
    DROP_MALFORMED = 11
    DROP_NO_LISTENER = 12
    DROP_AGENT_PORT = 13
    DROP_ASSIGN_FAILED = 14
    DROP_POLICY_DENIED = 15


if (_c_reasons := read_reasons(BPF_DIR / "lib" / "reasons.h")) != {
    r.name: r.value for r in VerdictReason
}:
    raise RuntimeError(
        f"VerdictReason does not match {BPF_DIR / 'lib' / 'reasons.h'}: {_c_reasons}"
    )
