"""Load the eBPF programs (compiled with BCC, or adopted from an earlier agent's pins) and
pin programs and maps.

Pins live under `<pin_dir>/progs/<program>` and `<pin_dir>/maps/<map>`, with BTF, so
`bpftool map dump pinned <pin_dir>/maps/pods` prints keys and values field by field.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.datapath import abi, maps

log = structlog.get_logger("agent.datapath")

# Helpers the programs call, with the first kernel that offers each to tc programs.
HELPER_MIN_KERNEL = {
    "bpf_skc_lookup_tcp": "5.2",
    "bpf_sk_release": "4.20",
    "bpf_sk_assign": "5.7",
    "bpf_skb_change_type": "4.8",
    "bpf_redirect": "4.4",
    "bpf_skb_load_bytes": "4.5",
    "bpf_sock_ops_cb_flags_set": "4.16",
    "bpf_ringbuf_output": "5.8",
}
# sk_lookup programs (pod_lookup) and the bpf_link that attaches them to a netns: Linux 5.9.
PROG_TYPE_SK_LOOKUP = 30  # uapi/linux/bpf.h enum bpf_prog_type; BCC 0.26 does not name it


BPF_F_ALLOW_MULTI = 2


class DatapathError(Exception):
    """The kernel side cannot start. The message says what is missing and how to fix it."""


def render_source(
    programs: tuple[str, ...] = abi.PROGRAM_FILES, bpf_dir: Path = abi.BPF_DIR
) -> str:
    """The programs as one text, with our own `#include "lib/..."` headers inlined once.

    One text, so the programs share one set of maps. BCC rewrites map calls
    (`pods.lookup(...)`) only in the text it is handed, not in included files, hence the
    inlining; system headers stay includes.
    """
    seen: set[Path] = set()

    def expand(path: Path) -> str:
        lines = []
        for line in path.read_text().splitlines():
            include = re.match(r'\s*#include\s+"([^"]+)"', line)
            if include:
                target = (path.parent / include[1]).resolve()
                if target not in seen:
                    seen.add(target)
                    lines.append(f"/* ---- {target.relative_to(bpf_dir)} ---- */")
                    lines.append(expand(target))
                continue
            if line.strip() != "#pragma once":
                lines.append(line)
        return "\n".join(lines)

    return "\n".join(
        f"/* ==== {name} ==== */\n" + expand((bpf_dir / name).resolve()) for name in programs
    )


def preflight() -> None:
    """Fail early, with the fix named, on what would otherwise be an obscure BCC error."""
    if os.geteuid() != 0:
        raise DatapathError("the datapath needs root (CAP_BPF, CAP_NET_ADMIN): run as root")
    # Found, not imported: the agent adopts what a child compiles (load()), and importing
    # bcc would load libbcc and LLVM into it.
    if importlib.util.find_spec("bcc") is None:
        raise DatapathError(
            "bcc is not importable: install Debian's python3-bpfcc and run from a "
            "venv made with `/usr/bin/python3 -m venv --system-site-packages` (`make demo` "
            "does both)"
        )
    release = os.uname().release
    build = Path(f"/lib/modules/{release}/build")
    if not (build / "Makefile").exists():
        raise DatapathError(
            f"no kernel headers for {release} at {build}: BCC needs them to compile the "
            "programs. Install the kernel's headers package, or run scripts/bootstrap-host.sh "
            "which links Debian's linux-headers-amd64 there (the programs use UAPI only)"
        )
    ensure_bpffs()


def ensure_bpffs() -> None:
    if _is_bpffs(abi.BPFFS_ROOT):
        return
    abi.BPFFS_ROOT.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "bpf", "bpf", str(abi.BPFFS_ROOT)], capture_output=True)
    if mount.returncode != 0 or not _is_bpffs(abi.BPFFS_ROOT):
        raise DatapathError(f"cannot mount bpffs at {abi.BPFFS_ROOT}: `mount -t bpf bpf ...`")


def _is_bpffs(path: Path) -> bool:
    with open("/proc/self/mounts") as mounts:
        return any(
            fields[1] == str(path) and fields[2] == "bpf"
            for fields in (line.split() for line in mounts)
        )


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """libbcc prints compiler and verifier messages on fd 2; keep them for our error."""
    captured: list[str] = []
    with tempfile.TemporaryFile(mode="w+") as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read())


def _explain(log: str, what: str) -> DatapathError:
    missing = re.search(r"unknown func (\w+)#\d+", log) or re.search(
        r"invalid func unknown#(\d+)", log
    )
    if missing:
        helper = missing[1]
        since = HELPER_MIN_KERNEL.get(helper, "a newer kernel")
        return DatapathError(
            f"kernel {os.uname().release} does not offer the BPF helper {helper} to tc "
            f"programs (needs Linux >= {since}): run the agent on a newer kernel"
        )
    if "Unable to find kernel headers" in log:
        return DatapathError("BCC found no kernel headers: run scripts/bootstrap-host.sh")
    tail = "\n".join(log.strip().splitlines()[-25:])
    return DatapathError(f"{what} failed:\n{tail}")


class NotAdoptable(DatapathError):
    """No pins of this programs' version that the record vouches for."""


def load(pin_dir: Path, layout_file: Path) -> LoadedDatapath:
    """The agent's datapath, adopted from pins; what needs compiling is compiled and pinned
    by a short-lived child process (`python -m agent.datapath.build`). Measured here, a
    compile leaves about 75 MiB behind in the process that ran it, and importing bcc about
    60 MiB more (libbcc and LLVM): in the child, both go when it exits."""
    try:
        return LoadedDatapath(pin_dir, layout_file, compile_here=False)
    except NotAdoptable:
        pass
    built = subprocess.run(
        [sys.executable, "-m", "agent.datapath.build", str(pin_dir), str(layout_file)],
        capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode != 0:
        raise DatapathError(built.stderr.strip() or f"the compiler child exited {built.returncode}")
    datapath = LoadedDatapath(pin_dir, layout_file, compile_here=False)
    # What the child did, for the agent's log: compiled for this start, not an earlier
    # agent's programs adopted.
    report = json.loads(built.stdout)
    datapath.adopted = False
    datapath.carried_over, datapath.refilled = report["carried_over"], report["refilled"]
    return datapath


class LoadedDatapath:
    """Programs and maps in the kernel, pinned under `pin_dir`.

    With a `layout_file` (the agent's), pins an earlier agent left are adopted when they are
    the very objects that file describes and the programs' source is unchanged: nothing is
    compiled, and every map, with its entries, stays as it was, so enrolled pods are never
    without capture or policy. A changed source is compiled; each map whose layout is
    unchanged gets the old map's entries, the others start empty for the agent to refill
    before it moves a pod onto the new programs. Without a layout file (benches, tests) the
    programs are always compiled afresh.
    """

    def __init__(
        self, pin_dir: Path, layout_file: Path | None = None, compile_here: bool = True
    ) -> None:
        """compile_here=False: adopt or fail (NotAdoptable), never compile in this process."""
        self.pin_dir = pin_dir
        self.layout_file = layout_file
        self.source = render_source()
        self.version = layout_version(self.source)
        self.program_fds: dict[str, int] = {}
        self.maps: dict[str, maps.KernelMap] = {}
        self.adopted = False
        # For the log: which maps kept their entries across a recompile, which start empty.
        self.carried_over: list[str] = []
        self.refilled: list[str] = []
        self._bpf: Any = None
        self._adopted_fds: list[int] = []
        self._ring: maps.RingBuffer | None = None
        earlier = PinnedLayout.read(layout_file) if layout_file is not None else None
        if earlier is not None and earlier.version == self.version and self._adopt(earlier):
            return
        if not compile_here:
            raise NotAdoptable(f"no pinned programs of this version under {pin_dir} to adopt")
        self._compile()
        try:
            self._carry_over(earlier)
            self._pin_all()
        except BaseException:
            self.close(unpin=False)
            raise

    def _adopt(self, earlier: PinnedLayout) -> bool:
        """Open the pinned objects, if each is the one `earlier` recorded (by id)."""
        try:
            for name in abi.PROGRAMS:
                fd = self._open_pin("progs", name)
                if maps.prog_id(fd) != earlier.prog_ids.get(name):
                    raise maps.MapError(f"pinned program {name} is not the recorded one")
                self.program_fds[name] = fd
            for name in abi.MAPS:
                fd = self._open_pin("maps", name)
                layout = earlier.map_layouts.get(name)
                if layout is None or maps.map_id(fd) != earlier.map_ids.get(name):
                    raise maps.MapError(f"pinned map {name} is not the recorded one")
                self.maps[name] = maps.KernelMap(name, fd, layout)
        except maps.MapError as exc:
            log.info("pinned programs not adopted", reason=str(exc))
            self._close_adopted()
            self.program_fds, self.maps = {}, {}
            return False
        self.adopted = True
        return True

    def _open_pin(self, kind: str, name: str) -> int:
        fd = maps.obj_get(self.pin_dir / kind / name)
        self._adopted_fds.append(fd)
        return fd

    def _close_adopted(self) -> None:
        for fd in self._adopted_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._adopted_fds = []

    def _compile(self) -> None:
        from bcc import BPF, BPFAttachType, libbcc

        with _stderr_captured() as log_text:
            try:
                self._bpf = BPF(text=self.source.encode(), cflags=abi.cflags())
            except Exception:
                raise _explain("".join(log_text),
                               f"compiling {', '.join(abi.PROGRAM_FILES)}") from None  # fmt: skip
        try:
            for name in abi.PROGRAMS:
                with _stderr_captured() as log_text:
                    try:
                        if name == abi.CGROUP_CONNECT4_PROGRAM:
                            fn = self._bpf.load_func(
                                name.encode(), BPF.CGROUP_SOCK_ADDR,
                                attach_type=BPFAttachType.CGROUP_INET4_CONNECT,
                            )  # fmt: skip
                        elif name == abi.POD_LOOKUP_PROGRAM:
                            fn = self._bpf.load_func(name.encode(), PROG_TYPE_SK_LOOKUP,
                                                     attach_type=ATTACH_SK_LOOKUP)  # fmt: skip
                        elif name == abi.SOCK_TELEMETRY_PROGRAM:
                            fn = self._bpf.load_func(name.encode(), BPF.SOCK_OPS)
                        else:
                            fn = self._bpf.load_func(name.encode(), BPF.SCHED_CLS)
                    except Exception:
                        raise _explain("".join(log_text), f"loading {name}") from None
                self.program_fds[name] = fn.fd
            module = self._bpf.module
            for name in abi.MAPS:
                fd = int(libbcc.lib.bpf_table_fd(module, name.encode()))
                if fd < 0:
                    raise DatapathError(f"no map {name} in the compiled programs")
                key = json.loads(libbcc.lib.bpf_table_key_desc(module, name.encode()))
                leaf = json.loads(libbcc.lib.bpf_table_leaf_desc(module, name.encode()))
                self.maps[name] = maps.KernelMap(name, fd, maps.MapLayout.of(fd, key, leaf))
        except BaseException:
            self._bpf.cleanup()
            raise

    def _carry_over(self, earlier: PinnedLayout | None) -> None:
        """Give each new map the entries of the pinned map it replaces, where the layout is
        the same and the pin is the recorded object; the rest start empty."""
        for name, new in self.maps.items():
            if new.layout.type in maps.NOT_ITERABLE_TYPES:
                continue  # per-socket or a stream: belongs to the sockets of the old agent
            old_layout = earlier.map_layouts.get(name) if earlier else None
            pin = self.pin_dir / "maps" / name
            if old_layout != new.layout or not pin.exists():
                self.refilled.append(name)
                continue
            assert earlier is not None
            fd = maps.obj_get(pin)
            try:
                if maps.map_id(fd) != earlier.map_ids.get(name):
                    self.refilled.append(name)
                    continue
                new.copy_from(maps.KernelMap(name, fd, old_layout))
                self.carried_over.append(name)
            finally:
                os.close(fd)

    def table(self, name: str) -> maps.KernelMap:
        return self.maps[name]

    def attach_cgroup(self, cgroup_fd: int) -> None:
        """agent_connect4 and sock_telemetry on the agent's own cgroup."""
        attached: list[str] = []
        try:
            for name, attach_type in CGROUP_PROGRAMS:
                # ALLOW_MULTI: other agents (a lab runs several) may sit on the same tree.
                maps.prog_attach(self.program_fds[name], cgroup_fd, attach_type,
                                 BPF_F_ALLOW_MULTI)  # fmt: skip
                attached.append(name)
        except maps.MapError as exc:
            self.detach_cgroup(cgroup_fd, only=attached)
            raise DatapathError(f"cannot attach the cgroup programs: {exc}") from exc

    def detach_cgroup(self, cgroup_fd: int, only: list[str] | None = None) -> None:
        for name, attach_type in CGROUP_PROGRAMS:
            if only is None or name in only:
                with contextlib.suppress(maps.MapError):
                    maps.prog_detach(self.program_fds[name], cgroup_fd, attach_type)

    def attach_netns(self, netns_path: str) -> int:
        """pod_lookup on a pod's network namespace; returns the link's fd. The program stays
        attached while the fd is open (closing it detaches), so an agent that dies takes it
        along with the listeners it chooses."""
        netns_fd = os.open(netns_path, os.O_RDONLY)
        try:
            return maps.link_create(self.program_fds[abi.POD_LOOKUP_PROGRAM], netns_fd,
                                    ATTACH_SK_LOOKUP)  # fmt: skip
        except maps.MapError as exc:
            raise DatapathError(f"cannot attach {abi.POD_LOOKUP_PROGRAM} to {netns_path}: "
                                f"{exc} (sk_lookup needs Linux >= 5.9)") from exc  # fmt: skip
        finally:
            os.close(netns_fd)

    def open_telemetry_ring(self, on_event: Callable[[bytes], None]) -> int:
        """Deliver each telemetry_events record, as bytes, to on_event during consume_rings.
        Returns an epoll fd that is readable when records are waiting (for an event loop)."""
        try:
            self._ring = maps.RingBuffer(self.map_fd("telemetry_events"), on_event)
        except maps.MapError as exc:
            raise DatapathError(str(exc)) from exc
        return self._ring.epoll_fd

    def consume_rings(self) -> None:
        """Hand every waiting ring-buffer record to its callback, without blocking."""
        if self._ring is not None:
            self._ring.consume()

    def map_fd(self, name: str) -> int:
        """Also for maps that have no table use (socket-local storage)."""
        if name not in self.maps:
            raise DatapathError(f"no map {name} in the loaded programs")
        return self.maps[name].fd

    def _pin_all(self) -> None:
        """Put the new objects where the old pins were, then record them. The old record is
        removed first, so an agent dying halfway leaves pins no record vouches for: they are
        never adopted."""
        if self.layout_file is not None:
            self.layout_file.unlink(missing_ok=True)
        for kind, objects in (
            ("progs", self.program_fds),
            ("maps", {name: table.fd for name, table in self.maps.items()}),
        ):
            (self.pin_dir / kind).mkdir(parents=True, exist_ok=True)
            for name, fd in objects.items():
                path = self.pin_dir / kind / name
                path.unlink(missing_ok=True)
                try:
                    maps.obj_pin(fd, path)
                except maps.MapError as exc:
                    raise DatapathError(f"cannot pin {name}: {exc}") from exc
        if self.layout_file is not None:
            PinnedLayout(
                version=self.version,
                map_layouts={name: table.layout for name, table in self.maps.items()},
                map_ids={name: maps.map_id(table.fd) for name, table in self.maps.items()},
                prog_ids={name: maps.prog_id(fd) for name, fd in self.program_fds.items()},
            ).write(self.layout_file)

    def unpin(self) -> None:
        remove_pins(self.pin_dir)
        if self.layout_file is not None:
            self.layout_file.unlink(missing_ok=True)

    def close(self, unpin: bool = True) -> None:
        """Release our fds; with unpin, also the pins, so nothing outlives the agent.
        Without, the pinned programs and maps (and the pods' tc filters using them) stay for
        the next agent to adopt."""
        if unpin:
            self.unpin()
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self._bpf is not None:
            self._bpf.cleanup()
        self._close_adopted()


# uapi/linux/bpf.h enum bpf_attach_type
ATTACH_CGROUP_SOCK_OPS = 3
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_SK_LOOKUP = 36
CGROUP_PROGRAMS = (
    (abi.CGROUP_CONNECT4_PROGRAM, ATTACH_CGROUP_INET4_CONNECT),
    (abi.SOCK_TELEMETRY_PROGRAM, ATTACH_CGROUP_SOCK_OPS),
)
LAYOUT_FORMAT = 1  # of PinnedLayout's file


def layout_version(source: str) -> str:
    """What decides whether pinned programs can be reused: their source and flags."""
    digest = hashlib.sha256(f"{LAYOUT_FORMAT}\n{abi.cflags()}\n{source}".encode())
    return digest.hexdigest()


@dataclass
class PinnedLayout:
    """The record of pinned objects: the source version, each map's layout, and the ids of
    the objects pinned, so a pin replaced behind the record's back is not trusted."""

    version: str
    map_layouts: dict[str, maps.MapLayout]
    map_ids: dict[str, int]
    prog_ids: dict[str, int]

    @classmethod
    def read(cls, path: Path) -> PinnedLayout | None:
        try:
            data = json.loads(path.read_text())
            if data.get("format") != LAYOUT_FORMAT:
                return None
            return cls(
                version=str(data["version"]),
                map_layouts={k: maps.MapLayout.from_json(v) for k, v in data["maps"].items()},
                map_ids={k: int(v) for k, v in data["map_ids"].items()},
                prog_ids={k: int(v) for k, v in data["prog_ids"].items()},
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("pin record unreadable: not adopted", file=str(path), error=str(exc))
            return None

    def write(self, path: Path) -> None:
        data = {
            "format": LAYOUT_FORMAT, "version": self.version,
            "maps": {k: v.to_json() for k, v in self.map_layouts.items()},
            "map_ids": self.map_ids, "prog_ids": self.prog_ids,
        }  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)


def remove_pins(pin_dir: Path) -> None:
    """Remove pinned objects under pin_dir and the directories left empty up to bpffs."""
    if pin_dir.exists():
        for path in sorted(pin_dir.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink()
        pin_dir.rmdir()
    parent = pin_dir.parent
    while parent != abi.BPFFS_ROOT and parent.is_relative_to(abi.BPFFS_ROOT):
        with contextlib.suppress(OSError):
            parent.rmdir()  # only succeeds when empty: other instances' pins stay
        parent = parent.parent
