"""A container runtime's CNI side, as libcni does it, for tests: run a conflist's plugins
with the spec's environment and stdin, feeding each ADD's result to the next plugin as
prevResult, and DEL in reverse order.

Plugins run inside the node's netns (where the runtime lives: the bridge plugin creates its
bridge there) through `nsenter --net`."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PluginFailed(RuntimeError):
    def __init__(self, plugin: str, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"{plugin} {command} failed: {error}")
        self.plugin = plugin
        self.error = error


@dataclass(frozen=True)
class Attachment:
    container_id: str
    netns: str  # the pod's netns path
    ifname: str = "eth0"
    namespace: str = "default"
    name: str = ""
    uid: str = ""


class CniRuntime:
    def __init__(self, conflist: dict[str, Any], plugin_dir: Path, node_netns: Path) -> None:
        self.conflist = conflist
        self.plugin_dir = plugin_dir
        self.node_netns = node_netns

    def add(self, pod: Attachment) -> dict[str, Any]:
        """The sandbox's networks as containerd sets them up: `lo` through the loopback
        plugin, then the conflist's chain."""
        loopback = Attachment(pod.container_id, pod.netns, "lo", pod.namespace, pod.name,
                              pod.uid)  # fmt: skip
        self._run({"type": "loopback"}, "ADD", loopback, None)
        result: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            result = self._run(plugin, "ADD", pod, result)
        assert result is not None
        return result

    def check(self, pod: Attachment, result: dict[str, Any]) -> None:
        for plugin in self.conflist["plugins"]:
            self._run(plugin, "CHECK", pod, result)

    def delete(self, pod: Attachment, result: dict[str, Any] | None = None) -> None:
        for plugin in reversed(self.conflist["plugins"]):
            self._run(plugin, "DEL", pod, result)

    def run_one(
        self, plugin: dict[str, Any], command: str, pod: Attachment | None,
        prev_result: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
    ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """One plugin, one command; the completed process, whatever it answered."""
        config = {"cniVersion": self.conflist["cniVersion"], "name": self.conflist["name"],
                  **plugin, **(extra or {})}  # fmt: skip
        if prev_result is not None:
            config["prevResult"] = prev_result
        env = {"CNI_COMMAND": command, "CNI_PATH": str(self.plugin_dir), "PATH": "/usr/bin:/bin"}
        if pod is not None:
            env |= {
                "CNI_CONTAINERID": pod.container_id, "CNI_NETNS": pod.netns,
                "CNI_IFNAME": pod.ifname,
                "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE={pod.namespace};"
                            f"K8S_POD_NAME={pod.name};K8S_POD_UID={pod.uid}",
            }  # fmt: skip
        return subprocess.run(
            ["nsenter", f"--net={self.node_netns}", "--", str(self.plugin_dir / plugin["type"])],
            input=json.dumps(config), capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip

    def _run(
        self, plugin: dict[str, Any], command: str, pod: Attachment,
        prev_result: dict[str, Any] | None,
    ) -> dict[str, Any] | None:  # fmt: skip
        done = self.run_one(plugin, command, pod, prev_result)
        if done.returncode != 0:
            try:
                error = json.loads(done.stdout)
            except json.JSONDecodeError:
                error = {"stdout": done.stdout, "stderr": done.stderr}
            raise PluginFailed(plugin["type"], command, error)
        if command == "ADD":
            answer: dict[str, Any] = json.loads(done.stdout)
            return answer
        return None
