"""Compile the eBPF programs with BCC once per agent start and pin programs and maps.

Pins live under `<pin_dir>/progs/<program>` and `<pin_dir>/maps/<map>`, with BTF, so
`bpftool map dump pinned <pin_dir>/maps/pods` prints keys and values field by field.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from agent.datapath import abi

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
    try:
        import bcc  # noqa: F401
    except ImportError as exc:
        raise DatapathError(
            f"bcc is not importable ({exc}): install Debian's python3-bpfcc and run from a "
            "venv made with `/usr/bin/python3 -m venv --system-site-packages` (`make demo` "
            "does both)"
        ) from exc
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


class LoadedDatapath:
    """Programs and maps loaded into the kernel and pinned under `pin_dir`."""

    def __init__(self, pin_dir: Path) -> None:
        from bcc import BPF, BPFAttachType

        self.pin_dir = pin_dir
        self.source = render_source()
        with _stderr_captured() as log:
            try:
                self._bpf = BPF(text=self.source.encode(), cflags=abi.cflags())
            except Exception:
                raise _explain("".join(log), f"compiling {', '.join(abi.PROGRAM_FILES)}") from None
        self.program_fds: dict[str, int] = {}
        self._functions: dict[str, Any] = {}
        try:
            for name in abi.PROGRAMS:
                with _stderr_captured() as log:
                    try:
                        if name == abi.CGROUP_CONNECT4_PROGRAM:
                            fn = self._bpf.load_func(
                                name.encode(), BPF.CGROUP_SOCK_ADDR,
                                attach_type=BPFAttachType.CGROUP_INET4_CONNECT,
                            )  # fmt: skip
                        elif name == abi.SOCK_TELEMETRY_PROGRAM:
                            fn = self._bpf.load_func(name.encode(), BPF.SOCK_OPS)
                        else:
                            fn = self._bpf.load_func(name.encode(), BPF.SCHED_CLS)
                    except Exception:
                        raise _explain("".join(log), f"loading {name}") from None
                self.program_fds[name] = fn.fd
                self._functions[name] = fn
            self._pin_all()
        except BaseException:
            self._bpf.cleanup()
            raise

    def table(self, name: str) -> Any:
        return self._bpf[name.encode()]

    def attach_cgroup(self, cgroup_fd: int) -> None:
        """agent_connect4 and sock_telemetry on the agent's own cgroup."""
        from bcc import BPF

        attached: list[str] = []
        try:
            for name, attach_type in _cgroup_programs():
                # ALLOW_MULTI: other agents (a lab runs several) may sit on the same tree.
                BPF.attach_func(self._functions[name], cgroup_fd, attach_type,
                                flags=BPF_F_ALLOW_MULTI)  # fmt: skip
                attached.append(name)
        except BaseException:
            self.detach_cgroup(cgroup_fd, only=attached)
            raise

    def detach_cgroup(self, cgroup_fd: int, only: list[str] | None = None) -> None:
        from bcc import BPF

        for name, attach_type in _cgroup_programs():
            if only is None or name in only:
                with contextlib.suppress(Exception):
                    BPF.detach_func(self._functions[name], cgroup_fd, attach_type)

    def open_telemetry_ring(self, on_event: Callable[[bytes], None]) -> int:
        """Deliver each telemetry_events record, as bytes, to on_event during consume_rings.
        Returns an epoll fd that is readable when records are waiting (for an event loop)."""
        import ctypes

        from bcc import libbcc

        def callback(_ctx: object, data: int, size: int) -> int:
            on_event(ctypes.string_at(data, size))
            return 0

        self.table("telemetry_events").open_ring_buffer(callback)
        epoll_fd = libbcc.lib.ring_buffer__epoll_fd
        epoll_fd.restype, epoll_fd.argtypes = ctypes.c_int, [ctypes.c_void_p]
        fd = int(epoll_fd(self._bpf._ringbuf_manager))
        if fd < 0:
            raise DatapathError("cannot get the telemetry ring buffer's epoll fd")
        return fd

    def consume_rings(self) -> None:
        """Hand every waiting ring-buffer record to its callback, without blocking."""
        self._bpf.ring_buffer_consume()

    def map_fd(self, name: str) -> int:
        """Also for maps bcc has no Python table type for (socket-local storage)."""
        from bcc import libbcc

        fd = int(libbcc.lib.bpf_table_fd(self._bpf.module, name.encode()))
        if fd < 0:
            raise DatapathError(f"no map {name} in the loaded programs")
        return fd

    def _pin_all(self) -> None:
        from bcc import libbcc

        # A previous run's pins belong to programs that are being replaced: take their place.
        self.unpin()
        for kind, objects in (
            ("progs", self.program_fds),
            ("maps", {m: self.map_fd(m) for m in abi.MAPS}),
        ):
            (self.pin_dir / kind).mkdir(parents=True, exist_ok=True)
            for name, fd in objects.items():
                path = self.pin_dir / kind / name
                if libbcc.lib.bpf_obj_pin(fd, str(path).encode()) != 0:
                    raise DatapathError(f"cannot pin {name} at {path}")

    def unpin(self) -> None:
        remove_pins(self.pin_dir)

    def close(self, unpin: bool = True) -> None:
        """Release our fds; with unpin, also the pins, so nothing outlives the agent."""
        if unpin:
            self.unpin()
        self._bpf.cleanup()


def _cgroup_programs() -> list[tuple[str, Any]]:
    from bcc import BPFAttachType

    return [
        (abi.CGROUP_CONNECT4_PROGRAM, BPFAttachType.CGROUP_INET4_CONNECT),
        (abi.SOCK_TELEMETRY_PROGRAM, BPFAttachType.CGROUP_SOCK_OPS),
    ]


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
