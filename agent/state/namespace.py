"""Namespaces and the enrollment rule Istio's ambient mode uses for them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"


def _no_labels() -> Mapping[str, str]:
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=_no_labels, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))


def ambient_enrolled(namespace: Namespace | None, pod_labels: Mapping[str, str]) -> bool:
    """Istio's rule: the namespace is labelled `istio.io/dataplane-mode=ambient` and the pod
    has not opted out with `istio.io/dataplane-mode=none`."""
    if namespace is None or namespace.labels.get(DATAPLANE_MODE_LABEL) != "ambient":
        return False
    return pod_labels.get(DATAPLANE_MODE_LABEL) != "none"
