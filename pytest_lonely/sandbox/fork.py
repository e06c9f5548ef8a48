"""Where a container is forked: the one recipe that pytest and the zygote both use.

:func:`start` forks a container that builds its root and then waits for its
work; :func:`establish` completes what only the forking side can do before
the container may be handed a test:

* root mode: the container's PID 1 enters a user namespace of its own (one per
  container, so that no two containers share a user keyring), and only host
  root outside it may write its identity ID maps: PID 1 asks over the launch
  channel, the forker writes them;
* rootless: PID 1 is the child of a middle process that made the user
  namespace; the middle, which runs no test code, hands the forker a pidfd
  of PID 1 over the launch channel, which PID 1 holds only until its root
  is built (to send its layers), never once test code runs.

Either way the forker ends up holding PID 1 by a pidfd it got from the
kernel or from a process of ours, never from anything a container said.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import gc
import os
import select
import signal
import socket
from typing import Any, Final

from . import _syscalls as sc
from . import init, namespaces, process
from .spec import ContainerSpec, Factory

_F_SETPIPE_SZ: Final = 1031
#: The report pipe's buffer: a container rarely waits for the parent to read.
PIPE_SIZE: Final = 1 << 20
#: Seconds a container may take to build its root before its forker gives up on it.
BUILD_TIMEOUT: Final = 30.0


@dataclasses.dataclass
class Started:
    """A container just forked, as the process that forked it holds it."""

    #: The process forked: PID 1 in root mode, the middle process rootless.
    child: int
    #: PID 1, once known: at once in root mode, from the middle rootless (None if it died first).
    pid1: process.Handle | None
    #: The process group of the container's processes (no PID of its namespace; see ``group_leader``).
    group: int
    #: Our ends: the GO pipe to write its work to, the report pipe to read its frames from.
    go_fd: int
    read_fd: int
    #: Its own stdout, stderr and diagnostics files (memfds); ours are copies of the same files.
    outputs: tuple[int, int, int]
    ctl: socket.socket | None
    #: Its copy-on-write layers (see ``init.LAYERS``), once it sent them.
    layers: tuple[int, ...] = ()

    def fds(self) -> list[int]:
        """Everything of ours to hand on (to pytest, from the zygote): GO, reports, outputs, PID 1's pidfd."""
        pidfd = [self.pid1.pidfd] if self.pid1 is not None else []
        return [self.go_fd, self.read_fd, *self.outputs, *pidfd, *self.layers]

    def close(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        for fd in (self.go_fd, self.read_fd, *self.outputs, *self.layers):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.layers = ()
        if self.pid1 is not None:
            self.pid1.close()


def start(
    spec: ContainerSpec,
    factory: Factory,
    *,
    own_pidns: int,
    cgroup_fds: tuple[int, ...] = (),
    sigint: Any = None,
    thaw: bool = True,
) -> Started:
    """Fork a container built from ``spec``; it waits for GO, whose order ``factory`` turns into its body.

    ``own_pidns`` is an fd of the caller's own PID namespace (root mode): the
    caller unshares a PID namespace for its next child, forks, and switches
    back, one fork instead of two.  ``thaw``: unfreeze the collector after
    the fork (the caller froze nothing itself; it knows, asking costs a walk of
    every frozen object).
    """
    go_read, go_write = os.pipe2(os.O_CLOEXEC)
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
    outputs = (
        os.memfd_create("lonely-stdout", os.MFD_CLOEXEC),
        os.memfd_create("lonely-stderr", os.MFD_CLOEXEC),
        os.memfd_create("lonely-diag", os.MFD_CLOEXEC),
    )
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    launch = init.Launch(
        spec=spec,
        factory=factory,
        uid=os.getuid(),
        gid=os.getgid(),
        parent_pid=os.getpid(),
        write_fd=write_fd,
        go_fd=go_read,
        ctl_fd=theirs.fileno(),
        outputs=outputs,
        cgroup_fds=cgroup_fds,
        sigint=sigint if sigint is not None else signal.getsignal(signal.SIGINT),
    )
    # Rootless, the middle process makes the PID namespace and PID 1's process group.
    split = not spec.rootless
    group = sc.group_leader() if split else 0
    # Frozen objects stay out of the child's collector, which would otherwise write-fault pages all over the heap.
    gc.freeze()
    try:
        if split:
            sc.unshare(sc.CLONE_NEWPID)  # our next child is PID 1 of a new PID namespace
        try:
            pid = sc.fork()
        finally:
            if split and os.getpid() != 1:
                sc.setns(own_pidns, sc.CLONE_NEWPID)
        if pid == 0:  # pragma: no cover - runs in the container
            os.close(go_write)
            os.close(read_fd)
            ours.close()
            init.main(launch)
    finally:
        if thaw:
            gc.unfreeze()
        os.close(go_read)
        os.close(write_fd)
        theirs.close()
    if split:
        process.join_group(pid, group)
    pid1 = None if spec.rootless else process.Handle.of_child(pid)
    return Started(pid, pid1, group, go_write, read_fd, outputs, ours)


def establish(started: Started, spec: ContainerSpec, timeout: float = BUILD_TIMEOUT) -> str | None:
    """What only the forker can do before the container may run a test; then the launch channel is closed.

    The container sends its layers (PID 1, once its root is built), asks for
    its ID maps (root mode) or has the middle process hand over PID 1
    (rootless), in that order per sender.  Returns why the container cannot
    be used, if it cannot.  A container that fails while building says why on
    its report pipe and exits: the channel's EOF ends the wait, and the caller
    reads the reason from the pipe.
    """
    ctl = started.ctl
    if ctl is None:
        return None
    needed = {init.LAYERS}
    if spec.rootless:
        needed.add(b"p")
    elif not spec.privileged:
        needed.add(init.ASK_MAPS)
    try:
        while needed:
            message, fds = _receive(ctl, timeout)
            tag = message[:1]
            if not message:
                break
            if tag == init.LAYERS and init.LAYERS in needed:
                started.layers = tuple(fds)
            elif tag == b"p" and tag in needed and len(fds) == 1 and _pid_and_group(message)[0]:
                pid, group = _pid_and_group(message)
                started.pid1 = process.Handle(pid, fds[0])
                started.group = group
            elif tag == init.ASK_MAPS and tag in needed:
                for fd in fds:
                    os.close(fd)
                for name in ("uid_map", "gid_map"):
                    process.write_once(f"/proc/{started.child}/{name}", namespaces.IDENTITY_MAP)
                ctl.send(init.MAPPED)
            else:
                for fd in fds:
                    os.close(fd)
                return f"unexpected message from the container's launch: {message[:40]!r}"
            needed.discard(tag)
    except TimeoutError as exc:
        return str(exc)
    except OSError:
        pass  # it died while building: its report pipe says why
    finally:
        ctl.close()
        started.ctl = None
    return None


def _pid_and_group(message: bytes) -> tuple[int, int]:
    fields = message[1:].split()
    if len(fields) == 2 and all(f.isdigit() for f in fields):
        return int(fields[0]), int(fields[1])
    return 0, 0


def _receive(ctl: socket.socket, timeout: float) -> tuple[bytes, list[int]]:
    if not select.select([ctl], [], [], timeout)[0]:
        raise TimeoutError(f"the container did not finish building its root within {timeout:g} s")
    message, fds, _, _ = socket.recv_fds(ctl, 64, 2)
    return message, fds
