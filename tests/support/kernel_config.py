"""The running kernel's build configuration, as an independent witness of what the agent's
probes report."""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path


def option(name: str) -> str | None:
    """A CONFIG_ option's value ("y", "m", ...), "n" when the config says it is not set, None
    when no config of the running kernel is readable here."""
    for path in (Path("/proc/config.gz"), Path(f"/boot/config-{os.uname().release}")):
        try:
            raw = path.read_bytes()
        except OSError:
            continue
        text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode(errors="replace")
        found = re.search(rf"^{name}=(\S+)", text, re.M)
        return found[1] if found else "n"
    return None


def ktls_expected() -> str | None:
    """What the agent's kTLS probe must say on this kernel ("available" when the TLS upper-
    layer protocol is built in or a module, else "unavailable"), or None if unknowable."""
    value = option("CONFIG_TLS")
    if value is None:
        return None
    return "available" if value in ("y", "m") else "unavailable"
