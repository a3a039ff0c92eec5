"""Load the local config file (ztunnel's LOCAL_XDS_PATH shape: workloads, services, policies).

Errors name the file, the line and the reason. Services and policies are checked for shape
here and interpreted by the tunnel and policy layers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.state.workload import Protocol, Workload


class ConfigError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class LocalConfig:
    workloads: tuple[Workload, ...]
    services: tuple[dict[str, Any], ...]
    policies: tuple[dict[str, Any], ...]


_WORKLOAD_KEYS = {
    "uid", "name", "namespace", "serviceAccount", "workloadIps", "protocol", "node",
    "services", "waypoint", "netns", "interface", "canonicalName", "canonicalRevision",
    "workloadName", "workloadType", "trustDomain", "clusterId", "status",
}  # fmt: skip


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def load_local_config(path: Path) -> LocalConfig:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_local_config(text, str(path))


def parse_local_config(text: str, source: str) -> LocalConfig:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from exc
    if root is None:
        return LocalConfig((), (), ())
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{source}:{_line(root)}: top level must be a mapping")
    sections: dict[str, yaml.Node] = {}
    for key_node, value_node in root.value:
        key = key_node.value
        if key not in ("workloads", "services", "policies"):
            raise ConfigError(
                f"{source}:{_line(key_node)}: unknown key {key!r} "
                "(expected workloads, services, policies)"
            )
        if not isinstance(value_node, yaml.SequenceNode):
            raise ConfigError(f"{source}:{_line(value_node)}: {key} must be a list")
        sections[key] = value_node
    workloads = tuple(_workload(item, source) for item in _items(sections.get("workloads")))
    seen: dict[str, int] = {}
    for node, workload in zip(_items(sections.get("workloads")), workloads, strict=True):
        if workload.uid in seen:
            raise ConfigError(
                f"{source}:{_line(node)}: duplicate workload uid {workload.uid!r} "
                f"(first at line {seen[workload.uid]})"
            )
        seen[workload.uid] = _line(node)
    loader = yaml.SafeLoader("")
    services = tuple(loader.construct_document(n) for n in _items(sections.get("services")))
    policies = tuple(loader.construct_document(n) for n in _items(sections.get("policies")))
    return LocalConfig(workloads, services, policies)


def _items(node: yaml.Node | None) -> list[yaml.Node]:
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


def _workload(node: yaml.Node, source: str) -> Workload:
    where = f"{source}:{_line(node)}"
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{where}: a workload must be a mapping")
    data = yaml.SafeLoader("").construct_mapping(node, deep=True)
    unknown = sorted(str(key) for key in set(data) - _WORKLOAD_KEYS)
    if unknown:
        raise ConfigError(f"{where}: workload has unknown keys {unknown}")
    for required in ("name", "namespace", "workloadIps", "node"):
        if required not in data:
            raise ConfigError(f"{where}: workload is missing {required!r}")
    ips = data["workloadIps"]
    if not isinstance(ips, list) or not ips:
        raise ConfigError(f"{where}: workloadIps must be a non-empty list")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"{where}: {ip!r} in workloadIps is not an IP address") from None
    try:
        protocol = Protocol(data.get("protocol", "TCP"))
    except ValueError:
        raise ConfigError(
            f"{where}: protocol {data.get('protocol')!r} must be HBONE or TCP"
        ) from None
    name, namespace = str(data["name"]), str(data["namespace"])
    return Workload(
        uid=str(data.get("uid", f"local//Pod/{namespace}/{name}")),
        name=name,
        namespace=namespace,
        service_account=str(data.get("serviceAccount", "default")),
        ips=tuple(str(ip) for ip in ips),
        protocol=protocol,
        node=str(data["node"]),
        netns=str(data["netns"]) if "netns" in data else None,
        interface=str(data.get("interface", "eth0")),
    )
