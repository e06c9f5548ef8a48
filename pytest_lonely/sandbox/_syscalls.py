"""Thin wrappers over the Linux calls the sandbox needs.

No policy lives here: every function does one system call and turns a failure
into ``OSError(errno, ...)`` so that callers can tell EPERM from ENOSPC.  The
module imports on every platform (a macOS developer must still be able to load
the plugin); the calls themselves only work on Linux.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import socket
import stat
import struct
import warnings
from collections.abc import Callable
from typing import Any, cast

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24

MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

#: ``statvfs`` flag bits that are locked on mounts inherited into a user
#: namespace, mapped to the ``mount(2)`` flags that must be repeated on remount.
ST_TO_MS = tuple(
    (getattr(os, name), ms)  # the Linux-only ST_* names are absent elsewhere
    for name, ms in (
        ("ST_RDONLY", MS_RDONLY),
        ("ST_NOSUID", MS_NOSUID),
        ("ST_NODEV", MS_NODEV),
        ("ST_NOEXEC", MS_NOEXEC),
        ("ST_NOATIME", MS_NOATIME),
        ("ST_NODIRATIME", MS_NODIRATIME),
        ("ST_RELATIME", MS_RELATIME),
    )
    if hasattr(os, name)
)

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "arm64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}

IS_LINUX = platform.system() == "Linux"

#: The one handle on the C library every engine module calls through (``use_errno``: our calls read ``errno``).
LIBC = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def error(err: int, what: str, *args: object) -> OSError:
    """The error a failed call of ours raises: the call, its arguments and the reason, e.g.
    ``[Errno 1] mount('/a', '/b', None, '0x1000', None): Operation not permitted``."""
    detail = ", ".join(repr(a) for a in args)
    return OSError(err, f"{what}({detail}): {os.strerror(err)}")


def _check(result: int, what: str, *args: object) -> None:
    if result < 0:
        raise error(ctypes.get_errno(), what, *args)


def unshare(flags: int) -> None:
    if hasattr(os, "unshare"):
        os.unshare(flags)
        return
    _check(LIBC.unshare(ctypes.c_int(flags)), "unshare", hex(flags))


def setns(fd: int, nstype: int) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, nstype)
        return
    _check(LIBC.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns", fd, hex(nstype))


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        LIBC.mount(
            None if source is None else os.fsencode(source),
            os.fsencode(target),
            None if fstype is None else os.fsencode(fstype),
            ctypes.c_ulong(flags),
            None if data is None else os.fsencode(data),
        ),
        "mount",
        source,
        target,
        fstype,
        hex(flags),
        data,
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(LIBC.umount2(os.fsencode(target), ctypes.c_int(flags)), "umount2", target, flags)


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        raise OSError(38, f"pivot_root: unknown syscall number on {platform.machine()}")
    _check(
        LIBC.syscall(ctypes.c_long(number), os.fsencode(new_root), os.fsencode(put_old)),
        "pivot_root",
        new_root,
        put_old,
    )


def prctl(option: int, arg: int) -> None:
    _check(LIBC.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), 0, 0, 0), "prctl", option, arg)


def mount_flags_of(path: str) -> int:
    """The ``MS_*`` flags a bind remount of ``path`` must repeat (they are locked in a user namespace)."""
    st = os.statvfs(path)
    flags = 0
    for st_bit, ms_bit in ST_TO_MS:
        if st.f_flag & st_bit:
            flags |= ms_bit
    return flags


_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (added in 5.12)
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def mount_setattr_rdonly(path: str) -> None:
    """Make a whole mount tree read-only in one call; unlike a remount it also covers submounts."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    _check(
        LIBC.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(path),
            ctypes.c_uint(_AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        "mount_setattr",
        path,
    )


# --- raw calls, for code that makes many in a row (a compiled mount plan) ---------------------------
#
# Each is a ctypes function object of its own (``LIBC[name]`` makes a new one) whose argument types are
# set once, here, and returns what libc returns: 0, or -1 with :func:`last_errno` telling why.  Paths are
# passed as addresses (:func:`address`) of bytes the caller keeps alive: ctypes converts an int without
# keeping a reference to it, so a call writes to none of its arguments, where a bytes argument would have
# its reference count written, and in a freshly forked child the page holding it copied.

#: A call ready to make: the function and its arguments.
Call = tuple[Callable[..., int], tuple[Any, ...]]


def address(data: bytes) -> int:
    """Where ``data``'s bytes are, for a raw call's path argument; ``data`` must outlive the call."""
    return cast(int, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value)


#: The errno of the last raw call that failed (read before any other call).
last_errno = ctypes.get_errno


def _raw(name: str, restype: Any, *argtypes: Any) -> Callable[..., int]:
    try:
        function = LIBC[name]
    except AttributeError:  # not Linux: the module must still import
        return _unavailable(name)
    function.restype = restype
    function.argtypes = argtypes
    return cast("Callable[..., int]", function)


def _unavailable(name: str) -> Callable[..., int]:
    def call(*args: Any) -> int:
        raise OSError(errno.ENOSYS, f"{name}: not available on {platform.system()}")

    return call


_ptr, _int, _uint, _long = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint, ctypes.c_long
_raw_mount = _raw("mount", _int, _ptr, _ptr, _ptr, ctypes.c_ulong, _ptr)
_raw_umount2 = _raw("umount2", _int, _ptr, _int)
_raw_pivot_root = _raw("syscall", _long, _long, _ptr, _ptr)
_raw_mount_setattr = _raw("syscall", _long, _long, _int, _ptr, _uint, _ptr, ctypes.c_size_t)
_raw_mkdir = _raw("mkdir", _int, _ptr, _uint)
_raw_chmod = _raw("chmod", _int, _ptr, _uint)
_raw_chdir = _raw("chdir", _int, _ptr)
_raw_symlink = _raw("symlink", _int, _ptr, _ptr)
#: The one ``mount_attr`` every read-only tree call passes (the kernel only reads it).
_RDONLY_ATTR = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)


def _mknod_by_os(path: int, mode: int, device: int) -> int:
    """glibc before 2.33 exports no ``mknod`` (its header wraps ``__xmknod``): os.mknod, with libc's protocol."""
    try:
        os.mknod(ctypes.string_at(path), mode, device)
    except OSError as exc:
        ctypes.set_errno(exc.errno or errno.EIO)
        return -1
    return 0


_raw_mknod = _raw("mknod", _int, _ptr, _uint, ctypes.c_uint64) if hasattr(LIBC, "mknod") else _mknod_by_os


def mount_call(source: int | None, target: int, fstype: int | None, flags: int, data: int | None) -> Call:
    return _raw_mount, (source, target, fstype, flags, data)


def umount2_call(target: int, flags: int) -> Call:
    return _raw_umount2, (target, flags)


def pivot_root_call(new_root: int, put_old: int) -> Call:
    number = _SYS_PIVOT_ROOT.get(platform.machine())
    if number is None:
        return _no_pivot_root, (new_root, put_old)
    return _raw_pivot_root, (number, new_root, put_old)


def _no_pivot_root(*args: Any) -> int:
    raise OSError(38, f"pivot_root: unknown syscall number on {platform.machine()}")


def mount_setattr_rdonly_call(path: int) -> Call:
    """:func:`mount_setattr_rdonly` as a raw call."""
    return _raw_mount_setattr, (
        _SYS_MOUNT_SETATTR,
        _AT_FDCWD,
        path,
        _AT_RECURSIVE,
        ctypes.addressof(_RDONLY_ATTR),
        ctypes.sizeof(_RDONLY_ATTR),
    )


def mkdir_call(path: int, mode: int) -> Call:
    return _raw_mkdir, (path, mode)


def chmod_call(path: int, mode: int) -> Call:
    return _raw_chmod, (path, mode)


def chdir_call(path: int) -> Call:
    return _raw_chdir, (path,)


def symlink_call(target: int, path: int) -> Call:
    return _raw_symlink, (target, path)


def create_call(path: int, mode: int) -> Call:
    """An empty regular file (``mknod(S_IFREG)``: the kernel's ``open(O_CREAT | O_EXCL)`` without a descriptor)."""
    return _raw_mknod, (path, stat.S_IFREG | mode, 0)


_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sh14s"


def interface_up(name: str) -> None:
    """Bring a network interface up (a new network namespace starts with ``lo`` down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack(_IFREQ, name.encode(), 0, b"")
        flags = struct.unpack(_IFREQ, fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack(_IFREQ, name.encode(), flags | _IFF_UP, b""))


def fork() -> int:
    """``os.fork()`` without Python 3.12's warning about forking a process that has threads.

    pytest-rerunfailures runs a server thread whenever xdist is installed.
    Our children only ever continue on the forking thread and take no lock
    another thread could hold, so the warning would only be noise attributed
    to the user's tests.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        return os.fork()


_CLONE_VM = 0x100
_CLONE_FS = 0x200
_CLONE_FILES = 0x400
_CLONE_SIGHAND = 0x800
_CLONE_VFORK = 0x4000
_CLONE_SYSVSEM = 0x40000
_SIGCHLD = 17
_LEADER_STACK = 1 << 14
#: The leader shares everything it can with its caller: nothing is copied for it (0.05 ms against 0.3).
_LEADER_FLAGS = _CLONE_VM | _CLONE_VFORK | _CLONE_FS | _CLONE_FILES | _CLONE_SIGHAND | _CLONE_SYSVSEM | _SIGCHLD
_SIG_BLOCK = 0
_SIG_SETMASK = 2
_SIGSET_SIZE = 128
_ALL_SIGNALS = ctypes.create_string_buffer(_SIGSET_SIZE)
LIBC.sigfillset(_ALL_SIGNALS)
_clone = LIBC.clone
_clone.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
_clone.restype = ctypes.c_int
_SETPGRP = ctypes.cast(LIBC.setpgrp, ctypes.c_void_p)


def group_leader() -> int:
    """A new process group, for a child to be moved into; returns its ID (the PID of its zombie leader).

    A container's processes need a process group of their own, so that
    ``kill(0, ...)`` and ``killpg(getpgrp(), ...)`` inside reach them and not
    pytest's group.  PID 1 may not lead it: ``killpg(1, sig)`` is
    ``kill(-1, sig)``, every process but the caller.  Nor may the group be led
    by a process inside the container's PID namespace: while PID 1's group ID
    is a PID of that namespace, the namespace's PID count never drops to one
    and PID 1 can never finish exiting (``zap_pid_ns_processes`` waits for it),
    not even after SIGKILL.  So the group is made out here, by a child cloned
    only to call libc's ``setpgrp()`` and exit; its caller moves the container
    in with ``setpgid`` and then reaps the leader: a group lives for as long as
    it has a member.  Inside, ``getpgrp()`` is 0 (the ID has no number there),
    and ``killpg(0, ...)`` is the caller's own group.

    The child shares the caller's memory and the caller is suspended until it
    exits (``CLONE_VM | CLONE_VFORK``, as ``posix_spawn`` does), so no page
    table is copied and no Python code runs in it; signals are blocked around
    it, so that no handler of ours runs there either.
    """
    stack = ctypes.create_string_buffer(_LEADER_STACK)
    top = (ctypes.addressof(stack) + _LEADER_STACK - 64) & ~15
    blocked = ctypes.create_string_buffer(_SIGSET_SIZE)
    # Through libc, not signal.pthread_sigmask: that one builds a set of enum members (0.2 ms a call).
    LIBC.pthread_sigmask(_SIG_BLOCK, _ALL_SIGNALS, blocked)
    try:
        pid = _clone(_SETPGRP, ctypes.c_void_p(top), _LEADER_FLAGS, None)
    finally:
        LIBC.pthread_sigmask(_SIG_SETMASK, blocked, None)
    _check(pid, "clone", "setpgrp")
    return int(pid)
