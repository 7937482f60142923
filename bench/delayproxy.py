"""A TCP proxy that delays every chunk, each way, by a fixed time (half the RTT).

    python -m bench.delayproxy --port P --target HOST:PORT --delay 0.02 [--workers 2]

This kernel has no netem, so latency is added here; bandwidth is shaped by
tbf on the veth pair (bench.network). Chunks keep their spacing: a chunk read
at t is written at t + delay, so a stream keeps its rate and gains the delay,
like a long link. ``--workers`` processes share the port (SO_REUSEPORT)
because one Python process tops out below a 10 Gbit link.
"""

from __future__ import annotations

import argparse
import asyncio
import os

CHUNK = 256 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def pump() -> None:
        while True:
            data = await reader.read(CHUNK)
            queue.put_nowait((loop.time() + delay, data))
            if not data:
                return

    async def drain() -> None:
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    try:
        await asyncio.gather(pump(), drain())
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(port: int, host: str, target_port: int, delay: float) -> None:
    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection(host, target_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(_pipe(cr, sw, delay), _pipe(sr, cw, delay))

    server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_port=True, backlog=256)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT")
    parser.add_argument("--delay", type=float, required=True, help="seconds, each direction")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break
    asyncio.run(_serve(args.port, host, int(port), args.delay))


if __name__ == "__main__":
    main()
