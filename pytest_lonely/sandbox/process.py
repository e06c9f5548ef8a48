"""The process recipes every part of the engine shares: fork a child that never returns, tie it to its
parent, kill and reap.

Each is written once here because each has a subtle failure mode when written
again: a child that returns into pytest's stack runs its ``finally`` blocks and
``atexit`` handlers a second time; ``PR_SET_PDEATHSIG`` armed after the parent
already died never fires; a SIGTERM to a PID 1 is ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable

from . import _syscalls as sc

#: Exit status of a child whose setup failed after it told the parent why.
EXIT_SETUP_FAILED = 70
#: Exit status of a child that hit a bug in the engine.
EXIT_INTERNAL = 71


def spawn(child: Callable[[], int]) -> int:
    """Fork; the child runs ``child`` and always ends in ``os._exit`` with its result.

    Whatever ``child`` raises, the child process never returns into the
    caller's stack: it exits with :data:`EXIT_INTERNAL`.
    """
    pid = sc.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        status = EXIT_INTERNAL
        try:
            status = child()
        finally:
            os._exit(status)
    return pid


def stat_pids() -> tuple[int, int]:
    """(pid, ppid) as the host sees them, while /proc is still the host's."""
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(data.split(b" ", 1)[0]), int(fields[1])


def guard_parent(expected_ppid: int) -> int:
    """Die with the parent (SIGKILL); returns our PID as the host sees it.

    PDEATHSIG is armed only from here on: if the parent died before, we would
    never be told, so the parent's PID is checked after arming it.
    """
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    pid, ppid = stat_pids()
    if ppid != expected_ppid:
        os._exit(EXIT_SETUP_FAILED)
    return pid


def kill(*pids: int) -> None:
    """SIGKILL each PID that is non-zero: a PID 1 ignores every signal it has no handler for."""
    for pid in set(pids) - {0}:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def kill_and_reap(pid: int) -> int | None:
    """SIGKILL our child and wait for it; its ``waitstatus_to_exitcode``, or None if it was not ours."""
    kill(pid)
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)
