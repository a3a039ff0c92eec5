"""The messages between `ambient-cni` and the node agent, without any I/O.

One request and one answer per connection on the agent's unix socket, each a single JSON
object on one line. Every message carries `version`; a side that gets a major version it
does not speak answers with an error naming the versions it does (so a plugin and an agent
of different releases fail clearly rather than half-work). Standard library only: the plugin
runs as a short-lived process for every pod.

Requests (`op`):
- `add`: a pod's sandbox is up (after the primary CNI plugin): enroll it, answer when done.
- `del`: the sandbox is going away: release it. Idempotent; unknown containers are fine.
- `check`: is the pod enrolled as it should be?
- `gc`: release every pod whose container is not in `valid` (the runtime's list).
- `status`: can the agent take pods now?
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

VERSION = 1
OPS = ("add", "del", "check", "gc", "status")
MAX_MESSAGE = 1 << 20  # one pod's request or answer is far smaller; a bound for the reader


class ProtocolError(ValueError):
    """A message that is not valid in this protocol version."""


@dataclass(frozen=True, slots=True)
class PodRef:
    """Who the pod is, from the runtime's CNI_ARGS (K8S_POD_NAMESPACE, K8S_POD_NAME,
    K8S_POD_UID); empty when the runtime did not say."""

    namespace: str = ""
    name: str = ""
    uid: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    container_id: str = ""
    netns: str = ""  # the sandbox's netns path (CNI_NETNS)
    ifname: str = ""  # the pod's interface (CNI_IFNAME)
    pod: PodRef = field(default_factory=PodRef)
    ips: tuple[str, ...] = ()  # the pod's addresses, from the primary plugin's result
    valid: tuple[str, ...] = ()  # gc: container ids still in use

    def encode(self) -> bytes:
        body = asdict(self)
        body["ips"], body["valid"] = list(self.ips), list(self.valid)
        return _line({"version": VERSION, **body})


@dataclass(frozen=True, slots=True)
class Answer:
    ok: bool
    error: str = ""
    enrolled: bool = False  # add/check: the pod's traffic is captured now
    released: tuple[str, ...] = ()  # gc: the containers let go

    def encode(self) -> bytes:
        body = asdict(self)
        body["released"] = list(self.released)
        return _line({"version": VERSION, **body})


def _line(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _object(data: bytes, what: str) -> dict[str, Any]:
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"{what} of {len(data)} bytes is over the {MAX_MESSAGE} limit")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, huge numbers, deep nests
        raise ProtocolError(f"{what} is not JSON this side can read: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError(f"{what} must be a JSON object")
    version = body.get("version")
    if type(version) is not int or version != VERSION:  # not True, not 1.0
        raise ProtocolError(f"{what} has protocol version {version!r}; this side speaks {VERSION}")
    return body


def _text(body: dict[str, Any], key: str, what: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: {key} must be a string")
    return value


def _texts(body: dict[str, Any], key: str, what: str) -> tuple[str, ...]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{what}: {key} must be a list of strings")
    return tuple(value)


def decode_request(data: bytes) -> Request:
    body = _object(data, "request")
    op = body.get("op")
    if op not in OPS:
        raise ProtocolError(f"request: op {op!r} is not one of {', '.join(OPS)}")
    pod = body.get("pod", {})
    if not isinstance(pod, dict):
        raise ProtocolError("request: pod must be an object")
    request = Request(
        op=op,
        container_id=_text(body, "container_id", "request"),
        netns=_text(body, "netns", "request"),
        ifname=_text(body, "ifname", "request"),
        pod=PodRef(*(_text(pod, k, "request pod") for k in ("namespace", "name", "uid"))),
        ips=_texts(body, "ips", "request"),
        valid=_texts(body, "valid", "request"),
    )
    if op in ("add", "del", "check") and not request.container_id:
        raise ProtocolError(f"request: {op} needs a container_id")
    if op in ("add", "check") and not request.netns:
        raise ProtocolError(f"request: {op} needs the pod's netns")
    return request


def decode_answer(data: bytes) -> Answer:
    body = _object(data, "answer")
    ok = body.get("ok")
    if not isinstance(ok, bool):
        raise ProtocolError("answer: ok must be true or false")
    enrolled = body.get("enrolled", False)
    if not isinstance(enrolled, bool):
        raise ProtocolError("answer: enrolled must be true or false")
    return Answer(ok, _text(body, "error", "answer"), enrolled,
                  _texts(body, "released", "answer"))  # fmt: skip
