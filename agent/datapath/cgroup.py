"""The agent's own cgroup (v2), where agent_connect4 authorizes the agent's upstream connects.

The agent moves itself into `<cgroup2>/ambient-agent/<instance>` so the hook sees only its own
sockets, attaches there, and on exit detaches, moves back and removes the directory. After a
crash, remove_cgroups() clears what is left (a cgroup without processes can be removed, and
its programs go with it).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from agent.datapath.loader import DatapathError

PARENT = "ambient-agent"


def cgroup2_root() -> Path:
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if fields[2] == "cgroup2":
                return Path(fields[1])
    raise DatapathError("no cgroup v2 hierarchy mounted: mount -t cgroup2 none /sys/fs/cgroup")


def _current(root: Path) -> Path:
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return root / line[3:].lstrip("/")
    return root


ENTER_ATTEMPTS = 5


class AgentCgroup:
    def __init__(self, instance: str) -> None:
        self.root = cgroup2_root()
        self.path = self.root / PARENT / instance
        self._original = _current(self.root)
        self._fd: int | None = None

    def enter(self) -> None:
        """Move this process (all its threads) into the agent's cgroup. One an agent that
        died left behind is removed first, and its programs with it (a cgroup still holding
        a live process cannot be removed, and is joined as it is)."""
        if self.path.exists():
            remove_cgroups(self.path)
        for attempt in range(ENTER_ATTEMPTS):
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                (self.path / "cgroup.procs").write_text(str(os.getpid()))
                break
            except FileNotFoundError:
                # A sibling agent (same parent) removed the parent it found empty between
                # our mkdir steps: make it again.
                if attempt == ENTER_ATTEMPTS - 1:
                    raise
        self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise DatapathError("agent cgroup not entered")
        return self._fd

    def leave(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            (self._original / "cgroup.procs").write_text(str(os.getpid()))
        remove_cgroups(self.path)


def remove_cgroups(path: Path) -> None:
    """Remove path (bottom-up) and its parents up to the cgroup root, as far as empty."""
    if path.exists():
        for child in sorted(
            (p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)
        ):
            with contextlib.suppress(OSError):
                child.rmdir()
        with contextlib.suppress(OSError):
            path.rmdir()
    root = cgroup2_root()
    parent = path.parent
    while parent != root and parent.is_relative_to(root):
        with contextlib.suppress(OSError):
            parent.rmdir()
        parent = parent.parent
