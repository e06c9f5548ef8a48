"""Can this machine make a sandbox, and if not, what exactly stops it?

Isolation fails for reasons that live outside Python: a sysctl, an AppArmor
policy, a container runtime's seccomp profile or masked ``/proc``.  An error
raised deep inside a test's child process would be an opaque ``EPERM``, so once
per session we rehearse the real sequence of system calls in one throwaway
child and turn the first failure into a sentence that names the step, the errno
and the fix.  :func:`diagnose` is pure so that every message can be tested on a
machine that has none of these problems.

Nothing Linux-specific runs at import time: the module must load on macOS so
that the plugin can say "namespaces need Linux" instead of crashing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import platform
import select
import socket
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING or sys.platform == "linux":  # _syscalls needs os.ST_NODEV and friends, which macOS lacks
    from . import _syscalls, namespaces, process

__all__ = ["Availability", "detect_container", "diagnose", "probe", "read_sysctls"]

#: The sysctls that explain most refusals, keyed by their ``sysctl`` name.
SYSCTLS: Final = {
    "user.max_user_namespaces": "/proc/sys/user/max_user_namespaces",
    "kernel.unprivileged_userns_clone": "/proc/sys/kernel/unprivileged_userns_clone",
    "kernel.apparmor_restrict_unprivileged_userns": "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
}

STEPS: Final = (
    "platform",
    "unshare-user",
    "uid_map",
    "setgroups",
    "gid_map",
    "unshare",
    "make-private",
    "fork",
    "mount-proc",
    "lock-user",
    "lock-map",
)

#: Seconds the probe may take before its child is killed.  Generous because the
#: first fork of a large pytest process on a loaded CI machine can be slow; the
#: usual cost is a few milliseconds.
_TIMEOUT_S = 5.0

_IS_LINUX = sys.platform == "linux"

_CONTAINER_MARKERS = ("docker", "podman", "libpod", "lxc", "kubepods", "containerd")

_SECCOMP_FIX = (
    "run the container with --privileged, or with --security-opt seccomp=unconfined "
    "(plus --security-opt apparmor=unconfined for Docker on AppArmor hosts)"
)


@dataclasses.dataclass(frozen=True)
class Availability:
    """The verdict of :func:`probe`; ``reason`` is written for a human and carries no prefix."""

    ok: bool
    rootless: bool
    reason: str = ""


# --------------------------------------------------------------------------- diagnosis


def _errname(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


def _failed(step: str, err: int) -> str:
    return f"{step} failed with {_errname(err)} ({os.strerror(err)})"


@dataclasses.dataclass(frozen=True)
class _Facts:
    """What a diagnosis may look at: the refusal, the mode, and the sysctls that explain most refusals."""

    err: int
    failed: str  #: "STEP failed with ENAME (strerror)", the clause every message carries
    rootless: bool
    in_container: bool
    apparmor: str  #: kernel.apparmor_restrict_unprivileged_userns, "" where the kernel has no such knob
    userns_clone: str  #: kernel.unprivileged_userns_clone
    max_userns: str  #: user.max_user_namespaces


def diagnose(step: str, err: int, *, rootless: bool, sysctls: Mapping[str, str], in_container: bool) -> str:
    """Map the first failing step of the rehearsal to a cause and a fix.

    Kept free of I/O so that each branch can be exercised with made-up sysctls; the first clause of
    every message is short enough for a report header.  One function per step (:data:`_BY_STEP`).
    """
    facts = _Facts(
        err=err,
        failed=_failed(step, err),
        rootless=rootless,
        in_container=in_container,
        apparmor=sysctls.get("kernel.apparmor_restrict_unprivileged_userns", "").strip(),
        userns_clone=sysctls.get("kernel.unprivileged_userns_clone", "").strip(),
        max_userns=sysctls.get("user.max_user_namespaces", "").strip(),
    )
    explain = _BY_STEP.get(step)
    return explain(facts) if explain is not None else f"{facts.failed}."


def _platform(_: _Facts) -> str:
    return (
        f"namespaces need Linux; this is {platform.system() or 'an unknown system'}. "
        "Run the tests on Linux (a VM or a Linux CI runner), or disable the plugin with -p no:lonely."
    )


def _unshare_user(f: _Facts) -> str:
    if f.err == errno.ENOSPC:
        if f.max_userns == "0":
            return (
                f"user namespaces are disabled: {f.failed} because user.max_user_namespaces is 0. "
                "Fix: sudo sysctl -w user.max_user_namespaces=15000, or run pytest as root."
            )
        here = f" (it is {f.max_userns} here)" if f.max_userns else ""
        return (
            f"user namespace limit reached: {f.failed} because the count allowed by "
            f"user.max_user_namespaces{here} is used up, in this or an enclosing user namespace. "
            "Fix: sudo sysctl -w user.max_user_namespaces=15000, or run pytest as root."
        )
    if f.err in (errno.EPERM, errno.EINVAL) and f.userns_clone == "0":
        return (
            f"unprivileged user namespaces are disabled: {f.failed} because "
            "kernel.unprivileged_userns_clone is 0. "
            "Fix: sudo sysctl -w kernel.unprivileged_userns_clone=1, or run pytest as root."
        )
    if f.err == errno.EPERM and f.in_container:
        return (
            f"the container's seccomp profile blocks user namespaces: {f.failed} inside a container. "
            f"Fix: {_SECCOMP_FIX}; or run pytest as root in a container that grants CAP_SYS_ADMIN."
        )
    if f.err == errno.EPERM:
        return (
            f"user namespaces are forbidden for this process: {f.failed}. "
            "A seccomp filter (e.g. systemd's RestrictNamespaces=), a security module (SELinux, AppArmor) "
            "or a chroot denies them; lift that restriction or run pytest as root."
        )
    if f.err == errno.EINVAL:
        return (
            f"this kernel has no user namespaces: {f.failed}. "
            "Use a kernel built with CONFIG_USER_NS, or run pytest as root."
        )
    if f.err == errno.EUSERS:
        return (
            f"user namespaces are nested too deeply (the kernel allows 32 levels): {f.failed}. "
            "Run pytest from a less deeply nested sandbox, or as root."
        )
    return f"{f.failed}. Run pytest as root, or allow unprivileged user namespaces on this host."


def _id_map(f: _Facts) -> str:
    if f.err in (errno.EPERM, errno.EACCES) and f.apparmor == "1":
        return (
            f"AppArmor restricts unprivileged user namespaces: {f.failed} after unshare-user succeeded, "
            "because kernel.apparmor_restrict_unprivileged_userns is 1 (Ubuntu 23.10+, GitHub's ubuntu-24.04 "
            "runners). Fix: sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0, or an AppArmor "
            "profile that allows userns for the python binary; or run pytest as root."
        )
    return (
        f"writing the ID maps of a new user namespace was refused: {f.failed}. "
        "A security module (AppArmor, SELinux) or the container runtime probably restricts user namespaces; "
        "lift that restriction or run pytest as root."
    )


def _unshare(f: _Facts) -> str:
    if f.err == errno.EPERM and f.in_container:
        return (
            f"the container's seccomp profile blocks namespaces: {f.failed} inside a container "
            f"(runtimes allow unshare only with CAP_SYS_ADMIN, which they drop). Fix: {_SECCOMP_FIX}."
        )
    if f.err == errno.EPERM and not f.rootless:
        return (
            f"root lacks CAP_SYS_ADMIN: {f.failed} although pytest runs as root, so the capability was "
            "dropped (capsh, systemd CapabilityBoundingSet=) or a security module (SELinux, AppArmor) denies it. "
            "Grant CAP_SYS_ADMIN, or run pytest as a regular user so that a user namespace is used."
        )
    if f.err == errno.ENOSPC:
        return (
            f"a namespace limit is reached: {f.failed}. "
            "Raise user.max_mnt_namespaces, user.max_pid_namespaces, user.max_uts_namespaces or "
            "user.max_ipc_namespaces (sudo sysctl -w user.max_pid_namespaces=15000, and so on)."
        )
    if f.err == errno.EINVAL:
        return (
            f"this kernel lacks a namespace type: {f.failed}. "
            "Use a kernel built with CONFIG_PID_NS, CONFIG_UTS_NS and CONFIG_IPC_NS."
        )
    return f"{f.failed}. Run pytest as root on a Linux host, or outside of restrictive sandboxes."


def _make_private(f: _Facts) -> str:
    if f.err == errno.EINVAL:
        return (
            f"/ is not a mount point: {f.failed}, which happens inside a plain chroot. "
            "Run pytest outside the chroot, or make its root a mount point (mount --bind DIR DIR)."
        )
    if f.err in (errno.EPERM, errno.EACCES) and f.in_container:
        return (
            f"the container forbids mount(): {f.failed} inside a container (AppArmor's docker-default profile "
            "denies it). Fix: run the container with --privileged, or with --security-opt apparmor=unconfined."
        )
    return f"{f.failed}. A security module probably forbids mount(); run pytest as root or lift that restriction."


def _fork(f: _Facts) -> str:
    if f.err in (errno.EAGAIN, errno.ENOMEM):
        return (
            f"no process could be started: {f.failed}. "
            "Check the process limits (ulimit -u, the cgroup's pids.max) and free memory."
        )
    return f"{f.failed}. Check the process limits (ulimit -u, the cgroup's pids.max)."


def _mount_proc(f: _Facts) -> str:
    if f.err == errno.EPERM and f.in_container:
        return (
            f"the container masks /proc: {f.failed} because the runtime overmounts parts of /proc "
            "(/proc/kcore and others, a read-only /proc/sys), so the kernel refuses a fresh proc. "
            "Fix: run the container with --privileged, or with --security-opt systempaths=unconfined (Docker) "
            "or --security-opt unmask=ALL (Podman)."
        )
    if f.err == errno.EPERM and f.rootless:
        return (
            f"/proc is partly hidden: {f.failed} because something overmounts parts of /proc (a sandbox, or "
            "systemd's ProtectKernelTunables=), so the kernel refuses a fresh proc in a user namespace. "
            "Run pytest where /proc is fully visible, or as root."
        )
    return f"{f.failed}. Run pytest as root, where /proc is fully visible."


def _lock_user(f: _Facts) -> str:
    why = "root mode locks each container's mounts in a user namespace of its own"
    if f.err == errno.ENOSPC:
        limit = "is 0" if f.max_userns == "0" else f"is used up{f' (it is {f.max_userns})' if f.max_userns else ''}"
        return (
            f"{why}, but {f.failed}: user.max_user_namespaces {limit}. "
            "Fix: sudo sysctl -w user.max_user_namespaces=15000."
        )
    if f.err == errno.EPERM and f.in_container:
        return f"{why}, but the container's seccomp profile blocks it: {f.failed}. Fix: {_SECCOMP_FIX}."
    if f.err == errno.EINVAL:
        return f"{why}, but this kernel has none: {f.failed}. Use a kernel built with CONFIG_USER_NS."
    return (
        f"{why}, but {f.failed}: a seccomp filter (systemd's RestrictNamespaces=) or a security module "
        "(SELinux, AppArmor) denies it to root; lift that restriction."
    )


def _lock_map(f: _Facts) -> str:
    return (
        f"root mode maps every id to itself in each container's user namespace, and {f.failed}: pytest's own "
        "user namespace maps fewer ids (root in a rootless container, say). "
        "Run pytest as a regular user there (rootless mode), or in a container that maps every id."
    )


#: The rehearsal's steps (:data:`STEPS`), each with the function that explains its refusal.
_BY_STEP: Final[Mapping[str, Callable[[_Facts], str]]] = {
    "platform": _platform,
    "unshare-user": _unshare_user,
    "uid_map": _id_map,
    "setgroups": _id_map,
    "gid_map": _id_map,
    "unshare": _unshare,
    "make-private": _make_private,
    "fork": _fork,
    "mount-proc": _mount_proc,
    "lock-user": _lock_user,
    "lock-map": _lock_map,
}


# --------------------------------------------------------------------------- host facts


def read_sysctls() -> dict[str, str]:
    """Read only the sysctls :func:`diagnose` consults; absent keys simply mean the kernel has no such knob."""
    values: dict[str, str] = {}
    for name, path in SYSCTLS.items():
        try:
            values[name] = Path(path).read_text(encoding="ascii", errors="replace").strip()
        except OSError:
            continue
    return values


def detect_container() -> bool:
    """Guess whether a container runtime (rather than the kernel) is what says no.

    Heuristic by design: the answer only chooses which fix to suggest.
    """
    if os.environ.get("container"):  # noqa: SIM112 - systemd-nspawn, Podman and LXC set it in lowercase
        return True
    for marker in ("/.dockerenv", "/run/.containerenv"):
        if os.path.exists(marker):
            return True
    try:
        cgroup = Path("/proc/1/cgroup").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return any(word in cgroup for word in _CONTAINER_MARKERS)


# --------------------------------------------------------------------------- the rehearsal


def probe(rootless: bool | None = None) -> Availability:
    """Rehearse the sandbox's system calls in one forked child and explain the first refusal.

    A real attempt is the only reliable test: sysctls, seccomp and LSM policies
    interact in ways no amount of reading /proc can predict.  Never raises,
    because a broken probe must degrade to "no isolation", not to a crash of the
    whole session.
    """
    if rootless is None:
        rootless = os.geteuid() != 0 if hasattr(os, "geteuid") else True
    try:
        if not _IS_LINUX:
            return Availability(False, rootless, _diagnose_here("platform", 0, rootless))
        return _probe(rootless, _TIMEOUT_S)
    except Exception as exc:
        return Availability(False, rootless, f"the isolation probe itself failed: {type(exc).__name__}: {exc}.")


def _diagnose_here(step: str, err: int, rootless: bool) -> str:
    return diagnose(step, err, rootless=rootless, sysctls=read_sysctls(), in_container=detect_container())


def _probe(rootless: bool, timeout: float) -> Availability:
    """Fork, collect the child's report, and make sure nothing of it survives, even on timeout."""
    uid, gid, parent = os.geteuid(), os.getegid(), os.getpid()
    read_fd, write_fd = os.pipe()  # O_CLOEXEC: an exec elsewhere in pytest must not inherit it
    pid = pidfd = -1
    status: int | None = None
    chunks: list[bytes] = []
    try:

        def rehearse() -> int:  # pragma: no cover - runs in the child, which reports through the pipe
            try:
                os.close(read_fd)
                _child_main(write_fd, rootless, uid, gid, parent)
                return 0
            except BaseException as exc:
                _report(write_fd, f"error {type(exc).__name__}: {exc}")
                return 1

        pid = process.spawn(rehearse)  # the child only makes system calls and is killed on a timeout
        os.close(write_fd)
        write_fd = -1
        if sys.platform == "linux":
            with contextlib.suppress(AttributeError, OSError):  # kernel < 5.3: _wait polls waitpid instead
                pidfd = os.pidfd_open(pid)
        status = _wait(pid, pidfd, read_fd, chunks, time.monotonic() + timeout)
        _drain(read_fd, chunks)
    finally:
        for fd in (read_fd, write_fd, pidfd):
            if fd >= 0:
                os.close(fd)
        if pid > 0 and status is None:  # interrupted (KeyboardInterrupt, ...): do not leave the child behind
            _kill_and_reap(pid)

    lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
    if status == _KILLED or os.WIFSIGNALED(status):
        _reap_orphaned_pid1(lines)
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "ok":
            return Availability(True, rootless)
        if word == "fail":
            step, _, number = rest.partition(" ")
            return Availability(False, rootless, _diagnose_here(step, int(number), rootless))
        if word == "error":
            return Availability(False, rootless, f"the isolation probe failed unexpectedly: {rest}.")
    if status == _KILLED:
        return Availability(
            False,
            rootless,
            f"the isolation probe did not finish within {timeout:g} s and was killed; the machine may be "
            "overloaded, or a namespace operation hangs (see dmesg).",
        )
    ended = process.describe_status(os.waitstatus_to_exitcode(status), "the isolation probe's child")
    return Availability(False, rootless, f"{ended} without a report.")


#: Status returned by :func:`_wait` when the child had to be killed.
_KILLED: Final = -1


def _wait(pid: int, pidfd: int, read_fd: int, chunks: list[bytes], deadline: float) -> int:
    """Collect the report into ``chunks`` until the child is reaped; on timeout SIGKILL it and return ``_KILLED``.

    Ends on the child's exit rather than on EOF, because a process forked
    concurrently elsewhere in pytest could hold the pipe's write end open.
    """
    poller = select.poll()  # not select(): pytest may hold more than FD_SETSIZE descriptors
    poller.register(read_fd, select.POLLIN)
    if pidfd >= 0:
        poller.register(pidfd, select.POLLIN)
    while True:
        reaped, status = os.waitpid(pid, os.WNOHANG)
        if reaped:
            return status
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            _kill_and_reap(pid)
            return _KILLED
        wait_ms = math.ceil(remaining * 1000)
        if pidfd < 0:
            wait_ms = min(wait_ms, 2)  # nothing wakes us on exit, so look again soon
        for fd, _events in poller.poll(wait_ms):
            if fd == read_fd:
                chunk = os.read(read_fd, 4096)
                if chunk:
                    chunks.append(chunk)
                else:
                    poller.unregister(read_fd)


def _drain(read_fd: int, chunks: list[bytes]) -> None:
    """Take what the dead child left in the pipe, without blocking on writers that may still hold it."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    while poller.poll(0):
        chunk = os.read(read_fd, 4096)
        if not chunk:
            return
        chunks.append(chunk)


def _kill_and_reap(pid: int) -> None:
    process.kill_and_reap(pid)


def _reap_orphaned_pid1(lines: list[str]) -> None:
    """Reap the grandchild if the child died before it and it was reparented to us.

    It dies by PDEATHSIG, but is reparented to the nearest subreaper, which may
    be this very process (a plugin can set PR_SET_CHILD_SUBREAPER).  waitpid
    only succeeds on our own children, so a stranger's process is never touched.
    """
    for line in lines:
        word, _, rest = line.partition(" ")
        if word == "pid1" and rest.isdigit():
            try:
                if os.waitpid(int(rest), os.WNOHANG)[0] == 0:
                    _kill_and_reap(int(rest))
            except ChildProcessError:
                pass


def _report(fd: int, line: str) -> None:
    with contextlib.suppress(OSError):  # the parent gave up on us; nobody is left to tell
        os.write(fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))


def _child_main(fd: int, rootless: bool, uid: int, gid: int, parent: int) -> None:  # pragma: no cover
    """The rehearsal, in the order the real sandbox uses; the first refusal is reported as ``fail STEP ERRNO``."""
    process.guard_parent(parent)
    step = ""
    try:
        if rootless:
            step = "unshare-user"
            _syscalls.unshare(_syscalls.CLONE_NEWUSER)
            step = "uid_map"  # refined below: map_root names the file it could not write
            try:
                namespaces.map_root(uid, gid)
            except OSError as exc:
                step = os.path.basename(exc.filename or step)
                raise
        step = "unshare"
        # The namespaces every container gets, from the one function the launcher asks too.
        _syscalls.unshare(namespaces.flags(namespaces.for_container(rootless=False, network=True)))
        step = "make-private"
        _syscalls.mount(None, "/", None, _syscalls.MS_REC | _syscalls.MS_PRIVATE)
        step = "fork"

        me = os.getpid()
        # Root mode: PID 1 locks its mounts in a user namespace of its own, whose maps we write (as fork.py does).
        ask, answer = socket.socketpair()
        # PID 1 mounts its own /proc over ours (one mount namespace): its maps are found through this one.
        host_proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

        def pid1_main() -> int:
            try:
                process.guard_parent(me)  # a killed child must take PID 1 along
                ask.close()
                _pid1_main(fd, None if rootless else answer)
                return 0
            except BaseException as exc:
                _report(fd, f"error {type(exc).__name__} in PID 1: {exc}")
                return 1

        pid1 = process.spawn(pid1_main)
        answer.close()
    except OSError as exc:
        _report(fd, f"fail {step} {exc.errno or 0}")
        return
    _report(fd, f"pid1 {pid1}")
    if not rootless and ask.recv(1) == b"m":
        try:
            for name in ("uid_map", "gid_map"):
                process.write_once(f"{pid1}/{name}", namespaces.IDENTITY_MAP, dir_fd=host_proc)
            ask.send(b"k")
        except OSError as exc:
            _report(fd, f"fail lock-map {exc.errno or 0}")
    ask.close()
    _, status = os.waitpid(pid1, 0)
    if status != 0:
        _report(
            fd, f"error {process.describe_status(os.waitstatus_to_exitcode(status), 'PID 1 of the new PID namespace')}"
        )


def _pid1_main(fd: int, lock: socket.socket | None) -> None:  # pragma: no cover
    """Mount a fresh proc (the step container runtimes and partial /proc masks break); root mode, then lock.

    ``lock``: root mode's channel to our parent, which writes the identity maps
    of the user namespace we enter, as a container's forker does.  A map that
    root cannot write (pytest as root in a container whose own user namespace
    maps fewer ids) is found here, not in every test.
    """
    if os.getpid() != 1:
        _report(fd, f"error the probe's grandchild is PID {os.getpid()}, not 1: unshare(CLONE_NEWPID) had no effect")
        return
    try:
        _syscalls.mount("proc", "/proc", "proc", _syscalls.MS_NOSUID | _syscalls.MS_NODEV | _syscalls.MS_NOEXEC)
    except OSError as exc:
        _report(fd, f"fail mount-proc {exc.errno or 0}")
        return
    if lock is not None:
        try:
            _syscalls.unshare(_syscalls.CLONE_NEWUSER)
        except OSError as exc:
            _report(fd, f"fail lock-user {exc.errno or 0}")
            return
        lock.send(b"m")
        if lock.recv(1) != b"k":
            return  # our parent reported why it could not write the maps
    _report(fd, "ok")
