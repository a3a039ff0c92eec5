"""BPF maps, programs and pins reached through the kernel's object fds (libbpf), not through
BCC's compiled module: the same code reads the maps an agent compiled a moment ago and the
maps an earlier agent pinned, which a restarting agent adopts without compiling anything.

A map's key and value types are ctypes built from BCC's type descriptions (JSON), which the
loader records next to the pins so an adopting agent can rebuild them.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

# uapi/linux/bpf.h enum bpf_map_type, the members this agent meets.
MAP_ARRAY = 2
MAP_PERCPU_HASH = 5
MAP_PERCPU_ARRAY = 6
MAP_LRU_PERCPU_HASH = 10
MAP_SOCKHASH = 18
MAP_SK_STORAGE = 24
MAP_RINGBUF = 27
PER_CPU_TYPES = (MAP_PERCPU_HASH, MAP_PERCPU_ARRAY, MAP_LRU_PERCPU_HASH)
ARRAY_TYPES = (MAP_ARRAY, MAP_PERCPU_ARRAY)
# Their entries belong to sockets or are a stream: nothing to read back or carry over.
NOT_ITERABLE_TYPES = (MAP_SOCKHASH, MAP_SK_STORAGE, MAP_RINGBUF)

BPF_ANY = 0


class MapError(Exception):
    """A map or pin operation the kernel refused; the message names the object and errno."""


@cache
def _libbpf() -> ctypes.CDLL:
    """Debian's libbpf1, which python3-bpfcc's libbcc is linked against."""
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    c_int, c_uint, c_void_p, c_char_p = (
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.c_void_p,
        ctypes.c_char_p,
    )
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "bpf_obj_get": (c_int, [c_char_p]),
        "bpf_obj_pin": (c_int, [c_int, c_char_p]),
        "bpf_obj_get_info_by_fd": (c_int, [c_int, c_void_p, ctypes.POINTER(ctypes.c_uint32)]),
        "bpf_map_lookup_elem": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_map_update_elem": (c_int, [c_int, c_void_p, c_void_p, ctypes.c_uint64]),
        "bpf_map_delete_elem": (c_int, [c_int, c_void_p]),
        "bpf_map_get_next_key": (c_int, [c_int, c_void_p, c_void_p]),
        "bpf_prog_attach": (c_int, [c_int, c_int, c_int, c_uint]),
        "bpf_prog_detach2": (c_int, [c_int, c_int, c_int]),
        "bpf_link_create": (c_int, [c_int, c_int, c_int, c_void_p]),
        "ring_buffer__new": (c_void_p, [c_int, RING_CALLBACK, c_void_p, c_void_p]),
        "ring_buffer__consume": (c_int, [c_void_p]),
        "ring_buffer__epoll_fd": (c_int, [c_void_p]),
        "ring_buffer__free": (None, [c_void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


RING_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


def _check(result: int, what: str) -> int:
    if result < 0:
        errno = -result if result != -1 else ctypes.get_errno()
        raise MapError(f"{what}: {os.strerror(errno)} (errno {errno})")
    return result


def obj_get(path: Path) -> int:
    """An fd for the object pinned at path."""
    return _check(_libbpf().bpf_obj_get(str(path).encode()), f"opening pin {path}")


def obj_pin(fd: int, path: Path) -> None:
    _check(_libbpf().bpf_obj_pin(fd, str(path).encode()), f"pinning at {path}")


class _MapInfo(ctypes.Structure):
    """The head of struct bpf_map_info (uapi/linux/bpf.h); the kernel fills what fits."""

    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32), ("name", ctypes.c_char * 16),
    ]  # fmt: skip


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info."""

    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8)]


def _info(fd: int, info: ctypes.Structure) -> None:
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(_libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)),
           "reading object info")  # fmt: skip


def map_id(fd: int) -> int:
    info = _MapInfo()
    _info(fd, info)
    return int(info.id)


def prog_id(fd: int) -> int:
    info = _ProgInfo()
    _info(fd, info)
    return int(info.id)


@dataclass(frozen=True)
class MapLayout:
    """What a map is, as far as reading and writing its entries depends on: the kernel's
    type, sizes and flags, and BCC's descriptions of the key and value types."""

    type: int
    key_size: int
    value_size: int
    max_entries: int
    flags: int
    key: Any  # BCC's JSON description
    leaf: Any

    @classmethod
    def of(cls, fd: int, key: Any, leaf: Any) -> MapLayout:
        info = _MapInfo()
        _info(fd, info)
        return cls(int(info.type), int(info.key_size), int(info.value_size),
                   int(info.max_entries), int(info.map_flags), key, leaf)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MapLayout:
        return cls(**data)


@cache
def possible_cpus() -> int:
    """Per-CPU map values hold one slot per possible CPU (not only the online ones)."""
    count = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


# BCC's names of C scalar types in its type descriptions.
_SCALARS: dict[str, Any] = {
    "_Bool": ctypes.c_bool, "char": ctypes.c_char, "wchar_t": ctypes.c_wchar,
    "unsigned char": ctypes.c_ubyte, "short": ctypes.c_short,
    "unsigned short": ctypes.c_ushort, "int": ctypes.c_int, "unsigned int": ctypes.c_uint,
    "long": ctypes.c_long, "unsigned long": ctypes.c_ulong, "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong, "float": ctypes.c_float,
    "double": ctypes.c_double, "long double": ctypes.c_longdouble,
    "__int128": ctypes.c_int64 * 2, "unsigned __int128": ctypes.c_uint64 * 2,
}  # fmt: skip


def _ctype(desc: Any) -> Any:
    """The ctype of a BCC type description (the JSON its compiler gives per map key and
    value): a scalar's name, or [name, [fields], "struct" | "struct_packed" | "union"], each
    field [name, type] or [name, type, [length]] (an array) or [name, type, bits]. Decoded
    here rather than by BCC's Python module, which would load libbcc, and LLVM with it, into
    a process that never compiles."""
    if isinstance(desc, str):
        return _SCALARS[desc]
    anonymous: list[str] = []
    fields: list[tuple[Any, ...]] = []
    for member in desc[1]:
        name, kind = member[0], member[1]
        extra = member[2] if len(member) == 3 else None
        if extra is None:
            fields.append((name, _ctype(kind)))
        elif isinstance(extra, list):
            fields.append((name, _ctype(kind) * extra[0]))
        elif isinstance(extra, int):
            fields.append((name, _ctype(kind), extra))
        elif extra in ("struct", "struct_packed", "union"):
            if name == "":
                name = f"__anon{len(anonymous)}"
                anonymous.append(name)
            fields.append((name, _ctype(member)))
        else:
            raise MapError(f"cannot decode the type description {member!r}")
    kind = desc[2] if len(desc) > 2 else "struct"
    base = ctypes.Union if kind == "union" else ctypes.Structure
    namespace: dict[str, Any] = {"_anonymous_": anonymous, "_fields_": fields}
    if kind == "struct_packed":
        namespace["_pack_"] = 1
    return type(str(desc[0]), (base,), namespace)


def update(fd: int, key: Any, value: Any, what: str) -> None:
    """Write one entry of the map behind fd (ctypes key and value)."""
    result = _libbpf().bpf_map_update_elem(fd, ctypes.byref(key), ctypes.byref(value), BPF_ANY)
    _check(result, what)


def lookup(fd: int, key: Any, value: Any) -> bool:
    """Read one entry into `value`; False when there is none."""
    return bool(_libbpf().bpf_map_lookup_elem(fd, ctypes.byref(key), ctypes.byref(value)) >= 0)


class KernelMap:
    """One map through its fd, used like BCC's tables: `Key`, `Leaf`, item access, iteration
    over keys, `items()`, `len()`, `clear()`, `max_entries`. A per-CPU map's value is an
    array with one value per possible CPU."""

    def __init__(self, name: str, fd: int, layout: MapLayout) -> None:
        self.name = name
        self.fd = fd
        self.layout = layout
        self.max_entries = layout.max_entries
        self.Key: Any = _ctype(layout.key)
        leaf: Any = _ctype(layout.leaf)
        if layout.type in PER_CPU_TYPES:
            if ctypes.sizeof(leaf) % 8:
                raise MapError(f"map {name}: per-CPU values must be 8-byte multiples")
            leaf = leaf * possible_cpus()
        self.Leaf: Any = leaf

    def _lookup(self, key: Any) -> Any | None:
        value = self.Leaf()
        return value if lookup(self.fd, key, value) else None

    def __getitem__(self, key: Any) -> Any:
        value = self._lookup(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: Any, default: Any = None) -> Any:
        value = self._lookup(key)
        return default if value is None else value

    def __setitem__(self, key: Any, value: Any) -> None:
        update(self.fd, key, value, f"writing to map {self.name}")

    def __delitem__(self, key: Any) -> None:
        if self.layout.type in ARRAY_TYPES:
            self[key] = self.Leaf()  # array entries cannot go: zero them
            return
        if _libbpf().bpf_map_delete_elem(self.fd, ctypes.byref(key)) < 0:
            raise KeyError(key)

    def __iter__(self) -> Iterator[Any]:
        if self.layout.type in NOT_ITERABLE_TYPES:
            raise MapError(f"map {self.name} cannot be iterated")
        lib = _libbpf()
        key: Any = None
        while True:
            following = self.Key()
            previous = None if key is None else ctypes.byref(key)
            if lib.bpf_map_get_next_key(self.fd, previous, ctypes.byref(following)) < 0:
                return
            yield following
            key = following

    def items(self) -> Iterator[tuple[Any, Any]]:
        for key in list(self):
            value = self._lookup(key)
            if value is not None:
                yield key, value

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def clear(self) -> None:
        for key in list(self):
            del self[key]

    def copy_from(self, other: KernelMap) -> int:
        """Copy every entry of `other`, a map of the same layout; returns how many."""
        copied = 0
        for key, value in other.items():
            self[key] = value
            copied += 1
        return copied


class RingBuffer:
    """A BPF ring buffer map read through libbpf: `epoll_fd` becomes readable when records
    wait; `consume()` hands each waiting record, as bytes, to on_record."""

    def __init__(self, fd: int, on_record: Callable[[bytes], None]) -> None:
        def callback(_ctx: object, data: int, size: int) -> int:
            on_record(ctypes.string_at(data, size))
            return 0

        self._callback = RING_CALLBACK(callback)  # kept: libbpf calls it later
        self._ring = _libbpf().ring_buffer__new(fd, self._callback, None, None)
        if not self._ring:
            raise MapError(f"cannot open the ring buffer: errno {ctypes.get_errno()}")
        self.epoll_fd = _check(_libbpf().ring_buffer__epoll_fd(self._ring), "ring buffer epoll")

    def consume(self) -> None:
        if self._ring:
            _libbpf().ring_buffer__consume(self._ring)

    def close(self) -> None:
        if self._ring:
            _libbpf().ring_buffer__free(self._ring)
            self._ring = None


def prog_attach(prog_fd: int, target_fd: int, attach_type: int, flags: int) -> None:
    _check(_libbpf().bpf_prog_attach(prog_fd, target_fd, attach_type, flags), "attaching")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    _check(_libbpf().bpf_prog_detach2(prog_fd, target_fd, attach_type), "detaching")


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """A bpf_link attaching the program to the target; the returned fd holds it attached."""
    return _check(_libbpf().bpf_link_create(prog_fd, target_fd, attach_type, None),
                  "creating a link")  # fmt: skip
