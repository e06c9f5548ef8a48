"""The process recipes every part of the engine shares: fork a child that never returns, tie it to its
parent, hold on to a process by its pidfd, kill and reap, keep a child's descriptors from meaning anything.

Each is written once here because each has a subtle failure mode when written
again: a child that returns into pytest's stack runs its ``finally`` blocks and
``atexit`` handlers a second time; ``PR_SET_PDEATHSIG`` armed after the parent
already died never fires; a SIGTERM to a PID 1 is ignored; a PID kept in a
variable may name another process once the first one is reaped, so every
signal goes through a pidfd.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Callable, Iterable

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
    never be told, so the parent's PID is checked after arming it.  A test can
    clear its own PDEATHSIG: what runs test code is also held by the keeper
    (keeper.py), which it cannot reach.
    """
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    pid, ppid = stat_pids()
    if ppid != expected_ppid:
        os._exit(EXIT_SETUP_FAILED)
    return pid


class Handle:
    """A process we started (or that a process we started handed us), held by its pidfd.

    A pidfd names one process for as long as it is open, so a signal sent
    through it can never reach a stranger that inherited a recycled PID.
    """

    __slots__ = ("pid", "pidfd")

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self.pidfd = pidfd

    @classmethod
    def of_child(cls, pid: int) -> Handle:
        """Our own child, not yet reaped, so the PID cannot have been recycled yet."""
        return cls(pid, os.pidfd_open(pid))

    def signal(self, sig: int) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, sig)

    def kill(self) -> None:
        """SIGKILL: a PID 1 ignores every signal it has no handler for, and its death ends its namespace."""
        self.signal(signal.SIGKILL)

    def exited(self, timeout: float = 0.0) -> bool:
        """Whether it has exited (as a PID 1: with every process of its namespace), waiting up to ``timeout``."""
        if self.pidfd < 0:
            return True
        return bool(select.select([self.pidfd], [], [], timeout)[0])

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def join_group(child: int, group: int) -> None:
    """Move our (not yet exec'd) child into ``group``, made by :func:`~._syscalls.group_leader`, and reap its leader.

    The container's processes then have a process group of their own, which
    no other process of ours is in, whose ID is no PID of the container's
    namespace.  A child that already died cannot be moved: nothing to do.
    """
    try:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.setpgid(child, group)
    finally:
        os.waitpid(group, 0)


def kill_and_reap(pid: int) -> int | None:
    """SIGKILL our (unreaped) child and wait for it; its ``waitstatus_to_exitcode``, or None if it was not ours."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)  # our own unreaped child: its PID cannot have been recycled
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)


def describe_status(status: int | None, subject: str = "container") -> str:
    """``os.waitstatus_to_exitcode`` in words: negative is the killing signal."""
    if status is None:
        return f"{subject} ended without a status"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "unknown signal"
        return f"{subject} exited with signal {-status} ({name})"
    return f"{subject} exited with status {status}"


def write_once(path: str, text: str, dir_fd: int | None = None) -> None:
    """One ``write(2)``: the kernel takes an ID map, a ``setgroups`` or a cgroup knob only in a single write."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    except OSError as exc:  # name the file: the caller may tell uid_map from setgroups by it
        raise OSError(exc.errno, exc.strerror, path) from None
    finally:
        os.close(fd)


def open_fds() -> list[int]:
    """Every descriptor this process has open (read through ``/proc``, which must be mounted)."""
    return [int(name) for name in os.listdir("/proc/self/fd")]


def hold_fds(keep: Iterable[int], opened: Iterable[int], null: int = -1) -> None:
    """Point every fd in ``opened`` that is not in ``keep`` at ``/dev/null``.

    The caller's Python objects may still hold those numbers (a module-level
    ``open(os.devnull)``, a fixture's socket): closing them would let the next
    ``pipe()`` or ``open()`` reuse the number, and a write through the stale
    object would land in whatever took it, our report pipe included.  Held by
    ``/dev/null`` the number stays taken, the original file or socket is
    released, and a stale write goes nowhere.  Not close-on-exec: the body runs
    in this very process.  ``null``: ``/dev/null`` opened earlier, for a caller
    whose root may change under it; it is closed here.
    """
    kept = set(keep)
    doomed = [fd for fd in opened if fd not in kept and fd != null]
    if null < 0:
        if not doomed:
            return
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in doomed:
            if fd != null:
                os.dup2(null, fd, inheritable=True)
    finally:
        if null not in doomed:
            os.close(null)
        else:  # the number was one to hold: it now is /dev/null, as wanted, just close-on-exec
            os.set_inheritable(null, True)
