"""The pytest plugin shipped with virtio-lab (entry point ``pytest11``: ``vlab``).

Installed with the package, it gives any test suite:

* the marker ``@pytest.mark.vlab_faults(PLAN, seed=None, devices=("blk",))`` -- PLAN is
  a plan as Python data (``{"rules": [...]}``), a path to a plan file, or a
  :class:`~vdev.virtio.faults.FaultPlan`; ``devices`` which devices ``vlab_kernel``
  boots: ``"blk"`` (a temporary 8 MiB image) and/or ``"net"`` (a loopback NIC);
* the fixture ``fault_plan``: the marker's plan, validated, with its seed fixed (the
  marker's ``seed``, else ``--vlab-seed``, else the plan's, else one drawn) -- None
  without the marker;
* the fixture ``vlab_kernel``: a kernel booted with those devices, each carrying the
  plan (``kernel.Blk(..., faults=plan)``), shut down after the test;
* the option ``--vlab-seed N``: run every planned test with seed N;
* on failure, the report says the seed and how to replay it: ``vlab fault plan: seed
  N (replay: pytest --vlab-seed N ...)``.

A plan that does not load fails the test at set-up with the plan's one-line error.

Example::

    @pytest.mark.vlab_faults({"rules": [{"when": {"event": "blk.write", "nth": 2},
                                         "what": {"action": "ioerr"}}]})
    def test_second_write_fails(vlab_kernel):
        fd = vlab_kernel.sys.open("/dev/vda", os.O_RDWR)
        vlab_kernel.sys.pwrite(fd, b"a" * 512, 0)
        with pytest.raises(OSError):
            vlab_kernel.sys.pwrite(fd, b"b" * 512, 512)
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

__all__ = ["fault_plan", "vlab_kernel"]

_SEED_KEY = pytest.StashKey[int]()
#: Size of the image ``vlab_kernel`` gives its disk.
IMAGE_BYTES = 8 << 20


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--vlab-seed N``."""
    group = parser.getgroup("vlab", "virtio-lab fault injection")
    group.addoption(
        "--vlab-seed",
        type=int,
        default=None,
        help="seed of every vlab_faults plan (replays a failure)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Register the marker."""
    config.addinivalue_line(
        "markers",
        "vlab_faults(plan, seed=None, devices=('blk',)): boot vlab_kernel with this fault "
        "plan on its devices",
    )


def _load(plan: Any, seed: int | None) -> Any:
    from vdev.faultplan import load_plan
    from vdev.virtio.faults import FaultPlan

    if isinstance(plan, FaultPlan):
        return plan.fresh(seed)
    if isinstance(plan, str | os.PathLike):
        return load_plan(os.fspath(plan), seed=seed)
    return FaultPlan.from_dict(plan, seed=seed)


@pytest.fixture
def fault_plan(request: pytest.FixtureRequest) -> Any:
    """The ``vlab_faults`` marker's plan (a FaultPlan with its seed fixed), or None."""
    from vdev.virtio.faults import FaultPlanError

    marker = request.node.get_closest_marker("vlab_faults")
    if marker is None:
        return None
    if not marker.args:
        pytest.fail("vlab_faults: give the plan as the first argument", pytrace=False)
    seed = marker.kwargs.get("seed")
    if seed is None:
        seed = request.config.getoption("--vlab-seed")
    try:
        plan = _load(marker.args[0], seed)
    except (FaultPlanError, OSError) as e:
        pytest.fail(f"vlab_faults: {e}", pytrace=False)
    request.node.stash[_SEED_KEY] = plan.seed
    return plan


@pytest.fixture
def vlab_kernel(
    request: pytest.FixtureRequest, fault_plan: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A booted kernel whose devices (the marker's ``devices``) carry ``fault_plan``."""
    import kernel

    marker = request.node.get_closest_marker("vlab_faults")
    devices = tuple(marker.kwargs.get("devices", ("blk",))) if marker else ("blk",)
    bad = [d for d in devices if d not in ("blk", "net")]
    if bad or not devices:
        pytest.fail(
            f"vlab_faults: devices must be 'blk' and/or 'net', got {devices}", pytrace=False
        )
    extra: dict[str, Any] = {} if fault_plan is None else {"faults": fault_plan}
    specs: list[Any] = []
    if "blk" in devices:
        image = tmp_path_factory.mktemp("vlab") / "disk.img"
        with open(image, "wb") as f:
            f.truncate(IMAGE_BYTES)
        specs.append(kernel.Blk(str(image), **extra))
    if "net" in devices:
        specs.append(kernel.Net(backend="loopback", **extra))
    k = kernel.boot(devices=specs)
    try:
        yield k
    finally:
        k.shutdown()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Add the seed of the test's plan to a failing test's report."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    seed = item.stash.get(_SEED_KEY, None)
    if report.failed and seed is not None:
        report.sections.append(
            (
                "vlab fault plan",
                f"seed {seed} (replay: pytest --vlab-seed {seed} {item.nodeid})",
            )
        )
