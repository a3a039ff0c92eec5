"""`ambient-cni`: the chained CNI plugin that tells the node agent about pods.

This version answers VERSION as the CNI spec requires. ADD/DEL/CHECK/STATUS/GC, which hand
the pod's netns to the agent over its unix socket, are not in this version: they answer with
a spec-format error (code 100, the plugin's own range) rather than pretend to work, and ADD
leaves the pod untouched.
"""

from __future__ import annotations

import json
import os
import sys

SUPPORTED_VERSIONS = ["0.4.0", "1.0.0", "1.1.0"]
CNI_VERSION = "1.1.0"
ERR_INVALID_ENV = 4  # spec: invalid necessary environment variables
ERR_NOT_IN_THIS_VERSION = 100  # spec: 100 and up are the plugin's own


def _error(code: int, msg: str, details: str = "") -> int:
    print(json.dumps({"cniVersion": CNI_VERSION, "code": code, "msg": msg, "details": details}))
    return 1


def main() -> int:
    command = os.environ.get("CNI_COMMAND", "")
    if command == "VERSION":
        print(json.dumps({"cniVersion": CNI_VERSION, "supportedVersions": SUPPORTED_VERSIONS}))
        return 0
    if not command:
        return _error(ERR_INVALID_ENV, "CNI_COMMAND is not set", "run by a container runtime")
    sys.stdin.read()  # the runtime writes the config; consume it before answering
    return _error(
        ERR_NOT_IN_THIS_VERSION,
        f"ambient-cni: {command} is not supported by this version",
        "pod enrollment through CNI is not available yet; use the local config",
    )


if __name__ == "__main__":
    raise SystemExit(main())
