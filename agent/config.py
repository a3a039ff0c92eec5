"""The agent's own settings (not mesh state): one typed object, built from the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from agent.datapath import abi
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN

DEFAULT_STATE_ROOT = Path("/run/ambient-agent")
DEFAULT_CA_DIR = Path("/var/lib/ambient-agent/ca")
DEFAULT_CNI_SOCKET = Path("/var/run/ambient-agent/cni.sock")
ON_EXIT = ("keep", "unenroll")


@dataclass(frozen=True, slots=True)
class AgentConfig:
    node: str
    # Where the mesh state comes from: a local config file, or the Kubernetes API.
    config_file: Path | None
    pin_dir: Path = abi.DEFAULT_PIN_DIR
    state_dir: Path = DEFAULT_STATE_ROOT
    ready_file: Path | None = None
    drain_grace: float = 5.0
    # At exit, "keep": the pods stay enrolled in the kernel (programs and maps pinned, their
    # new connections dropped) for the next agent to adopt: a restart or an upgrade never
    # lets a pod's traffic out unprotected. "unenroll": undo everything (the mesh leaves
    # the node).
    on_exit: str = "keep"
    # Enrolled pods' DNS (UDP and TCP to port 53) is answered by the agent for mesh names
    # and forwarded to the pod's nameserver for the rest (ztunnel's DNS proxy).
    dns_capture: bool = True
    # The built-in CA for standalone use: its directory keeps trust across restarts, and
    # agents that share it trust each other.
    ca_dir: Path = DEFAULT_CA_DIR
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    certificate_ttl: timedelta = timedelta(hours=24)
    # A policy change applies to new connections; with this, live inbound connections the
    # new policies deny are reset too (re-checked by the kernel).
    cut_denied_connections: bool = False
    # The config dump (15000) shows the mesh's workloads and policies: loopback by default.
    admin_address: str = "127.0.0.1"
    # OTLP metric export (the /metrics figures, pushed): off unless an endpoint is given.
    otlp_endpoint: str | None = None
    otlp_protocol: str = "grpc"
    otlp_interval: float = 10.0
    # Where ambient-cni reaches the agent (the plugin's agentSocket); None: no CNI.
    cni_socket: Path | None = DEFAULT_CNI_SOCKET
    kubernetes: bool = False
    kubeconfig: Path | None = None  # else in-cluster (the ServiceAccount's token)

    @property
    def node_state_dir(self) -> Path:
        """This node's records: enrolled pods, the CNI pod registry, the pinned layout."""
        return self.state_dir / self.node

    @property
    def cgroup_instance(self) -> str:
        """The agent's cgroup name: its pin directory below /sys/fs/bpf/ambient (lab/node-1),
        else its node."""
        pins = self.pin_dir
        if pins.is_relative_to(abi.DEFAULT_PIN_DIR) and pins != abi.DEFAULT_PIN_DIR:
            return str(pins.relative_to(abi.DEFAULT_PIN_DIR))
        return self.node
