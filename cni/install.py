"""`ambient-cni install` / `ambient-cni uninstall`: put the plugin on a node and chain it.

Install writes the plugin to the CNI bin dir as a self-contained zipapp (this package, run
by the host's python3) and appends an `ambient-cni` entry to the node's primary network
config, the file the container runtime actually uses. Uninstall takes both away again.

The primary config belongs to another CNI (bridge, flannel, calico ...): a broken file there
stops every pod on the node from starting, so this module never writes it in place (temp
file + rename, mode kept), keeps every other key and plugin as it was, and refuses, touching
nothing, when the file is not a config it understands.

`chain` and `unchain` are the config edits without any I/O. Standard library only: this
module ships inside the zipapp too, so `ambient-cni uninstall` works on the host.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.resources
import json
import os
import stat
import sys
import tempfile
import zipapp
from collections.abc import Callable, Iterator
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, BinaryIO

PLUGIN_TYPE = "ambient-cni"
# The package the zipapp carries; named, not derived from __name__, so that
# `python -m cni.install` (where __name__ is "__main__") builds the same archive.
PACKAGE = "cni"
BINARY_NAME = "ambient-cni"
DEFAULT_CNI_BIN_DIR = Path("/opt/cni/bin")
DEFAULT_CNI_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_AGENT_SOCKET = "/var/run/ambient-agent/cni.sock"
DEFAULT_EXCLUDE_NAMESPACES = ("kube-system",)
DEFAULT_TIMEOUT_SECONDS = 30
DEFAULT_INTERPRETER = "/usr/bin/env python3"
CONFLIST_SUFFIX = ".conflist"
SINGLE_CONF_SUFFIXES = (".conf", ".json")
# The extensions libcni's ConfFiles lists (and so containerd and CRI-O load).
CONFIG_SUFFIXES = (CONFLIST_SUFFIX, *SINGLE_CONF_SUFFIXES)
BINARY_MODE = 0o755
# The zipapp's entry point. zipapp's own `main=` template drops main()'s return value, so a
# failed ADD would exit 0; the runtime reads success from the exit status.
ZIPAPP_MAIN = f"import sys\n\nfrom {PACKAGE}.plugin import main\n\nsys.exit(main())\n"

JsonObject = dict[str, Any]


class InstallError(Exception):
    """Install or uninstall cannot go ahead; nothing has been changed."""


class ConfigError(InstallError):
    """A network config that is not one this module can safely edit."""


# --- config edits, no I/O -------------------------------------------------------------------


def plugin_entry(
    agent_socket: str = DEFAULT_AGENT_SOCKET,
    exclude_namespaces: list[str] | None = None,
    timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS,
) -> JsonObject:
    """Our plugin's entry in a conflist's `plugins`."""
    namespaces = list(
        DEFAULT_EXCLUDE_NAMESPACES if exclude_namespaces is None else exclude_namespaces
    )
    return {
        "type": PLUGIN_TYPE,
        "agentSocket": agent_socket,
        "excludeNamespaces": namespaces,
        "timeoutSeconds": timeout_seconds,
    }


def is_conflist(config: JsonObject) -> bool:
    return "plugins" in config


def _check_single_conf(conf: JsonObject) -> None:
    if not isinstance(conf.get("type"), str) or not conf["type"]:
        raise ConfigError('not a CNI network config: no "type"')
    if "plugins" in conf:
        raise ConfigError('ambiguous CNI network config: has both "type" and "plugins"')


def conf_to_conflist(conf: JsonObject) -> JsonObject:
    """A single-plugin config as the one-plugin conflist the runtime would make of it."""
    _check_single_conf(conf)
    # libcni refuses a conflist without a name, so converting a nameless conf would break it.
    if not isinstance(conf.get("name"), str) or not conf["name"]:
        raise ConfigError('CNI network config has no "name", so it cannot become a conflist')
    top_level: JsonObject = {}
    plugin: JsonObject = {}
    for key, value in conf.items():
        if key in ("cniVersion", "name"):
            top_level[key] = value
        else:
            plugin[key] = value
    top_level["plugins"] = [plugin]
    return top_level


def _plugins(conflist: JsonObject) -> list[JsonObject]:
    plugins = conflist.get("plugins")
    if not isinstance(plugins, list):
        raise ConfigError('not a CNI network config list: no "plugins" list')
    if not all(isinstance(plugin, dict) for plugin in plugins):
        raise ConfigError('not a CNI network config list: an entry of "plugins" is not an object')
    return plugins


def _is_ours(plugin: JsonObject) -> bool:
    return plugin.get("type") == PLUGIN_TYPE


def chain(config: JsonObject, entry: JsonObject) -> JsonObject:
    """`config` (a conflist, or a single-plugin conf) as a conflist with `entry` chained.

    An `ambient-cni` entry already there is replaced where it stands (so install is
    idempotent and updates settings without reordering anyone); otherwise `entry` goes last,
    after the primary plugin has set the pod's network up. `config` is not modified.
    """
    conflist = config if is_conflist(config) else conf_to_conflist(config)
    plugins = _plugins(conflist)
    ours = [index for index, plugin in enumerate(plugins) if _is_ours(plugin)]
    if ours:
        first = ours[0]
        kept = [plugin for plugin in plugins if not _is_ours(plugin)]
        new_plugins = [*kept[:first], dict(entry), *kept[first:]]
    else:
        new_plugins = [*plugins, dict(entry)]
    # Rebuilt key by key so "plugins" keeps its place among the other top-level keys.
    return {key: (new_plugins if key == "plugins" else value) for key, value in conflist.items()}


def unchain(config: JsonObject) -> JsonObject:
    """`config` (a conflist) without any `ambient-cni` entry; `config` is not modified."""
    plugins = _plugins(config)
    remaining = [plugin for plugin in plugins if not _is_ours(plugin)]
    return {key: (remaining if key == "plugins" else value) for key, value in config.items()}


def has_entry(config: JsonObject) -> bool:
    return is_conflist(config) and any(_is_ours(plugin) for plugin in _plugins(config))


# --- files ----------------------------------------------------------------------------------


def config_files(conf_dir: Path) -> list[Path]:
    """The network configs in `conf_dir` in the order the runtime considers them."""
    files = [
        path for path in conf_dir.iterdir() if path.suffix in CONFIG_SUFFIXES and path.is_file()
    ]
    # libcni sorts the names as byte strings; for UTF-8 names code-point order is the same.
    return sorted(files, key=lambda path: path.name)


def primary_config(conf_dir: Path) -> Path | None:
    """The config file the runtime uses: the lexicographically first one; None if none."""
    if not conf_dir.is_dir():
        raise InstallError(f"CNI config directory {conf_dir} does not exist")
    files = config_files(conf_dir)
    return files[0] if files else None


def read_config(path: Path) -> JsonObject:
    """`path` parsed and checked to be the kind of config its extension says."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); refusing to modify it") from exc
    try:
        if not isinstance(config, dict):
            raise ConfigError("not a CNI network config: not a JSON object")
        if path.suffix == CONFLIST_SUFFIX:
            _plugins(config)
        else:
            _check_single_conf(config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}; refusing to modify it") from exc
    return config


def render_config(config: JsonObject) -> bytes:
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(target: Path, mode: int, like: Path | None = None) -> Iterator[BinaryIO]:
    """A file that appears at `target` whole, or not at all.

    The temp file's name has none of the config extensions, so a runtime listing the
    directory meanwhile never loads it half-written. `like`'s owner is kept as well as `mode`.
    """
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    temp = Path(temp_name)
    try:
        with os.fdopen(fd, "wb") as stream:
            yield stream
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, mode)
        if like is not None:
            owner = like.stat()
            if (owner.st_uid, owner.st_gid) != (os.getuid(), os.getgid()):
                os.chown(temp, owner.st_uid, owner.st_gid)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_atomically(target: Path, content: bytes, mode: int, like: Path | None = None) -> None:
    with _atomic_file(target, mode, like) as stream:
        stream.write(content)


def _package_sources(directory: Traversable, prefix: str) -> Iterator[tuple[str, bytes]]:
    for item in sorted(directory.iterdir(), key=lambda item: item.name):
        if item.is_dir():
            if item.name != "__pycache__":
                yield from _package_sources(item, f"{prefix}{item.name}/")
        elif item.name.endswith(".py"):
            yield f"{prefix}{item.name}", item.read_bytes()


def build_zipapp(target: Path, interpreter: str) -> None:
    """Write the `cni` package to `target` as an executable zipapp running `cni.plugin:main`.

    The sources are read through importlib.resources, so this works from a checkout and from
    inside an installed zipapp alike.
    """
    sources = list(_package_sources(importlib.resources.files(PACKAGE), f"{PACKAGE}/"))
    with tempfile.TemporaryDirectory(prefix="ambient-cni-zipapp.") as staging_name:
        staging = Path(staging_name)
        for relative, content in sources:
            source = staging / relative
            source.parent.mkdir(parents=True, exist_ok=True)
            source.write_bytes(content)
        (staging / "__main__.py").write_text(ZIPAPP_MAIN, encoding="utf-8")
        with _atomic_file(target, BINARY_MODE) as stream:
            zipapp.create_archive(staging, stream, interpreter=interpreter)


# --- install / uninstall --------------------------------------------------------------------


def install(
    cni_bin_dir: Path,
    cni_conf_dir: Path,
    entry: JsonObject,
    interpreter: str = DEFAULT_INTERPRETER,
    report: Callable[[str], None] = print,
) -> None:
    """Write the binary and chain `entry` into the primary config, reporting each action.

    Everything is checked before anything is written, so a refusal leaves the node as it was.
    """
    if not cni_bin_dir.is_dir():
        raise InstallError(
            f"CNI bin directory {cni_bin_dir} does not exist:"
            " pass --cni-bin-dir where the runtime looks for CNI plugins"
        )
    primary = primary_config(cni_conf_dir)
    if primary is None:
        raise InstallError(
            f"no CNI network config in {cni_conf_dir}: install the primary CNI first"
        )
    config = read_config(primary)
    try:
        chained = chain(config, entry)
    except ConfigError as exc:
        raise ConfigError(f"{primary}: {exc}; refusing to modify it") from exc
    converted = primary.suffix != CONFLIST_SUFFIX
    target = primary.with_suffix(CONFLIST_SUFFIX) if converted else primary.resolve()
    if converted:
        _check_conversion_target(primary, target)

    # The binary before the config: a config naming a missing plugin fails every new pod.
    binary = cni_bin_dir / BINARY_NAME
    build_zipapp(binary, interpreter)
    report(f"wrote {binary} (zipapp, interpreter {interpreter})")

    mode = stat.S_IMODE(primary.stat().st_mode)
    write_atomically(target, render_config(chained), mode, like=primary)
    if converted:
        report(f"converted {primary} to {target}")
    report(f"{'updated' if has_entry(config) else 'chained'} {PLUGIN_TYPE} in {target}")
    if converted:
        # Only now: until the conflist was complete the runtime kept using the old file.
        primary.unlink()
        report(f"removed {primary}")


def _check_conversion_target(primary: Path, target: Path) -> None:
    """Refuse a conversion that would clobber a file or stop being the runtime's choice."""
    if target.exists():
        raise InstallError(
            f"cannot convert {primary} to a conflist: {target} already exists;"
            " merge them by hand first"
        )
    others = [path.name for path in config_files(primary.parent) if path != primary]
    if any(name < target.name for name in others):
        raise InstallError(
            f"cannot convert {primary} to {target.name}: another config would then sort first"
            " and become the runtime's network config"
        )


def uninstall(cni_bin_dir: Path, cni_conf_dir: Path, report: Callable[[str], None] = print) -> None:
    """Unchain from the primary config, then remove the binary, reporting each action.

    Idempotent: what is already gone is reported as such. A primary config that cannot be
    read is a refusal (nothing removed), since the binary may still be chained in it.
    """
    primary = primary_config(cni_conf_dir) if cni_conf_dir.is_dir() else None
    if primary is None:
        report(f"no CNI network config in {cni_conf_dir}: nothing to unchain")
    else:
        config = read_config(primary)
        if has_entry(config):
            target = primary.resolve()
            mode = stat.S_IMODE(primary.stat().st_mode)
            write_atomically(target, render_config(unchain(config)), mode, like=primary)
            report(f"removed {PLUGIN_TYPE} from {target}")
        else:
            report(f"no {PLUGIN_TYPE} entry in {primary}: nothing to unchain")
    # The binary after the config, for the same reason install writes it first.
    binary = cni_bin_dir / BINARY_NAME
    if binary.exists() or binary.is_symlink():
        binary.unlink()
        report(f"removed {binary}")
    else:
        report(f"{binary} not present: nothing to remove")


# --- command line ---------------------------------------------------------------------------


def _namespaces(value: str) -> list[str]:
    return [name.strip() for name in value.split(",") if name.strip()]


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {number}")
    return number


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ambient-cni", description="Install or uninstall the ambient-cni chained plugin."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("install", "write the plugin binary and chain it into the primary CNI config"),
        ("uninstall", "unchain the plugin from the primary CNI config and remove the binary"),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--cni-bin-dir", type=Path, default=DEFAULT_CNI_BIN_DIR)
        command.add_argument("--cni-conf-dir", type=Path, default=DEFAULT_CNI_CONF_DIR)
        if name == "install":
            command.add_argument("--agent-socket", default=DEFAULT_AGENT_SOCKET)
            command.add_argument(
                "--exclude-namespaces",
                type=_namespaces,
                default=list(DEFAULT_EXCLUDE_NAMESPACES),
                help="comma-separated namespaces whose pods are left alone",
            )
            command.add_argument(
                "--timeout-seconds", type=_positive_int, default=DEFAULT_TIMEOUT_SECONDS
            )
            command.add_argument(
                "--python",
                default=DEFAULT_INTERPRETER,
                help="the interpreter line of the plugin zipapp (default: %(default)s)",
            )
    return parser


def main(argv: list[str]) -> int:
    """`argv` is ["install" | "uninstall", options...]; 0 on success, 1 on a refusal."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a usage error argparse has reported
        return exit_request.code if isinstance(exit_request.code, int) else 1
    try:
        if args.command == "install":
            entry = plugin_entry(args.agent_socket, args.exclude_namespaces, args.timeout_seconds)
            install(args.cni_bin_dir, args.cni_conf_dir, entry, args.python)
        else:
            uninstall(args.cni_bin_dir, args.cni_conf_dir)
    except (InstallError, OSError) as exc:
        print(f"ambient-cni {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
