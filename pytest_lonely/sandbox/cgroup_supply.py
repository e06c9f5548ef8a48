"""Where a container's cgroup comes from, and where it goes once the container is gone.

Making a cgroup costs about a millisecond of ``mkdir`` and knob writes, and
removing one must wait until no process is left in it.  Neither belongs on a
test's critical path: the next container's cgroup is made while the current
one runs (it most likely asks for the same limits), and a finished
container's cgroup is removed once the container is reaped, never waited for.
"""

from __future__ import annotations

import contextlib
import os

from . import cgroup
from .limits import Limits


def remove(group: cgroup.Cgroup) -> None:
    """Kill what is left in a container's cgroup and remove it; the session's cleanup retries a failure."""
    with contextlib.suppress(cgroup.CgroupError, OSError):
        group.remove()


class CgroupSupply:
    """Cgroups made ahead of time, and cgroups waiting for their container to be reaped."""

    def __init__(self, manager: cgroup.Manager) -> None:
        self.manager = manager
        #: A cgroup made ahead of time for the next container: (limits, usage, cgroup).
        self._spare: tuple[Limits, bool, cgroup.Cgroup] | None = None
        #: Cgroups of finished containers a zygote reaps, to remove once they are empty.
        self._emptying: list[cgroup.Cgroup] = []

    def take(self, name: str, limits: Limits, usage: bool) -> cgroup.Cgroup:
        """The spare if it fits, else a new one.  Raises :class:`~.cgroup.CgroupError` or ``OSError``."""
        spare, self._spare = self._spare, None
        if spare is not None:
            spare_limits, spare_usage, group = spare
            if spare_limits == limits and spare_usage == usage:
                return group
            remove(group)
        return self.manager.create(name, limits, usage)

    def prepare(self, limits: Limits, usage: bool) -> None:
        """Make the next container's cgroup now, while the current container runs on the other core."""
        if self._spare is not None:
            return
        with contextlib.suppress(cgroup.CgroupError, OSError):  # the next test makes its own, and says why
            self._spare = (limits, usage, self.manager.create(os.urandom(6).hex(), limits, usage))

    def empty_later(self, group: cgroup.Cgroup) -> None:
        """A cgroup whose container someone else reaps: removed by :meth:`collect` once nothing is in it."""
        self._emptying.append(group)

    def collect(self, block: bool = False) -> None:
        """Remove the cgroups that are empty now; with ``block``, all of them (their containers are gone)."""
        emptying, self._emptying = self._emptying, []
        for group in emptying:
            if block or not group.procs():
                remove(group)
            else:
                self._emptying.append(group)

    def close(self) -> None:
        self.collect(block=True)
        spare, self._spare = self._spare, None
        if spare is not None:
            remove(spare[2])
