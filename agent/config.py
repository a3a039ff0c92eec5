"""The agent's own settings (not mesh state): one typed object, built from the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.datapath import abi

DEFAULT_STATE_ROOT = Path("/run/ambient-agent")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    config_file: Path
    pin_dir: Path = abi.DEFAULT_PIN_DIR
    state_dir: Path = DEFAULT_STATE_ROOT
    ready_file: Path | None = None
    drain_grace: float = 5.0
    # Keep programs and maps pinned after exit (for inspection); the default cleans up.
    keep_pins: bool = False
