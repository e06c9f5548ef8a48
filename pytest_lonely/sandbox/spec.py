"""What the engine needs to know to build one container and hand it work, decided by the caller before the fork."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from typing import Any

from . import mountplan, namespaces, protocol, rootfs
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
    #: fds above 2 the body may keep (pytest's capture files); every other inherited fd is held by /dev/null.
    keep_fds: tuple[int, ...] = ()
    #: ``plan`` compiled (mountplan), in the process that makes the spec, once per plan: the one that forks.
    program: mountplan.Program = dataclasses.field(default=mountplan.EMPTY, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.program.plan is not self.plan:
            object.__setattr__(self, "program", mountplan.compiled(self.plan))

    @property
    def namespaces(self) -> frozenset[str]:
        return namespaces.for_container(rootless=self.rootless, network=self.network)

    @property
    def shape(self) -> tuple[Any, ...]:
        """What a container must know before it is built: containers of one shape are interchangeable."""
        return (self.rootless, self.network, self.plan_key, self.cwd, self.keep_fds, self.privileged)

    def tail(self) -> Tail:
        """What a container learns only when it is handed its work (plain data, it travels in GO)."""
        return (self.id, self.hostname, self.timeout, self.env)

    def with_tail(self, tail: Any) -> ContainerSpec:
        cid, hostname, timeout, env = tail
        return dataclasses.replace(
            self, id=cid, hostname=hostname, timeout=float(timeout), env=tuple((str(k), str(v)) for k, v in env)
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
    #: This container's own files for what its processes print (stdout, stderr): the parent reads them
    #: after a crash, and no other container ever writes there.
    outputs: tuple[int, int] = (-1, -1)
    #: Ask the parent a question about this container (a kind of :data:`~.protocol.QUESTIONS`); blocks.
    ask: Callable[[protocol.Kind, Any], Any] | None = None


#: The work a container does for one order, as its PID 1.  Returning ends that work normally.
Body = Callable[[Inside], None]
#: Turns an order (plain data, sent with GO) into the body, inside the container, in its copy of the caller.
Factory = Callable[[Any], Body]


@dataclasses.dataclass(frozen=True)
class Work:
    """How a container turns the caller's orders into bodies.

    ``factory`` runs in the container's copy of the caller.  ``key`` names
    everything in the caller's memory that ``factory`` depends on: a container
    may come from a zygote (a copy of the caller taken earlier) only while the
    key is the same as when that zygote was forked.  None: never from a zygote.
    """

    factory: Factory
    key: Hashable | None = None
    #: Run once in a zygote before it forks containers: what every container would do alike is then done
    #: once, and inherited, instead of copied page by page in each.
    prepare: Callable[[], None] | None = None
