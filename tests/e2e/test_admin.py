"""The agent's admin ports, on agent processes in the lab (requests made inside the node's
netns, where each node's agent listens)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab import probes
from lab.network import LabState, load_state
from tests.support import kernel_config

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def lab() -> Iterator[LabState]:
    name = "ta" + uuid.uuid4().hex[:6]
    try:
        subprocess.run([sys.executable, "-m", "agent", "lab", "up", "--name", name], check=True,
                       capture_output=True, timeout=300)  # fmt: skip
        state = load_state(name)
        assert state is not None
        yield state
    finally:
        subprocess.run([sys.executable, "-m", "agent", "lab", "down", "--name", name],
                       check=False, capture_output=True)  # fmt: skip


get = probes.admin_get


def test_ready_agents_answer_200_and_dump_their_config(lab: LabState) -> None:
    assert get(lab, "node-1", "http://127.0.0.1:15021/healthz/ready") == (200, "ready\n")
    status, body = get(lab, "node-1", "http://127.0.0.1:15000/config_dump")
    assert status == 200
    dump = json.loads(body)
    assert dump["node"] == "node-1" and dump["ready"] is True
    assert dump["enrolled"] == ["default/client-a", "default/server-a"]
    assert {w["name"] for w in dump["workloads"]} >= {"client-a", "outsider"}
    assert {c["identity"] for c in dump["certificates"]} == {
        "spiffe://cluster.local/ns/default/sa/client-a",
        "spiffe://cluster.local/ns/default/sa/server-a",
    }
    assert sorted(dump["datapath"]["programs"]) == [
        "agent_connect4", "pod_egress", "pod_ingress", "pod_lookup", "policy_probe",
        "sock_telemetry",
    ]  # fmt: skip


def test_config_dump_listens_on_loopback_only(lab: LabState) -> None:
    node_ip = next(n for n in lab.nodes if n.name == "node-1").ip
    status, _ = get(lab, "node-1", f"http://{node_ip}:15021/healthz/ready")
    assert status == 200  # readiness is for the kubelet, on every address
    with pytest.raises(urllib.error.URLError):
        get(lab, "node-1", f"http://{node_ip}:15000/config_dump")


def test_metrics_are_the_kernels_counters(lab: LabState) -> None:
    server = probes.pod(lab, "server-a")
    with probes.whoami_server(server, 8080):
        probes.talk(probes.pod(lab, "client-a").netns_path, server.ip, 8080, "metrics")
    status, text = get(lab, "node-1", "http://127.0.0.1:15020/metrics")
    assert status == 200
    assert 'ambient_datapath_verdicts_total{reason="REDIRECT_OUTBOUND"}' in text
    assert "ambient_enrolled_pods 2.0" in text
    assert "ambient_programs_loaded 6.0" in text
    assert ('ambient_workload_certificate_expiry_timestamp_seconds{identity='
            '"spiffe://cluster.local/ns/default/sa/client-a"}') in text  # fmt: skip
    # The data path in force, as probed at start; kTLS as the kernel's config says.
    assert 'ambient_hbone_data_path_info{first_cipher="TLS_AES_128_GCM_SHA256"' in text
    assert 'tls="userspace"' in text
    if (ktls := kernel_config.ktls_expected()) is not None:
        assert f'ktls="{ktls}"' in text
    status, same = get(lab, "node-1", "http://127.0.0.1:15020/stats/prometheus")

    assert status == 200 and "ambient_datapath_verdicts_total" in same


def test_readiness_says_what_is_missing_and_recovers(lab: LabState) -> None:
    config = Path(f"/run/ambient-lab/{lab.name}/mesh.yaml")
    original = config.read_text()
    broken = yaml.safe_load(original)
    ghost = dict(next(w for w in broken["workloads"] if w["name"] == "client-a"))
    ghost.update(uid="ghost", name="ghost", workloadIps=["10.240.1.250"],
                 netns="/run/netns/no-such-pod")  # fmt: skip
    broken["workloads"].append(ghost)
    try:
        partial = config.with_suffix(".partial")
        partial.write_text(yaml.safe_dump(broken))
        partial.replace(config)
        deadline = time.monotonic() + 10
        while (answer := get(lab, "node-1", "http://127.0.0.1:15021/healthz/ready"))[0] == 200:
            assert time.monotonic() < deadline, "readiness never reported the missing pod"
            time.sleep(0.1)
        status, body = answer
        assert status == 503 and "default/ghost" in body and "no-such-pod" in body
    finally:
        partial = config.with_suffix(".partial")
        partial.write_text(original)
        partial.replace(config)
    deadline = time.monotonic() + 10
    while get(lab, "node-1", "http://127.0.0.1:15021/healthz/ready")[0] != 200:
        assert time.monotonic() < deadline, "readiness did not recover"
        time.sleep(0.1)
