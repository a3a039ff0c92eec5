"""File-based xDS: the waypoint's listeners, clusters and secrets as files Envoy watches.

Envoy re-reads a path_config_source when a file is moved into its watched directory, so
every write is a whole file written beside it and renamed over it: Envoy never reads half a
file. Clusters are written before listeners, so a listener never names a cluster Envoy has
not got yet. Each update carries a version; Envoy reports the version in force
(`listener_manager.lds.version_text`), which is how the process knows an update was taken.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from agent.waypoint.envoy_config import CERTIFICATE_SECRET, ROOTS_SECRET, Resources, Secrets

LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"


def _write(path: Path, document: dict[str, Any], mode: int = 0o644) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        json.dump(document, out)
    os.replace(temporary, path)


def _typed(type_url: str, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"@type": type_url, **resource} for resource in resources]


class XdsFiles:
    """The directory Envoy reads its dynamic config from: `xds/` (listeners, clusters) and
    `secrets/` (certificate and roots, private: 0700)."""

    def __init__(self, directory: Path, trust_domain: str) -> None:
        self.xds = directory / "xds"
        self.listeners = self.xds / "listeners.json"
        self.clusters = self.xds / "clusters.json"
        self.secrets = Secrets(directory / "secrets", trust_domain)
        self.xds.mkdir(parents=True, exist_ok=True)
        self.secrets.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.secrets.directory, 0o700)

    def write_resources(self, version: str, resources: Resources) -> None:
        _write(
            self.clusters,
            {"version_info": version, "resources": _typed(CLUSTER_TYPE, resources.clusters)},
        )
        _write(
            self.listeners,
            {"version_info": version, "resources": _typed(LISTENER_TYPE, resources.listeners)},
        )

    def write_secrets(self, chain_pem: bytes, key_pem: bytes, roots_pem: bytes) -> None:
        """The roots first: a new certificate may be signed by a root only they hold."""

        def inline(data: bytes) -> dict[str, str]:
            return {"inline_bytes": base64.b64encode(data).decode()}

        roots = {"name": ROOTS_SECRET, "validation_context": {"trusted_ca": inline(roots_pem)}}
        _write(self.secrets.path(ROOTS_SECRET), {"resources": _typed(SECRET_TYPE, [roots])})
        certificate = {
            "name": CERTIFICATE_SECRET,
            "tls_certificate": {
                "certificate_chain": inline(chain_pem),
                "private_key": inline(key_pem),
            },
        }
        _write(
            self.secrets.path(CERTIFICATE_SECRET),
            {"resources": _typed(SECRET_TYPE, [certificate])},
            mode=0o600,
        )
