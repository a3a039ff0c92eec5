"""Loader behaviour that needs no kernel: source rendering and the errors users see."""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import pytest

from agent.datapath import abi, loader
from agent.datapath.c_sources import read_enum


def test_rendered_source_inlines_project_headers_once() -> None:
    source = loader.render_source()
    assert '#include "' not in source
    for header in ("common.h", "maps.h", "reasons.h", "policy.h", "verdict.h", "authorize.h"):
        assert source.count(f"/* ---- lib/{header} ---- */") == 1, header
    assert source.count("enum verdict_reason {") == 1
    for program in abi.PROGRAM_FILES:  # one text, so the programs share their maps
        assert f"/* ==== {program} ==== */" in source
    assert "#include <uapi/linux/bpf.h>" in source


def test_cflags_carry_the_shared_constants() -> None:
    flags = abi.cflags()
    assert f"-DAGENT_MARK={abi.AGENT_MARK:#x}" in flags
    assert f"-DPORT_HBONE={abi.PORT_HBONE}" in flags


def test_python_reasons_match_the_c_enum() -> None:
    c_enum = read_enum(abi.BPF_DIR / "lib" / "reasons.h", "verdict_reason")
    assert c_enum == {reason.name: reason.value for reason in abi.VerdictReason}


def test_preflight_requires_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(loader.DatapathError, match="needs root"):
        loader.preflight()


def test_preflight_names_the_fix_for_missing_bcc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setitem(sys.modules, "bcc", None)
    with pytest.raises(loader.DatapathError, match=r"python3-bpfcc.*system-site-packages"):
        loader.preflight()


class _Uname(NamedTuple):
    sysname: str
    nodename: str
    release: str
    version: str
    machine: str


def test_preflight_names_the_fix_for_missing_headers(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("bcc", reason="needs bcc to get past the bcc check")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os, "uname", lambda: _Uname("Linux", "h", "0.0-none", "", "x86_64"))
    with pytest.raises(loader.DatapathError) as caught:
        loader.preflight()
    assert "no kernel headers for 0.0-none" in str(caught.value)
    assert "scripts/bootstrap-host.sh" in str(caught.value)


def test_missing_helper_is_explained_with_the_kernel_it_needs() -> None:
    error = loader._explain("...\n; unknown func bpf_sk_assign#124\n", "loading pod_ingress")
    assert "bpf_sk_assign" in str(error) and ">= 5.7" in str(error)


def test_other_load_failures_keep_the_verifier_tail() -> None:
    error = loader._explain("R1 invalid mem access 'scalar'\n", "loading pod_egress")
    assert "loading pod_egress failed" in str(error) and "invalid mem access" in str(error)


@pytest.mark.kernel  # SO_MARK needs CAP_NET_ADMIN
def test_agent_sockets_turn_nagle_off_for_what_they_accept() -> None:
    """Accepted sockets inherit the listener's TCP_NODELAY; with Nagle on, HBONE's small
    frames waited 40 ms for delayed ACKs on every new connection."""
    import socket

    from agent.inpod import sockets

    with sockets.listener(0, transparent=False) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            listener.setblocking(True)
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
