"""The ``vlab`` command line, run for real: the installed console script in a child
process (which boots its own kernel and device processes), its stdout parsed, its exit
status checked, the images it touched hashed from the host side.

No mocks, no sleeps: every run has a timeout, and after every run the test checks
that the ``vlab`` process left no shared-memory segment, runtime directory or device
process behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
_SCRIPT = Path(sys.executable).parent / "vlab"
#: The console script ``pip install`` made; failing that, exactly what it runs.
VLAB = (
    [str(_SCRIPT)]
    if _SCRIPT.exists()
    else [sys.executable, "-c", "import sys; from tools.cli import main; sys.exit(main())"]
)
RUN_TIMEOUT_S = 90
ROW_KEYS = {
    "name",
    "unit",
    "virtio",
    "native",
    "ratio",
    "kicks_per_request",
    "interrupts_per_request",
}
ALL_ROWS = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "seqread-1m",
    "seqwrite-1m",
]
ALL_ROWS_BOTH = [n for name in ALL_ROWS for n in (name, f"{name} poll-off")]


@dataclass(repr=False)
class Run:
    status: int
    out: str
    err: str
    pid: int

    def __repr__(self) -> str:
        return f"pid {self.pid}, exit {self.status}\n--- stdout\n{self.out}--- stderr\n{self.err}"


def _wait_gone(pid: int, timeout_s: float) -> bool:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([pidfd], [], [], timeout_s)[0])
    finally:
        os.close(pidfd)


def _run(argv: list[str], tmp_path: Path, timeout: float = RUN_TIMEOUT_S) -> Run:
    env = dict(os.environ, TMPDIR=str(tmp_path))  # the commands' temporary files go there
    env.pop("VLAB_DEBUG", None)
    p = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=str(tmp_path),
    )
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"{argv} did not finish within {timeout} s\n{out}\n{err}")
    run = Run(p.returncode, out, err, p.pid)
    # nothing of that process may survive it
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"vlab-{p.pid}-")], run
    base = Path(f"/tmp/vlab-{os.getuid()}")
    if base.is_dir():
        assert not list(base.glob(f"{p.pid}-*")), run
    assert not list(tmp_path.glob("vlab-*")), f"temporary files left in {tmp_path}"
    for line in out.splitlines():
        m = re.match(r"device /dev/\w+: device id \d+, process (\d+)", line)
        if m:
            assert _wait_gone(int(m.group(1)), 10), f"device process {m.group(1)} outlived vlab"
    return run


def vlab(tmp_path: Path, *args: str, timeout: float = RUN_TIMEOUT_S) -> Run:
    return _run([*VLAB, *args], tmp_path, timeout)


def _table(out: str, first: str) -> list[dict[str, str]]:
    """The rows of the plain-text table whose header starts with ``first``; columns
    are found from the dashed rule under the header (names may contain spaces)."""
    lines = out.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith(first) and re.fullmatch(r"-+( +-+)*", lines[i + 1]):
            spans = [m.span() for m in re.finditer(r"-+", lines[i + 1])]
            break
    else:
        raise AssertionError(f"no table starting with {first!r} in:\n{out}")

    def cells(text: str) -> list[str]:
        return [text[a:b].strip() for a, b in spans]

    header = cells(lines[i])
    rows = []
    for line in lines[i + 2 :]:
        if not line.strip():
            break
        rows.append(dict(zip(header, cells(line), strict=True)))
    return rows


def _num(cell: str) -> float:
    return float(cell.replace(",", ""))


def _features(out: str, dev: str = "vda") -> list[str]:
    head = f"{dev} negotiated features: "
    lines = [ln for ln in out.splitlines() if ln.startswith(head)]
    assert len(lines) == 1, out
    return lines[0].removeprefix(head).split(", ")


def _device_counters(out: str, which: int = 0) -> dict[str, int]:
    """The ``device counters:`` line of the demo's ``which``-th device (0: the disk,
    1: the NIC)."""
    lines = [ln for ln in out.splitlines() if ln.startswith("device counters: ")]
    assert len(lines) == 2, out
    pairs = lines[which].removeprefix("device counters: ").split(", ")
    return {k: int(v) for k, v in (p.split("=") for p in pairs)}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


SPAN = (1 << 20) + 3 * 512  # what the demo reads and writes of the image below


@pytest.fixture
def image(tmp_path) -> Path:
    """A host-made image of known random bytes: 1 MiB, three sectors and a partial one
    (the demo's span covers whole 512-byte sectors, so it stops short of the end)."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(SPAN + 100))
    return path


# --------------------------------------------------------------------------- demo


def _check_counters(run: Run) -> list[dict[str, str]]:
    rows = _table(run.out, "queue")
    assert [r["queue"] for r in rows] == ["0"], run
    r = {k: int(_num(v)) for k, v in rows[0].items()}
    assert r["requests"] > 0, run
    assert r["completions"] == r["requests"], run
    assert r["kicks sent"] >= 1 and r["interrupts"] >= 1, run
    assert r["kicks sent"] + r["kicks suppressed"] <= r["requests"], run
    dc = _device_counters(run.out)
    assert dc["chains"] == r["requests"], run  # every request reached the device
    assert dc["kicks_received"] <= r["kicks sent"], run
    return rows


def test_demo_on_a_temporary_image(tmp_path):
    run = vlab(tmp_path, "demo")
    assert run.status == 0, run
    assert run.err == "", run
    assert run.out.rstrip().endswith("demo: OK"), run
    assert "[temporary]" in run.out and "[FAIL]" not in run.out
    features = _features(run.out)
    assert "VERSION_1" in features and "EVENT_IDX" in features, features
    assert "RO" not in features
    m = re.search(r"wrote (\d+) bytes in (\d+) writes from \d+ threads", run.out)
    assert m, run
    nbytes, nwrites = int(m.group(1)), int(m.group(2))
    rows = _check_counters(run)
    requests = int(_num(rows[0]["requests"]))
    assert requests > nwrites, run  # the writes, then reads (some read ahead, bigger)
    dc = _device_counters(run.out)
    assert dc["bytes_written"] == nbytes, run
    # every byte was read back; sequential reads may also be read ahead (windows are
    # dropped and read again when eight threads' reads arrive out of order)
    assert dc["bytes_read"] >= nbytes, run
    assert dc["flushes"] >= 1, run
    # the NIC: a UDP round trip and three pings crossed the loopback device
    assert "[ok] UDP 10.0.0.2:" in run.out and "[ok] ping 10.0.0.2: 3 replies" in run.out, run
    assert "[ok] TCP 1024 KiB to 10.0.0.2:8080, SHA-256 echoed back" in run.out, run
    assert "MRG_RXBUF" in _features(run.out, "eth0")
    nc = _device_counters(run.out, 1)
    assert nc["tx_frames"] == nc["rx_frames"] >= 8, nc  # 2 UDP + 3 echo requests + replies


def test_demo_on_an_image_is_read_only_by_default(tmp_path, image):
    before = _sha(image)
    size = image.stat().st_size
    run = vlab(tmp_path, "demo", "--image", str(image))
    assert run.status == 0, run
    assert run.out.rstrip().endswith("demo: OK"), run
    assert f"image: {image} ({size} bytes) [read-only]" in run.out, run
    assert "[ok] read through virtio == image file on the host" in run.out, run
    assert "wrote" not in run.out
    assert "RO" in _features(run.out)
    _check_counters(run)
    dc = _device_counters(run.out)
    # the whole-sector span, read once, plus at most two readahead windows of 1 MiB
    assert SPAN <= dc["bytes_read"] <= SPAN + (2 << 20), run
    assert dc.get("writes", 0) == dc.get("bytes_written", 0) == 0, run
    assert _sha(image) == before
    assert image.stat().st_size == size


def test_demo_write_restores_the_original_bytes(tmp_path, image):
    before = _sha(image)
    size = image.stat().st_size
    run = vlab(tmp_path, "demo", "--image", str(image), "--write")
    assert run.status == 0, run
    assert run.out.rstrip().endswith("demo: OK"), run
    assert "[read-only]" not in run.out
    assert "[ok] image file on the host  == pattern" in run.out, run
    assert f"[ok] original {SPAN} bytes restored" in run.out, run
    assert "RO" not in _features(run.out)
    _check_counters(run)
    dc = _device_counters(run.out)
    assert dc["bytes_written"] == 2 * SPAN, run  # the pattern, then the original
    assert dc["flushes"] >= 2, run
    assert _sha(image) == before
    assert image.stat().st_size == size


# --------------------------------------------------------------------------- bench


def _bench_json(run: Run, names: list[str], poll: str = "on", stages: bool = False) -> list[dict]:
    assert run.status == 0, run
    assert run.err == "", run
    lines = run.out.splitlines()
    assert len(lines) == 1, run  # one JSON object and nothing else
    doc = json.loads(lines[0])
    assert set(doc) == {"queues", "poll", "idle_cpu", "rows"} | ({"stages"} if stages else set())
    assert doc["queues"] == 1 and doc["poll"] == poll, doc
    # CPU use of the idle kernel and device after the rows, per polling setting
    modes = ["on", "off"] if poll == "both" else [poll]
    assert sorted(doc["idle_cpu"]) == sorted(modes), doc
    for cpu in doc["idle_cpu"].values():
        assert set(cpu) == {"kernel", "device"} and all(v >= 0 for v in cpu.values()), doc
    rows = doc["rows"]
    assert [r["name"] for r in rows] == names, rows
    for r in rows:
        assert set(r) == ROW_KEYS, r
        assert r["unit"] == ("MB/s" if r["name"].split()[0].endswith("-1m") else "IOPS"), r
        assert r["virtio"] > 0 and r["native"] > 0, r
        # ratio is rounded to 4 places from the unrounded rates (virtio/native are
        # rounded to 0.1): equal to the printed ones' quotient up to that rounding
        assert r["ratio"] == pytest.approx(r["virtio"] / r["native"], rel=1e-3, abs=1e-4), r
        # a kick publishes >= 1 request; with hybrid polling a request may need none
        assert 0 <= r["kicks_per_request"] <= 1, r
        assert r["interrupts_per_request"] >= 0, r
    return rows


def test_bench_json_with_polling_on_and_off(tmp_path):
    run = vlab(tmp_path, "bench", "blk", "--seconds", "0.1", "--json", "--poll", "both", "--stages")
    rows = _bench_json(run, ALL_ROWS_BOTH, poll="both", stages=True)
    by_name = {r["name"]: r for r in rows}
    stages = json.loads(run.out)["stages"]
    assert sorted(stages) == sorted(ALL_ROWS_BOTH), stages
    for name, cost in stages.items():
        assert set(cost) == {"kernel", "kernel_poll", "device", "device_poll"}, cost
        assert cost["kernel"] > 0 and cost["device"] >= 0, (name, cost)
        if name.endswith("poll-off"):  # nobody polled
            assert cost["kernel_poll"] == cost["device_poll"] == 0, (name, cost)
    # without polling a depth-1 request sleeps on both sides: a doorbell each way
    off = by_name["randread-4k-qd1 poll-off"]
    assert off["kicks_per_request"] > 0.5 and off["interrupts_per_request"] > 0.5, off


def test_bench_json_selected_rows(tmp_path):
    names = ["randread-4k-qd32", "seqwrite-1m"]
    run = vlab(
        tmp_path,
        "bench",
        "blk",
        "--seconds",
        "0.05",
        "--json",
        "--only",
        names[0],
        "--only",
        names[1],
    )
    rows = _bench_json(run, names)
    qd32 = rows[0]
    # 32 in flight: EVENT_IDX lets most requests go without a doorbell either way
    assert qd32["kicks_per_request"] < 1, qd32
    assert qd32["interrupts_per_request"] < 1, qd32


def test_bench_json_all_rows(tmp_path):
    rows = _bench_json(vlab(tmp_path, "bench", "blk", "--seconds", "0.05", "--json"), ALL_ROWS)
    by_name = {r["name"]: r for r in rows}
    for name in ("randread-4k-qd32", "randwrite-4k-qd32"):
        assert by_name[name]["kicks_per_request"] < 1, by_name[name]


NET_ROW_KEYS = {
    "name",
    "unit",
    "virtio",
    "native",
    "ratio",
    "kicks_per_packet",
    "interrupts_per_packet",
}


def test_bench_net_json_and_plot(tmp_path):
    """Two rows of UDP_STREAM through two kernels on the switch, beside native UDP; the
    JSON has the documented shape and the plot is a PNG."""
    png = tmp_path / "udp.png"
    run = vlab(
        tmp_path,
        "bench",
        "net",
        "--seconds",
        "0.2",
        "--json",
        "--only",
        "udp-1024",
        "--only",
        "udp-65507",
        "--plot",
        str(png),
        timeout=120,
    )
    assert run.status == 0, run
    doc = json.loads(run.out.splitlines()[-1])
    rows = doc["rows"]
    assert [r["name"] for r in rows] == ["udp-1024", "udp-65507"], rows
    for r in rows:
        assert set(r) == NET_ROW_KEYS, r
        assert r["unit"] == "Mbit/s"
        assert r["virtio"] > 0 and r["native"] > 0, r
        assert r["ratio"] == pytest.approx(r["virtio"] / r["native"], rel=1e-3, abs=1e-4), r
        assert 0 <= r["kicks_per_packet"] <= 1, r
        assert r["interrupts_per_packet"] >= 0, r
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plain_table_on_an_image(tmp_path):
    img = tmp_path / "bench.img"
    img.write_bytes(os.urandom(4 << 20))
    run = vlab(
        tmp_path,
        "bench",
        "blk",
        "--image",
        str(img),
        "--seconds",
        "0.05",
        "--only",
        "randread-4k-qd1",
        "--only",
        "seqread-1m",
    )
    assert run.status == 0, run
    assert run.err == "", run
    lines = run.out.splitlines()
    assert lines[0] == "virtio-blk with 1 request queue, hybrid polling on", run
    assert "virtio/native" in lines[1].split("  "), run
    assert re.fullmatch(
        r"idle [0-9.]+ s after the rows \(polling on\): kernel [0-9.]+ % CPU, "
        r"device [0-9.]+ % CPU",
        lines[-1],
    ), run
    rows = _table(run.out, "workload")
    assert [r["workload"] for r in rows] == ["randread-4k-qd1", "seqread-1m"], run
    assert [r["unit"] for r in rows] == ["IOPS", "MB/s"], run
    for r in rows:
        assert _num(r["virtio"]) > 0 and _num(r["native"]) > 0, run
        assert 0 < _num(r["kicks/req"]) <= 1, run
    assert img.stat().st_size == 4 << 20  # used as it is, never grown


# --------------------------------------------------------------------------- errors


def _one_error_line(run: Run, status: int, prefix: str = "vlab: error:") -> str:
    assert run.status == status, run
    assert "Traceback" not in run.err and "Traceback" not in run.out, run
    lines = run.err.splitlines()
    assert len(lines) == 1, run
    assert lines[0].startswith(prefix), run
    assert run.out == "", run
    return lines[0]


@pytest.mark.parametrize(
    "args, says",
    [
        ([], "required"),
        (["nosuch"], "invalid choice"),
        (["bench", "nope"], "invalid choice: 'nope'"),
        (["bench", "net", "--only", "udp-7"], "udp-7"),
        (["bench", "net", "--image", "x.img"], "--image"),
        (["bench", "blk", "--plot", "x.png"], "--plot"),
        (["bench", "net", "--plot", "/nonexistent-dir/x.png"], "does not exist"),
        (["bench", "blk", "--seconds", "-1"], "must be > 0"),
        (["bench", "blk", "--seconds", "abc"], "not a number"),
        (["bench", "blk", "--seconds", "0"], "must be > 0"),
        (["bench", "blk", "--seconds", "nan"], "must be > 0"),
        (["bench", "blk", "--seconds", "inf"], "--seconds"),
        (["bench", "blk", "--seconds", "1e300"], "--seconds"),
        (["bench", "blk", "--only", "nosuchrow"], "nosuchrow"),
        (["demo", "--size", "lots"], "not a size"),
        (["demo", "--write"], "--image"),
    ],
)
def test_usage_errors_exit_2(tmp_path, args, says):
    line = _one_error_line(vlab(tmp_path, *args), 2)
    assert says in line, line


def test_a_directory_as_image_fails(tmp_path):
    d = tmp_path / "adir"
    d.mkdir()
    line = _one_error_line(vlab(tmp_path, "demo", "--image", str(d)), 1)
    assert str(d) in line


def test_a_missing_image_fails(tmp_path):
    missing = tmp_path / "nonexistent.img"
    line = _one_error_line(vlab(tmp_path, "demo", "--image", str(missing)), 1)
    assert "not found" in line and str(missing) in line
    line = _one_error_line(vlab(tmp_path, "demo", "--image", "/nonexistent"), 1)
    assert "/nonexistent" in line


def test_an_image_smaller_than_a_sector_fails(tmp_path):
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 511)
    line = _one_error_line(vlab(tmp_path, "demo", "--image", str(tiny), "--write"), 1)
    assert "512" in line
    assert tiny.read_bytes() == b"x" * 511


def test_python_dash_m_tools_cli_reports_usage_errors_like_the_script(tmp_path):
    run = _run([sys.executable, "-m", "tools.cli", "bench", "blk", "--only", "nosuchrow"], tmp_path)
    line = _one_error_line(run, 2)
    assert "CliError" not in line


# --------------------------------------------------------------------------- python -m vdev


@pytest.mark.parametrize(
    "args, says",
    [
        (["blk", "--image", "{img}"], "--control"),
        (["blk", "--image", "{img}", "--queue-size", "3", "--control", "{ctl}"], "power of two"),
        (["blk", "--image", "{missing}", "--control", "{ctl}"], "image not found"),
        (["blk", "--image", "{tmp}", "--control", "{ctl}"], "directory"),
        (["blk", "--memory", "1000", "--control", "{ctl}"], "512"),
        (["blk", "--image", "{img}", "--control", "tcp://0.0.0.0:1"], "ipc://"),
        (["nope"], "invalid choice"),
        (["net"], "--backend"),
    ],
)
def test_device_process_bad_arguments(tmp_path, image, args, says):
    ctl = tmp_path / "dev.ctl"
    fill = {
        "img": str(image),
        "missing": str(tmp_path / "nope.img"),
        "tmp": str(tmp_path),
        "ctl": f"ipc://{ctl}",
    }
    argv = [a.format(**fill) for a in args]
    run = _run([sys.executable, "-m", "vdev", *argv], tmp_path, timeout=30)
    line = _one_error_line(run, 2, prefix="python -m vdev")
    assert says in line, line
    assert not ctl.exists()  # it never got as far as binding the control endpoint
