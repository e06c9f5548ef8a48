"""Everything the engine does after the fork, inside the container, before and between the caller's bodies.

The child's only links to its forker are the pipes and the launch channel,
and everything it needs arrives in a :class:`Launch` built before the fork.
Every path out of :func:`main` ends in ``os._exit`` so that no parent-side
``atexit`` handler, buffered output or ``finally`` block runs twice.

The order follows the facts of the kernel (see bubblewrap): guard against
the parent's death, leave pytest's process group (not its session: the
terminal stays usable, see seccomp), create the
namespaces, make every mount private, build the root in a scratch tmpfs,
pivot into it, enter a user namespace of its own, and only then run foreign
code, one order (GO) at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import os
import platform
import signal
import socket
import sys
import tempfile
import traceback
from typing import Any, Final, NoReturn

from . import _syscalls as sc
from . import cgroup, mountplan, namespaces, process, protocol, rootfs, seccomp
from .spec import ContainerSpec, Factory, Inside

#: PID 1 to its forker over the launch channel: "I am in my user namespace, write its ID maps".
ASK_MAPS: Final = b"u"
#: The forker's answer: the maps are written.
MAPPED: Final = b"m"
#: PID 1 to its forker: here are descriptors of my copy-on-write layers (the scratch tmpfs, and rootless the
#: top-level tmpfs of the host view), for the parent to read what a test changed, even after it died.
LAYERS: Final = b"l"


@dataclasses.dataclass(frozen=True)
class Launch:
    """Everything the child needs, prepared by its forker so that the child does no planning."""

    spec: ContainerSpec
    factory: Factory
    uid: int
    gid: int
    parent_pid: int
    #: The report pipe's write end.
    write_fd: int
    #: The GO pipe's read end: each order arrives here; EOF ends the container.
    go_fd: int
    #: The launch channel to the forker (see fork.py); PID 1 drops it before any test code runs.
    ctl_fd: int
    #: The container's own stdout, stderr and diagnostics files.
    outputs: tuple[int, int, int]
    #: ``cgroup.procs`` of the container's cgroups, opened by the parent: entered before anything else.
    cgroup_fds: tuple[int, ...] = ()
    #: The SIGINT handler PID 1 runs: its forker's (the zygote and the middle process ignore SIGINT).
    sigint: Any = None


def main(launch: Launch) -> NoReturn:
    """Entry point right after the fork; never returns."""
    status = process.EXIT_INTERNAL
    try:
        if launch.spec.rootless:
            status = _rootless_middle(launch)
        else:
            host_pid = process.guard_parent(launch.parent_pid)
            cgroup.enter(launch.cgroup_fds)  # before the test can fork anything
            # Only the mount namespace now, as host root: UTS, IPC and NET are made after the user namespace,
            # so that they belong to it and root inside may use them.
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
    """Rootless: enter a user namespace, map ourselves to root, fork PID 1, hand the forker its pidfd.

    This process runs no test code, so what it says on the launch channel can
    be believed.  PID 1 inherits that channel, but only to send its layers
    before any test code runs; then it is held by ``/dev/null``.
    """
    process.guard_parent(launch.parent_pid)
    # In pytest's process group until PID 1 leaves it: Ctrl-C there is pytest's to forward, not ours to die of.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cgroup.enter(launch.cgroup_fds)  # PID 1 and everything it starts inherit it
    # PID 1's process group, made before the PID namespace: this child must not become its init.
    group = sc.group_leader()
    # UTS, IPC and NET come later, in PID 1's second user namespace, which must own them.
    sc.unshare(namespaces.flags({"user", "pid", "mnt"}))
    namespaces.map_root(launch.uid, launch.gid)
    middle = os.getpid()

    def pid1() -> int:
        try:
            return _pid1(launch, process.guard_parent(middle))
        except BaseException as exc:
            send_error(launch.write_fd, exc)
            return process.EXIT_INTERNAL
        finally:
            flush_stdio()

    # Now: once PID 1 has switched root (our mount namespace is its), /proc and /dev are its own.
    opened = process.open_fds()
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    pid = process.spawn(pid1)
    process.join_group(pid, group)
    pidfd = os.pidfd_open(pid)
    try:
        socket.send_fds(socket.socket(fileno=launch.ctl_fd), [b"p%d %d" % (pid, group)], [pidfd])
    finally:
        os.close(pidfd)
    # Nothing of pytest's, and none of the container's pipes, stays open here: EOF must reach the parent
    # when PID 1 dies, and a fixture's socket must close when the parent closes it.
    process.hold_fds(set(), opened, null)
    _, wait_status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(wait_status):
        # Die the same way, so the parent reports the real signal.
        sig = os.WTERMSIG(wait_status)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(middle, sig)
    return os.waitstatus_to_exitcode(wait_status)


def _pid1(launch: Launch, host_pid: int) -> int:
    """We are PID 1 of the new PID namespace: build the root, lock it, then run each order's body.

    Root mode (docs/boundary-design.md): every mount is made as host root, then
    we enter a user namespace of our own, whose identity ID maps the forker
    writes, and copy the mount namespace into it, which locks every mount:
    root inside cannot remount, unmount or ``mount_setattr`` them, and its
    capabilities count only for what that user namespace owns.  Rootless, the
    second user namespace (root mapped to root) locks the binds we made.
    ``privileged`` skips the user namespace: host root as before.
    """
    spec = launch.spec
    locked = not spec.rootless and not spec.privileged
    ctl = socket.socket(fileno=launch.ctl_fd)
    # The plan was compiled by our forker (spec.program): here, only its system calls (see mountplan).
    mountplan.enter_scratch()
    layers = [os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)]
    notes = tuple(mountplan.build(spec.program))
    if spec.rootless and spec.plan_key.rootfs is None:  # the host view's top level is a tmpfs of its own
        layers.append(os.open(rootfs.NEW, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
    # /proc before the switch (rootless, the kernel wants a visible /proc); root mode, its covers are made
    # before the user namespace below, whose copy of the mounts locks them.
    mountplan.mount_proc(locked)
    mountplan.switch_root(spec.cwd)
    try:  # no door into its own layers stays open here: the parent reads them, the test never
        socket.send_fds(ctl, [LAYERS], layers)
    finally:
        for fd in layers:
            os.close(fd)
    if locked:
        sc.unshare(sc.CLONE_NEWUSER)
        ctl.send(ASK_MAPS)
        if ctl.recv(8) != MAPPED:
            raise OSError("the forker did not map the container's user namespace")
    ctl.detach()  # the number is held by /dev/null below, with the rest
    if spec.rootless:
        sc.unshare(sc.CLONE_NEWUSER)
        namespaces.map_root(0, 0)
    if locked or spec.rootless:
        # No CLONE_NEWCGROUP: made inside the user namespace it would let root mount cgroup
        # hierarchies and mkdir at the host's hierarchy root (the container has no cgroup of its own).
        sc.unshare(namespaces.flags(spec.namespaces - {"pid", "user"}))
        # Before any test code: no keystrokes pushed into pytest's terminal (see seccomp).  A kernel
        # without seccomp filters leaves that to dev.tty.legacy_tiocsti = 0, as the README says.
        with contextlib.suppress(OSError):
            seccomp.install()
    if "net" in spec.namespaces:
        sc.interface_up("lo")
    out_fd, err_fd, diag_fd = launch.outputs
    # Last: nothing of the parent's may reach the body: the host's PID namespace fd, the launch channel,
    # the zygote's and the keeper's sockets, the user's fixtures' files and sockets.  Held by /dev/null,
    # not closed: a stale object of the user's must never write into a pipe of ours that took its number.
    keep = {0, 1, 2, launch.write_fd, launch.go_fd, *launch.outputs, *spec.keep_fds}
    process.hold_fds(keep, process.open_fds())
    signal.signal(signal.SIGINT, launch.sigint if launch.sigint is not None else signal.SIG_DFL)
    faulthandler.enable(file=diag_fd, all_threads=True)
    send = protocol.Sender(launch.write_fd)
    answers = protocol.FrameReader(allowed=protocol.QUESTIONS)

    def ask(kind: protocol.Kind, payload: Any) -> Any:
        """A question on the report pipe; its answer on the GO pipe, idle while a test runs."""
        send(kind, payload)
        while True:
            data = os.read(launch.go_fd, 1 << 20)
            if not data:
                raise OSError("the parent went away before it answered")
            frames = answers.feed(data)
            if answers.error is not None:
                raise answers.error
            if frames:
                return frames[0][1]

    first = True
    while True:
        order = _await_go(launch.go_fd)
        if order is None:
            return 0
        tail, work = order
        if first:
            spec = spec.with_tail(tail)
            _settle(spec)
        else:
            spec = dataclasses.replace(spec, timeout=float(tail[2]))
        body = launch.factory(work)
        if spec.timeout:
            # Only a traceback: the parent kills the whole container with SIGKILL just after.
            faulthandler.dump_traceback_later(spec.timeout, exit=False, file=diag_fd)
        send.finished = False
        inside = Inside(send=send, host_pid=host_pid, notes=notes if first else (), outputs=(out_fd, err_fd), ask=ask)
        body(inside)
        faulthandler.cancel_dump_traceback_later()
        flush_stdio()  # before "done", so the body's output comes before the parent's next line
        if send.finished:  # pytest.exit(), Ctrl-C, an error: the parent ends the container
            return 0
        send(protocol.Kind.DONE)
        first = False


def _settle(spec: ContainerSpec) -> None:
    """What the container learns with its first order: its hostname and environment."""
    socket.sethostname(spec.hostname)
    rootfs.write_hosts(spec.hostname)  # the hostname resolves, as in Docker (rootfs.ENGINE_WRITES)
    for name, value in spec.env:
        os.environ[name] = value
    if "HOSTNAME" in os.environ:
        os.environ["HOSTNAME"] = spec.hostname
    _forget_uname()
    _make_tmpdir()


def _make_tmpdir() -> None:
    """``$TMPDIR`` (and the directory ``tempfile`` already chose) exist inside, as outside, if under ``/tmp``.

    The container's ``/tmp`` is a fresh tmpfs: a ``TMPDIR=/tmp/build-42`` that
    CI set, or that ``tempfile.tempdir`` cached in pytest before the fork, would
    name nothing inside, and every ``mkstemp()`` of the test would fail.  It is
    made empty, private to the container, like the rest of its ``/tmp``.
    """
    for path in {os.environ.get("TMPDIR"), tempfile.tempdir}:
        if path and os.path.normpath(path).startswith("/tmp/") and not os.path.isdir(path):
            with contextlib.suppress(OSError):
                os.makedirs(path, mode=0o700)


def _await_go(fd: int) -> tuple[Any, Any] | None:
    """Block until the parent hands over the next order; EOF: the container is done (or was never used)."""
    reader = protocol.FrameReader(allowed=frozenset({protocol.Kind.GO}))
    while True:
        data = os.read(fd, 1 << 16)
        if not data:
            return None
        frames = reader.feed(data)
        if reader.error is not None:
            raise reader.error
        if frames:
            _, (tail, order) = frames[0]
            return tail, order


def _forget_uname() -> None:
    # platform caches uname() in the parent; the child must see its own hostname.
    cache_clear = getattr(platform.uname, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
    if hasattr(platform, "_uname_cache"):
        platform._uname_cache = None
