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


def make_userns(also: Iterable[str] = ()) -> dict[str, int]:
    """A fresh identity-mapped user namespace, and namespaces ``also`` owned by it: name -> fd (close-on-exec).

    A process cannot leave a user namespace, so a short-lived worker makes them:
    it unshares the user namespace, we (host root, in the parent user
    namespace) write its maps, it unshares ``also`` inside (bringing ``lo`` up
    in a new network namespace), we open its namespace files, and it exits.
    No ``setgroups=deny``: host root's supplementary groups stay mapped.
    """
    extra = tuple(also)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()

    def worker() -> int:  # pragma: no cover - runs in the worker
        os.close(ready_r)
        os.close(go_w)
        sc.unshare(sc.CLONE_NEWUSER)
        os.write(ready_w, b"u")
        if os.read(go_r, 1) != b"m":
            return 1
        if extra:
            sc.unshare(flags(extra))
            if "net" in extra:
                sc.interface_up("lo")
        os.write(ready_w, b"n")
        os.read(go_r, 1)  # EOF: we are done with it
        return 0

    pid = process.spawn(worker)
    os.close(ready_w)
    os.close(go_r)
    fds: dict[str, int] = {}
    ok = False
    try:
        if os.read(ready_r, 1) != b"u":
            raise OSError("the user namespace worker could not unshare CLONE_NEWUSER")
        for name in ("uid_map", "gid_map"):
            fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
            try:
                os.write(fd, IDENTITY_MAP.encode())
            finally:
                os.close(fd)
        os.write(go_w, b"m")
        if os.read(ready_r, 1) != b"n":
            raise OSError(f"the user namespace worker could not create its {describe(extra)} namespaces")
        for name in ("user", *extra):
            fds[name] = os.open(f"/proc/{pid}/ns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        ok = True
    finally:
        os.close(go_w)
        os.close(ready_r)
        if ok:
            os.waitpid(pid, 0)
        else:
            for fd in fds.values():
                os.close(fd)
            process.kill_and_reap(pid)
    return fds
