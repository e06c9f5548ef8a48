"""The engine's front door: containers for one process, from a zygote where it pays, each held to account.

:class:`Engine` composes the parts, each with one job: the keeper (nothing
outlives this process), the zygote slot (containers forked ahead of time),
the cgroup supply (limits off the critical path), and the reaper of the
containers forked straight from this process.  ``launch(spec, work)`` gives
a :class:`~.box.Box` built and waiting for work; ``run`` is launch, one
order, and the end, for a container that runs one test.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Hashable
from typing import Any

from . import cgroup, changes, fork
from .box import EXIT_WAIT, Box, OnFrame, Outcome, wait_child
from .cgroup_supply import CgroupSupply, remove
from .hugepages import Heap
from .keeper import Keeper, KeeperError
from .spec import ContainerSpec, Work
from .zygote import Zygote, ZygoteError, eligible


class ZygoteSlot:
    """The one zygote alive at a time, and when to fork a new one.

    Only the second container asked for with a key gets a zygote: a lone test
    would pay for a zygote and gain nothing from it.
    """

    def __init__(self, heap: Heap, thaw: bool) -> None:
        self._heap = heap
        self._thaw = thaw
        self.zygote: Zygote | None = None
        self._last_key: Hashable = None
        #: Why containers stopped coming from zygotes, if they did.
        self.broken: str | None = None
        #: Zygotes stopped and not reaped yet: the engine reaps them with its other children.
        self.retired: list[int] = []

    def get(self, key: Hashable, work: Work, keeper: Keeper, keep: tuple[int, ...]) -> Zygote | None:
        if self.zygote is not None and self.zygote.key != key:
            self.stop()
        if self.zygote is None:
            if self._last_key != key:
                self._last_key = key
                return None
            try:
                self._heap.prepare()
                self.zygote = Zygote.start(key, work.factory, keeper, keep, prepare=work.prepare, thaw=self._thaw)
            except OSError as exc:
                self.broken = f"cannot fork a zygote: {exc}"
                return None
        return self.zygote

    def fail(self, why: str) -> None:
        self.broken = why
        self.stop()

    def stop(self) -> None:
        """End the zygote (it kills what it built); its PID waits in :attr:`retired` to be reaped."""
        zygote, self.zygote = self.zygote, None
        if zygote is not None:
            zygote.stop()
            self.retired.append(zygote.pid)


class Engine:
    """Makes containers for one process and accounts for every one of them until it is reaped."""

    def __init__(self, rootless: bool, prefork: bool = True, hugepages: bool = True) -> None:
        self.rootless = rootless
        #: This process's heap on huge pages before it forks (see hugepages.py).
        self.heap = Heap(hugepages)
        self._pidns_fd = -1 if rootless else os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._keeper: Keeper | None = None
        self._prefork = prefork
        self.cgroups = CgroupSupply()
        #: Processes we forked that are not reaped yet (containers, stopped zygotes), with a cgroup to remove.
        self._unreaped: list[tuple[int, cgroup.Cgroup | None]] = []
        self._nice = os.getpriority(os.PRIO_PROCESS, 0)
        # Every fork freezes the collector (a child's collection would write to every page of the heap) and
        # thaws it after, unless the user froze objects before us: then all stays frozen rather than undo
        # theirs.  Asked once: gc.get_freeze_count() walks the whole frozen list (18% of a container's CPU).
        self._thaw = gc.get_freeze_count() == 0
        self.zygotes = ZygoteSlot(self.heap, self._thaw)
        #: How each plan's copy-on-write layers map to paths inside and on the host (for what a test changed).
        self._layers: dict[Hashable, tuple[changes.Layer, ...]] = {}

    @property
    def prefork_broken(self) -> str | None:
        return self.zygotes.broken

    def keeper(self) -> Keeper:
        if self._keeper is None:
            self._keeper = Keeper.start()
        return self._keeper

    def launch(self, spec: ContainerSpec, work: Work) -> Box:
        """A container built from ``spec`` and waiting for its first order, from a zygote where it may be."""
        group = None
        if spec.limits or spec.usage:
            try:
                group = self.cgroups.take(spec.id, spec.limits, spec.usage)
            except (cgroup.CgroupError, OSError) as exc:
                return _failed(f"could not create the container's cgroup: {exc}")
        try:
            keeper = self.keeper()
        except (KeeperError, OSError) as exc:
            return _failed(f"could not start the process that ends containers with pytest: {exc}", group)
        box = None
        if work.key is not None and self._prefork and self.zygotes.broken is None and eligible(spec):
            box = self._from_zygote(spec, work, keeper, group)
        if box is None:
            box = self._direct(spec, work, keeper, group)
        box.usage = spec.usage
        box.memory_limited = bool(spec.limits.memory)
        box.describe(self._layers_of(spec), spec.hostname)
        # While the container starts on the other core: collect what finished, make the next cgroup.
        self.reap()
        if group is not None:
            self.cgroups.prepare(spec.limits, spec.usage)
        return box

    def run(
        self,
        spec: ContainerSpec,
        work: Work,
        order: Any,
        on_frame: OnFrame,
        *,
        need_status: bool = False,
        terminal: int = -1,
    ) -> Outcome:
        """One container, one order: launch, run, end."""
        box = self.launch(spec, work)
        outcome = None
        try:
            outcome = box.run(spec.tail(), order, spec.timeout, on_frame, terminal)
        finally:
            self.end(box, outcome, need_status)
        return outcome

    def end(self, box: Box, outcome: Outcome | None, need_status: bool = False) -> None:
        """Whatever is left of the container is killed; its status is read when it tells something."""
        if need_status and outcome is not None and not outcome.ended:
            box.wait_exit(EXIT_WAIT)
        else:
            box.kill()
        box.close()
        telling = outcome is not None and outcome.kind in ("crashed", "timeout", "error", "refused")
        if telling or need_status:
            if outcome is not None:
                outcome.exitstatus = box.status(wait_child)
            if box.group is not None:
                remove(box.group)
        elif box.owner is None and box.child:
            # Namespace teardown happens as the child exits; nobody needs to wait for it here.
            self._unreaped.append((box.child, box.group))
        elif box.group is not None:
            self.cgroups.empty_later(box.group)  # the zygote reaps it; the cgroup goes once it is empty

    def _layers_of(self, spec: ContainerSpec) -> tuple[changes.Layer, ...]:
        layers = self._layers.get(spec.plan_key)
        if layers is None:
            layers = self._layers[spec.plan_key] = changes.layers_of(spec.plan)
        return layers

    def _direct(self, spec: ContainerSpec, work: Work, keeper: Keeper, group: cgroup.Cgroup | None) -> Box:
        cgroup_fds = tuple(group.attach_fds()) if group is not None else ()
        self.heap.prepare()
        try:
            started = fork.start(spec, work.factory, own_pidns=self._pidns_fd, cgroup_fds=cgroup_fds, thaw=self._thaw)
        finally:
            for fd in cgroup_fds:
                os.close(fd)
        failure = fork.establish(started, spec)
        if failure is None and started.pid1 is not None:
            try:
                keeper.register(started.pid1.pidfd)
            except KeeperError as exc:
                failure = str(exc)
        return Box(
            child=started.child,
            pid1=started.pid1,
            pgid=started.group,
            go_fd=started.go_fd,
            read_fd=started.read_fd,
            outputs=started.outputs,
            group=group,
            failure=failure,
            layers=started.layers,
        )

    def _from_zygote(self, spec: ContainerSpec, work: Work, keeper: Keeper, group: cgroup.Cgroup | None) -> Box | None:
        """A container the zygote built ahead of time; None: fork this one directly.

        With cgroup limits (root mode), the container is moved into its cgroup
        before it is handed its test: what it copied while it waited stays
        charged to pytest's own cgroup, a few MiB the limit does not count.
        """
        zygote = self.zygotes.get((work.key, spec.keep_fds), work, keeper, spec.keep_fds)
        if zygote is None:
            return None
        try:
            handed = zygote.take(spec)
        except ZygoteError as exc:
            self._stop_zygote(str(exc))
            return None
        box = Box(
            child=handed.child,
            pid1=handed.pid1,
            pgid=handed.group,
            go_fd=handed.go_fd,
            read_fd=handed.read_fd,
            outputs=handed.outputs,
            group=group,
            owner=zygote,
            layers=handed.layers,
        )
        if group is not None and handed.pid1 is not None:
            try:
                group.attach(handed.pid1.pid)
            except cgroup.CgroupError as exc:
                box.failure = f"could not move the container into its cgroup: {exc}"
        if handed.pid1 is not None and not handed.pid1.exited():
            with contextlib.suppress(OSError):  # built at low priority; runs its test at ours (root only)
                os.setpriority(os.PRIO_PROCESS, handed.pid1.pid, self._nice)
        with contextlib.suppress(ZygoteError):  # the next test finds out, and forks its own container
            zygote.prefetch(spec)
        return box

    def _stop_zygote(self, why: str | None = None) -> None:
        if why is not None:
            self.zygotes.broken = why
        self.zygotes.stop()

    @property
    def unreaped(self) -> bool:
        """Whether any child of ours may still exist: finished containers, the zygote."""
        return bool(self._unreaped or self.zygotes.retired) or self.zygotes.zygote is not None

    def quiesce(self) -> None:
        """Leave no child of ours running: stop the zygote (it ends its containers first), reap all.

        Before a test that runs in pytest's own process: one that waits for any
        child (a supervisor's test) must find only its own.  The zygote starts
        again when the next container is asked for.  The keeper is not our child.
        """
        self._stop_zygote()
        self.reap(block=True)

    def reap(self, block: bool = False) -> None:
        """Collect finished containers and remove their cgroups; with ``block``, wait for all of them."""
        self._unreaped.extend((pid, None) for pid in self.zygotes.retired)
        self.zygotes.retired.clear()
        still: list[tuple[int, cgroup.Cgroup | None]] = []
        for pid, group in self._unreaped:
            try:
                done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                done = pid
            if not done:
                still.append((pid, group))
            elif group is not None:
                remove(group)
        self._unreaped = still
        self.cgroups.collect(block=block)

    def close(self) -> None:
        self.quiesce()
        self.cgroups.close()
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        if self._pidns_fd >= 0:
            os.close(self._pidns_fd)
            self._pidns_fd = -1


def _failed(why: str, group: cgroup.Cgroup | None = None) -> Box:
    """A container that could not even be started: running it gives an error outcome with ``why``."""
    if group is not None:
        remove(group)
    return Box(child=0, pid1=None, go_fd=-1, read_fd=-1, outputs=(-1, -1, -1), failure=why)
