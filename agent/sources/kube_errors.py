"""The Kubernetes source's error, importable without the Kubernetes client (which only an
agent that watches an API server loads: agent/sources/kube_source.py)."""

from __future__ import annotations


class KubeSourceError(Exception):
    """The API server cannot be reached or read (at start, or the client cannot be built)."""
