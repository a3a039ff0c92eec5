"""Which DNS names the mesh answers itself, sans-IO: a name in, a Resolution out.

The agent learns every Service from its source, as kube-dns does, so it answers for the
cluster domain with authority: a Service name with VIPs gets them, and a name in the domain
that can exist only as a Service (or under one with a VIP) gets "no such name". That
includes the names a pod's resolver tries first from its search list (ndots:5 makes
`echo.default.svc.cluster.local` go out as `echo.default.svc.cluster.local.default.svc.
cluster.local` and so on before it is tried as written): answered at once, they cost the pod
nothing. What only the cluster's DNS has (names outside the domain, headless Services and
the pod records under them, `*.pod.<domain>`) goes to the pod's own nameserver unchanged,
so the proxy never changes an answer it does not own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from agent.state.service import Service
from agent.state.store import MeshState

DEFAULT_DOMAIN = "cluster.local"


@dataclass(frozen=True, slots=True)
class Known:
    """A Service with VIPs: `name` is its hostname, whatever form the question took."""

    name: str
    ipv4: tuple[str, ...]
    ipv6: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Unknown:
    """`<service>.<namespace>.svc.<domain>` for no Service: an authoritative NXDOMAIN."""

    name: str


@dataclass(frozen=True, slots=True)
class Forward:
    """Not the mesh's to answer: the query goes to the pod's nameserver."""


Resolution = Known | Unknown | Forward

FORWARD = Forward()


def _normalise(name: str) -> str:
    # DNS compares names case-insensitively in ASCII only; dnspython's text form escapes
    # every byte outside printable ASCII, so str.lower() touches nothing else.
    return name.lower().removesuffix(".")


@dataclass(frozen=True, slots=True)
class MeshNames:
    """The Service hostnames of one MeshState, indexed for lookups on every query."""

    domain: str
    # Lower-case hostname -> what a question for it resolves to (Known, or FORWARD for a
    # headless Service, whose pod records only the cluster's DNS has).
    _by_hostname: Mapping[str, Known | Forward]
    # Namespaces that hold a Service, by name (lower case).
    _namespaces: frozenset[str] = frozenset()

    @classmethod
    def of(cls, state: MeshState, domain: str = DEFAULT_DOMAIN) -> MeshNames:
        by_hostname: dict[str, Known | Forward] = {}
        for service in state.services:
            # The first Service to claim a hostname wins, as in MeshState's own indexes.
            by_hostname.setdefault(_normalise(service.hostname), _resolution_of(service))
        namespaces = frozenset(service.namespace.lower() for service in state.services)
        return cls(_normalise(domain), by_hostname, namespaces)

    def resolve(self, qname: str, pod_namespace: str) -> Resolution:
        """What a question for `qname` (text form, trailing dot optional) from a pod in
        `pod_namespace` resolves to."""
        name = _normalise(qname)
        if not name or "\\" in name:
            # The root, or a name with escaped bytes (a dot or a non-ASCII byte inside a
            # label): no Service hostname is spelled so, and splitting it on dots would miscount.
            return FORWARD
        found = self._by_hostname.get(name)
        if found is not None:
            return found
        suffix = "." + self.domain
        if name == self.domain:
            return FORWARD
        if name.endswith(suffix):
            return self._within_domain(name)
        # A short form the pod's resolver would have completed from its search list, in the
        # order kubelet writes it to resolv.conf.
        searches = (f"{pod_namespace.lower()}.svc.{self.domain}", f"svc.{self.domain}", self.domain)
        for search in searches:
            found = self._by_hostname.get(f"{name}.{search}")
            if found is not None:
                return found
        return FORWARD

    def _within_domain(self, name: str) -> Resolution:
        labels = name.removesuffix("." + self.domain).split(".")
        if labels[-1] == "pod" or labels[0].startswith("_"):
            return FORWARD  # pod records and SRV names: the cluster's DNS has them
        if labels[-1] != "svc":
            return Unknown(name)  # no other branch of the domain holds names
        if len(labels) == 2 and labels[0] not in self._namespaces:
            # `<ns>.svc.<domain>` for a namespace without Services, such as the search-list
            # expansion of a bare `echo`: no such name.
            return Unknown(name)
        if len(labels) < 3:
            return FORWARD  # `svc.<domain>`, a namespace with Services: names without records
        # Under a Service: `<x>.<service>.<namespace>.svc`. A headless Service's pod records
        # (and SRV names) are the cluster DNS's; a Service with a VIP has none, and no
        # Service means no such name.
        service = f"{labels[-3]}.{labels[-2]}.svc.{self.domain}"
        if len(labels) > 3 and self._by_hostname.get(service) is FORWARD:  # headless
            return FORWARD
        return Unknown(name)


def _resolution_of(service: Service) -> Known | Forward:
    ipv4: list[str] = []
    ipv6: list[str] = []
    for vip in service.vips:
        try:
            address = ipaddress.ip_address(vip)
        except ValueError:
            continue  # the store skips such VIPs too; one bad VIP does not hide the rest
        (ipv4 if address.version == 4 else ipv6).append(str(address))
    if not ipv4 and not ipv6:
        return FORWARD
    return Known(_normalise(service.hostname), tuple(ipv4), tuple(ipv6))
