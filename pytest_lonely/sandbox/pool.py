"""Container namespaces built ahead of time by a helper process (root mode).

Assembling a container's mount tree is a few dozen system calls, and in the
child it sits on the critical path of every test.  A helper process builds
the *next* container's namespaces while the current test runs: it unshares
mount, UTS, IPC (and network) namespaces, replays the same mount plan the
child would, passes an fd to each namespace back over a socket, and returns
to the host's.  The child then only ``setns``-es into them and mounts its
``/proc`` (measured: about 1 ms less per test on a 2-core machine).

A process, not a thread: a thread in pytest would make every later
``fork()`` in the session, the user's own included, a fork of a
multi-threaded process.  Only root mode uses this, since the namespaces of a
rootless container belong to its user namespace, which exists only once the
container does.  The kernel keeps a prepared namespace alive exactly as long
as an fd or a process refers to it: an unused one vanishes when its fds are
closed, and nothing of it ever shows in the host's mount table.
"""

from __future__ import annotations

import dataclasses
import marshal
import os
import select
import socket
from typing import Any, Final

from . import _syscalls as sc
from . import namespaces, process, protocol, rootfs

#: The namespaces a prebuild can hold; PID and user namespaces are made by the launcher.
_PREBUILT: Final = ("mnt", "uts", "ipc", "net")
#: Seconds ``take`` waits for a build under way before the child builds its own namespaces instead.
_WAIT: Final = 2.0
_MAX_FDS: Final = 8


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
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        parent = os.getpid()

        def builder() -> int:
            # Hold nothing of pytest's open: a pipe kept open here would hide an EOF from a reader.
            keep = theirs.fileno()
            os.closerange(0, keep)
            os.closerange(keep + 1, os.sysconf("SC_OPEN_MAX"))
            return _serve(theirs, parent)

        self._pid = process.spawn(builder)
        theirs.close()
        self._asked: rootfs.PlanKey | None = None  # a request under way
        self._ready: tuple[rootfs.PlanKey, Prepared] | None = None
        #: Why the pool stopped, if it did: every test then builds its own namespaces, as without it.
        self.broken: str | None = None

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
        try:
            request: Any = (dataclasses.astuple(key), ops)
            body = marshal.dumps(request)
            self._sock.sendall(protocol.pack(body))
        except (OSError, ValueError) as exc:
            self._stop(f"cannot reach the namespace builder: {exc}")
            return
        self._asked = key

    def _receive(self, timeout: float) -> None:
        key = self._asked
        if key is None:
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

    def close(self) -> None:
        if self._ready is not None:
            self._ready[1].close()
            self._ready = None
        if self._pid:
            self._sock.close()  # the builder sees EOF and exits
            process.kill_and_reap(self._pid)
            self._pid = 0


# --- the builder process ---------------------------------------------------------------------


def _serve(sock: socket.socket, parent: int) -> int:
    """Build namespaces on request until pytest closes the socket (or dies: PDEATHSIG)."""
    process.guard_parent(parent)
    own = tuple(
        (os.open(f"/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC), namespaces.FLAGS[name]) for name in _PREBUILT
    )
    while True:
        request = _read_request(sock)
        if request is None:
            return 0
        key_fields, ops = request
        key = rootfs.PlanKey(*key_fields)
        fds: list[int] = []
        try:
            flags, notes, fds = _build(key, ops, own)
            reply: Any = ("ok", (flags, notes))
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        try:
            socket.send_fds(sock, [marshal.dumps(reply)], fds)
        finally:
            for fd in fds:
                os.close(fd)


def _read_request(sock: socket.socket) -> tuple[Any, rootfs.Plan] | None:
    header = _recv_exactly(sock, protocol.HEADER.size)
    if header is None:
        return None
    body = _recv_exactly(sock, protocol.HEADER.unpack(header)[0])
    if body is None:
        return None
    request: tuple[Any, rootfs.Plan] = marshal.loads(body)
    return request


def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _build(
    key: rootfs.PlanKey, ops: rootfs.Plan, own: tuple[tuple[int, int], ...]
) -> tuple[list[int], list[str], list[int]]:
    """Enter fresh namespaces, assemble the root exactly as a child would, keep fds to them, come home."""
    wanted = namespaces.for_container(rootless=False, network=key.network)
    kinds = [(name, namespaces.FLAGS[name]) for name in _PREBUILT if name in wanted]
    sc.unshare(namespaces.flags(name for name, _ in kinds))
    fds: list[int] = []
    try:
        rootfs.enter_scratch()
        notes = rootfs.apply(ops)
        fds = [os.open(f"{rootfs.OLD}/proc/self/ns/{name}", os.O_RDONLY | os.O_CLOEXEC) for name, _ in kinds]
        if not key.network:
            sc.interface_up("lo")
        rootfs.switch_root("/")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        for fd, flag in own:
            sc.setns(fd, flag)
    return [flag for _, flag in kinds], notes, fds
