"""Which namespaces a container gets, decided in one place.

The launcher, the prebuild helper, the child and the report header all ask
:func:`for_container`, so they can never disagree about whether a test has,
say, its own network.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Final

from . import _syscalls as sc
from . import process

FLAGS: Final = {
    "user": sc.CLONE_NEWUSER,
    "pid": sc.CLONE_NEWPID,
    "mnt": sc.CLONE_NEWNS,
    "uts": sc.CLONE_NEWUTS,
    "ipc": sc.CLONE_NEWIPC,
    "net": sc.CLONE_NEWNET,
}
#: The order they are shown in, and the order ``setns`` must join them (user first).
ORDER: Final = ("user", "pid", "mnt", "uts", "ipc", "net")


def for_container(*, rootless: bool, network: bool) -> frozenset[str]:
    """Every container has pid, mnt, uts and ipc; rootless adds user, ``network=False`` adds net."""
    names = {"pid", "mnt", "uts", "ipc"}
    if rootless:
        names.add("user")
    if not network:
        names.add("net")
    return frozenset(names)


def flags(names: Iterable[str]) -> int:
    """The ``CLONE_NEW*`` bits for ``names``."""
    result = 0
    for name in names:
        result |= FLAGS[name]
    return result


def describe(names: Iterable[str]) -> str:
    """``user,pid,mnt,...`` in the canonical order, for the report header."""
    present = set(names)
    return ",".join(n for n in ORDER if n in present)


#: Root mode's user namespace maps every id to itself: files keep their owners, and root inside is uid 0
#: on the host, but its capabilities count only for what this user namespace owns.
IDENTITY_MAP: Final = "0 0 4294967295\n"


class UsernsWorker:
    """A process in a fresh identity-mapped user namespace that makes namespaces owned by it, on request.

    A process cannot leave a user namespace, so this worker lives in it: it
    unshares the user namespace, we (host root, in the parent user namespace)
    write its maps, and from then on each :meth:`make` has it unshare fresh
    UTS, IPC (and network) namespaces, which we open through ``/proc``.  One
    fork per session instead of one per container.  No ``setgroups=deny``:
    host root's supplementary groups stay mapped.
    """

    def __init__(self) -> None:
        ready_r, ready_w = os.pipe()
        go_r, go_w = os.pipe()

        def worker() -> int:  # pragma: no cover - runs in the worker
            os.close(ready_r)
            os.close(go_w)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, b"u")
            if os.read(go_r, 1) != b"m":
                return 1
            os.write(ready_w, b"k")
            while True:
                want = os.read(go_r, 1)
                if not want:
                    return 0
                try:
                    sc.unshare(flags(("uts", "ipc", "net") if want == b"n" else ("uts", "ipc")))
                    if want == b"n":
                        sc.interface_up("lo")
                except OSError:
                    os.write(ready_w, b"e")
                    continue
                os.write(ready_w, b"k")

        self._pid = process.spawn(worker)
        os.close(ready_w)
        os.close(go_r)
        self._ready, self._go = ready_r, go_w
        self.user_fd = -1
        try:
            self._expect(b"u", "unshare CLONE_NEWUSER")
            for name in ("uid_map", "gid_map"):
                fd = os.open(f"/proc/{self._pid}/{name}", os.O_WRONLY)
                try:
                    os.write(fd, IDENTITY_MAP.encode())
                finally:
                    os.close(fd)
            os.write(self._go, b"m")
            self._expect(b"k", "start")
            self.user_fd = os.open(f"/proc/{self._pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            self.close()
            raise

    def _expect(self, reply: bytes, what: str) -> None:
        got = os.read(self._ready, 1)
        if got != reply:
            raise OSError(f"the user namespace worker could not {what} (replied {got!r})")

    def make(self, network: bool) -> dict[str, int]:
        """Fresh UTS, IPC and, without ``network``, NET namespaces owned by the user namespace, and a dup of it."""
        names = ("uts", "ipc") if network else ("uts", "ipc", "net")
        os.write(self._go, b"h" if network else b"n")
        self._expect(b"k", f"unshare {describe(names)}")
        fds = {"user": os.dup(self.user_fd)}
        try:
            for name in names:
                fds[name] = os.open(f"/proc/{self._pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    def close(self) -> None:
        """The worker sees EOF and exits; ``user_fd`` (if still open) keeps the user namespace alive."""
        if self._pid:
            os.close(self._go)
            os.close(self._ready)
            process.kill_and_reap(self._pid)
            self._pid = 0


def make_userns() -> int:
    """An fd (close-on-exec) to a fresh identity-mapped user namespace: one fork."""
    worker = UsernsWorker()
    fd = worker.user_fd
    worker.close()
    return fd
