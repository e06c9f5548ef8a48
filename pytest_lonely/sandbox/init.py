"""Everything the engine does after the fork, inside the container, before and after the caller's body.

The child's only link to the parent is the pipe, and everything it needs
arrives in a :class:`Launch` built before the fork.  Every path out of
:func:`main` ends in ``os._exit`` so that no parent-side ``atexit`` handler,
buffered output or ``finally`` block runs twice.

The order follows the facts of the kernel (see bubblewrap): guard against
the parent's death, create the namespaces, make every mount private, build
the root in a scratch tmpfs, pivot into it, and only then run foreign code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import mmap
import os
import platform
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from . import _syscalls as sc
from . import cgroup, namespaces, prefault, process, protocol, rootfs
from .spec import Body, ContainerSpec, Inside


@dataclasses.dataclass(frozen=True)
class Launch:
    """Everything the child needs, prepared by the parent so the child does no planning."""

    spec: ContainerSpec
    body: Body
    uid: int
    gid: int
    parent_pid: int
    write_fd: int
    diag_fd: int
    #: Namespaces built ahead of time by the prebuild helper: (fd, CLONE_* type) to join; empty: build here.
    joins: tuple[tuple[int, int], ...] = ()
    #: What the prebuild could not show inside (as if the child had built the root itself).
    notes: tuple[str, ...] = ()
    #: ``cgroup.procs`` of the container's cgroups, opened by the parent: entered before anything else.
    cgroup_fds: tuple[int, ...] = ()
    #: Root mode, root built here: the identity-mapped user namespace to join after the root is built.
    userns_fd: int = -1
    #: Built ahead of time by a zygote: wait for GO on ``go_fd``, whose order this turns into the body.
    factory: Callable[[Any], Body] | None = None
    go_fd: int = -1
    #: Shared by a zygote's containers: which pages to copy while waiting for GO (see prefault.py).
    prefault: mmap.mmap | None = None
    #: This container writes down what it copied, for the ones after it (a sample: it costs two scans).
    prefault_record: bool = False


def main(launch: Launch) -> NoReturn:
    """Entry point right after ``os.fork()``; never returns."""
    status = process.EXIT_INTERNAL
    try:
        if launch.spec.rootless:
            status = _rootless_middle(launch)
        else:
            host_pid = process.guard_parent(launch.parent_pid)
            cgroup.enter(launch.cgroup_fds)  # before the test can fork anything
            if not launch.joins:
                # The parent made the PID one.  Only the mount namespace now, as host root: UTS, IPC and NET
                # are made after the user namespace, so that they belong to it and root inside may use them.
                names = launch.spec.namespaces - {"pid"} if launch.spec.privileged else {"mnt"}
                sc.unshare(namespaces.flags(names))
            status = _pid1(launch, host_pid)
    except BaseException as exc:  # the parent must always learn why
        send_error(launch.write_fd, exc)
    finally:
        flush_stdio()
        os._exit(status)


def flush_stdio() -> None:
    """With ``-s`` the test writes to the real, block-buffered stdout; ``os._exit`` would drop it."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def send_error(fd: int, exc: BaseException) -> None:
    if isinstance(exc, (rootfs.RootfsError, OSError)):
        message = f"could not start the container: {exc}"
    else:
        message = "pytest-lonely internal error in the container:\n" + "".join(traceback.format_exception(exc))
    try:
        protocol.Sender(fd)(protocol.Kind.ERROR, message)
    except OSError:
        pass


def _rootless_middle(launch: Launch) -> int:
    """Rootless: enter a user namespace, map ourselves to root, then fork PID 1."""
    process.guard_parent(launch.parent_pid)
    cgroup.enter(launch.cgroup_fds)  # PID 1 and everything it starts inherit it
    # UTS, IPC and NET come later, in PID 1's second user namespace, which must own them.
    sc.unshare(namespaces.flags({"user", "pid", "mnt"}))
    _map_root(launch.uid, launch.gid)
    middle = os.getpid()

    def pid1() -> int:
        try:
            host_pid = process.guard_parent(middle)
            # The parent kills the middle process on a timeout; it needs PID 1's host PID too.
            protocol.Sender(launch.write_fd)(protocol.Kind.HELLO, {"host_pid": host_pid})
            return _pid1(launch, host_pid)
        except BaseException as exc:
            send_error(launch.write_fd, exc)
            return process.EXIT_INTERNAL
        finally:
            flush_stdio()

    pid = process.spawn(pid1)
    os.close(launch.write_fd)
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        # Die the same way, so the parent reports the real signal.
        sig = os.WTERMSIG(wait_status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(middle, sig)
    return os.waitstatus_to_exitcode(wait_status)


def _map_root(uid: int, gid: int) -> None:
    """Map root of the user namespace we just made to ``uid``/``gid`` of its parent: all we may map ourselves."""
    _write("/proc/self/uid_map", f"0 {uid} 1\n")
    _write("/proc/self/setgroups", "deny\n")
    _write("/proc/self/gid_map", f"0 {gid} 1\n")


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _pid1(launch: Launch, host_pid: int) -> int:
    """We are PID 1 of the new PID namespace: build the root, lock it, then run the body.

    Root mode (docs/boundary-design.md): every mount is made as host root, then
    we enter an identity-mapped user namespace and copy the mount namespace into
    it, which locks every mount: root inside cannot remount, unmount or
    ``mount_setattr`` them, and its capabilities count only for what that user
    namespace owns.  ``privileged`` skips the user namespace: host root as before.
    """
    spec = launch.spec
    locked = not spec.rootless and not spec.privileged
    if launch.joins:
        # Prebuilt (root mode only): M1 first, while still host root; it puts us at its root.
        joins = {nstype: fd for fd, nstype in launch.joins}
        sc.setns(joins.pop(sc.CLONE_NEWNS), sc.CLONE_NEWNS)
        rootfs.mount_proc("/proc")
        _seal_proc("")
        sc.setns(joins.pop(sc.CLONE_NEWUSER), sc.CLONE_NEWUSER)
        sc.unshare(sc.CLONE_NEWNS)  # the lock: after /proc, since later mounts would not be locked
        for nstype, fd in joins.items():  # UTS, IPC (and NET), owned by the user namespace we are root in
            sc.setns(fd, nstype)
        rootfs.enter_cwd(spec.cwd)
        notes = launch.notes
    else:
        rootfs.enter_scratch()
        notes = tuple(rootfs.apply(spec.plan))
        rootfs.mount_proc(rootfs.NEW + "/proc")  # before the switch: rootless, the kernel wants a visible /proc
        if locked:
            _seal_proc(rootfs.NEW)
        rootfs.switch_root(spec.cwd)
        if locked:
            sc.setns(launch.userns_fd, sc.CLONE_NEWUSER)
        elif spec.rootless:
            # The binds rootfs.apply made are ours (this user namespace's), so not locked: a second user
            # namespace, root mapped to root, and the copy of the mount namespace into it locks them too.
            sc.unshare(sc.CLONE_NEWUSER)
            _map_root(0, 0)
        if locked or spec.rootless:
            # No CLONE_NEWCGROUP: made inside the user namespace it would let root mount cgroup
            # hierarchies and mkdir at the host's hierarchy root (the container has no cgroup of its own).
            sc.unshare(namespaces.flags(spec.namespaces - {"pid", "user"}))
    if "net" in spec.namespaces:
        sc.interface_up("lo")
    # Last: nothing of the parent's may reach the body: the host's PID namespace fd, the pool's socket
    # and namespace fds, the user's session fixtures' files and sockets.  Really closed, not CLOEXEC:
    # the body runs in this process.
    sc.close_fds_except({0, 1, 2, launch.write_fd, launch.diag_fd, launch.go_fd, *spec.keep_fds} - {-1})
    body = launch.body
    before: prefault.Snapshot | None = None
    if launch.factory is not None:
        if launch.prefault is not None:
            before = _take_ahead(launch.prefault, launch.go_fd, launch.prefault_record)
        spec, body = _await_go(launch.go_fd, launch.factory, spec)
        os.close(launch.go_fd)
    socket.sethostname(spec.hostname)
    rootfs.write_hosts(spec.hostname)  # the hostname resolves, as in Docker (rootfs.ENGINE_WRITES)
    for name, value in spec.env:
        os.environ[name] = value
    if "HOSTNAME" in os.environ:
        os.environ["HOSTNAME"] = spec.hostname
    _forget_uname()
    faulthandler.enable(file=launch.diag_fd, all_threads=True)
    if spec.timeout:
        # Only a traceback: the parent kills the whole container with SIGKILL just after.
        faulthandler.dump_traceback_later(spec.timeout, exit=False, file=launch.diag_fd)
    send = protocol.Sender(launch.write_fd)
    body(Inside(send=send, host_pid=host_pid, notes=notes))
    faulthandler.cancel_dump_traceback_later()
    flush_stdio()  # before "done", so the body's output comes before the parent's next line
    if not send.finished:
        send(protocol.Kind.DONE)
    # Tearing the container down is nobody's critical path: leave the cores to the next test.
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 19)
    if launch.prefault is not None and before is not None:
        with contextlib.suppress(OSError):
            prefault.record(launch.prefault, before)
    return 0


def _take_ahead(shared: mmap.mmap, go_fd: int, sample: bool) -> prefault.Snapshot | None:
    """Copy ahead of time what earlier tests copied, unless the test is here already (then it waits).

    Returns what a sampled container needs to write down afterwards what it copied.
    """
    if select.select([go_fd], [], [], 0)[0]:
        return None
    try:
        before = prefault.snapshot() if sample else None
        prefault.take_ahead(shared, go_fd)
    except OSError:
        return None
    return before


def _await_go(fd: int, factory: Callable[[Any], Body], spec: ContainerSpec) -> tuple[ContainerSpec, Body]:
    """Built ahead of time: block until the caller hands over the work; EOF first means discarded."""
    reader = protocol.FrameReader()
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            os._exit(0)
        frames = reader.feed(data)
        if frames:
            kind, (tail, order) = frames[0]
            if kind is not protocol.Kind.GO:
                raise protocol.ProtocolError(f"expected {protocol.Kind.GO.value!r}, got {kind.value!r}")
            return spec.with_tail(tail), factory(order)


def _seal_proc(root: str) -> None:
    """Read-only covers over host-wide parts of ``/proc``, and the hidden proc nested PID namespaces need."""
    rootfs.cover_proc(root + "/proc")
    rootfs.hide_readonly_proc(root)


def _forget_uname() -> None:
    # platform caches uname() in the parent; the child must see its own hostname.
    cache_clear = getattr(platform.uname, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
    if hasattr(platform, "_uname_cache"):
        platform._uname_cache = None
