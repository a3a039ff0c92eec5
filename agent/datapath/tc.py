"""Attach and detach the pod programs with tc clsact inside a pod's network namespace.

All netlink work runs on the pod's NetnsWorker thread with a plain IPRoute, which binds its
socket in that thread's namespace. (pyroute2's NetNS would fork a child to do the same, and
a forked child shares asyncio's signal wake-up fd: its SIGTERM would reach the agent.)
"""

from __future__ import annotations

import errno

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath.loader import DatapathError
from agent.netns import NetnsWorker

INGRESS_PARENT = 0xFFFFFFF2
EGRESS_PARENT = 0xFFFFFFF3
# Our filters' preference and handle, so re-attaching replaces them and detaching finds them.
FILTER_PRIO = 0xA1
FILTER_HANDLE = 1
HOOKS = (("ingress", INGRESS_PARENT), ("egress", EGRESS_PARENT))


def _ifindex(ipr: IPRoute, where: str, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def attach(worker: NetnsWorker, ifname: str, ingress_fd: int, egress_fd: int) -> bool:
    """Attach (or replace) both programs; returns True when this call created the clsact."""

    def inside() -> bool:
        with IPRoute() as ipr:
            index = _ifindex(ipr, worker.path, ifname)
            if index is None:
                raise DatapathError(f"no interface {ifname} in network namespace {worker.path}")
            created = False
            try:
                ipr.tc("add", "clsact", index)
                created = True
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            for (hook, parent), fd in zip(HOOKS, (ingress_fd, egress_fd), strict=True):
                ipr.tc(
                    "replace-filter", "bpf", index, FILTER_HANDLE, fd=fd,
                    name=f"ambient_pod_{hook}", parent=parent, prio=FILTER_PRIO, classid=1,
                    direct_action=True,
                )  # fmt: skip
            return created

    return worker.call(inside)


def detach(worker: NetnsWorker, ifname: str, remove_clsact: bool) -> None:
    """Remove our filters, and the clsact when we created it. Missing pieces are fine."""

    def inside() -> None:
        with IPRoute() as ipr:
            index = _ifindex(ipr, worker.path, ifname)
            if index is None:
                return
            for _, parent in HOOKS:
                _ignore_absent(
                    ipr.tc, "del-filter", "bpf", index, FILTER_HANDLE, parent=parent,
                    prio=FILTER_PRIO,
                )  # fmt: skip
            if remove_clsact:
                _ignore_absent(ipr.tc, "del", "clsact", index)

    worker.call(inside)


def _ignore_absent(call: object, *args: object, **kwargs: object) -> None:
    try:
        call(*args, **kwargs)  # type: ignore[operator]
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.EINVAL):
            raise


def attached_programs(worker: NetnsWorker, ifname: str) -> dict[str, list[str]]:
    """Names of the bpf filters on each hook, for inspection and tests."""

    def inside() -> dict[str, list[str]]:
        with IPRoute() as ipr:
            index = _ifindex(ipr, worker.path, ifname)
            if index is None:
                return {}
            result: dict[str, list[str]] = {}
            for hook, parent in HOOKS:
                names = []
                for msg in ipr.get_filters(index, parent=parent):
                    options = msg.get_attr("TCA_OPTIONS")
                    if options is not None and options.get_attr("TCA_BPF_NAME"):
                        names.append(options.get_attr("TCA_BPF_NAME"))
                result[hook] = names
            return result

    return worker.call(inside)
