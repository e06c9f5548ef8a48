"""Resource limits and usage per container, with cgroups v1 and v2.

Every container that asks for a limit (or for its usage) gets a cgroup of its
own, made for that test, in every hierarchy that serves a controller it needs.
The layout nests below the pytest process's own cgroup, so it stays inside
whatever CI job, systemd unit or delegated scope started pytest::

    <own cgroup>/lonely-<pytest pid>/<container name>/...   (per hierarchy)

A hybrid host (v1 controllers plus an empty v2 hierarchy, as systemd mounts
it) is handled by choosing, per controller, the hierarchy that has it (v2
first), and by also joining the v2 hierarchy when we may write to it: its
``cgroup.kill`` kills a whole tree in one write, its ``cgroup.events`` says
when the tree is empty, and its ``cpu.stat`` counts CPU time without any
controller.

The container enters its cgroups itself: the parent opens each
``cgroup.procs`` before forking (:meth:`Cgroup.attach_fds`) and the child's
first act is :func:`enter`, which writes ``0`` ("the writer") into them.  The
kernel checks the credentials of the *opener* (``f_cred``, since Linux 5.16),
so this works after the child entered a user namespace, and from PID 1 of a new
PID namespace, where a pid written as a number would be read in the writer's
namespace.  Nothing the container starts can run before it is inside.

Discovery reads two small ``/proc`` files, once per process, only when first
asked, and never raises: a machine without cgroups must still run tests that
ask for no limit.  Every refusal is a sentence naming the cause and the fix.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Final

__all__ = [
    "Cgroup",
    "CgroupError",
    "Hierarchy",
    "Limits",
    "Manager",
    "Usage",
    "enter",
    "format_bytes",
    "manager",
    "parse_cpus",
    "parse_memory",
    "parse_pids",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

#: The kernel's PID_MAX_LIMIT: ``pids.max`` refuses anything above it.
PIDS_LIMIT_MAX: Final = 4 * 1024 * 1024
#: Far above any machine, small enough that ``cpus * period`` stays an exact integer quota.
CPUS_MAX: Final = 100_000.0
#: The CFS bandwidth quota may not be below 1 ms, and the period not above 1 s.
_CFS_MIN_QUOTA_US: Final = 1000
_CFS_PERIOD_US: Final = 100_000
_CFS_MAX_PERIOD_US: Final = 1_000_000
CPUS_MIN: Final = _CFS_MIN_QUOTA_US / _CFS_MAX_PERIOD_US

MEMORY_ALLOWED: Final = "must be a number of bytes or one with a K, M or G suffix (binary units), e.g. 256M"
PIDS_ALLOWED: Final = f"must be a whole number of processes from 1 to {PIDS_LIMIT_MAX}, e.g. 64"
CPUS_ALLOWED: Final = (
    f"must be a number of CPUs from {CPUS_MIN:g} to {CPUS_MAX:g}, e.g. 1.5 (one and a half CPUs of time per second)"
)

DELEGATE_FIX: Final = "systemd-run --user --scope -p Delegate=yes pytest ..."

_PREFIX: Final = "lonely-"
_SESSION_DIR = re.compile(r"lonely-(\d+)(?:\.leaf)?\Z")
_MEMORY = re.compile(r"(\d+(?:\.\d+)?)([KMG])?\Z", re.IGNORECASE)
_UNITS: Final = {"": 1, "K": KiB, "M": MiB, "G": GiB}
_LIMIT_CONTROLLERS: Final = ("memory", "pids", "cpu")

#: How long :meth:`Cgroup.kill` waits for a killed tree to empty before it gives up.
_KILL_TIMEOUT_S: Final = 5.0


class CgroupError(Exception):
    """A cgroup could not be made, configured, entered or removed; the message says why and what to do."""


# --------------------------------------------------------------------------- limits and their parsing


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one container may use; ``None`` is "no limit".  Falsy when nothing is limited."""

    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None

    def __bool__(self) -> bool:
        return self.memory is not None or self.pids is not None or self.cpus is not None

    def controllers(self) -> frozenset[str]:
        """The cgroup controllers that enforce these limits."""
        wanted = {"memory": self.memory, "pids": self.pids, "cpu": self.cpus}
        return frozenset(name for name, value in wanted.items() if value is not None)


def _reject_bool(value: object, allowed: str) -> None:
    # bool is an int: memory=True must not quietly mean one byte.
    if isinstance(value, bool):
        raise ValueError(allowed)


def parse_memory(value: str | int | None) -> int | None:
    """``"256M"`` -> 268435456.  Binary units; a fraction is allowed with a suffix (``1.5G``) and rounded down."""
    if value is None:
        return None
    _reject_bool(value, MEMORY_ALLOWED)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        match = _MEMORY.match(value.strip())
        if match is None:
            raise ValueError(MEMORY_ALLOWED)
        digits, unit = match.groups()
        if "." in digits and not unit:
            raise ValueError(MEMORY_ALLOWED)
        number = int(float(digits) * _UNITS[(unit or "").upper()])
    else:
        raise ValueError(MEMORY_ALLOWED)
    if number < 1 or number >= 2**63:
        raise ValueError(f"{MEMORY_ALLOWED}; 0 and negative sizes are not limits (leave it unset for none)")
    return number


def parse_pids(value: str | int | None) -> int | None:
    """``"64"`` -> 64: the most processes (and threads) the container may have at once."""
    if value is None:
        return None
    _reject_bool(value, PIDS_ALLOWED)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            raise ValueError(PIDS_ALLOWED)
        number = int(text)
    elif isinstance(value, int):
        number = value
    else:
        raise ValueError(PIDS_ALLOWED)
    if not 1 <= number <= PIDS_LIMIT_MAX:
        raise ValueError(PIDS_ALLOWED)
    return number


def parse_cpus(value: str | float | None) -> float | None:
    """``"1.5"`` -> 1.5: CPU time per wall-clock second, as with ``docker run --cpus``."""
    if value is None:
        return None
    _reject_bool(value, CPUS_ALLOWED)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(CPUS_ALLOWED) from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise ValueError(CPUS_ALLOWED)
    if not math.isfinite(number) or not CPUS_MIN <= number <= CPUS_MAX:
        raise ValueError(CPUS_ALLOWED)
    return number


def format_bytes(n: int) -> str:
    """``268435456`` -> ``"256 MiB"``; a size as a person reads it, in the binary units the parser takes."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = n / size
            return f"{int(value)} {unit}" if n % size == 0 else f"{value:.1f} {unit}"
    return f"{n} bytes" if n != 1 else "1 byte"


def cfs_quota(cpus: float) -> tuple[int, int]:
    """``(quota_us, period_us)`` for ``cpus``: a 100 ms period, stretched to 1 s when the quota would be under 1 ms."""
    period = _CFS_PERIOD_US
    if cpus * period < _CFS_MIN_QUOTA_US:
        period = _CFS_MAX_PERIOD_US
    return max(_CFS_MIN_QUOTA_US, round(cpus * period)), period


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a container used; ``None`` where this kernel or this host's hierarchies cannot tell."""

    memory_peak: int | None = None  #: bytes
    cpu_seconds: float | None = None  #: user + system
    pids_peak: int | None = None  #: most processes and threads at once


# --------------------------------------------------------------------------- small file helpers


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode()


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _keyed(text: str) -> dict[str, str]:
    """``"oom_kill 3\\nunder_oom 0"`` -> ``{"oom_kill": "3", ...}`` (memory.events, cpu.stat, oom_control)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _procs(path: str) -> list[int]:
    try:
        return [int(p) for p in _read(os.path.join(path, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _tree(path: str) -> list[str]:
    """``path`` and every cgroup below it, deepest first (the order ``rmdir`` needs)."""
    out = [dirpath for dirpath, _, _ in os.walk(path, topdown=False, onerror=lambda _: None)]
    return out if out else ([path] if os.path.isdir(path) else [])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- hierarchies


@dataclasses.dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy, and where our own cgroup sits in it."""

    version: int  #: 1 or 2
    controllers: frozenset[str]  #: v1: bound to this mount; v2: available to our cgroup's children
    mount_point: str
    own: str  #: the directory of this process's cgroup

    def describe(self) -> str:
        names = ", ".join(sorted(self.controllers)) or "no controllers"
        return f"cgroup v{self.version} at {self.mount_point} ({names})"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def discover_hierarchies(mountinfo: str, proc_cgroup: str) -> tuple[list[Hierarchy], list[str]]:
    """Pair each cgroup mount with our place in it: ``(hierarchies, notes on mounts we cannot use)``.

    Pure, so that layouts other than this machine's (co-mounted ``cpu,cpuacct``, pure v2, a cgroup
    namespace whose mount root hides our cgroup) can be tested with made-up text.
    """
    ours_v1: dict[frozenset[str], str] = {}
    ours_v2: str | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, names, path = parts
        if parts[0] == "0" and names == "":
            ours_v2 = path
        else:
            ours_v1[frozenset(names.split(","))] = path
    hierarchies: list[Hierarchy] = []
    notes: list[str] = []
    seen: set[frozenset[str] | None] = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2":
            key: frozenset[str] | None = None
            ours = ours_v2
            controllers: frozenset[str] = frozenset()
        else:
            # The super options hold the controllers among other flags (rw, clone_children, xattr...).
            options = set(tail[2].split(","))
            bound = next((n for n in ours_v1 if n <= options), frozenset())
            key = bound
            ours = ours_v1.get(bound)
            controllers = frozenset(n for n in bound if not n.startswith("name="))
            if not controllers:
                continue  # name=systemd and the like: no resources to control
        if key in seen or ours is None:
            continue
        rel = os.path.relpath(ours, root) if ours != root else "."
        if rel.startswith(".."):
            notes.append(f"{mount_point} shows only {root}, not our cgroup {ours}")
            continue
        seen.add(key)
        own = os.path.normpath(os.path.join(mount_point, rel))
        if tail[0] == "cgroup2":
            with contextlib.suppress(OSError):
                controllers = frozenset(_read(os.path.join(own, "cgroup.controllers")).split())
        hierarchies.append(Hierarchy(1 if tail[0] == "cgroup" else 2, controllers, mount_point, own))
    return hierarchies, notes


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
                _write(os.path.join(path, "cgroup.procs"), str(pid))
            except OSError as e:
                raise CgroupError(f"cannot move pid {pid} into {path}: {e.strerror}") from e

    def procs(self) -> set[int]:
        """Every process in the container's cgroups and in any cgroup it made below them."""
        return {pid for path in self.paths for sub in _tree(path) for pid in _procs(sub)}

    # -- reading

    def oom_killed(self) -> bool:
        """Did the kernel's OOM killer act in this cgroup (v1 ``oom_control``, v2 ``memory.events``)?"""
        for name, key in (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")):
            path = self._file("memory", name)
            if path is not None:
                with contextlib.suppress(OSError):
                    if (_int_or_none(_keyed(_read(path)).get(key)) or 0) > 0:
                        return True
        return False

    def usage(self) -> Usage:
        """Peak memory, CPU time and the most processes at once, as far as this host's cgroups tell."""
        memory = cpu = pids = None
        with contextlib.suppress(OSError):
            if (path := self._file("memory", "memory.peak")) or (
                path := self._file("memory", "memory.max_usage_in_bytes")
            ):
                memory = _int_or_none(_read(path).strip())
        with contextlib.suppress(OSError):
            if path := self._file("cpuacct", "cpuacct.usage"):
                cpu = int(_read(path)) / 1e9
            elif path := self._file("", "cpu.stat"):
                usec = _int_or_none(_keyed(_read(path)).get("usage_usec"))
                cpu = None if usec is None else usec / 1e6
        with contextlib.suppress(OSError):
            if path := self._file("pids", "pids.peak"):
                pids = _int_or_none(_read(path).strip())
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
                    _write(os.path.join(path, "cgroup.kill"), "1")
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
            for sub in _tree(path):
                for pid in _procs(sub):
                    left.add(pid)
                    try:
                        pidfd = os.pidfd_open(pid)
                    except OSError:
                        continue  # already gone
                    try:
                        if pid in _procs(sub):
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
                    return _keyed(_read(os.path.join(path, "cgroup.events"))).get("populated") != "0"
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
        for sub in _tree(path):
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
        """Read ``/proc/self/mountinfo`` and ``/proc/self/cgroup``; an unreadable system yields no hierarchies."""
        try:
            hierarchies, notes = discover_hierarchies(_read("/proc/self/mountinfo"), _read("/proc/self/cgroup"))
        except (OSError, ValueError) as e:
            return cls((), [f"cannot read this process's cgroups: {e}"])
        return cls(hierarchies, notes)

    @property
    def session_name(self) -> str:
        return f"{_PREFIX}{self.pid}"

    # -- choosing hierarchies

    def _serving(self, controller: str) -> Hierarchy | None:
        """The hierarchy that serves ``controller``: v2 if it offers it, else the v1 mount that has it."""
        for version in (2, 1):
            for h in self.hierarchies:
                if h.version == version and controller in h.controllers:
                    return h
        return None

    def _v2(self) -> Hierarchy | None:
        return next((h for h in self.hierarchies if h.version == 2), None)

    def _needed(self, limits: Limits, usage: bool) -> list[Hierarchy]:
        wanted = set(limits.controllers())
        if usage:
            wanted |= {"memory", "pids", "cpuacct"}
        chosen: list[Hierarchy] = []
        for controller in sorted(wanted):
            h = self._serving(controller)
            if h is not None and h not in chosen:
                chosen.append(h)
        v2 = self._v2()
        # The v2 tree adds one-write kill and CPU time; join it when we may, skip it quietly when not.
        if v2 is not None and v2 not in chosen and os.access(v2.own, os.W_OK):
            chosen.append(v2)
        return chosen

    def _where(self) -> str:
        v1 = [h for h in self.hierarchies if h.version == 1]
        v2 = self._v2()
        v1_text = f"cgroup v1 controllers {', '.join(sorted(c for h in v1 for c in h.controllers))}" if v1 else None
        v2_text = (
            f"cgroup v2 at {v2.mount_point} offering {', '.join(sorted(v2.controllers)) or 'none'}" if v2 else None
        )
        return "; ".join(t for t in (v1_text, v2_text) if t) or "no cgroup hierarchy is mounted"

    def why_not(self, limits: Limits, usage: bool = False) -> str | None:
        """Why these limits (or usage numbers) cannot be had here, or ``None`` if they can.  Cheap; never raises."""
        if not limits and not usage:
            return None
        if self._failed:
            return self._failed
        for controller in sorted(limits.controllers()):
            if self._serving(controller) is None:
                notes = f"; {'; '.join(self.notes)}" if self.notes else ""
                return f"this machine has no {controller!r} cgroup controller ({self._where()}{notes})"
        needed = self._needed(limits, usage)
        if not needed:
            return f"no cgroup hierarchy can report usage here ({self._where()})"
        for h in needed:
            if h in self._parents:
                continue
            if not os.access(h.own, os.W_OK):
                return self._not_delegated(h)
        return None

    @staticmethod
    def _not_delegated(h: Hierarchy) -> str:
        try:
            owner = f"owned by uid {os.stat(h.own).st_uid}"
        except OSError:
            owner = "unreadable"
        v1 = " (cgroup v1 cannot be delegated to a user; this needs cgroup v2)" if h.version == 1 else ""
        return (
            f"cannot create cgroups below {h.own} ({owner}; pytest runs as uid {os.geteuid()}): this cgroup is not "
            f"delegated to this user. Fix: run pytest as root, or in a delegated cgroup: {DELEGATE_FIX}{v1}"
        )

    # -- creating

    def session_parent(self, h: Hierarchy) -> str:
        """``<own>/lonely-<pid>`` in ``h``, made on first use (after removing stale ones of dead sessions)."""
        parent = self._parents.get(h)
        if parent is not None:
            return parent
        if os.getpid() != self.pid:
            raise CgroupError("a cgroup manager was inherited across fork; call manager() in the new process")
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
                self._failed = self._not_delegated(h)
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
        missing = [c for c in wanted if c not in _read(control).split()]
        if not missing:
            return
        text = " ".join(f"+{c}" for c in missing)
        try:
            _write(control, text)
        except OSError as e:
            if e.errno != errno.EBUSY or path != h.own:
                raise
            others = sorted(set(_procs(path)) - {os.getpid()})
            if others:
                raise CgroupError(
                    f"cgroup v2 gives controllers to children of {path} only when no process sits in it, and "
                    f"{len(others)} other processes do (pids {', '.join(map(str, others[:5]))}). Fix: start "
                    f"pytest alone in a delegated cgroup: {DELEGATE_FIX}"
                ) from e
            leaf = os.path.join(path, f"{self.session_name}.leaf")
            with contextlib.suppress(FileExistsError):
                os.mkdir(leaf, 0o755)
            _write(os.path.join(leaf, "cgroup.procs"), "0")
            self._leaf[h] = leaf
            _write(control, text)
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
            for h in self._needed(limits, usage):
                path = os.path.join(self.session_parent(h), name)
                os.mkdir(path, 0o755)
                cgroup.dirs[h] = path
                self._configure(h, path, limits)
        except OSError as e:
            with contextlib.suppress(CgroupError):
                cgroup.remove()
            raise CgroupError(f"cannot set up cgroup {name!r}: {e.filename or ''}: {e.strerror}") from e
        except CgroupError:
            with contextlib.suppress(CgroupError):
                cgroup.remove()
            raise
        return cgroup

    @staticmethod
    def _configure(h: Hierarchy, path: str, limits: Limits) -> None:
        def put(name: str, value: object, optional: bool = False) -> None:
            file = os.path.join(path, name)
            if optional and not os.path.exists(file):
                return
            _write(file, str(value))

        if limits.memory is not None and "memory" in h.controllers:
            if h.version == 2:
                put("memory.max", limits.memory)
                put(
                    "memory.swap.max", 0, optional=True
                )  # v2 counts swap apart: none at all keeps RAM+swap at the limit
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
                _write(os.path.join(h.own, "cgroup.subtree_control"), " ".join(f"-{c}" for c in self._enabled[h]))
            with contextlib.suppress(OSError):
                _write(os.path.join(h.own, "cgroup.procs"), "0")
                os.rmdir(leaf)
                del self._leaf[h]
        if errors:
            raise CgroupError("; ".join(errors))


_manager: Manager | None = None


def manager() -> Manager:
    """This process's manager, discovered on first use (again after a fork)."""
    global _manager
    if _manager is None or _manager.pid != os.getpid():
        _manager = Manager.discover()
    return _manager
