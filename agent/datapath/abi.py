"""Numbers, names and layouts the kernel programs and the agent must agree on.

Marks and ports live here and reach the C code as -D defines. Everything else belongs to the
C (bpf/, installed as the `bpf` package): flags, sizes and map names are read from it at
import, and what Python has to spell out itself (enum members, ctypes and struct layouts,
program names) is checked against it at import. Either way each fact has one source, and an
agent whose Python and C disagree refuses to start with an error naming both sides.

The check functions take a ProgramSources, so tests can run them on altered copies of bpf/.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.resources
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

from agent.datapath.c_sources import (
    CField,
    FieldLayout,
    ProgramSources,
    SourceMismatch,
)

# Sockets the agent opens carry this mark, so pod egress never captures them (Istio's 1337).
AGENT_MARK = 0x539
# Packets the tc programs hand to a local socket; the pod netns routes them to `lo`.
DELIVER_MARK = 0x111
# Pod-netns routing table holding `local 0.0.0.0/0 dev lo` for DELIVER_MARK packets.
DELIVER_ROUTE_TABLE = 133
DELIVER_RULE_PRIORITY = 32764

PORT_OUTBOUND = 15001
PORT_INBOUND = 15006
PORT_HBONE = 15008
PORT_DNS = 15053  # the agent's DNS proxy in each pod (UDP; TCP DNS arrives on 15001)

BPFFS_ROOT = Path("/sys/fs/bpf")
DEFAULT_PIN_DIR = BPFFS_ROOT / "ambient"

# The package the C sources are installed as: the repository's bpf/ (pyproject.toml).
BPF_PACKAGE = "bpf"


def installed_bpf_dir() -> Path:
    """The directory of the C sources: the repository's bpf/ in an editable install (and when
    run from a checkout), site-packages/bpf when installed from a wheel."""
    try:
        sources = importlib.resources.files(BPF_PACKAGE)
    except ModuleNotFoundError:
        raise RuntimeError(
            f"the eBPF sources (package {BPF_PACKAGE}) are not installed: reinstall "
            "ambient-agent (`pip install -e .` in a checkout)"
        ) from None
    if not isinstance(sources, Path):
        # Imported from a zip: BCC and render_source need the files themselves.
        raise RuntimeError(f"the eBPF sources are not files on disk ({sources})")
    return sources


BPF_DIR = installed_bpf_dir()

PROGRAM_FILES = (
    "pod_tc.c", "pod_lookup.c", "agent_connect.c", "policy_probe.c", "sock_telemetry.c",
)  # fmt: skip
TC_PROGRAMS = ("pod_ingress", "pod_egress")
POD_LOOKUP_PROGRAM = "pod_lookup"  # sk_lookup on each enrolled pod's netns
CGROUP_CONNECT4_PROGRAM = "agent_connect4"
POLICY_PROBE_PROGRAM = "policy_probe"  # BPF_PROG_RUN only
SOCK_TELEMETRY_PROGRAM = "sock_telemetry"  # sockops on the agent's cgroup
# The context each program takes, which the program type the loader gives it must match.
PROGRAM_CONTEXTS: dict[str, str] = {
    **{name: "__sk_buff" for name in TC_PROGRAMS},
    POD_LOOKUP_PROGRAM: "bpf_sk_lookup",
    CGROUP_CONNECT4_PROGRAM: "bpf_sock_addr",
    POLICY_PROBE_PROGRAM: "__sk_buff",
    SOCK_TELEMETRY_PROGRAM: "bpf_sock_ops",
}
PROGRAMS = tuple(PROGRAM_CONTEXTS)

# Maps whose fill the agent reports (ambient_map_entries): those that grow with pods and
# connections. The policy maps are sized and counted by the policy compiler instead.
FILL_MAPS = ("pods", "pol_workloads", "policy_names", "sock_conns")


def cflags() -> list[str]:
    return [
        f"-DAGENT_MARK={AGENT_MARK:#x}",
        f"-DDELIVER_MARK={DELIVER_MARK:#x}",
        f"-DPORT_OUTBOUND={PORT_OUTBOUND}",
        f"-DPORT_INBOUND={PORT_INBOUND}",
        f"-DPORT_HBONE={PORT_HBONE}",
        f"-DPORT_DNS={PORT_DNS}",
    ]


SOURCES = ProgramSources(BPF_DIR)

# ---- read from the C -------------------------------------------------------------------------

# The #defines this module takes from the C, each under its C name.
DEFINES_READ = (
    "MARK_MASK", "POD_CAPTURE", "POD_CAPTURE_DNS", "POLICY_NAME_SIZE", "POLICY_MASK_WORDS",
    "POL_MAX_PAGES", "POL_HAS_ALLOW", "POL_DRY_HAS_ALLOW", "POL_FALLBACK", "POL_HAS_DRY_RUN",
    "PROBE_REASON_SHIFT", "PROBE_POLICY_SHIFT",
)  # fmt: skip


def read_defines(sources: ProgramSources | None = None) -> dict[str, int]:
    return {name: (sources or SOURCES).define(name) for name in DEFINES_READ}


_DEFINED = read_defines()
# Agent sockets carry AGENT_MARK in these bits (bpf/lib/common.h).
MARK_MASK = _DEFINED["MARK_MASK"]
# Flag bits of struct pod_info.flags (bpf/lib/maps.h).
POD_CAPTURE = _DEFINED["POD_CAPTURE"]
POD_CAPTURE_DNS = _DEFINED["POD_CAPTURE_DNS"]
# struct policy_name's buffer, its NUL included (bpf/lib/maps.h).
POLICY_NAME_SIZE = _DEFINED["POLICY_NAME_SIZE"]
# Words of struct policy_mask, and the flags of struct pol_workload (bpf/lib/policy.h).
POLICY_MASK_WORDS = _DEFINED["POLICY_MASK_WORDS"]
POL_HAS_ALLOW = _DEFINED["POL_HAS_ALLOW"]
POL_DRY_HAS_ALLOW = _DEFINED["POL_DRY_HAS_ALLOW"]
POL_FALLBACK = _DEFINED["POL_FALLBACK"]
POL_HAS_DRY_RUN = _DEFINED["POL_HAS_DRY_RUN"]
# Pages of terms one workload's policies may fill (bpf/lib/policy.h).
POL_MAX_PAGES = _DEFINED["POL_MAX_PAGES"]
# policy_probe's answer: the allow bit, the reason from REASON_SHIFT, the policy from
# POLICY_SHIFT (bpf/policy_probe.c).
PROBE_REASON_SHIFT = _DEFINED["PROBE_REASON_SHIFT"]
PROBE_POLICY_SHIFT = _DEFINED["PROBE_POLICY_SHIFT"]
# Every map the programs declare; all are pinned.
MAPS = tuple(SOURCES.maps())


def lpm_scope_bits(sources: ProgramSources | None = None) -> int:
    """The prefix bits of struct pol_lpm_key between prefixlen and the address (gen, wid),
    always matched in full: a CIDR of length n is stored with prefixlen scope bits + n."""
    sources = sources or SOURCES
    path, _ = sources.struct("pol_lpm_key")
    fields = sources.layout("pol_lpm_key").fields
    if [f.name for f in (*fields[:1], *fields[-1:])] != ["prefixlen", "addr"]:
        raise RuntimeError(
            f"struct pol_lpm_key in {path} must run from prefixlen to addr, as "
            f"agent.policy.kernel_maps stores prefixes: it has {[f.name for f in fields]}"
        )
    return 8 * (fields[-1].offset - fields[0].size)


POL_LPM_SCOPE_BITS = lpm_scope_bits()


def maps_keyed_by(field: str, sources: ProgramSources | None = None) -> tuple[str, ...]:
    """The maps whose key struct has `field` (with "gen": those that hold a policy
    generation, which the policy engine clears one generation at a time)."""
    sources = sources or SOURCES
    return tuple(
        declaration.name
        for declaration in sources.maps().values()
        if declaration.key is not None
        and declaration.key.startswith("struct ")
        and field in {f.name for f in sources.struct(declaration.key.removeprefix("struct "))[1]}
    )


# ---- mirrored in Python, checked against the C -----------------------------------------------


class TelemetryStat(enum.IntEnum):
    """Indexes of the telemetry_stats map: enum telemetry_stat in bpf/sock_telemetry.c, with
    its TELEMETRY_ prefix (checked at import)."""

    EVENTS_SENT = 0
    EVENTS_DROPPED = 1
    TABLE_FULL = 2


class VerdictReason(enum.IntEnum):
    """Why a tc program (or pod_lookup) passed, steered or dropped a packet: enum verdict_reason in
    bpf/lib/reasons.h, which is the authority (checked at import)."""

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
    REDIRECT_DNS = 16
    DELIVER_DNS = 17
    DROP_NO_DNS_LISTENER = 18
    DELIVER_OUTBOUND_REOPEN = 19
    DELIVER_INBOUND_REOPEN = 20
    REOPEN_LISTENER = 21
    DROP_REOPEN_NO_LISTENER = 22


class PolicyReason(enum.IntEnum):
    """Why authorize() decided as it did: enum policy_reason in bpf/lib/policy.h, with its
    POLICY_ prefix (checked at import)."""

    NO_POLICY = 0
    ALLOWED = 1
    DENIED = 2
    DEFAULT_DENY = 3
    DRY_RUN_WOULD_DENY = 4
    FALLBACK = 5

    @property
    def label(self) -> str:
        """The reason as metrics, logs and ambientctl name it."""
        return _POLICY_REASON_LABELS[self]

    @classmethod
    def label_of(cls, number: int) -> str:
        """The label of a reason number read from the kernel; the number itself when it is no
        reason of ours (pins of another agent version)."""
        try:
            return cls(number).label
        except ValueError:
            return str(number)


_POLICY_REASON_LABELS = {
    PolicyReason.NO_POLICY: "no-policy",
    PolicyReason.ALLOWED: "allowed-by-policy",
    PolicyReason.DENIED: "denied-by-policy",
    PolicyReason.DEFAULT_DENY: "default-deny",
    PolicyReason.DRY_RUN_WOULD_DENY: "dry-run-would-deny",
    PolicyReason.FALLBACK: "fallback",
}

# (Python enum, C enum, the prefix its C members carry)
MIRRORED_ENUMS: tuple[tuple[type[enum.IntEnum], str, str], ...] = (
    (VerdictReason, "verdict_reason", ""),
    (TelemetryStat, "telemetry_stat", "TELEMETRY_"),
    (PolicyReason, "policy_reason", "POLICY_"),
)


def check_enum(
    python: type[enum.IntEnum], c_name: str, prefix: str, sources: ProgramSources | None = None
) -> None:
    path, c_members = (sources or SOURCES).enum(c_name)
    python_members = {prefix + member.name: member.value for member in python}
    if python_members != c_members:
        raise SourceMismatch(
            f"{python.__module__}.{python.__qualname__}",
            f"enum {c_name}",
            path,
            python_members,
            c_members,
        )


def check_programs(sources: ProgramSources | None = None) -> None:
    """PROGRAM_FILES are the .c files, and PROGRAM_CONTEXTS the programs they define."""
    sources = sources or SOURCES
    c_files = {path.name for path in sources.texts if path.parent == sources.directory}
    if set(PROGRAM_FILES) != c_files:
        raise SourceMismatch(
            "agent.datapath.abi.PROGRAM_FILES",
            "the program files",
            sources.directory,
            set(PROGRAM_FILES),
            c_files,
        )
    c_programs = sources.programs()
    if c_programs != PROGRAM_CONTEXTS:
        raise SourceMismatch(
            "agent.datapath.abi.PROGRAM_CONTEXTS",
            "the programs",
            sources.directory,
            PROGRAM_CONTEXTS,
            c_programs,
        )


def check_map_names(
    names: Iterable[str], python_side: str, sources: ProgramSources | None = None
) -> None:
    sources = sources or SOURCES
    unknown = sorted(set(names) - set(sources.maps()))
    if unknown:
        raise RuntimeError(
            f"{python_side} names maps the C sources under {sources.directory} "
            f"do not declare: {unknown}"
        )


def check_field_names(
    names: Sequence[str],
    python_side: str,
    c_struct: str,
    of_type: str | None = None,
    sources: ProgramSources | None = None,
) -> None:
    """names are the members of struct c_struct (those of C type of_type, if given), in order."""
    path, fields = (sources or SOURCES).struct(c_struct)
    c_names = [f.name for f in fields if of_type is None or f.type == of_type]
    if list(names) != c_names:
        side = f"struct {c_struct}" + (f" ({of_type} members)" if of_type else "")
        raise SourceMismatch(python_side, side, path, list(names), c_names)


def _compare_layouts(
    python_side: str,
    python: list[FieldLayout],
    python_size: int,
    c_struct: str,
    sources: ProgramSources,
) -> None:
    path, _ = sources.struct(c_struct)
    layout = sources.layout(c_struct)
    # The size last, so a difference in trailing padding shows too.
    python_members = [*python, FieldLayout("(sizeof)", 0, python_size)]
    c_members = [*layout.fields, FieldLayout("(sizeof)", 0, layout.size)]
    if python_members != c_members:
        raise SourceMismatch(python_side, f"struct {c_struct}", path, python_members, c_members)


def check_ctypes_struct(
    python: type[ctypes.Structure], c_struct: str, sources: ProgramSources | None = None
) -> None:
    """A ctypes mirror has the C struct's members, in order, at the same offsets and sizes."""
    fields = [(field[0], getattr(python, field[0])) for field in python._fields_]
    _compare_layouts(
        f"{python.__module__}.{python.__qualname__}",
        [FieldLayout(name, int(f.offset), int(f.size)) for name, f in fields],
        ctypes.sizeof(python),
        c_struct,
        sources or SOURCES,
    )


def check_packed_struct(
    fields: Sequence[tuple[str, str]],
    python_side: str,
    c_struct: str,
    sources: ProgramSources | None = None,
) -> None:
    """A little-endian struct-module layout, (member, format code) without padding, has the C
    struct's members at the offsets and sizes the C gives them (so the C has no holes)."""
    python: list[FieldLayout] = []
    offset = 0
    for name, code in fields:
        size = struct.calcsize("<" + code)
        python.append(FieldLayout(name, offset, size))
        offset += size
    _compare_layouts(python_side, python, offset, c_struct, sources or SOURCES)


def check_sources(sources: ProgramSources | None = None) -> None:
    """Everything this module mirrors or assumes, against the C."""
    sources = sources or SOURCES
    for python, c_name, prefix in MIRRORED_ENUMS:
        check_enum(python, c_name, prefix, sources)
    check_programs(sources)
    check_map_names(FILL_MAPS, "agent.datapath.abi.FILL_MAPS", sources)
    # compiler.py numbers terms 64 to a word and kernel_maps.py writes the words into `w`.
    path, mask = sources.struct("policy_mask")
    expected = (CField("__u64", "w", sources.define("POLICY_MASK_WORDS")),)
    if mask != expected:
        raise SourceMismatch(
            "agent.policy.compiler (64-bit mask words in w)",
            "struct policy_mask",
            path,
            expected,
            mask,
        )
    # policy_probe's reason field must hold every reason.
    _, reasons = sources.enum("policy_reason")
    reason_bits = sources.define("PROBE_POLICY_SHIFT") - sources.define("PROBE_REASON_SHIFT")
    if max(reasons.values()) >= 1 << reason_bits:
        raise RuntimeError(
            f"enum policy_reason goes to {max(reasons.values())}, past the "
            f"{reason_bits} bits policy_probe gives the reason"
        )
    missing = set(PolicyReason) - set(_POLICY_REASON_LABELS)
    if missing:
        raise RuntimeError(f"agent.datapath.abi: no label for {sorted(missing)}")


check_sources()
