"""An ordinary UDP client: ``udp_selectors.py HOST PORT COUNT`` sends COUNT datagrams of
growing size to an echo service, waits for each reply with ``selectors`` and then
``select.select``, and prints one JSON line: what it got back and the socket's facts.
Nothing here knows about virtio-lab (``vlab run`` puts it on a kernel)."""

from __future__ import annotations

import json
import select
import selectors
import socket
import sys


def main() -> int:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ)
    matched = 0
    for i in range(count):
        data = bytes([i % 256]) * (1 + i * 97)
        s.sendto(data, (host, port))
        if i % 2 == 0:
            events = sel.select(30)
            assert events and events[0][0].fileobj is s, events
        else:
            r, _, _ = select.select([s], [], [], 30)
            assert r == [s], r
        got, addr = s.recvfrom(65536)
        matched += got == data and addr == (host, port)
    sel.close()
    out = {
        "matched": matched,
        "isinstance": isinstance(s, socket.socket),
        "fileno": s.fileno(),
        "sockname": list(s.getsockname()),
    }
    s.close()
    print(json.dumps(out), flush=True)
    return 0 if matched == count else 1


if __name__ == "__main__":
    sys.exit(main())
