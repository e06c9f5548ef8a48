"""The container's root filesystem: planned once in the parent, applied in each child.

Planning (reading the host's mount table, deciding what to overlay, bind or
create) is the expensive, policy-laden part, so the parent does it once per
distinct configuration and hands the child a flat tuple of operations.  The
child only replays them: every operation is one or two system calls, which
keeps the per-test cost down and makes the exact mount sequence easy to read
and to test.

The sequence follows bubblewrap: make every mount private, mount a scratch
tmpfs, ``pivot_root`` into it so that the host tree sits at ``/oldroot``
(which also un-hides whatever the scratch mount covered), assemble
``/newroot`` from ``/oldroot``, then ``pivot_root`` into ``/newroot`` and
detach everything else.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from . import _syscalls as sc

OLD: Final = "/oldroot"
NEW: Final = "/newroot"

#: Device nodes bound into the container's /dev.  No block devices, ever.
DEV_NODES: Final = ("null", "zero", "full", "random", "urandom", "tty")

_PSEUDO_FS: Final = frozenset(
    {
        "proc", "sysfs", "cgroup", "cgroup2", "devpts", "devtmpfs", "mqueue", "debugfs", "tracefs",
        "securityfs", "pstore", "bpf", "configfs", "fusectl", "binfmt_misc", "autofs", "hugetlbfs",
        "efivarfs", "nsfs", "rpc_pipefs", "selinuxfs",
    }
)  # fmt: skip
_SPECIAL_TOP: Final = ("proc", "sys", "dev", "tmp")
_SYSTEM_DIRS: Final = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")

# Operation codes.  An operation is a tuple whose first item is one of these.
MKDIR: Final = "mkdir"  # (MKDIR, path, mode)
MKDIRS: Final = "mkdirs"  # (MKDIRS, path): create missing parents and the dir, never through a symlink
TOUCH: Final = "touch"  # (TOUCH, path): an empty file to bind a file onto
SYMLINK: Final = "symlink"  # (SYMLINK, target, path)
MOUNT: Final = "mount"  # (MOUNT, source, target, fstype, flags, data)
COW: Final = "cow"  # (COW, lower, target, n, rootless): overlay, falling back to a read-only bind
BIND_RO: Final = "bind_ro"  # (BIND_RO, source, target): recursive bind, read-only where the kernel lets us
NOTE: Final = "note"  # (NOTE, text): something the plan already knows cannot be shown
OPTIONAL: Final = "optional"  # (OPTIONAL, host_path, (op, ...)): skipped with a note if any of it fails

Op = tuple[object, ...]


class RootfsError(Exception):
    """The container's root could not be built; the message names the step and the path."""


@dataclasses.dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str


_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as ``\\ooo``."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def read_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """The host's visible mounts, the last one per mountpoint, in mount order."""
    mounts: dict[str, Mount] = {}
    with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
            except ValueError:
                continue
            mountpoint = _unescape(fields[4])
            mounts.pop(mountpoint, None)
            mounts[mountpoint] = Mount(mountpoint, fields[sep + 1])
    return list(mounts.values())


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def minimal_cover(paths: Iterable[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Drop paths inside other paths; an outer path becomes copy-on-write if anything inside wanted it."""
    merged: dict[str, bool] = {}
    for path, cow in paths:
        merged[path] = merged.get(path, False) or cow
    result: list[tuple[str, bool]] = []
    # Sorting by components puts "/a/b" right after "/a" (a plain string sort puts "/a-b" between).
    for path in sorted(merged, key=lambda p: p.split("/")):
        if result and _under(path, result[-1][0]):
            outer, outer_cow = result[-1]
            result[-1] = (outer, outer_cow or merged[path])
        else:
            result.append((path, merged[path]))
    return result


@dataclasses.dataclass(frozen=True)
class HostLayout:
    """What the plan needs to know about the host, gathered once per session in the parent."""

    mounts: tuple[Mount, ...]
    #: (name, "dir"|"symlink"|"file", symlink target) for each entry of the host's /.
    top: tuple[tuple[str, str, str], ...]
    #: Paths the running test needs at their host location: (path, copy_on_write).
    needed: tuple[tuple[str, bool], ...]
    dev_nodes: tuple[str, ...]

    @classmethod
    def scan(cls, rootdir: Path) -> HostLayout:
        top: list[tuple[str, str, str]] = []
        with os.scandir("/") as it:
            for entry in sorted(it, key=lambda e: e.name):
                if entry.is_symlink():
                    top.append((entry.name, "symlink", os.readlink(entry.path)))
                elif entry.is_dir():
                    top.append((entry.name, "dir", ""))
                elif entry.is_file():
                    top.append((entry.name, "file", ""))
        cwd = os.getcwd()
        return cls(
            mounts=tuple(read_mounts()),
            top=tuple(top),
            needed=tuple(_needed_paths(rootdir, cwd)),
            dev_nodes=tuple(n for n in DEV_NODES if os.path.exists(f"/dev/{n}")),
        )


def _needed_paths(rootdir: Path, cwd: str) -> list[tuple[str, bool]]:
    """The interpreter, its import path and the project: a test must keep importing lazily inside."""
    ro: set[str] = set()
    for prefix in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        if not _under(prefix, "/usr") and prefix != "/":
            ro.add(prefix)
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        with_key = sysconfig.get_paths().get(key)
        if with_key:
            ro.add(with_key)
    ro.update(p for p in sys.path if p and os.path.isabs(p))
    wanted = [(os.path.realpath(p), False) for p in ro]
    wanted += [(os.path.realpath(str(rootdir)), True), (os.path.realpath(cwd), True)]
    return minimal_cover((p, cow) for p, cow in wanted if os.path.exists(p) and p != "/")


def _overlay_data(lower: str, n: int, rootless: bool) -> str:
    def esc(p: str) -> str:
        return p.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")

    data = f"lowerdir={esc(lower)},upperdir=/.u{n},workdir=/.w{n}"
    return data + ",userxattr" if rootless else data


@dataclasses.dataclass(frozen=True)
class PlanKey:
    rootfs: str | None  # an unpacked directory, or None for the host view
    rootless: bool
    network: bool


def plan(layout: HostLayout, key: PlanKey) -> tuple[Op, ...]:
    """The operations that assemble ``/newroot`` inside the scratch root; see :func:`apply`."""
    ops: list[Op] = [(MKDIR, NEW, 0o755)]
    counter = iter(range(1_000_000))
    covered: list[str] = []  # host paths the new root already shows at their own place

    if key.rootfs is None:
        if not key.rootless:
            ops.append((COW, OLD, NEW, next(counter), False))
            for m in sorted(layout.mounts, key=lambda m: m.mountpoint.count("/")):
                mp = m.mountpoint
                if mp == "/" or m.fstype in _PSEUDO_FS or any(_under(mp, "/" + t) for t in _SPECIAL_TOP):
                    continue
                ops.append((OPTIONAL, mp, ((COW, OLD + mp, NEW + mp, next(counter), False),)))
        else:
            # Overlayfs refuses a lower layer with locked submounts inside a user namespace,
            # so each top-level directory gets its own layer, or a read-only bind if it holds mounts.
            # The top level itself is a tmpfs: writable, throwaway, and a mount point for pivot_root.
            ops.append((MOUNT, "tmpfs", NEW, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755"))
            for name, kind, target in layout.top:
                path = "/" + name
                if kind == "symlink":
                    ops.append((SYMLINK, target, NEW + path))
                elif kind == "file":
                    ops.append((OPTIONAL, path, ((TOUCH, NEW + path), (BIND_RO, OLD + path, NEW + path))))
                elif name in _SPECIAL_TOP:
                    continue
                else:
                    ops.append((MKDIR, NEW + path, 0o755))
                    has_submounts = any(_under(m.mountpoint, path) and m.mountpoint != path for m in layout.mounts)
                    layer = (
                        (BIND_RO, OLD + path, NEW + path)
                        if has_submounts
                        else (COW, OLD + path, NEW + path, next(counter), True)
                    )
                    ops.append((OPTIONAL, path, (layer,)))
    else:
        # Mount points are made in the root's upper layer before the overlay goes up: through
        # the overlay, a user namespace's root may not write into directories that belong to
        # someone else on the host (they show up as the overflow uid).
        n = next(counter)
        upper = f"/.u{n}"
        prepared: list[Op] = []
        later: list[Op] = [(COW, OLD + key.rootfs, NEW, n, key.rootless)]

        def mount_point(path: str, is_dir: bool) -> bool:
            parts = path.strip("/").split("/")
            source = key.rootfs or "/"
            for index, part in enumerate(parts):
                source = os.path.join(source, part)
                if os.path.islink(source):
                    later.append((NOTE, f"{path} is not available inside the container: {source} is a symlink"))
                    return False
                if os.path.exists(source) and not os.path.isdir(source) and (index < len(parts) - 1 or is_dir):
                    later.append((NOTE, f"{path} is not available inside the container: {source} is not a directory"))
                    return False
            if is_dir:
                prepared.append((MKDIRS, upper + path))
            else:
                prepared.extend([(MKDIRS, upper + os.path.dirname(path)), (TOUCH, upper + path)])
            return True

        if not os.path.isdir(os.path.join(key.rootfs, "usr")):
            # A skeleton: borrow the host's system directories, read-only.
            for name, kind, target in layout.top:
                if name not in _SYSTEM_DIRS:
                    continue
                covered.append("/" + name)
                if kind == "symlink":
                    later.append((SYMLINK, target, NEW + "/" + name))
                elif kind == "dir" and mount_point("/" + name, True):
                    later.append((OPTIONAL, "/" + name, ((BIND_RO, OLD + "/" + name, NEW + "/" + name),)))
        for path, want_cow in layout.needed:
            if _under(path, "/tmp") or any(_under(path, c) for c in covered):
                continue
            if mount_point(path, os.path.isdir(path)):
                _expose(later, path, want_cow, key.rootless, counter)
        ops.extend(prepared)
        ops.extend(later)

    ops.append((MKDIRS, NEW + "/proc"))
    # /proc itself is mounted by PID 1 (mount_proc): it must show PID 1's own namespace.
    if key.rootfs is None:
        ops.append((MKDIRS, NEW + "/sys"))
        if key.rootless and key.network:
            ops.append((BIND_RO, OLD + "/sys", NEW + "/sys"))
        else:
            ops.append(
                (MOUNT, "sysfs", NEW + "/sys", "sysfs", sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, None)
            )
    _dev(ops, layout)
    ops.append((MKDIRS, NEW + "/tmp"))
    ops.append((MOUNT, "tmpfs", NEW + "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"))
    for path, want_cow in layout.needed:
        if _under(path, "/tmp"):
            _expose(ops, path, want_cow, key.rootless, counter)
    return tuple(ops)


def _expose(ops: list[Op], path: str, want_cow: bool, rootless: bool, counter: Iterator[int]) -> None:
    group: list[Op]
    if os.path.isdir(path):
        group = [(MKDIRS, NEW + path)]
        if want_cow:
            group.append((COW, OLD + path, NEW + path, next(counter), rootless))
        else:
            group.append((BIND_RO, OLD + path, NEW + path))
    else:
        group = [(MKDIRS, NEW + os.path.dirname(path)), (TOUCH, NEW + path), (BIND_RO, OLD + path, NEW + path)]
    ops.append((OPTIONAL, path, tuple(group)))


def _dev(ops: list[Op], layout: HostLayout) -> None:
    dev = NEW + "/dev"
    ops.append((MKDIRS, dev))
    ops.append((MOUNT, "tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, "mode=0755"))
    for name in layout.dev_nodes:
        ops.append((TOUCH, f"{dev}/{name}"))
        ops.append((MOUNT, f"{OLD}/dev/{name}", f"{dev}/{name}", None, sc.MS_BIND, None))
    ops.append((MKDIR, dev + "/pts", 0o755))
    ops.append(
        (MOUNT, "devpts", dev + "/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")
    )
    ops.append((SYMLINK, "pts/ptmx", dev + "/ptmx"))
    ops.append((MKDIR, dev + "/shm", 0o1777))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        ops.append((SYMLINK, target, f"{dev}/{name}"))


# --- child side -------------------------------------------------------------------------------


def enter_scratch() -> None:
    """Make all mounts private, then pivot into a fresh tmpfs with the host at ``/oldroot``."""
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    sc.mount("tmpfs", "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")
    os.chdir("/tmp")
    os.mkdir("oldroot", 0o755)
    sc.pivot_root(".", "oldroot")
    os.chdir("/")


def mount_proc(target: str) -> None:
    """A fresh /proc for the calling process's PID namespace; only PID 1 of that namespace calls this."""
    sc.mount("proc", target, "proc", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC)


def _mkdirs(path: str) -> None:
    parts = path.strip("/").split("/")
    current = ""
    for part in parts:
        current += "/" + part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            os.mkdir(current, 0o755)
            continue
        if stat.S_ISLNK(st.st_mode):
            raise RootfsError(
                f"cannot create mount point {path[len(NEW) :]!r}: {current[len(NEW) :]!r} is a symlink in the root"
            )
        if not stat.S_ISDIR(st.st_mode):
            raise RootfsError(
                f"cannot create mount point {path[len(NEW) :]!r}: {current[len(NEW) :]!r} is not a directory"
            )


def _bind_ro(source: str, target: str) -> None:
    sc.mount(source, target, None, sc.MS_BIND | sc.MS_REC)
    try:
        try:
            sc.mount_setattr_rdonly(target)  # the whole tree, submounts included (Linux >= 5.12)
        except OSError:
            sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.mount_flags_of(target))
    except OSError:
        # Never leave a writable window onto the host behind: drop the bind, then report.
        sc.umount2(target, sc.MNT_DETACH)
        raise


def _do(op: Op) -> None:
    code = op[0]
    if code == MOUNT:
        sc.mount(op[1], op[2], op[3], op[4], op[5])  # type: ignore[arg-type]
    elif code == COW:
        lower, target, n, rootless = op[1], op[2], op[3], op[4]
        if not os.path.isdir(f"/.u{n}"):  # may already hold mount points made by the plan
            os.mkdir(f"/.u{n}", 0o755)
        os.mkdir(f"/.w{n}", 0o755)
        try:
            sc.mount("overlay", target, "overlay", 0, _overlay_data(lower, n, rootless))  # type: ignore[arg-type]
        except OSError:
            _bind_ro(lower, target)  # type: ignore[arg-type]
    elif code == MKDIR:
        os.mkdir(op[1], op[2])  # type: ignore[arg-type]
        if op[2] != 0o755:
            os.chmod(op[1], op[2])  # type: ignore[arg-type]
    elif code == MKDIRS:
        _mkdirs(op[1])  # type: ignore[arg-type]
    elif code == TOUCH:
        if not os.path.lexists(op[1]):  # type: ignore[arg-type]
            os.close(os.open(op[1], os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))  # type: ignore[arg-type]
    elif code == SYMLINK:
        if not os.path.lexists(op[2]):  # type: ignore[arg-type]
            os.symlink(op[1], op[2])  # type: ignore[arg-type]
    elif code == BIND_RO:
        _bind_ro(op[1], op[2])  # type: ignore[arg-type]
    else:  # pragma: no cover - plans come from plan() only
        raise RootfsError(f"unknown operation {code!r}")


def apply(ops: tuple[Op, ...]) -> list[str]:
    """Replay a plan inside the scratch root.

    An ``OPTIONAL`` group that fails is skipped with a note (a host mount we
    cannot show is no reason to fail the test); any other failure is fatal.
    """
    notes: list[str] = []
    for op in ops:
        if op[0] == NOTE:
            notes.append(op[1])  # type: ignore[arg-type]
            continue
        if op[0] == OPTIONAL:
            try:
                for inner in op[2]:  # type: ignore[attr-defined]
                    _do(inner)
            except (OSError, RootfsError) as exc:
                notes.append(f"{op[1]} is not available inside the container: {exc}")
            continue
        try:
            _do(op)
        except (OSError, RootfsError) as exc:
            raise RootfsError(f"building the container root failed at {op[0]} {op[1:]!r}: {exc}") from exc
    return notes


def switch_root(cwd: str) -> None:
    """Pivot into ``/newroot`` and drop every trace of the host tree."""
    os.chdir(NEW)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    enter_cwd(cwd)


def enter_cwd(cwd: str) -> None:
    """The test starts where pytest was, if that path exists inside; else at ``/``."""
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")
