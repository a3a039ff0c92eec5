"""The reference semantics against the hand-written table, and ztunnel's own edge cases."""

from __future__ import annotations

import ipaddress

import pytest

from agent.state.policy import (
    Action,
    Connection,
    Decision,
    Match,
    Policy,
    Reason,
    Scope,
    StringMatch,
    StringMatchKind,
    Verdict,
)
from tests.support.policy_cases import CASES, CLIENT, MANY_POLICY_CASES, PLAIN, SERVER, Case
from tests.support.policy_reference import decide, policy_matches


def test_the_table_is_big_enough_and_names_are_unique() -> None:
    assert len(CASES) >= 45
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_case(case: Case) -> None:
    assert decide(case.policies, case.target, case.conn) == case.expected


@pytest.mark.parametrize("case", MANY_POLICY_CASES, ids=[c.name for c in MANY_POLICY_CASES])
def test_many_policy_case(case: Case) -> None:
    assert decide(case.policies, case.target, case.conn) == case.expected


def test_decision_does_not_depend_on_input_order() -> None:
    for case in CASES:
        reversed_order = tuple(reversed(case.policies))
        assert decide(reversed_order, case.target, case.conn) == case.expected, case.name


def _policy(rules: tuple[tuple[tuple[Match, ...], ...], ...]) -> Policy:
    return Policy("p", "default", Scope.NAMESPACE, Action.ALLOW, rules)


def test_empty_structures_as_in_ztunnel() -> None:
    # rbac.rs rbac_empty_policy: an empty match never matches, an empty clause or rule does,
    # and a policy without rules never does.
    assert not policy_matches(_policy((((Match(),),),)), PLAIN)
    assert policy_matches(_policy((((),),)), PLAIN)
    assert policy_matches(_policy(((),)), PLAIN)
    assert not policy_matches(_policy(()), PLAIN)


def test_no_identity_never_matches_a_principal_not_even_an_empty_prefix() -> None:
    # ztunnel's matches_principal fails without the "spiffe://" it strips.
    anything = Match(principals=(StringMatch(StringMatchKind.PREFIX, ""),))
    assert not policy_matches(_policy((((anything,),),)), PLAIN)
    assert policy_matches(_policy((((anything,),),)), CLIENT)


def test_ipv4_source_never_matches_an_ipv6_network() -> None:
    v6 = Match(source_ips=(ipaddress.ip_network("::/0"),))
    assert not policy_matches(_policy((((v6,),),)), CLIENT)
    v6_conn = Connection("fd00::1", "fd00::2", 8080, None)
    assert policy_matches(_policy((((v6,),),)), v6_conn)


def test_dry_run_policy_that_does_not_apply_is_ignored() -> None:
    other = Policy("dry", "other", Scope.NAMESPACE, Action.DENY, ((),), dry_run=True)
    assert decide((other,), SERVER, CLIENT) == Decision(Verdict.ALLOW, Reason.NO_POLICY)
