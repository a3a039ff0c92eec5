"""`ambient-cni` run as a container runtime runs it: `python -m cni.plugin` with the CNI
environment and the network config on stdin, talking to a fake agent on a unix socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cni.protocol import Answer, PodRef, ProtocolError, Request, decode_request
from tests.support.cni_spec import REQUIRED_VARIABLES

REPO_ROOT = Path(__file__).resolve().parents[3]
PLUGIN_RUN_LIMIT = 10.0  # seconds: far beyond any case here; a hang fails, never blocks

CONTAINER_ID = "3f2a9c1d7e"
NETNS = "/var/run/netns/cni-5e1c"
POD = PodRef("shop", "cart-7f9c", "0b5d2c1e-6f1a-4a8e-9d2b-3c4e5f6a7b8c")
POD_ENV = {
    "CNI_CONTAINERID": CONTAINER_ID,
    "CNI_NETNS": NETNS,
    "CNI_IFNAME": "eth0",
    "CNI_PATH": "/opt/cni/bin",
    "CNI_ARGS": (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={POD.namespace};K8S_POD_NAME={POD.name};"
        f"K8S_POD_INFRA_CONTAINER_ID={CONTAINER_ID};K8S_POD_UID={POD.uid}"
    ),
}
PREV_RESULT_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:00:00:01"},
        {"name": "veth1a2b", "mac": "aa:bb:cc:00:00:02"},
        {"name": "eth0", "mac": "0a:58:0a:01:00:05", "sandbox": NETNS},
    ],
    "ips": [
        {"address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2},
        {"address": "fd00:10:1::5/64", "gateway": "fd00:10:1::1", "interface": 2},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}],
    "dns": {"nameservers": ["10.96.0.10"]},
}
PREV_RESULT_0_4 = {
    "cniVersion": "0.4.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:01:00:06", "sandbox": NETNS}],
    "ips": [{"version": "4", "address": "10.1.0.6/24", "gateway": "10.1.0.1", "interface": 0}],
    "dns": {},
}


class FakeAgent:
    """The agent's end of the socket: records each request, answers with `reply` (raw bytes,
    so tests can answer garbage) after `delay` seconds. One connection at a time."""

    def __init__(self, socket_path: Path) -> None:
        self.socket_path = socket_path
        self.requests: list[Request] = []
        self.reply = Answer(ok=True, enrolled=True).encode()
        self.delay = 0.0
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(socket_path))
        self._listener.listen()
        self._listener.settimeout(0.05)  # so the loop notices `close` promptly
        self._thread = threading.Thread(target=self._serve, name="fake-agent", daemon=True)
        self._thread.start()

    def answer(self, answer: Answer) -> None:
        self.reply = answer.encode()

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._listener.accept()
            except TimeoutError:
                continue
            with connection, connection.makefile("rb") as reader:
                connection.settimeout(PLUGIN_RUN_LIMIT)
                line = reader.readline()
                try:
                    self.requests.append(decode_request(line))
                except ProtocolError as exc:
                    connection.sendall(Answer(ok=False, error=str(exc)).encode())
                    continue
                if self._stopping.wait(self.delay):
                    return
                connection.sendall(self.reply)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
        self._listener.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    fake = FakeAgent(tmp_path / "cni.sock")
    yield fake
    fake.close()


def network_config(socket_path: Path, **keys: Any) -> dict[str, Any]:
    return {
        "cniVersion": "1.0.0",
        "name": "podnet",
        "type": "ambient-cni",
        "agentSocket": str(socket_path),
        **keys,
    }


def run_plugin(
    command: str | None, config: dict[str, Any] | str | None = None, **env: str | None
) -> subprocess.CompletedProcess[str]:
    """Run the plugin; `env` adds variables to POD_ENV, or removes them when None."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    environment.update(POD_ENV)
    if command is not None:
        environment["CNI_COMMAND"] = command
    for name, value in env.items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    stdin = config if isinstance(config, str) else json.dumps(config or {})
    return subprocess.run(
        [sys.executable, "-m", "cni.plugin"],
        input=stdin,
        capture_output=True,
        text=True,
        env=environment,
        cwd=REPO_ROOT,
        timeout=PLUGIN_RUN_LIMIT,
    )


def cni_error(done: subprocess.CompletedProcess[str], code: int) -> dict[str, Any]:
    """The spec-format error the plugin printed, checked for shape and code."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    error: dict[str, Any] = json.loads(done.stdout)
    assert set(error) == {"cniVersion", "code", "msg", "details"}, error
    assert error["code"] == code, error
    return error


def succeeded_silently(done: subprocess.CompletedProcess[str]) -> bool:
    return done.returncode == 0 and done.stdout == ""


def pod_request(op: str, ips: tuple[str, ...], netns: str = NETNS) -> Request:
    return Request(op, CONTAINER_ID, netns, "eth0", POD, ips)


# --- VERSION, and what every command needs --------------------------------------------------


def test_version_lists_the_supported_spec_versions() -> None:
    done = run_plugin("VERSION", "")
    assert done.returncode == 0
    assert json.loads(done.stdout) == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.4.0", "1.0.0", "1.1.0"],
    }


@pytest.mark.parametrize("command", [None, "FOO"])
def test_missing_or_unknown_command_is_invalid_environment(command: str | None) -> None:
    error = cni_error(run_plugin(command, network_config(Path("/x"))), 4)
    assert "CNI_COMMAND" in error["msg"]


@pytest.mark.parametrize(("command", "variable"), REQUIRED_VARIABLES)
def test_each_missing_variable_is_named(agent: FakeAgent, command: str, variable: str) -> None:
    config = network_config(agent.socket_path, prevResult=PREV_RESULT_1_0)
    error = cni_error(run_plugin(command, config, **{variable: None}), 4)
    assert variable in error["msg"]
    assert agent.requests == []


def test_malformed_stdin_is_a_decode_failure(agent: FakeAgent) -> None:
    cni_error(run_plugin("ADD", '{"cniVersion": "1.0.0", "name": '), 6)
    assert agent.requests == []


def test_unsupported_version_is_incompatible(agent: FakeAgent) -> None:
    config = network_config(agent.socket_path, cniVersion="0.3.1", prevResult=PREV_RESULT_0_4)
    error = cni_error(run_plugin("ADD", config), 1)
    assert "0.3.1" in error["msg"]
    assert agent.requests == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("agentSocket", 42),
        ("agentSocket", "cni.sock"),
        ("timeoutSeconds", -5),
        ("timeoutSeconds", "30"),
        ("excludeNamespaces", "kube-system"),
    ],
)
def test_bad_plugin_values_are_invalid_config_naming_the_key(
    agent: FakeAgent, key: str, value: object
) -> None:
    config = network_config(agent.socket_path, prevResult=PREV_RESULT_1_0, **{key: value})
    error = cni_error(run_plugin("ADD", config), 7)
    assert key in error["msg"]
    assert error["cniVersion"] == "1.0.0"
    assert agent.requests == []


# --- ADD ------------------------------------------------------------------------------------


def test_add_enrolls_the_pod_and_passes_the_result_through(agent: FakeAgent) -> None:
    done = run_plugin("ADD", network_config(agent.socket_path, prevResult=PREV_RESULT_1_0))
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout) == PREV_RESULT_1_0
    assert agent.requests == [pod_request("add", ("10.1.0.5", "fd00:10:1::5"))]


def test_add_reads_a_0_4_result(agent: FakeAgent) -> None:
    config = network_config(agent.socket_path, cniVersion="0.4.0", prevResult=PREV_RESULT_0_4)
    done = run_plugin("ADD", config)
    assert done.returncode == 0, done.stdout
    assert json.loads(done.stdout) == PREV_RESULT_0_4
    assert agent.requests == [pod_request("add", ("10.1.0.6",))]


def test_add_result_carries_the_configs_version(agent: FakeAgent) -> None:
    config = network_config(agent.socket_path, cniVersion="1.1.0", prevResult=PREV_RESULT_1_0)
    done = run_plugin("ADD", config)
    assert json.loads(done.stdout) == {**PREV_RESULT_1_0, "cniVersion": "1.1.0"}


def test_add_passes_through_when_the_agent_does_not_enroll(agent: FakeAgent) -> None:
    # The agent decides by namespace labels; not enrolling is an answer, not an error.
    agent.answer(Answer(ok=True, enrolled=False))
    done = run_plugin("ADD", network_config(agent.socket_path, prevResult=PREV_RESULT_1_0))
    assert done.returncode == 0 and json.loads(done.stdout) == PREV_RESULT_1_0


def test_add_must_be_chained(agent: FakeAgent) -> None:
    error = cni_error(run_plugin("ADD", network_config(agent.socket_path)), 7)
    assert "chained" in error["msg"]
    assert agent.requests == []


@pytest.mark.parametrize(
    ("namespace", "keys"),
    [("kube-system", {}), ("infra", {"excludeNamespaces": ["infra", "monitoring"]})],
)
def test_excluded_namespaces_never_reach_the_agent(
    agent: FakeAgent, namespace: str, keys: dict[str, Any]
) -> None:
    pod_args = f"K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=dns;K8S_POD_UID=u1"
    config = network_config(agent.socket_path, prevResult=PREV_RESULT_1_0, **keys)
    added = run_plugin("ADD", config, CNI_ARGS=pod_args)
    assert added.returncode == 0 and json.loads(added.stdout) == PREV_RESULT_1_0
    assert succeeded_silently(run_plugin("CHECK", config, CNI_ARGS=pod_args))
    assert agent.requests == []


def test_add_without_a_pod_namespace_is_refused_unless_a_default_is_configured(
    agent: FakeAgent,
) -> None:
    podman = {"CNI_ARGS": "IgnoreUnknown=1"}  # what podman sends: no K8S_POD_* at all
    done = run_plugin("ADD", network_config(agent.socket_path, prevResult=PREV_RESULT_1_0),
                      **podman)  # fmt: skip
    error = cni_error(done, 4)
    assert "no K8S_POD_NAMESPACE" in error["msg"] and "defaultNamespace" in error["details"]
    assert agent.requests == []  # refused before the agent saw it: nothing was changed

    config = network_config(agent.socket_path, prevResult=PREV_RESULT_1_0,
                            defaultNamespace="containers")  # fmt: skip
    done = run_plugin("ADD", config, **podman)
    assert done.returncode == 0, done.stdout
    assert [r.pod.namespace for r in agent.requests] == ["containers"]


def test_a_default_namespace_must_be_a_namespace_name(agent: FakeAgent) -> None:
    config = network_config(agent.socket_path, prevResult=PREV_RESULT_1_0,
                            defaultNamespace="Not A Namespace")  # fmt: skip
    error = cni_error(run_plugin("ADD", config), 7)
    assert "defaultNamespace" in error["msg"]


def test_add_refused_by_the_agent_is_our_error(agent: FakeAgent) -> None:
    agent.answer(Answer(ok=False, error="cannot attach to netns: gone"))
    error = cni_error(
        run_plugin("ADD", network_config(agent.socket_path, prevResult=PREV_RESULT_1_0)), 100
    )
    assert "cannot attach to netns: gone" in error["msg"]
    assert "shop/cart-7f9c" in error["msg"]


def test_add_without_an_agent_fails_closed(tmp_path: Path) -> None:
    socket_path = tmp_path / "absent.sock"
    error = cni_error(
        run_plugin("ADD", network_config(socket_path, prevResult=PREV_RESULT_1_0)), 11
    )
    assert str(socket_path) in error["msg"] and "try again later" in error["msg"]
    assert "before its containers start" in error["details"]


def test_add_with_nobody_listening_fails_closed(tmp_path: Path) -> None:
    # A socket file left behind by an agent that died: connecting is refused.
    socket_path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(socket_path))
    error = cni_error(
        run_plugin("ADD", network_config(socket_path, prevResult=PREV_RESULT_1_0)), 11
    )
    assert "refused" in error["msg"]


def test_add_gives_up_on_a_slow_agent_after_its_timeout(agent: FakeAgent) -> None:
    agent.delay = 5.0
    config = network_config(agent.socket_path, prevResult=PREV_RESULT_1_0, timeoutSeconds=1)
    started = time.monotonic()
    error = cni_error(run_plugin("ADD", config), 11)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 3.0
    assert "within 1 s" in error["msg"]


def test_add_when_the_agent_hangs_up_without_answering(agent: FakeAgent) -> None:
    agent.reply = b""
    cni_error(run_plugin("ADD", network_config(agent.socket_path, prevResult=PREV_RESULT_1_0)), 11)


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        (b"this is not json\n", "not JSON"),
        (b'{"version": 2, "ok": true}\n', "protocol version 2"),
        (b'{"version": 1, "ok": "yes"}\n', "ok must be true or false"),
    ],
)
def test_add_with_an_unreadable_answer_is_an_io_failure(
    agent: FakeAgent, reply: bytes, said: str
) -> None:
    agent.reply = reply
    error = cni_error(
        run_plugin("ADD", network_config(agent.socket_path, prevResult=PREV_RESULT_1_0)), 5
    )
    assert said in error["details"]


# --- DEL ------------------------------------------------------------------------------------


def test_del_tells_the_agent(agent: FakeAgent) -> None:
    done = run_plugin("DEL", network_config(agent.socket_path, prevResult=PREV_RESULT_1_0))
    assert succeeded_silently(done), done.stdout
    assert agent.requests == [pod_request("del", ("10.1.0.5", "fd00:10:1::5"))]


def test_del_without_netns_or_prev_result(agent: FakeAgent) -> None:
    done = run_plugin("DEL", network_config(agent.socket_path), CNI_NETNS=None)
    assert succeeded_silently(done), done.stdout
    assert agent.requests == [pod_request("del", (), netns="")]


def test_del_succeeds_without_an_agent(tmp_path: Path) -> None:
    done = run_plugin("DEL", network_config(tmp_path / "absent.sock"))
    assert succeeded_silently(done), done.stdout
    assert "reconciles" in done.stderr


@pytest.mark.parametrize(
    "reply", [Answer(ok=False, error="no such container").encode(), b"garbage\n"]
)
def test_del_succeeds_whatever_the_agent_answers(agent: FakeAgent, reply: bytes) -> None:
    agent.reply = reply
    done = run_plugin("DEL", network_config(agent.socket_path))
    assert succeeded_silently(done), done.stdout
    assert "DEL of pod shop/cart-7f9c" in done.stderr


# --- CHECK ----------------------------------------------------------------------------------


def test_check_asks_the_agent(agent: FakeAgent) -> None:
    done = run_plugin("CHECK", network_config(agent.socket_path, prevResult=PREV_RESULT_1_0))
    assert succeeded_silently(done), done.stdout
    assert agent.requests == [pod_request("check", ("10.1.0.5", "fd00:10:1::5"))]


def test_check_fails_when_the_agent_says_so(agent: FakeAgent) -> None:
    agent.answer(Answer(ok=False, error="pod is not captured"))
    config = network_config(agent.socket_path, prevResult=PREV_RESULT_1_0)
    error = cni_error(run_plugin("CHECK", config), 100)
    assert "pod is not captured" in error["msg"]


def test_check_without_an_agent_is_try_again_later(tmp_path: Path) -> None:
    config = network_config(tmp_path / "absent.sock", prevResult=PREV_RESULT_1_0)
    cni_error(run_plugin("CHECK", config), 11)


def test_check_needs_a_prev_result(agent: FakeAgent) -> None:
    cni_error(run_plugin("CHECK", network_config(agent.socket_path)), 7)
    assert agent.requests == []


# --- GC and STATUS (spec 1.1) ---------------------------------------------------------------


def test_gc_sends_the_valid_containers(agent: FakeAgent) -> None:
    attachments = [
        {"containerID": "c1", "ifname": "eth0"},
        {"containerID": "c2", "ifname": "eth0"},
        {"containerID": "c1", "ifname": "net1"},
    ]
    config = network_config(
        agent.socket_path, cniVersion="1.1.0", **{"cni.dev/valid-attachments": attachments}
    )
    done = run_plugin("GC", config, CNI_CONTAINERID=None, CNI_NETNS=None, CNI_IFNAME=None)
    assert succeeded_silently(done), done.stdout
    assert agent.requests == [Request("gc", valid=("c1", "c2"))]


def test_gc_without_an_agent_is_try_again_later(tmp_path: Path) -> None:
    config = network_config(
        tmp_path / "absent.sock", cniVersion="1.1.0", **{"cni.dev/valid-attachments": []}
    )
    cni_error(run_plugin("GC", config), 11)


def test_gc_without_the_attachment_list_releases_nothing(agent: FakeAgent) -> None:
    error = cni_error(run_plugin("GC", network_config(agent.socket_path, cniVersion="1.1.0")), 7)
    assert "cni.dev/valid-attachments" in error["msg"]
    assert agent.requests == []


def test_status_ok(agent: FakeAgent) -> None:
    done = run_plugin("STATUS", network_config(agent.socket_path, cniVersion="1.1.0"))
    assert succeeded_silently(done), done.stdout
    assert agent.requests == [Request("status")]


def test_status_not_ready_is_plugin_not_available(agent: FakeAgent) -> None:
    agent.answer(Answer(ok=False, error="still loading eBPF programs"))
    error = cni_error(
        run_plugin("STATUS", network_config(agent.socket_path, cniVersion="1.1.0")), 50
    )
    assert "still loading eBPF programs" in error["msg"]


def test_status_without_an_agent_is_plugin_not_available(tmp_path: Path) -> None:
    cni_error(
        run_plugin("STATUS", network_config(tmp_path / "absent.sock", cniVersion="1.1.0")), 50
    )
