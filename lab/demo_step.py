"""One step of the demo: what was tried, what held (checks), and the evidence (facts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Step:
    title: str
    client: str
    server: str
    checks: dict[str, bool] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    kind: str = ""  # how the demo prints it; "" for the L4 steps' own layouts

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())
