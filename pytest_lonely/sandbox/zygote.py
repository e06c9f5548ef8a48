"""Containers forked ahead of time from a snapshot of the caller (a zygote).

Forking pytest for every test costs twice in copy-on-write faults: the
container copies each page it writes, and so does pytest itself for each
page it writes after the fork, test after test.  Measured on a 2-core VM,
that is 3 to 4 µs per page and some 1,900 pages per test, more than half of
the whole cost.  A zygote is forked from the caller once, at a point the
caller names with a key (for pytest: the same broader fixtures, the same
place in the setup stack), and forks the containers from then on:

* the caller is forked once per key instead of once per test, so its own
  pages are copied once, not once per test;
* the zygote forks the *next* container while the current one runs, on the
  other core, and that container builds its root, mounts its ``/proc`` and
  locks its mounts before it is handed its work;
* the container is given its work (``GO``: hostname, environment, timeout,
  and an order the caller's factory turns into the body) only when the caller
  is ready for it, so tests still run one after the other, in order.

The zygote holds nothing of the caller's open but what containers need: a
socket, pipe or lock that a fixture closes in the caller must really close.
It takes orders only from the caller, over a socket no container keeps.
When the caller's key changes, the zygote is stopped and its waiting
container with it (``PR_SET_PDEATHSIG``); a new one is forked on demand.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import gc
import marshal
import os
import select
import signal
import socket
from collections.abc import Callable, Hashable
from typing import Any, Final

from . import _syscalls as sc
from . import init, prefault, process, rootfs
from .spec import Body, ContainerSpec

#: Seconds the caller waits for the zygote to hand over a container before it forks one itself.
_WAIT: Final = 10.0
_MAX_MESSAGE: Final = 1 << 20
#: Exit codes kept for containers nobody asked about yet: the caller asks right after one ends.
_KEEP_EXITS: Final = 256
_F_SETPIPE_SZ: Final = 1031
_PIPE_SIZE: Final = 1 << 20
#: Containers kept built ahead of time: the next test's (more measured no faster on 2 cores).
DEPTH: Final = 1
#: How much nicer than the caller the zygote and the containers it builds ahead of time run.
BACKGROUND_NICE: Final = 10

#: What a container must know before it is built: (rootless, network, plan key fields, plan, cwd, keep_fds,
#: privileged).
Shape = tuple[bool, bool, tuple[Any, ...], rootfs.Plan, str, tuple[int, ...], bool]
#: Turns the caller's order into the body, inside the container (the zygote's copy of the caller).
Factory = Callable[[Any], Body]


@dataclasses.dataclass(frozen=True)
class Warm:
    """How the caller lets a container come from a zygote.

    ``key`` names everything in the caller's memory that ``factory`` depends
    on: a container is taken from the zygote only while the key is the same
    as when the zygote was forked.  ``order`` is plain (marshal-able) data.
    """

    key: Hashable
    order: Any
    factory: Factory


def eligible(spec: ContainerSpec) -> bool:
    """``--lonely-usage`` and rootless limits take the direct path: the container enters its cgroup first.

    Usage must count what the container copied while it waited; rootless,
    the process to move in (PID 1) is the child of one the caller knows.
    """
    return not spec.usage and not (spec.limits and spec.rootless)


def shape_of(spec: ContainerSpec) -> Shape:
    key = spec.plan_key
    return (
        spec.rootless,
        spec.network,
        (key.rootfs, key.rootless, key.network, key.writable),
        spec.plan,
        spec.cwd,
        spec.keep_fds,
        spec.privileged,
    )


def spec_from(shape: Shape) -> ContainerSpec:
    """The spec a zygote builds a container from: its tail comes with GO."""
    rootless, network, key, plan, cwd, keep_fds, privileged = shape
    return ContainerSpec(
        id="",
        hostname="",
        rootless=rootless,
        network=network,
        plan_key=rootfs.PlanKey(key[0], key[1], key[2], tuple(key[3])),
        plan=tuple(plan),
        timeout=0.0,
        cwd=cwd,
        keep_fds=tuple(keep_fds),
        privileged=privileged,
    )


class ZygoteError(Exception):
    """The zygote could not be reached; the caller forks containers itself from then on."""


class Zygote:
    """The caller's handle on one zygote process and the containers it keeps ready."""

    def __init__(self, key: Hashable, pid: int, sock: socket.socket, depth: int = DEPTH) -> None:
        self.key = key
        self.pid = pid
        self._sock = sock
        self._depth = depth
        #: Containers handed over but not taken yet: (shape, pid, its GO pipe, its report pipe), oldest first.
        self._ready: collections.deque[tuple[Shape, int, int, int]] = collections.deque()
        #: Shapes of forks asked for whose containers have not arrived yet; the zygote answers in order.
        self._asked: collections.deque[Shape] = collections.deque()
        #: Exit codes (``waitstatus_to_exitcode``) of containers the zygote reaped.
        self._exits: dict[int, int] = {}

    @classmethod
    def start(
        cls,
        key: Hashable,
        factory: Factory,
        diag_fd: int,
        userns_fd: int,
        keep: tuple[int, ...],
        *,
        prefault: bool = True,
    ) -> Zygote:
        """Fork the zygote from the caller as it is now; it lives until :meth:`stop` or the caller's death."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        parent = os.getpid()
        config = _Config(parent, factory, diag_fd, userns_fd, keep, os.getuid(), os.getgid(), prefault)
        frozen = gc.get_freeze_count() != 0
        gc.freeze()  # the zygote's collector must not write to the caller's pages
        try:
            pid = process.spawn(lambda: _serve(theirs.fileno(), config))
        finally:
            if not frozen:
                gc.unfreeze()
            theirs.close()
        return cls(key, pid, ours)

    def take(self, spec: ContainerSpec) -> tuple[int, int, int]:
        """A container built for ``spec``'s shape, asking for one if none is on its way.

        Returns its PID, the pipe to write its GO to (the caller closes it)
        and the pipe its frames come from.  Containers of another shape ahead
        of it are discarded.
        """
        shape = shape_of(spec)
        while True:
            while self._ready and self._ready[0][0] != shape:
                _close(self._ready.popleft())
            if self._ready:
                _, pid, go_fd, read_fd = self._ready.popleft()
                return pid, go_fd, read_fd
            if not self._asked:
                self._ask(shape)
            self._receive()

    def prefetch(self, spec: ContainerSpec) -> None:
        """Have the next containers built now, while the current one runs: they most likely look like it."""
        shape = shape_of(spec)
        while len(self._ready) + len(self._asked) < self._depth:
            self._ask(shape)

    def exit_code(self, pid: int) -> int | None:
        """Wait for the zygote to reap container ``pid``; None if the zygote is gone."""
        while pid not in self._exits:
            try:
                self._receive()
            except ZygoteError:
                return None
        return self._exits.pop(pid)

    def stop(self) -> None:
        """End the zygote and the containers it keeps ready; one handed out runs on until the zygote is reaped."""
        while self._ready:
            _close(self._ready.popleft())
        self._asked.clear()
        with contextlib.suppress(OSError):
            self._sock.close()  # EOF: the zygote ends its containers and exits

    def _ask(self, shape: Shape) -> None:
        try:
            self._sock.send(marshal.dumps(("fork", shape)))
        except OSError as exc:
            raise ZygoteError(f"cannot reach the zygote: {exc}") from None
        self._asked.append(shape)

    def _receive(self) -> None:
        if not select.select([self._sock], [], [], _WAIT)[0]:
            raise ZygoteError(f"the zygote did not answer within {_WAIT:g} s")
        try:
            message, fds, _, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, 2)
        except OSError as exc:
            raise ZygoteError(f"cannot reach the zygote: {exc}") from None
        if not message:
            for fd in fds:
                os.close(fd)
            raise ZygoteError("the zygote exited")
        kind, pid, value = marshal.loads(message)
        if kind == "ready" and len(fds) == 2 and self._asked:
            self._ready.append((self._asked.popleft(), pid, fds[0], fds[1]))
        elif kind == "exit":
            self._exits[pid] = value
            if len(self._exits) > _KEEP_EXITS:  # asked for right after a container ends, if at all
                del self._exits[next(iter(self._exits))]
        elif kind == "failed":
            raise ZygoteError(f"the zygote could not fork a container: {value}")
        else:  # pragma: no cover - the zygote sends nothing else
            for fd in fds:
                os.close(fd)
            raise ZygoteError(f"unexpected message from the zygote: {kind!r}")


def _close(ready: tuple[Shape, int, int, int]) -> None:
    """EOF before GO: the container exits without running anything."""
    os.close(ready[2])
    os.close(ready[3])


# --- the zygote process ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    parent: int
    factory: Factory
    diag_fd: int
    userns_fd: int
    keep: tuple[int, ...]
    uid: int
    gid: int
    prefault: bool


def _serve(ctl: int, config: _Config) -> int:
    """Fork a container for each shape asked for, hand its pipes over, report each exit; stop at EOF."""
    process.guard_parent(config.parent)
    # Building the next container must not slow down the one running a test: the caller renices the
    # container it hands a test to back to its own niceness (as root; rootless it cannot).
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, min(os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICE, 19))
    # Ctrl-C goes to the whole process group: the running container reports it, the zygote just goes on.
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    # Nothing of the caller's stays open here: a fixture's socket, pipe or lock must close when it does.
    sc.close_fds_except({0, 1, 2, ctl, pidns, config.diag_fd, config.userns_fd, *config.keep} - {-1})
    return _Server(socket.socket(fileno=ctl), config, pidns, interrupt).loop()


class _Server:
    """The zygote's side.  Every page it writes after a fork is copied once more, so it does little."""

    def __init__(self, sock: socket.socket, config: _Config, pidns: int, interrupt: Any) -> None:
        self.sock = sock
        self.config = config
        self.pidns = pidns
        self.interrupt = interrupt
        self.children: dict[int, int] = {}  # pidfd -> pid
        #: Which pages the containers copy while they wait (see prefault.py), shared by all of them.
        self.record = prefault.shared_record() if config.prefault else None
        self.forked = 0
        #: Specs by the request that named them: a shape is decoded once, not once per container.
        self.specs: dict[bytes, ContainerSpec] = {}
        self.poller = select.poll()
        self.poller.register(sock.fileno(), select.POLLIN)

    def loop(self) -> int:
        ctl = self.sock.fileno()
        while True:
            for fd, _ in self.poller.poll():
                if fd != ctl:
                    self._reap(fd)
                elif not self._request():
                    self._stop()
                    return 0

    def _reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        self._send(("exit", pid, os.waitstatus_to_exitcode(status)))

    def _stop(self) -> None:
        """Reaped before we go, so that once the caller reaped us no container of ours is left."""
        for pid in self.children.values():
            process.kill(pid)
            os.waitpid(pid, 0)

    def _request(self) -> bool:
        message = self.sock.recv(_MAX_MESSAGE)
        if not message:
            return False
        spec = self.specs.get(message)
        if spec is None:
            kind, shape = marshal.loads(message)
            if kind != "fork":
                return False
            spec = self.specs[message] = spec_from(shape)
        try:
            pid, theirs = self._fork(spec)
        except Exception as exc:
            self._send(("failed", 0, f"{type(exc).__name__}: {exc}"))
            return True
        try:
            socket.send_fds(self.sock, [marshal.dumps(("ready", pid, None))], list(theirs))
        finally:
            for fd in theirs:
                os.close(fd)
        pidfd = os.pidfd_open(pid)
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        return True

    def _send(self, message: tuple[str, int, Any]) -> None:
        with contextlib.suppress(OSError):  # the caller is gone: EOF comes next
            self.sock.send(marshal.dumps(message))

    def _fork(self, spec: ContainerSpec) -> tuple[int, tuple[int, int]]:
        """A container that builds its root and then waits for GO.

        Returns its PID and the caller's ends of its pipes: GO, frames.
        """
        go_read, go_write = os.pipe2(os.O_CLOEXEC)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        config = self.config
        launch = init.Launch(
            spec=spec,
            body=_no_body,
            uid=config.uid,
            gid=config.gid,
            parent_pid=os.getpid(),
            write_fd=write_fd,
            diag_fd=config.diag_fd,
            userns_fd=-1 if spec.rootless else config.userns_fd,
            factory=config.factory,
            go_fd=go_read,
            prefault=self.record,
            prefault_record=prefault.samples(self.forked),
        )
        self.forked += 1
        gc.freeze()
        if not spec.rootless:
            sc.unshare(sc.CLONE_NEWPID)  # our next child is PID 1 of a new PID namespace
        try:
            pid = os.fork()  # not sc.fork: the zygote has no thread to warn about, and every page counts
        finally:
            if not spec.rootless and os.getpid() != 1:
                sc.setns(self.pidns, sc.CLONE_NEWPID)
        if pid == 0:  # pragma: no cover - runs in the container
            signal.signal(signal.SIGINT, self.interrupt)
            os.close(go_write)
            os.close(read_fd)
            init.main(launch)
        os.close(go_read)
        os.close(write_fd)
        return pid, (go_write, read_fd)


def _no_body(inside: Any) -> None:  # pragma: no cover - replaced by the factory's body at GO
    raise RuntimeError("a zygote's container ran without GO")
