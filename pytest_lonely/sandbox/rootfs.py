"""The container's root filesystem: planned once in the parent, applied in each child.

Planning (reading the host's mount table, deciding what to overlay, bind or
create) is the expensive, policy-laden part, so the parent does it once per
distinct configuration into a flat tuple of operations, which keeps the exact
mount sequence easy to read and to test.  The child does not interpret them:
``mountplan`` compiles each plan once, in the parent, into system calls with
their arguments ready, and the child makes them in a tight loop.

The sequence follows bubblewrap: make every mount private, mount a scratch
tmpfs, ``pivot_root`` into it so that the host tree sits at ``/oldroot``
(which also un-hides whatever the scratch mount covered), assemble
``/newroot`` from ``/oldroot``, then ``pivot_root`` into ``/newroot`` and
detach everything else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Final, Literal

from . import _syscalls as sc
from . import mountinfo

OLD: Final = "/oldroot"
NEW: Final = "/newroot"

#: Parts of a fresh /proc that act on the whole host; PID 1 covers each that exists, read-only (root mode).
PROC_COVERS: Final = ("sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "scsi", "driver", "latency_stats", "mtrr")
#: Where root mode keeps its hidden read-only proc (see ``mountplan._hidden_proc``).
HIDDEN_PROC: Final = "/dev/.lonely-proc"

#: The files the engine itself writes into a container's root once it is built, before the test starts
#: (:func:`write_hosts`): not changes the test made.  A copy-up also makes their parent directories.
ENGINE_WRITES: Final = ("/etc/hosts",)
HOSTS: Final = "/etc/hosts"
#: Where the container's hostname resolves: a loopback address of its own, as Debian names a machine.
HOSTNAME_ADDRESS: Final = "127.0.1.1"
#: What a root without ``/etc/hosts`` gets besides its hostname: Docker's loopback lines.
_DEFAULT_HOSTS: Final = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"

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

# Operations: tagged tuples, plain data that ``mountplan`` compiles and ``match`` takes apart with full
# typing.
Mkdir = tuple[Literal["mkdir"], str, int]  # path, mode
Mkdirs = tuple[Literal["mkdirs"], str]  # create missing parents and the dir, never through a symlink
Touch = tuple[Literal["touch"], str]  # an empty file to bind a file onto
Symlink = tuple[Literal["symlink"], str, str]  # target, path
MountOp = tuple[Literal["mount"], str | None, str, str | None, int, str | None]  # source, target, fstype, flags, data
Cow = tuple[Literal["cow"], str, str, int, bool]  # lower, target, n, rootless: overlay, else a read-only bind
BindRo = tuple[Literal["bind_ro"], str, str]  # source, target: recursive, read-only where the kernel lets us
Bind = tuple[Literal["bind"], str, str]  # source, target: recursive and writable, a window onto the host
Step = Mkdir | Mkdirs | Touch | Symlink | MountOp | Cow | BindRo | Bind
Note = tuple[Literal["note"], str]  # something the plan already knows cannot be shown
Optional_ = tuple[Literal["optional"], str, tuple[Step, ...]]  # host path, steps: skipped with a note if any fails
Op = Step | Note | Optional_
Plan = tuple[Op, ...]


class RootfsError(Exception):
    """The container's root could not be built; the message names the step and the path."""


@dataclasses.dataclass(frozen=True)
class Mount:
    mountpoint: str
    fstype: str


def read_mounts(path: str = mountinfo.MOUNTINFO) -> list[Mount]:
    """The host's visible mounts, the last one per mountpoint, in mount order."""
    mounts: dict[str, Mount] = {}
    for entry in mountinfo.read(path):
        mounts.pop(entry.mount_point, None)
        mounts[entry.mount_point] = Mount(entry.mount_point, entry.fstype)
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
    ro.update(_imported_roots())
    wanted = [(os.path.realpath(p), False) for p in ro]
    wanted += [(os.path.realpath(str(rootdir)), True), (os.path.realpath(cwd), True)]
    return minimal_cover((p, cow) for p, cow in wanted if os.path.exists(p) and p != "/")


def _imported_roots() -> set[str]:
    """Where the loaded top-level packages live, when no ``sys.path`` entry shows it.

    An editable install (``pip install -e``) is found by a meta-path finder
    that maps the package to its checkout, which need not be on ``sys.path``:
    a subprocess inside the container must still find it there.
    """
    roots: set[str] = set()
    for name, module in list(sys.modules.items()):
        if "." in name:
            continue
        path = getattr(module, "__file__", None)
        if not isinstance(path, str) or not os.path.isabs(path):
            continue
        roots.add(os.path.dirname(path))  # a package's own directory, or the one holding a module
    return roots


def _overlay_data(lower: str, n: int, rootless: bool, xino: bool = True) -> str:
    """The options of layer ``n``.  ``xino=on``: overlayfs gives every file one inode number space, so
    ``stat`` and ``readdir`` agree on inode numbers and every file reports the overlay's ``st_dev``, as on
    any single filesystem (without it, upper and lower on different filesystems, they disagree)."""

    def esc(p: str) -> str:
        return p.replace("\\", "\\\\").replace(",", "\\,").replace(":", "\\:")

    data = f"lowerdir={esc(lower)},upperdir=/.u{n},workdir=/.w{n}"
    if xino:
        data += ",xino=on"
    return data + ",userxattr" if rootless else data


@dataclasses.dataclass(frozen=True)
class PlanKey:
    rootfs: str | None  # an unpacked directory, or None for the host view
    rootless: bool
    network: bool
    #: Host directories bound writable at their own path (the session's basetemp, for ``tmp_path``).
    writable: tuple[str, ...] = ()


class _Layers:
    """Numbers the copy-on-write layers of one plan: layer ``n`` keeps its upper and work directories at
    ``/.u{n}`` and ``/.w{n}`` in the scratch root, so each overlay needs a number no other one has."""

    def __init__(self) -> None:
        self._next = 0

    def new(self) -> int:
        n = self._next
        self._next += 1
        return n


def plan(layout: HostLayout, key: PlanKey) -> Plan:
    """The operations that assemble ``/newroot`` inside the scratch root; see :func:`apply`.

    In order: the root (the host view, or the configured tree with what the test needs of the host),
    ``/proc``'s mount point and ``/sys``, ``/dev``, then ``/tmp`` with whatever must be under it.
    """
    layers = _Layers()
    if key.rootfs is not None:
        root = _own_root(layout, key, key.rootfs, layers)
    elif key.rootless:
        root = _host_view_rootless(layout, layers)
    else:
        root = _host_view(layout, layers)
    return (
        ("mkdir", NEW, 0o755),
        *root,
        *_proc_and_sys(host_view=key.rootfs is None),
        *_dev(layout, hidden_proc=not key.rootless),
        *_tmp(layout, key, layers),
    )


def _host_view(layout: HostLayout, layers: _Layers) -> list[Op]:
    """Root mode: one overlay over the host's ``/``, and one over each real mount below it (an overlay
    shows only its own filesystem), shallowest first.  Pseudo filesystems and the directories the
    container gets fresh ones of are left out."""
    ops: list[Op] = [("cow", OLD, NEW, layers.new(), False)]
    for m in sorted(layout.mounts, key=lambda m: m.mountpoint.count("/")):
        mp = m.mountpoint
        if mp == "/" or m.fstype in _PSEUDO_FS or any(_under(mp, "/" + t) for t in _SPECIAL_TOP):
            continue
        ops.append(("optional", mp, (("cow", OLD + mp, NEW + mp, layers.new(), False),)))
    return ops


def _host_view_rootless(layout: HostLayout, layers: _Layers) -> list[Op]:
    """Rootless: overlayfs refuses a lower layer with locked submounts inside a user namespace, so each
    top-level directory gets its own layer, or a read-only bind if it holds mounts.  The top level
    itself is a tmpfs: writable, throwaway, and a mount point for ``pivot_root``."""
    ops: list[Op] = [("mount", "tmpfs", NEW, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")]
    for name, kind, target in layout.top:
        path = "/" + name
        if kind == "symlink":
            ops.append(("symlink", target, NEW + path))
        elif kind == "file":
            ops.append(("optional", path, (("touch", NEW + path), ("bind_ro", OLD + path, NEW + path))))
        elif name not in _SPECIAL_TOP:
            ops.append(("mkdir", NEW + path, 0o755))
            has_submounts = any(_under(m.mountpoint, path) and m.mountpoint != path for m in layout.mounts)
            layer: Step = (
                ("bind_ro", OLD + path, NEW + path)
                if has_submounts
                else ("cow", OLD + path, NEW + path, layers.new(), True)
            )
            ops.append(("optional", path, (layer,)))
    return ops


def _own_root(layout: HostLayout, key: PlanKey, rootfs: str, layers: _Layers) -> list[Op]:
    """A directory (an unpacked tarball or image) as the root, copy-on-write, plus what the test needs of the
    host at its host path: the system directories of a skeleton, the interpreter and the project, the
    writable windows.

    Mount points are made in the root's upper layer before the overlay goes up: through the overlay, a
    user namespace's root may not write into directories that belong to someone else on the host (they
    show up as the overflow uid).  So the plan is the mount points first, then the mounts.
    """
    n = layers.new()
    upper = f"/.u{n}"
    points: list[Op] = []
    mounts: list[Op] = [("cow", OLD + rootfs, NEW, n, key.rootless)]
    covered: list[str] = []  # host paths the new root already shows at their own place
    if not os.path.isdir(os.path.join(rootfs, "usr")):
        # A skeleton: borrow the host's system directories, read-only.
        for name, kind, target in layout.top:
            path = "/" + name
            if name not in _SYSTEM_DIRS:
                continue
            covered.append(path)
            if kind == "symlink":
                mounts.append(("symlink", target, NEW + path))
            elif kind == "dir":
                if (note := _not_a_mount_point(rootfs, path, is_dir=True)) is not None:
                    mounts.append(note)
                    continue
                points += _mount_point(upper, path, is_dir=True)
                mounts.append(("optional", path, (("bind_ro", OLD + path, NEW + path),)))
    for path, want_cow in layout.needed:
        if _under(path, "/tmp") or any(_under(path, c) for c in covered):
            continue
        is_dir = os.path.isdir(path)
        if (note := _not_a_mount_point(rootfs, path, is_dir)) is not None:
            mounts.append(note)
            continue
        points += _mount_point(upper, path, is_dir)
        mounts.append(_expose(path, want_cow, key.rootless, layers))
    for path in key.writable:
        if _under(path, "/tmp"):
            continue
        if (note := _not_a_mount_point(rootfs, path, is_dir=True)) is not None:
            mounts.append(note)
            continue
        points += _mount_point(upper, path, is_dir=True)
        mounts.append(("bind", OLD + path, NEW + path))
    return points + mounts


def _not_a_mount_point(rootfs: str, path: str, is_dir: bool) -> Note | None:
    """Why ``path`` cannot become a mount point in ``rootfs`` (a symlink or a file on the way), if it cannot."""
    parts = path.strip("/").split("/")
    source = rootfs
    for index, part in enumerate(parts):
        source = os.path.join(source, part)
        if os.path.islink(source):
            return ("note", f"{path} is not available inside the container: {source} is a symlink")
        if os.path.exists(source) and not os.path.isdir(source) and (index < len(parts) - 1 or is_dir):
            return ("note", f"{path} is not available inside the container: {source} is not a directory")
    return None


def _mount_point(upper: str, path: str, is_dir: bool) -> list[Op]:
    """Make ``path`` (a directory, or an empty file to bind a file onto) in the upper layer ``upper``."""
    if is_dir:
        return [("mkdirs", upper + path)]
    return [("mkdirs", upper + os.path.dirname(path)), ("touch", upper + path)]


def _expose(path: str, want_cow: bool, rootless: bool, layers: _Layers) -> Optional_:
    """Show the host's ``path`` at its own place: copy-on-write if the test may write there, else read-only."""
    group: tuple[Step, ...]
    if not os.path.isdir(path):
        group = (("mkdirs", NEW + os.path.dirname(path)), ("touch", NEW + path), ("bind_ro", OLD + path, NEW + path))
    elif want_cow:
        group = (("mkdirs", NEW + path), ("cow", OLD + path, NEW + path, layers.new(), rootless))
    else:
        group = (("mkdirs", NEW + path), ("bind_ro", OLD + path, NEW + path))
    return ("optional", path, group)


def _proc_and_sys(host_view: bool) -> list[Op]:
    # /proc itself is mounted by PID 1 (mount_proc): it must show PID 1's own namespace.
    ops: list[Op] = [("mkdirs", NEW + "/proc")]
    if host_view:
        # A read-only bind of the host's, made before the user namespace that then locks it.  A fresh
        # sysfs would have to be mounted after the new network namespace, so unlocked, and sysfs checks
        # only the mode bits: root inside could remount it writable.  The price: with network=False,
        # /sys/class/net shows the host's interfaces (read-only).
        ops += [("mkdirs", NEW + "/sys"), ("bind_ro", OLD + "/sys", NEW + "/sys")]
    return ops


def _dev(layout: HostLayout, hidden_proc: bool) -> list[Op]:
    dev = NEW + "/dev"
    ops: list[Op] = [
        ("mkdirs", dev),
        # nodev: a node made here opens nothing; the bound nodes below are mounts of their own and keep working.
        ("mount", "tmpfs", dev, "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "mode=0755"),
    ]
    if hidden_proc:
        ops.append(("mkdirs", NEW + HIDDEN_PROC + "/proc"))
    for name in layout.dev_nodes:
        ops.append(("touch", f"{dev}/{name}"))
        ops.append(("mount", f"{OLD}/dev/{name}", f"{dev}/{name}", None, sc.MS_BIND, None))
    ops += [
        ("mkdir", dev + "/pts", 0o755),
        ("mount", "devpts", dev + "/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620"),
        ("symlink", "pts/ptmx", dev + "/ptmx"),
        ("mkdir", dev + "/shm", 0o1777),
    ]
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        ops.append(("symlink", target, f"{dev}/{name}"))
    return ops


def _tmp(layout: HostLayout, key: PlanKey, layers: _Layers) -> list[Op]:
    """A fresh ``/tmp``, then what must be under it: interpreter or project trees that live in ``/tmp``, and
    the writable windows (for the host view, all of them: they go last, over whatever the view shows)."""
    ops: list[Op] = [
        ("mkdirs", NEW + "/tmp"),
        ("mount", "tmpfs", NEW + "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"),
    ]
    ops += [_expose(path, cow, key.rootless, layers) for path, cow in layout.needed if _under(path, "/tmp")]
    for path in key.writable:
        if key.rootfs is None or _under(path, "/tmp"):
            ops += [("mkdirs", NEW + path), ("bind", OLD + path, NEW + path)]
    return ops


# --- child side -------------------------------------------------------------------------------


def enter_scratch() -> None:
    """Make all mounts private, then pivot into a fresh tmpfs with the host at ``/oldroot``."""
    from . import mountplan  # it compiles this module's plans

    mountplan.enter_scratch()


def apply(ops: Plan) -> list[str]:
    """Replay a plan inside the scratch root, compiled (see :mod:`.mountplan`); returns what it could not show.

    An ``optional`` group that fails is skipped with a note (a host mount we
    cannot show is no reason to fail the test); any other failure is fatal.
    PID 1 runs its spec's program (compiled by the forker); this is for callers that hold only a plan.
    """
    from . import mountplan

    return mountplan.build(mountplan.compiled(ops))


def switch_root(cwd: str) -> None:
    """Pivot into ``/newroot`` and drop every trace of the host tree."""
    from . import mountplan

    mountplan.switch_root(cwd)


def hosts_text(current: str | None, hostname: str) -> str | None:
    """The container's ``/etc/hosts``: its root's own (Docker's loopback lines where it has none) with the
    container's hostname mapped to :data:`HOSTNAME_ADDRESS` on the first line, so that a lookup of that
    address finds it first too (``socket.getfqdn()``); ``None`` when the hostname is named there already."""
    text = _DEFAULT_HOSTS if current is None else current
    for line in text.splitlines():
        names = line.partition("#")[0].split()[1:]
        if hostname.lower() in (name.lower() for name in names):
            return None
    return f"{HOSTNAME_ADDRESS}\t{hostname}\n" + text


def write_hosts(hostname: str) -> None:
    """Make the container's hostname resolve, as Docker does: its own ``/etc/hosts`` names it.

    Called by PID 1 once the hostname is known, before the test.  Written in place when the root can
    take it: copy-on-write, so the host's file is never touched, and the test may still replace the file
    as it could in-process.  Where it cannot (the host's ``/etc/hosts`` seen read-only because it is a
    bind mount on the host, as in Docker; rootless, a file owned by a host uid outside the user
    namespace's map), a file on the container's own ``/dev`` tmpfs is bound over it instead, as Docker
    binds its own.  Best effort: a root without ``/etc`` that cannot be made keeps an unresolvable
    hostname rather than failing the test.
    """
    try:
        current: str | None = _read(HOSTS)
    except FileNotFoundError:
        current = None
    except OSError:
        return
    text = hosts_text(current, hostname)
    if text is None:
        return
    try:
        _write_in_place(HOSTS, text, create=current is None)
    except OSError:
        with contextlib.suppress(OSError):
            _bind_file_over(HOSTS, text)


def _read(path: str) -> str:
    """A small file's text, with plain system calls: this runs on every test's critical path."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def _write_in_place(path: str, text: str, create: bool) -> None:
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(os.path.dirname(path), 0o755)
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o644)
    try:
        os.write(fd, text.encode("utf-8", "surrogateescape"))
    finally:
        os.close(fd)


def _bind_file_over(path: str, text: str) -> None:
    """Bind a file holding ``text`` over ``path``; its source, on the container's ``/dev`` tmpfs, is unlinked."""
    source = f"/dev/.lonely-{os.path.basename(path)}"
    fd = os.open(source, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            os.write(fd, text.encode("utf-8", "surrogateescape"))
        finally:
            os.close(fd)
        sc.mount(source, path, None, sc.MS_BIND)
    finally:
        os.unlink(source)


def enter_cwd(cwd: str) -> None:
    """The test starts where pytest was, if that path exists inside; else at ``/``."""
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir("/")
