"""The cgroups of each container: made below this process's own, entered by the child, read, killed, removed.

Every container that asks for a limit (or for its usage) gets a cgroup of its own, made for that
test, in every hierarchy that serves a controller it needs (:mod:`.cgroupfs` finds and chooses the
hierarchies).  The layout nests below the pytest process's own cgroup, so it stays inside whatever CI
job, systemd unit or delegated scope started pytest::

    <own cgroup>/lonely-<pytest pid>/<container name>/...   (per hierarchy)

:class:`Manager` owns the ``lonely-<pid>`` session parents and makes a :class:`Cgroup` per container.

The container enters its cgroups itself: the parent opens each ``cgroup.procs`` before forking
(:meth:`Cgroup.attach_fds`) and the child's first act is :func:`enter`, which writes ``0`` ("the
writer") into them.  The kernel checks the credentials of the *opener* (``f_cred``, since Linux
5.16), so this works after the child entered a user namespace, and from PID 1 of a new PID
namespace, where a pid written as a number would be read in the writer's namespace.  Nothing the
container starts can run before it is inside.  Every refusal is a sentence naming the cause and the fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from . import cgroupfs as fs
from .cgroupfs import DELEGATE_FIX, Hierarchy
from .limits import Limits, Usage, cfs_quota

__all__ = ["Cgroup", "CgroupError", "Manager", "configure", "enter"]

_PREFIX: Final = "lonely-"
_SESSION_DIR = re.compile(r"lonely-(\d+)(?:\.leaf)?\Z")
_LIMIT_CONTROLLERS: Final = ("memory", "pids", "cpu")

#: How long :meth:`Cgroup.kill` waits for a killed tree to empty before it gives up.
_KILL_TIMEOUT_S: Final = 5.0


class CgroupError(Exception):
    """A cgroup could not be made, configured, entered or removed; the message says why and what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- one container's cgroup


def enter(fds: Iterable[int]) -> None:
    """The child's first act: move itself into its cgroups through descriptors its parent opened, then close them.

    ``0`` means "the writing process"; it needs no pid, so it means the same in any PID namespace.
    An ``OSError`` here must end the child: it would otherwise run unlimited.
    """
    for fd in fds:
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


class Cgroup:
    """The cgroups of one container (one directory per hierarchy), from creation to removal.

    Created and configured up front, entered later: a helper may prepare the next test's cgroup while
    the current one runs.
    """

    def __init__(self, name: str, limits: Limits, dirs: Mapping[Hierarchy, str]) -> None:
        self.name = name
        self.limits = limits
        self.dirs: dict[Hierarchy, str] = dict(dirs)

    def __repr__(self) -> str:
        return f"Cgroup({self.name!r}, {self.limits!r}, {sorted(self.dirs.values())!r})"

    @property
    def paths(self) -> tuple[str, ...]:
        return tuple(self.dirs.values())

    def _file(self, controller: str, name: str) -> str | None:
        """The path of ``name`` in the hierarchy serving ``controller`` (``""`` for the v2 core files)."""
        for h, path in self.dirs.items():
            if (controller in h.controllers or (controller == "" and h.version == 2)) and os.path.exists(
                candidate := os.path.join(path, name)
            ):
                return candidate
        return None

    # -- entering

    def attach_fds(self) -> list[int]:
        """Open every ``cgroup.procs`` for writing, close-on-exec, for :func:`enter` in a child to be forked."""
        fds: list[int] = []
        try:
            for path in self.paths:
                fds.append(os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC))
        except OSError as e:
            for fd in fds:
                os.close(fd)
            raise CgroupError(f"cannot open {e.filename} to enter the container's cgroup: {e.strerror}") from e
        return fds

    def attach(self, pid: int) -> None:
        """Move a running process in from outside (its pid as this process sees it)."""
        for path in self.paths:
            try:
                fs.write(os.path.join(path, "cgroup.procs"), str(pid))
            except OSError as e:
                raise CgroupError(f"cannot move pid {pid} into {path}: {e.strerror}") from e

    def procs(self) -> set[int]:
        """Every process in the container's cgroups and in any cgroup it made below them."""
        return {pid for path in self.paths for sub in fs.tree(path) for pid in fs.procs(sub)}

    # -- reading

    def oom_killed(self) -> bool:
        """Did the kernel's OOM killer act in this cgroup (v1 ``oom_control``, v2 ``memory.events``)?"""
        for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            path = self._file("memory", name)
            if path is not None:
                with contextlib.suppress(OSError):
                    if (fs.int_or_none(fs.keyed(fs.read(path)).get(key)) or 0) > 0:
                        return True
        return False

    def usage(self) -> Usage:
        """Peak memory, CPU time and the most processes at once, as far as this host's cgroups tell."""
        memory = cpu = pids = None
        with contextlib.suppress(OSError):
            if (path := self._file("memory", "memory.peak")) or (
                path := self._file("memory", "memory.max_usage_in_bytes")
            ):
                memory = fs.int_or_none(fs.read(path).strip())
        with contextlib.suppress(OSError):
            if path := self._file("cpuacct", "cpuacct.usage"):
                cpu = int(fs.read(path)) / 1e9
            elif path := self._file("", "cpu.stat"):
                usec = fs.int_or_none(fs.keyed(fs.read(path)).get("usage_usec"))
                cpu = None if usec is None else usec / 1e6
        with contextlib.suppress(OSError):
            if path := self._file("pids", "pids.peak"):
                pids = fs.int_or_none(fs.read(path).strip())
        return Usage(memory, cpu, pids)

    # -- ending

    def kill(self, timeout: float = _KILL_TIMEOUT_S) -> None:
        """SIGKILL every process in the tree and wait until it is empty.

        v2: one write to ``cgroup.kill``, which also stops forks racing the kill.  v1 (or a process
        that left the v2 tree): kill what ``cgroup.procs`` lists until nothing is listed.  A pid is
        signalled through a pidfd taken while it is still listed, so a recycled pid is never hit.
        """
        for h, path in self.dirs.items():
            if h.version == 2 and os.path.isdir(path):
                with contextlib.suppress(FileNotFoundError):
                    fs.write(os.path.join(path, "cgroup.kill"), "1")
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while True:
            left = self._kill_listed()
            if not left:
                return
            if time.monotonic() > deadline:
                raise CgroupError(f"processes {sorted(left)} survived SIGKILL in {self.name} for {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _kill_listed(self) -> set[int]:
        left: set[int] = set()
        for path in self.paths:
            for sub in fs.tree(path):
                for pid in fs.procs(sub):
                    left.add(pid)
                    try:
                        pidfd = os.pidfd_open(pid)
                    except OSError:
                        continue  # already gone
                    try:
                        if pid in fs.procs(sub):
                            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
                    except OSError:
                        pass
                    finally:
                        os.close(pidfd)
        return left

    def populated(self) -> bool | None:
        """Whether any process is left in the tree, from v2's ``cgroup.events`` (one read); ``None`` without v2."""
        for h, path in self.dirs.items():
            if h.version == 2:
                try:
                    return fs.keyed(fs.read(os.path.join(path, "cgroup.events"))).get("populated") != "0"
                except FileNotFoundError:
                    return False
                except OSError:
                    return None
        return None

    def remove(self, timeout: float = _KILL_TIMEOUT_S) -> None:
        """Kill what is left and remove every directory, the ones the test made below ours included.

        The usual case, an empty tree without sub-cgroups, costs one read and one ``rmdir`` per
        hierarchy: every container process is in the v2 tree (leaving it needs write access to our
        root-owned parents), so ``populated 0`` there means nothing is left in the v1 trees either.
        """
        if self.populated() is not False and any(os.path.isdir(p) for p in self.paths):
            self.kill(timeout)
        _remove_trees(self.paths, timeout)


def _remove_trees(paths: Iterable[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for path in paths:
        try:
            os.rmdir(path)  # the usual case: no cgroup below it
            continue
        except FileNotFoundError:
            continue
        except OSError:
            pass
        for sub in fs.tree(path):
            while True:
                try:
                    os.rmdir(sub)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    # EBUSY: a killed process has not left yet.
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise CgroupError(f"cannot remove cgroup {sub}: {e.strerror}") from e
                    time.sleep(0.001)


def configure(h: Hierarchy, path: str, limits: Limits) -> None:
    """Write ``limits`` into the cgroup directory ``path`` of ``h``, in the files this version of cgroups has."""

    def put(name: str, value: object, optional: bool = False) -> None:
        file = os.path.join(path, name)
        if optional and not os.path.exists(file):
            return
        fs.write(file, str(value))

    if limits.memory is not None and "memory" in h.controllers:
        if h.version == 2:
            put("memory.max", limits.memory)
            put("memory.swap.max", 0, optional=True)  # v2 counts swap apart: none at all keeps RAM+swap at the limit
        else:
            put("memory.limit_in_bytes", limits.memory)
            put("memory.memsw.limit_in_bytes", limits.memory, optional=True)  # RAM+swap; exists with swapaccount
    if limits.pids is not None and "pids" in h.controllers:
        put("pids.max", limits.pids)
    if limits.cpus is not None and "cpu" in h.controllers:
        quota, period = cfs_quota(limits.cpus)
        if h.version == 2:
            put("cpu.max", f"{quota} {period}")
        else:
            put("cpu.cfs_period_us", period)
            put("cpu.cfs_quota_us", quota)


# --------------------------------------------------------------------------- the per-process manager


class Manager:
    """This process's view of the cgroup hierarchies, and owner of its ``lonely-<pid>`` session parents."""

    def __init__(self, hierarchies: Iterable[Hierarchy], notes: Iterable[str] = ()) -> None:
        self.hierarchies = tuple(hierarchies)
        self.notes = tuple(notes)
        self.pid = os.getpid()
        self._parents: dict[Hierarchy, str] = {}
        self._failed: str | None = None
        self._enabled: dict[Hierarchy, list[str]] = {}  # v2 controllers we turned on in our own cgroup
        self._leaf: dict[Hierarchy, str] = {}  # v2: where we moved ourselves to make room for controllers

    @classmethod
    def discover(cls) -> Manager:
        """This process's hierarchies (see :func:`.cgroupfs.discover`); an unreadable system yields none."""
        return cls(*fs.discover())

    @property
    def session_name(self) -> str:
        return f"{_PREFIX}{self.pid}"

    def why_not(self, limits: Limits, usage: bool = False) -> str | None:
        """Why these limits (or usage numbers) cannot be had here, or ``None`` if they can.  Cheap; never raises."""
        if not limits and not usage:
            return None
        if self._failed:
            return self._failed
        for controller in sorted(limits.controllers()):
            if fs.serving(self.hierarchies, controller) is None:
                notes = f"; {'; '.join(self.notes)}" if self.notes else ""
                return f"this machine has no {controller!r} cgroup controller ({fs.describe(self.hierarchies)}{notes})"
        needed = fs.needed(self.hierarchies, limits, usage)
        if not needed:
            return f"no cgroup hierarchy can report usage here ({fs.describe(self.hierarchies)})"
        for h in needed:
            if h in self._parents:
                continue
            if not os.access(h.own, os.W_OK):
                return fs.not_delegated(h)
        return None

    # -- creating

    def session_parent(self, h: Hierarchy) -> str:
        """``<own>/lonely-<pid>`` in ``h``, made on first use (after removing stale ones of dead sessions)."""
        parent = self._parents.get(h)
        if parent is not None:
            return parent
        if os.getpid() != self.pid:
            raise CgroupError("a cgroup manager was inherited across fork; discover a new one in this process")
        self.cleanup_stale(h)
        parent = os.path.join(h.own, self.session_name)
        try:
            if h.version == 2:
                self._enable_v2(h, h.own)
            with contextlib.suppress(FileExistsError):
                os.mkdir(parent, 0o755)
            if h.version == 2:
                self._enable_v2(h, parent)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                self._failed = fs.not_delegated(h)
                raise CgroupError(self._failed) from e
            self._failed = f"cannot create the session cgroup {parent}: {e.strerror}"
            raise CgroupError(self._failed) from e
        self._parents[h] = parent
        return parent

    def _enable_v2(self, h: Hierarchy, path: str) -> None:
        """Hand our limit controllers down from ``path`` to its children (``+memory`` in ``cgroup.subtree_control``).

        v2 allows that only in a cgroup without processes of its own.  In our own cgroup (a delegated
        scope, say) we are such a process: then we move ourselves into a leaf ``lonely-<pid>.leaf``
        beside the session parent, as systemd's delegation documentation asks, and undo it at cleanup.
        """
        wanted: list[str] = [c for c in _LIMIT_CONTROLLERS if c in h.controllers]
        control = os.path.join(path, "cgroup.subtree_control")
        missing = [c for c in wanted if c not in fs.read(control).split()]
        if not missing:
            return
        text = " ".join(f"+{c}" for c in missing)
        try:
            fs.write(control, text)
        except OSError as e:
            if e.errno != errno.EBUSY or path != h.own:
                raise
            others = sorted(set(fs.procs(path)) - {os.getpid()})
            if others:
                raise CgroupError(
                    f"cgroup v2 gives controllers to children of {path} only when no process sits in it, and "
                    f"{len(others)} other processes do (pids {', '.join(map(str, others[:5]))}). Fix: start "
                    f"pytest alone in a delegated cgroup: {DELEGATE_FIX}"
                ) from e
            leaf = os.path.join(path, f"{self.session_name}.leaf")
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf, 0o755)
            fs.write(os.path.join(leaf, "cgroup.procs"), "0")
            self._leaf[h] = leaf
            fs.write(control, text)
        if path == h.own:
            self._enabled[h] = missing

    def create(self, name: str, limits: Limits, usage: bool = False) -> Cgroup:
        """Make and configure the cgroups of one container; enter them later with :meth:`Cgroup.attach_fds`."""
        if "/" in name or name in ("", ".", ".."):
            raise CgroupError(f"cgroup name {name!r} must be one path component")
        reason = self.why_not(limits, usage)
        if reason:
            raise CgroupError(reason)
        dirs: dict[Hierarchy, str] = {}
        cgroup = Cgroup(name, limits, dirs)
        try:
            for h in fs.needed(self.hierarchies, limits, usage):
                path = os.path.join(self.session_parent(h), name)
                os.mkdir(path, 0o755)
                cgroup.dirs[h] = path
                configure(h, path, limits)
        except OSError as e:
            with contextlib.suppress(CgroupError):
                cgroup.remove()
            raise CgroupError(f"cannot set up cgroup {name!r}: {e.filename or ''}: {e.strerror}") from e
        except CgroupError:
            with contextlib.suppress(CgroupError):
                cgroup.remove()
            raise
        return cgroup

    # -- cleaning

    def _session_dirs(self, h: Hierarchy) -> Iterator[tuple[int, str]]:
        try:
            entries = os.listdir(h.own)
        except OSError:
            return
        for entry in entries:
            match = _SESSION_DIR.match(entry)
            if match:
                yield int(match.group(1)), os.path.join(h.own, entry)

    def cleanup_stale(self, h: Hierarchy | None = None) -> list[str]:
        """Remove the ``lonely-<pid>`` trees of sessions whose pytest is dead (one killed by SIGKILL)."""
        removed: list[str] = []
        for each in [h] if h is not None else self.hierarchies:
            if not os.access(each.own, os.W_OK):
                continue
            for pid, path in self._session_dirs(each):
                if pid == self.pid or _alive(pid):
                    continue
                with contextlib.suppress(CgroupError, OSError):  # another session may be cleaning it right now
                    Cgroup(os.path.basename(path), Limits(), {each: path}).remove()
                    removed.append(path)
        return removed

    def cleanup(self) -> None:
        """End of session: kill and remove every container cgroup and our session parents; undo v2 changes."""
        errors: list[str] = []
        for h, parent in list(self._parents.items()):
            try:
                Cgroup(self.session_name, Limits(), {h: parent}).remove()
                del self._parents[h]
            except CgroupError as e:
                errors.append(str(e))
        for h, leaf in list(self._leaf.items()):
            with contextlib.suppress(OSError):  # another session may still use the controllers
                fs.write(os.path.join(h.own, "cgroup.subtree_control"), " ".join(f"-{c}" for c in self._enabled[h]))
            with contextlib.suppress(OSError):
                fs.write(os.path.join(h.own, "cgroup.procs"), "0")
                os.rmdir(leaf)
                del self._leaf[h]
        if errors:
            raise CgroupError("; ".join(errors))
