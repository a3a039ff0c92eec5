"""cni/protocol.py: the messages between ambient-cni and the agent, without any I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cni.protocol import (
    MAX_MESSAGE,
    OPS,
    VERSION,
    Answer,
    PodRef,
    ProtocolError,
    Request,
    decode_answer,
    decode_request,
)

POD = PodRef("shop", "cart-7f9c", "0b5d2c1e-6f1a")


def line(**body: Any) -> bytes:
    return json.dumps(body).encode() + b"\n"


def request_line(**body: Any) -> bytes:
    return line(**{"version": VERSION, **body})


def answer_line(**body: Any) -> bytes:
    return line(**{"version": VERSION, **body})


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_",
    [
        Request("add", "c1", "/var/run/netns/cni-1", "eth0", POD, ("10.1.0.5", "fd00::5")),
        Request("add", "c1", "/var/run/netns/cni-1", "eth0", PodRef(), ("10.1.0.5",)),
        Request("del", "c1", "", "eth0", POD),
        Request("del", "c1"),
        Request("check", "c1", "/var/run/netns/cni-1", "eth0", POD, ("10.1.0.5",)),
        Request("gc", valid=("c1", "c2", "c3")),
        Request("gc"),
        Request("status"),
        Request("add", "c1", "/netns/ünïcode", "eth0", PodRef("ns", "pöd\n", "u"), ("1.2.3.4",)),
    ],
)
def test_request_round_trips(request_: Request) -> None:
    assert decode_request(request_.encode()) == request_


@pytest.mark.parametrize(
    "answer",
    [
        Answer(ok=True),
        Answer(ok=True, enrolled=True),
        Answer(ok=False, error="pod not enrolled"),
        Answer(ok=True, released=("c1", "c2")),
        Answer(ok=False, error="multi\nline ünïcode"),
    ],
)
def test_answer_round_trips(answer: Answer) -> None:
    assert decode_answer(answer.encode()) == answer


@pytest.mark.parametrize(
    "message",
    [
        Request("add", "c1", "/n", "eth0", PodRef("a\nb", "c", "d"), ("1.2.3.4",)),
        Answer(ok=False, error="a\nb"),
    ],
)
def test_encoded_message_is_one_json_line_with_the_version(message: Request | Answer) -> None:
    data = message.encode()
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert json.loads(data)["version"] == VERSION


def test_minimal_messages_decode_with_defaults() -> None:
    assert decode_request(request_line(op="status")) == Request("status")
    assert decode_answer(answer_line(ok=True)) == Answer(ok=True)


def test_messages_decode_without_the_trailing_newline() -> None:
    assert decode_request(Request("status").encode().rstrip()) == Request("status")
    assert decode_answer(Answer(ok=True).encode().rstrip()) == Answer(ok=True)


def test_unknown_keys_are_ignored() -> None:
    assert decode_request(request_line(op="status", future=1)) == Request("status")
    assert decode_answer(answer_line(ok=True, future=[1])) == Answer(ok=True)


def test_protocol_error_is_a_value_error() -> None:
    assert issubclass(ProtocolError, ValueError)


# --- requests refused ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "named"),
    [
        pytest.param(b"", "not JSON", id="empty"),
        pytest.param(b"{not json\n", "not JSON", id="not-json"),
        pytest.param(b'{"version": 1, "op": "status"', "not JSON", id="truncated"),
        pytest.param(b'{"version": 1, "op": "\xff"}\n', "not JSON", id="not-utf8"),
        pytest.param(b"[1, 2]\n", "must be a JSON object", id="array"),
        pytest.param(b'"status"\n', "must be a JSON object", id="string"),
        pytest.param(b"null\n", "must be a JSON object", id="null"),
        pytest.param(line(op="status"), "protocol version None", id="no-version"),
        pytest.param(line(version=2, op="status"), "protocol version 2", id="newer-version"),
        pytest.param(line(version=0, op="status"), "protocol version 0", id="older-version"),
        pytest.param(line(version="1", op="status"), "protocol version '1'", id="string-version"),
        pytest.param(request_line(), "op None is not one of", id="no-op"),
        pytest.param(request_line(op="ADD"), "op 'ADD' is not one of", id="op-case"),
        pytest.param(request_line(op="version"), "op 'version' is not one of", id="unknown-op"),
        pytest.param(request_line(op=["add"]), "op ['add'] is not one of", id="op-a-list"),
        pytest.param(request_line(op="del"), "del needs a container_id", id="del-no-container"),
        pytest.param(
            request_line(op="add", netns="/n"), "add needs a container_id", id="add-no-container"
        ),
        pytest.param(
            request_line(op="check", container_id="", netns="/n"),
            "check needs a container_id",
            id="check-empty-container",
        ),
        pytest.param(
            request_line(op="add", container_id="c1"), "add needs the pod's netns", id="add-no-ns"
        ),
        pytest.param(
            request_line(op="check", container_id="c1", netns=""),
            "check needs the pod's netns",
            id="check-empty-netns",
        ),
        pytest.param(
            request_line(op="del", container_id=5), "container_id must be a string", id="int-id"
        ),
        pytest.param(
            request_line(op="add", container_id="c", netns=None),
            "netns must be a string",
            id="null-netns",
        ),
        pytest.param(request_line(op="status", ifname=0), "ifname must be a string", id="ifname"),
        pytest.param(request_line(op="status", pod=[]), "pod must be an object", id="pod-list"),
        pytest.param(request_line(op="status", pod="p"), "pod must be an object", id="pod-str"),
        pytest.param(
            request_line(op="status", pod={"name": 1}), "name must be a string", id="pod-name"
        ),
        pytest.param(
            request_line(op="status", pod={"namespace": None}),
            "namespace must be a string",
            id="pod-namespace",
        ),
        pytest.param(
            request_line(op="status", pod={"uid": ["u"]}), "uid must be a string", id="pod-uid"
        ),
        pytest.param(
            request_line(op="status", ips="10.0.0.1"), "ips must be a list of strings", id="ips"
        ),
        pytest.param(
            request_line(op="status", ips=["10.0.0.1", 5]),
            "ips must be a list of strings",
            id="ips-item",
        ),
        pytest.param(
            request_line(op="gc", valid={"c1": True}),
            "valid must be a list of strings",
            id="valid-object",
        ),
        pytest.param(
            request_line(op="gc", valid=[None]), "valid must be a list of strings", id="valid-item"
        ),
    ],
)
def test_invalid_request_is_a_protocol_error_naming_the_problem(data: bytes, named: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(data)
    assert named in str(caught.value)


def test_version_error_names_the_version_this_side_speaks() -> None:
    with pytest.raises(ProtocolError, match=f"this side speaks {VERSION}"):
        decode_request(line(version=VERSION + 1, op="status"))


def test_unknown_op_error_lists_the_ops() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(request_line(op="frob"))
    assert all(op in str(caught.value) for op in OPS)


@pytest.mark.parametrize("op", ["del", "gc", "status"])
def test_ops_that_need_no_netns_decode_without_one(op: str) -> None:
    request = decode_request(request_line(op=op, container_id="c1"))
    assert (request.op, request.netns) == (op, "")


def test_gc_and_status_need_no_container_id() -> None:
    assert decode_request(request_line(op="gc", valid=[])).container_id == ""
    assert decode_request(request_line(op="status")).container_id == ""


# --- size limit ------------------------------------------------------------------------------


def padded_status(size: int) -> bytes:
    """A valid status request line of exactly `size` bytes (padding is JSON whitespace)."""
    head = b'{"version":1,"op":"status"'
    return head + b" " * (size - len(head) - 2) + b"}\n"


def test_message_at_the_size_limit_is_accepted() -> None:
    data = padded_status(MAX_MESSAGE)
    assert len(data) == MAX_MESSAGE
    assert decode_request(data) == Request("status")


def test_message_over_the_size_limit_is_refused_before_parsing() -> None:
    data = padded_status(MAX_MESSAGE + 1)
    with pytest.raises(ProtocolError, match=f"over the {MAX_MESSAGE} limit"):
        decode_request(data)
    with pytest.raises(ProtocolError, match="over the"):
        decode_answer(b"{" + b" " * MAX_MESSAGE + b"}")


def test_oversized_json_number_is_a_protocol_error() -> None:
    data = b'{"version":1,"op":"status","x":' + b"1" * 5000 + b"}\n"
    with pytest.raises(ProtocolError):
        decode_request(data)


def test_deeply_nested_json_is_a_protocol_error() -> None:
    data = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(ProtocolError):
        decode_request(data)


# --- answers refused -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "named"),
    [
        pytest.param(b"", "answer is not JSON", id="empty"),
        pytest.param(b"ok\n", "answer is not JSON", id="not-json"),
        pytest.param(b"[]\n", "answer must be a JSON object", id="array"),
        pytest.param(line(ok=True), "answer has protocol version None", id="no-version"),
        pytest.param(line(version=2, ok=True), "protocol version 2", id="newer-version"),
        pytest.param(answer_line(), "ok must be true or false", id="no-ok"),
        pytest.param(answer_line(ok="true"), "ok must be true or false", id="ok-string"),
        pytest.param(answer_line(ok=1), "ok must be true or false", id="ok-int"),
        pytest.param(answer_line(ok=None), "ok must be true or false", id="ok-null"),
        pytest.param(
            answer_line(ok=True, enrolled=1), "enrolled must be true or false", id="enrolled-int"
        ),
        pytest.param(
            answer_line(ok=True, enrolled=None),
            "enrolled must be true or false",
            id="enrolled-null",
        ),
        pytest.param(answer_line(ok=False, error=3), "error must be a string", id="error-int"),
        pytest.param(
            answer_line(ok=True, released="c1"),
            "released must be a list of strings",
            id="released-string",
        ),
        pytest.param(
            answer_line(ok=True, released=[1]),
            "released must be a list of strings",
            id="released-item",
        ),
    ],
)
def test_invalid_answer_is_a_protocol_error_naming_the_problem(data: bytes, named: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_answer(data)
    assert named in str(caught.value)
