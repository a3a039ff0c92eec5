"""answer() and servfail(): the decision for one query's bytes, no sockets."""

from __future__ import annotations

import random

import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsigkeyring
import pytest

from agent.dns.answer import (
    OUR_EDNS_PAYLOAD,
    TTL,
    Drop,
    ForwardQuery,
    Reason,
    Reply,
    Transport,
    answer,
    servfail,
)
from agent.dns.names import MeshNames
from agent.state.service import Service
from agent.state.store import MeshState

TRANSPORTS: tuple[Transport, ...] = ("udp", "tcp")


def query(
    name: str, rdtype: str = "A", use_edns: int | bool | None = None, payload: int | None = None
) -> dns.message.Message:
    return dns.message.make_query(name, rdtype, use_edns=use_edns, payload=payload)


def reply_to(q: dns.message.Message, names: MeshNames) -> tuple[dns.message.Message, Reason]:
    decision = answer(q.to_wire(), names, "default")
    assert isinstance(decision, Reply), decision
    return dns.message.from_wire(decision.wire), decision.reason


def addresses(response: dns.message.Message) -> list[str]:
    return [rdata.to_text() for rrset in response.answer for rdata in rrset]


def test_a_record_for_a_service(names: MeshNames) -> None:
    q = query("Echo.Default.svc.cluster.local")
    response, reason = reply_to(q, names)
    assert reason == Reason.ANSWERED
    assert response.id == q.id
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA and response.flags & dns.flags.RA
    assert response.flags & dns.flags.RD  # copied from the query
    (rrset,) = response.answer
    # Named as asked, case and all.
    assert rrset.name.to_text() == "Echo.Default.svc.cluster.local."
    assert rrset.ttl == TTL
    assert addresses(response) == ["10.96.0.10"]


def test_aaaa_record_and_short_form(names: MeshNames) -> None:
    response, reason = reply_to(query("echo", "AAAA"), names)
    assert reason == Reason.ANSWERED
    assert response.answer[0].name == dns.name.from_text("echo.")
    assert response.answer[0].rdtype == dns.rdatatype.AAAA
    assert addresses(response) == ["fd00::10"]


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [("v4only.default", "AAAA"), ("echo", "MX"), ("echo", "TXT"), ("echo", "ANY")],
)
def test_nodata_for_types_the_service_has_no_records_of(
    names: MeshNames, name: str, rdtype: str
) -> None:
    response, reason = reply_to(query(name, rdtype), names)
    assert reason == Reason.NODATA
    assert response.rcode() == dns.rcode.NOERROR
    assert response.flags & dns.flags.AA
    assert response.answer == []


def test_nxdomain_for_an_unknown_service(names: MeshNames) -> None:
    response, reason = reply_to(query("nope.default.svc.cluster.local"), names)
    assert reason == Reason.NXDOMAIN
    assert response.rcode() == dns.rcode.NXDOMAIN
    assert response.flags & dns.flags.AA


@pytest.mark.parametrize("name", ["example.com", "db.default.svc.cluster.local", "nope"])
def test_other_names_are_forwarded_byte_for_byte(names: MeshNames, name: str) -> None:
    wire = query(name, use_edns=0, payload=1400).to_wire()
    assert answer(wire, names, "default") == ForwardQuery(wire)


def test_other_classes_and_signed_queries_are_forwarded(names: MeshNames) -> None:
    chaos = dns.message.make_query("echo.default.svc.cluster.local", "TXT", "CH").to_wire()
    assert answer(chaos, names, "default") == ForwardQuery(chaos)
    signed = query("echo.default.svc.cluster.local")
    signed.use_tsig(dns.tsigkeyring.from_text({"key.": "c2VjcmV0c2VjcmV0"}), keyname="key.")
    wire = signed.to_wire()
    assert answer(wire, names, "default") == ForwardQuery(wire)


def test_garbage_after_a_valid_header_is_formerr_with_the_id(names: MeshNames) -> None:
    wire = bytes.fromhex("beef 0100 0001 0000 0000 0000") + b"\xff\xfe\x07junk"
    decision = answer(wire, names, "default")
    assert isinstance(decision, Reply) and decision.reason == Reason.FORMERR
    response = dns.message.from_wire(decision.wire)
    assert response.id == 0xBEEF
    assert response.rcode() == dns.rcode.FORMERR
    assert response.flags & dns.flags.QR and response.flags & dns.flags.RD


def test_trailing_bytes_after_a_query_are_formerr(names: MeshNames) -> None:
    q = query("echo.default.svc.cluster.local")
    decision = answer(q.to_wire() + b"\x00", names, "default")
    assert isinstance(decision, Reply) and decision.reason == Reason.FORMERR
    assert dns.message.from_wire(decision.wire).id == q.id


def test_not_exactly_one_question_is_formerr(names: MeshNames) -> None:
    none = dns.message.Message(id=7)
    response, reason = reply_to(none, names)
    assert (reason, response.id, response.rcode()) == (Reason.FORMERR, 7, dns.rcode.FORMERR)
    two = query("echo.default.svc.cluster.local")
    two.question.append(
        dns.rrset.RRset(dns.name.from_text("echo."), dns.rdataclass.IN, dns.rdatatype.A)
    )
    response, reason = reply_to(two, names)
    assert (reason, response.id, response.rcode()) == (Reason.FORMERR, two.id, dns.rcode.FORMERR)


def test_other_opcodes_are_notimp(names: MeshNames) -> None:
    notify = query("echo.default.svc.cluster.local")
    notify.set_opcode(dns.opcode.NOTIFY)
    response, reason = reply_to(notify, names)
    assert reason == Reason.NOTIMP
    assert (response.id, response.rcode(), response.opcode()) == (
        notify.id,
        dns.rcode.NOTIMP,
        dns.opcode.NOTIFY,
    )


def test_short_messages_and_responses_are_dropped(names: MeshNames) -> None:
    for size in range(12):
        assert answer(b"\x00" * size, names, "default") == Drop(Reason.MALFORMED)
    q = query("echo.default.svc.cluster.local")
    response = dns.message.make_response(q)
    assert answer(response.to_wire(), names, "default") == Drop(Reason.NOT_A_QUERY)
    assert answer(b"\x12\x34\x80" + b"\x00" * 9, names, "default") == Drop(Reason.NOT_A_QUERY)


def test_edns_is_answered_with_edns(names: MeshNames) -> None:
    response, _ = reply_to(query("echo", use_edns=0, payload=4096), names)
    assert response.edns == 0
    assert response.payload == OUR_EDNS_PAYLOAD
    response, _ = reply_to(query("nope.default.svc.cluster.local", use_edns=0), names)
    assert response.edns == 0
    response, _ = reply_to(query("echo", use_edns=False), names)
    assert response.edns == -1


def test_edns_versions_above_zero_get_badvers(names: MeshNames) -> None:
    response, reason = reply_to(query("echo", use_edns=1), names)
    assert reason == Reason.BADVERS
    assert response.rcode() == dns.rcode.BADVERS
    assert response.edns == 0


@pytest.fixture
def big() -> MeshNames:
    vips = tuple(f"10.97.0.{i}" for i in range(1, 101))  # 100 A records: 1.6 KB of answer
    return MeshNames.of(
        MeshState(services=(Service("big", "default", "big.default.svc.cluster.local", vips),))
    )


@pytest.mark.parametrize("edns", [False, 0])
def test_udp_reply_over_the_clients_size_is_truncated(big: MeshNames, edns: bool | int) -> None:
    # EDNS at 512 bytes (the floor) or no EDNS: both mean 512.
    wire = query("big", use_edns=edns, payload=512).to_wire()
    decision = answer(wire, big, "default")
    assert isinstance(decision, Reply) and decision.reason == Reason.ANSWERED
    assert len(decision.wire) <= 512
    response = dns.message.from_wire(decision.wire)
    assert response.flags & dns.flags.TC
    assert response.answer == []


def test_reply_within_the_clients_size_is_whole(big: MeshNames) -> None:
    wire = query("big", use_edns=0, payload=4096).to_wire()
    decision = answer(wire, big, "default")
    assert isinstance(decision, Reply)
    assert 512 < len(decision.wire) <= 4096
    response = dns.message.from_wire(decision.wire)
    assert not response.flags & dns.flags.TC
    assert len(addresses(response)) == 100


def test_tcp_reply_is_never_truncated(big: MeshNames) -> None:
    decision = answer(query("big").to_wire(), big, "default", transport="tcp")
    assert isinstance(decision, Reply)
    response = dns.message.from_wire(decision.wire)
    assert not response.flags & dns.flags.TC
    assert len(addresses(response)) == 100


def test_servfail_keeps_id_question_and_edns() -> None:
    q = query("example.com", "AAAA", use_edns=0)
    wire = servfail(q.to_wire())
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert response.id == q.id
    assert response.rcode() == dns.rcode.SERVFAIL
    assert response.question == q.question
    assert response.edns == 0
    assert not response.flags & dns.flags.AA


def test_servfail_for_what_cannot_be_parsed_or_answered() -> None:
    assert servfail(b"\x01\x02\x01") is None
    assert servfail(b"\x01\x02\x81\x00" + b"\x00" * 8) is None  # a response
    wire = servfail(bytes.fromhex("abcd 0100 0001 0000 0000 0000") + b"\xc0")
    assert wire is not None
    response = dns.message.from_wire(wire)
    assert (response.id, response.rcode()) == (0xABCD, dns.rcode.SERVFAIL)


def test_random_bytes_never_raise(names: MeshNames) -> None:
    rng = random.Random(53)
    valid = [
        query(n, t, use_edns=e).to_wire()
        for n in ("echo", "nope.default.svc.cluster.local", "example.com")
        for t in ("A", "AAAA")
        for e in (False, 0)
    ]
    inputs = [rng.randbytes(rng.randrange(0, 80)) for _ in range(2000)]
    for _ in range(2000):  # valid queries with a few bytes changed: deeper into the parser
        mutated = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        inputs.append(
            bytes(mutated[: rng.randrange(len(mutated) + 1)] if rng.random() < 0.2 else mutated)
        )
    for wire in inputs:
        for transport in TRANSPORTS:
            decision = answer(wire, names, "default", transport=transport)
            if isinstance(decision, ForwardQuery):
                assert decision.wire == wire
                assert servfail(wire) is not None
            elif isinstance(decision, Reply):
                # A reply always goes to the query it answers.
                assert decision.wire[:2] == wire[:2] and decision.wire[2] & 0x80
            else:
                assert servfail(wire) is None or decision.reason == Reason.MALFORMED
