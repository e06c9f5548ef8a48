"""Container namespaces built ahead of time by a helper process (root mode).

Assembling a container's mount tree is a few dozen system calls, and in the
child it sits on the critical path of every test.  A helper process builds
the *next* container's namespaces while the current test runs, and passes an
fd to each back over a socket; the child then only ``setns``-es into them,
mounts its ``/proc`` and locks the mounts (measured: about 1 ms less per test
on a 2-core machine).

What the helper builds is exactly what host root must build, so that the
lock still happens in the container's PID 1 (docs/boundary-design.md):

* M1: a mount namespace owned by the initial user namespace, holding the
  assembled root, ``/sys`` bound read-only, the host tree detached; no
  ``/proc``, which must show PID 1's own PID namespace;
* U: an identity-mapped user namespace, one per helper (the containers that
  build their own root share the launcher's one the same way);
* fresh UTS, IPC (and network) namespaces owned by U, made by a worker that
  lives in U (a process cannot leave a user namespace), ``lo`` up: one fork
  per helper, not one per container.

The helper runs as host root, so it takes no orders: the plans are in its
memory from the fork (:meth:`NamespacePool.prefetch` starts a new helper when
a plan it does not hold comes up), a request is only the index of one, and
anything else stops it.  The container never holds the socket: the child
closes every fd it was not told to keep.

A process, not a thread: a thread in pytest would make every later
``fork()`` in the session, the user's own included, a fork of a
multi-threaded process.  The kernel keeps a prepared namespace alive exactly
as long as an fd or a process refers to it: an unused one vanishes when its
fds are closed, and nothing of it ever shows in the host's mount table.
"""

from __future__ import annotations

import dataclasses
import marshal
import os
import select
import socket
import struct
from typing import Any, Final

from . import _syscalls as sc
from . import namespaces, process, rootfs

#: Seconds ``take`` waits for a build under way before the child builds its own namespaces instead.
_WAIT: Final = 2.0
_MAX_FDS: Final = 8
_REQUEST: Final = struct.Struct("!I")


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A ready set of namespaces: (fd, CLONE_* type) pairs to join, and what could not be shown inside."""

    joins: tuple[tuple[int, int], ...]
    notes: tuple[str, ...]

    def close(self) -> None:
        for fd, _ in self.joins:
            os.close(fd)


class NamespacePool:
    """Keeps one container's namespaces ready for the next test; a failure only turns it off."""

    def __init__(self) -> None:
        #: Every plan the current helper holds, by index; a request names only an index.
        self._plans: list[tuple[rootfs.PlanKey, rootfs.Plan]] = []
        self._sock: socket.socket | None = None
        self._pid = 0
        self._asked: rootfs.PlanKey | None = None  # a request under way
        self._ready: tuple[rootfs.PlanKey, Prepared] | None = None
        #: Why the pool stopped, if it did: every test then builds its own namespaces, as without it.
        self.broken: str | None = None

    def _start(self) -> None:
        """Fork a helper that holds every registered plan in its memory."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()
        plans = tuple(self._plans)

        def builder() -> int:
            # Hold nothing of pytest's open: a pipe kept open here would hide an EOF from a reader.
            keep = theirs.fileno()
            os.closerange(0, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
            return _serve(theirs, parent, plans)

        self._pid = process.spawn(builder)
        theirs.close()
        self._sock = ours

    def take(self, key: rootfs.PlanKey) -> Prepared | None:
        """The prepared namespaces for ``key``, or None: the child then builds its own."""
        if self._asked == key and self._ready is None:
            self._receive(_WAIT)
        if self._ready is not None and self._ready[0] == key:
            prepared = self._ready[1]
            self._ready = None
            return prepared
        return None

    def prefetch(self, key: rootfs.PlanKey, ops: rootfs.Plan) -> None:
        """Start building namespaces for ``key``: the next test most likely looks like this one."""
        if self.broken is not None:
            return
        if self._asked is not None:
            self._receive(0)  # collect a finished build for another key, if any
            if self._asked is not None:
                return
        if self._ready is not None:
            if self._ready[0] == key:
                return
            self._ready[1].close()
            self._ready = None
        index = next((i for i, (known, _) in enumerate(self._plans) if known == key), None)
        if index is None:
            # A new plan: a new helper that holds it too (a few per session: host view, rootfs, network).
            self._plans.append((key, ops))
            index = len(self._plans) - 1
            self._kill_helper()
        try:
            if self._sock is None:
                self._start()
            assert self._sock is not None
            self._sock.sendall(_REQUEST.pack(index))
        except OSError as exc:
            self._stop(f"cannot reach the namespace builder: {exc}")
            return
        self._asked = key

    def _receive(self, timeout: float) -> None:
        key = self._asked
        if key is None or self._sock is None:
            return
        if not select.select([self._sock], [], [], timeout)[0]:
            return
        try:
            message, fds, _, _ = socket.recv_fds(self._sock, 1 << 16, _MAX_FDS)
            if not message:
                raise OSError("the namespace builder exited")
            status, payload = marshal.loads(message)
        except (OSError, EOFError, ValueError) as exc:
            self._stop(str(exc))
            return
        self._asked = None
        if status != "ok":
            for fd in fds:
                os.close(fd)
            self._stop(str(payload))
            return
        flags, notes = payload
        self._ready = (key, Prepared(tuple(zip(fds, flags, strict=True)), tuple(notes)))

    def _stop(self, why: str) -> None:
        self.broken = why
        self.close()

    def _kill_helper(self) -> None:
        if self._pid:
            assert self._sock is not None
            self._sock.close()  # the builder sees EOF and exits
            process.kill_and_reap(self._pid)
            self._pid = 0
            self._sock = None

    def close(self) -> None:
        if self._ready is not None:
            self._ready[1].close()
            self._ready = None
        self._asked = None
        self._kill_helper()


# --- the builder process ---------------------------------------------------------------------


def _serve(sock: socket.socket, parent: int, plans: tuple[tuple[rootfs.PlanKey, rootfs.Plan], ...]) -> int:
    """Build namespaces for the plan a request names, until pytest closes the socket (or dies: PDEATHSIG).

    A request is one index into ``plans``, which came with the fork; anything
    else (short, out of range) ends the helper.  Nothing from the socket is
    ever unmarshalled or replayed.
    """
    process.guard_parent(parent)
    own_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    owner = namespaces.UsernsWorker()
    while True:
        request = _recv_exactly(sock, _REQUEST.size)
        if request is None:
            return 0
        (index,) = _REQUEST.unpack(request)
        if index >= len(plans):
            return 1
        key, ops = plans[index]
        fds: list[int] = []
        try:
            flags, notes, fds = _build(key, ops, own_mnt, owner)
            reply: Any = ("ok", (flags, notes))
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            socket.send_fds(sock, [marshal.dumps(reply)], fds)
        finally:
            for fd in fds:
                os.close(fd)


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _build(
    key: rootfs.PlanKey, ops: rootfs.Plan, own_mnt: int, owner: namespaces.UsernsWorker
) -> tuple[list[int], list[str], list[int]]:
    """M1 as host root, then U and the namespaces it owns; fds in the order PID 1 joins them."""
    sc.unshare(sc.CLONE_NEWNS)
    mnt = -1
    try:
        rootfs.enter_scratch()
        notes = rootfs.apply(ops)
        mnt = os.open(f"{rootfs.OLD}/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        rootfs.switch_root("/")
    except BaseException:
        if mnt >= 0:
            os.close(mnt)
        raise
    finally:
        sc.setns(own_mnt, sc.CLONE_NEWNS)
    try:
        made = owner.make(key.network)
    except BaseException:
        os.close(mnt)
        raise
    names = list(made)  # user first, then the namespaces it owns
    return [sc.CLONE_NEWNS, *(namespaces.FLAGS[n] for n in names)], notes, [mnt, *made.values()]
