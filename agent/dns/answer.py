"""What to do with one DNS query, sans-IO: wire bytes in, a Decision out.

A query for a mesh Service is answered here (A/AAAA from its VIPs, or an authoritative
NXDOMAIN); anything else is forwarded as the very bytes the pod sent, so that the upstream
sees the pod's own id, flags and EDNS options. Nothing here raises on input: every way a
query can be wrong is a Reason, counted by the shell under `ambient_dns_requests_total`.

Choices made where the RFCs leave room:
- Responses arriving as queries, and anything shorter than a header, are dropped without a
  word: a reply to a forged source would make the proxy a reflector.
- Opcodes other than QUERY (NOTIFY, UPDATE, ...) get NOTIMP, as BIND and CoreDNS answer
  them; a message that cannot be parsed gets FORMERR with its id, built from the header.
- A TSIG-signed query is forwarded: only a server that holds the key can answer it.
- Negative answers carry no SOA, so resolvers do not cache them; the next question is
  answered as cheaply as this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Literal

import dns.flags
import dns.message
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from agent.dns.names import Forward, Known, MeshNames, Unknown

Transport = Literal["udp", "tcp"]

HEADER_SIZE = 12
TTL = 30
# The UDP size a client may assume without EDNS (RFC 1035), and the one the proxy
# advertises in its own OPT record (DNS Flag Day 2020: no fragmentation on common paths).
CLASSIC_UDP_SIZE = 512
OUR_EDNS_PAYLOAD = 1232
TCP_MAX_MESSAGE = 65535

_OPCODE_MASK = 0x7800


class Reason(StrEnum):
    """Every value of the `reason` label of ambient_dns_requests_total: each query is
    counted once, under what became of it."""

    # Decided here, by answer():
    ANSWERED = "answered"  # A/AAAA records for a mesh Service
    NODATA = "nodata"  # a mesh Service, but no records of the type asked
    NXDOMAIN = "nxdomain"  # a name of the cluster domain that no Service has
    FORMERR = "formerr"  # unparseable, or not exactly one question
    NOTIMP = "notimp"  # an opcode other than QUERY
    BADVERS = "badvers"  # EDNS version above 0 (RFC 6891)
    MALFORMED = "malformed"  # shorter than a header, or a broken TCP length: no reply
    NOT_A_QUERY = "not_a_query"  # a response (QR set) sent as a query: no reply
    # Decided by the shell (agent/dns/server.py), for queries answer() forwards or replies
    # it could not deliver:
    FORWARDED = "forwarded"
    FORWARD_FAILED = "forward_failed"  # upstream timed out, failed, or answered nonsense
    OVERLOADED = "overloaded"  # too many forwards pending: SERVFAIL at once
    SEND_FAILED = "send_failed"  # the reply could not be sent to the client
    NO_ORIGINAL_DESTINATION = "no_original_destination"  # a datagram without its orig dst
    ERROR = "error"  # a bug in the proxy: SERVFAIL, and logged


@dataclass(frozen=True, slots=True)
class Reply:
    """Send `wire` back to the client."""

    wire: bytes
    reason: Reason


@dataclass(frozen=True, slots=True)
class ForwardQuery:
    """Send `wire`, the query exactly as received, to the nameserver the pod asked."""

    wire: bytes


@dataclass(frozen=True, slots=True)
class Drop:
    """Send nothing."""

    reason: Reason


Decision = Reply | ForwardQuery | Drop


def answer(
    wire: bytes, names: MeshNames, pod_namespace: str, *, transport: Transport = "udp"
) -> Decision:
    """The decision for one query from a pod in `pod_namespace`. `transport` sets the
    size limit: over UDP a reply larger than the client takes is truncated (TC)."""
    if len(wire) < HEADER_SIZE:
        return Drop(Reason.MALFORMED)
    flags = int.from_bytes(wire[2:4], "big")
    if flags & dns.flags.QR:
        return Drop(Reason.NOT_A_QUERY)
    if dns.opcode.from_flags(flags) != dns.opcode.QUERY:
        return Reply(_header_reply(wire, dns.rcode.NOTIMP), Reason.NOTIMP)
    try:
        query = dns.message.from_wire(wire)
    except dns.message.UnknownTSIGKey:
        return ForwardQuery(wire)
    except Exception:
        # dnspython signals bad wire with many exception types (FormError and its kin,
        # but also ValueError, UnicodeError from rdata parsers): for untrusted bytes, any
        # failure to parse is the client's format error.
        return Reply(_header_reply(wire, dns.rcode.FORMERR), Reason.FORMERR)

    if len(query.question) != 1:
        return _rcode_reply(query, dns.rcode.FORMERR, Reason.FORMERR, transport)
    if query.edns > 0:
        return _rcode_reply(query, dns.rcode.BADVERS, Reason.BADVERS, transport)
    question = query.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return ForwardQuery(wire)  # CHAOS and friends are the upstream's business

    resolution = names.resolve(question.name.to_text(), pod_namespace)
    if isinstance(resolution, Forward):
        return ForwardQuery(wire)
    if isinstance(resolution, Unknown):
        return _rcode_reply(query, dns.rcode.NXDOMAIN, Reason.NXDOMAIN, transport)
    return _records_reply(query, resolution, transport)


def servfail(wire: bytes) -> bytes | None:
    """A SERVFAIL for `wire`, a query whose forward failed; None for what answer() drops."""
    if len(wire) < HEADER_SIZE or int.from_bytes(wire[2:4], "big") & dns.flags.QR:
        return None
    try:
        query = dns.message.from_wire(wire)
        response = _response_to(query, authoritative=False)
        response.set_rcode(dns.rcode.SERVFAIL)
        # Header, one question and an OPT record: always within 512 bytes.
        return response.to_wire(prefer_truncation=True)
    except Exception:
        return _header_reply(wire, dns.rcode.SERVFAIL)


def _records_reply(query: dns.message.Message, known: Known, transport: Transport) -> Reply:
    question = query.question[0]
    addresses: tuple[str, ...] = ()
    if question.rdtype == dns.rdatatype.A:
        addresses = known.ipv4
    elif question.rdtype == dns.rdatatype.AAAA:
        addresses = known.ipv6
    response = _response_to(query, authoritative=True)
    if not addresses:
        return Reply(_render(response, query, transport), Reason.NODATA)
    # Named with the question's own Name, case and all: some stub resolvers compare it
    # byte for byte (and 0x20-randomising ones do so on purpose).
    response.answer.append(
        dns.rrset.from_text_list(
            question.name, TTL, dns.rdataclass.IN, question.rdtype, list(addresses)
        )
    )
    return Reply(_render(response, query, transport), Reason.ANSWERED)


def _rcode_reply(
    query: dns.message.Message, rcode: dns.rcode.Rcode, reason: Reason, transport: Transport
) -> Reply:
    # Authoritative only where the proxy speaks for the name: NXDOMAIN. A FORMERR or
    # BADVERS says nothing about any name.
    response = _response_to(query, authoritative=rcode == dns.rcode.NXDOMAIN)
    response.set_rcode(rcode)
    return Reply(_render(response, query, transport), reason)


def _response_to(query: dns.message.Message, *, authoritative: bool) -> dns.message.Message:
    # make_response copies id, RD and the question, and answers EDNS with EDNS (version 0,
    # our payload size) exactly when the query had it.
    response = dns.message.make_response(
        query, recursion_available=True, our_payload=OUR_EDNS_PAYLOAD
    )
    if authoritative:
        response.flags |= dns.flags.AA
    return response


def _render(
    response: dns.message.Message, query: dns.message.Message, transport: Transport
) -> bytes:
    if transport == "tcp":
        limit = TCP_MAX_MESSAGE
    else:
        # What the client said it takes; below 512 counts as 512 (RFC 6891 section 6.2.5).
        advertised = query.payload if query.edns >= 0 else CLASSIC_UDP_SIZE
        limit = max(CLASSIC_UDP_SIZE, advertised)
    # Truncation drops whole RRsets and sets TC, so the client retries over TCP rather than
    # trusting a partial answer.
    return response.to_wire(max_size=limit, prefer_truncation=True)


def _header_reply(wire: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """A header-only reply for a query dnspython cannot parse or will not build a response
    for: the id, opcode and RD copied, no sections."""
    flags = int.from_bytes(wire[2:4], "big")
    reply_flags = dns.flags.QR | dns.flags.RA | (flags & (_OPCODE_MASK | dns.flags.RD)) | rcode
    return wire[:2] + int(reply_flags).to_bytes(2, "big") + bytes(8)
