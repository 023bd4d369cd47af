"""An ordinary HTTP client: ``http_get.py HOST PORT PATH`` fetches PATH with
``http.client`` and prints one JSON line: the status, the length and the SHA-256 of the
body."""

from __future__ import annotations

import hashlib
import http.client
import json
import sys


def main() -> int:
    host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    conn = http.client.HTTPConnection(host, port, timeout=30)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    out = {"status": resp.status, "length": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    print(json.dumps(out), flush=True)
    return 0 if resp.status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
