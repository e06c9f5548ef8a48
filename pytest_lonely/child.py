"""Everything that happens after the fork, inside the container.

This module must not import the parent-side plugin: the child's only link to
the parent is the pipe, and everything it needs arrives in a :class:`Launch`
built before the fork.  Every path out of :func:`main` ends in ``os._exit`` so
that no parent-side ``atexit`` handler, buffered output or ``finally`` block
runs twice.
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
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

import pytest
from _pytest import runner

from .sandbox import _syscalls as sc
from .sandbox import protocol, rootfs
from .container import Container
from .errors import LonelyWarning

if TYPE_CHECKING:
    from _pytest.reports import TestReport

#: Exit status of a child whose container could not be built (after an ERROR frame).
EXIT_SETUP_FAILED = 70
#: Exit status of a child that hit a bug in this plugin (after an ERROR frame).
EXIT_INTERNAL = 71


@dataclasses.dataclass(frozen=True)
class Launch:
    """Everything the child needs, prepared by the parent so the child does no planning."""

    item: pytest.Item
    container: Container
    ops: tuple[rootfs.Op, ...]
    #: ``unshare`` flags for the process that becomes (root) or forks (rootless) PID 1.
    flags: int
    uid: int
    gid: int
    parent_pid: int
    write_fd: int
    diag_fd: int
    cwd: str
    coverage: bool
    #: Namespaces built ahead of time by the parent's pool: (fd, CLONE_* type) to join; empty: build here.
    joins: tuple[tuple[int, int], ...] = ()
    #: What the pool could not show inside (the child warns, as if it had built the root itself).
    notes: tuple[str, ...] = ()


#: Writes one frame to the parent.
Send = Callable[[str, Any], None]

_current: Container | None = None


def current() -> Container | None:
    """The container this process runs in, or None in the parent."""
    return _current


def main(launch: Launch) -> NoReturn:
    """Entry point right after ``os.fork()``; never returns."""
    status = EXIT_INTERNAL
    try:
        if launch.container.rootless:
            status = _rootless_middle(launch)
        else:
            host_pid = _guard_parent(launch.parent_pid)
            if not launch.joins:
                sc.unshare(launch.flags)
            status = _pid1(launch, host_pid)
    except BaseException as exc:  # the parent must always learn why
        _send_error(launch, exc)
    finally:
        _flush_stdio()
        os._exit(status)


def _flush_stdio() -> None:
    """With ``-s`` the test writes to the real, block-buffered stdout; ``os._exit`` would drop it."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _send_error(launch: Launch, exc: BaseException) -> None:
    if isinstance(exc, (rootfs.RootfsError, OSError)):
        message = f"could not start the container: {exc}"
    else:
        message = "pytest-lonely internal error in the container:\n" + "".join(traceback.format_exception(exc))
    try:
        protocol.write_all(launch.write_fd, protocol.encode(protocol.ERROR, message))
    except OSError:
        pass


def _stat_pids() -> tuple[int, int]:
    """(pid, ppid) as the host sees them: /proc is still the host's at this point."""
    with open("/proc/self/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2 :].split()
    return int(data.split(b" ", 1)[0]), int(fields[1])


def _guard_parent(expected_ppid: int) -> int:
    """Die with the parent; returns our PID as the host sees it."""
    # PDEATHSIG is armed only from here on: if the parent died before, we would never be told.
    sc.prctl(sc.PR_SET_PDEATHSIG, signal.SIGKILL)
    pid, ppid = _stat_pids()
    if ppid != expected_ppid:
        os._exit(EXIT_SETUP_FAILED)
    return pid


def _rootless_middle(launch: Launch) -> int:
    """Rootless: enter a user namespace, map ourselves to root, then fork PID 1."""
    _guard_parent(launch.parent_pid)
    sc.unshare(sc.CLONE_NEWUSER | launch.flags)
    _write("/proc/self/uid_map", f"0 {launch.uid} 1\n")
    _write("/proc/self/setgroups", "deny\n")
    _write("/proc/self/gid_map", f"0 {launch.gid} 1\n")
    middle = os.getpid()
    pid = os.fork()
    if pid == 0:
        status = EXIT_INTERNAL
        try:
            host_pid = _guard_parent(middle)
            # The parent kills the middle process on a timeout; it needs PID 1's host PID too.
            protocol.write_all(launch.write_fd, protocol.encode(protocol.HELLO, {"host_pid": host_pid}))
            status = _pid1(launch, host_pid)
        except BaseException as exc:
            _send_error(launch, exc)
        finally:
            _flush_stdio()
            os._exit(status)
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
    """We are PID 1 of the new PID namespace: build the root, then run the test."""
    global _current
    if launch.joins:
        # The root is built already: joining the mount namespace puts us at its root.
        for fd, nstype in launch.joins:
            sc.setns(fd, nstype)
        rootfs.mount_proc("/proc")
        rootfs.enter_cwd(launch.cwd)
        notes = list(launch.notes)
    else:
        rootfs.enter_scratch()
        notes = rootfs.apply(launch.ops)
        rootfs.mount_proc(rootfs.NEW + "/proc")  # before the switch: rootless, the kernel wants a visible /proc
        rootfs.switch_root(launch.cwd)
    container = dataclasses.replace(launch.container, host_pid=host_pid)
    socket.sethostname(container.hostname)
    if "net" in container.namespaces:
        sc.interface_up("lo")
    if "HOSTNAME" in os.environ:
        os.environ["HOSTNAME"] = container.hostname
    _forget_uname()
    _current = container
    send = _sender(launch.write_fd)
    faulthandler.enable(file=launch.diag_fd, all_threads=True)
    if container.timeout:
        # Only a traceback: the parent kills the whole container with SIGKILL just after.
        faulthandler.dump_traceback_later(container.timeout, exit=False, file=launch.diag_fd)
    with warnings.catch_warnings(record=True) as recorded:
        for note in notes:
            warnings.warn(LonelyWarning(note), stacklevel=1)
        try:
            _run_phases(launch.item, send, recorded)
        except pytest.exit.Exception as exc:
            send(protocol.EXIT, (exc.msg, exc.returncode))
            return 0
        except KeyboardInterrupt:
            send(protocol.INTERRUPT, None)
            return 0
        finally:
            _flush_warnings(recorded, send)
    faulthandler.cancel_dump_traceback_later()
    if launch.coverage:
        send_coverage(send)
    _flush_stdio()  # before "done", so the test's output comes before the parent's next line
    send(protocol.DONE, None)
    return 0


def _forget_uname() -> None:
    # platform caches uname() in the parent; the child must see its own hostname.
    cache_clear = getattr(platform.uname, "cache_clear", None)
    if cache_clear is not None:
        cache_clear()
    if hasattr(platform, "_uname_cache"):
        platform._uname_cache = None


def _sender(fd: int) -> Send:
    def send(kind: str, payload: Any) -> None:
        protocol.write_all(fd, protocol.encode(kind, payload))

    return send


def setup_container_hook(item: pytest.Item) -> None:
    """Call ``pytest_lonely_setup_container`` as the first part of the test's setup phase.

    Inside the setup phase, an exception there is an ordinary setup error,
    and every plugin's setup and teardown stay paired.
    """
    if _current is not None:
        item.config.hook.pytest_lonely_setup_container(container=_current, item=item)


def _run_phases(item: pytest.Item, send: Send, recorded: list[warnings.WarningMessage]) -> None:
    """Run pytest's own ``runtestprotocol``, streaming each phase's report as it is made.

    Only this process is patched, and it is about to exit: ``call_and_report``
    is wrapped so every report goes down the pipe the moment it exists (a
    death in teardown cannot take the call report with it), and the teardown
    stops at the item itself.  Broader scopes belong to the parent, which
    tears them down when their scope ends.
    """
    config = item.config

    def send_report(rep: TestReport) -> TestReport:
        _check_properties(rep)
        send(protocol.REPORT, config.hook.pytest_report_to_serializable(config=config, report=rep))
        _flush_warnings(recorded, send)
        return rep

    original = runner.call_and_report

    def call_and_report(item: pytest.Item, when: Any, log: bool = True, **kwds: Any) -> TestReport:
        return send_report(original(item, when, False, **kwds))

    runner.call_and_report = call_and_report
    state = item.session._setupstate
    teardown_exact = state.teardown_exact
    parent_node = item.parent
    state.teardown_exact = lambda nextitem: teardown_exact(parent_node)  # type: ignore[method-assign,arg-type]

    runner.runtestprotocol(item, log=False, nextitem=None)


def _check_properties(rep: TestReport) -> None:
    """``record_property`` values must cross the pipe: anything else is sent as its repr, with a warning."""
    for index, (name, value) in enumerate(rep.user_properties):
        sent = protocol.plain(value)
        if sent is not value and sent != value:
            rep.user_properties[index] = (name, repr(value))
            warnings.warn(
                LonelyWarning(
                    f"record_property({name!r}, ...) value of type {type(value).__name__} cannot leave the "
                    f"container; its repr() was recorded instead"
                ),
                stacklevel=1,
            )


def _flush_warnings(recorded: list[warnings.WarningMessage], send: Send) -> None:
    for w in recorded:
        category = w.category
        send(
            protocol.WARNING,
            {
                "message": str(w.message),
                "module": category.__module__,
                "qualname": category.__qualname__,
                "filename": str(w.filename),
                "lineno": int(w.lineno or 0),
            },
        )
    recorded.clear()


def send_coverage(send: Send) -> None:
    """Hand the lines measured in here to the parent's coverage, which ``os._exit`` would lose."""
    coverage = sys.modules.get("coverage")
    if coverage is None:
        return
    cov = coverage.Coverage.current()
    if cov is None:
        return
    cov.stop()
    data = cov.get_data()
    files = data.measured_files()
    if data.has_arcs():
        send(protocol.COVERAGE, ("arcs", {f: list(data.arcs(f) or ()) for f in files}))
    else:
        send(protocol.COVERAGE, ("lines", {f: list(data.lines(f) or ()) for f in files}))
