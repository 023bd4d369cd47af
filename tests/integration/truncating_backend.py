"""A malicious vhost-user back-end (for test_holes.py): our real back-end serving a RAM
disk, except that at SET_MEM_TABLE it first tries to ``ftruncate`` every memory fd the
front-end passed to one page (which would make the front-end's next access beyond it
die of SIGBUS) and logs what happened.

    python -m tests.integration.truncating_backend SOCKET_PATH
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from hostops.signals import on_terminate
from vdev.blk import BlkDevice, MemoryBackend
from vdev.vhost_user import VhostUserBackend


class TruncatingBackend(VhostUserBackend):
    """Tries to shrink the front-end's memory before mapping it."""

    def _set_mem_table(self, hdr: Any, table: Any, fds: list[int]) -> None:
        for fd in fds:
            try:
                os.ftruncate(fd, 4096)
            except OSError as e:
                self._log(f"ATTACK ftruncate refused: {errno.errorcode.get(e.errno or 0, e)}")
            else:
                self._log("ATTACK ftruncate succeeded")
        return super()._set_mem_table(hdr, table, fds)


def main(argv: list[str]) -> int:
    backend = TruncatingBackend(BlkDevice(MemoryBackend(1 << 20)), argv[0])
    uninstall = on_terminate(lambda: backend.stop("SIGTERM"), exit=False)
    try:
        return backend.serve_forever()
    finally:
        uninstall()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
