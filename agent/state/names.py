"""Kubernetes' rules for object names, which every source checks before a name enters the
state: a name that breaks them would otherwise pass until something (a SPIFFE ID, a
certificate, a policy match) chokes on it later."""

from __future__ import annotations

import re

_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(_LABEL)
_DNS_SUBDOMAIN = re.compile(rf"{_LABEL}(\.{_LABEL})*")
DNS_LABEL_MAX = 63
DNS_SUBDOMAIN_MAX = 253
INTERFACE_NAME_MAX = 15  # IFNAMSIZ less the NUL


def dns_label_error(value: str) -> str | None:
    """Why value is no RFC 1123 label (namespaces), or None when it is one."""
    if len(value) > DNS_LABEL_MAX:
        return f"is longer than {DNS_LABEL_MAX} characters"
    if not _DNS_LABEL.fullmatch(value):
        return "must be lower-case letters, digits and '-', starting and ending alphanumeric"
    return None


def dns_subdomain_error(value: str) -> str | None:
    """Why value is no RFC 1123 subdomain (pod, node and service account names), or None."""
    if len(value) > DNS_SUBDOMAIN_MAX:
        return f"is longer than {DNS_SUBDOMAIN_MAX} characters"
    if not _DNS_SUBDOMAIN.fullmatch(value):
        return "must be lower-case letters, digits, '-' and '.', starting and ending alphanumeric"
    return None


def interface_name_error(value: str) -> str | None:
    """Why value cannot name a Linux network interface, or None."""
    if len(value) > INTERFACE_NAME_MAX:
        return f"is longer than {INTERFACE_NAME_MAX} characters"
    if value in (".", "..") or any(c == "/" or c == ":" or c.isspace() for c in value):
        return "may not be '.' or '..' nor hold '/', ':' or white space"
    return None
