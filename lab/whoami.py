"""A small TCP server for lab pods: answers each line with the address it saw the client
come from, so a demo or test can prove which source address reached the app. A connection
that starts with an HTTP/1 request line gets one HTTP response with that text as its body
(so `curl` works too), followed by the request's `x-` headers (what a waypoint route
added shows there), and is closed. A query `delay=MS` answers that late and `status=CODE`
with that status: a slow or failing backend, for timeouts and retries."""

from __future__ import annotations

import argparse
import asyncio
import re
import urllib.parse

_REQUEST_LINE = re.compile(rb"[A-Z]+ \S+ HTTP/1\.[01]\r?\n")


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    peer = writer.get_extra_info("peername")
    local = writer.get_extra_info("sockname")
    try:
        while line := await reader.readline():
            text = (
                f"peer={peer[0]}:{peer[1]} local={local[0]}:{local[1]} "
                f"echo={line.decode(errors='replace').strip()}\n".encode()
            )
            if _REQUEST_LINE.fullmatch(line):
                headers = []
                while header := (await reader.readline()).strip():
                    name, _, value = header.decode(errors="replace").partition(":")
                    if name.lower().startswith("x-") and not name.lower().startswith("x-envoy"):
                        headers.append(f"{name.lower()}:{value.strip()}")
                if headers:
                    text = text.rstrip(b"\n") + f" headers={','.join(sorted(headers))}\n".encode()
                target = line.split(b" ")[1].decode(errors="replace")
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
                if delay := query.get("delay"):
                    await asyncio.sleep(int(delay[0]) / 1000)
                status = int(query.get("status", ["200"])[0])
                head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(text)}\r\nConnection: close"
                writer.write(f"{head}\r\nContent-Type: text/plain\r\n\r\n".encode() + text)
                await writer.drain()
                break
            writer.write(text)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _main(port: int) -> None:
    server = await asyncio.start_server(_serve, "0.0.0.0", port)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    asyncio.run(_main(args.port))


if __name__ == "__main__":
    main()
