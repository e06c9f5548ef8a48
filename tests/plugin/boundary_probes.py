"""Probes that run INSIDE an isolated test, for tests/plugin/test_boundary.py.

This module is copied into each inner project and imported by the inner
tests; it must not import pytest-lonely or anything of the outer suite.
Every probe tries one thing a test could do to reach the host and returns a
:class:`Probe` holding one line per attempt: ``"what: refused (EPERM)"`` or
``"what: SUCCEEDED ..."``.  A success is a breach.  The outer test decides
on the host side too (it read the value first and checks it after), because
an attempt that "fails" inside may still have had an effect outside.

Nothing here is destructive: the sysctl and /sys writes use values the outer
test restores, ``adjtimex`` is asked with an out-of-range tick that the
kernel rejects after the capability check (EINVAL: allowed, EPERM: refused),
and ``/dev/kmsg`` is only read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import marshal
import os
import select
import shutil
import socket
import stat
import struct
import subprocess
import tempfile

_libc = ctypes.CDLL(None, use_errno=True)

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_PRIVATE = 1 << 18
MS_REC = 0x4000
MNT_DETACH = 0x2
ADJ_TICK = 0x4000
_SYS_MOUNT_SETATTR = 442
_AT_RECURSIVE = 0x8000
_AT_FDCWD = -100
MOUNT_ATTR_RDONLY = 0x1
_NS_KINDS = ("pid", "mnt", "net", "user", "uts", "ipc", "cgroup", "time", "pid_for_children", "time_for_children")


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)), f"mount {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(os.fsencode(target), ctypes.c_int(MNT_DETACH)), f"umount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def mount_setattr_clear_rdonly(path: str) -> None:
    attr = _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0)
    _check(
        _libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(_AT_FDCWD),
            os.fsencode(path),
            ctypes.c_uint(_AT_RECURSIVE),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        ),
        f"mount_setattr {path}",
    )


def _errname(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


@dataclasses.dataclass
class Probe:
    """What one probe tried, in order; ``breaches`` are the attempts that worked."""

    log: list[str] = dataclasses.field(default_factory=list)
    breaches: list[str] = dataclasses.field(default_factory=list)

    def attempt(self, what: str, fn, detail=None) -> bool:  # type: ignore[no-untyped-def]
        """Run ``fn``; an OSError is a refusal, anything it returns is a success (a breach)."""
        try:
            result = fn()
        except OSError as exc:
            self.log.append(f"{what}: refused ({_errname(exc)})")
            return False
        line = f"{what}: SUCCEEDED" + (f" ({detail(result)})" if detail else "")
        self.log.append(line)
        self.breaches.append(line)
        return True

    def note(self, text: str) -> None:
        self.log.append(text)

    def report(self) -> str:
        return "\n".join(self.log)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _scratch(name: str) -> str:
    return tempfile.mkdtemp(prefix=f"lonely-probe-{name}-")


# --------------------------------------------------------------------------- the rows of the table


def sysctl_write(path: str, value: str) -> Probe:
    """A non-namespaced sysctl: the write must fail, whatever the uid inside."""
    p = Probe()
    p.attempt(f"write {value!r} to {path}", lambda: _write(path, value))
    return p


def sysctl_open_for_writing(path: str) -> Probe:
    """Only opened, never written (core_pattern): the open alone must be refused."""
    p = Probe()
    p.attempt(f"open {path} for writing", lambda: os.close(os.open(path, os.O_WRONLY)))
    return p


def sys_knob(knob: str, value: str) -> Probe:
    """Remount /sys read-write, write a knob; then try through a fresh sysfs mount."""
    p = Probe()
    p.attempt("remount /sys read-write", lambda: mount(None, "/sys", None, MS_REMOUNT | MS_BIND))
    p.attempt(f"write {value!r} to {knob}", lambda: _write(knob, value))
    fresh = _scratch("sysfs")
    if p.attempt(f"mount a fresh sysfs on {fresh}", lambda: mount("sysfs", fresh, "sysfs")):
        try:
            rel = os.path.relpath(knob, "/sys")
            p.attempt(f"write {value!r} to {rel} through it", lambda: _write(os.path.join(fresh, rel), value))
        finally:
            umount(fresh)
    return p


def ro_bind(directory: str, name: str) -> Probe:
    """A read-only bind of a host directory must stay read-only: remount, mount_setattr, then write."""
    p = Probe()
    if not os.path.isdir(directory):
        p.note(f"{directory} is not visible inside")
        return p
    target = os.path.join(directory, name)
    p.attempt(f"write {target} before any remount", lambda: _create(target))
    p.attempt(f"remount {directory} read-write", lambda: mount(None, directory, None, MS_REMOUNT | MS_BIND))
    p.attempt(f"clear MOUNT_ATTR_RDONLY on {directory}", lambda: mount_setattr_clear_rdonly(directory))
    p.attempt(f"write {target} after the remounts", lambda: _create(target))
    return p


def _create(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))


class _FileHandle(ctypes.Structure):
    _fields_ = (("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_ubyte * 8))


def open_by_forged_handle(mount_dirs: list[str], hidden: str) -> Probe:
    """The "shocker" escape: a handle for inode 2 (the root of an ext4 file system), forged, not asked for.

    ``hidden`` is a name at the host's ``/`` that the container must not show;
    a listing through the handle that contains it means the container saw the host's root.
    """
    p = Probe()
    p.note(f"/{hidden} visible inside: {os.path.lexists('/' + hidden)}")
    for directory in mount_dirs:
        if not os.path.isdir(directory):
            p.note(f"{directory} is not visible inside")
            continue
        mount_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            handle = _FileHandle(8, 1, (ctypes.c_ubyte * 8)(*struct.pack("<II", 2, 0)))  # FILEID_INO32_GEN

            def forged(mount_fd: int = mount_fd, handle: _FileHandle = handle) -> list[str]:
                fd = _libc.open_by_handle_at(
                    ctypes.c_int(mount_fd), ctypes.byref(handle), ctypes.c_int(os.O_RDONLY | os.O_DIRECTORY)
                )
                _check(fd, "open_by_handle_at")
                try:
                    return sorted(os.listdir(fd))
                finally:
                    os.close(fd)

            p.attempt(
                f"open_by_handle_at(inode 2) through {directory}",
                forged,
                lambda names: f"listed {len(names)} entries, {hidden!r} among them: {hidden in names}",
            )
        finally:
            os.close(mount_fd)
    return p


def _fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def _fds() -> list[int]:
    return sorted(int(n) for n in os.listdir("/proc/self/fd"))


def inherited_sockets(host_path: str) -> Probe:
    """Send every inherited socket a request that 0.1's root helper would have obeyed by creating ``host_path``.

    The request follows that helper's protocol (``pool.py``, gone since): a
    ``<I`` length, then ``marshal.dumps((PlanKey fields, ops))``, whose ops it
    replayed with the host at ``/oldroot``.  Nothing should hold a socket now;
    the outer test checks that the file did not appear.
    """
    p = Probe()
    ops = (("mkdir", "/newroot", 0o755), ("touch", "/oldroot" + host_path))
    body = marshal.dumps(((None, False, True), ops))
    for fd in _fds():
        target = _fd_target(fd)
        if not target.startswith("socket:"):
            continue
        sock = socket.socket(fileno=os.dup(fd))
        try:
            p.attempt(
                f"send a build request to inherited socket fd {fd}",
                lambda sock=sock: sock.sendall(struct.pack("<I", len(body)) + body),
            )
            # Let the helper act; take its reply, if it comes to us, so it does not confuse anyone else.
            if select.select([sock], [], [], 3.0)[0]:
                reply, _fds_got, _, _ = socket.recv_fds(sock, 1 << 16, 8)
                for got in _fds_got:
                    os.close(got)
                p.note(f"reply: {marshal.loads(reply) if reply else 'EOF'!r}")
        finally:
            sock.close()
    if not p.log:
        p.note("no inherited socket")
    return p


def host_lo_address(address: str) -> Probe:
    p = Probe()

    def add() -> None:
        argv = ["ip", "addr", "add", f"{address}/32", "dev", "lo"]
        out = subprocess.run(argv, check=False, capture_output=True, text=True)
        if out.returncode:
            raise OSError(errno.EPERM, out.stderr.strip())

    p.attempt(f"ip addr add {address}/32 dev lo", add)
    return p


def cgroup_mkdir(name: str) -> Probe:
    """Mount cgroup2 and the v1 pids hierarchy fresh, then make a cgroup at the root of what we got."""
    p = Probe()
    for fstype, data in (("cgroup2", None), ("cgroup", "pids")):
        where = _scratch(fstype)
        what = f"mount {fstype} {data or ''} on {where}"
        if p.attempt(what, lambda fstype=fstype, where=where, data=data: mount(fstype, where, fstype, 0, data)):
            try:
                p.attempt(f"mkdir {name} in it", lambda where=where: os.mkdir(os.path.join(where, name)))
            finally:
                umount(where)
    return p


class _Timex(ctypes.Structure):
    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("tv_sec", ctypes.c_long),
        ("tv_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("rest", ctypes.c_byte * 256),
    )


def adjtimex_tick() -> Probe:
    """ADJ_TICK with tick=0: the kernel checks CAP_SYS_TIME first (EPERM), then the range (EINVAL).

    So EINVAL means the capability check passed, and the clock is never touched either way.
    """
    p = Probe()
    tx = _Timex()
    tx.modes = ADJ_TICK
    tx.tick = 0

    def call() -> None:
        result = _libc.adjtimex(ctypes.byref(tx))
        err = ctypes.get_errno()
        if result < 0 and err == errno.EPERM:
            raise OSError(err, "adjtimex")
        if result >= 0:  # pragma: no cover - tick=0 is out of range on every kernel
            raise AssertionError("adjtimex accepted tick=0")

    p.attempt("adjtimex(ADJ_TICK, tick=0) passes the CAP_SYS_TIME check", call)
    return p


def mknod_kmsg(dirs: list[str]) -> Probe:
    """Make /dev/kmsg's twin (char 1,11) and read a kernel log record through it."""
    p = Probe()
    for directory in dirs:
        node = os.path.join(directory, f"lonely-kmsg-{os.getpid()}")
        make = lambda node=node: os.mknod(node, stat.S_IFCHR | 0o600, os.makedev(1, 11))  # noqa: E731
        if p.attempt(f"mknod c 1 11 at {node}", make):
            try:

                def read(node: str = node) -> bytes:
                    fd = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
                    try:
                        return os.read(fd, 8192)
                    finally:
                        os.close(fd)

                p.attempt(f"read the kernel log through {node}", read, lambda data: f"{len(data)} bytes")
            finally:
                os.unlink(node)
    return p


_ALLOWED_KINDS = ("pipe:", "/memfd:lonely-diag")


def inherited_fds(stdio_ids: list[tuple[int, int]]) -> Probe:
    """Every fd above 2 must be the report pipe, the diagnostics memfd, or pytest's own capture of stdio.

    Pytest's capture keeps deleted temporary files and a saved copy of the
    original stdout/stderr (``stdio_ids``: (st_dev, st_ino) of the file the
    outer test gave the inner session as stdout and stderr); those are stdio.  Sockets,
    namespace fds, directories and any other file are doors to the host.
    """
    p = Probe()
    stdio = {tuple(i) for i in stdio_ids}
    for fd in _fds():
        if fd <= 2:
            continue
        target = _fd_target(fd)
        if not target:  # the directory fd of the listing itself, closed by now
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        kind = target.split("[", 1)[0].rstrip(":")
        if target.startswith(_ALLOWED_KINDS):
            p.note(f"fd {fd}: {target} (allowed)")
        elif stat.S_ISREG(st.st_mode) and (st.st_nlink == 0 or (st.st_dev, st.st_ino) in stdio):
            p.note(f"fd {fd}: {target} (stdio capture, allowed)")
        elif stat.S_ISCHR(st.st_mode) and (target in ("/dev/null", "/dev/tty") or target.startswith("/dev/pts/")):
            p.note(f"fd {fd}: {target} (terminal or null, allowed)")
        else:
            why = "namespace" if kind in _NS_KINDS else "socket" if kind == "socket" else "door"
            line = f"fd {fd}: {target} inherited ({why})"
            p.log.append(line)
            p.breaches.append(line)
    return p


# --------------------------------------------------------------------------- what must keep working


def must_work(what: str, fn) -> str:  # type: ignore[no-untyped-def]
    """Run ``fn``; any failure is re-raised as an AssertionError naming ``what``."""
    try:
        result = fn()
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", None) or exc
        raise AssertionError(f"{what} failed inside the container: {detail}") from exc
    return f"{what}: ok" + (f" ({result})" if result else "")


shutil_which = shutil.which


def run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=30).stdout.strip()


def bind_low_port(port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def mount_tmpfs() -> str:
    where = _scratch("tmpfs")
    mount("tmpfs", where, "tmpfs", 0, "size=1m")
    try:
        with open(os.path.join(where, "x"), "w") as f:
            f.write("x")
    finally:
        umount(where)
    return where


def nested_pid_namespace_proc() -> str:
    """unshare(1) makes a PID and mount namespace and mounts a fresh, read-only /proc there: PID 1 must read it.

    Read-only, because inside a user namespace the kernel allows a new proc
    only if an equally restrictive one is fully visible (mount_too_revealing):
    with /proc/sys covered read-only, that is a read-only proc.
    """
    script = "mount -t proc -o ro,nosuid,nodev,noexec proc /proc && exec readlink /proc/self"
    return run("unshare", "--pid", "--fork", "--mount", "--propagation", "private", "sh", "-c", script)
