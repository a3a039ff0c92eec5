"""Reading the programs' C sources: enums, #defines, struct members and layouts, the maps
they declare and the programs they define. agent/datapath/abi.py takes the kernel's numbers
and names from here, and checks what Python mirrors against it.

A parser of the small C subset bpf/ writes, not of C: it reads what it knows and raises,
naming the file, on anything else, so a header it cannot read stops the agent instead of
passing unchecked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
# Sizes of the scalar types the shared structs use; BPF lays structs out with natural
# alignment, as x86-64 does.
_SCALAR_SIZES = {
    "__u8": 1, "__s8": 1, "char": 1, "__u16": 2, "__s16": 2,
    "__u32": 4, "__s32": 4, "int": 4, "__u64": 8, "__s64": 8,
}  # fmt: skip


def _without_comments(text: str) -> str:
    return _COMMENT.sub(" ", text)


def _c_integer(literal: str, where: str) -> int:
    digits = literal.strip().rstrip("uUlL")
    try:
        return int(digits, 16) if digits.lower().startswith("0x") else int(digits, 10)
    except ValueError:
        raise RuntimeError(f"{where}: {literal.strip()!r} is not a plain integer") from None


def _enum_members(text: str, name: str, where: Path) -> dict[str, int] | None:
    """The members of `enum <name>` in text (None when it is not there), without the *_MAX
    member, which must count the others."""
    body = re.search(rf"\benum\s+{name}\s*\{{(.*?)\}}\s*;", text, re.S)
    if body is None:
        return None
    members: dict[str, int] = {}
    next_value = 0
    for item in body[1].split(","):
        if not item.strip():
            continue
        member = re.fullmatch(r"\s*(\w+)\s*(?:=\s*(\w+)\s*)?", item)
        if member is None:
            raise RuntimeError(f"{where}: enum {name}: cannot read {item.strip()!r}")
        value = next_value if member[2] is None else _c_integer(member[2], f"{where}: enum {name}")
        members[member[1]] = value
        next_value = value + 1
    values = {k: v for k, v in members.items() if not k.endswith("_MAX")}
    for count_name, count in members.items():
        if count_name.endswith("_MAX") and count != max(values.values(), default=-1) + 1:
            raise RuntimeError(
                f"{where}: enum {name}: {count_name} = {count} does not count its members {values}"
            )
    return values


def read_enum(source: Path, name: str) -> dict[str, int]:
    """The members of C `enum <name>` in source, without its *_MAX member."""
    members = _enum_members(_without_comments(source.read_text()), name, source)
    if members is None:
        raise RuntimeError(f"{source}: no enum {name}")
    return members


@dataclass(frozen=True, slots=True)
class CField:
    """A member of a C struct, `type name[count]` (count 1 for a scalar)."""

    type: str  # "__u32", "struct policy_mask"
    name: str
    count: int = 1


@dataclass(frozen=True, slots=True)
class FieldLayout:
    name: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class StructLayout:
    fields: tuple[FieldLayout, ...]
    size: int
    alignment: int


@dataclass(frozen=True, slots=True)
class MapDeclaration:
    name: str
    key: str | None  # the key's C type; None for a ring buffer
    value: str | None
    source: Path


def _declared_map(macro: str, args: list[str], where: Path) -> tuple[str, str | None, str | None]:
    """(name, key type, value type) of a BCC map macro; the defaults are BCC's own."""
    if macro in ("BPF_TABLE", "BPF_F_TABLE"):  # ("hash", key, value, name, size[, flags])
        return args[3], args[1], args[2]
    if macro in ("BPF_ARRAY", "BPF_PERCPU_ARRAY"):  # (name, value, size): u32 index
        return args[0], "__u32", args[1] if len(args) > 1 else "__u64"
    if macro in ("BPF_HASH", "BPF_PERCPU_HASH", "BPF_LPM_TRIE"):  # (name, key, value, size)
        return args[0], args[1] if len(args) > 1 else "__u64", args[2] if len(args) > 2 else "__u64"
    if macro == "BPF_SK_STORAGE":  # (name, value): keyed by socket fd
        return args[0], "int", args[1]
    if macro == "BPF_RINGBUF_OUTPUT":  # (name, pages)
        return args[0], None, None
    raise RuntimeError(
        f"{where}: {macro}(...) declares a map agent/datapath/abi.py cannot read: "
        "teach it _declared_map"
    )


class ProgramSources:
    """The programs' C sources (the *.c and lib/*.h of a directory), read once without their
    comments and searched by what they define."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        paths = [*sorted(directory.glob("lib/*.h")), *sorted(directory.glob("*.c"))]
        self.texts = {path: _without_comments(path.read_text()) for path in paths}

    def _defining(
        self, pattern: str, what: str, flags: re.RegexFlag = re.S
    ) -> tuple[Path, re.Match[str]]:
        found = [(p, m) for p, text in self.texts.items() if (m := re.search(pattern, text, flags))]
        if not found:
            raise RuntimeError(f"no {what} in the C sources under {self.directory}")
        if len(found) > 1:
            raise RuntimeError(f"{what} is defined in {', '.join(str(p) for p, _ in found)}")
        return found[0]

    def enum(self, name: str) -> tuple[Path, dict[str, int]]:
        """Where `enum <name>` is and its members, *_MAX left out."""
        path, _ = self._defining(rf"\benum\s+{name}\s*\{{", f"enum {name}")
        members = _enum_members(self.texts[path], name, path)
        assert members is not None
        return path, members

    def define(self, name: str) -> int:
        """The value of `#define <name> <integer>`."""
        pattern = rf"^[ \t]*#[ \t]*define[ \t]+{name}\b([^\n]*)"
        path, found = self._defining(pattern, f"#define {name}", re.M)
        return _c_integer(found[1], f"{path}: #define {name}")

    def struct(self, name: str) -> tuple[Path, tuple[CField, ...]]:
        """Where `struct <name>` is defined and its members, in order."""
        path, body = self._defining(rf"\bstruct\s+{name}\s*\{{(.*?)\}}\s*;", f"struct {name}")
        fields = []
        for declaration in body[1].split(";"):
            if not declaration.strip():
                continue
            member = re.fullmatch(
                r"\s*((?:struct\s+)?\w+)\s+(\w+)\s*(?:\[\s*(\w+)\s*\])?\s*", declaration
            )
            if member is None:
                raise RuntimeError(f"{path}: struct {name}: cannot read {declaration.strip()!r}")
            count = member[3]
            if count is None:
                length = 1
            elif count[0].isdigit():
                length = _c_integer(count, f"{path}: struct {name}")
            else:
                length = self.define(count)
            fields.append(CField(" ".join(member[1].split()), member[2], length))
        return path, tuple(fields)

    def layout(self, name: str) -> StructLayout:
        """struct <name> as the BPF target lays it out: each member at its natural alignment."""
        _, members = self.struct(name)
        fields: list[FieldLayout] = []
        offset, alignment = 0, 1
        for member in members:
            size, member_alignment = self._size_of(member.type)
            offset = -(-offset // member_alignment) * member_alignment
            fields.append(FieldLayout(member.name, offset, size * member.count))
            offset += size * member.count
            alignment = max(alignment, member_alignment)
        return StructLayout(tuple(fields), -(-offset // alignment) * alignment, alignment)

    def _size_of(self, c_type: str) -> tuple[int, int]:
        if c_type in _SCALAR_SIZES:
            return _SCALAR_SIZES[c_type], _SCALAR_SIZES[c_type]
        if c_type.startswith("struct "):
            nested = self.layout(c_type.removeprefix("struct "))
            return nested.size, nested.alignment
        raise RuntimeError(f"agent/datapath/abi.py cannot size the C type {c_type!r}")

    def maps(self) -> dict[str, MapDeclaration]:
        """Every map the sources declare, by name, headers first."""
        declared: dict[str, MapDeclaration] = {}
        for path, text in self.texts.items():
            for found in re.finditer(r"^[ \t]*(BPF_[A-Z_]+)\s*\(([^()]*)\)\s*;", text, re.M):
                args = [" ".join(arg.split()) for arg in found[2].split(",")]
                name, key, value = _declared_map(found[1], args, path)
                if name in declared:
                    raise RuntimeError(
                        f"map {name} is declared in {declared[name].source} and in {path}"
                    )
                declared[name] = MapDeclaration(name, key, value, path)
        return declared

    def programs(self) -> dict[str, str]:
        """Program name -> its context struct: the functions that are not static, which is
        what BCC can load by name."""
        found: dict[str, str] = {}
        for text in self.texts.values():
            for program in re.finditer(r"^int\s+(\w+)\s*\(\s*struct\s+(\w+)\s*\*", text, re.M):
                found[program[1]] = program[2]
        return found


class SourceMismatch(RuntimeError):
    """Python and the C sources disagree; the message names both sides and what differs."""

    def __init__(self, python_side: str, c_side: str, where: Path, python: object, c: object):
        super().__init__(
            f"{python_side} does not match {c_side} in {where}: {_difference(python, c)}"
        )


def _difference(python: object, c: object) -> str:
    """What each side has that the other has not: entries of mappings and sets, the first
    differing member of sequences."""
    if isinstance(python, dict) and isinstance(c, dict):
        python_only = {k: v for k, v in python.items() if k not in c or c[k] != v}
        c_only = {k: v for k, v in c.items() if k not in python or python[k] != v}
        return f"Python has {python_only}, C has {c_only}"
    if isinstance(python, set) and isinstance(c, set):
        return f"Python has {sorted(python - c)}, C has {sorted(c - python)}"
    if isinstance(python, tuple | list) and isinstance(c, tuple | list):
        for position, (python_member, c_member) in enumerate(zip(python, c, strict=False)):
            if python_member != c_member:
                return f"member {position}: Python has {python_member!r}, C has {c_member!r}"
        return f"Python has {len(python)} members {python}, C has {len(c)} {c}"
    return f"Python has {python}, C has {c}"
