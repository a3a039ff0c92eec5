"""cni/spec.py on its own: the runtime's environment and network config, parsed and checked."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cni.protocol import PodRef
from cni.spec import (
    DEFAULT_AGENT_SOCKET,
    CniError,
    ErrorCode,
    NetworkConfig,
    PluginSettings,
    declared_version,
    parse_cni_args,
    parse_environment,
    parse_network_config,
    passthrough_result,
    pod_ips,
    version_result,
)
from tests.support.cni_spec import REQUIRED_VARIABLES

K8S_ARGS = (
    "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-7f9c;"
    "K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=0b5d2c1e-6f1a-4a8e-9d2b-3c4e5f6a7b8c"
)
FULL_ENVIRONMENT = {
    "CNI_COMMAND": "ADD",
    "CNI_CONTAINERID": "abc123",
    "CNI_NETNS": "/var/run/netns/cni-1234",
    "CNI_IFNAME": "eth0",
    "CNI_ARGS": K8S_ARGS,
    "CNI_PATH": "/opt/cni/bin:/usr/libexec/cni",
}
PREV_RESULT_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:01:00:05", "sandbox": "/var/run/netns/x"}],
    "ips": [
        {"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 0},
        {"address": "fd00:10:1::5/64", "interface": 0},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {},
}
PREV_RESULT_0_4 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/x"}],
    "ips": [{"version": "4", "address": "10.1.0.6/24", "gateway": "10.1.0.1", "interface": 0}],
}


def config_bytes(**keys: Any) -> bytes:
    body: dict[str, Any] = {"cniVersion": "1.0.0", "name": "podnet", "type": "ambient-cni"}
    body.update(keys)
    return json.dumps(body).encode()


def raises(code: ErrorCode, call: Any, *args: Any) -> CniError:
    with pytest.raises(CniError) as caught:
        call(*args)
    assert caught.value.code == code, caught.value.msg
    return caught.value


# --- environment ----------------------------------------------------------------------------


def test_full_environment_gives_the_pod_from_cni_args() -> None:
    invocation = parse_environment(FULL_ENVIRONMENT)
    assert invocation.command == "ADD"
    assert invocation.container_id == "abc123"
    assert invocation.netns == "/var/run/netns/cni-1234"
    assert invocation.ifname == "eth0"
    assert invocation.pod == PodRef("shop", "cart-7f9c", "0b5d2c1e-6f1a-4a8e-9d2b-3c4e5f6a7b8c")
    assert invocation.runtime_args["IgnoreUnknown"] == "1"
    assert invocation.plugin_dirs == ("/opt/cni/bin", "/usr/libexec/cni")


def test_without_k8s_args_the_pod_is_unnamed() -> None:
    environment = {k: v for k, v in FULL_ENVIRONMENT.items() if k != "CNI_ARGS"}
    assert parse_environment(environment).pod == PodRef()


@pytest.mark.parametrize(("command", "variable"), REQUIRED_VARIABLES)
def test_a_missing_variable_is_named(command: str, variable: str) -> None:
    environment = {**FULL_ENVIRONMENT, "CNI_COMMAND": command}
    del environment[variable]
    error = raises(ErrorCode.INVALID_ENVIRONMENT, parse_environment, environment)
    assert variable in error.msg and command in error.msg


def test_an_empty_variable_counts_as_missing() -> None:
    error = raises(
        ErrorCode.INVALID_ENVIRONMENT, parse_environment, {**FULL_ENVIRONMENT, "CNI_IFNAME": ""}
    )
    assert "CNI_IFNAME" in error.msg


def test_del_may_come_without_a_netns() -> None:
    environment = {**FULL_ENVIRONMENT, "CNI_COMMAND": "DEL"}
    del environment["CNI_NETNS"]
    assert parse_environment(environment).netns == ""


@pytest.mark.parametrize("command", ["GC", "STATUS", "VERSION"])
def test_commands_about_no_one_container_need_only_the_command(command: str) -> None:
    assert parse_environment({"CNI_COMMAND": command}).command == command


@pytest.mark.parametrize(("value", "named"), [(None, "not set"), ("add", "'add'"), ("FOO", "FOO")])
def test_missing_or_unknown_command_is_invalid_environment(value: str | None, named: str) -> None:
    environment = {} if value is None else {"CNI_COMMAND": value}
    error = raises(ErrorCode.INVALID_ENVIRONMENT, parse_environment, environment)
    assert "CNI_COMMAND" in error.msg and named in error.msg


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CNI_CONTAINERID", "../etc"),
        ("CNI_CONTAINERID", "-abc"),
        ("CNI_IFNAME", "a-name-far-too-long"),
        ("CNI_IFNAME", "eth/0"),
        ("CNI_IFNAME", "eth 0"),
        ("CNI_IFNAME", ".."),
        ("CNI_ARGS", "K8S_POD_NAME"),
        ("CNI_ARGS", "=x"),
    ],
)
def test_malformed_variables_are_invalid_environment(variable: str, value: str) -> None:
    error = raises(
        ErrorCode.INVALID_ENVIRONMENT, parse_environment, {**FULL_ENVIRONMENT, variable: value}
    )
    assert variable in error.msg


def test_cni_args_tolerates_empty_items_and_keeps_equals_in_values() -> None:
    assert parse_cni_args("A=1;;B=x=y;") == {"A": "1", "B": "x=y"}
    assert parse_cni_args("") == {}


# --- network config -------------------------------------------------------------------------


def test_plugin_keys_default_and_unknown_keys_are_fine() -> None:
    config = parse_network_config(config_bytes(runtimeConfig={"x": 1}, someOtherKey=True), "DEL")
    assert config.cni_version == "1.0.0" and config.name == "podnet"
    assert config.settings == PluginSettings(DEFAULT_AGENT_SOCKET, 30.0, ("kube-system",))
    assert config.prev_result is None and config.pod_ips == ()


def test_plugin_keys_are_read() -> None:
    config = parse_network_config(
        config_bytes(
            agentSocket="/run/agent.sock", timeoutSeconds=2.5, excludeNamespaces=["a", "b"]
        ),
        "ADD",
    )
    assert config.settings == PluginSettings("/run/agent.sock", 2.5, ("a", "b"))


def test_only_add_waits_the_whole_timeout() -> None:
    settings = PluginSettings(timeout_seconds=30.0)
    assert settings.agent_timeout("ADD") == 30.0
    assert {settings.agent_timeout(c) for c in ("DEL", "CHECK", "GC", "STATUS")} == {10.0}
    assert PluginSettings(timeout_seconds=1.0).agent_timeout("DEL") == 1.0


def test_excluded_namespaces_and_unnamed_pods() -> None:
    settings = PluginSettings()
    assert settings.excludes(PodRef("kube-system", "coredns"))
    assert not settings.excludes(PodRef("shop", "cart"))
    assert not settings.excludes(PodRef())


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("agentSocket", 5),
        ("agentSocket", "relative/cni.sock"),
        ("agentSocket", "/" + "s" * 120),
        ("timeoutSeconds", -1),
        ("timeoutSeconds", 0),
        ("timeoutSeconds", "30"),
        ("timeoutSeconds", True),
        ("timeoutSeconds", 1e9),
        ("excludeNamespaces", "kube-system"),
        ("excludeNamespaces", ["ok", 3]),
        ("name", "bad name"),
        ("cniVersion", 1),
        ("prevResult", ["not", "an", "object"]),
    ],
)
def test_bad_values_are_invalid_config_naming_the_key(key: str, value: object) -> None:
    error = raises(
        ErrorCode.INVALID_NETWORK_CONFIG, parse_network_config, config_bytes(**{key: value}), "ADD"
    )
    assert key in error.msg


def test_non_finite_timeout_is_refused() -> None:
    # Python's json reads NaN and Infinity; a timeout of either would never end.
    data = b'{"cniVersion": "1.0.0", "name": "n", "timeoutSeconds": Infinity}'
    error = raises(ErrorCode.INVALID_NETWORK_CONFIG, parse_network_config, data, "ADD")
    assert "timeoutSeconds" in error.msg


@pytest.mark.parametrize("data", [b"", b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_undecodable_config_is_a_decode_failure(data: bytes) -> None:
    raises(ErrorCode.DECODE_FAILURE, parse_network_config, data, "ADD")


@pytest.mark.parametrize("version", ["0.3.1", "2.0.0", None])
def test_unsupported_or_missing_version_is_incompatible(version: str | None) -> None:
    body = {"name": "n"} if version is None else {"name": "n", "cniVersion": version}
    error = raises(
        ErrorCode.INCOMPATIBLE_VERSION, parse_network_config, json.dumps(body).encode(), "ADD"
    )
    assert "1.1.0" in error.details


@pytest.mark.parametrize("command", ["GC", "STATUS"])
def test_gc_and_status_need_a_1_1_config(command: str) -> None:
    data = config_bytes(cniVersion="1.0.0", **{"cni.dev/valid-attachments": []})
    error = raises(ErrorCode.INCOMPATIBLE_VERSION, parse_network_config, data, command)
    assert command in error.msg


def test_0_4_config_is_accepted() -> None:
    config = parse_network_config(
        config_bytes(cniVersion="0.4.0", prevResult=PREV_RESULT_0_4), "ADD"
    )
    assert config.cni_version == "0.4.0" and config.pod_ips == ("10.1.0.6",)


# --- prevResult -----------------------------------------------------------------------------


def test_pod_ips_from_a_1_0_result_drop_the_prefix() -> None:
    assert pod_ips(PREV_RESULT_1_0) == ("10.1.0.5", "fd00:10:1::5")


def test_pod_ips_from_a_0_4_result() -> None:
    assert pod_ips(PREV_RESULT_0_4) == ("10.1.0.6",)


def test_pod_ips_each_once_and_none_is_fine() -> None:
    twice = {"ips": [{"address": "10.1.0.5/16"}, {"address": "10.1.0.5/32"}]}
    assert pod_ips(twice) == ("10.1.0.5",)
    assert pod_ips({"interfaces": []}) == ()


@pytest.mark.parametrize(
    ("prev_result", "named"),
    [
        ({"ips": {"address": "10.1.0.5/16"}}, "prevResult.ips"),
        ({"ips": ["10.1.0.5/16"]}, "prevResult.ips[0]"),
        ({"ips": [{"gateway": "10.1.0.1"}]}, "prevResult.ips[0].address"),
        ({"ips": [{"address": "10.1.0.5/16"}, {"address": "10.1.0.300/16"}]}, "ips[1].address"),
        ({"ips": [{"version": "6", "address": "10.1.0.5/16"}]}, "prevResult.ips[0].version"),
        ({"ips": [{"address": "10.1.0.5"}]}, "prevResult.ips[0].address '10.1.0.5' is not"),
        ({"ips": [{"address": "10.1.0.5/16", "gateway": "fd00::1"}]}, "ips[0].gateway"),
        (
            {"ips": [{"address": "10.1.0.5/16", "interface": 2}], "interfaces": [{"name": "a"}]},
            "ips[0].interface 2 is not an index",
        ),
        ({"ips": [{"address": "10.1.0.5/16", "interface": True}]}, "ips[0].interface True"),
    ],
)
def test_malformed_prev_result_is_invalid_config(prev_result: dict[str, Any], named: str) -> None:
    error = raises(
        ErrorCode.INVALID_NETWORK_CONFIG,
        parse_network_config,
        config_bytes(prevResult=prev_result),
        "ADD",
    )
    assert named in error.msg


def test_passthrough_is_the_prev_result_with_the_configs_version() -> None:
    config = parse_network_config(
        config_bytes(cniVersion="1.1.0", prevResult=PREV_RESULT_1_0), "ADD"
    )
    assert passthrough_result(config) == {**PREV_RESULT_1_0, "cniVersion": "1.1.0"}


def test_passthrough_needs_a_prev_result() -> None:
    config = NetworkConfig(cni_version="1.0.0", name="n", settings=PluginSettings())
    with pytest.raises(ValueError):
        passthrough_result(config)


# --- GC's attachments -----------------------------------------------------------------------


def test_valid_attachments_give_each_container_once() -> None:
    attachments = [
        {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "c2", "ifname": "eth0"},
        {"containerID": "c1", "ifname": "net1"},
    ]
    data = config_bytes(cniVersion="1.1.0", **{"cni.dev/valid-attachments": attachments})
    assert parse_network_config(data, "GC").valid_container_ids == ("c1", "c2")
    # Other commands do not read the list.
    assert parse_network_config(data, "DEL").valid_container_ids is None


@pytest.mark.parametrize(
    "keys",
    [
        {},
        {"cni.dev/valid-attachments": {"containerID": "c1"}},
        {"cni.dev/valid-attachments": ["c1"]},
        {"cni.dev/valid-attachments": [{"ifname": "eth0"}]},
    ],
)
def test_gc_without_a_readable_attachment_list_is_invalid_config(keys: dict[str, Any]) -> None:
    # Read as "nothing is valid", it would release every pod on the node.
    data = config_bytes(cniVersion="1.1.0", **keys)
    error = raises(ErrorCode.INVALID_NETWORK_CONFIG, parse_network_config, data, "GC")
    assert "cni.dev/valid-attachments" in error.msg


def test_empty_attachment_list_means_nothing_is_valid() -> None:
    data = config_bytes(cniVersion="1.1.0", **{"cni.dev/valid-attachments": []})
    assert parse_network_config(data, "GC").valid_container_ids == ()


# --- results --------------------------------------------------------------------------------


def test_version_result() -> None:
    assert version_result() == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"],
    }


def test_error_result_is_in_the_spec_format() -> None:
    error = CniError(ErrorCode.TRY_AGAIN_LATER, "later", "why")
    assert error.result("1.0.0") == {
        "cniVersion": "1.0.0",
        "code": 11,
        "msg": "later",
        "details": "why",
    }


@pytest.mark.parametrize(
    ("data", "version"),
    [
        (config_bytes(cniVersion="0.4.0"), "0.4.0"),
        (config_bytes(cniVersion="9.9.9"), "1.1.0"),
        (b"[]", "1.1.0"),
        (b"{", "1.1.0"),
    ],
)
def test_errors_carry_the_configs_version_when_it_is_one_we_speak(
    data: bytes, version: str
) -> None:
    assert declared_version(data) == version
