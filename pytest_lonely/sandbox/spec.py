"""What the engine needs to know to build one container, decided by the caller before the fork."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from . import namespaces, protocol, rootfs
from .limits import Limits


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    """One container, fully decided: the child does no planning."""

    #: Unique in this run; names the container's cgroup unless one was made ahead of time.
    id: str
    hostname: str
    rootless: bool
    network: bool
    plan_key: rootfs.PlanKey
    plan: rootfs.Plan
    #: Seconds before the whole container is killed; 0 means never.
    timeout: float
    #: Where PID 1 starts, if that path exists inside; else ``/``.
    cwd: str
    #: Set in ``os.environ`` inside, over the inherited values (an image's ``Env``).
    env: tuple[tuple[str, str], ...] = ()
    #: cgroup limits of the whole container; empty: no cgroup unless ``usage``.
    limits: Limits = Limits()
    #: Measure peak memory, CPU time and processes in a cgroup of its own.
    usage: bool = False
    #: Host root with every capability (no user namespace, no locked mounts): the old, weaker boundary.
    privileged: bool = False
    #: fds above 2 the body may keep (pytest's capture files); every other inherited fd is closed inside.
    keep_fds: tuple[int, ...] = ()

    @property
    def namespaces(self) -> frozenset[str]:
        return namespaces.for_container(rootless=self.rootless, network=self.network)

    def tail(self) -> Tail:
        """What a container built ahead of time learns only when it is handed its work (plain data)."""
        return (self.id, self.hostname, self.timeout, self.env)

    def with_tail(self, tail: Tail) -> ContainerSpec:
        cid, hostname, timeout, env = tail
        return dataclasses.replace(
            self, id=cid, hostname=hostname, timeout=timeout, env=tuple((str(k), str(v)) for k, v in env)
        )


#: (id, hostname, timeout, env): see :meth:`ContainerSpec.tail`.
Tail = tuple[str, str, float, tuple[tuple[str, str], ...]]


@dataclasses.dataclass(frozen=True)
class Inside:
    """What the callable running as PID 1 is given."""

    send: protocol.Sender
    #: PID 1 as the host sees it.
    host_pid: int
    #: What the root filesystem could not show, for the caller to warn about.
    notes: tuple[str, ...]


#: The work a container does, as its PID 1.  Returning ends the container normally.
Body = Callable[[Inside], None]
