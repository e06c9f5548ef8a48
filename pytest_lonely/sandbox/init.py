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

import dataclasses
import faulthandler
import os
import platform
import signal
import socket
import sys
import traceback
from typing import NoReturn

from . import _syscalls as sc
from . import cgroup, namespaces, process, protocol, rootfs
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
                sc.unshare(namespaces.flags(launch.spec.namespaces - {"pid"}))  # the parent made the PID one
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
    sc.unshare(namespaces.flags(launch.spec.namespaces))
    _write("/proc/self/uid_map", f"0 {launch.uid} 1\n")
    _write("/proc/self/setgroups", "deny\n")
    _write("/proc/self/gid_map", f"0 {launch.gid} 1\n")
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


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _pid1(launch: Launch, host_pid: int) -> int:
    """We are PID 1 of the new PID namespace: build the root, then run the body."""
    spec = launch.spec
    if launch.joins:
        # The root is built already: joining the mount namespace puts us at its root.
        for fd, nstype in launch.joins:
            sc.setns(fd, nstype)
        rootfs.mount_proc("/proc")
        rootfs.enter_cwd(spec.cwd)
        notes = launch.notes
    else:
        rootfs.enter_scratch()
        notes = tuple(rootfs.apply(spec.plan))
        rootfs.mount_proc(rootfs.NEW + "/proc")  # before the switch: rootless, the kernel wants a visible /proc
        rootfs.switch_root(spec.cwd)
    socket.sethostname(spec.hostname)
    if "net" in spec.namespaces:
        sc.interface_up("lo")
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
    launch.body(Inside(send=send, host_pid=host_pid, notes=notes))
    faulthandler.cancel_dump_traceback_later()
    flush_stdio()  # before "done", so the body's output comes before the parent's next line
    if not send.finished:
        send(protocol.Kind.DONE)
    return 0


def _forget_uname() -> None:
    # platform caches uname() in the parent; the child must see its own hostname.
    cache_clear = getattr(platform.uname, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
    if hasattr(platform, "_uname_cache"):
        platform._uname_cache = None
