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

PROGRAMS = ("pod_ingress", "pod_egress")
MAPS = ("pods", "capture_exclude_ports", "verdicts")

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


def _read_reasons(header: Path) -> dict[str, int]:
    body = re.search(r"enum verdict_reason\s*\{(.*?)\};", header.read_text(), re.S)
    if body is None:
        raise RuntimeError(f"{header}: no enum verdict_reason")
    return {m[1]: int(m[2]) for m in re.finditer(r"^\s*(\w+)\s*=\s*(\d+),", body[1], re.M)}


VerdictReason = enum.IntEnum(  # type: ignore[misc]
    "VerdictReason",
    {
        k: v
        for k, v in _read_reasons(BPF_DIR / "lib" / "reasons.h").items()
        if k != "VERDICT_REASON_MAX"
    },
)
"""Why a tc program passed, steered or dropped a packet (mirrors enum verdict_reason)."""
