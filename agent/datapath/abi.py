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

PROGRAM_FILES = ("pod_tc.c", "agent_connect.c", "policy_probe.c", "sock_telemetry.c")
TC_PROGRAMS = ("pod_ingress", "pod_egress")
CGROUP_CONNECT4_PROGRAM = "agent_connect4"
POLICY_PROBE_PROGRAM = "policy_probe"  # BPF_PROG_RUN only
SOCK_TELEMETRY_PROGRAM = "sock_telemetry"  # sockops on the agent's cgroup
PROGRAMS = (*TC_PROGRAMS, CGROUP_CONNECT4_PROGRAM, POLICY_PROBE_PROGRAM, SOCK_TELEMETRY_PROGRAM)
MAPS = (
    "pods", "capture_exclude_ports", "verdicts", "pol_config", "pol_workloads", "pol_identities",
    "pol_src_ips", "pol_dst_ips", "pol_ports", "pol_terms", "workload_identities", "policy_stats",
    "upstream_peers", "policy_names", "sock_conns", "telemetry_events", "telemetry_stats",
)  # fmt: skip


class TelemetryStat(enum.IntEnum):
    """Indexes of the telemetry_stats map: enum telemetry_stat in bpf/sock_telemetry.c."""

    EVENTS_SENT = 0
    EVENTS_DROPPED = 1
    TABLE_FULL = 2


# Maps whose fill the agent reports (ambient_map_entries): those that grow with pods and
# connections. The policy maps are sized and counted by the policy compiler instead.
FILL_MAPS = ("pods", "workload_identities", "pol_workloads", "policy_names", "sock_conns")

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


def read_enum(source: Path, name: str) -> dict[str, int]:
    """The members of C `enum <name>` in source, without its *_MAX member."""
    body = re.search(rf"enum {name}\s*\{{(.*?)\}};", source.read_text(), re.S)
    if body is None:
        raise RuntimeError(f"{source}: no enum {name}")
    found = {m[1]: int(m[2]) for m in re.finditer(r"^\s*(\w+)\s*=\s*(\d+),", body[1], re.M)}
    return {k: v for k, v in found.items() if not k.endswith("_MAX")}


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


for _python, _source, _c_name, _prefix in (
    (VerdictReason, BPF_DIR / "lib" / "reasons.h", "verdict_reason", ""),
    (TelemetryStat, BPF_DIR / "sock_telemetry.c", "telemetry_stat", "TELEMETRY_"),
):
    if (_c := read_enum(_source, _c_name)) != {_prefix + m.name: m.value for m in _python}:
        raise RuntimeError(f"{_python.__name__} does not match enum {_c_name} in {_source}: {_c}")
