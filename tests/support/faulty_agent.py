"""The agent's CLI with faults injected into its undo steps, for shutdown tests.

    python -m tests.support.faulty_agent raise:proxy.close,hang:cni.close run --node ...

`raise:T` makes T do its work and then raise; `hang:T` makes T wait for ever (the test then
kills the agent in the middle of its shutdown). Nothing here is part of the agent: the test
patches the real classes in this process only.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
from typing import Any

from agent.cli import main
from agent.identity.manager import IdentityManager
from agent.proxy.inpod_proxy import InPodProxy
from agent.sources.cni_server import CniServer
from agent.telemetry.ring import RingReader

TARGETS: dict[str, tuple[type, str]] = {
    "proxy.close": (InPodProxy, "close"),
    "proxy.release": (InPodProxy, "release"),
    "identities.close": (IdentityManager, "close"),
    "ring.stop": (RingReader, "stop"),
    "cni.close": (CniServer, "close"),
}


def inject(fault: str) -> None:
    kind, _, target = fault.partition(":")
    cls, name = TARGETS[target]
    original = getattr(cls, name)

    def fail() -> None:
        raise RuntimeError(f"injected failure: {target}")

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def patched_async(*args: Any, **kwargs: Any) -> Any:
            if kind == "hang":
                print(f"hanging in {target}", flush=True)
                await asyncio.Event().wait()
            await original(*args, **kwargs)
            fail()

        setattr(cls, name, patched_async)
    else:
        if kind == "hang":
            raise ValueError(f"{target} is not a coroutine: it cannot hang the event loop")

        @functools.wraps(original)
        def patched(*args: Any, **kwargs: Any) -> Any:
            original(*args, **kwargs)
            fail()

        setattr(cls, name, patched)


if __name__ == "__main__":
    for fault in filter(None, sys.argv[1].split(",")):
        inject(fault)
    sys.exit(main(sys.argv[2:]))
