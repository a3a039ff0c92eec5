"""Kernel state that outlives the agent: pinned programs and maps are adopted by the next
agent without compiling, carried over into recompiled programs where a map's layout is the
same, and never trusted when the pins are not the objects the record describes."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.datapath import abi, maps
from agent.datapath.loader import DatapathError, LoadedDatapath, PinnedLayout, load, remove_pins
from agent.inpod.enrollment import pod_key_addr

pytestmark = pytest.mark.kernel

POD_IP = "10.77.3.4"


@pytest.fixture
def places(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    pin_dir = abi.DEFAULT_PIN_DIR / f"t-{uuid.uuid4().hex[:8]}"
    try:
        yield pin_dir, tmp_path / "datapath.json"
    finally:
        remove_pins(pin_dir)


def enroll_entry(datapath: LoadedDatapath, outbound: int = 7) -> None:
    pods = datapath.table("pods")
    value = pods.Leaf()
    value.flags, value.outbound_captured = abi.POD_CAPTURE, outbound
    pods[pods.Key(addr=pod_key_addr(POD_IP))] = value


def entry(datapath: LoadedDatapath) -> tuple[int, int] | None:
    pods = datapath.table("pods")
    value = pods.get(pods.Key(addr=pod_key_addr(POD_IP)))
    return None if value is None else (int(value.flags), int(value.outbound_captured))


def test_an_agent_adopts_the_pins_of_the_one_before_without_compiling(
    places: tuple[Path, Path],
) -> None:
    pin_dir, record = places
    first = LoadedDatapath(pin_dir, record)
    assert not first.adopted
    ids = {name: maps.prog_id(fd) for name, fd in first.program_fds.items()}
    enroll_entry(first)
    first.close(unpin=False)

    second = LoadedDatapath(pin_dir, record)
    try:
        assert second.adopted
        assert {name: maps.prog_id(fd) for name, fd in second.program_fds.items()} == ids
        assert entry(second) == (abi.POD_CAPTURE, 7)
        verdicts = second.table("verdicts")  # per-CPU: one value per possible CPU
        assert len(verdicts[verdicts.Key(0)]) == maps.possible_cpus()
    finally:
        second.close(unpin=True)
    assert not pin_dir.exists() and not record.exists()


def test_a_recompile_carries_over_the_maps_whose_layout_is_unchanged(
    places: tuple[Path, Path],
) -> None:
    pin_dir, record = places
    first = LoadedDatapath(pin_dir, record)
    enroll_entry(first, outbound=3)
    old_ids = {name: maps.prog_id(fd) for name, fd in first.program_fds.items()}
    first.close(unpin=False)
    data = json.loads(record.read_text())
    data["version"] = "an earlier build"
    # As if an earlier build's map had another value layout: its entries must not be read.
    data["maps"]["capture_exclude_ports"]["value_size"] += 4
    record.write_text(json.dumps(data))

    second = LoadedDatapath(pin_dir, record)
    try:
        assert not second.adopted
        assert {name: maps.prog_id(fd) for name, fd in second.program_fds.items()} != old_ids
        assert entry(second) == (abi.POD_CAPTURE, 3)
        assert "pods" in second.carried_over
        assert "capture_exclude_ports" in second.refilled
        rewritten = PinnedLayout.read(record)
        assert rewritten is not None and rewritten.version == second.version
    finally:
        second.close(unpin=True)


def test_pins_the_record_does_not_vouch_for_are_not_adopted(places: tuple[Path, Path]) -> None:
    pin_dir, record = places
    first = LoadedDatapath(pin_dir, record)
    enroll_entry(first)
    first.close(unpin=False)
    data = json.loads(record.read_text())
    data["map_ids"]["pods"] += 100000  # the pinned pods map is not the one recorded
    record.write_text(json.dumps(data))

    second = LoadedDatapath(pin_dir, record)
    try:
        assert not second.adopted
        assert entry(second) is None  # an untrusted map's entries are not carried over
        assert "pods" in second.refilled
    finally:
        second.close(unpin=True)


def test_without_a_record_the_programs_are_compiled_afresh(places: tuple[Path, Path]) -> None:
    pin_dir, _ = places
    first = LoadedDatapath(pin_dir)
    enroll_entry(first)
    first.close(unpin=False)
    second = LoadedDatapath(pin_dir)
    try:
        assert not second.adopted and entry(second) is None
    finally:
        second.close(unpin=True)


LOAD_IN_A_FRESH_PROCESS = """
import json, sys
from pathlib import Path
from typing import Any
from agent.datapath import loader
datapath = loader.load(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps({"adopted": datapath.adopted, "bcc_imported": "bcc" in sys.modules,
                  "programs": sorted(datapath.program_fds), "refilled": datapath.refilled}))
datapath.close(unpin=False)
"""


def test_the_agent_compiles_in_a_child_and_never_loads_bcc_itself(
    places: tuple[Path, Path],
) -> None:
    """loader.load, as the agent starts: the first time a child compiles and pins, and the
    caller adopts what it pinned; the next time there is nothing to compile. Neither time
    does the caller import bcc (and with it libbcc and LLVM)."""
    pin_dir, record = places

    def load() -> dict[str, Any]:
        done = subprocess.run(
            [sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(pin_dir), str(record)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        loaded: dict[str, Any] = json.loads(done.stdout)
        return loaded

    first = load()
    assert first["adopted"] is False and first["bcc_imported"] is False
    assert first["programs"] == sorted(abi.PROGRAMS)
    assert "pods" in first["refilled"]  # nothing pinned before: every map starts empty
    again = load()
    assert again == {**first, "adopted": True, "refilled": []}


def test_a_failed_compile_in_the_child_is_the_agents_error(
    places: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_dir, record = places
    monkeypatch.setattr(sys, "executable", "/bin/false")
    with pytest.raises(DatapathError, match="the compiler child exited 1"):
        load(pin_dir, record)
    assert not pin_dir.exists()
