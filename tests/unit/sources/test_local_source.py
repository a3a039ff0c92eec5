from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.sources.local_config import ConfigError
from agent.sources.local_source import LocalConfigSource
from agent.state.store import MeshState, StateStore
from tests.support.waiting import until


def mesh(*names: str) -> str:
    """A config with one workload per name, on distinct addresses."""
    lines = ["workloads:"]
    for index, name in enumerate(names, start=1):
        lines += [
            f"  - name: {name}",
            "    namespace: default",
            "    node: node-1",
            f"    workloadIps: [10.0.0.{index}]",
        ]
    return "\n".join(lines) + "\n"


# The workload starting on line 2 has a bad address.
BROKEN = "workloads:\n  - name: a\n    namespace: default\n    node: node-1\n    workloadIps: [x]\n"


def names(store: StateStore) -> list[str]:
    return [w.name for w in store.current.workloads]


def fast_source(path: Path, store: StateStore) -> LocalConfigSource:
    return LocalConfigSource(path, store, poll_interval=0.05, settle_interval=0.02)


def run_alongside(source: LocalConfigSource, scenario: Callable[[], Awaitable[None]]) -> None:
    """Run the source's watch loop while the scenario edits the file, then stop it."""

    async def main() -> None:
        stop = asyncio.Event()
        watching = asyncio.create_task(source.run(stop))
        try:
            await scenario()
        finally:
            stop.set()
            await asyncio.wait_for(watching, 5)

    asyncio.run(main())


def replace_by_rename(path: Path, text: str) -> None:
    """What editors and `kubectl cp`-style tools do: write elsewhere, rename over."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def events(logs: Sequence[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


def test_load_initial_fills_the_store(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("a", "b"))
    store = StateStore()
    with capture_logs() as logs:
        state = LocalConfigSource(path, store).load_initial()
    assert store.current is state and names(store) == ["a", "b"]
    (loaded,) = events(logs, "config loaded")
    assert loaded["workloads"] == 2 and loaded["file"] == str(path)


@pytest.mark.parametrize(("text", "line"), [(BROKEN, 2), (None, None)])
def test_load_initial_refuses_a_broken_or_missing_file(
    tmp_path: Path, text: str | None, line: int | None
) -> None:
    path = tmp_path / "mesh.yaml"
    if text is not None:
        path.write_text(text)
    before = MeshState()
    store = StateStore(before)
    with pytest.raises(ConfigError) as caught:
        LocalConfigSource(path, store).load_initial()
    assert caught.value.line == line
    assert store.current is before


def test_reload_when_the_file_is_written_in_place(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("a"))
    store = StateStore()
    source = fast_source(path, store)
    source.load_initial()

    async def scenario() -> None:
        path.write_text(mesh("a", "b"))
        await until(lambda: names(store) == ["a", "b"])

    with capture_logs() as logs:
        run_alongside(source, scenario)
    (reloaded,) = events(logs, "config reloaded")
    assert (reloaded["workloads"], reloaded["services"], reloaded["policies"]) == (2, 0, 0)


def test_reload_when_the_file_is_replaced_by_rename(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("aaa"))
    store = StateStore()
    source = fast_source(path, store)
    source.load_initial()
    old = path.stat()

    async def scenario() -> None:
        # Same size and same mtime as the old file: only the inode tells them apart.
        temporary = tmp_path / "mesh.yaml.tmp"
        temporary.write_text(mesh("bbb"))
        os.utime(temporary, ns=(old.st_atime_ns, old.st_mtime_ns))
        os.replace(temporary, path)
        await until(lambda: names(store) == ["bbb"])

    run_alongside(source, scenario)


def test_invalid_edit_is_rejected_once_and_the_last_good_state_stays(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("a"))
    store = StateStore()
    source = fast_source(path, store)
    good = source.load_initial()

    async def scenario() -> None:
        replace_by_rename(path, BROKEN)
        await until(lambda: bool(events(logs, "config rejected")))
        await asyncio.sleep(0.3)  # several more polls: the same bad file is not re-reported
        assert store.current is good
        replace_by_rename(path, mesh("a", "fixed"))
        await until(lambda: names(store) == ["a", "fixed"])

    with capture_logs() as logs:
        run_alongside(source, scenario)
    (rejected,) = events(logs, "config rejected")
    assert rejected["file"] == str(path) and rejected["line"] == 2
    assert "'x' in workloadIps is not an IP address" in str(rejected["reason"])
    assert rejected["log_level"] == "error"
    assert len(events(logs, "config reloaded")) == 1


def test_missing_file_is_rejected_and_its_return_is_loaded(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("a"))
    store = StateStore()
    source = fast_source(path, store)
    good = source.load_initial()

    async def scenario() -> None:
        path.unlink()
        await until(lambda: bool(events(logs, "config rejected")))
        await asyncio.sleep(0.2)
        assert store.current is good
        # Back exactly as it was: still reported, so the operator sees the recovery.
        path.write_text(mesh("a"))
        await until(lambda: bool(events(logs, "config reloaded")))

    with capture_logs() as logs:
        run_alongside(source, scenario)
    (rejected,) = events(logs, "config rejected")
    assert rejected["reason"] == "file is missing" and rejected["line"] is None
    assert names(store) == ["a"]


def test_half_written_file_is_not_parsed(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("a"))
    store = StateStore()
    # A settle time longer than the writer's pause: the half file is never read.
    source = LocalConfigSource(path, store, poll_interval=0.05, settle_interval=0.3)
    source.load_initial()
    full = mesh("a", "b")
    half = len(full) // 2

    async def scenario() -> None:
        with path.open("w") as file:
            file.write(full[:half])
            file.flush()
            await asyncio.sleep(0.1)
            file.write(full[half:])
        await until(lambda: names(store) == ["a", "b"])

    with capture_logs() as logs:
        run_alongside(source, scenario)
    assert events(logs, "config rejected") == []


def test_touch_without_change_does_not_replace_the_state(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("a"))
    store = StateStore()
    source = fast_source(path, store)
    source.load_initial()
    replaced: list[MeshState] = []
    store.subscribe(lambda old, new: replaced.append(new))

    async def scenario() -> None:
        path.write_text(mesh("a"))
        await asyncio.sleep(0.3)

    with capture_logs() as logs:
        run_alongside(source, scenario)
    assert replaced == [] and events(logs, "config reloaded") == []


def test_reload_within_a_second_with_the_default_poll_interval(tmp_path: Path) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(mesh("a"))
    store = StateStore()
    source = LocalConfigSource(path, store)
    source.load_initial()
    latency: list[float] = []

    async def scenario() -> None:
        # Let a poll or two pass, so the change lands at an arbitrary point of the cycle.
        await asyncio.sleep(0.7)
        written = time.monotonic()
        path.write_text(mesh("a", "b"))
        await until(lambda: names(store) == ["a", "b"])
        latency.append(time.monotonic() - written)

    run_alongside(source, scenario)
    assert latency[0] <= 1.0
