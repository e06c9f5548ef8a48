"""Which namespaces a container gets, decided in one place.

The forker, the container, the probe and the report header all ask
:func:`for_container`, so they can never disagree about whether a test has,
say, its own network.
"""

from __future__ import annotations

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


#: Root mode's user namespaces map every id to itself: files keep their owners, and root inside is uid 0
#: on the host, but its capabilities count only for what that user namespace owns.  Only host root outside
#: may write such a map, so the container's forker writes it (fork.py).
IDENTITY_MAP: Final = "0 0 4294967295\n"


def map_root(uid: int, gid: int) -> None:
    """Map root of the user namespace we just made to ``uid``/``gid`` of its parent: all we may map ourselves.

    The order is the kernel's: ``gid_map`` is refused before ``setgroups`` is ``deny``.  The probe
    rehearses exactly this, so that what it finds refused is what a container would find refused.
    """
    process.write_once("/proc/self/uid_map", f"0 {uid} 1\n")
    process.write_once("/proc/self/setgroups", "deny\n")
    process.write_once("/proc/self/gid_map", f"0 {gid} 1\n")
