"""The demo's waypoint steps: the deep guide's lab 1 (L7 routing and policy at a waypoint)
and lab 2 (a bypass around it, counted, then closed), on the default lab, whose Service web
is bound to the waypoint `default/waypoint` that `lab up` runs (lab/default-topology.yaml).

Evidence comes from the apps (which pod answered, which headers reached it), the waypoint's
access log and metrics, the node agents' counters and the kernel's verdicts.
"""

from __future__ import annotations

import collections
import copy
import json
import time
from pathlib import Path
from typing import Any

import yaml

from agent.datapath import abi
from lab import agents, probes
from lab.demo_step import Step
from lab.network import LabState

GATEWAY = "default/waypoint"
SPLIT_REQUESTS = 200  # enough for a 90/10 split to show, within a second or two
# Binomial(200, 0.1) for v2: mean 20, sd 4.2; outside 7..36 is beyond 3 sd.
V2_SHARE = range(7, 37)
DENY_POLICY = "default/web-no-admin"
APP_PORT = 8080


def _web(state: LabState) -> str:
    return str(state.parsed_topology().service_vip("default", "web"))


def _get(state: LabState, client: str, path: str, headers: dict[str, str] | None = None) -> Any:
    url, netns = f"http://{_web(state)}{path}", probes.pod(state, client).netns_path
    status, body = probes.http_request(netns, url, headers=headers)
    fields = dict(part.split("=", 1) for part in body.split() if "=" in part)
    by_ip = {p.ip: p.name for p in state.pods}
    return status, by_ip.get(fields.get("local", "").split(":")[0], "-"), fields


def _waypoint_log(state: LabState) -> Path:
    return Path(state.waypoints[GATEWAY]["log"])


def _waypoint_events(state: LabState, since: int, **fields: str) -> list[dict[str, Any]]:
    lines = _waypoint_log(state).read_text(errors="replace").splitlines()[since:]
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if all(event.get(k) == v for k, v in fields.items()):
            events.append(event)
    return events


def _mark(state: LabState) -> int:
    return len(_waypoint_log(state).read_text(errors="replace").splitlines())


def routing(state: LabState) -> Step:
    """Lab 1, routes: HTTP to web split 90/10 over its versions; /v2 to v2 with a header."""
    step = Step("lab 1: client-a -> Service web via the waypoint (HTTPRoute: 90/10, /v2 -> v2)",
                "client-a", "default/web", kind="waypoint")  # fmt: skip
    waypoint_ip = probes.pod(state, "waypoint").ip
    served: collections.Counter[str] = collections.Counter()
    statuses: collections.Counter[int] = collections.Counter()
    peers = set()
    for _ in range(SPLIT_REQUESTS):
        status, pod, fields = _get(state, "client-a", "/")
        statuses[status] += 1
        served[pod] += 1
        peers.add(fields.get("peer", "").split(":")[0])
    v2 = [_get(state, "client-a", "/v2/reviews") for _ in range(10)]
    step.facts = {
        "path": (f"client-a --HBONE (authority {_web(state)}:80)--> waypoint {waypoint_ip}:15008 "
                 "--Envoy: HTTPRoute default/web--> HBONE --> server-a (v1) | server-b (v2)"),
        "requests": SPLIT_REQUESTS,
        "statuses": dict(statuses),
        "served_by": dict(served),
        "apps_saw_peer": sorted(peers),
        "v2_path_served_by": sorted({pod for _, pod, _ in v2}),
        "v2_headers": v2[0][2].get("headers", ""),
    }  # fmt: skip
    step.checks = {
        "every request answered 200": statuses == {200: SPLIT_REQUESTS},
        "split about 90/10 (v2 within 3 standard deviations of 10%)": served["server-b"] in V2_SHARE
        and served["server-a"] + served["server-b"] == SPLIT_REQUESTS,
        "every request reached the app from the waypoint": peers == {waypoint_ip},
        "/v2 went to v2 only": step.facts["v2_path_served_by"] == ["server-b"]
        and all(status == 200 for status, _, _ in v2),
        "the route's header reached v2": "x-route:v2" in step.facts["v2_headers"].split(","),
    }
    return step


def policy(state: LabState) -> Step:
    """Lab 1, policy: a path denied with 403 naming the policy, another allowed."""
    step = Step("lab 1: client-a -> web/admin denied at the waypoint (403), / allowed",
                "client-a", "default/web", kind="waypoint")  # fmt: skip
    since = _mark(state)
    denied, _, _ = _get(state, "client-a", "/admin/users")
    allowed, _, _ = _get(state, "client-a", "/")
    logged: list[dict[str, Any]] = []
    deadline = time.monotonic() + 5
    while not logged and time.monotonic() < deadline:
        logged = _waypoint_events(state, since, event="request", path="/admin/users")
        time.sleep(0.1)
    line = logged[0] if logged else {}
    step.facts = {
        "policy": DENY_POLICY,
        "admin_status": denied,
        "root_status": allowed,
        "waypoint_access_log": {k: line.get(k) for k in ("status", "denied_by", "peer",
                                                         "details", "route")},
    }  # fmt: skip
    step.checks = {
        "/admin/users answered 403": denied == 403,
        "/ answered 200": allowed == 200,
        f"the waypoint's access log names {DENY_POLICY}": line.get("denied_by") == DENY_POLICY,
        "the policy matched the original client's identity, carried over HBONE": line.get("peer")
        == "spiffe://cluster.local/ns/default/sa/client-a",
    }
    return step


def metrics(state: LabState) -> Step:
    """Lab 1, telemetry: the waypoint's istio_requests_total, by response code."""
    step = Step("lab 1: the waypoint's request metrics (reporter=waypoint)", "waypoint",
                ":15020/stats/prometheus", kind="waypoint")  # fmt: skip
    rows: dict[tuple[str, str, str], float] = {}
    reporter = mode = None
    for sample in probes.scrape_waypoint(state, GATEWAY):
        if sample.name != "istio_requests_total":
            continue
        labels = sample.labels
        key = (labels["source_workload"], labels["destination_workload"], labels["response_code"])
        rows[key] = rows.get(key, 0) + sample.value
        reporter, mode = labels["reporter"], labels["dataplane_mode"]
    codes = {code for _, _, code in rows}
    step.facts = {
        "istio_requests_total": [
            {"source": s, "destination": d, "response_code": c, "requests": int(v)}
            for (s, d, c), v in sorted(rows.items())
        ],
        "reporter": reporter,
        "dataplane_mode": mode,
    }
    step.checks = {
        'istio_requests_total has reporter="waypoint"': step.facts["reporter"] == "waypoint",
        "with response codes 200 and 403": {"200", "403"} <= codes,
        "dataplane_mode is ambient-waypoint": step.facts["dataplane_mode"] == "ambient-waypoint",
        "requests are named by source and destination workload": any(
            s == "client-a" and d in ("server-a", "server-b") for s, d, _ in rows
        ),
    }
    return step


def _bypasses(state: LabState) -> int:
    return int(
        sum(
            s.value
            for s in probes.scrape(state, "node-1")
            if s.name == "ambient_waypoint_bypass_total"
            and s.labels.get("waypoint") == GATEWAY
            and s.labels.get("transport") == "plaintext"
        )
    )


def _policy_drops(state: LabState) -> int:
    return int(
        sum(
            s.value
            for s in probes.scrape(state, "node-1")
            if s.name == "ambient_datapath_verdicts_total"
            and s.labels.get("reason") == abi.VerdictReason.DROP_POLICY_DENIED.name
        )
    )


def bypass(state: LabState) -> list[Step]:
    """Lab 2: the out-of-mesh pod reaches server-a (a pod behind web's waypoint) directly:
    counted as a bypass; with allow-only-waypoint on, the kernel denies it, while web still
    answers through the waypoint."""
    outsider, server_a = probes.pod(state, "outsider"), probes.pod(state, "server-a")
    around = Step("lab 2: outsider -> server-a directly, around the waypoint (bypass)",
                  "outsider", "server-a", kind="waypoint")  # fmt: skip
    before = _bypasses(state)
    exchange = probes.talk(outsider.netns_path, server_a.ip, APP_PORT, "around the waypoint")
    counted = _bypasses(state) - before
    around.facts = {
        "path": f"outsider --plaintext--> server-a {server_a.ip}:{APP_PORT} (no waypoint)",
        "app_replied": bool(exchange.reply),
        "bypasses_counted": counted,
    }
    around.checks = {
        "the connection reached the app without L7 policy": bool(exchange.reply),
        "node-1's agent counted it (ambient_waypoint_bypass_total)": counted == 1,
    }

    closed = Step("lab 2: allow-only-waypoint on: the same connection denied in the kernel",
                  "outsider", "server-a", kind="waypoint")  # fmt: skip
    config = agents.lab_dir(state.name) / "mesh.yaml"
    original = yaml.safe_load(config.read_text())

    def allow_only(document: dict[str, Any]) -> None:
        for service in document["services"]:
            if service.get("waypoint"):
                service["waypoint"]["allowOnlyWaypoint"] = True

    applied = len(probes.agent_events(state, "node-1"))
    probes.edit_config(state, allow_only)
    try:
        took = probes.wait_for_event(state, "node-1", 10, applied, event="policies applied")
        drops = _policy_drops(state)
        outcome, _ = probes.try_connect(outsider.netns_path, server_a.ip, APP_PORT, 2.0)
        dropped = _policy_drops(state) - drops
        through, _, _ = _get(state, "client-a", "/")
    finally:
        applied = len(probes.agent_events(state, "node-1"))
        probes.edit_config(state, lambda document: document.update(copy.deepcopy(original)))
        probes.wait_for_event(state, "node-1", 10, applied, event="policies applied")
    closed.facts = {
        "option": "Gateway annotation ambient.istio.io/allow-only-waypoint: true "
        "(allowOnlyWaypoint in the lab's config)",
        "policy": "L4 ALLOW for spiffe://cluster.local/ns/default/sa/waypoint at web's pods",
        "client_saw": outcome,
        "kernel_drops": dropped,
        "web_through_the_waypoint": through,
    }
    closed.checks = {
        "node-1's agent applied the policy": took is not None,
        "the client's SYN was dropped (it timed out)": outcome == "timeout",
        "the kernel counted the drop (DROP_POLICY_DENIED)": dropped >= 1,
        "web still answers through the waypoint (200)": through == 200,
    }
    return [around, closed]


def print_step(step: Step) -> None:
    for key, value in step.facts.items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        print(f"    {key + ':':<26}{shown}")
    for check, ok in step.checks.items():
        print(f"    {'ok  ' if ok else 'FAIL'} {check}")
