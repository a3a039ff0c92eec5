"""`ambient-cni install/uninstall`: chaining into the primary CNI config, all in tmp_path."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni import install as cni_install
from cni.install import build_zipapp, chain, main, plugin_entry, unchain

ENTRY = {
    "type": "ambient-cni",
    "agentSocket": "/var/run/ambient-agent/cni.sock",
    "excludeNamespaces": ["kube-system"],
    "timeoutSeconds": 30,
}

# A primary conflist with keys in no particular order, so a reordering would show.
FLANNEL_LIKE: dict[str, Any] = {
    "name": "cbr0",
    "cniVersion": "0.4.0",
    "disableCheck": True,
    "plugins": [
        {"type": "flannel", "delegate": {"isDefaultGateway": True, "hairpinMode": True}},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": True},
    ],
    "zz-extra": {"b": 1, "a": [3, 2, 1]},
}

BRIDGE_CONF: dict[str, Any] = {
    "type": "bridge",
    "cniVersion": "1.0.0",
    "bridge": "cni0",
    "name": "bridge-net",
    "isGateway": True,
    "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"},
}

# The shape of the reference conflist Debian's containerd packaging ships
# (10-containerd-net.conflist): bridge with host-local IPAM, then portmap.
DEBIAN_REFERENCE = """\
{
  "cniVersion": "1.0.0",
  "name": "containerd-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "promiscMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [{
            "subnet": "10.88.0.0/16"
          }],
          [{
            "subnet": "2001:4860:4860::/64"
          }]
        ],
        "routes": [
          { "dst": "0.0.0.0/0" },
          { "dst": "::/0" }
        ]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
"""


@dataclass
class Node:
    bin_dir: Path
    conf_dir: Path

    @property
    def binary(self) -> Path:
        return self.bin_dir / "ambient-cni"

    def options(self) -> list[str]:
        return ["--cni-bin-dir", str(self.bin_dir), "--cni-conf-dir", str(self.conf_dir)]

    def install(self, *extra: str) -> int:
        # The test's own interpreter, so nothing depends on the host's /usr/bin/env python3.
        return main(["install", *self.options(), "--python", sys.executable, *extra])

    def uninstall(self) -> int:
        return main(["uninstall", *self.options()])

    def write(self, name: str, config: dict[str, Any] | str, mode: int = 0o644) -> Path:
        path = self.conf_dir / name
        path.write_text(config if isinstance(config, str) else json.dumps(config, indent=4))
        path.chmod(mode)
        return path

    def snapshot(self) -> dict[str, bytes]:
        return {
            str(path.relative_to(self.bin_dir.parent)): path.read_bytes()
            for directory in (self.bin_dir, self.conf_dir)
            if directory.is_dir()
            for path in sorted(directory.iterdir())
        }


@pytest.fixture
def node(tmp_path: Path) -> Node:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    bin_dir.mkdir()
    conf_dir.mkdir()
    return Node(bin_dir, conf_dir)


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def same_with_key_order(left: object, right: object) -> bool:
    # json.dumps follows dict order, so equal text means equal values in the same key order.
    return json.dumps(left) == json.dumps(right)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- chain / unchain, no I/O ----------------------------------------------------------------


def test_chain_appends_last_and_keeps_the_rest_in_order() -> None:
    chained = chain(FLANNEL_LIKE, ENTRY)
    assert list(chained) == list(FLANNEL_LIKE)
    assert chained["plugins"][-1] == ENTRY
    without_ours = {**chained, "plugins": chained["plugins"][:-1]}
    assert same_with_key_order(without_ours, FLANNEL_LIKE)


def test_chain_does_not_modify_its_input() -> None:
    before = json.dumps(FLANNEL_LIKE)
    chain(FLANNEL_LIKE, ENTRY)
    assert json.dumps(FLANNEL_LIKE) == before


def test_chain_replaces_an_existing_entry_where_it_stands() -> None:
    first, second = FLANNEL_LIKE["plugins"]
    config = {**FLANNEL_LIKE, "plugins": [first, dict(ENTRY), second, dict(ENTRY)]}
    updated = {**ENTRY, "timeoutSeconds": 5}
    assert chain(config, updated)["plugins"] == [first, updated, second]


def test_chain_turns_a_single_conf_into_a_conflist() -> None:
    chained = chain(BRIDGE_CONF, ENTRY)
    plugin = {key: value for key, value in BRIDGE_CONF.items() if key not in ("cniVersion", "name")}
    expected = {"cniVersion": "1.0.0", "name": "bridge-net", "plugins": [plugin, ENTRY]}
    assert same_with_key_order(chained, expected)


def test_chain_refuses_what_is_not_a_config() -> None:
    with pytest.raises(cni_install.ConfigError, match='no "type"'):
        chain({"name": "x", "cniVersion": "1.0.0"}, ENTRY)
    with pytest.raises(cni_install.ConfigError, match='no "plugins" list'):
        chain({"name": "x", "plugins": {"type": "bridge"}}, ENTRY)
    with pytest.raises(cni_install.ConfigError, match='no "name"'):
        chain({"type": "bridge"}, ENTRY)


def test_unchain_removes_only_our_entries() -> None:
    chained = chain(FLANNEL_LIKE, ENTRY)
    assert same_with_key_order(unchain(chained), FLANNEL_LIKE)
    assert same_with_key_order(unchain(FLANNEL_LIKE), FLANNEL_LIKE)


def test_plugin_entry_defaults() -> None:
    assert plugin_entry() == ENTRY


# --- install --------------------------------------------------------------------------------


def test_install_chains_into_the_conflist_keeping_everything_else(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    primary = node.write("10-flannel.conflist", FLANNEL_LIKE, mode=0o640)

    assert node.install() == 0

    installed = load(primary)
    assert installed["plugins"][-1] == ENTRY
    assert same_with_key_order({**installed, "plugins": installed["plugins"][:-1]}, FLANNEL_LIKE)
    assert mode_of(primary) == 0o640
    assert sorted(path.name for path in node.conf_dir.iterdir()) == ["10-flannel.conflist"]
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"wrote {node.binary} (zipapp, interpreter {sys.executable})",
        f"chained ambient-cni in {primary}",
    ]


def test_install_passes_the_given_settings(node: Node) -> None:
    primary = node.write("10-flannel.conflist", FLANNEL_LIKE)
    options = ["--agent-socket", "/run/a.sock", "--exclude-namespaces", "kube-system, istio-system"]

    assert node.install(*options, "--timeout-seconds", "7") == 0

    assert load(primary)["plugins"][-1] == {
        "type": "ambient-cni",
        "agentSocket": "/run/a.sock",
        "excludeNamespaces": ["kube-system", "istio-system"],
        "timeoutSeconds": 7,
    }


def test_install_twice_keeps_one_entry_with_the_new_settings(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    primary = node.write("10-flannel.conflist", FLANNEL_LIKE)

    assert node.install() == 0
    assert node.install("--timeout-seconds", "12") == 0

    plugins = load(primary)["plugins"]
    assert [plugin["type"] for plugin in plugins] == ["flannel", "portmap", "ambient-cni"]
    assert plugins[-1]["timeoutSeconds"] == 12
    assert f"updated ambient-cni in {primary}" in capsys.readouterr().out


def test_install_converts_a_single_conf_to_a_conflist(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = node.write("10-bridge.conf", BRIDGE_CONF, mode=0o600)

    assert node.install() == 0

    conflist = node.conf_dir / "10-bridge.conflist"
    assert not conf.exists()
    assert [path.name for path in node.conf_dir.iterdir()] == ["10-bridge.conflist"]
    assert same_with_key_order(load(conflist), chain(BRIDGE_CONF, ENTRY))
    assert mode_of(conflist) == 0o600
    out = capsys.readouterr().out.splitlines()
    assert out[1:] == [
        f"converted {conf} to {conflist}",
        f"chained ambient-cni in {conflist}",
        f"removed {conf}",
    ]


def test_install_picks_the_lexicographically_first_config(node: Node) -> None:
    (node.conf_dir / "00-not-a-config.txt").write_text("{}")
    (node.conf_dir / "01-a-directory.conflist").mkdir()
    later = node.write("20-calico.conflist", FLANNEL_LIKE)
    also_later = node.write("10-flannel.json", BRIDGE_CONF)
    first = node.write("05-cilium.conflist", FLANNEL_LIKE)
    untouched = {path: path.read_bytes() for path in (later, also_later)}

    assert node.install() == 0

    assert load(first)["plugins"][-1] == ENTRY
    assert {path: path.read_bytes() for path in untouched} == untouched


def test_install_chains_into_the_debian_reference_conflist_last(node: Node) -> None:
    primary = node.write("10-containerd-net.conflist", DEBIAN_REFERENCE)

    assert node.install() == 0

    installed = load(primary)
    assert [plugin["type"] for plugin in installed["plugins"]] == [
        "bridge",
        "portmap",
        "ambient-cni",
    ]
    reference = json.loads(DEBIAN_REFERENCE)
    assert same_with_key_order({**installed, "plugins": installed["plugins"][:-1]}, reference)


REFUSALS = [
    pytest.param(None, "does not exist", id="conf-dir-missing"),
    pytest.param({}, "no CNI network config in", id="no-config"),
    pytest.param({"10-x.conflist": '{"name": "x", "plugins": ['}, "not valid JSON", id="bad-json"),
    pytest.param(
        {"10-x.conflist": '{"cniVersion": "1.0.0", "name": "x", "type": "bridge"}'},
        'no "plugins" list',
        id="conflist-without-plugins",
    ),
    pytest.param({"10-x.conf": '{"cniVersion": "1.0.0", "name": "x"}'}, 'no "type"', id="no-type"),
    pytest.param({"10-x.conflist": "[1, 2]"}, "not a JSON object", id="not-an-object"),
    pytest.param(
        {"10-x.conf": json.dumps(BRIDGE_CONF), "10-x.conflist": json.dumps(FLANNEL_LIKE)},
        "already exists",
        id="conversion-would-clobber",
    ),
]


@pytest.mark.parametrize(("files", "message"), REFUSALS)
def test_install_refuses_and_touches_nothing(
    node: Node,
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str] | None,
    message: str,
) -> None:
    if files is None:
        node.conf_dir.rmdir()
    else:
        for name, text in files.items():
            node.write(name, text)
    before = node.snapshot()

    assert node.install() == 1

    assert node.snapshot() == before
    assert not node.binary.exists()
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("ambient-cni install: ")
    assert message in captured.err


def test_install_refuses_a_missing_bin_dir(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    node.write("10-flannel.conflist", FLANNEL_LIKE)
    node.bin_dir.rmdir()
    before = node.snapshot()

    assert node.install() == 1

    assert node.snapshot() == before
    assert "CNI bin directory" in capsys.readouterr().err


def test_no_config_message_tells_to_install_the_primary_cni(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    assert node.install() == 1
    assert capsys.readouterr().err.strip() == (
        f"ambient-cni install: no CNI network config in {node.conf_dir}:"
        " install the primary CNI first"
    )


def test_usage_errors_return_nonzero_without_raising(node: Node) -> None:
    assert main(["install", "--timeout-seconds", "0"]) == 2
    assert main(["reinstall"]) == 2


# --- uninstall ------------------------------------------------------------------------------


def test_uninstall_removes_exactly_our_entry_and_the_binary(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    primary = node.write("10-flannel.conflist", FLANNEL_LIKE, mode=0o640)
    assert node.install() == 0
    capsys.readouterr()

    assert node.uninstall() == 0

    assert same_with_key_order(load(primary), FLANNEL_LIKE)
    assert mode_of(primary) == 0o640
    assert not node.binary.exists()
    assert capsys.readouterr().out.splitlines() == [
        f"removed ambient-cni from {primary}",
        f"removed {node.binary}",
    ]


def test_uninstall_is_idempotent(node: Node, capsys: pytest.CaptureFixture[str]) -> None:
    primary = node.write("10-flannel.conflist", FLANNEL_LIKE)
    assert node.install() == 0
    assert node.uninstall() == 0
    after_first = node.snapshot()
    capsys.readouterr()

    assert node.uninstall() == 0

    assert node.snapshot() == after_first
    assert capsys.readouterr().out.splitlines() == [
        f"no ambient-cni entry in {primary}: nothing to unchain",
        f"{node.binary} not present: nothing to remove",
    ]


def test_uninstall_with_nothing_installed_succeeds(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.conf_dir.rmdir()

    assert node.uninstall() == 0

    assert "nothing to unchain" in capsys.readouterr().out


def test_uninstall_after_conversion_leaves_the_conflist(node: Node) -> None:
    node.write("10-bridge.conf", BRIDGE_CONF)
    assert node.install() == 0

    assert node.uninstall() == 0

    conflist = node.conf_dir / "10-bridge.conflist"
    assert [path.name for path in node.conf_dir.iterdir()] == ["10-bridge.conflist"]
    assert same_with_key_order(load(conflist), cni_install.conf_to_conflist(BRIDGE_CONF))


def test_uninstall_refuses_an_unreadable_config_and_keeps_the_binary(
    node: Node, capsys: pytest.CaptureFixture[str]
) -> None:
    node.write("10-flannel.conflist", FLANNEL_LIKE)
    assert node.install() == 0
    node.write("10-flannel.conflist", "{ broken")
    before = node.snapshot()

    assert node.uninstall() == 1

    assert node.snapshot() == before
    assert "not valid JSON" in capsys.readouterr().err


# --- the zipapp -----------------------------------------------------------------------------


def version_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("CNI_")}
    env.pop("PYTHONPATH", None)
    return {**env, "CNI_COMMAND": "VERSION"}


def assert_answers_version(command: list[str], cwd: Path) -> None:
    done = subprocess.run(
        command, env=version_env(), cwd=cwd, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "supportedVersions" in json.loads(done.stdout)


def test_installed_zipapp_is_executable_and_answers_version(node: Node) -> None:
    node.write("10-flannel.conflist", FLANNEL_LIKE)
    assert node.install() == 0

    assert [path.name for path in node.bin_dir.iterdir()] == ["ambient-cni"]  # no temp left
    assert os.access(node.binary, os.X_OK)
    assert mode_of(node.binary) == 0o755
    assert node.binary.read_bytes().startswith(f"#!{sys.executable}\n".encode())
    # Run by its interpreter line, and by an interpreter that sees no site-packages at all
    # (-I -S): the archive alone must be enough.
    assert_answers_version([str(node.binary)], node.bin_dir)
    assert_answers_version([sys.executable, "-I", "-S", str(node.binary)], node.bin_dir)


def test_zipapp_keeps_the_plugins_failure_exit_status(tmp_path: Path) -> None:
    # The runtime reads a plugin's failure from its exit status, not only from its output.
    target = tmp_path / "ambient-cni"
    build_zipapp(target, sys.executable)
    env = {key: value for key, value in version_env().items() if key != "CNI_COMMAND"}
    done = subprocess.run(
        [str(target)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert done.returncode != 0


def test_runs_as_a_module(node: Node) -> None:
    node.write("10-flannel.conflist", FLANNEL_LIKE)
    command = [sys.executable, "-m", "cni.install", "install", *node.options()]
    done = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert node.binary.exists()


def test_zipapp_holds_the_whole_package(tmp_path: Path) -> None:
    target = tmp_path / "ambient-cni"
    build_zipapp(target, sys.executable)

    names = set(zipfile.ZipFile(target).namelist())
    package_dir = Path(cni_install.__file__).parent
    expected = {f"cni/{path.name}" for path in package_dir.glob("*.py")}
    assert expected <= names
    assert "__main__.py" in names
    assert not any("__pycache__" in name for name in names)


def test_zipapp_can_rebuild_itself_from_inside_the_archive(tmp_path: Path) -> None:
    # `ambient-cni install` run on a host from the zipapp reads the package from the archive.
    archive, rebuilt = tmp_path / "first", tmp_path / "second"
    build_zipapp(archive, sys.executable)
    script = (
        "import sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "import cni.install as i; assert i.__file__.startswith(sys.argv[1]), i.__file__;"
        "i.build_zipapp(Path(sys.argv[2]), sys.executable)"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", script, str(archive), str(rebuilt)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert zipfile.ZipFile(rebuilt).namelist() == zipfile.ZipFile(archive).namelist()
    assert_answers_version([str(rebuilt)], tmp_path)


def test_install_module_uses_only_the_standard_library() -> None:
    tree = ast.parse(Path(cni_install.__file__).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
    }
    assert imported - {"cni"} <= sys.stdlib_module_names
