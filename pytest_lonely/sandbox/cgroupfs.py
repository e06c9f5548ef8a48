"""The cgroup filesystems of this machine: which hierarchies are mounted, where this process sits in
each, which one serves a controller, and the small file recipes every cgroup reader and writer uses.

A hybrid host (v1 controllers plus an empty v2 hierarchy, as systemd mounts it) is handled by
choosing, per controller, the hierarchy that has it (v2 first), and by also joining the v2 hierarchy
when we may write to it: its ``cgroup.kill`` kills a whole tree in one write, its ``cgroup.events``
says when the tree is empty, and its ``cpu.stat`` counts CPU time without any controller.

Discovery reads two small ``/proc`` files and never raises: a machine without cgroups must still run
tests that ask for no limit.  The choosing functions are pure over :class:`Hierarchy` values, so
layouts other than this machine's can be tested with made-up ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Sequence
from typing import Final

from . import mountinfo
from .limits import Limits

__all__ = [
    "DELEGATE_FIX",
    "Hierarchy",
    "describe",
    "discover",
    "discover_hierarchies",
    "needed",
    "not_delegated",
    "serving",
    "v2",
]

DELEGATE_FIX: Final = "systemd-run --user --scope -p Delegate=yes pytest ..."

#: What ``--lonely-usage`` reads: peak memory, processes at once, CPU time on v1.
_USAGE_CONTROLLERS: Final = frozenset({"memory", "pids", "cpuacct"})


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


# --------------------------------------------------------------------------- discovery


def discover() -> tuple[list[Hierarchy], list[str]]:
    """This process's hierarchies from ``/proc/self/mountinfo`` and ``/proc/self/cgroup``; never raises."""
    try:
        return discover_hierarchies(mountinfo.read_text(), read("/proc/self/cgroup"))
    except (OSError, ValueError) as e:
        return [], [f"cannot read this process's cgroups: {e}"]


def _own_cgroups(proc_cgroup: str) -> tuple[dict[frozenset[str], str], str | None]:
    """``/proc/self/cgroup`` -> (our path per set of v1 controllers, our v2 path)."""
    ours_v1: dict[frozenset[str], str] = {}
    ours_v2: str | None = None
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        number, names, path = parts
        if number == "0" and names == "":
            ours_v2 = path
        else:
            ours_v1[frozenset(names.split(","))] = path
    return ours_v1, ours_v2


def discover_hierarchies(mounts: str, proc_cgroup: str) -> tuple[list[Hierarchy], list[str]]:
    """Pair each cgroup mount with our place in it: ``(hierarchies, notes on mounts we cannot use)``.

    Pure over the two files' text, so that layouts other than this machine's (co-mounted
    ``cpu,cpuacct``, pure v2, a cgroup namespace whose mount root hides our cgroup) can be tested
    with made-up text.
    """
    ours_v1, ours_v2 = _own_cgroups(proc_cgroup)
    hierarchies: list[Hierarchy] = []
    notes: list[str] = []
    seen: set[frozenset[str] | None] = set()
    for entry in mountinfo.parse(mounts):
        if entry.fstype == "cgroup2":
            key: frozenset[str] | None = None
            ours = ours_v2
            controllers: frozenset[str] = frozenset()
        elif entry.fstype == "cgroup":
            # The super options hold the controllers among other flags (rw, clone_children, xattr...).
            options = set(entry.super_options.split(","))
            bound = next((n for n in ours_v1 if n <= options), frozenset())
            key = bound
            ours = ours_v1.get(bound)
            controllers = frozenset(n for n in bound if not n.startswith("name="))
            if not controllers:
                continue  # name=systemd and the like: no resources to control
        else:
            continue
        if key in seen or ours is None:
            continue
        root, mount_point = entry.root, entry.mount_point
        rel = os.path.relpath(ours, root) if ours != root else "."
        if rel.startswith(".."):
            notes.append(f"{mount_point} shows only {root}, not our cgroup {ours}")
            continue
        seen.add(key)
        own = os.path.normpath(os.path.join(mount_point, rel))
        if entry.fstype == "cgroup2":
            with contextlib.suppress(OSError):
                controllers = frozenset(read(os.path.join(own, "cgroup.controllers")).split())
        hierarchies.append(Hierarchy(1 if entry.fstype == "cgroup" else 2, controllers, mount_point, own))
    return hierarchies, notes


# --------------------------------------------------------------------------- choosing


def serving(hierarchies: Iterable[Hierarchy], controller: str) -> Hierarchy | None:
    """The hierarchy that serves ``controller``: v2 if it offers it, else the v1 mount that has it."""
    candidates = [h for h in hierarchies if controller in h.controllers]
    return next((h for version in (2, 1) for h in candidates if h.version == version), None)


def v2(hierarchies: Iterable[Hierarchy]) -> Hierarchy | None:
    return next((h for h in hierarchies if h.version == 2), None)


def needed(hierarchies: Sequence[Hierarchy], limits: Limits, usage: bool) -> list[Hierarchy]:
    """The hierarchies a container's cgroup needs a directory in, for these limits (and usage numbers)."""
    wanted = set(limits.controllers()) | (_USAGE_CONTROLLERS if usage else set())
    chosen: list[Hierarchy] = []
    for controller in sorted(wanted):
        h = serving(hierarchies, controller)
        if h is not None and h not in chosen:
            chosen.append(h)
    unified = v2(hierarchies)
    # The v2 tree adds one-write kill and CPU time; join it when we may, skip it quietly when not.
    if unified is not None and unified not in chosen and os.access(unified.own, os.W_OK):
        chosen.append(unified)
    return chosen


def describe(hierarchies: Sequence[Hierarchy]) -> str:
    """What this machine offers, for a message that says why a limit cannot be had."""
    v1 = [h for h in hierarchies if h.version == 1]
    unified = v2(hierarchies)
    v1_text = f"cgroup v1 controllers {', '.join(sorted(c for h in v1 for c in h.controllers))}" if v1 else None
    v2_text = (
        f"cgroup v2 at {unified.mount_point} offering {', '.join(sorted(unified.controllers)) or 'none'}"
        if unified
        else None
    )
    return "; ".join(t for t in (v1_text, v2_text) if t) or "no cgroup hierarchy is mounted"


def not_delegated(h: Hierarchy) -> str:
    """Why we may not make cgroups below our own in ``h``, and how to run pytest so that we may."""
    try:
        owner = f"owned by uid {os.stat(h.own).st_uid}"
    except OSError:
        owner = "unreadable"
    v1 = " (cgroup v1 cannot be delegated to a user; this needs cgroup v2)" if h.version == 1 else ""
    return (
        f"cannot create cgroups below {h.own} ({owner}; pytest runs as uid {os.geteuid()}): this cgroup is not "
        f"delegated to this user. Fix: run pytest as root, or in a delegated cgroup: {DELEGATE_FIX}{v1}"
    )


# --------------------------------------------------------------------------- file recipes


def read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode()


def write(path: str, text: str) -> None:
    """One ``write(2)``: a cgroup file takes a value per write, and a short write would be a different value."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def keyed(text: str) -> dict[str, str]:
    """``"oom_kill 3\\nunder_oom 0"`` -> ``{"oom_kill": "3", ...}`` (memory.events, cpu.stat, oom_control)."""
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value.strip()
    return out


def int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def procs(path: str) -> list[int]:
    """The pids in the cgroup directory ``path`` (none if it is gone)."""
    try:
        return [int(p) for p in read(os.path.join(path, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def tree(path: str) -> list[str]:
    """``path`` and every cgroup below it, deepest first (the order ``rmdir`` needs)."""
    out = [dirpath for dirpath, _, _ in os.walk(path, topdown=False, onerror=lambda _: None)]
    return out if out else ([path] if os.path.isdir(path) else [])
