"""`ambient-agent demo`: bring the lab up, show capture in both directions, tear down.

Each step says what the kernel and the agent did, with the evidence: the agent's own log of
the captured connection (original destination), the address the server saw, and the kernel's
verdict counters read from the pinned maps. Exit 0 only when every expectation held.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

from agent.ctl import read_pods, read_verdicts
from agent.datapath import abi
from agent.lab import agents, control, probes
from agent.lab.network import LabState

APP_PORT = 8080


@dataclass
class Step:
    title: str
    client: str
    server: str
    expected_listener: int
    checks: dict[str, bool] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


def _connection(
    state: LabState, title: str, client: str, server: str, node: str, direction: str
) -> Step:
    source, target = probes.pod(state, client), probes.pod(state, server)
    listener = abi.PORT_OUTBOUND if direction == "outbound" else abi.PORT_INBOUND
    step = Step(title, client, server, listener)
    exchange = probes.talk(source.netns_path, target.ip, APP_PORT, f"hello from {client}")
    event = probes.wait_for_event(
        state, node, event="connection complete", direction=direction,
        src__addr=exchange.client,
    )  # fmt: skip
    step.facts = {
        "client": exchange.client,
        "server_saw": exchange.server_saw,
        "reply": exchange.reply,
        "captured_by": f"{node} agent, {direction} listener :{listener}" if event else None,
        "original_destination": event.get("dst.addr") if event else None,
        "bytes_sent": event.get("bytes_sent") if event else None,
        "bytes_received": event.get("bytes_recv") if event else None,
    }
    step.checks = {
        "captured by the node agent": event is not None,
        "original destination kept": event is not None
        and event.get("dst.addr") == f"{target.ip}:{APP_PORT}",
        "server saw the client's own address": exchange.server_saw.split(":")[0] == source.ip,
        "reply came back": exchange.reply.startswith("peer="),
    }
    return step


def _kernel_state(state: LabState) -> dict[str, Any]:
    report = {}
    for node in state.nodes:
        pin_dir = agents.lab_pin_root(state.name) / node.name
        report[node.name] = {
            "pin_dir": str(pin_dir),
            "pods": read_pods(pin_dir),
            "verdicts": {k: v for k, v in read_verdicts(pin_dir).items() if v},
        }
    return report


def _print(steps: list[Step], kernel: dict[str, Any]) -> None:
    for number, step in enumerate(steps, 1):
        f = step.facts
        print(f"\n[{number}] {step.title}")
        print(f"    {step.client} {f['client']} -> {step.server}")
        print(f"    captured by:          {f['captured_by'] or 'NOT CAPTURED'}")
        print(f"    original destination: {f['original_destination']}")
        print(f"    server saw source:    {f['server_saw']}")
        print(f"    bytes (client->server / server->client): "
              f"{f['bytes_sent']} / {f['bytes_received']}")  # fmt: skip
        for check, ok in step.checks.items():
            print(f"    {'ok  ' if ok else 'FAIL'} {check}")
    print("\nkernel state (read from the pinned maps with bpftool):")
    for node, body in kernel.items():
        print(f"  {node}: {body['pin_dir']}")
        for pod in body["pods"]:
            print(f"    pod {pod['ip']:<14} capture={'on' if pod['capture'] else 'off'} "
                  f"outbound_captured={pod['outbound_captured']} "
                  f"inbound_captured={pod['inbound_captured']}")  # fmt: skip
        for reason, count in body["verdicts"].items():
            print(f"    verdict {reason:<30} {count:>6} packets")


def run_demo(name: str, json_output: bool = False) -> int:
    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    log = sys.stderr if json_output else sys.stdout
    try:
        control.down(name)  # a previous demo that was killed hard
        print(f"bringing lab '{name}' up (2 nodes, node agents compile and pin the "
              "tc programs)...", file=log)  # fmt: skip
        state = control.up(name, None)
        print(control.describe(control.status(name)), file=log)
        outsider, server_b = probes.pod(state, "outsider"), probes.pod(state, "server-b")
        with probes.whoami_server(outsider, APP_PORT), probes.whoami_server(server_b, APP_PORT):
            steps = [
                _connection(
                    state, "enrolled pod -> out-of-mesh pod on another node (outbound capture)",
                    "client-a", "outsider", "node-1", "outbound",
                ),
                _connection(
                    state, "out-of-mesh pod -> enrolled pod (inbound plaintext capture)",
                    "outsider", "server-b", "node-2", "inbound",
                ),
            ]  # fmt: skip
        kernel = _kernel_state(state)
    except KeyboardInterrupt:
        print("interrupted: tearing the lab down", file=sys.stderr)
        control.down(name)
        return 130
    except Exception as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        control.down(name)
        return 1
    control.down(name)
    ok = all(step.ok for step in steps)
    if json_output:
        print(json.dumps({"ok": ok, "steps": [asdict(s) for s in steps], "kernel": kernel},
                         indent=2))  # fmt: skip
    else:
        _print(steps, kernel)
        print(f"\nlab '{name}' torn down. demo {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1
