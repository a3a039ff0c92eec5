from __future__ import annotations

import json
import subprocess
import sys

from tests.support import kernel_config


def test_ebpf_prints_the_source_handed_to_bcc_with_its_flags() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.ctl", "ebpf"], capture_output=True, text=True, check=True
    )
    assert done.stdout.startswith("/* compiled by the agent with: -DAGENT_MARK=0x539")
    assert "int pod_egress(struct __sk_buff *skb)" in done.stdout


def test_inspection_without_pins_says_what_is_missing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.ctl", "pods", "--pin-dir", "/nonexistent/pins"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 1
    assert "no pinned maps there (is the agent running?)" in done.stderr


def test_data_path_names_the_tls_in_force_and_the_kernels_ktls() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "agent.ctl", "data-path", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    found = json.loads(done.stdout)
    assert found["tls"] == "userspace"
    assert found["first_cipher"] == "TLS_AES_128_GCM_SHA256"
    # The kernel's own config says what the probe must have found, where it is readable.
    assert found["ktls"] == (kernel_config.ktls_expected() or found["ktls"])
    assert found["ktls"] in ("available", "unavailable", "unknown")
