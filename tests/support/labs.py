"""A lab with its agents for one test module or test, under a name of its own (so tests
and a developer's own lab never meet), always torn down."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

from lab import control
from lab.network import LabState


@contextlib.contextmanager
def running_lab(prefix: str) -> Iterator[LabState]:
    name = prefix + uuid.uuid4().hex[:6]
    try:
        yield control.up(name, None)
    finally:
        control.down(name)
