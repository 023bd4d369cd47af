"""An ordinary asyncio client: ``aio_echo_client.py HOST PORT NBYTES`` sends NBYTES of a
pattern to an echo server, shuts down writing, reads everything back and prints one
JSON line; exit 0 when the echo matched."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys


async def main(host: str, port: int, n: int) -> int:
    payload = bytes((i * 7 + i // 251) % 256 for i in range(n))
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    await writer.drain()
    writer.write_eof()
    got = await reader.read(-1)
    writer.close()
    await writer.wait_closed()
    print(
        json.dumps(
            {
                "sent": n,
                "got": len(got),
                "same": got == payload,
                "sha256": hashlib.sha256(got).hexdigest(),
            }
        ),
        flush=True,
    )
    return 0 if got == payload else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
