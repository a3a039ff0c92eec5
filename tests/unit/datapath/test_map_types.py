"""maps._ctype decodes BCC's type descriptions of map keys and values itself (so the agent
never imports bcc): it must build the very layout BCC's own decoder builds."""

from __future__ import annotations

import ctypes
from typing import Any

import pytest

from agent.datapath import maps

bcc = pytest.importorskip("bcc", reason="BCC's decoder is the reference (python3-bpfcc)")

DESCRIPTIONS: list[Any] = [
    "unsigned int",
    ["pod_key", [["addr", "unsigned int"]], "struct"],
    ["pod_info", [["flags", "unsigned int"], ["reserved", "unsigned int"],
                  ["outbound_captured", "unsigned long long"],
                  ["inbound_captured", "unsigned long long"]], "struct"],
    ["listener_key", [["addr", "unsigned int"], ["port", "unsigned int"]], "struct_packed"],
    ["policy_name", [["name", "char", [128]]], "struct"],
    ["masks", [["words", "unsigned long long", [4]], ["gen", "unsigned short"]], "struct"],
    ["bits", [["a", "unsigned int", 3], ["b", "unsigned int", 29]], "struct"],
    ["tagged", [["kind", "unsigned char"],
                ["", [["v4", "unsigned int"], ["raw", "unsigned char", [16]]], "union"]],
     "struct"],
]  # fmt: skip


def _layout(kind: Any) -> tuple[int, int, list[tuple[str, int, int]]]:
    fields = [
        (name, getattr(kind, name).offset, getattr(kind, name).size)
        for name, *_ in getattr(kind, "_fields_", [])
    ]
    return ctypes.sizeof(kind), ctypes.alignment(kind), fields


@pytest.mark.parametrize(
    "description", DESCRIPTIONS, ids=lambda d: d if isinstance(d, str) else d[0]
)
def test_the_layout_is_bccs(description: Any) -> None:
    ours, theirs = maps._ctype(description), bcc.BPF._decode_table_type(description)
    assert _layout(ours) == _layout(theirs)


def test_an_unknown_description_is_named() -> None:
    with pytest.raises(maps.MapError, match="cannot decode"):
        maps._ctype(["odd", [["x", "int", "enum"]], "struct"])
