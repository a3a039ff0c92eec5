"""A steady stream of short TCP connections, and a server that counts them by source address.

Both run as processes inside a pod's netns (`python -m bench.stream ...`) and print one JSON
object when they get SIGTERM:

- `connect HOST PORT --interval S`: opens a connection every S seconds (each on its own
  task, so a dropped SYN does not hold up the next), sends one line and waits for the reply;
  counts replies, failures by kind, and connections still waiting at the end.
- `serve PORT`: accepts, answers one line, closes; counts accepted connections by peer IP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from collections import Counter

CONNECT_TIMEOUT = 5.0


async def _connect_stream(host: str, port: int, interval: float) -> dict[str, object]:
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    pending: set[asyncio.Task[None]] = set()

    async def one() -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT
            )
        except TimeoutError:
            outcomes["connect_timeout"] += 1
            return
        except OSError as exc:
            outcomes[f"connect_{type(exc).__name__}"] += 1
            return
        try:
            writer.write(b"x\n")
            reply = await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT)
            outcomes["reply" if reply else "closed"] += 1
        except (OSError, TimeoutError) as exc:
            outcomes[f"exchange_{type(exc).__name__}"] += 1
        finally:
            writer.close()

    print("streaming", flush=True)
    while not stop.is_set():
        task = asyncio.create_task(one())
        pending.add(task)
        task.add_done_callback(pending.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)
    outcomes["unfinished"] = len(pending)
    for task in list(pending):
        task.cancel()
    return {"outcomes": dict(outcomes), "started": sum(outcomes.values())}


async def _serve(port: int) -> dict[str, object]:
    accepted: Counter[str] = Counter()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted[writer.get_extra_info("peername")[0]] += 1
        try:
            await asyncio.wait_for(reader.readline(), CONNECT_TIMEOUT)
            writer.write(b"ok\n")
            await writer.drain()
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "0.0.0.0", port, backlog=4096)
    async with server:
        await stop.wait()
    return {"accepted_by_source": dict(accepted)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.stream")
    sub = parser.add_subparsers(dest="mode", required=True)
    connect = sub.add_parser("connect")
    connect.add_argument("host")
    connect.add_argument("port", type=int)
    connect.add_argument("--interval", type=float, default=0.002)
    serve = sub.add_parser("serve")
    serve.add_argument("port", type=int)
    args = parser.parse_args(argv)
    if args.mode == "connect":
        result = asyncio.run(_connect_stream(args.host, args.port, args.interval))
    else:
        result = asyncio.run(_serve(args.port))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
