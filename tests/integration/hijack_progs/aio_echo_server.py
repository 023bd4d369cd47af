"""An ordinary asyncio echo server: ``aio_echo_server.py HOST PORT`` echoes every
connection until its peer shuts down writing, prints ``ready`` once it listens and
exits 0 after the first connection ended, printing one JSON line of what it echoed."""

from __future__ import annotations

import asyncio
import json
import sys


async def main(host: str, port: int) -> None:
    done = asyncio.Event()
    echoed = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            echoed[0] += len(data)
            writer.write(data)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        done.set()

    server = await asyncio.start_server(handle, host, port)
    print("ready", flush=True)
    await done.wait()
    server.close()
    await server.wait_closed()
    print(json.dumps({"echoed": echoed[0]}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
