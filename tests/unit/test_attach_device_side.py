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


def test_shm_by_name_maps_a_sealed_kernel_memfd_through_proc(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The attaching kernel's memfd, opened through /proc: only /proc/<pid>/fd/<n>
    paths, only --shm-by-name devices, only memory nobody can shrink any more."""
    from hostops.fdmem import new_memfd, size_and_seal

    rt = _runtime(True)
    for bad in ("/etc/passwd", "/proc/self/fd/0", "/proc/1/fd/../../etc", "/dev/shm/x"):
        e = _refused(rt, "SET_MEM_TABLE", regions=[{"guest_addr": 0, "size": 4096, "path": bad}])
        assert e.code == ErrorCode.BAD_ADDRESS and "/proc/<pid>/fd/<n>" in e.message, bad
    plain = tmp_path / "plain"  # a file on a disk: its size could change under us
    plain.write_bytes(bytes(8192))
    fd = os.open(plain, os.O_RDWR)
    try:
        e = _refused(
            rt,
            "SET_MEM_TABLE",
            regions=[{"guest_addr": 0, "size": 8192, "path": f"/proc/{os.getpid()}/fd/{fd}"}],
        )
        assert e.code == ErrorCode.BAD_ADDRESS and "seal" in e.message
    finally:
        os.close(fd)
    memfd = new_memfd("test")
    region = size_and_seal(memfd, 8192)
    try:
        path = f"/proc/{os.getpid()}/fd/{memfd}"
        assert (
            _ask(rt, "SET_MEM_TABLE", regions=[{"guest_addr": 0, "size": 8192, "path": path}]) == {}
        )
        with pytest.raises(PermissionError):
            os.ftruncate(memfd, 4096)  # sealed: nobody, the device included, can shrink it
        _ask(rt, "RESET_DEVICE")
    finally:
        region.close()
        os.close(memfd)
    rt.close()
    plain_rt = _runtime(False)
    e = _refused(
        plain_rt, "SET_MEM_TABLE", regions=[{"guest_addr": 0, "size": 4096, "path": "/proc/1/fd/3"}]
    )
    assert e.code == ErrorCode.BAD_ADDRESS
    plain_rt.close()
