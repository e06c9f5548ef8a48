"""Which namespaces a container gets, decided in one place.

The launcher, the prebuild helper, the child and the report header all ask
:func:`for_container`, so they can never disagree about whether a test has,
say, its own network.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from . import _syscalls as sc

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
