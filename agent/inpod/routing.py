"""Routing and sysctls that let looped-back packets reach the agent's sockets in a pod.

- `ip rule fwmark DELIVER_MARK/0xfff lookup 133` and `local 0.0.0.0/0 dev lo table 133`:
  packets the tc programs handed to a socket are delivered locally even though their
  destination address is remote.
- accept_local=1 on the pod interface: looped packets carry the pod's own source address.
- rp_filter=0 on the interface and `all` (the kernel uses the larger of the two).
- `lo` up: table 133 delivers through it. Runtimes bring it up (the loopback CNI plugin),
  but a sandbox whose `lo` is down would otherwise drop every captured packet silently.
The values found before are returned so that unenrolling restores them exactly.
"""

from __future__ import annotations

import errno
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agent.datapath import abi
from agent.netns import NetnsWorker

# ip rule fwmark DELIVER_MARK/MARK_MASK lookup DELIVER_ROUTE_TABLE pref DELIVER_RULE_PRIORITY
DELIVER_RULE = {
    "fwmark": abi.DELIVER_MARK,
    "fwmask": abi.MARK_MASK,
    "table": abi.DELIVER_ROUTE_TABLE,
    "priority": abi.DELIVER_RULE_PRIORITY,
}


def _sysctls(ifname: str) -> dict[str, str]:
    return {
        f"net/ipv4/conf/{ifname}/accept_local": "1",
        f"net/ipv4/conf/{ifname}/rp_filter": "0",
        "net/ipv4/conf/all/rp_filter": "0",
    }


def _read(key: str) -> str:
    return Path("/proc/sys", key).read_text().strip()


def _write(key: str, value: str) -> None:
    Path("/proc/sys", key).write_text(value)


def apply(worker: NetnsWorker, ifname: str, previous: dict[str, str] | None) -> dict[str, str]:
    """Set up the pod; returns the sysctl values to restore later. `previous` is the record
    of an earlier enrollment of the same pod (agent restart), whose originals are kept."""
    wanted = _sysctls(ifname)

    def set_sysctls() -> dict[str, str]:
        found = {key: _read(key) for key in wanted}
        for key, value in wanted.items():
            _write(key, value)
        return found

    found = worker.call(set_sysctls)
    worker.call(_add_routing)
    return previous if previous is not None else found


def _add_routing() -> None:
    """Runs on the pod's worker thread: IPRoute binds in that thread's namespace."""
    with IPRoute() as ns:
        lo = int(ns.link_lookup(ifname="lo")[0])
        ns.link("set", index=lo, state="up")
        if not _has_rule(ns):
            ns.rule("add", **DELIVER_RULE)
        ns.route(
            "replace",
            dst="0.0.0.0",
            dst_len=0,
            type="local",
            scope="host",
            table=abi.DELIVER_ROUTE_TABLE,
            oif=lo,
        )


def _has_rule(ns: IPRoute) -> bool:
    return any(
        rule.get_attr("FRA_TABLE") == abi.DELIVER_ROUTE_TABLE
        and rule.get_attr("FRA_FWMARK") == abi.DELIVER_MARK
        for rule in ns.get_rules(family=2)
    )


def remove(worker: NetnsWorker, original_sysctls: dict[str, str]) -> None:
    worker.call(_remove_routing)

    def restore() -> None:
        for key, value in original_sysctls.items():
            if Path("/proc/sys", key).exists():
                _write(key, value)

    worker.call(restore)


def _remove_routing() -> None:
    with IPRoute() as ns:
        while _has_rule(ns):
            ns.rule("del", **DELIVER_RULE)
        try:
            ns.flush_routes(table=abi.DELIVER_ROUTE_TABLE)
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:
                raise
