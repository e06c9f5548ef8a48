"""The keeper: nothing a container starts outlives the pytest process that made it.

A container's PID 1 runs test code, and test code can undo any promise made
inside it: it can clear its ``PR_SET_PDEATHSIG``, ``setsid()``, ignore
signals.  What it cannot undo is the rule that every process of a PID
namespace dies with that namespace's init, and it cannot reach a process
outside its namespace.  The keeper is such a process: before any container
is handed its test, whoever forked it (pytest, the zygote) sends the keeper
a pidfd of its PID 1, and when pytest is gone, however it went (a normal
exit, an INTERNALERROR, SIGKILL), the keeper SIGKILLs every PID 1 it still
holds, which takes each namespace down with everything in it.

The keeper is not pytest's child (it is double-forked), so a test that runs
in pytest's own process and waits for any child never sees it, and it sits
in a session of its own, so that a signal to pytest's process group leaves
it alive to clean up.  It learns of pytest's death from a pidfd of pytest,
not from ``PR_SET_PDEATHSIG``, which would only kill it.  It holds nothing
of pytest's open, and closes each pidfd as soon as that container has ended.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
from typing import Final

from . import process

#: How many pidfds one registration message may carry.
_MAX_FDS: Final = 8
_TAG: Final = b"k"


class KeeperError(Exception):
    """The keeper could not be started or reached: then no container may be handed a test."""


class Keeper:
    """pytest's handle on its keeper process."""

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self._sock = sock
        #: The keeper's PID, for tests and diagnostics only: the keeper is not our child.
        self.pid = pid

    @classmethod
    def start(cls) -> Keeper:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        owner = os.getpid()
        try:
            owner_fd = os.pidfd_open(owner)

            def middle() -> int:  # pragma: no cover - runs in the short-lived middle process
                os.setsid()
                keeper = process.spawn(lambda: _serve(theirs.fileno(), owner_fd))
                os.write(report_w, str(keeper).encode())
                return 0

            try:
                child = process.spawn(middle)
            finally:
                os.close(owner_fd)
                theirs.close()
                os.close(report_w)
            os.waitpid(child, 0)
            pid = int(os.read(report_r, 32) or b"0")
        finally:
            os.close(report_r)
        if not pid:
            ours.close()
            raise KeeperError("the keeper process could not be started")
        return cls(ours, pid)

    def fileno(self) -> int:
        """The socket a zygote keeps, to register the containers it forks itself."""
        return self._sock.fileno()

    def register(self, pidfd: int) -> None:
        """Hand the keeper a pidfd of a container's PID 1; done before the container is handed any test."""
        try:
            socket.send_fds(self._sock, [_TAG], [pidfd])
        except OSError as exc:
            raise KeeperError(f"cannot reach the keeper: {exc}") from None

    def close(self) -> None:
        """EOF: the keeper kills whatever it still holds (nothing, after a clean session) and exits."""
        with contextlib.suppress(OSError):
            self._sock.close()


def _serve(ctl: int, owner_fd: int) -> int:  # pragma: no cover - runs in the keeper
    """Hold pidfds until the owner is gone or closes the socket, then SIGKILL them all."""
    gc.freeze()  # a collection here would walk, and so copy, every page of the pytest it was forked from
    # Nothing of pytest's open here: its sockets, pipes and locks must close when pytest closes them.
    process.hold_fds({ctl, owner_fd}, process.open_fds())
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_IGN)  # only pytest's end, or a SIGKILL meant for us, ends the keeper
    held: dict[int, None] = {}
    poller = select.epoll()
    poller.register(ctl, select.EPOLLIN)
    poller.register(owner_fd, select.EPOLLIN)
    sock = socket.socket(fileno=ctl)
    try:
        while True:
            for fd, _ in poller.poll():
                if fd == owner_fd:
                    _drain(sock, held, poller)
                    return 0
                if fd == ctl:
                    if not _receive(sock, held, poller):
                        _drain(sock, held, poller)
                        return 0
                else:  # a container ended: forget it
                    poller.unregister(fd)
                    os.close(fd)
                    held.pop(fd, None)
    finally:
        for fd in held:
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)


def _receive(sock: socket.socket, held: dict[int, None], poller: select.epoll) -> bool:  # pragma: no cover
    try:
        message, fds, _, _ = socket.recv_fds(sock, 16, _MAX_FDS, socket.MSG_DONTWAIT)
    except BlockingIOError:
        return True
    except OSError:
        return False
    for fd in fds:
        held[fd] = None
        poller.register(fd, select.EPOLLIN)
    return bool(message)


def _drain(sock: socket.socket, held: dict[int, None], poller: select.epoll) -> None:  # pragma: no cover
    """Take every registration still queued: a container registered just before pytest died must go too."""
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, 16, _MAX_FDS, socket.MSG_DONTWAIT)
        except OSError:
            return
        for fd in fds:
            held[fd] = None
        if not message and not fds:
            return
