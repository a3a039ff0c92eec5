"""`ambient-agent demo`: bring the lab up, send traffic along the mesh's three paths, call a
Service by name, take HTTP through the waypoint (the deep guide's labs 1 and 2: routes, L7
policy, request metrics, a bypass and its closing; lab/demo_waypoint.py), tear down.

Each step says what the kernel and the agent did, with the evidence: the agent's own log of
the captured connection (original destination), the address the server saw, and the kernel's
verdict counters read from the pinned maps. At the end, the Istio TCP metrics the traffic
produced, as each node's agent exports them. Exit 0 only when every expectation held.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import asdict
from types import FrameType
from typing import Any

from agent.ctl import read_pods, read_policy_decisions, read_verdicts
from agent.datapath import abi
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from lab import agents, control, demo_waypoint, probes
from lab.demo_step import Step
from lab.network import LabState, PodState

APP_PORT = 8080
SERVICE = ("default", "echo")  # namespace, name: the default topology's Service
SERVICE_CONNECTIONS = 4  # enough for the round robin to reach each of its two endpoints twice
IDENTITY_CHECK = "client side: the server's SPIFFE identity "


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
    # Same node: the agent holds both pods, so it hands the connection over itself, no HBONE.
    meshed = route in ("hbone", "local")
    paths = {
        "hbone": f"{client} --[{source.node} agent :15001]--> HBONE mTLS "
                 f"{target.ip}:{abi.PORT_HBONE} --[{target.node} agent]--> {server}:{APP_PORT}",
        "local": f"{client} --[{source.node} agent :15001, same node: no HBONE, connect() "
                 f"decided by the kernel]--> {server}:{APP_PORT}",
    }  # fmt: skip
    step.facts = {
        "path": paths.get(route,
                          f"{client} --plaintext--> [{target.node} agent :15006] --> "
                          f"{server}:{APP_PORT}"),
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
    if meshed:
        known = "verified" if verified else "known (the agent captured both pods)"
        step.checks[f"server side: the client's SPIFFE identity {known}"] = step.facts[
            "source_identity_verified_by_server"
        ] == _identity(source)
        step.checks[f"{IDENTITY_CHECK}{known}"] = step.facts[
            "destination_identity_verified_by_client"
        ] == _identity(target)
    return step


def _resolve(source: PodState, hostname: str) -> str | None:
    """The address the pod's own resolver gives `hostname`: `ip netns exec` mounts the pod's
    /etc/netns/<netns>/resolv.conf, so glibc asks the cluster DNS address, which the agent
    answers."""
    done = subprocess.run(["ip", "netns", "exec", source.netns, "getent", "hosts", hostname],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    fields = done.stdout.split()
    return fields[0] if done.returncode == 0 and fields else None


def _dns_answered(state: LabState, node: str) -> int:
    return sum(
        int(sample.value)
        for sample in probes.scrape(state, node)
        if sample.name == "ambient_dns_requests_total" and sample.labels["reason"] == "answered"
    )


def _service(state: LabState, title: str, client: str) -> Step:
    """`client` looks the Service up by name and connects to what it got a few times: each
    connection goes to one endpoint, over HBONE with both identities verified, or, for an
    endpoint on the client's own node, delivered by the agent without HBONE."""
    topology = state.parsed_topology()
    namespace, name = SERVICE
    spec = next(s for s in topology.services if (s.namespace, s.name) == SERVICE)
    port = spec.ports[0]
    vip = str(topology.service_vip(namespace, name))
    endpoints = sorted(p.name for p in topology.pods if spec.selects(p))
    source = probes.pod(state, client)
    by_ip = {p.ip: p for p in state.pods}
    step = Step(title, client, spec.key)

    answered = _dns_answered(state, source.node)
    resolved = _resolve(source, spec.hostname)
    answered = _dns_answered(state, source.node) - answered
    connections = []
    for number in range(SERVICE_CONNECTIONS if resolved else 0):
        exchange = probes.talk(source.netns_path, resolved or vip, port.port,
                               f"hello {name} {number} from {client}")  # fmt: skip
        outbound = probes.wait_for_event(
            state, source.node, event="connection complete", direction="outbound",
            src__addr=exchange.client,
        )  # fmt: skip
        reached = by_ip.get(str((outbound or {}).get("dst.addr", "")).split(":")[0])
        inbound = (
            probes.wait_for_event(state, reached.node, event="connection complete",
                                  direction="inbound", src__addr=exchange.client)
            if reached else None
        )  # fmt: skip
        reply = dict(part.split("=", 1) for part in exchange.reply.split(" ") if "=" in part)
        connections.append({
            "client": exchange.client,
            "endpoint": reached.name if reached else None,
            "endpoint_node": reached.node if reached else None,
            "app_local_address": reply.get("local"),
            "server_saw": exchange.server_saw,
            "vip": outbound.get("dst.vip") if outbound else None,
            "original_destination": outbound.get("dst.addr") if outbound else None,
            "route": [e.get("route") if e else None for e in (outbound, inbound)],
            "dst_service": [e.get("dst.service") if e else None for e in (outbound, inbound)],
            "source_identity_verified_by_server": inbound.get("src.identity") if inbound else None,
            "destination_identity_verified_by_client": (
                outbound.get("dst.identity") if outbound else None
            ),
            "bytes_client_to_server": inbound.get("bytes_sent") if inbound else None,
            "bytes_server_to_client": inbound.get("bytes_recv") if inbound else None,
        })  # fmt: skip
    reached_names = sorted({c["endpoint"] for c in connections if c["endpoint"]})
    step.facts = {
        "path": (f"{client} --DNS {spec.hostname}--> {vip} ({source.node} agent, nameserver "
                 f"{topology.dns_ip}); {client} --{vip}:{port.port}--> [{source.node} agent "
                 f":15001, round robin] --HBONE mTLS <endpoint>:{abi.PORT_HBONE} (same node: "
                 f"no HBONE)--> <endpoint>:{port.target_port}"),
        "hostname": spec.hostname,
        "resolved": resolved,
        "dns_answers_by_the_agent": answered,
        "vip": f"{vip}:{port.port}",
        "endpoints": endpoints,
        "endpoints_reached": {
            e: sum(c["endpoint"] == e for c in connections) for e in reached_names
        },
        "connections": connections,
    }  # fmt: skip

    def every(check: Any) -> bool:
        return bool(connections) and all(check(c) for c in connections)

    step.checks = {
        f"{spec.hostname} resolved to the VIP {vip} by the pod's resolver": resolved == vip,
        f"the {source.node} agent answered the query": answered >= 1,
        f"every connection to {vip}:{port.port} went over HBONE, or locally to an endpoint on "
        f"{source.node} (both agents' access logs)": every(
            lambda c: (
                c["vip"] == f"{vip}:{port.port}"
                and c["route"] == [_route(source, c["endpoint_node"])] * 2
            )
        ),
        f"each endpoint verified {client}'s SPIFFE identity": every(
            lambda c: c["source_identity_verified_by_server"] == _identity(source)
        ),
        f"{client} verified each endpoint's SPIFFE identity": every(
            lambda c: (
                c["endpoint"] is not None
                and c["destination_identity_verified_by_client"]
                == _identity(probes.pod(state, c["endpoint"]))
            )
        ),
        f"the connections reached every endpoint ({', '.join(endpoints)})": reached_names
        == endpoints,
        f"the access logs name the service {spec.hostname}": every(
            lambda c: c["dst_service"] == [spec.hostname, spec.hostname]
        ),
        f"each app saw the connection on its own :{port.target_port}, from {client}": every(
            lambda c: (
                c["endpoint"] is not None
                and c["app_local_address"]
                == f"{probes.pod(state, c['endpoint']).ip}:{port.target_port}"
                and c["server_saw"].split(":")[0] == source.ip
            )
        ),
    }
    return step


def _route(source: PodState, endpoint_node: str | None) -> str:
    """The route a mesh connection from `source` takes to a pod on `endpoint_node`."""
    return "local" if endpoint_node == source.node else "hbone"


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
    same_node = source.node == target.node
    step.facts = {
        "path": (f"{client} --plaintext--> {server}:{APP_PORT}, pod_ingress on {target.node}"
                 if plaintext else
                 f"{client} --{'same node' if same_node else 'HBONE'}--> {target.node} agent, "
                 "connect() to the app: agent_connect4"),
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
        answer = "refused it" if same_node else "answered 401"
        step.checks[f"the agent {answer} naming the policy"] = bool(
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
                "destination_service": sample.labels["destination_service"],
                "dataplane_mode": sample.labels["dataplane_mode"],
                "security": sample.labels["connection_security_policy"],
            })  # fmt: skip
            row[sample.name.removeprefix("istio_tcp_").removesuffix("_total")] = int(sample.value)
    order = ("node", "reporter", "source", "destination", "destination_service")
    return sorted(rows.values(), key=lambda row: tuple(row[key] for key in order))


def _print_service(step: Step) -> None:
    f = step.facts
    print(f"    path:                 {f['path']}")
    print(f"    name:                 {f['hostname']} -> {f['resolved'] or 'not resolved'} "
          f"({f['dns_answers_by_the_agent']} answer(s) by the agent)")  # fmt: skip
    reached = ", ".join(f"{name} x{count}" for name, count in f["endpoints_reached"].items())
    print(f"    endpoints reached:    {reached or 'none'} (of {', '.join(f['endpoints'])})")
    for c in f["connections"]:
        print(
            f"    {c['client']} -> {c['vip']} -> {c['original_destination']} "
            f"({c['endpoint']} on {c['endpoint_node']}): {'/'.join(map(str, c['route']))}, "
            f"server identity {c['destination_identity_verified_by_client']}"
        )
    for check, ok in step.checks.items():
        print(f"    {'ok  ' if ok else 'FAIL'} {check}")


def _print(steps: list[Step], kernel: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
    for number, step in enumerate(steps, 1):
        f = step.facts
        print(f"\n[{number}] {step.title}")
        if step.kind == "waypoint":
            demo_waypoint.print_step(step)
            continue
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
        if "vip" in f:
            _print_service(step)
            continue
        print(f"    path:                 {f['path']}")
        print(f"    original destination: {f['original_destination']}")
        identities = next((c.removeprefix(IDENTITY_CHECK) for c in step.checks
                           if c.startswith(IDENTITY_CHECK)), None)  # fmt: skip
        if identities is not None:
            print(f"    client identity:      {f['source_identity_verified_by_server']} "
                  f"({identities})")  # fmt: skip
            print(f"    server identity:      {f['destination_identity_verified_by_client']} "
                  f"({identities})")  # fmt: skip
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
    print(f"  {'node':<7} {'reporter':<12} {'source -> destination':<24} {'service':<31} "
          f"{'mode':<12} {'security':<11} {'opened':>6} {'closed':>6} {'received':>9} "
          f"{'sent':>9}")  # fmt: skip
    for row in metrics:
        print(
            f"  {row['node']:<7} {row['reporter']:<12} "
            f"{row['source'] + ' -> ' + row['destination']:<24} "
            f"{row['destination_service']:<31} {row['dataplane_mode']:<12} "
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
                _connection(state, "pod -> pod on the same node (delivered by the node's agent, "
                            "no HBONE)", "client-a", "server-a", "local"),
                _connection(state, "out-of-mesh pod -> enrolled pod (plaintext, captured)",
                            "outsider", "server-b", "passthrough"),
                _service(state, "pod -> Service by name (agent DNS, VIP balanced over both "
                         "endpoints, HBONE or same-node)", "client-a"),
                demo_waypoint.routing(state),
                demo_waypoint.policy(state),
                demo_waypoint.metrics(state),
                *demo_waypoint.bypass(state),
            ]  # fmt: skip
            print("applying two DENY policies (deny-outsider, deny-client-a)...", file=log)
            probes.apply_policies(state, _deny_policies(probes.pod(state, "outsider")),
                                  ("node-1", "node-2"))  # fmt: skip
            steps += [
                _denied(state, "out-of-mesh pod -> server-b, plaintext, denied by policy",
                        "outsider", "server-b", "default/deny-outsider", plaintext=True),
                _denied(state, "client-a -> server-a, same node, denied by policy",
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
