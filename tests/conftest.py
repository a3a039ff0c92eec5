"""Shared test policy: kernel tests need root and must leave nothing behind."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

BPF_PIN_ROOT = Path("/sys/fs/bpf/ambient")
IS_ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(
        reason="needs root: loads eBPF programs into the kernel and builds network namespaces"
    )
    for item in items:
        if "kernel" in item.keywords and not IS_ROOT:
            item.add_marker(skip)


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def pins() -> set[str]:
    if not BPF_PIN_ROOT.exists():
        return set()
    return {str(p) for p in BPF_PIN_ROOT.rglob("*")}


@pytest.fixture(autouse=True)
def nothing_left_behind(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each kernel test (its fixtures' finalizers included): no new netns, pins or
    host links. Links, qdiscs and filters inside a namespace go with it."""
    if "kernel" not in request.keywords or not IS_ROOT:
        yield
        return
    netns_before, pins_before, links_before = netns_names(), pins(), root_links()
    yield
    # Report, never delete: a netns that appeared meanwhile may belong to someone else.
    leaked_netns = netns_names() - netns_before
    leaked_pins = pins() - pins_before
    assert not leaked_netns, f"test left network namespaces behind: {sorted(leaked_netns)}"
    assert not leaked_pins, f"test left bpffs pins behind: {sorted(leaked_pins)}"
    leaked_links = root_links() - links_before
    assert not leaked_links, f"test left links in the host netns: {sorted(leaked_links)}"
