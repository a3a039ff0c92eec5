"""`ambient-agent bench --policy`: what in-kernel L4 authorization costs, in one invocation.

Three parts, all on a synthetic mesh generated from a fixed seed (so every run measures the
same policies):

- compile: parse every policy document (both shapes), then compile them for the workloads of
  one typical node and for every workload of the mesh at once (the worst case), and count the
  map entries each would write;
- write: write the typical node's set into real kernel maps (PolicyMaps.write, a generation
  flip) and delete the retired generation (clear_generation);
- decision: run pod_ingress with BPF_PROG_RUN on SYNs to one destination workload whose
  policies grow from none to 251 terms, and on a destination that is not enrolled at all.

Benchmarks measure and print; they never judge the figures. Exit 0 when every measurement
completed, 1 with the reason when one failed, 130 when interrupted. The kernel objects
(pins under /sys/fs/bpf/ambient/bench-<hex>, the scratch netns polbench-<hex>) are removed in
every case.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import random
import secrets
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TextIO

from agent.datapath import abi, packets
from agent.datapath.abi import VerdictReason
from agent.datapath.loader import LoadedDatapath, preflight
from agent.datapath.prog_run import run_tc
from agent.inpod.enrollment import pod_key_addr
from agent.netns import NetnsWorker
from agent.policy.compiler import (
    FALLBACK,
    MAX_TERMS,
    CompiledPolicies,
    IdentityNumbers,
    PolicyNumbers,
    compile_policies,
)
from agent.policy.kernel_maps import PolicyMaps, page_of
from agent.sources.authorization_policy import parse_policies, parse_policy
from agent.state.policy import ROOT_NAMESPACE, Action, Policy, WorkloadSelectorTarget, applies_to
from agent.state.workload import Protocol, Workload

SEED = 20240611
TRUST_DOMAIN = "cluster.local"
APPS = (
    "frontend", "cart", "checkout", "catalog", "payments",
    "shipping", "email", "ads", "reviews", "search",
)  # fmt: skip
PORTS = (80, 443, 8080, 8443, 9090, 5432, 6379, 3306, 9000, 50051)
GLOBAL_POLICIES = 10  # "a few", in the root namespace: 8 mesh-wide, 2 selector-scoped
DRY_RUN_SHARE = 0.05
NAMESPACE_SCOPED_SHARE = 0.15  # the rest of the namespaced policies select workloads
DENY_SHARE = 0.3
K8S_SHARE = 0.5  # the rest are written in the local-config shape
ENTRY_MAPS = abi.maps_keyed_by("gen")  # the maps one policy generation fills


@dataclass(frozen=True)
class Settings:
    namespaces: int
    apps_per_namespace: int  # each app runs as two workloads, version v1 and v2
    policies: int
    workloads_per_node: int
    repeat: int  # BPF_PROG_RUN repetitions per timed run
    rounds: int  # timed runs per packet; the median is reported
    write_rounds: int  # writes of the typical node's set, each followed by a clear

    @property
    def workloads(self) -> int:
        return self.namespaces * self.apps_per_namespace * 2


FULL = Settings(
    namespaces=50,
    apps_per_namespace=10,
    policies=10_000,
    workloads_per_node=30,
    repeat=100_000,
    rounds=11,
    write_rounds=3,
)
QUICK = Settings(
    namespaces=5,
    apps_per_namespace=10,
    policies=1_000,
    workloads_per_node=30,
    repeat=10_000,
    rounds=3,
    write_rounds=1,
)

# The decision part: one destination, one plaintext source that is a known mesh workload.
DECISION_NS = "bench"
SRC_IP = "10.250.0.20"
ALLOWED_PORT = 8080  # the one ALLOW policy's port
UNNAMED_PORT = 9999  # no policy names it: default deny once an ALLOW applies
DENY_PORT_BASE = 20_000  # DENY policy i names port DENY_PORT_BASE + i
DENY_COUNTS = (0, 1, 10, 50, 100, 250)
WARMUP_REPEAT = 1_000


class BenchError(RuntimeError):
    """A measurement could not be made; the message says which and why."""


# ---- the synthetic mesh -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mesh:
    workloads: tuple[Workload, ...]
    documents: tuple[dict[str, Any], ...]
    typical_node: str


def generate_mesh(settings: Settings, seed: int = SEED) -> Mesh:
    """Workloads app=<name>, version=v1/v2 in ns-NN, spread over nodes of about
    `workloads_per_node` each; policies of both shapes over them. Deterministic for a seed."""
    rng = random.Random(seed)
    namespaces = [f"ns-{i:02d}" for i in range(settings.namespaces)]
    apps = APPS[: settings.apps_per_namespace]
    count = settings.workloads
    nodes = max(1, round(count / settings.workloads_per_node))
    order = list(range(count))
    rng.shuffle(order)
    node_of = [0] * count
    for position, index in enumerate(order):
        node_of[index] = position % nodes
    workloads: list[Workload] = []
    for ns in namespaces:
        for app in apps:
            for version in ("v1", "v2"):
                index = len(workloads)
                ip = f"10.100.{index // 250}.{index % 250 + 1}"
                labels = {"app": app, "version": version}
                workloads.append(
                    Workload(
                        f"{ns}-{app}-{version}",
                        f"{app}-{version}",
                        ns,
                        app,
                        (ip,),
                        Protocol.HBONE,
                        f"node-{node_of[index]:02d}",
                        labels=labels,
                    )
                )

    generator = _PolicyGenerator(rng, namespaces, apps)
    documents: list[dict[str, Any]] = []
    selector: dict[str, str] | None
    for i in range(GLOBAL_POLICIES):
        selector = {"version": "v2"} if i >= GLOBAL_POLICIES - 2 else None
        documents.append(generator.document(f"mesh-{i:03d}", ROOT_NAMESPACE, selector))
    for i in range(settings.policies - GLOBAL_POLICIES):
        ns = namespaces[i % len(namespaces)]
        selector = None
        if rng.random() >= NAMESPACE_SCOPED_SHARE:
            selector = {"app": rng.choice(apps)}
            if rng.random() < 0.3:
                selector["version"] = rng.choice(("v1", "v2"))
        documents.append(generator.document(f"policy-{i:05d}", ns, selector))
    return Mesh(tuple(workloads), tuple(documents), "node-00")


class _PolicyGenerator:
    """Policies in an abstract form first, then written in one of the two shapes."""

    def __init__(self, rng: random.Random, namespaces: Sequence[str], apps: Sequence[str]):
        self.rng = rng
        self.namespaces = namespaces
        self.apps = apps

    def document(self, name: str, ns: str, selector: dict[str, str] | None) -> dict[str, Any]:
        rng = self.rng
        deny = rng.random() < DENY_SHARE
        dry_run = rng.random() < DRY_RUN_SHARE
        rules = [self._rule() for _ in range(rng.choices((1, 2, 3), (70, 25, 5))[0])]
        if rng.random() < K8S_SHARE:
            return self._k8s(name, ns, selector, deny, dry_run, rules)
        return self._local(name, ns, selector, deny, dry_run, rules)

    # A rule: (sources, operations, conditions). A source is a list of (field, kind, value)
    # with field in principals, namespaces, notNamespaces, ipBlocks and kind "exact" or
    # "prefix" (principals); an operation a list of ports; a condition (key, polarity, value).
    def _rule(self) -> tuple[list[list[tuple[str, str, str]]], list[list[int]], list[Any]]:
        rng = self.rng
        sources = []
        if rng.random() < 0.8:
            for _ in range(rng.choice((1, 1, 2))):
                fields = rng.sample(
                    ("principals", "namespaces", "notNamespaces", "ipBlocks"), rng.choice((1, 1, 2))
                )
                sources.append([entry for f in fields for entry in self._source_field(f)])
        operations = []
        if rng.random() < 0.7:
            for _ in range(rng.choice((1, 1, 1, 2))):
                operations.append(rng.sample(PORTS, rng.choice((1, 1, 2, 3))))
        conditions = []
        if rng.random() < 0.2 or not (sources or operations):
            conditions.append(self._condition())
        return sources, operations, conditions

    def _source_field(self, field: str) -> list[tuple[str, str, str]]:
        rng = self.rng
        ns = rng.choice(self.namespaces)
        if field == "principals":
            if rng.random() < 0.3:
                return [("principals", "prefix", f"{TRUST_DOMAIN}/ns/{ns}/")]
            app = rng.choice(self.apps)
            return [("principals", "exact", f"{TRUST_DOMAIN}/ns/{ns}/sa/{app}")]
        if field == "ipBlocks":
            return [("ipBlocks", "", self._cidr())]
        return [(field, "exact", ns) for ns in rng.sample(self.namespaces, rng.choice((1, 2)))]

    def _cidr(self) -> str:
        rng = self.rng
        return rng.choice(
            (
                f"10.100.{rng.randrange(4)}.0/24",
                "10.100.0.0/16",
                f"192.168.{rng.randrange(16)}.0/24",
                f"10.100.{rng.randrange(4)}.{rng.randrange(1, 250)}",
            )
        )

    def _condition(self) -> tuple[str, str, str]:
        """(key, values or notValues, value) of an L4 `when` condition."""
        rng = self.rng
        key = rng.choice(("source.namespace", "source.ip", "destination.port", "source.principal"))
        polarity = "notValues" if rng.random() < 0.3 else "values"
        if key == "source.namespace":
            return key, polarity, rng.choice(self.namespaces)
        if key == "source.ip":
            return key, polarity, self._cidr()
        if key == "destination.port":
            return key, polarity, str(rng.choice(PORTS))
        ns, app = rng.choice(self.namespaces), rng.choice(self.apps)
        return key, polarity, f"{TRUST_DOMAIN}/ns/{ns}/sa/{app}"

    def _k8s(
        self,
        name: str,
        ns: str,
        selector: dict[str, str] | None,
        deny: bool,
        dry_run: bool,
        rules: list[Any],
    ) -> dict[str, Any]:
        spec: dict[str, Any] = {"action": "DENY" if deny else "ALLOW", "rules": []}
        if selector is not None:
            spec["selector"] = {"matchLabels": dict(selector)}
        for sources, operations, conditions in rules:
            rule: dict[str, Any] = {}
            if sources:
                rule["from"] = [{"source": _k8s_source(s)} for s in sources]
            if operations:
                rule["to"] = [
                    {"operation": {"ports": [str(p) for p in ports]}} for ports in operations
                ]
            if conditions:
                rule["when"] = [{"key": k, polarity: [v]} for k, polarity, v in conditions]
            spec["rules"].append(rule)
        metadata: dict[str, Any] = {"name": name, "namespace": ns}
        if dry_run:
            metadata["annotations"] = {"istio.io/dry-run": "true"}
        return {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": metadata,
            "spec": spec,
        }

    def _local(
        self,
        name: str,
        ns: str,
        selector: dict[str, str] | None,
        deny: bool,
        dry_run: bool,
        rules: list[Any],
    ) -> dict[str, Any]:
        document: dict[str, Any] = {
            "name": name,
            "namespace": ns,
            "action": "Deny" if deny else "Allow",
            "dryRun": dry_run,
            "rules": [],
        }
        if selector is not None:
            document["scope"] = "WorkloadSelector"
            document["selector"] = {"matchLabels": dict(selector)}
        else:
            document["scope"] = "Global" if ns == ROOT_NAMESPACE else "Namespace"
        for sources, operations, conditions in rules:
            clauses: list[dict[str, Any]] = []
            if sources:
                clauses.append({"matches": [_local_source(s) for s in sources]})
            if operations:
                clauses.append(
                    {"matches": [{"destinationPorts": list(ports)} for ports in operations]}
                )
            for condition in conditions:
                clauses.append({"matches": [_local_condition(condition)]})
            document["rules"].append({"clauses": clauses})
        return document


def _k8s_source(entries: list[tuple[str, str, str]]) -> dict[str, list[str]]:
    source: dict[str, list[str]] = {}
    for field, kind, value in entries:
        source.setdefault(field, []).append(f"{value}*" if kind == "prefix" else value)
    return source


_LOCAL_SOURCE_FIELDS = {
    "principals": "principals",
    "namespaces": "namespaces",
    "notNamespaces": "notNamespaces",
    "ipBlocks": "sourceIps",
}


def _local_source(entries: list[tuple[str, str, str]]) -> dict[str, list[Any]]:
    match: dict[str, list[Any]] = {}
    for field, kind, value in entries:
        written: Any = value if field == "ipBlocks" else {kind: value}
        match.setdefault(_LOCAL_SOURCE_FIELDS[field], []).append(written)
    return match


_LOCAL_CONDITION_FIELDS = {
    "source.namespace": ("namespaces", "notNamespaces"),
    "source.ip": ("sourceIps", "notSourceIps"),
    "destination.port": ("destinationPorts", "notDestinationPorts"),
    "source.principal": ("principals", "notPrincipals"),
}


def _local_condition(condition: tuple[str, str, str]) -> dict[str, list[Any]]:
    key, polarity, value = condition
    positive, negative = _LOCAL_CONDITION_FIELDS[key]
    field = positive if polarity == "values" else negative
    written: Any
    if key == "destination.port":
        written = int(value)
    elif key == "source.ip":
        written = value
    else:
        written = {"exact": value}
    return {field: [written]}


# ---- compile ----------------------------------------------------------------------------------


def _required_terms(policies: Sequence[Policy], workload: Workload) -> int:
    """How many terms the workload's policies expand to, counted without the compiler's cap
    (what a workload that fell back would need)."""
    target = WorkloadSelectorTarget(workload.namespace, dict(workload.labels))
    total = 0
    for policy in policies:
        if not applies_to(policy, target):
            continue
        for rule in policy.rules:
            size = 1
            for clause in rule:
                if clause:
                    size *= sum(1 for m in clause if not m.is_empty())
            total += size
    return total


def entries_written(compiled: CompiledPolicies) -> dict[str, int]:
    """Map entries PolicyMaps.write would write for the set (one generation)."""
    tables = compiled.workloads
    counts = {
        "pol_workloads": sum(len(t.addresses) for t in tables),
        "pol_pages": sum(t.pages - 1 for t in tables),
        "pol_identities": sum(
            sum(
                1 for m in t.by_identity.values() if page_of(m, p) != page_of(t.identity_default, p)
            )
            for t in tables
            for p in range(t.pages)
        ),
        "pol_src_ips": sum(len(t.by_src) * t.pages for t in tables),
        "pol_dst_ips": sum(len(t.by_dst) * t.pages for t in tables),
        "pol_ports": sum(len(t.by_port) * t.pages for t in tables),
        "pol_terms": sum(len(t.terms) for t in tables),
    }
    counts["total"] = sum(counts.values())
    return counts


def _compile_case(
    policies: Sequence[Policy], destinations: Sequence[Workload], mesh: Sequence[Workload]
) -> tuple[CompiledPolicies, dict[str, Any]]:
    started = time.perf_counter()
    compiled = compile_policies(
        policies, [(w, w.labels) for w in destinations], mesh, IdentityNumbers(), PolicyNumbers()
    )
    seconds = time.perf_counter() - started
    terms: list[int] = []
    fallback = 0
    for workload, tables in zip(destinations, compiled.workloads, strict=True):
        if tables.flags & FALLBACK:
            fallback += 1
            terms.append(_required_terms(policies, workload))
        else:
            terms.append(len(tables.terms))
    identities = len(compiled.workloads[0].by_identity) if compiled.workloads else 0
    return compiled, {
        "destinations": len(destinations),
        "seconds": seconds,
        "ms_per_destination": 1000 * seconds / max(1, len(destinations)),
        "terms_per_workload": {
            "min": min(terms),
            "median": statistics.median(terms),
            "max": max(terms),
        },
        "fallback_workloads": fallback,
        "identities": identities,  # per destination: every mesh identity, plus unauthenticated
        "entries": entries_written(compiled),
    }


def _measure_compile(settings: Settings, log: TextIO) -> tuple[CompiledPolicies, dict[str, Any]]:
    """Parse and compile; returns the typical node's compiled set, to write next."""
    mesh = generate_mesh(settings)
    print(
        f"policy bench: {len(mesh.documents)} policies over {len(mesh.workloads)} workloads",
        file=log,
        flush=True,
    )
    started = time.perf_counter()
    policies = parse_policies(mesh.documents)
    parse_seconds = time.perf_counter() - started
    typical = [w for w in mesh.workloads if w.node == mesh.typical_node]
    print(f"policy bench: compiling for {len(typical)} workloads (one node)", file=log, flush=True)
    typical_compiled, typical_result = _compile_case(policies, typical, mesh.workloads)
    print(f"policy bench: compiling for all {len(mesh.workloads)} workloads", file=log, flush=True)
    _, worst_result = _compile_case(policies, mesh.workloads, mesh.workloads)
    k8s = sum(1 for d in mesh.documents if "apiVersion" in d)
    result = {
        "mesh": {
            "seed": SEED,
            "workloads": len(mesh.workloads),
            "namespaces": settings.namespaces,
            "nodes": len({w.node for w in mesh.workloads}),
            "policies": len(policies),
            "kubernetes_shape": k8s,
            "local_shape": len(policies) - k8s,
            "deny": sum(1 for p in policies if p.action is Action.DENY),
            "dry_run": sum(1 for p in policies if p.dry_run),
            "by_scope": {
                scope: sum(1 for p in policies if p.scope.value == scope)
                for scope in sorted({p.scope.value for p in policies})
            },
        },
        "parse_seconds": parse_seconds,
        "parse_us_per_policy": 1e6 * parse_seconds / len(policies),
        "typical_node": typical_result,
        "all_workloads": worst_result,
    }
    return typical_compiled, result


# ---- kernel: BPF_PROG_RUN ---------------------------------------------------------------------


def prog_run_ns(prog_fd: int, packet: bytes, repeat: int) -> int:
    """Average ns per run of a tc program over `repeat` runs, in the calling thread's netns."""
    return run_tc(prog_fd, packet, repeat=repeat).duration_ns


def syn_packet(src: str, sport: int, dst: str, dport: int) -> bytes:
    return packets.tcp4(src, sport, dst, dport)


# ---- write ------------------------------------------------------------------------------------


def _measure_write(
    datapath: LoadedDatapath,
    compiled: CompiledPolicies,
    settings: Settings,
    entries: Mapping[str, int],
    worst: Mapping[str, int],
) -> dict[str, Any]:
    maps = PolicyMaps(datapath)
    writes: list[float] = []
    clears: list[float] = []
    removed = 0
    # The first write goes into empty maps; each later one also has the live set beside it,
    # as in the agent, whose retired generation is then deleted.
    for _ in range(settings.write_rounds + 1):
        started = time.perf_counter()
        retired = maps.write(compiled)
        writes.append(time.perf_counter() - started)
        started = time.perf_counter()
        removed = maps.clear_generation(retired)
        clears.append(time.perf_counter() - started)
    config = datapath.table("pol_config")
    flips = 1000
    value = config.Leaf()
    value.gen = maps.generation
    started = time.perf_counter()
    for _ in range(flips):
        config[config.Key(0)] = value  # the flip itself: one array update (same gen here)
    flip_us = 1e6 * (time.perf_counter() - started) / flips
    live = sum(sum(1 for _ in datapath.table(name)) for name in ENTRY_MAPS)
    if live != entries["total"]:
        raise BenchError(
            f"after the writes the maps hold {live} entries, expected {entries['total']}"
        )
    maps.clear_generation(maps.generation)  # the decision part starts from empty maps
    capacity = {}
    for name in ENTRY_MAPS:
        max_entries = int(datapath.table(name).max_entries)
        capacity[name] = {
            "max_entries": max_entries,
            "typical_node": entries[name],
            "all_workloads": worst[name],
            # Two generations coexist while a new set is written.
            "all_workloads_fits": 2 * worst[name] <= max_entries,
        }
    later_writes = writes[1:]
    return {
        "entries": entries["total"],
        "first_write_seconds": writes[0],
        "write_seconds": statistics.median(later_writes),
        "us_per_entry": 1e6 * statistics.median(later_writes) / entries["total"],
        "clear_retired_seconds": statistics.median(clears[1:]),
        "clear_retired_entries": removed,
        "flip_us": flip_us,
        "capacity": capacity,
    }


# ---- decision ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Probe:
    """One SYN and the path it must take."""

    key: str  # "allowed", "default_deny" or "denied"
    dst_ip: str
    port: int
    verdict: VerdictReason
    policy_reason: int | None  # enum policy_reason counted in policy_stats; None: no decision


_NO_POLICY, _ALLOWED, _DENIED, _DEFAULT_DENY = 0, 1, 2, 3


def decision_policies(app: str, denies: int) -> list[Policy]:
    """For the workloads labelled app=`app`: `denies` single-term DENY policies on ports
    nobody connects to, plus one ALLOW for ALLOWED_PORT from the bench client's address (the
    probes are plaintext SYNs, which carry no principal). That is denies + 1 terms, the
    ALLOW's bit the highest (terms are ordered by policy name)."""
    selector = {"matchLabels": {"app": app}}
    documents: list[dict[str, Any]] = [
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"{app}-deny-{i:03d}", "namespace": DECISION_NS},
            "spec": {
                "selector": selector,
                "action": "DENY",
                "rules": [{"to": [{"operation": {"ports": [str(DENY_PORT_BASE + i)]}}]}],
            },
        }
        for i in range(denies)
    ]
    documents.append(
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": f"{app}-zz-allow", "namespace": DECISION_NS},
            "spec": {
                "selector": selector,
                "action": "ALLOW",
                "rules": [
                    {
                        "from": [{"source": {"ipBlocks": [f"{SRC_IP}/32"]}}],
                        "to": [{"operation": {"ports": [str(ALLOWED_PORT)]}}],
                    }
                ],
            },
        }
    )
    return [parse_policy(d) for d in documents]


class _DecisionRig:
    """One destination workload per configuration, all in the maps at once: the timed runs
    then go round-robin over every probe, so a noisy moment of the machine spreads over all
    of them instead of skewing one row."""

    def __init__(self, datapath: LoadedDatapath, worker: NetnsWorker, settings: Settings):
        self.datapath = datapath
        self.worker = worker
        self.settings = settings
        self.maps = PolicyMaps(datapath)
        self.fd = datapath.program_fds["pod_ingress"]
        self.src = Workload(
            "bench-src", "client", DECISION_NS, "client", (SRC_IP,), Protocol.HBONE, "node-01"
        )

    def destination(self, index: int, app: str) -> Workload:
        ip = f"10.250.1.{index + 1}"
        return Workload(
            f"bench-{app}", app, DECISION_NS, app, (ip,), Protocol.HBONE, "node-00",
            labels={"app": app},
        )  # fmt: skip

    def install(self, destinations: Sequence[Workload], policies: Sequence[Policy]) -> list[int]:
        compiled = compile_policies(
            policies,
            [(w, w.labels) for w in destinations],
            [*destinations, self.src],
            IdentityNumbers(),
            PolicyNumbers(),
        )
        self.maps.clear_generation(self.maps.write(compiled))
        pods = self.datapath.table("pods")
        for w in destinations:
            value = pods.Leaf()
            value.flags = abi.POD_CAPTURE
            pods[pods.Key(addr=pod_key_addr(w.ips[0]))] = value
        return [len(t.terms) for t in compiled.workloads]

    def check(self, name: str, probe: _Probe) -> None:
        """The SYN takes the expected path: the kernel's own counters say so."""
        verdicts, stats = self._verdicts(), self._reasons()
        self.worker.call(lambda: prog_run_ns(self.fd, self.packet(probe), WARMUP_REPEAT))
        verdict_delta = {k: v - verdicts.get(k, 0) for k, v in self._verdicts().items()}
        verdict_delta = {k: v for k, v in verdict_delta.items() if v}
        if verdict_delta != {probe.verdict: WARMUP_REPEAT}:
            raise BenchError(
                f"{name}, {probe.key}: expected {WARMUP_REPEAT} x {probe.verdict.name}, "
                f"the kernel counted {verdict_delta}"
            )
        reasons = {r: c - stats.get(r, 0) for r, c in self._reasons().items()}
        reasons = {r: c for r, c in reasons.items() if c}
        expected = {} if probe.policy_reason is None else {probe.policy_reason: WARMUP_REPEAT}
        if reasons != expected:
            raise BenchError(
                f"{name}, {probe.key}: expected policy decisions {expected}, "
                f"the kernel counted {reasons}"
            )

    def time(self, probes: Sequence[_Probe]) -> list[list[int]]:
        """ns/packet of each probe, `rounds` times, round-robin."""
        packets = [self.packet(p) for p in probes]
        repeat = self.settings.repeat
        samples: list[list[int]] = [[] for _ in probes]
        for _ in range(self.settings.rounds):
            for i, packet in enumerate(packets):
                ns = self.worker.call(functools.partial(prog_run_ns, self.fd, packet, repeat))
                samples[i].append(ns)
        return samples

    @staticmethod
    def packet(probe: _Probe) -> bytes:
        return syn_packet(SRC_IP, 40000, probe.dst_ip, probe.port)

    def _verdicts(self) -> dict[VerdictReason, int]:
        table = self.datapath.table("verdicts")
        return {VerdictReason(int(k.value)): int(sum(v)) for k, v in table.items()}

    def _reasons(self) -> dict[int, int]:
        by_reason: dict[int, int] = {}
        for (_, reason), count in self.maps.decisions().items():
            by_reason[reason] = by_reason.get(reason, 0) + count
        return by_reason


def _measure_decisions(
    datapath: LoadedDatapath, worker: NetnsWorker, settings: Settings, log: TextIO
) -> dict[str, Any]:
    rig = _DecisionRig(datapath, worker, settings)
    idle = rig.destination(0, "idle")  # enrolled, no policy applies to it
    configs = [(denies, rig.destination(i + 1, f"server-{denies}"))
               for i, denies in enumerate(DENY_COUNTS)]  # fmt: skip
    policies = [p for denies, w in configs for p in decision_policies(w.name, denies)]
    print(f"policy bench: decisions, {len(DENY_COUNTS) + 2} destinations", file=log, flush=True)
    terms = rig.install([idle] + [w for _, w in configs], policies)

    # (row name, terms, probes); "not enrolled": an address missing from the pods map.
    rows: list[tuple[str, int | None, list[_Probe]]] = [
        ("not enrolled", None, [_Probe("allowed", "10.250.1.200", ALLOWED_PORT,
                                       VerdictReason.PASS_NOT_ENROLLED, None)]),
        ("no policy", terms[0], [_Probe("allowed", idle.ips[0], ALLOWED_PORT,
                                        VerdictReason.DROP_NO_LISTENER, _NO_POLICY)]),
    ]  # fmt: skip
    for (denies, w), terms_of_w in zip(configs, terms[1:], strict=True):
        ip = w.ips[0]
        probes = [
            # Allowed SYNs go on to look for the 15006 listener, which the netns lacks.
            _Probe("allowed", ip, ALLOWED_PORT, VerdictReason.DROP_NO_LISTENER, _ALLOWED),
            _Probe("default_deny", ip, UNNAMED_PORT, VerdictReason.DROP_POLICY_DENIED,
                   _DEFAULT_DENY),
        ]  # fmt: skip
        if denies:
            # The last DENY: the highest bit of the DENY mask.
            probes.append(_Probe("denied", ip, DENY_PORT_BASE + denies - 1,
                                 VerdictReason.DROP_POLICY_DENIED, _DENIED))  # fmt: skip
        rows.append((f"{denies} DENY + 1 ALLOW", terms_of_w, probes))

    for name, _, probes in rows:
        for probe in probes:
            rig.check(name, probe)
    flat = [probe for _, _, probes in rows for probe in probes]
    samples = iter(rig.time(flat))
    results: list[dict[str, Any]] = []
    for name, count, probes in rows:
        row: dict[str, Any] = {"name": name, "terms": count}
        for probe in probes:
            runs = next(samples)
            row[probe.key] = {
                "ns": statistics.median(runs),
                "min_ns": min(runs),
                "samples": runs,
                "verdict": probe.verdict.name,
            }
        results.append(row)
    for row, denies in zip(results[2:], DENY_COUNTS, strict=True):
        row["deny_policies"] = denies
    not_enrolled = results[0]["allowed"]["ns"]
    no_policy = results[1]["allowed"]["ns"]
    for row in results:
        for key in ("allowed", "default_deny", "denied"):
            if key in row:
                row[key]["over_no_policy"] = row[key]["ns"] / no_policy
                row[key]["over_not_enrolled"] = row[key]["ns"] / not_enrolled
    return {
        "repeat": settings.repeat,
        "rounds": settings.rounds,
        "not_enrolled": results[0],
        "no_policy": results[1],
        "rows": results[2:],
    }


# ---- the whole run ----------------------------------------------------------------------------


def run_policy_bench(json_output: bool, quick: bool) -> int:
    settings = QUICK if quick else FULL
    log = sys.stderr if json_output else sys.stdout
    with _sigterm_as_interrupt():
        try:
            report = _run(settings, quick, log)
        except KeyboardInterrupt:
            print("interrupted: the bench's pins and netns are removed", file=sys.stderr)
            return 130
        except Exception as exc:
            print(f"policy bench failed: {exc}", file=sys.stderr)
            if json_output:
                print(json.dumps({"ok": False, "error": str(exc)}, indent=2))
            return 1
    if json_output:
        print(json.dumps(report, indent=2))
    else:
        print()
        print(format_report(report))
    return 0


def _run(settings: Settings, quick: bool, log: TextIO) -> dict[str, Any]:
    preflight()
    typical, compile_result = _measure_compile(settings, log)
    tag = secrets.token_hex(4)
    netns = f"polbench-{tag}"
    datapath: LoadedDatapath | None = None
    worker: NetnsWorker | None = None
    netns_made = False
    try:
        print("policy bench: loading the datapath", file=log, flush=True)
        datapath = LoadedDatapath(abi.DEFAULT_PIN_DIR / f"bench-{tag}")
        print("policy bench: writing the typical node's set", file=log, flush=True)
        write_result = _measure_write(
            datapath,
            typical,
            settings,
            compile_result["typical_node"]["entries"],
            compile_result["all_workloads"]["entries"],
        )
        made = subprocess.run(["ip", "netns", "add", netns], capture_output=True, text=True)
        netns_made = made.returncode == 0
        if not netns_made:
            raise BenchError(f"ip netns add {netns}: {made.stderr.strip()}")
        worker = NetnsWorker(f"/run/netns/{netns}")
        decision_result = _measure_decisions(datapath, worker, settings, log)
    finally:
        if worker is not None:
            worker.close()
        if netns_made:
            subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)
        if datapath is not None:
            datapath.close(unpin=True)
    return {
        "ok": True,
        "quick": quick,
        "machine": {
            "cpus": os.cpu_count(),
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "max_terms": MAX_TERMS,
        "compile": compile_result,
        "write": write_result,
        "decision": decision_result,
    }


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM takes the Ctrl-C path, so the finally blocks remove what the run made."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupted(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- output -----------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = f"{cells[0]:<{widths[0]}}"
        return "  ".join(
            [first, *(f"{c:>{w}}" for c, w in zip(cells[1:], widths[1:], strict=True))]
        )

    return [line(header), *(line(r) for r in rows)]


def format_report(report: Mapping[str, Any]) -> str:
    c = report["compile"]
    m = c["mesh"]
    lines = [
        f"synthetic mesh (seed {m['seed']}): {m['workloads']} workloads in {m['namespaces']} "
        f"namespaces on {m['nodes']} nodes; {m['policies']} policies ({m['kubernetes_shape']} "
        f"Kubernetes, {m['local_shape']} local shape; {m['deny']} DENY; {m['dry_run']} dry-run; "
        + ", ".join(f"{n} {s}" for s, n in m["by_scope"].items())
        + ")",
        f"parse: {c['parse_seconds']:.2f} s ({c['parse_us_per_policy']:.0f} us/policy)",
        "",
    ]
    cases = (("one node", c["typical_node"]), ("all workloads", c["all_workloads"]))
    lines += _table(
        (
            "compile",
            "destinations",
            "seconds",
            "ms/dest",
            "terms min/med/max",
            f"fallback (>{report['max_terms']})",
            "identities",
            "map entries",
        ),
        [
            (
                name,
                str(r["destinations"]),
                f"{r['seconds']:.2f}",
                f"{r['ms_per_destination']:.1f}",
                "{min}/{median:g}/{max}".format(**r["terms_per_workload"]),
                str(r["fallback_workloads"]),
                str(r["identities"]),
                str(r["entries"]["total"]),
            )
            for name, r in cases
        ],
    )
    w = report["write"]
    lines += [
        "",
        *_table(
            ("map", "one node", "all workloads", "max_entries", "all fit (2 gens)"),
            [
                (
                    name,
                    str(v["typical_node"]),
                    str(v["all_workloads"]),
                    str(v["max_entries"]),
                    "yes" if v["all_workloads_fits"] else "NO",
                )
                for name, v in w["capacity"].items()
            ],
        ),
    ]
    lines += [
        "",
        f"write (one node, {w['entries']} entries): {w['write_seconds'] * 1000:.0f} ms "
        f"({w['us_per_entry']:.1f} us/entry; first write into empty maps "
        f"{w['first_write_seconds'] * 1000:.0f} ms)",
        f"clear retired generation: {w['clear_retired_seconds'] * 1000:.0f} ms "
        f"({w['clear_retired_entries']} entries); the flip itself: {w['flip_us']:.1f} us",
        "",
    ]
    d = report["decision"]

    def cell(result: Mapping[str, Any] | None, key: str = "ns") -> str:
        if result is None:
            return "-"
        if key == "ns":
            return f"{result['ns']:.0f} ({result['min_ns']})"
        return f"{result[key]:.2f}"

    lines.append(
        f"pod_ingress, ns/packet: median (min) of {d['rounds']} BPF_PROG_RUN runs "
        f"x {d['repeat']}, round-robin over all rows"
    )
    times = [
        ("not enrolled", "-", cell(d["not_enrolled"]["allowed"]), "-", "-"),
        ("no policy", "0", cell(d["no_policy"]["allowed"]), "-", "-"),
    ]
    ratios = [("no policy", "1.00", cell(d["no_policy"]["allowed"], "over_not_enrolled"), "-", "-")]
    for r in d["rows"]:
        allowed, default_deny, denied = r["allowed"], r["default_deny"], r.get("denied")
        times.append((r["name"], str(r["terms"]), cell(allowed), cell(default_deny), cell(denied)))
        ratios.append(
            (
                r["name"],
                cell(allowed, "over_no_policy"),
                cell(allowed, "over_not_enrolled"),
                cell(default_deny, "over_not_enrolled"),
                cell(denied, "over_not_enrolled"),
            )
        )
    lines += _table(
        ("policies on the destination", "terms", "allowed", "default-deny", "denied"), times
    )
    lines += ["", "ratios"]
    lines += _table(
        (
            "policies on the destination",
            "allowed/no-policy",
            "allowed/not-enrolled",
            "default-deny/not-enrolled",
            "denied/not-enrolled",
        ),
        ratios,
    )
    machine = report["machine"]
    lines.append(
        f"({machine['cpus']} CPUs, kernel {machine['kernel']}, Python {machine['python']})"
    )
    return "\n".join(lines)
