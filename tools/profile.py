"""``vlab bench … --profile DIR``: sampling profiles of every process on the virtio path.

Theory of operation
-------------------
While a benchmark's virtio rows run, one ``py-spy record`` per process (the kernel, each
device process, the switch, a peer kernel) samples that process from outside, without
stopping it (``--nonblocking``: py-spy reads the interpreter's stacks through
``process_vm_readv`` and never pauses the target, so the benchmark runs at its own
pace). py-spy writes its *raw* output -- Brendan Gregg's collapsed-stack format, one
line ``frame;frame;...;frame COUNT`` per distinct stack -- and is stopped with SIGINT
(its Ctrl-C), which makes it write the file and exit. It starts sampling only once it
prints its ``Sampling process`` line, so :meth:`Profiler.start` waits for that line of
every py-spy before the row begins.

Each row is recorded separately (the native rows in between are not profiled) and the
rows' stacks are added up per *role* (``kernel``, ``vda``, ``eth0``, ``switch``,
``peer-kernel``, ``peer-eth0``). :meth:`Profiler.finish` writes, per role:

* ``DIR/<role>.folded.txt`` -- the collapsed stacks (``flamegraph.pl`` and
  https://www.speedscope.app open it as is);
* ``DIR/<role>.speedscope.json`` -- the same samples in speedscope's file format;

and ``DIR/summary.txt``: per role the samples taken and the functions with the most
*own* time (the innermost frame of a sample), as a share of that process's samples.
Idle threads (blocked in a system call) are not sampled: the profile is where the
CPU time goes.

py-spy needs ptrace access to the processes: the same user suffices where Yama is off
or ``kernel.yama.ptrace_scope`` is 0; under Yama's usual 1 it takes root or
``CAP_SYS_PTRACE``, since the kernel is py-spy's parent and the device processes its
siblings, not its descendants. A py-spy that cannot attach ends the benchmark with one
line saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections import Counter

from tools.errors import CliError

__all__ = [
    "INSTALL_HINT",
    "Profiler",
    "check_profile_dir",
    "find_py_spy",
    "parse_folded",
    "top_functions",
]

#: What to do when py-spy is missing.
INSTALL_HINT = "install the bench extra: pip install 'virtio-lab[bench]'"
#: Samples per second per process.
DEFAULT_RATE = 250
#: Functions listed per process in summary.txt.
TOP = 15
#: How long py-spy may take to attach, or to write its output once told to stop (s).
_ATTACH_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0
#: Bounds on what we read back from py-spy's output (it is our own child, but a huge
#: file should not take the CLI down): lines per file and characters per line.
_MAX_LINES = 1_000_000
_MAX_LINE = 1 << 16


def find_py_spy() -> str | None:
    """The py-spy executable: next to this Python (a venv's ``bin``) or on ``PATH``."""
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.path.isfile(local) and os.access(local, os.X_OK):
        return local
    return shutil.which("py-spy")


def check_profile_dir(path: str) -> tuple[str, str]:
    """Check before the run that profiling can work: py-spy is installed and ``path`` is
    (or can be made) a writable directory. Returns (py-spy path, absolute directory);
    raises :class:`CliError` with exit status 2 and a one-line message otherwise."""
    exe = find_py_spy()
    if exe is None:
        raise CliError(f"--profile needs py-spy: {INSTALL_HINT}", 2)
    directory = os.path.abspath(path)
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise CliError(f"--profile: {path} is not a directory", 2)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise CliError(f"--profile: cannot create {path}: {e.strerror}", 2) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CliError(f"--profile: directory {path} is not writable", 2)
    probe = os.path.join(directory, f".vlab-profile-probe-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise CliError(f"--profile: directory {path} is not writable: {e.strerror}", 2) from None
    return exe, directory


def parse_folded(lines: list[str] | str) -> Counter[str]:
    """Collapsed stacks (``a;b;c COUNT`` per line) into a counter stack -> samples.
    Lines that are not of that form are skipped (bounded: :data:`_MAX_LINES`)."""
    if isinstance(lines, str):
        lines = lines.splitlines()
    out: Counter[str] = Counter()
    for line in lines[:_MAX_LINES]:
        if len(line) > _MAX_LINE:
            continue
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if stack and count.isdigit():
            out[stack] += int(count)
    return out


def _frames(stack: str) -> list[str]:
    return stack.split(";")


def top_functions(stacks: Counter[str], n: int = TOP) -> list[tuple[str, int]]:
    """The ``n`` functions with the most own time (innermost frame of each sample), as
    (``function (file)`` without the line number, samples), most first."""
    own: Counter[str] = Counter()
    for stack, count in stacks.items():
        own[_function(_frames(stack)[-1])] += count
    return own.most_common(n)


def _function(frame: str) -> str:
    """``spin (pkg/mod.py:12)`` -> ``spin (pkg/mod.py)``: own time summed over lines."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    return f"{name} ({where.rstrip(')').rsplit(':', 1)[0]})"


def _speedscope(role: str, stacks: Counter[str]) -> dict[str, object]:
    """The samples in speedscope's file format (one "sampled" profile)."""
    index: dict[str, int] = {}
    frames: list[dict[str, object]] = []
    samples: list[list[int]] = []
    weights: list[int] = []
    for stack, count in sorted(stacks.items()):
        ids = []
        for f in _frames(stack):
            if f not in index:
                index[f] = len(frames)
                name, _, where = f.partition(" (")
                file, _, line = where.rstrip(")").rpartition(":")
                entry: dict[str, object] = {"name": name, "file": file or where.rstrip(")")}
                if line.isdigit():
                    entry["line"] = int(line)
                frames.append(entry)
            ids.append(index[f])
        samples.append(ids)
        weights.append(count)
    total = sum(weights)
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "name": f"vlab bench: {role}",
        "exporter": "virtio-lab tools.profile",
        "shared": {"frames": frames},
        "profiles": [
            {
                "type": "sampled",
                "name": role,
                "unit": "none",
                "startValue": 0,
                "endValue": total,
                "samples": samples,
                "weights": weights,
            }
        ],
    }


class _Recorder:
    """One running ``py-spy record`` of one process."""

    def __init__(self, exe: str, role: str, pid: int, out: str, rate: int) -> None:
        self.role = role
        self.pid = pid
        self.out = out
        self.ready = threading.Event()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--format",
                "raw",
                "--nonblocking",
                "--output",
                out,
            ],
            stdin=subprocess.DEVNULL,
            env=dict(os.environ, RUST_BACKTRACE="0"),  # an error is one line, no backtrace
            stdout=subprocess.PIPE,  # py-spy's progress lines go to stdout
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        """Read py-spy's output up to its "Sampling process" line (then end, so this
        thread is not in the profile of the process it runs in), or to its exit."""
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if len(self.lines) < 200:  # bounded: only the first lines matter
                self.lines.append(line.strip())
            if "Sampling process" in line:
                break
        self.ready.set()  # sampling -- or py-spy ended (an error, the process went away)

    def error(self) -> str:
        """What went wrong, in py-spy's words: its ``Error:`` line (not the backtrace
        that may follow), else its last line."""
        for line in self.lines:
            if line.startswith("Error:"):
                return line[len("Error:") :].strip()
        for line in reversed(self.lines):
            if line and not line.startswith("py-spy> You can use"):
                return line
        return f"py-spy exited with status {self.proc.returncode}"

    def errors(self) -> int:
        """Failed reads, from py-spy's last line: ``... Samples: N Errors: M``."""
        for line in reversed(self.lines):
            words = line.split()
            if "Errors:" in words:
                e = words[words.index("Errors:") + 1 :][:1]
                if e and e[0].isdigit():
                    return int(e[0])
        return 0

    def stop(self) -> None:
        """SIGINT (py-spy writes its output and exits) and wait; kill if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(5)
        if self.proc.stdout is not None:
            # what py-spy said after it started (a few lines; bounded all the same)
            self.lines.extend(self.proc.stdout.read(1 << 16).splitlines()[:200])
            self.proc.stdout.close()


class Profiler:
    """Profiles of the processes of a benchmark, section by section, added up by role.

    ``with profiler.section({"kernel": pid, "vda": pid}): ...`` records those processes
    while the block runs; :meth:`finish` writes the files and returns DIR."""

    def __init__(self, exe: str, directory: str, rate: int = DEFAULT_RATE) -> None:
        self.exe = exe
        self.directory = directory
        self.rate = rate
        self.stacks: dict[str, Counter[str]] = {}
        #: per role: stacks py-spy failed to read (the process changed under it)
        self.errors: Counter[str] = Counter()
        self.running: list[_Recorder] = []
        self.sections = 0

    def start(self, pids: dict[str, int]) -> None:
        """Start one py-spy per (role, pid) and wait until each samples. A py-spy that
        cannot attach stops the others and raises :class:`CliError`."""
        self.sections += 1
        for role, pid in pids.items():
            if pid <= 0:
                continue
            out = os.path.join(self.directory, f".{role}.{self.sections}.raw")
            self.stacks.setdefault(role, Counter())
            self.running.append(_Recorder(self.exe, role, pid, out, self.rate))
        for r in self.running:
            if not r.ready.wait(_ATTACH_TIMEOUT) or r.proc.poll() is not None:
                r.proc.poll()
                why = r.error() if r.ready.is_set() else "py-spy did not start sampling"
                self.stop()
                msg = f"--profile: cannot profile {r.role} (pid {r.pid}): {why}"
                if any(w in why.lower() for w in ("permission", "not permitted", "ptrace")):
                    msg += "; profiling needs ptrace (root, CAP_SYS_PTRACE or ptrace_scope 0)"
                raise CliError(msg)

    def stop(self) -> None:
        """Stop the running py-spys and add their samples to their roles."""
        running, self.running = self.running, []
        for r in running:
            r.stop()
        for r in running:
            try:
                with open(r.out) as f:
                    lines = [line for _, line in zip(range(_MAX_LINES), f, strict=False)]
            except OSError:
                lines = []  # no samples: py-spy writes no file
            self.stacks[r.role].update(parse_folded(lines))
            self.errors[r.role] += r.errors()
            try:
                os.unlink(r.out)
            except OSError:
                pass

    def section(self, pids: dict[str, int]) -> _Section:
        """A context manager: :meth:`start` on entry, :meth:`stop` on exit."""
        return _Section(self, pids)

    def finish(self) -> str:
        """Write ``<role>.folded.txt``, ``<role>.speedscope.json`` and ``summary.txt``;
        returns the directory."""
        self.stop()
        out = [
            "vlab bench --profile: own time per process (innermost frame of each sample;",
            f"py-spy, {self.rate} samples/s per process, idle threads not sampled)",
        ]
        for role, stacks in self.stacks.items():
            base = os.path.join(self.directory, role)
            try:
                with open(base + ".folded.txt", "w") as f:
                    for stack, count in sorted(stacks.items()):
                        f.write(f"{stack} {count}\n")
                with open(base + ".speedscope.json", "w") as f:
                    json.dump(_speedscope(role, stacks), f)
            except OSError as e:
                raise CliError(f"--profile: cannot write {base}: {e.strerror}") from None
            total = sum(stacks.values())
            out.append("")
            out.append(f"== {role}: {total} samples")
            out.append(f"  (and {self.errors[role]} stacks py-spy could not read)")
            for name, count in top_functions(stacks):
                out.append(f"  {100 * count / max(1, total):5.1f}%  {count:6d}  {name}")
        path = os.path.join(self.directory, "summary.txt")
        try:
            with open(path, "w") as f:
                f.write("\n".join(out) + "\n")
        except OSError as e:
            raise CliError(f"--profile: cannot write {path}: {e.strerror}") from None
        return self.directory

    def report_line(self) -> str:
        """The one line a benchmark prints last: where the profiles are."""
        roles = ", ".join(self.stacks) or "none"
        return (
            f"profile ({roles}): {self.directory}/summary.txt, "
            "<role>.speedscope.json and <role>.folded.txt"
        )


class _Section:
    """What :meth:`Profiler.section` returns."""

    def __init__(self, profiler: Profiler, pids: dict[str, int]) -> None:
        self.profiler = profiler
        self.pids = pids

    def __enter__(self) -> Profiler:
        self.profiler.start(self.pids)
        return self.profiler

    def __exit__(self, *exc: object) -> None:
        self.profiler.stop()
