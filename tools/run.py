"""``vlab run``: an unmodified Python program on a kernel of its own.

Theory of operation
-------------------
``vlab run [--net SPEC ...] [--blk SPEC ...] -- python [-u] (PROGRAM | -m MODULE | -c
CODE) ARGS...`` boots a kernel with the given devices *in this process*, installs
:mod:`kernel.hijack` (the program's AF_INET sockets, ``select`` and ``selectors`` go to
the kernel's stack) and runs the program the way ``python`` would -- ``runpy`` with
``sys.argv`` and ``sys.path[0]`` set as the interpreter sets them -- then uninstalls
and shuts the kernel down, whatever way the program ended.

A SPEC is the keyword arguments of ``kernel.Net`` / ``kernel.Blk`` as ``key=value,...``
(``--net backend=switch,switch=ipc:///tmp/sw,ip=10.0.0.2/24``; ``--blk
path=disk.img,readonly=true`` or ``--blk memory_size=64M``): values are converted to
the field's type (ints, sizes with K/M/G, booleans as true/false/yes/no/on/off/1/0,
``none`` for an optional field). An unknown key, a bad value or a spec the device class
refuses is one line and exit status 2.

Exit status: the program's (``sys.exit(n)``: n; an uncaught exception: 1, with the
program's traceback, as python prints it; SIGINT: 130 unless the program handles it;
SIGTERM: 143, the kernel's handler shuts the kernel down first).

When the program ends, its fds are closed as a process's are at exit (``k.sys.shutdown()``:
a socket with unread data is reset, any other sends its queued data and a FIN in the
background, as Linux keeps such orphans after a process exits); the kernel lives on
until every connection has delivered what it owed (none left but TIME-WAIT or
FIN-WAIT-2), at most :data:`LINGER_S` seconds, and then shuts down (which resets
whatever is still left).
"""

from __future__ import annotations

import dataclasses
import os
import runpy
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

from tools.errors import CliError
from vdev.virtio.units import parse_size

__all__ = ["parse_spec", "parse_command", "run", "Command", "LINGER_S"]

#: How long the kernel outlives the program for closed connections to finish.
LINGER_S = 10.0
#: TCP states of a closed connection that owes its peer nothing more.
_SETTLED = frozenset({"TIME-WAIT", "FIN-WAIT-2", "CLOSED"})
_LINGER_POLL_S = 0.02

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert(opt: str, key: str, annotation: str, text: str) -> Any:
    ann = annotation.replace(" ", "")
    optional = "None" in ann.split("|")
    if optional and text.lower() == "none":
        return None
    if "bool" in ann.split("|"):
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise CliError(f"{opt}: {key}={text!r} is not a boolean (true/false)", 2)
    if "int" in ann.split("|"):
        try:
            return parse_size(text) if key.endswith("size") else int(text, 0)
        except ValueError:
            raise CliError(f"{opt}: {key}={text!r} is not an integer", 2) from None
    return text


def parse_spec(opt: str, cls: type, text: str) -> Any:
    """``key=value,...`` -> ``cls(**kwargs)`` (``opt`` names the option in errors);
    CliError status 2 on an unknown key, a bad value or a refused spec."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise CliError(f"{opt}: {item!r} is not key=value", 2)
        f = fields.get(key)
        if f is None:
            raise CliError(f"{opt}: unknown key {key!r} (keys: {', '.join(fields)})", 2)
        if key in kwargs:
            raise CliError(f"{opt}: {key} given twice", 2)
        kwargs[key] = _convert(opt, key, str(f.type), value)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise CliError(f"{opt}: {e}", 2) from None


@dataclasses.dataclass(frozen=True)
class Command:
    """What to run: ``kind`` is ``"path"``, ``"module"`` or ``"code"``; ``target`` the
    script, module name or code; ``argv`` what ``sys.argv`` becomes."""

    kind: str
    target: str
    argv: list[str]
    unbuffered: bool = False


def parse_command(words: Sequence[str]) -> Command:
    """``python [-u] (PROGRAM | -m MODULE | -c CODE) ARGS...`` (CliError 2 otherwise)."""
    if not words:
        raise CliError("run: give the program after '--': python PROGRAM ARGS...", 2)
    exe = os.path.basename(words[0])
    if not exe.startswith("python"):
        raise CliError(f"run: only Python programs run on the kernel, not {words[0]!r}", 2)
    rest = list(words[1:])
    unbuffered = False
    while rest and rest[0] == "-u":
        unbuffered = True
        rest.pop(0)
    if not rest:
        raise CliError("run: python needs a PROGRAM, -m MODULE or -c CODE", 2)
    head = rest[0]
    if head in ("-m", "-c"):
        if len(rest) < 2:
            raise CliError(f"run: python {head} needs an argument", 2)
        if head == "-m":
            return Command("module", rest[1], [rest[1], *rest[2:]], unbuffered)
        return Command("code", rest[1], ["-c", *rest[2:]], unbuffered)
    if head.startswith("-"):
        raise CliError(f"run: python option {head!r} is not supported (-u, -m, -c are)", 2)
    if not os.path.isfile(head):
        raise CliError(f"run: no such program: {head}", 2)
    return Command("path", head, rest, unbuffered)


def _exit_status(e: SystemExit) -> int:
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _execute(cmd: Command) -> int:
    saved_argv, saved_path0 = list(sys.argv), (sys.path[0] if sys.path else None)
    sys.argv = list(cmd.argv)
    if cmd.kind == "path":
        first = os.path.dirname(os.path.abspath(cmd.target))
    else:
        first = os.getcwd()
    if sys.path:
        sys.path[0] = first
    else:
        sys.path.append(first)
    try:
        if cmd.kind == "module":
            runpy.run_module(cmd.target, run_name="__main__", alter_sys=True)
        elif cmd.kind == "path":
            runpy.run_path(cmd.target, run_name="__main__")
        else:
            exec(compile(cmd.target, "<string>", "exec"), {"__name__": "__main__"})
        return 0
    except SystemExit as e:
        return _exit_status(e)
    except KeyboardInterrupt:
        return 130
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.argv = saved_argv
        if saved_path0 is not None and sys.path:
            sys.path[0] = saved_path0


def _linger(k: Any, limit_s: float) -> None:
    """Close every fd of ``k`` (as at process exit), then wait (at most ``limit_s``)
    until no TCP connection still owes its peer data or a FIN."""
    k.sys.shutdown()
    tcp = getattr(getattr(k, "net", None), "tcp", None)
    if tcp is None:
        return
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:  # bounded by the deadline
        if all(state in _SETTLED for state, _, _ in tcp.connections()):
            return
        time.sleep(_LINGER_POLL_S)  # the stack has no "connection finished" event


def run(net: Sequence[str], blk: Sequence[str], command: Sequence[str]) -> int:
    """Boot a kernel with ``net``/``blk`` specs, run ``command`` on it, return the
    program's exit status (see the module doc)."""
    import kernel
    from kernel import hijack

    specs = [parse_spec("--net", kernel.Net, s) for s in net]
    specs += [parse_spec("--blk", kernel.Blk, s) for s in blk]
    cmd = parse_command(command)
    if cmd.unbuffered:
        for stream in (sys.stdout, sys.stderr):
            reconfigure = getattr(stream, "reconfigure", None)
            if reconfigure is not None:
                reconfigure(line_buffering=True, write_through=True)
    k = kernel.boot(devices=specs)
    try:
        with hijack.hijacked(k):
            status = _execute(cmd)
        _linger(k, LINGER_S)
    finally:
        k.shutdown()
    sys.stdout.flush()
    return status
