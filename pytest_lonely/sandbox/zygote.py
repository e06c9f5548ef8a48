"""Containers forked ahead of time from a snapshot of the caller (a zygote), and the slot that holds one.

Forking pytest for every test costs twice in copy-on-write faults: the
container copies each page it writes, and so does pytest itself for each
page it writes after the fork, test after test.  A zygote is forked from the
caller once, at a point the caller names with a key (for pytest: the same
broader fixtures, the same place in the setup stack), and forks the
containers from then on:

* the caller is forked once per key instead of once per test, so its own
  pages are copied once, not once per test;
* the zygote forks the *next* container while the current one runs, on the
  other core, and that container builds its root and locks its mounts before
  it is handed its work;
* the container is given its work (GO) only when the caller is ready for it,
  so tests still run one after the other, in order.

The zygote is trusted: it is a copy of pytest, it takes orders only from
pytest over a socket no container keeps, and it hands pytest only what the
kernel gave it (pidfds, pipes).  It holds nothing of the caller's open but
what containers need: a socket, pipe or lock that a fixture closes in the
caller must really close, so every other descriptor is held by /dev/null.
It registers every container with the keeper before handing it over, and on
every way out it can see (EOF, an error, a catchable signal) it kills the
containers it made; when it is SIGKILLed, the keeper still holds them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import marshal
import os
import select
import signal
import socket
from collections.abc import Callable, Hashable
from typing import Any, Final

from . import fork, process, rootfs
from .keeper import Keeper, KeeperError
from .spec import ContainerSpec, Factory

#: Seconds the caller waits for the zygote to hand over a container before it forks one itself.
_WAIT: Final = 10.0
_MAX_MESSAGE: Final = 1 << 20
#: Exit codes kept for containers nobody asked about yet: the caller asks right after one ends.
_KEEP_EXITS: Final = 256
#: Containers kept built ahead of time: the next test's (more measured no faster on 2 cores).
DEPTH: Final = 1
#: How much nicer than the caller the zygote and the containers it builds ahead of time run.
BACKGROUND_NICE: Final = 10
#: Descriptors a "ready" message carries: GO, reports, stdout, stderr, diagnostics, PID 1's pidfd; then the
#: container's layers (one or two).
_READY_FDS: Final = 6


def eligible(spec: ContainerSpec) -> bool:
    """``--lonely-usage`` and rootless limits take the direct path: the container enters its cgroup first.

    Usage must count what the container copied while it waited; rootless, the
    cgroup must be entered by the middle process, before PID 1 exists.
    """
    return not spec.usage and not (spec.limits and spec.rootless)


def _spec_message(spec: ContainerSpec) -> bytes:
    """What the zygote needs to build a container of ``spec``'s shape (plain data; its tail comes with GO)."""
    key = spec.plan_key
    return marshal.dumps(
        (
            "fork",
            spec.rootless,
            spec.network,
            (key.rootfs, key.rootless, key.network, key.writable),
            spec.plan,
            spec.cwd,
            spec.keep_fds,
            spec.privileged,
        )
    )


def _spec_from(message: bytes) -> ContainerSpec:
    kind, rootless, network, key, plan, cwd, keep_fds, privileged = marshal.loads(message)
    if kind != "fork":
        raise ValueError(f"unexpected request {kind!r}")
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


@dataclasses.dataclass
class Handed:
    """A container the zygote built, as the caller holds it."""

    child: int
    pid1: process.Handle | None
    group: int
    go_fd: int
    read_fd: int
    outputs: tuple[int, int, int]
    layers: tuple[int, ...] = ()


class Zygote:
    """The caller's handle on one zygote process and the containers it keeps ready."""

    def __init__(self, key: Hashable, pid: int, sock: socket.socket, depth: int = DEPTH) -> None:
        self.key = key
        self.pid = pid
        self._sock = sock
        self._depth = depth
        #: Containers handed over but not taken yet, with the request that made them, oldest first.
        self._ready: collections.deque[tuple[bytes, Handed]] = collections.deque()
        #: Requests whose containers have not arrived yet; the zygote answers in order.
        self._asked: collections.deque[bytes] = collections.deque()
        #: Exit codes (``waitstatus_to_exitcode``) of containers the zygote reaped, by their forked PID.
        self._exits: dict[int, int] = {}

    @classmethod
    def start(
        cls,
        key: Hashable,
        factory: Factory,
        keeper: Keeper,
        keep: tuple[int, ...],
        *,
        prepare: Callable[[], None] | None = None,
        thaw: bool = True,
    ) -> Zygote:
        """Fork the zygote from the caller as it is now; it lives until :meth:`stop` or the caller's death."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        config = _Config(os.getpid(), factory, keeper, keep, prepare)
        gc.freeze()  # the zygote's collector must not write to the caller's pages (it stays frozen there)
        try:
            pid = process.spawn(lambda: _serve(theirs.fileno(), config))
        finally:
            if thaw:
                gc.unfreeze()
            theirs.close()
        return cls(key, pid, ours)

    def take(self, spec: ContainerSpec) -> Handed:
        """A container built for ``spec``'s shape, asking for one if none is on its way.

        Containers of another shape ahead of it are discarded (EOF before GO:
        they exit without running anything).
        """
        request = _spec_message(spec)
        while True:
            while self._ready and self._ready[0][0] != request:
                _discard(self._ready.popleft()[1])
            if self._ready:
                return self._ready.popleft()[1]
            if not self._asked:
                self._ask(request)
            self._receive()

    def prefetch(self, spec: ContainerSpec) -> None:
        """Have the next containers built now, while the current one runs: they most likely look like it."""
        request = _spec_message(spec)
        while len(self._ready) + len(self._asked) < self._depth:
            self._ask(request)

    def exit_code(self, child: int) -> int | None:
        """Wait for the zygote to reap container ``child``; None if the zygote is gone."""
        while child not in self._exits:
            try:
                self._receive()
            except ZygoteError:
                return None
        return self._exits.pop(child)

    def stop(self) -> None:
        """End the zygote and the containers it keeps ready; one handed out runs on until the zygote is reaped."""
        while self._ready:
            _discard(self._ready.popleft()[1])
        self._asked.clear()
        with contextlib.suppress(OSError):
            self._sock.close()  # EOF: the zygote ends its containers and exits

    def _ask(self, request: bytes) -> None:
        try:
            self._sock.send(request)
        except OSError as exc:
            raise ZygoteError(f"cannot reach the zygote: {exc}") from None
        self._asked.append(request)

    def _receive(self) -> None:
        if not select.select([self._sock], [], [], _WAIT)[0]:
            raise ZygoteError(f"the zygote did not answer within {_WAIT:g} s")
        try:
            message, fds, _, _ = socket.recv_fds(self._sock, _MAX_MESSAGE, _READY_FDS + 2)
        except OSError as exc:
            raise ZygoteError(f"cannot reach the zygote: {exc}") from None
        if not message:
            for fd in fds:
                os.close(fd)
            raise ZygoteError("the zygote exited")
        kind, child, value = marshal.loads(message)
        if kind == "ready" and self._asked:
            # Without PID 1's pidfd only when it died while it was built (rootless): its pipe says why.
            pid1_pid, group, layers = value
            go_fd, read_fd, out, err, diag = fds[:5]
            pid1 = process.Handle(pid1_pid, fds[5]) if pid1_pid else None
            rest = tuple(fds[6 if pid1_pid else 5 :])
            handed = Handed(child, pid1, group, go_fd, read_fd, (out, err, diag), rest[:layers])
            self._ready.append((self._asked.popleft(), handed))
        elif kind == "exit":
            self._exits[child] = value
            if len(self._exits) > _KEEP_EXITS:  # asked for right after a container ends, if at all
                del self._exits[next(iter(self._exits))]
        else:
            for fd in fds:
                os.close(fd)
            raise ZygoteError(f"the zygote could not fork a container: {value}")


def _discard(handed: Handed) -> None:
    """EOF before GO: the container exits without running anything; SIGKILL in case it is slow to."""
    os.close(handed.go_fd)
    os.close(handed.read_fd)
    for fd in (*handed.outputs, *handed.layers):
        os.close(fd)
    if handed.pid1 is not None:
        handed.pid1.kill()
        handed.pid1.close()


# --- the zygote process ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    parent: int
    factory: Factory
    keeper: Keeper
    keep: tuple[int, ...]
    prepare: Callable[[], None] | None = None


class _Stop(Exception):
    """A catchable signal asked the zygote to end."""


def _stop(signum: int, frame: object) -> None:
    raise _Stop(signum)


def _serve(ctl: int, config: _Config) -> int:  # pragma: no cover - runs in the zygote
    """Fork a container for each shape asked for, hand its pipes over, report each exit; stop at EOF."""
    process.guard_parent(config.parent)
    # Building the next container must not slow down the one running a test: the caller renices the
    # container it hands a test to back to its own niceness (as root; rootless it cannot).
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, min(os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICE, 19))
    # Ctrl-C goes to pytest's process group: pytest forwards it to the running container; we go on.
    interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    # Nothing of the caller's stays open here: a fixture's socket, pipe or lock must close when it does.
    process.hold_fds({0, 1, 2, ctl, pidns, config.keeper.fileno(), *config.keep}, process.open_fds())
    if config.prepare is not None:
        config.prepare()
    server = _Server(socket.socket(fileno=ctl), config, pidns, interrupt)
    try:
        return server.loop()
    except _Stop:
        return 0
    finally:
        server.end()


class _Server:
    """The zygote's side.  Every page it writes after a fork is copied once more, so it does little."""

    def __init__(self, sock: socket.socket, config: _Config, pidns: int, interrupt: Any) -> None:
        self.sock = sock
        self.config = config
        self.pidns = pidns
        self.interrupt = interrupt
        #: Containers not reaped yet: pidfd of the process we forked -> (its PID, PID 1's handle).
        self.children: dict[int, tuple[int, process.Handle | None]] = {}
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
                    return 0

    def end(self) -> None:
        """Kill and reap every container of ours, so that once the caller reaped us none is left."""
        for pidfd, (pid, pid1) in self.children.items():
            if pid1 is not None:
                pid1.kill()
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()

    def _reap(self, pidfd: int) -> None:
        pid, pid1 = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        if pid1 is not None:
            pid1.close()
        _, status = os.waitpid(pid, 0)
        self._send(("exit", pid, os.waitstatus_to_exitcode(status)))

    def _request(self) -> bool:
        message = self.sock.recv(_MAX_MESSAGE)  # ECONNRESET and friends end the loop, and end() runs
        if not message:
            return False
        spec = self.specs.get(message)
        if spec is None:
            spec = self.specs[message] = _spec_from(message)
        try:
            started = fork.start(spec, self.config.factory, own_pidns=self.pidns, sigint=self.interrupt, thaw=False)
        except Exception as exc:
            self._send(("failed", 0, f"{type(exc).__name__}: {exc}"))
            return True
        pidfd = os.pidfd_open(started.child)
        self.children[pidfd] = (started.child, None)
        self.poller.register(pidfd, select.POLLIN)
        why = fork.establish(started, spec)
        try:
            if why is None and started.pid1 is not None:
                self.config.keeper.register(started.pid1.pidfd)
        except KeeperError as exc:
            why = str(exc)
        if why is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(started.child, signal.SIGKILL)  # our own child, not reaped yet: reaped by the loop
            started.close()
            self._send(("failed", started.child, why))
            return True
        self.children[pidfd] = (started.child, started.pid1)
        try:
            pid1 = started.pid1.pid if started.pid1 is not None else 0
            ready = ("ready", started.child, (pid1, started.group, len(started.layers)))
            socket.send_fds(self.sock, [marshal.dumps(ready)], started.fds())
        finally:
            for fd in (started.go_fd, started.read_fd, *started.outputs, *started.layers):
                os.close(fd)
        return True

    def _send(self, message: tuple[str, int, Any]) -> None:
        with contextlib.suppress(OSError):  # the caller is gone: EOF comes next
            self.sock.send(marshal.dumps(message))
