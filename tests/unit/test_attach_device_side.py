"""The device side of ``kernel.Attach``: a ``--shm-by-name`` runtime maps memory by
POSIX shm name only (names our kernels create), reports its pid in GET_DEVICE_INFO (an
optional, typed reply field), and the command line takes the flag for every kind.
The runtime's control state machine runs without sockets (``handle_control``)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from hostops.shm import SharedRegion
from vdev.examples.rng import RngDevice
from vdev.runtime import DeviceRuntime
from vdev.virtio.control import (
    ErrorCode,
    RemoteError,
    check_reply,
    decode_reply,
    encode_request,
)
from vdev.virtio.errors import ProtocolError

GOOD_INFO = {"device_id": 4, "num_queues": 1, "max_queue_size": 64, "name": "rng"}


def _runtime(shm_by_name: bool) -> DeviceRuntime:
    return DeviceRuntime(
        RngDevice(seed=1),
        "ipc:///nonexistent/rng.ctl",
        watch_parent=False,
        log=io.StringIO(),
        shm_by_name=shm_by_name,
    )


def _ask(rt: DeviceRuntime, type_: str, **fields: object) -> dict[str, object]:
    return decode_reply(rt.handle_control(encode_request(type_, **fields)))


def _refused(rt: DeviceRuntime, type_: str, **fields: object) -> RemoteError:
    with pytest.raises(RemoteError) as ei:
        _ask(rt, type_, **fields)
    return ei.value


def test_pid_only_from_an_attachable_device() -> None:
    info = _ask(_runtime(True), "GET_DEVICE_INFO")
    assert info["pid"] == os.getpid()
    assert check_reply("GET_DEVICE_INFO", info) is info
    assert "pid" not in _ask(_runtime(False), "GET_DEVICE_INFO")


def test_optional_pid_field_is_typed_when_present() -> None:
    assert check_reply("GET_DEVICE_INFO", dict(GOOD_INFO))  # absent: fine
    for bad in ("12", True, -1):
        with pytest.raises(ProtocolError) as ei:
            check_reply("GET_DEVICE_INFO", dict(GOOD_INFO, pid=bad))
        assert "pid" in ei.value.message


def test_shm_by_name_refuses_fds_and_foreign_names() -> None:
    rt = _runtime(True)
    e = _refused(rt, "SET_MEM_TABLE", regions=[{"guest_addr": 0, "size": 4096, "fd": 3}])
    assert e.code == ErrorCode.BAD_FIELD and "--shm-by-name" in e.message
    for name in ("/someone-elses", "/vlab-1-x-zz", "vlab-1-x-ab", "/vlab-1-a/b-ab"):
        e = _refused(rt, "SET_MEM_TABLE", regions=[{"guest_addr": 0, "size": 4096, "shm": name}])
        assert e.code == ErrorCode.BAD_ADDRESS and "not a virtio-lab region" in e.message
    with SharedRegion.create(8192, tag="attach") as region:
        assert (
            _ask(rt, "SET_MEM_TABLE", regions=[{"guest_addr": 0, "size": 8192, "shm": region.name}])
            == {}
        )
        _ask(rt, "RESET_DEVICE")  # unmaps it
    rt.close()


def test_without_the_flag_memory_rules_are_unchanged() -> None:
    rt = _runtime(False)
    e = _refused(rt, "SET_MEM_TABLE", regions=[{"guest_addr": 0, "size": 4096, "fd": 3}])
    assert "inherited" in e.message  # the memfd rule, not the --shm-by-name one
    rt.close()


def test_cli_shm_by_name_needs_control() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vdev", "rng", "--vhost-user", "/tmp/x.sock", "--shm-by-name"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--shm-by-name goes with --control" in r.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "vdev", "blk", "--help"], capture_output=True, text=True, timeout=30
    )
    assert "--shm-by-name" in helped.stdout
