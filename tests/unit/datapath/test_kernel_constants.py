"""One source for what the agent shares with the kernel programs (agent/datapath/abi.py).

Every enum, flag, size, map name, program name and struct layout the Python side uses is read
from bpf/ or checked against it at import. Here the checks pass on the real sources, the values
read are the ones the C gives, and every check fails, naming both sides, on a copy of bpf/ with
one thing changed.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.datapath import abi
from agent.datapath.abi import PolicyReason
from agent.datapath.c_sources import ProgramSources, SourceMismatch, read_enum
from agent.policy import compiler, kernel_maps
from agent.state.policy import Reason
from agent.telemetry import events

REPOSITORY = Path(__file__).resolve().parents[3]

Alter = Callable[[str, str, str], ProgramSources]


@pytest.fixture
def altered(tmp_path: Path) -> Alter:
    """alter(file, old, new): a copy of bpf/ with `old` replaced by `new` in file (relative to
    bpf/), successive calls changing the same copy, read as ProgramSources."""
    copy = tmp_path / "bpf"
    shutil.copytree(abi.BPF_DIR, copy, ignore=shutil.ignore_patterns("__pycache__", "*.py"))

    def alter(relative: str, old: str, new: str) -> ProgramSources:
        path = copy / relative
        text = path.read_text()
        assert text.count(old) == 1, f"{relative} no longer has {old!r} once: update this test"
        path.write_text(text.replace(old, new))
        return ProgramSources(copy)

    return alter


def _check_everything(sources: ProgramSources) -> None:
    """Everything the modules read or check at import, on sources."""
    abi.read_defines(sources)
    abi.maps_keyed_by("gen", sources)
    abi.check_sources(sources)
    abi.lpm_scope_bits(sources)
    abi.check_ctypes_struct(kernel_maps._UpstreamPeer, "upstream_peer", sources)
    abi.check_packed_struct(events._FIELDS, "agent.telemetry.events._FIELDS",
                            "sock_closed_event", sources)  # fmt: skip
    for c_struct, members in kernel_maps._MEMBERS_NAMED.items():
        abi.check_field_names(members, "agent.policy.kernel_maps", c_struct, sources=sources)


# ---- the real sources ------------------------------------------------------------------------


def test_the_sources_are_the_installed_bpf_package() -> None:
    assert abi.BPF_DIR == REPOSITORY / "bpf"  # this checkout: an editable install or cwd
    assert abi.SOURCES.directory == abi.BPF_DIR


def test_every_check_passes_on_the_real_sources() -> None:
    _check_everything(ProgramSources(abi.BPF_DIR))


def test_the_values_read_from_the_c() -> None:
    for name, value in abi.read_defines().items():
        assert getattr(abi, name) == value, name
    assert abi.MARK_MASK == 0xFFF and abi.AGENT_MARK & abi.MARK_MASK == abi.AGENT_MARK
    assert abi.POD_CAPTURE == 0x1
    assert (abi.POL_HAS_ALLOW, abi.POL_DRY_HAS_ALLOW, abi.POL_FALLBACK) == (0x1, 0x2, 0x4)
    assert (compiler.HAS_ALLOW, compiler.DRY_HAS_ALLOW, compiler.FALLBACK) == (0x1, 0x2, 0x4)
    assert abi.POLICY_MASK_WORDS == compiler.MASK_WORDS == 4
    assert compiler.TERMS_PER_PAGE == 256  # "256 terms per page", bpf/lib/policy.h
    assert abi.POL_MAX_PAGES == 64 and compiler.MAX_TERMS == 256 * 64
    assert abi.POL_HAS_DRY_RUN == compiler.HAS_DRY_RUN == 0x8
    assert abi.POLICY_NAME_SIZE == 128
    assert (abi.PROBE_REASON_SHIFT, abi.PROBE_POLICY_SHIFT) == (1, 8)
    assert abi.POL_LPM_SCOPE_BITS == 64  # "64 (gen, wid) + the address prefix"


def test_maps_are_read_from_their_declarations() -> None:
    assert set(abi.MAPS) == {
        "pods", "pod_listeners", "syn_reopens", "capture_exclude_ports", "verdicts",
        "pol_config", "pol_workloads", "pol_pages", "pol_identities", "pol_src_ips",
        "pol_dst_ips", "pol_ports", "pol_terms",
        "policy_stats", "upstream_peers", "policy_names", "sock_conns", "telemetry_events",
        "telemetry_stats",
    }  # fmt: skip
    assert len(abi.MAPS) == len(set(abi.MAPS))
    assert set(abi.FILL_MAPS) <= set(abi.MAPS)
    assert set(kernel_maps._GENERATION_MAPS) == {
        "pol_workloads", "pol_pages", "pol_identities", "pol_src_ips", "pol_dst_ips",
        "pol_ports", "pol_terms",
    }  # fmt: skip


def test_every_map_the_python_names_is_declared() -> None:
    """Map names spelt out as strings (table("..."), map_fd("..."), pin paths) anywhere in the
    agent and its tools."""
    used = r'\.table\("(\w+)"\)|map_fd\("(\w+)"\)|"maps" / "(\w+)"'
    named: dict[str, set[str]] = {}
    for package in ("agent", "cni", "lab", "bench"):
        for path in (REPOSITORY / package).rglob("*.py"):
            for found in re.finditer(used, path.read_text()):
                name = next(group for group in found.groups() if group)
                named.setdefault(name, set()).add(str(path.relative_to(REPOSITORY)))
    assert named, "the pattern no longer finds the map names: update this test"
    assert {name: where for name, where in named.items() if name not in abi.MAPS} == {}


def test_the_probe_result_decodes_as_the_c_encodes_it() -> None:
    for reason in PolicyReason:
        for allow in (0, 1):
            for policy in (0, 1, 4242, (1 << (32 - abi.PROBE_POLICY_SHIFT)) - 1):
                # policy_probe.c: d.allow | (d.reason << PROBE_REASON_SHIFT) | (d.policy << ...)
                result = (
                    allow | (reason << abi.PROBE_REASON_SHIFT) | (policy << abi.PROBE_POLICY_SHIFT)
                )
                assert kernel_maps.decode_probe_result(result) == (bool(allow), reason, policy)


def test_policy_reasons_keep_the_names_metrics_and_ambientctl_show() -> None:
    assert {reason: reason.label for reason in PolicyReason} == {
        PolicyReason.NO_POLICY: "no-policy",
        PolicyReason.ALLOWED: "allowed-by-policy",
        PolicyReason.DENIED: "denied-by-policy",
        PolicyReason.DEFAULT_DENY: "default-deny",
        PolicyReason.DRY_RUN_WOULD_DENY: "dry-run-would-deny",
        PolicyReason.FALLBACK: "fallback",
    }
    # The reference semantics name the decisions the same way (dry-run is a side note there).
    assert {r.label for r in PolicyReason} - {"dry-run-would-deny"} == {r.value for r in Reason}
    assert PolicyReason.label_of(2) == "denied-by-policy"
    assert PolicyReason.label_of(99) == "99"  # pins of another agent version


# ---- values read from the C follow it ---------------------------------------------------------


def test_read_values_follow_the_c(altered: Alter) -> None:
    altered("lib/policy.h", "#define POLICY_MASK_WORDS 4", "#define POLICY_MASK_WORDS 8")
    altered("lib/maps.h", "#define POD_CAPTURE 0x1", "#define POD_CAPTURE 0x10u")
    sources = altered("sock_telemetry.c", "sock_conns, 65536);", "sock_conns, 65536);\n"
                      "BPF_HASH(extra_map, struct pol_term_key, __u32, 16);")  # fmt: skip
    assert sources.define("POLICY_MASK_WORDS") == 8
    assert sources.define("POD_CAPTURE") == 0x10
    assert "extra_map" in sources.maps()
    assert "extra_map" in abi.maps_keyed_by("gen", sources)  # its key carries a generation
    abi.check_sources(sources)  # policy_mask is still __u64 w[POLICY_MASK_WORDS]


def test_a_key_without_a_generation_leaves_the_generation_maps(altered: Alter) -> None:
    sources = altered("lib/policy.h", "struct pol_port_key {\n    __u32 gen;",
                      "struct pol_port_key {\n    __u32 version;")  # fmt: skip
    assert "pol_ports" not in abi.maps_keyed_by("gen", sources)


# ---- every check fails, naming both sides, when the C differs ---------------------------------

MISMATCHES = {
    "policy reason renamed": (
        "lib/policy.h", "POLICY_DEFAULT_DENY = 3,", "POLICY_DEFAULT_DENIED = 3,",
        r"agent\.datapath\.abi\.PolicyReason does not match enum policy_reason in .*lib/policy\.h",
    ),
    "verdict reason renamed": (
        "lib/reasons.h", "DROP_POLICY_DENIED = 15,", "DROP_DENIED_BY_POLICY = 15,",
        r"agent\.datapath\.abi\.VerdictReason does not match enum verdict_reason in "
        r".*lib/reasons\.h",
    ),
    "telemetry stat renamed": (
        "sock_telemetry.c", "TELEMETRY_TABLE_FULL = 2,", "TELEMETRY_CONNS_FULL = 2,",
        r"agent\.datapath\.abi\.TelemetryStat does not match enum telemetry_stat in "
        r".*sock_telemetry\.c",
    ),
    "count member off": (
        "lib/policy.h", "POLICY_REASON_MAX = 6,", "POLICY_REASON_MAX = 7,",
        r"lib/policy\.h: enum policy_reason: POLICY_REASON_MAX = 7 does not count its members",
    ),
    "program renamed": (
        "policy_probe.c", "int policy_probe(struct __sk_buff *skb)",
        "int policy_check(struct __sk_buff *skb)",
        r"agent\.datapath\.abi\.PROGRAM_CONTEXTS does not match the programs in .*: "
        r".*'policy_check'",
    ),
    "program context changed": (
        "sock_telemetry.c", "int sock_telemetry(struct bpf_sock_ops *skops)",
        "int sock_telemetry(struct __sk_buff *skops)",
        r"agent\.datapath\.abi\.PROGRAM_CONTEXTS does not match the programs in",
    ),
    "reported map renamed": (
        "sock_telemetry.c", "struct sock_conn, sock_conns, 65536", "struct sock_conn, conns, 65536",
        r"agent\.datapath\.abi\.FILL_MAPS names maps the C sources under .* do not declare: "
        r"\['sock_conns'\]",
    ),
    "mask words narrowed": (
        "lib/policy.h", "__u64 w[POLICY_MASK_WORDS];", "__u32 w[POLICY_MASK_WORDS];",
        r"agent\.policy\.compiler \(64-bit mask words in w\) does not match struct policy_mask "
        r"in .*lib/policy\.h",
    ),
    "probe reason bits too few": (
        "policy_probe.c", "#define PROBE_POLICY_SHIFT 8", "#define PROBE_POLICY_SHIFT 3",
        r"enum policy_reason goes to 5, past the 2 bits policy_probe gives the reason",
    ),
    "upstream peer reordered": (
        "lib/maps.h",
        "__u32 identity; /* the verified peer's identity number */\n    __u32 src_addr;",
        "__u32 src_addr; /* swapped */\n    __u32 identity;",
        r"agent\.policy\.kernel_maps\._UpstreamPeer does not match struct upstream_peer in "
        r".*lib/maps\.h",
    ),
    "upstream peer widened": (
        "lib/maps.h", "__u32 reason;   /* written back", "__u64 reason;   /* written back",
        r"agent\.policy\.kernel_maps\._UpstreamPeer does not match struct upstream_peer",
    ),
    "telemetry record widened": (
        "sock_telemetry.c", "__u32 srtt_us; ", "__u64 srtt_us; ",
        r"agent\.telemetry\.events\._FIELDS does not match struct sock_closed_event in "
        r".*sock_telemetry\.c",
    ),
    "telemetry record with a hole": (
        "sock_telemetry.c", "__u8 passive;\n    __u8 reserved[3];", "__u8 passive;",
        r"agent\.telemetry\.events\._FIELDS does not match struct sock_closed_event",
    ),
    "workload mask renamed": (
        "lib/policy.h", "struct policy_mask dry_allow;", "struct policy_mask dry_permit;",
        r"agent\.policy\.kernel_maps does not match struct pol_workload in .*lib/policy\.h: "
        r"member 7: Python has 'dry_allow', C has 'dry_permit'",
    ),
    "key member renamed": (
        "lib/policy.h", "__u32 term;\n", "__u32 index;\n",
        r"agent\.policy\.kernel_maps does not match struct pol_term_key",
    ),
    "policy name member renamed": (
        "lib/maps.h", "char name[POLICY_NAME_SIZE];", "char text[POLICY_NAME_SIZE];",
        r"agent\.policy\.kernel_maps does not match struct policy_name",
    ),
    "lpm key reordered": (
        "lib/policy.h", "__u32 prefixlen; /* 64", "__u32 gen0; __u32 prefixlen; /* 64",
        r"struct pol_lpm_key in .*lib/policy\.h must run from prefixlen to addr",
    ),
    "flag gone": (
        "lib/maps.h", "#define POD_CAPTURE 0x1", "#define POD_CAPTURED 0x1",
        r"no #define POD_CAPTURE in the C sources under",
    ),
    "flag no longer a number": (
        "lib/maps.h", "#define POD_CAPTURE 0x1", "#define POD_CAPTURE (1 << 0)",
        r"lib/maps\.h: #define POD_CAPTURE: '\(1 << 0\)' is not a plain integer",
    ),
    "map macro unknown": (
        "sock_telemetry.c", "BPF_RINGBUF_OUTPUT(telemetry_events, 256);",
        "BPF_PERF_OUTPUT(telemetry_events);",
        r"sock_telemetry\.c: BPF_PERF_OUTPUT\(\.\.\.\) declares a map agent/datapath/abi\.py "
        r"cannot read",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", MISMATCHES.values(), ids=MISMATCHES.keys())
def test_each_check_fails_naming_both_sides(
    altered: Alter, case: tuple[str, str, str, str]
) -> None:
    relative, old, new, message = case
    sources = altered(relative, old, new)
    with pytest.raises(RuntimeError, match=message):
        _check_everything(sources)


def test_a_mismatch_says_what_each_side_has(altered: Alter) -> None:
    sources = altered("lib/policy.h", "POLICY_FALLBACK = 5,", "POLICY_FALLBACK = 5, POLICY_X = 6,")
    sources = altered("lib/policy.h", "POLICY_REASON_MAX = 6,", "POLICY_REASON_MAX = 7,")
    with pytest.raises(SourceMismatch) as caught:
        abi.check_enum(PolicyReason, "policy_reason", "POLICY_", sources)
    python_side, c_side = str(caught.value).split("Python has ")[1].split(", C has ")
    assert "POLICY_X" not in python_side and "'POLICY_X': 6" in c_side


def test_a_program_file_the_python_does_not_know_fails(altered: Alter, tmp_path: Path) -> None:
    (tmp_path / "bpf" / "extra.c").write_text("/* a new program file */\n")
    with pytest.raises(SourceMismatch, match=r"PROGRAM_FILES does not match the program files"):
        abi.check_programs(ProgramSources(tmp_path / "bpf"))


def test_the_real_read_enum_still_reads_one_file() -> None:
    assert read_enum(abi.BPF_DIR / "lib" / "policy.h", "policy_reason") == {
        "POLICY_" + reason.name: reason.value for reason in PolicyReason
    }
