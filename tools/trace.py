"""``vlab trace``: run a program with virtqueue tracing on, or turn a trace into text.

Theory of operation
-------------------
``vlab trace [-o FILE] [--format text|jsonl] -- python my_program.py`` starts the
program with ``VLAB_TRACE`` naming a JSON Lines file, so an unmodified program that
boots a kernel is traced (``kernel.boot`` reads the variable; the device processes it
starts inherit it). With ``--format jsonl`` and ``-o FILE`` the program writes FILE
directly; otherwise the events go to a temporary file that a :class:`LiveTail` follows
while the program runs and renders (text, one aligned line per event, or the JSON lines
themselves) to ``-o FILE`` or stdout. The exit status is the program's (128 + signal
number when it was killed); a killed program still leaves whole lines only.

``vlab trace --input TRACE.jsonl [-o FILE]`` converts an existing trace to text. A bad
line (not JSON, a header key missing, a truncated last line) ends it with one line on
stderr naming the file and the line number.

``vlab trace convert IN -o OUT --format text|jsonl|perfetto|pcapng``, ``vlab trace
stats IN`` and ``vlab trace ring IN --queue vda:0 [--at N] [--html PATH] [--follow]``
load the whole trace (:func:`load_trace`, the same one-line errors), sort it by time
and hand it to :mod:`vdev.virtio.trace_formats`. ``--format perfetto|pcapng`` with a
program (``vlab trace -o OUT --format pcapng -- PROGRAM``) records JSONL to a temporary
file while the program runs and converts it when it ends. ``ring --follow`` re-reads
the file every :data:`FOLLOW_S` seconds and redraws when it grew.

:class:`LiveTail` reads the file's new whole lines every :data:`POLL_S` seconds on a
helper thread and keeps a reorder window (:data:`WINDOW_NS`): processes flush in
batches, so an event is printed once nothing older can still arrive, in time order.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import IO, Any

from hostops.poll import FdSource, Poller
from hostops.process import describe_returncode
from hostops.sync import Event, Lock, start_thread
from hostops.trace import TRACE_ENV
from tools.errors import CliError
from vdev.virtio.trace import TraceFormatError, decode_line, encode, format_text
from vdev.virtio.trace_formats import (
    RingState,
    format_stats,
    perfetto_json,
    queue_stats,
    render_ring,
    ring_html,
    ring_steps,
    sort_events,
    to_pcapng,
)

__all__ = [
    "live_trace",
    "LiveTail",
    "main",
    "run_trace",
    "convert",
    "load_trace",
    "render",
    "convert_main",
    "stats_main",
    "ring_main",
    "FORMATS",
    "POLL_S",
    "FOLLOW_S",
    "WINDOW_NS",
    "MAX_LINE",
]

#: The output formats of ``vlab trace`` and ``vlab trace convert``.
FORMATS = ("text", "jsonl", "perfetto", "pcapng")
#: How often ``vlab trace ring --follow`` looks at the file.
FOLLOW_S = 0.5

#: How often a LiveTail looks for new lines.
POLL_S = 0.05
#: Events are held this long (by their own timestamps) so batches from several
#: processes come out in time order.
WINDOW_NS = 300_000_000
#: A longer line is not a trace event (bounds what one read may hold in memory).
MAX_LINE = 1 << 20


@contextmanager
def live_trace(trace_path: str | None, file: IO[str] | None = None) -> Iterator[None]:
    """While the block runs, print every event of the trace file ``trace_path`` as a
    ``trace <line>`` line on ``file`` (default: stdout), then what is left and the
    number of events. The file is created (0600) first; None: nothing is traced."""
    if trace_path is None:
        yield
        return
    out = file if file is not None else sys.stdout
    os.close(os.open(trace_path, os.O_WRONLY | os.O_CREAT, 0o600))
    tail = LiveTail(trace_path, lambda line: print(f"trace {line}", file=out, flush=True))
    tail.start()
    try:
        yield
    finally:
        tail.stop()  # the devices have exited: everything is in the file
        print(f"trace: {tail.events} events", file=out, flush=True)


class LiveTail:
    """Follow trace file ``path`` and hand every event, rendered, to ``out`` (one line
    per call): ``fmt`` "text" (aligned, decoded payloads) or "jsonl" (the lines as
    they are). :meth:`start` begins following on a helper thread, :meth:`stop` reads
    what is left and prints everything still held. Bad lines are counted
    (:attr:`bad_lines`) and skipped while following live."""

    def __init__(self, path: str, out: Callable[[str], None], fmt: str = "text") -> None:
        self.path = path
        self.out = out
        self.fmt = fmt
        self.events = 0
        self.bad_lines = 0
        self._pos = 0
        self._partial = b""
        self._held: list[tuple[int, int, dict[str, Any] | None, str]] = []
        self._order = 0
        self._t0: int | None = None
        self._printed_any = False
        self._max_ts = 0
        self._stop = Event()
        self._lock = Lock()
        self._thread: Any = None

    def start(self) -> None:
        """Follow the file on a helper thread until :meth:`stop`."""
        self._thread = start_thread(self._loop, name="vlab-trace-tail")

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll(final=False)

    def stop(self) -> None:
        """Stop following, read the rest and print every held event."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        self.poll(final=True)

    def poll(self, *, final: bool) -> None:
        """Read the new whole lines and print the events the window lets go (all of
        them when ``final``)."""
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            self._pos += len(data)
            data = self._partial + data
            lines = data.split(b"\n")
            self._partial = lines.pop()
            if len(self._partial) > MAX_LINE:
                self._partial = b""
                self.bad_lines += 1
            for raw in lines:
                self._take(raw + b"\n")
            if final and self._partial:
                self.bad_lines += 1  # a torn last line (the writer was killed mid-write)
                self._partial = b""
            self._release(final)

    def _take(self, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            ev = decode_line(raw)
        except TraceFormatError:
            self.bad_lines += 1
            return
        ts = ev["ts"]
        self._max_ts = max(self._max_ts, ts)
        self._order += 1
        self._held.append((ts, self._order, ev, raw.decode().rstrip("\n")))

    def _release(self, final: bool) -> None:
        if not self._held:
            return
        self._held.sort(key=lambda h: (h[0], h[1]))
        limit = self._max_ts - WINDOW_NS
        n = len(self._held) if final else sum(1 for h in self._held if h[0] <= limit)
        go, self._held = self._held[:n], self._held[n:]
        if go and not self._printed_any:
            self._t0 = go[0][0]  # times are counted from the first event printed
            self._printed_any = True
        for _, _, ev, line in go:
            self.events += 1
            if self.fmt == "jsonl" or ev is None:
                self.out(line)
            else:
                self.out(format_text(ev, self._t0 or 0))


def convert(path: str, out: IO[str]) -> int:
    """Write trace ``path`` as text to ``out``, in time order; returns the number of
    events. A bad line raises :class:`CliError` naming the file and the line."""
    events = load_trace(path)
    t0 = events[0]["ts"] if events else 0
    for ev in events:
        out.write(format_text(ev, t0) + "\n")
    return len(events)


def load_trace(path: str) -> list[dict[str, Any]]:
    """Every event of trace ``path`` in time order. A bad line, a missing or unreadable
    file raise :class:`CliError` naming the file (and the line)."""
    events: list[dict[str, Any]] = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                if len(raw) > MAX_LINE:
                    raise CliError(f"{path}: line {number}: longer than {MAX_LINE} bytes")
                if not raw.strip():
                    continue
                try:
                    events.append(decode_line(raw))
                except TraceFormatError as e:
                    raise CliError(f"{path}: line {number}: {e}") from None
    except FileNotFoundError:
        raise CliError(f"trace file not found: {path}") from None
    except IsADirectoryError:
        raise CliError(f"trace file is a directory: {path}") from None
    except PermissionError:
        raise CliError(f"no permission to read {path}") from None
    return sort_events(events)


def render(events: list[dict[str, Any]], fmt: str) -> bytes:
    """Time-ordered ``events`` in format ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "pcapng":
        return to_pcapng(events)
    if fmt == "perfetto":
        return perfetto_json(events).encode() + b"\n"
    if fmt == "jsonl":
        return "".join(encode(ev) for ev in events).encode()
    if fmt == "text":
        t0 = events[0]["ts"] if events else 0
        return "".join(format_text(ev, t0) + "\n" for ev in events).encode()
    raise CliError(f"trace: unknown format {fmt!r}", 2)


def _write_bytes(output: str | None, data: bytes) -> None:
    if output is None:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    try:
        with open(output, "wb") as f:
            f.write(data)
    except OSError as e:
        raise CliError(f"cannot write {output}: {e.strerror}") from None


def convert_main(input_path: str, output: str | None, fmt: str) -> int:
    """``vlab trace convert``: write trace ``input_path`` as ``fmt``."""
    if fmt == "pcapng" and output is None and sys.stdout.isatty():
        raise CliError("trace convert: pcapng is binary; give -o FILE", 2)
    _write_bytes(output, render(load_trace(input_path), fmt))
    return 0


def stats_main(input_path: str, as_json: bool = False) -> int:
    """``vlab trace stats``: per-queue numbers of trace ``input_path``."""
    stats = queue_stats(load_trace(input_path))
    if as_json:
        print(json.dumps(stats, indent=2))
    else:
        sys.stdout.write(format_stats(stats) or "no queue events in the trace\n")
    return 0


def _parse_queue(text: str) -> tuple[str, int]:
    dev, _, idx = text.rpartition(":")
    if not dev or not idx.isdigit():
        raise CliError(f"trace ring: --queue wants DEV:INDEX (e.g. vda:0), not {text!r}", 2)
    return dev, int(idx)


def _ring_text(steps: list[tuple[dict[str, Any], list[Any]]], queue: str, at: int | None) -> str:
    n = len(steps)
    k = n if at is None else at
    if not 1 <= k <= n:
        raise CliError(f"trace ring: --at {at}: {queue} has events 1..{n}", 2)
    state = RingState()
    for _, ops in steps[:k]:
        state.apply(ops)
    t0 = steps[0][0]["ts"]
    title = f"{queue} after event {k}/{n}: {format_text(steps[k - 1][0], t0).strip()}"
    return render_ring(state, title)


def ring_main(input_path: str, queue: str, at: int | None, html: str | None, follow: bool) -> int:
    """``vlab trace ring``: queue ``queue``'s rings at its ``at``-th event as text, or
    an HTML page with a slider (``html``), or redrawn as the file grows (``follow``)."""
    dev, q = _parse_queue(queue)

    def steps_now() -> list[tuple[dict[str, Any], list[Any]]]:
        steps = ring_steps(load_trace(input_path), dev, q)
        if not steps:
            raise CliError(f"trace ring: no events of queue {queue} in {input_path}")
        return steps

    if html is not None:
        if follow:
            raise CliError("trace ring: --html writes one page; do not also --follow", 2)
        _write_bytes(html, ring_html(steps_now(), queue).encode())
        return 0
    if not follow:
        sys.stdout.write(_ring_text(steps_now(), queue, at))
        return 0
    stop = Event()
    size = -1
    try:
        while True:
            try:
                now = os.stat(input_path).st_size
            except FileNotFoundError:
                now = 0
            if now != size:
                size = now
                try:
                    text = _ring_text(steps_now(), queue, None)
                except CliError as e:
                    text = f"({e})\n"
                sys.stdout.write("\x1b[2J\x1b[H" + text if sys.stdout.isatty() else text)
                sys.stdout.flush()
            stop.wait(FOLLOW_S)
    except KeyboardInterrupt:
        return 0


def _open_output(output: str | None) -> tuple[IO[str], bool]:
    if output is None:
        return sys.stdout, False
    try:
        return open(output, "w", encoding="utf-8", buffering=1), True
    except OSError as e:
        raise CliError(f"cannot write {output}: {e.strerror}") from None


def _spawn(program: Sequence[str], env: dict[str, str]) -> int:
    try:
        return os.posix_spawnp(program[0], list(program), env)
    except FileNotFoundError:
        raise CliError(f"program not found: {program[0]}", 127) from None
    except PermissionError:
        raise CliError(f"cannot execute {program[0]}: permission denied", 126) from None
    except OSError as e:
        raise CliError(f"cannot start {program[0]}: {e.strerror}") from None


def _wait(pid: int) -> int:
    """Wait for ``pid`` (Ctrl-C reaches it too: same process group); its exit status
    as a shell reports it."""
    pidfd = os.pidfd_open(pid)
    poller = Poller()
    src = FdSource(pidfd)
    poller.register(src)
    try:
        while True:
            try:
                poller.poll(None)
                _, status = os.waitpid(pid, os.WNOHANG)
            except KeyboardInterrupt:
                continue  # the program got the ^C as well; wait for it to end
            except ChildProcessError:
                return 1
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                return os.waitstatus_to_exitcode(status)
    finally:
        poller.unregister(src)
        os.close(pidfd)


def run_trace(program: Sequence[str], output: str | None = None, fmt: str = "text") -> int:
    """Run ``program`` traced; render the trace as ``fmt`` to ``output`` (default
    stdout). Returns the program's exit status (128 + N when killed by signal N)."""
    words = list(program)
    if words and words[0] == "--":
        words.pop(0)
    if not words:
        raise CliError("trace: give the program to run after '--' (or --input FILE)", 2)
    if fmt not in FORMATS:
        raise CliError(f"trace: unknown format {fmt!r}", 2)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="vlab-trace-") as tmp:
        if fmt in ("perfetto", "pcapng"):
            if fmt == "pcapng" and output is None and sys.stdout.isatty():
                raise CliError("trace: pcapng is binary; give -o FILE", 2)
            path = os.path.join(tmp, "trace.jsonl")
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            env[TRACE_ENV] = path
            code = _wait(_spawn(words, env))
            _report_end(words, code)
            _write_bytes(output, render(load_trace(path), fmt))
            return _shell_status(code)
        if fmt == "jsonl" and output is not None:
            try:
                fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            except OSError as e:
                raise CliError(f"cannot write {output}: {e.strerror}") from None
            os.close(fd)
            env[TRACE_ENV] = os.path.abspath(output)
            code = _wait(_spawn(words, env))
            _report_end(words, code)
            return _shell_status(code)
        path = os.path.join(tmp, "trace.jsonl")
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        env[TRACE_ENV] = path
        out, close = _open_output(output)

        def emit(line: str) -> None:
            out.write(line + "\n")

        tail = LiveTail(path, emit, fmt)
        tail.start()
        try:
            code = _wait(_spawn(words, env))
        finally:
            tail.stop()
            out.flush()
            if close:
                out.close()
        _report_end(words, code)
        return _shell_status(code)


def _shell_status(code: int) -> int:
    return 128 - code if code < 0 else code


def _report_end(words: list[str], code: int) -> None:
    if code < 0:
        print(f"vlab: trace: {words[0]}: {describe_returncode(code)}", file=sys.stderr)


def main(input_path: str | None, output: str | None, fmt: str, program: list[str]) -> int:
    """``vlab trace``: convert ``input_path`` to text, or run ``program`` traced."""
    words = list(program)
    if words and words[0] == "--":
        words.pop(0)
    if input_path is not None:
        if words:
            raise CliError("trace: --input converts a trace; do not also give a program", 2)
        if fmt != "text":
            return convert_main(input_path, output, fmt)
        out, close = _open_output(output)
        try:
            convert(input_path, out)
        finally:
            out.flush()
            if close:
                out.close()
        return 0
    return run_trace(words, output, fmt)
