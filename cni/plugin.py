"""`ambient-cni`: the chained CNI plugin that hands pods to the node agent.

It runs after the plugin that gives the pod its addresses (bridge + host-local, say) and, for
ADD, asks the agent over its unix socket to enroll the pod (capture its traffic) before the
runtime starts the pod's containers. If the agent cannot answer in time, ADD fails with "try
again later": a pod that should be in the mesh must never start outside it. DEL never fails
on the agent's account: the agent reconciles its pods when it comes back.

The CNI details (environment, config, result and error formats) are in cni/spec.py, the
agent's messages in cni/protocol.py. Standard library and `cni.*` only: this ships as a
self-contained zipapp on hosts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO, TextIO

from cni import protocol, spec
from cni.spec import CniError, ErrorCode, Invocation, NetworkConfig

_RECEIVE_CHUNK = 64 * 1024
_SHOWN_ANSWER_BYTES = 200  # of an unreadable answer, in the error's details


class AgentUnreachable(Exception):
    """No answer from the agent: no socket, nobody listening, too slow, or it hung up."""


class AgentAnswerInvalid(Exception):
    """The agent answered something this plugin cannot read."""


def ask_agent(socket_path: str, request: protocol.Request, timeout: float) -> protocol.Answer:
    """Send one request, read one answer; all of it, connecting included, within `timeout`."""
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            connection.connect(socket_path)
            connection.settimeout(_remaining(deadline, timeout))
            connection.sendall(request.encode())
            data = _read_line(connection, deadline, timeout)
    except TimeoutError:
        raise AgentUnreachable(f"no answer within {timeout:g} s") from None
    except OSError as exc:
        raise AgentUnreachable(exc.strerror or str(exc)) from None
    if not data:
        raise AgentUnreachable("the agent closed the connection without answering")
    try:
        return protocol.decode_answer(data)
    except protocol.ProtocolError as exc:
        shown = data[:_SHOWN_ANSWER_BYTES].decode(errors="replace")
        raise AgentAnswerInvalid(f"{exc} (the answer began {shown!r})") from None


def _remaining(deadline: float, timeout: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"no answer within {timeout:g} s")
    return remaining


def _read_line(connection: socket.socket, deadline: float, timeout: float) -> bytes:
    """The answer's line, or what came before the agent hung up (decoding judges that)."""
    received = bytearray()
    while b"\n" not in received:
        connection.settimeout(_remaining(deadline, timeout))
        chunk = connection.recv(_RECEIVE_CHUNK)
        if not chunk:
            break
        received += chunk
        if len(received) > protocol.MAX_MESSAGE + 1:  # + 1: the line's own newline
            raise AgentAnswerInvalid(f"the answer is over {protocol.MAX_MESSAGE} bytes")
    line, _, _ = bytes(received).partition(b"\n")
    return line


def _pod_request(op: str, invocation: Invocation, config: NetworkConfig) -> protocol.Request:
    return protocol.Request(
        op=op,
        container_id=invocation.container_id,
        netns=invocation.netns,
        ifname=invocation.ifname,
        pod=invocation.pod,
        ips=config.pod_ips,
    )


def _with_namespace(invocation: Invocation, config: NetworkConfig) -> Invocation:
    """The pod's namespace decides its enrollment: a runtime that sends none gets the
    configured defaultNamespace, or a refusal naming the setting."""
    if invocation.pod.namespace:
        return invocation
    default = config.settings.default_namespace
    if default is None:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"container {invocation.container_id}: CNI_ARGS holds no K8S_POD_NAMESPACE, so "
            "whether it belongs in the mesh is unknown",
            "runtimes other than Kubernetes' (podman, for one) send none: set "
            '"defaultNamespace" in the ambient-cni network config to the namespace such '
            "containers count as (its ambient label then decides), or exclude them",
        )
    return dataclasses.replace(
        invocation, pod=dataclasses.replace(invocation.pod, namespace=default)
    )


def _describe(invocation: Invocation) -> str:
    pod = invocation.pod
    if pod.namespace or pod.name:
        return f"pod {pod.namespace}/{pod.name} (container {invocation.container_id})"
    return f"container {invocation.container_id}"


def _not_answering(config: NetworkConfig, reason: object) -> str:
    return f"the ambient agent is not answering on {config.settings.agent_socket}: {reason}"


def _ask_or_fail(
    config: NetworkConfig, request: protocol.Request, command: str, unreachable_details: str
) -> protocol.Answer:
    """The agent's answer, whatever it says; no answer is "try again later" (11), an
    unreadable one an I/O failure (5)."""
    try:
        return ask_agent(
            config.settings.agent_socket, request, config.settings.agent_timeout(command)
        )
    except AgentUnreachable as exc:
        raise CniError(
            ErrorCode.TRY_AGAIN_LATER,
            f"{_not_answering(config, exc)}; try again later",
            unreachable_details,
        ) from None
    except AgentAnswerInvalid as exc:
        raise CniError(
            ErrorCode.IO_FAILURE,
            f"the ambient agent on {config.settings.agent_socket} answered something "
            "ambient-cni cannot read",
            str(exc),
        ) from None


def _refused(op: str, what: str, answer: protocol.Answer) -> CniError:
    return CniError(
        ErrorCode.AGENT_REFUSED,
        f"the ambient agent could not {op} {what}: {answer.error or 'no reason given'}",
    )


def _require_prev_result(config: NetworkConfig, command: str) -> None:
    if config.prev_result is None:
        raise CniError(
            ErrorCode.INVALID_NETWORK_CONFIG,
            "ambient-cni must be chained after a plugin that assigns the pod its addresses",
            f"{command} came without a prevResult: put ambient-cni after the primary plugin "
            "in a conflist",
        )


def add(invocation: Invocation, config: NetworkConfig) -> dict[str, Any]:
    _require_prev_result(config, "ADD")
    invocation = _with_namespace(invocation, config)
    if config.settings.excludes(invocation.pod):
        return spec.passthrough_result(config)
    what = _describe(invocation)
    answer = _ask_or_fail(
        config,
        _pod_request("add", invocation, config),
        "ADD",
        f"{what} must be enrolled in the mesh before its containers start, so it does not "
        "start until the node agent is up (fail closed)",
    )
    if not answer.ok:
        raise _refused("enroll", what, answer)
    # Whether the pod was enrolled is the agent's call (namespace labels); either way the
    # pod's network is the primary plugin's, unchanged.
    return spec.passthrough_result(config)


def delete(invocation: Invocation, config: NetworkConfig, stderr: TextIO) -> None:
    """Tell the agent; never fail on its account. Pod teardown must not wait for the agent,
    which releases whatever it still holds when it reconciles (on restart, on GC)."""
    what = _describe(invocation)
    request = _pod_request("del", invocation, config)
    socket_path = config.settings.agent_socket
    try:
        answer = ask_agent(socket_path, request, config.settings.agent_timeout("DEL"))
    except AgentUnreachable as exc:
        print(
            f"ambient-cni: DEL of {what}: {_not_answering(config, exc)}; "
            "the agent releases it when it reconciles",
            file=stderr,
        )
    except AgentAnswerInvalid as exc:
        print(f"ambient-cni: DEL of {what}: unreadable answer from the agent: {exc}", file=stderr)
    else:
        if not answer.ok:
            print(f"ambient-cni: DEL of {what}: the agent said: {answer.error}", file=stderr)


def check(invocation: Invocation, config: NetworkConfig) -> None:
    _require_prev_result(config, "CHECK")
    if config.settings.excludes(invocation.pod):
        return
    what = _describe(invocation)
    answer = _ask_or_fail(
        config,
        _pod_request("check", invocation, config),
        "CHECK",
        f"whether {what} is enrolled as it should be cannot be known without the agent",
    )
    if not answer.ok:
        raise _refused("confirm the enrollment of", what, answer)


def garbage_collect(config: NetworkConfig) -> None:
    valid = config.valid_container_ids or ()
    answer = _ask_or_fail(
        config,
        protocol.Request(op="gc", valid=valid),
        "GC",
        "nothing was released; the runtime runs GC again later",
    )
    if not answer.ok:
        raise _refused("release the pods that are gone", f"({len(valid)} still valid)", answer)


def status(config: NetworkConfig) -> None:
    """Whether pods can be added now: any failure means not, code 50."""
    try:
        answer = ask_agent(
            config.settings.agent_socket,
            protocol.Request(op="status"),
            config.settings.agent_timeout("STATUS"),
        )
    except AgentUnreachable as exc:
        reason = _not_answering(config, exc)
    except AgentAnswerInvalid as exc:
        reason = f"unreadable answer from the ambient agent: {exc}"
    else:
        if answer.ok:
            return
        reason = f"the ambient agent cannot take pods: {answer.error or 'no reason given'}"
    raise CniError(
        ErrorCode.PLUGIN_NOT_AVAILABLE,
        reason,
        "pods cannot be added to this network until the node agent is ready",
    )


def run(environ: Mapping[str, str], stdin: BinaryIO, stdout: TextIO, stderr: TextIO) -> int:
    """One CNI call: the result or error on stdout, and the exit code the spec wants."""
    error_version = spec.CURRENT_VERSION
    try:
        invocation = spec.parse_environment(environ)
        if invocation.command == "VERSION":
            _emit(stdout, spec.version_result())
            return 0
        try:
            data = stdin.read()
        except OSError as exc:
            raise CniError(ErrorCode.IO_FAILURE, f"cannot read the network config: {exc}") from None
        error_version = spec.declared_version(data)
        config = spec.parse_network_config(data, invocation.command)
        error_version = config.cni_version
        match invocation.command:
            case "ADD":
                _emit(stdout, add(invocation, config))
            case "DEL":
                delete(invocation, config, stderr)
            case "CHECK":
                check(invocation, config)
            case "GC":
                garbage_collect(config)
            case "STATUS":
                status(config)
        return 0
    except CniError as error:
        _emit(stdout, error.result(error_version))
        return 1
    except Exception as exc:  # a bug must still leave the runtime an error it can read
        failure = CniError(ErrorCode.PLUGIN_FAILURE, f"ambient-cni failed: {exc!r}")
        _emit(stdout, failure.result(error_version))
        return 1


def _emit(stdout: TextIO, body: Mapping[str, Any]) -> None:
    stdout.write(json.dumps(body) + "\n")
    stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] in (["install"], ["uninstall"]):
        # Only the node's install step takes arguments; a runtime never passes any, so the
        # per-pod path does not load the installer.
        from cni import install

        return install.main(arguments)
    return run(os.environ, sys.stdin.buffer, sys.stdout, sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
