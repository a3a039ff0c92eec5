"""Which names the mesh answers: Service hostnames and their short forms, an authoritative
"no" for unknown <service>.<namespace>.svc names, and everything else forwarded."""

from __future__ import annotations

import pytest

from agent.dns.names import FORWARD, Known, MeshNames, Unknown
from agent.state.service import Service
from agent.state.store import MeshState

ECHO = Known("echo.default.svc.cluster.local", ("10.96.0.10",), ("fd00::10",))
ECHO_OTHER = Known("echo.other.svc.cluster.local", ("10.96.1.10",), ())


@pytest.mark.parametrize(
    "qname",
    [
        "echo.default.svc.cluster.local",
        "echo.default.svc.cluster.local.",
        "EcHo.Default.SVC.cluster.LOCAL.",
        "echo",
        "echo.",
        "echo.default",
        "echo.default.svc",
        "ECHO.default.svc.",
    ],
)
def test_hostname_and_short_forms_resolve(names: MeshNames, qname: str) -> None:
    assert names.resolve(qname, "default") == ECHO


def test_short_names_follow_the_pods_namespace(names: MeshNames) -> None:
    assert names.resolve("echo", "other") == ECHO_OTHER
    assert names.resolve("echo.other", "default") == ECHO_OTHER
    assert names.resolve("v4only", "other") is FORWARD  # not in the pod's namespace
    assert names.resolve("v4only.default", "other") == Known(
        "v4only.default.svc.cluster.local", ("10.96.0.11",), ()
    )


def test_unknown_service_names_are_an_authoritative_no(names: MeshNames) -> None:
    assert names.resolve("nope.default.svc.cluster.local.", "default") == Unknown(
        "nope.default.svc.cluster.local"
    )
    assert isinstance(names.resolve("echo.elsewhere.svc.cluster.local", "default"), Unknown)


@pytest.mark.parametrize(
    "qname",
    [
        # What glibc sends first for echo.default.svc.cluster.local with ndots:5 and the
        # search list of a pod in default: each must be an NXDOMAIN at once, not a forward
        # that times out upstream before the name as written is tried.
        "echo.default.svc.cluster.local.default.svc.cluster.local",
        "echo.default.svc.cluster.local.svc.cluster.local",
        "echo.default.svc.cluster.local.cluster.local",
        "echo.svc.cluster.local",  # a bare `echo` with the search list: no namespace echo
        "x.echo.default.svc.cluster.local",  # a Service with a VIP has no names under it
        "echo.default.other.cluster.local",
    ],
)
def test_the_cluster_domain_is_answered_with_authority(names: MeshNames, qname: str) -> None:
    assert names.resolve(qname, "default") == Unknown(qname)


@pytest.mark.parametrize(
    "qname",
    [
        "example.com.",
        "nope",  # a short name that is no Service: the pod's resolver tries its search list
        "nope.default",
        "db.default.svc.cluster.local",  # headless: its pods' addresses are upstream's
        "db",
        "pod-0.db.default.svc.cluster.local",
        "_http._tcp.echo.default.svc.cluster.local",
        "10-0-0-3.default.pod.cluster.local",
        "default.svc.cluster.local",
        "svc.cluster.local",
        "cluster.local",
        ".",
        "",
        "echo\\.default.svc.cluster.local",  # a dot inside a label is not the hostname
        "a\\.b.svc.cluster.local",
    ],
)
def test_everything_else_is_forwarded(names: MeshNames, qname: str) -> None:
    assert names.resolve(qname, "default") is FORWARD


def test_hostnames_outside_the_domain_resolve_in_full_only(names: MeshNames) -> None:
    assert names.resolve("api.example.com", "default") == Known(
        "api.example.com", ("240.240.0.1",), ()
    )
    assert names.resolve("api", "default") is FORWARD


def test_other_cluster_domain() -> None:
    state = MeshState(
        services=(Service("echo", "default", "echo.default.svc.corp.internal", ("10.96.0.10",)),)
    )
    names = MeshNames.of(state, domain="Corp.Internal.")
    assert names.resolve("echo", "default") == Known(
        "echo.default.svc.corp.internal", ("10.96.0.10",), ()
    )
    assert isinstance(names.resolve("nope.default.svc.corp.internal", "default"), Unknown)
    assert names.resolve("nope.default.svc.cluster.local", "default") is FORWARD


def test_vips_split_by_family_and_bad_ones_skipped() -> None:
    service = Service("s", "ns", "s.ns.svc.cluster.local", ("fd00:0::1", "bogus", "10.0.0.1"))
    names = MeshNames.of(MeshState(services=(service,)))
    assert names.resolve("s.ns", "default") == Known(
        "s.ns.svc.cluster.local", ("10.0.0.1",), ("fd00::1",)
    )
    only_bogus = Service("t", "ns", "t.ns.svc.cluster.local", ("bogus",))
    assert MeshNames.of(MeshState(services=(only_bogus,))).resolve("t.ns", "x") is FORWARD


def test_first_service_claiming_a_hostname_wins() -> None:
    first = Service("a", "ns", "a.ns.svc.cluster.local", ("10.0.0.1",))
    second = Service("a", "ns", "A.ns.svc.cluster.local", ("10.0.0.2",))
    names = MeshNames.of(MeshState(services=(first, second)))
    assert names.resolve("a.ns", "x") == Known("a.ns.svc.cluster.local", ("10.0.0.1",), ())
