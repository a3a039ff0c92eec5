"""`ambient-agent demo`: bring the lab up, send traffic along the mesh's three paths, tear down.

Each step says what the kernel and the agent did, with the evidence: the agent's own log of
the captured connection (original destination), the address the server saw, and the kernel's
verdict counters read from the pinned maps. At the end, the Istio TCP metrics the traffic
produced, as each node's agent exports them. Exit 0 only when every expectation held.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any

from agent.ctl import read_pods, read_policy_decisions, read_verdicts
from agent.datapath import abi
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from lab import agents, control, probes
from lab.network import LabState, PodState

APP_PORT = 8080


@dataclass
class Step:
    title: str
    client: str
    server: str
    checks: dict[str, bool] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())


def _identity(pod: PodState) -> str:
    return f"spiffe://{DEFAULT_TRUST_DOMAIN}/ns/{pod.namespace}/sa/{pod.service_account}"


def _connection(state: LabState, title: str, client: str, server: str, route: str) -> Step:
    """One request from `client` to `server`'s app, and what each agent says it did."""
    source, target = probes.pod(state, client), probes.pod(state, server)
    step = Step(title, client, server)
    request = f"hello from {client}"
    exchange = probes.talk(source.netns_path, target.ip, APP_PORT, request)

    def complete(node: str, direction: str) -> dict[str, Any] | None:
        return probes.wait_for_event(state, node, event="connection complete",
                                     direction=direction, src__addr=exchange.client)  # fmt: skip

    outbound = complete(source.node, "outbound") if source.ambient else None
    inbound = complete(target.node, "inbound")
    verified = route == "hbone"
    step.facts = {
        "path": (f"{client} --[{source.node} agent :15001]--> HBONE mTLS "
                 f"{target.ip}:{abi.PORT_HBONE} --[{target.node} agent]--> {server}:{APP_PORT}"
                 if verified else
                 f"{client} --plaintext--> [{target.node} agent :15006] --> {server}:{APP_PORT}"),
        "client": exchange.client,
        "server_saw": exchange.server_saw,
        "original_destination": inbound.get("dst.addr") if inbound else None,
        "source_identity_verified_by_server": inbound.get("src.identity") if inbound else None,
        "destination_identity_verified_by_client": (
            outbound.get("dst.identity") if outbound else None
        ),
        "bytes_client_to_server": inbound.get("bytes_sent") if inbound else None,
        "bytes_server_to_client": inbound.get("bytes_recv") if inbound else None,
    }  # fmt: skip
    step.checks = {
        f"captured by the {target.node} agent ({route})": inbound is not None
        and inbound.get("route") == route,
        "original destination kept": step.facts["original_destination"]
        == f"{target.ip}:{APP_PORT}",
        "server saw the client's own address": exchange.server_saw.split(":")[0] == source.ip,
        "bytes counted by the kernel match the application's": inbound is not None
        and inbound.get("bytes_source") == "kernel"
        and step.facts["bytes_client_to_server"] == len(request) + 1
        and step.facts["bytes_server_to_client"] == len(exchange.reply) + 1,
    }
    if verified:
        step.checks["server verified the client's SPIFFE identity"] = step.facts[
            "source_identity_verified_by_server"
        ] == _identity(source)
        step.checks["client verified the server's SPIFFE identity"] = step.facts[
            "destination_identity_verified_by_client"
        ] == _identity(target)
    return step


def _deny_policies(outsider: PodState) -> list[dict[str, Any]]:
    """One policy in each shape: the local config's, and Kubernetes' AuthorizationPolicy."""
    return [
        {
            "name": "deny-outsider", "namespace": "default", "scope": "WorkloadSelector",
            "selector": {"matchLabels": {"app": "server-b"}}, "action": "Deny",
            "rules": [{"clauses": [{"matches": [{"sourceIps": [outsider.ip]}]}]}],
        },
        {
            "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "deny-client-a", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "server-a"}}, "action": "DENY",
                "rules": [{"from": [{"source": {
                    "principals": [f"{DEFAULT_TRUST_DOMAIN}/ns/default/sa/client-a"]}}]}],
            },
        },
    ]  # fmt: skip


def _policy_count(state: LabState, node: str, policy: str) -> int:
    pin_dir = agents.lab_pin_root(state.name) / node
    return sum(
        row["count"]
        for row in read_policy_decisions(pin_dir)
        if row["policy"] == policy and row["reason"] == "denied-by-policy"
    )


def _denied(
    state: LabState, title: str, client: str, server: str, policy: str, plaintext: bool
) -> Step:
    source, target = probes.pod(state, client), probes.pod(state, server)
    step = Step(title, client, server)
    before = _policy_count(state, target.node, policy)
    outcome, address = probes.try_connect(source.netns_path, target.ip, APP_PORT,
                                          timeout=2.0 if plaintext else 5.0)  # fmt: skip
    counted = _policy_count(state, target.node, policy) - before
    seen = probes.wait_for_event(state, target.node, timeout=1.0 if plaintext else 5.0,
                                 event="connection complete", src__addr=address)  # fmt: skip
    step.facts = {
        "path": (f"{client} --plaintext--> {server}:{APP_PORT}, pod_ingress on {target.node}"
                 if plaintext else
                 f"{client} --HBONE--> {target.node} agent, connect() to the app: agent_connect4"),
        "client": address,
        "client_saw": outcome,
        "policy": policy,
        "kernel_denials_counted": counted,
        "agent_access_log": seen.get("error") if seen else None,
    }  # fmt: skip
    step.checks = {
        f"denied in the kernel by {policy}": counted >= 1,
        ("the client's SYN was dropped (it timed out)" if plaintext
         else "the client saw the tunnel refused (reset)"): outcome
        == ("timeout" if plaintext else "reset"),
    }  # fmt: skip
    if plaintext:
        step.checks["no userspace wake-up: the agent never saw the connection"] = seen is None
    else:
        step.checks["the agent answered 401 naming the policy"] = bool(
            seen and f"({policy})" in str(seen.get("error"))
        )
    return step


def _kernel_state(state: LabState) -> dict[str, Any]:
    report = {}
    for node in state.nodes:
        pin_dir = agents.lab_pin_root(state.name) / node.name
        report[node.name] = {
            "pin_dir": str(pin_dir),
            "pods": read_pods(pin_dir),
            "verdicts": {k: v for k, v in read_verdicts(pin_dir).items() if v},
            "policy_decisions": read_policy_decisions(pin_dir),
        }
    return report


def _istio_metrics(state: LabState) -> list[dict[str, Any]]:
    """Every istio_tcp series of every node, one row per series."""
    rows: dict[tuple[str, tuple[tuple[str, str], ...]], dict[str, Any]] = {}
    for node in state.nodes:
        for sample in probes.scrape(state, node.name):
            if not sample.name.startswith("istio_tcp_"):
                continue
            key = (node.name, tuple(sorted(sample.labels.items())))
            row = rows.setdefault(key, {
                "node": node.name, "reporter": sample.labels["reporter"],
                "source": sample.labels["source_workload"],
                "destination": sample.labels["destination_workload"],
                "dataplane_mode": sample.labels["dataplane_mode"],
                "security": sample.labels["connection_security_policy"],
            })  # fmt: skip
            row[sample.name.removeprefix("istio_tcp_").removesuffix("_total")] = int(sample.value)
    return sorted(rows.values(), key=lambda r: (r["node"], r["reporter"], r["source"]))


def _print(steps: list[Step], kernel: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    for number, step in enumerate(steps, 1):
        f = step.facts
        print(f"\n[{number}] {step.title}")
        if "policy" in f:
            print(f"    path:                 {f['path']}")
            print(f"    client saw:           {f['client_saw']}  (client socket {f['client']})")
            print(
                f"    kernel counted:       {f['kernel_denials_counted']} denial(s) by "
                f"{f['policy']}"
            )
            print(f"    agent's access log:   {f['agent_access_log'] or 'nothing (never woken)'}")
            for check, ok in step.checks.items():
                print(f"    {'ok  ' if ok else 'FAIL'} {check}")
            continue
        print(f"    path:                 {f['path']}")
        print(f"    original destination: {f['original_destination']}")
        if "client verified the server's SPIFFE identity" in step.checks:
            print(
                f"    client identity:      {f['source_identity_verified_by_server']} "
                "(verified by the server)"
            )
            print(
                f"    server identity:      {f['destination_identity_verified_by_client']} "
                "(verified by the client)"
            )
        print(f"    server saw source:    {f['server_saw']}  (client socket {f['client']})")
        print(
            f"    bytes:                {f['bytes_client_to_server']} to the server, "
            f"{f['bytes_server_to_client']} back"
        )
        for check, ok in step.checks.items():
            print(f"    {'ok  ' if ok else 'FAIL'} {check}")
    print("\nkernel state (read from the pinned maps with bpftool):")
    for node, body in kernel.items():
        print(f"  {node}: {body['pin_dir']}")
        for pod in body["pods"]:
            print(
                f"    pod {pod['ip']:<14} capture={'on' if pod['capture'] else 'off'} "
                f"outbound_captured={pod['outbound_captured']} "
                f"inbound_captured={pod['inbound_captured']}"
            )
        for reason, count in body["verdicts"].items():
            print(f"    verdict {reason:<30} {count:>6} packets")
        for row in body["policy_decisions"]:
            print(f"    policy  {row['policy']:<22} {row['reason']:<18} {row['count']:>6}")
    print("\nIstio TCP metrics the traffic produced (bytes counted by the kernel's sockops "
          "program; each agent's :15020/metrics):")  # fmt: skip
    print(f"  {'node':<7} {'reporter':<12} {'source -> destination':<24} {'mode':<12} "
          f"{'security':<11} {'opened':>6} {'closed':>6} {'received':>9} {'sent':>9}")  # fmt: skip
    for row in metrics:
        print(
            f"  {row['node']:<7} {row['reporter']:<12} "
            f"{row['source'] + ' -> ' + row['destination']:<24} {row['dataplane_mode']:<12} "
            f"{row['security']:<11} {row.get('connections_opened', 0):>6} "
            f"{row.get('connections_closed', 0):>6} {row.get('received_bytes', 0):>9} "
            f"{row.get('sent_bytes', 0):>9}"
        )


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
        with (
            probes.whoami_server(probes.pod(state, "server-b"), APP_PORT),
            probes.whoami_server(probes.pod(state, "server-a"), APP_PORT),
        ):
            steps = [
                _connection(state, "pod on node-1 -> pod on node-2 (HBONE, mutual TLS)",
                            "client-a", "server-b", "hbone"),
                _connection(state, "pod -> pod on the same node (HBONE)",
                            "client-a", "server-a", "hbone"),
                _connection(state, "out-of-mesh pod -> enrolled pod (plaintext, captured)",
                            "outsider", "server-b", "passthrough"),
            ]  # fmt: skip
            print("applying two DENY policies (deny-outsider, deny-client-a)...", file=log)
            probes.apply_policies(state, _deny_policies(probes.pod(state, "outsider")),
                                  ("node-1", "node-2"))  # fmt: skip
            steps += [
                _denied(state, "out-of-mesh pod -> server-b, plaintext, denied by policy",
                        "outsider", "server-b", "default/deny-outsider", plaintext=True),
                _denied(state, "client-a -> server-a, HBONE, denied by policy",
                        "client-a", "server-a", "default/deny-client-a", plaintext=False),
            ]  # fmt: skip
        kernel = _kernel_state(state)
        metrics = _istio_metrics(state)
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
        print(json.dumps({"ok": ok, "steps": [asdict(s) for s in steps], "kernel": kernel,
                          "metrics": metrics}, indent=2))  # fmt: skip
    else:
        _print(steps, kernel, metrics)
        print(f"\nlab '{name}' torn down. demo {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1
