from __future__ import annotations

import json
import os
import subprocess
import sys


def run(command: str | None, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
    if command is not None:
        env["CNI_COMMAND"] = command
    return subprocess.run(
        [sys.executable, "-m", "cni.plugin"], input=stdin, capture_output=True, text=True, env=env
    )


def test_version_lists_supported_spec_versions() -> None:
    done = run("VERSION")
    assert done.returncode == 0
    answer = json.loads(done.stdout)
    assert {"1.0.0", "1.1.0"} <= set(answer["supportedVersions"])


def test_unsupported_commands_fail_in_the_spec_error_format() -> None:
    done = run("ADD", stdin='{"cniVersion": "1.0.0", "name": "n", "type": "ambient-cni"}')
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["code"] == 100 and "ADD is not supported" in error["msg"]


def test_missing_command_is_an_error() -> None:
    done = run(None)
    assert done.returncode == 1 and json.loads(done.stdout)["code"] == 4
