"""The runtime's packages import one way: each only from its own layer or those below.

The layers, bottom first, are the picture in docs/architecture.md. Every import counts, also
one inside a function or under TYPE_CHECKING, because a lazy import couples two packages as
much as any other. A new runtime package must be placed here before its imports pass.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# agent's subpackages and top-level modules by layer; "cni" is the plugin's own package.
LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"netns", "drain", "logs", "identity", "hbone", "cni"}),  # no mesh knowledge
    frozenset({"state"}),  # plain data: workloads, services, policies, the snapshot store
    frozenset({"sources", "datapath"}),  # what feeds the state; the kernel side
    frozenset({"inpod", "policy", "telemetry", "dns", "config"}),  # pods, kernel maps, counts
    frozenset({"proxy", "admin", "waypoint"}),  # the in-pod proxy; the admin ports; the waypoint
    frozenset({"reconcile"}),  # pods as the state wants them, CNI answers
    frozenset({"node_status"}),  # what the admin ports show of the agent
    frozenset({"app", "waypoint_app"}),  # the one place that wires each process
    frozenset({"cli", "ctl", "__main__"}),  # the commands
)
TOOLING = ("lab", "bench", "tests")


def _unit(module: str) -> str | None:
    """The layer unit an absolute module name belongs to, or None outside the runtime."""
    parts = module.removesuffix(".__init__").split(".")
    if parts[0] == "cni":
        return "cni"
    if parts[0] == "agent":
        return parts[1] if len(parts) > 1 else "agent"
    return None


def _imports(path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "agent":  # from agent import logs
                yield from (f"agent.{alias.name}" for alias in node.names)
            else:
                yield node.module


def _runtime_files() -> Iterator[tuple[str, Path]]:
    for package in ("agent", "cni"):
        for path in sorted((REPO / package).rglob("*.py")):
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            unit = _unit(module)
            if unit is not None and unit != "agent":  # agent/__init__.py holds nothing
                yield unit, path


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> imported unit -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = {}
    for unit, path in _runtime_files():
        edges = graph.setdefault(unit, {})
        for module in _imports(path):
            target = _unit(module)
            if target is not None and target != unit:
                edges.setdefault(target, []).append(str(path.relative_to(REPO)))
    return graph


def layer_of(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise KeyError(unit)


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One import cycle between units, as a path that starts and ends with the same unit."""
    done: set[str] = set()

    def visit(unit: str, path: list[str]) -> list[str] | None:
        if unit in path:
            return [*path[path.index(unit) :], unit]
        if unit in done:
            return None
        for target in sorted(graph.get(unit, {})):
            if (cycle := visit(target, [*path, unit])) is not None:
                return cycle
        done.add(unit)
        return None

    for unit in sorted(graph):
        if (cycle := visit(unit, [])) is not None:
            return cycle
    return None


def test_every_runtime_package_has_a_layer() -> None:
    unplaced = sorted(unit for unit in import_graph() if not any(unit in layer for layer in LAYERS))
    assert not unplaced, f"place these in LAYERS (and docs/architecture.md): {unplaced}"


def test_no_two_runtime_packages_import_each_other_in_a_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_imports_only_go_down_the_layers() -> None:
    upward = [
        f"{unit} (layer {layer_of(unit)}) imports {target} (layer {layer_of(target)}): "
        + ", ".join(sorted(set(files)))
        for unit, edges in sorted(import_graph().items())
        for target, files in sorted(edges.items())
        if layer_of(target) > layer_of(unit)
    ]
    assert not upward, "\n".join(upward)


def test_the_runtime_never_imports_its_tooling() -> None:
    found = [
        f"{path.relative_to(REPO)} imports {module}"
        for _, path in _runtime_files()
        for module in _imports(path)
        if module.split(".")[0] in TOOLING
    ]
    assert not found, "\n".join(found)


def test_only_app_knows_the_proxy_and_the_pods_together() -> None:
    """The wiring is in app.py alone: nothing else imports both the proxy and enrollment."""
    graph = import_graph()
    wiring = sorted(u for u, edges in graph.items() if {"proxy", "inpod", "sources"} <= set(edges))
    assert wiring == ["app"]


@pytest.mark.parametrize(
    ("graph", "cycle"),
    [
        ({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}, ["a", "b", "c", "a"]),
        ({"a": {"b": []}, "b": {"c": []}}, None),
        ({"a": {"b": [], "c": []}, "b": {"c": []}, "c": {}}, None),
    ],
)
def test_the_cycle_finder_finds_cycles_and_only_cycles(
    graph: dict[str, dict[str, list[str]]], cycle: list[str] | None
) -> None:
    assert find_cycle(graph) == cycle
