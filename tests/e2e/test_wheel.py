"""The agent as users install it: a wheel, in a fresh venv, run from outside the checkout.

The wheel is built from a copy of the checkout without .git, .venv, caches or build output, so
what the installed agent needs must be what pyproject.toml ships: the packages and, as package
data of the `bpf` package, the eBPF C sources. It is built with the pip and setuptools at hand
(no build isolation, no index), so the test runs offline.

It is installed with --no-deps into a venv made by `/usr/bin/python3 -m venv
--system-site-packages`, which sees Debian's bcc as the image's venv does. The dependencies
(pyroute2, structlog, h2, ...) come from the project's venv instead of an index: a .pth file in
the new venv appends the project venv's site-packages to sys.path. That does not let the
checkout's code in by the back door: the editable install reaches the checkout only through a
finder that its own .pth file installs, and Python runs .pth files in site directories only,
never in a directory that another .pth file names. The test asserts it all the same: `agent`,
the C sources and the ambient-agent metadata all resolve inside the new venv.

Every command runs with its working directory outside the checkout, without AMBIENT_BPF_DIR or
PYTHONPATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.datapath import abi, loader

ROOT = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = Path("/usr/bin/python3")
PACKAGES = {"agent", "cni", "lab", "bench", "bpf"}
# What a checkout holds beside the product: the build must not need any of it.
NOT_THE_PRODUCT = shutil.ignore_patterns(".*", "__pycache__", "*.egg-info", "build", "dist")
# Variables that could point an installed agent back at the checkout.
CHECKOUT_VARIABLES = ("AMBIENT_BPF_DIR", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")

# Run by the venv's python: where the agent, its C sources and its metadata come from.
WHERE_FROM = """
import json
from importlib.metadata import distribution
import agent
from agent.datapath import abi
installed = distribution("ambient-agent")
direct_url = json.loads(installed.read_text("direct_url.json") or "{}")
print(json.dumps({
    "agent": agent.__file__,
    "bpf": str(abi.BPF_DIR),
    "metadata": str(installed.locate_file("")),
    "editable": direct_url.get("dir_info", {}).get("editable", False),
    "programs": sorted(path.name for path in abi.BPF_DIR.glob("*.c")),
}))
"""
# Run by the venv's python as root: load and pin the programs at argv[1], report, unpin.
LOAD_AND_CLOSE = """
import json, sys
from pathlib import Path
from agent.datapath import abi, loader
pin_dir = Path(sys.argv[1])
datapath = loader.LoadedDatapath(pin_dir)
try:
    pins = sorted(str(p.relative_to(pin_dir)) for p in pin_dir.rglob("*") if not p.is_dir())
    print(json.dumps({"bpf": str(abi.BPF_DIR), "programs": datapath.program_fds, "pins": pins}))
finally:
    datapath.close(unpin=True)
"""


def _run(
    command: list[str],
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done


@dataclass(frozen=True)
class Installed:
    venv: Path
    site_packages: Path
    workdir: Path  # outside the checkout

    def run(self, *command: str, **variables: str) -> subprocess.CompletedProcess[str]:
        """A command of the venv, as a user without the checkout runs it."""
        env = {k: v for k, v in os.environ.items() if k not in CHECKOUT_VARIABLES}
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        env.update(variables)
        return _run([str(self.venv / "bin" / command[0]), *command[1:]], cwd=self.workdir, env=env)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools", reason="the wheel is built with the setuptools at hand")
    staging = tmp_path_factory.mktemp("wheel-build")
    source = staging / "source"
    shutil.copytree(ROOT, source, ignore=NOT_THE_PRODUCT)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--no-cache-dir", "--wheel-dir", str(staging / "dist"), str(source)],
        cwd=staging,
    )  # fmt: skip
    (built,) = (staging / "dist").glob("ambient_agent-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"no {SYSTEM_PYTHON} to make the venv with")
    root = tmp_path_factory.mktemp("wheel-venv")
    venv = root / "venv"
    _run([str(SYSTEM_PYTHON), "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
         cwd=root)  # fmt: skip
    python = venv / "bin" / "python"
    version = _run([str(python), "-c", "import sys; print(sys.version_info[:2])"], cwd=root)
    if version.stdout.strip() != str(sys.version_info[:2]):
        pytest.skip("the project venv's dependencies are for another Python than /usr/bin/python3")
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
          "--no-index", str(wheel)], cwd=root)  # fmt: skip
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = Path(_run([str(python), "-c", purelib], cwd=root).stdout.strip())
    dependencies = sysconfig.get_paths()["purelib"]
    (site_packages / "project-venv-dependencies.pth").write_text(f"{dependencies}\n")
    workdir = root / "work"
    workdir.mkdir()
    return Installed(venv, site_packages, workdir)


def test_the_wheel_holds_the_packages_and_the_c_sources(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names}
    (metadata,) = [name for name in top_level if name.endswith(".dist-info")]
    assert top_level - {metadata} == PACKAGES  # no tests, docs or scripts
    in_checkout = {
        path.relative_to(ROOT / "bpf").as_posix()
        for path in (*(ROOT / "bpf").glob("*.c"), *(ROOT / "bpf").glob("lib/*.h"))
    }
    shipped = {name.removeprefix("bpf/") for name in names if name.startswith("bpf/")}
    assert shipped - {"__init__.py"} == in_checkout
    assert set(abi.PROGRAM_FILES) <= in_checkout


def test_the_installed_agent_is_the_wheels_copy(installed: Installed) -> None:
    found = json.loads(installed.run("python", "-c", WHERE_FROM).stdout)
    for where in ("agent", "bpf", "metadata"):
        assert Path(found[where]).is_relative_to(installed.site_packages), (where, found)
    assert not found["editable"]
    assert found["programs"] == sorted(abi.PROGRAM_FILES)


def test_the_commands_run_from_the_wheel(installed: Installed) -> None:
    agent_help = installed.run("ambient-agent", "run", "--help").stdout
    assert "--node" in agent_help and "--pin-dir" in agent_help
    assert "verdicts" in installed.run("ambientctl", "--help").stdout
    # The source BCC would compile, rendered from the installed C files.
    source = installed.run("ambientctl", "ebpf").stdout
    assert '#include "' not in source
    for program in abi.PROGRAMS:
        assert f"int {program}(" in source, program
    version = json.loads(installed.run("ambient-cni", CNI_COMMAND="VERSION").stdout)
    assert version["cniVersion"] in version["supportedVersions"]


def test_the_editable_install_reads_the_checkouts_sources(tmp_path: Path) -> None:
    """The development counterpart: the project venv's agent, run away from the checkout,
    finds the checkout's bpf/ through the editable install's finder."""
    env = {k: v for k, v in os.environ.items() if k not in CHECKOUT_VARIABLES}
    found = json.loads(_run([sys.executable, "-c", WHERE_FROM], cwd=tmp_path, env=env).stdout)
    if not found["editable"]:
        pytest.skip("ambient-agent is not installed editable in this venv")
    assert Path(found["agent"]) == ROOT / "agent" / "__init__.py"
    assert Path(found["bpf"]) == ROOT / "bpf"


@pytest.mark.kernel
def test_the_programs_load_from_the_installed_sources(installed: Installed) -> None:
    pin_dir = abi.DEFAULT_PIN_DIR / f"test-wheel-{uuid.uuid4().hex[:6]}"
    try:
        report = installed.run("python", "-c", LOAD_AND_CLOSE, str(pin_dir))
        left_behind = pin_dir.exists()  # close(unpin=True) must have removed it
    finally:
        loader.remove_pins(pin_dir)
    found = json.loads(report.stdout)
    assert Path(found["bpf"]).is_relative_to(installed.site_packages)
    assert sorted(found["programs"]) == sorted(abi.PROGRAMS)
    assert all(fd > 0 for fd in found["programs"].values())
    expected = [f"maps/{name}" for name in abi.MAPS] + [f"progs/{name}" for name in abi.PROGRAMS]
    assert found["pins"] == sorted(expected)
    assert not left_behind
