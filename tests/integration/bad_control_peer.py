"""A fake device process that speaks the control protocol badly (for test_holes.py).

    python -m tests.integration.bad_control_peer MODE --control ENDPOINT

A real process with a real ZeroMQ control socket: it answers every request well, except
the one its MODE spoils (a missing or mistyped reply field, a reply that is not
msgpack). It serves until SIGTERM or until its parent (the kernel) is gone.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from hostops.control import ControlServer
from vdev.virtio.control import decode_request, encode_error, encode_reply

#: mode -> (message spoiled, its reply fields, or None for a non-msgpack reply)
MODES: dict[str, tuple[str, dict[str, Any] | None]] = {
    "info_missing_num_queues": (
        "GET_DEVICE_INFO",
        {"device_id": 2, "max_queue_size": 64, "name": "blk"},
    ),
    "info_name_is_int": (
        "GET_DEVICE_INFO",
        {"device_id": 2, "num_queues": 1, "max_queue_size": 64, "name": 7},
    ),
    "info_queues_is_bool": (
        "GET_DEVICE_INFO",
        {"device_id": 2, "num_queues": True, "max_queue_size": 64, "name": "blk"},
    ),
    "features_is_str": ("GET_FEATURES", {"features": "all of them"}),
    "features_negative": ("GET_FEATURES", {"features": -1}),
    "status_missing": ("GET_STATUS", {}),
    "config_is_str": ("GET_CONFIG", {"data": "not bytes"}),
    "info_not_msgpack": ("GET_DEVICE_INFO", None),
}

_GOOD: dict[str, dict[str, Any]] = {
    "GET_DEVICE_INFO": {"device_id": 2, "num_queues": 1, "max_queue_size": 64, "name": "blk"},
    "GET_FEATURES": {"features": 1 << 32},
    "GET_STATUS": {"status": 0},
    "GET_CONFIG": {"data": bytes(64)},
    "GET_VRING_BASE": {"base": 0},
    "GET_METRICS": {"device": {}, "queues": []},
}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="bad_control_peer")
    p.add_argument("mode", choices=sorted(MODES))
    p.add_argument("--control", required=True)
    args = p.parse_args(argv)
    spoiled, fields = MODES[args.mode]
    status = 0
    parent = os.getppid()
    with ControlServer(args.control) as server:
        while os.getppid() == parent:  # the kernel is gone: stop
            got = server.recv(0.2)
            if got is None:
                continue
            peer, payload = got
            try:
                req = decode_request(payload)
            except Exception as e:  # noqa: BLE001
                server.reply(peer, encode_error("MALFORMED", str(e)))
                continue
            if req.type == spoiled:
                server.reply(peer, b"\xc1\xc1" if fields is None else encode_reply(**fields))
                continue
            if req.type == "SET_STATUS":
                status = req["status"]
            reply = dict(_GOOD.get(req.type, {}))
            if req.type == "GET_STATUS":
                reply["status"] = status
            server.reply(peer, encode_reply(**reply))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
