"""The CNI side of `ambient-cni`, without any I/O: what the runtime asks for and how to answer.

The runtime describes a call in environment variables (CNI_COMMAND, CNI_CONTAINERID,
CNI_NETNS, CNI_IFNAME, CNI_ARGS, CNI_PATH) and hands the plugin's network config on stdin;
the plugin answers with a result or a spec-format error on stdout. This module turns the
first two into checked values (`parse_environment`, `parse_network_config`) and builds the
third (`version_result`, `passthrough_result`, `CniError.result`), following CNI spec 1.0.0
and 1.1.0 and accepting 0.4.0 configs. Standard library only: the plugin ships as a
self-contained zipapp.

Plugin config keys, all optional (runtimes add keys of their own, which are ignored):
- `agentSocket`: the agent's unix socket (default /var/run/ambient-agent/cni.sock).
- `timeoutSeconds`: how long ADD waits for the agent to enroll the pod (default 30); the
  other commands wait at most 10 s of it.
- `excludeNamespaces`: pods here are never handed to the agent (default ["kube-system"]).
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from cni.protocol import PodRef

CURRENT_VERSION = "1.1.0"
SUPPORTED_VERSIONS = ("0.4.0", "1.0.0", "1.1.0")
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")

DEFAULT_AGENT_SOCKET = "/var/run/ambient-agent/cni.sock"
DEFAULT_TIMEOUT_SECONDS = 30.0
DEFAULT_EXCLUDE_NAMESPACES = ("kube-system",)
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # an RFC 1123 label
# Only ADD blocks a pod's start on the agent; the other commands are housekeeping that the
# runtime repeats, so they must not hold it up for long.
HOUSEKEEPING_TIMEOUT_CAP = 10.0
# Beyond this the kubelet (2 min runtime-request timeout) has long given up on the sandbox.
MAX_TIMEOUT_SECONDS = 3600.0
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107

VALID_ATTACHMENTS_KEY = "cni.dev/valid-attachments"

# Which variables each command cannot do without (spec section 2, "Parameters"). GC names
# CNI_PATH too, but only for delegating to other plugins, which ambient-cni never does.
REQUIRED_VARIABLES: Mapping[str, tuple[str, ...]] = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME"),
    "GC": (),
    "STATUS": (),
    "VERSION": (),
}

# The reference implementation's rule for container ids and network names (libcni's
# utils.cniValidNameChars); the id also ends up in the agent's logs and state keys.
_VALID_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_MAX_IFNAME_LENGTH = 15  # IFNAMSIZ less the NUL


class ErrorCode(IntEnum):
    """The spec's well-known error codes (0-99) and ambient-cni's own (100 and up)."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    CONTAINER_UNKNOWN = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_NETWORK_CONFIG = 7
    TRY_AGAIN_LATER = 11
    PLUGIN_NOT_AVAILABLE = 50
    AGENT_REFUSED = 100  # the agent answered, and said no
    PLUGIN_FAILURE = 101  # a bug in ambient-cni; still reported in the spec's format


class CniError(Exception):
    """A failure to report to the runtime in the spec's error format."""

    def __init__(self, code: ErrorCode, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def result(self, cni_version: str) -> dict[str, Any]:
        return {
            "cniVersion": cni_version,
            "code": int(self.code),
            "msg": self.msg,
            "details": self.details,
        }


@dataclass(frozen=True, slots=True)
class Invocation:
    """What the runtime asked for, from the environment."""

    command: str
    container_id: str = ""
    netns: str = ""  # a path to the sandbox's netns; DEL may come without one
    ifname: str = ""
    pod: PodRef = field(default_factory=PodRef)
    runtime_args: Mapping[str, str] = field(default_factory=dict)  # CNI_ARGS, all of it
    plugin_dirs: tuple[str, ...] = ()  # CNI_PATH


@dataclass(frozen=True, slots=True)
class PluginSettings:
    """ambient-cni's own keys in the network config."""

    agent_socket: str = DEFAULT_AGENT_SOCKET
    timeout_seconds: float = DEFAULT_TIMEOUT_SECONDS
    exclude_namespaces: tuple[str, ...] = DEFAULT_EXCLUDE_NAMESPACES
    # For runtimes that send no K8S_POD_NAMESPACE (podman, plain containerd): the namespace
    # such a container counts as. None: ADD refuses such containers rather than leave them
    # silently out of the mesh.
    default_namespace: str | None = None

    def agent_timeout(self, command: str) -> float:
        """How long `command` waits for the agent's answer, connecting included."""
        if command == "ADD":
            return self.timeout_seconds
        return min(self.timeout_seconds, HOUSEKEEPING_TIMEOUT_CAP)

    def excludes(self, pod: PodRef) -> bool:
        return bool(pod.namespace) and pod.namespace in self.exclude_namespaces


@dataclass(frozen=True, slots=True)
class NetworkConfig:
    """The plugin's network config from stdin, checked."""

    cni_version: str
    name: str
    settings: PluginSettings
    prev_result: Mapping[str, Any] | None = None  # the previous plugin's result, as given
    pod_ips: tuple[str, ...] = ()  # bare addresses from prev_result's ips
    valid_container_ids: tuple[str, ...] | None = None  # GC only: the attachments to keep


def parse_environment(environ: Mapping[str, str]) -> Invocation:
    """The call the runtime made; `CniError` (code 4) names what is missing or malformed."""
    command = environ.get("CNI_COMMAND", "")
    if not command:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            "CNI_COMMAND is not set",
            "ambient-cni is a CNI plugin: the container runtime runs it with CNI_COMMAND set "
            f"to one of {', '.join(COMMANDS)}",
        )
    if command not in COMMANDS:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"unknown CNI_COMMAND {command!r}",
            f"ambient-cni knows {', '.join(COMMANDS)}",
        )
    missing = [name for name in REQUIRED_VARIABLES[command] if not environ.get(name)]
    if missing:
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"{command} needs {', '.join(missing)}, which the runtime did not set",
        )
    container_id = environ.get("CNI_CONTAINERID", "")
    ifname = environ.get("CNI_IFNAME", "")
    # Checked only where the command carries them: GC and STATUS are about no one container.
    if command in ("ADD", "DEL", "CHECK"):
        _check_container_id(container_id)
        _check_ifname(ifname)
    runtime_args = parse_cni_args(environ.get("CNI_ARGS", ""))
    return Invocation(
        command=command,
        container_id=container_id,
        netns=environ.get("CNI_NETNS", ""),
        ifname=ifname,
        pod=PodRef(
            namespace=runtime_args.get("K8S_POD_NAMESPACE", ""),
            name=runtime_args.get("K8S_POD_NAME", ""),
            uid=runtime_args.get("K8S_POD_UID", ""),
        ),
        runtime_args=runtime_args,
        plugin_dirs=tuple(d for d in environ.get("CNI_PATH", "").split(os.pathsep) if d),
    )


def parse_cni_args(text: str) -> dict[str, str]:
    """CNI_ARGS, `KEY=VALUE;KEY=VALUE`. Empty items (a trailing `;`) are tolerated."""
    pairs: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise CniError(
                ErrorCode.INVALID_ENVIRONMENT,
                f"CNI_ARGS item {item!r} is not KEY=VALUE",
                f"CNI_ARGS was {text!r}",
            )
        pairs[key] = value
    return pairs


def _check_container_id(container_id: str) -> None:
    if not _VALID_NAME.fullmatch(container_id):
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"CNI_CONTAINERID {container_id!r} has characters a container id cannot have",
            "a container id starts with a letter or digit, then letters, digits, _ . -",
        )


def _check_ifname(ifname: str) -> None:
    if (
        len(ifname) > _MAX_IFNAME_LENGTH
        or ifname in (".", "..")
        or any(c in "/:" or c.isspace() for c in ifname)
    ):
        raise CniError(
            ErrorCode.INVALID_ENVIRONMENT,
            f"CNI_IFNAME {ifname!r} is not a valid interface name",
            f"at most {_MAX_IFNAME_LENGTH} characters, not . or .., no / : or whitespace",
        )


def parse_network_config(data: bytes, command: str) -> NetworkConfig:
    """The network config the runtime wrote on stdin for `command` (not VERSION).

    Codes: 6 when it is not a JSON object, 1 when its cniVersion is not one this plugin
    speaks (or too old for the command), 7 for anything else wrong, naming the key.
    """
    body = _decode_object(data)
    cni_version = _cni_version(body, command)
    name = body.get("name")
    if not isinstance(name, str) or not _VALID_NAME.fullmatch(name):
        raise _invalid_config(
            f"name {name!r} is not a network name",
            "the spec requires one: a letter or digit, then letters, digits, _ . -",
        )
    prev_result = body.get("prevResult")
    if prev_result is not None and not isinstance(prev_result, dict):
        raise _invalid_config("prevResult must be an object (the previous plugin's result)")
    valid_container_ids = None
    if command == "GC":
        valid_container_ids = _valid_container_ids(body)
    return NetworkConfig(
        cni_version=cni_version,
        name=name,
        settings=_plugin_settings(body),
        prev_result=prev_result,
        pod_ips=pod_ips(prev_result) if prev_result is not None else (),
        valid_container_ids=valid_container_ids,
    )


def declared_version(data: bytes) -> str:
    """The cniVersion to put on an error about `data`: its own when it declares one this
    plugin speaks, else the newest (the runtime reads the error either way)."""
    try:
        body = json.loads(data)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        return CURRENT_VERSION
    version = body.get("cniVersion") if isinstance(body, dict) else None
    if isinstance(version, str) and version in SUPPORTED_VERSIONS:
        return version
    return CURRENT_VERSION


def _decode_object(data: bytes) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CniError(
            ErrorCode.DECODE_FAILURE,
            "the network config on stdin is not JSON",
            f"{exc}; the runtime must write the plugin's config on stdin",
        ) from None
    if not isinstance(body, dict):
        raise CniError(
            ErrorCode.DECODE_FAILURE,
            f"the network config on stdin must be a JSON object, not {type(body).__name__}",
        )
    return body


def _cni_version(body: Mapping[str, Any], command: str) -> str:
    version = body.get("cniVersion")
    if version is None:
        # The spec's libraries read a config without one as 0.1.0, which is too old here.
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            "the network config has no cniVersion",
            f"ambient-cni supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    if not isinstance(version, str):
        raise _invalid_config(f"cniVersion must be a string, not {version!r}")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"cniVersion {version} is not supported",
            f"ambient-cni supports {', '.join(SUPPORTED_VERSIONS)}",
        )
    # GC and STATUS came with spec 1.1.0; a runtime must not send them for older configs.
    if command in ("GC", "STATUS") and _version_tuple(version) < (1, 1, 0):
        raise CniError(
            ErrorCode.INCOMPATIBLE_VERSION,
            f"cniVersion {version} does not have {command}",
            f"{command} is in CNI spec 1.1.0 and later",
        )
    return version


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _plugin_settings(body: Mapping[str, Any]) -> PluginSettings:
    agent_socket = body.get("agentSocket", DEFAULT_AGENT_SOCKET)
    if not isinstance(agent_socket, str) or not agent_socket.startswith("/"):
        raise _invalid_config(f"agentSocket must be an absolute path, not {agent_socket!r}")
    if "\0" in agent_socket or len(os.fsencode(agent_socket)) > MAX_SOCKET_PATH_BYTES:
        raise _invalid_config(
            f"agentSocket {agent_socket!r} cannot be a unix socket path",
            f"at most {MAX_SOCKET_PATH_BYTES} bytes and no NUL",
        )

    timeout = body.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS)
    # bool is an int to Python, but `true` is not a number of seconds.
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not math.isfinite(timeout)
        or not 0 < timeout <= MAX_TIMEOUT_SECONDS
    ):
        raise _invalid_config(
            f"timeoutSeconds must be a number of seconds above 0 and at most "
            f"{MAX_TIMEOUT_SECONDS:g}, not {timeout!r}"
        )

    exclude = body.get("excludeNamespaces", list(DEFAULT_EXCLUDE_NAMESPACES))
    if not isinstance(exclude, list) or not all(isinstance(n, str) for n in exclude):
        raise _invalid_config(
            f"excludeNamespaces must be a list of namespace names, not {exclude!r}"
        )
    default_namespace = body.get("defaultNamespace")
    if default_namespace is not None and (
        not isinstance(default_namespace, str) or not _NAMESPACE.fullmatch(default_namespace)
    ):
        raise _invalid_config(
            f"defaultNamespace must be a Kubernetes namespace name, not {default_namespace!r}"
        )
    return PluginSettings(agent_socket, float(timeout), tuple(exclude), default_namespace)


def pod_ips(prev_result: Mapping[str, Any]) -> tuple[str, ...]:
    """The pod's addresses from a previous plugin's result: `ips[].address` without the
    prefix length, in order, each once. The 1.0.0 shape and 0.4.0's (which adds a
    `version` of "4" or "6" to each entry) both read."""
    ips = prev_result.get("ips", [])
    if not isinstance(ips, list):
        raise _invalid_config("prevResult.ips must be a list")
    addresses: list[str] = []
    for index, entry in enumerate(ips):
        where = f"prevResult.ips[{index}]"
        if not isinstance(entry, dict):
            raise _invalid_config(f"{where} must be an object")
        cidr = entry.get("address")
        if not isinstance(cidr, str):
            raise _invalid_config(f"{where}.address must be an address in CIDR form")
        try:
            # The spec's address carries its prefix length ("10.1.0.5/24"); a bare address
            # is a primary plugin's bug that the pod would pay for later.
            if "/" not in cidr:
                raise ValueError(cidr)
            address = ipaddress.ip_interface(cidr).ip
        except ValueError:
            raise _invalid_config(
                f"{where}.address {cidr!r} is not an address in CIDR form (address/prefix)"
            ) from None
        gateway = entry.get("gateway")
        if gateway is not None and not _same_family_address(gateway, address.version):
            raise _invalid_config(
                f"{where}.gateway {gateway!r} is not an IPv{address.version} address"
            )
        interface = entry.get("interface")
        interfaces = prev_result.get("interfaces", [])
        if interface is not None and (
            isinstance(interface, bool)
            or not isinstance(interface, int)
            or not isinstance(interfaces, list)
            or not 0 <= interface < len(interfaces)
        ):
            raise _invalid_config(
                f"{where}.interface {interface!r} is not an index into prevResult.interfaces"
            )
        family = entry.get("version")
        if family is not None and family != str(address.version):
            raise _invalid_config(
                f"{where}.version {family!r} does not match address {cidr!r}",
                'in a 0.4.0 result, version is "4" or "6", the address\'s family',
            )
        if str(address) not in addresses:
            addresses.append(str(address))
    return tuple(addresses)


def _same_family_address(value: object, version: int) -> bool:
    if not isinstance(value, str):
        return False
    try:
        return ipaddress.ip_address(value).version == version
    except ValueError:
        return False


def _valid_container_ids(body: Mapping[str, Any]) -> tuple[str, ...]:
    # Without the list, GC would read as "nothing is valid" and release every pod.
    if VALID_ATTACHMENTS_KEY not in body:
        raise _invalid_config(
            f"GC needs {VALID_ATTACHMENTS_KEY}",
            "the runtime lists the attachments still in use; without it nothing is released",
        )
    attachments = body[VALID_ATTACHMENTS_KEY]
    if not isinstance(attachments, list):
        raise _invalid_config(f"{VALID_ATTACHMENTS_KEY} must be a list")
    container_ids: list[str] = []
    for index, attachment in enumerate(attachments):
        where = f"{VALID_ATTACHMENTS_KEY}[{index}]"
        if not isinstance(attachment, dict):
            raise _invalid_config(f"{where} must be an object with containerID and ifname")
        container_id = attachment.get("containerID")
        if not isinstance(container_id, str) or not container_id:
            raise _invalid_config(f"{where}.containerID must be a non-empty string")
        # One container may be attached several times (one per ifname); the agent keeps
        # pods by container.
        if container_id not in container_ids:
            container_ids.append(container_id)
    return tuple(container_ids)


def _invalid_config(msg: str, details: str = "") -> CniError:
    return CniError(ErrorCode.INVALID_NETWORK_CONFIG, f"network config: {msg}", details)


def version_result() -> dict[str, Any]:
    return {"cniVersion": CURRENT_VERSION, "supportedVersions": list(SUPPORTED_VERSIONS)}


def passthrough_result(config: NetworkConfig) -> dict[str, Any]:
    """ADD's result for a chained plugin that changes nothing: the previous plugin's result,
    labelled with the config's cniVersion as the spec requires of every result."""
    if config.prev_result is None:
        raise ValueError("a passthrough result needs a prevResult")
    rest = {k: v for k, v in config.prev_result.items() if k != "cniVersion"}
    return {"cniVersion": config.cni_version, **rest}
