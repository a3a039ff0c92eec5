"""The allow-only-waypoint option (deep guide §20, lab 2), as L4 policies.

Istio's ztunnel has no bypass check: a client that dials a waypoint-bound pod directly, or
plaintext from outside the mesh, reaches it without L7 policy. With the option on a
waypoint, every workload it serves (pods bound to it, and pods backing Services bound to
it) gets an ALLOW for the waypoint's identity. An ALLOW policy makes the kernel deny what no
ALLOW admits, so other sources are refused there, unless the user's own ALLOW admits them.
"""

from __future__ import annotations

from agent.identity.spiffe import SpiffeId
from agent.state.policy import Action, Match, Policy, Scope, StringMatch, StringMatchKind
from agent.state.service import Service
from agent.state.waypoint import Waypoint
from agent.state.workload import Workload

POLICY_PREFIX = "ambient-allow-only-waypoint-"


def _identities(waypoint: Waypoint, workloads: tuple[Workload, ...]) -> list[SpiffeId]:
    """The waypoint's identities: its pods' (those at its address, or backing the Service at
    it), else Istio's convention, the Gateway's name as service account."""
    at_address = [w for w in workloads if waypoint.address in w.ips]
    pods = at_address or [
        w
        for w in workloads
        if any(key.startswith(f"{waypoint.namespace}/{waypoint.name}.") for key in w.services)
    ]
    if pods:
        return sorted(
            {SpiffeId(p.trust_domain, p.namespace, p.service_account) for p in pods},
            key=lambda i: i.uri,
        )
    trust_domain = workloads[0].trust_domain if workloads else "cluster.local"
    return [SpiffeId(trust_domain, waypoint.namespace, waypoint.name)]


def allow_only_waypoint_policies(
    workloads: tuple[Workload, ...], services: tuple[Service, ...]
) -> tuple[Policy, ...]:
    served: dict[str, set[str]] = {}
    waypoints: dict[str, Waypoint] = {}
    bound_services = {
        s.key: s.waypoint for s in services if s.waypoint is not None and s.waypoint.allow_only
    }
    for workload in workloads:
        found = [bound_services[key] for key in workload.services if key in bound_services]
        if workload.waypoint is not None and workload.waypoint.allow_only:
            found.append(workload.waypoint)
        for waypoint in found:
            waypoints.setdefault(waypoint.key, waypoint)
            served.setdefault(waypoint.key, set()).add(workload.uid)
    policies = []
    for key, waypoint in sorted(waypoints.items()):
        principals = tuple(
            StringMatch(StringMatchKind.EXACT, identity.uri.removeprefix("spiffe://"))
            for identity in _identities(waypoint, workloads)
        )
        policies.append(
            Policy(
                name=POLICY_PREFIX + (waypoint.name or waypoint.address),
                namespace=waypoint.namespace or "default",
                scope=Scope.GLOBAL,
                action=Action.ALLOW,
                rules=(((Match(principals=principals),),),),
                workload_uids=tuple(sorted(served[key])),
            )
        )
    return tuple(policies)
