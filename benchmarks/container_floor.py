"""What a container minimally costs in this kernel, and what each of its pieces costs: a standalone prototype.

A parent Python process about as big as pytest (by default 36 MB resident:
pytest imported plus live objects, ``gc.freeze()``d; also one with filelock
imported, whose ``os.register_at_fork`` hooks pytest-lonely's import of it
installs, and a bare 18 MB Python) forks children in a loop.  Each child
builds some of a container (new PID, mount, UTS and IPC namespaces, an
identity-mapped user namespace that locks the mounts, a copy-on-write
overlay of ``/`` on a tmpfs upper, a fresh ``/proc``), runs nothing and
exits; the parent reaps it at once.  Variants remove one piece at a time, or
replay pytest-lonely's own mount plan for this machine (and that plan minus
a piece), so that every piece gets a price.  The plan rows build the root as
PID 1 does: the plan compiled once in the parent (``mountplan``), its calls
made in the child.  ``--baseline DIR`` adds a row that replays the same plan
with the pytest-lonely of another checkout (``DIR/pytest_lonely``, imported
under another name), e.g. the code before a change, container by container
with the others.

What is counted is CPU, never wall time: the parent moves itself into a
``cpuacct`` cgroup made for each batch, so the batch's CPU is that of the
parent and every child (fork, the child's work, its exit and teardown in its
own context) to the nanosecond; the kernel threads' CPU over the batch
(``/proc/PID/stat`` of every kthread: RCU callbacks, expedited grace periods,
kworkers that free namespaces and mounts) is added, measured until the
deferred work has settled; the whole machine's busy time (``/proc/stat``) is
kept in ``--json`` but includes other users' load.  The parent processes live
side by side and the batches of every (parent, variant) pair are
interleaved and shuffled, so that load lands on all alike; each number is the
median over rounds.

Root only.  Only the standard library (and pytest-lonely, for the rows that
replay its plan) is used.  Nothing is left behind: every mount lives in a
child's private mount namespace, which vanishes with it.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from _bench import kthread_cpu, machine_busy  # run from benchmarks/: the CPU counters are written once there

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 1 << 18
MNT_DETACH: Final = 0x2
SYS_PIVOT_ROOT: Final = 155  # x86_64
CPUACCT: Final = Path("/sys/fs/cgroup/cpuacct")
#: Seconds the batch's window stays open after the last child is reaped, for deferred kernel work.
SETTLE: Final = 0.3

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({fd}, {nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(
            None if source is None else source.encode(),
            target.encode(),
            None if fstype is None else fstype.encode(),
            ctypes.c_ulong(flags),
            None if data is None else data.encode(),
        ),
        f"mount({source}, {target}, {fstype})",
    )


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount2({target})")


def pivot_root(new: str, old: str) -> None:
    _check(_libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), new.encode(), old.encode()), "pivot_root")


def identity_userns() -> int:
    """An fd to a fresh user namespace mapping every id to itself (pytest-lonely's root-mode lock)."""
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            unshare(CLONE_NEWUSER)
            os.write(ready_w, b"u")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    os.read(ready_r, 1)
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write("0 0 4294967295\n")
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    os.write(go_w, b"g")
    os.waitpid(pid, 0)
    for end in (ready_r, ready_w, go_r, go_w):
        os.close(end)
    return fd


# --- the pieces ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    title: str
    pidns: bool = True
    mntns: bool = True
    #: "overlay": tmpfs scratch, pivot, overlay of / with a tmpfs upper, pivot again, detach the host tree;
    #: "lonely": pytest-lonely's plan for this machine; "lonely-*": that plan minus a piece; "": no root.
    root: str = "overlay"
    proc: bool = True
    #: Enter the identity-mapped user namespace and copy the mount namespace into it (the lock).
    userns: bool = True
    uts_ipc: bool = True
    #: Detach the host tree after the second pivot (pricing only: without it the lock copy would take it along).
    detach: bool = True


VARIANTS: Final = {
    v.name: v
    for v in (
        Variant("fork", "bare fork + exit + reap", False, False, "", False, False, False),
        Variant("full", "full: pid+mnt+uts+ipc, overlay root, /proc, userns lock"),
        Variant("no-overlay", "full - overlay root (fresh /proc on the host tree, no pivot)", root=""),
        Variant("no-mntns", "full - mount namespace (so no mounts at all)", mntns=False, root="", proc=False),
        Variant("no-userns", "full - user namespace lock (no 2nd mount ns copy)", userns=False),
        Variant("no-pidns", "full - PID namespace", pidns=False),
        Variant("no-proc", "full - /proc", proc=False),
        Variant("no-detach", "full - detaching the host tree (pricing only, not safe)", detach=False),
        Variant("mntns-only", "mount ns copy only (unshare, make rprivate)", False, True, "", False, False, False),
        Variant("lonely", "pytest-lonely's plan (this host) + /proc, covers + lock"),
        Variant("lonely-sys-norec", "lonely plan, /sys bound without its 13 submounts", root="lonely-sys-norec"),
        Variant("lonely-nocovers", "lonely plan without the /proc covers and hidden proc", root="lonely-nocovers"),
        Variant("lonely-nodev", "lonely plan with /dev a bare tmpfs (no node binds, no devpts)", root="lonely-nodev"),
        Variant("lonely-lean", "lonely plan, same syscalls, precompiled (lean Python replay)", root="lonely-lean"),
        Variant("lonely-baseline", "lonely plan + /proc, covers + lock, built by --baseline's code", root="baseline"),
    )
}  # fmt: skip
for _name, _v in list(VARIANTS.items()):
    if _v.name.startswith("lonely") and _v.root == "overlay":
        VARIANTS[_name] = dataclasses.replace(_v, root="lonely")


#: The environment variable that hands ``--baseline`` to the workers.
BASELINE_ENV: Final = "LONELY_FLOOR_BASELINE"


@dataclasses.dataclass
class Context:
    userns_fd: int
    plans: dict[str, Any]
    #: pytest_lonely.sandbox.mountplan, and the baseline checkout's rootfs module (imported before any fork).
    mountplan: Any = None
    baseline: Any = None


def import_baseline(checkout: str) -> Any:
    """``checkout``'s ``pytest_lonely.sandbox.rootfs``, imported as ``lonely_baseline.sandbox.rootfs``."""
    import tempfile

    where = tempfile.mkdtemp(prefix="lonely-floor-baseline-")
    link = os.path.join(where, "lonely_baseline")
    os.symlink(os.path.join(os.path.abspath(checkout), "pytest_lonely"), link)
    sys.path.insert(0, where)
    try:
        import importlib

        return importlib.import_module("lonely_baseline.sandbox.rootfs")  # imports all it uses
    finally:
        sys.path.remove(where)
        os.unlink(link)
        os.rmdir(where)


def lonely_plans() -> dict[str, Any]:
    """pytest-lonely's root-mode plan for the host view here, and variants of it with one piece removed: the
    compiled program of each (as the engine hands PID 1), the raw plan for the baseline."""
    from pytest_lonely.sandbox import init, mountplan, rootfs

    del init  # imported here so that the children do not import it

    layout = rootfs.HostLayout.scan(Path.cwd())
    full = rootfs.plan(layout, rootfs.PlanKey(None, False, True, ()))
    sys_flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC
    norec: list[Any] = []
    for op in full:
        if op[0] == "bind_ro" and op[2] == rootfs.NEW + "/sys":
            norec += [("mount", op[1], op[2], None, MS_BIND, None), ("mount", None, op[2], None, sys_flags, None)]
        else:
            norec.append(op)

    def in_dev(op: Any) -> bool:
        path = op[2] if op[0] in ("mount", "symlink") else op[1] if op[0] == "touch" else ""
        return isinstance(path, str) and "/dev/" in path

    nodev = [op for op in full if not in_dev(op)]
    return {
        "lonely": mountplan.compiled(full),
        "lonely-sys-norec": mountplan.compiled(tuple(norec)),
        "lonely-nocovers": mountplan.compiled(full),
        "lonely-nodev": mountplan.compiled(tuple(nodev)),
        "lonely-lean": compile_lean(full),
        "baseline": full,
    }


_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.mount.restype = ctypes.c_int


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


_RDONLY_ATTR: Final = _MountAttr(1, 0, 0, 0)


def _setattr_rdonly(path: bytes) -> int:
    return int(_libc.syscall(442, -100, path, 0x8000, ctypes.byref(_RDONLY_ATTR), ctypes.sizeof(_RDONLY_ATTR)))


def _touch(path: bytes) -> int:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
    return 0


def _mkdir(path: bytes, mode: int) -> int:
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    return 0


def compile_lean(plan: Any) -> tuple[tuple[Callable[..., int | None], tuple[Any, ...]], ...]:
    """pytest-lonely's container build as a flat list of (C function, encoded arguments): the same system calls
    as enter_scratch + apply + mount_proc + _seal_proc + switch_root, with as little Python per call as possible."""
    from pytest_lonely.sandbox import rootfs

    ops: list[tuple[Callable[..., int | None], tuple[Any, ...]]] = []
    m = _libc.mount
    nodev = MS_NOSUID | MS_NODEV | MS_NOEXEC
    ops += [(m, (None, b"/", None, MS_REC | MS_PRIVATE, None)), (m, (b"tmpfs", b"/tmp", b"tmpfs", 6, b"mode=0755"))]
    ops += [(os.chdir, (b"/tmp",)), (_mkdir, (b"oldroot", 0o755)), (_libc.syscall, (SYS_PIVOT_ROOT, b".", b"oldroot"))]
    ops += [(os.chdir, (b"/",))]

    def steps(op: Any) -> None:
        kind = op[0]
        if kind == "mkdir":
            ops.append((_mkdir, (op[1].encode(), op[2])))
        elif kind == "mkdirs":
            parts = op[1].strip("/").split("/")
            for i in range(1, len(parts) + 1):
                ops.append((_mkdir, (("/" + "/".join(parts[:i])).encode(), 0o755)))
        elif kind == "touch":
            ops.append((_touch, (op[1].encode(),)))
        elif kind == "symlink":
            ops.append((os.symlink, (op[1].encode(), op[2].encode())))
        elif kind == "mount":
            enc = [None if x is None else x.encode() for x in (op[1], op[2], op[3])]
            ops.append((m, (enc[0], enc[1], enc[2], op[4], None if op[5] is None else op[5].encode())))
        elif kind == "cow":
            ops.append((_mkdir, (f"/.u{op[3]}".encode(), 0o755)))
            ops.append((_mkdir, (f"/.w{op[3]}".encode(), 0o755)))
            data = f"lowerdir={op[1]},upperdir=/.u{op[3]},workdir=/.w{op[3]}".encode()
            ops.append((m, (b"overlay", op[2].encode(), b"overlay", MS_NODEV, data)))
        elif kind in ("bind_ro", "bind"):
            ops.append((m, (op[1].encode(), op[2].encode(), None, MS_BIND | MS_REC, None)))
            if kind == "bind_ro":
                ops.append((_setattr_rdonly, (op[2].encode(),)))
        elif kind == "optional":
            for step in op[2]:
                steps(step)

    for op in plan:
        steps(op)
    new = rootfs.NEW
    ops.append((m, (b"proc", f"{new}/proc".encode(), b"proc", nodev, None)))
    ro = MS_BIND | MS_REMOUNT | MS_RDONLY | nodev
    for name in rootfs.PROC_COVERS:
        path = f"{new}/proc/{name}"
        if os.path.lexists(f"/proc/{name}"):
            ops += [
                (m, (path.encode(), path.encode(), None, MS_BIND | MS_REC, None)),
                (m, (None, path.encode(), None, ro, None)),
            ]
    hidden = (new + rootfs.HIDDEN_PROC).encode()
    ops += [(m, (b"proc", hidden + b"/proc", b"proc", MS_RDONLY | nodev, None))]
    ops += [(m, (b"tmpfs", hidden, b"tmpfs", MS_RDONLY | nodev, b"size=0"))]
    ops += [
        (os.chdir, (new.encode(),)),
        (_libc.syscall, (SYS_PIVOT_ROOT, b".", b".")),
        (_libc.umount2, (b".", MNT_DETACH)),
    ]
    ops += [(os.chdir, (b"/",))]
    return tuple(ops)


def child(variant: Variant, ctx: Context) -> None:
    """Everything a container of this variant builds; the caller exits right after."""
    if variant.mntns:
        unshare(CLONE_NEWNS)
        mount(None, "/", None, MS_REC | MS_PRIVATE)
    if variant.root == "overlay":
        mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        os.chdir("/tmp")
        os.mkdir("oldroot")
        pivot_root(".", "oldroot")
        os.chdir("/")
        for d in ("/u", "/w", "/newroot"):
            os.mkdir(d)
        mount("overlay", "/newroot", "overlay", MS_NODEV, "lowerdir=/oldroot,upperdir=/u,workdir=/w")
        if variant.proc:
            mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.chdir("/newroot")
        pivot_root(".", ".")
        if variant.detach:
            umount2(".", MNT_DETACH)
        os.chdir("/")
    elif variant.root == "lonely-lean":
        for func, call_args in ctx.plans["lonely-lean"]:
            result = func(*call_args)
            if result is not None and result < 0:
                raise OSError(ctypes.get_errno(), f"{func.__name__}{call_args}")
    elif variant.root == "baseline":  # as the baseline's init._pid1 builds a root
        old = ctx.baseline
        old.enter_scratch()
        old.apply(ctx.plans["baseline"])
        old.mount_proc(old.NEW + "/proc")
        old.cover_proc(old.NEW + "/proc")
        old.hide_readonly_proc(old.NEW)
        old.switch_root("/")
    elif variant.root.startswith("lonely"):  # as init._pid1 builds a root
        mountplan = ctx.mountplan
        mountplan.enter_scratch()
        mountplan.build(ctx.plans[variant.root])
        if variant.proc:
            mountplan.mount_proc(variant.root != "lonely-nocovers")
        mountplan.switch_root("/")
    elif variant.proc:
        mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    if variant.userns:
        setns(ctx.userns_fd, CLONE_NEWUSER)
        unshare((CLONE_NEWNS if variant.mntns else 0) | CLONE_NEWUTS | CLONE_NEWIPC)
    elif variant.uts_ipc:
        unshare(CLONE_NEWUTS | CLONE_NEWIPC)


def one(variant: Variant, ctx: Context, pidns_fd: int) -> float:
    """Fork one container the way pytest-lonely does (one fork: unshare the PID namespace, fork, setns back).

    Returns its CPU in seconds: the parent's (unshare, fork, setns, reap) and the child's whole life, its exit
    included (``wait4``'s rusage of the reaped child).  Deferred kernel work (RCU, kworkers) is not in it.
    """
    start = time.thread_time()
    if variant.pidns:
        unshare(CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            child(variant, ctx)
            status = 0
        except BaseException as exc:
            os.write(2, f"{variant.name}: {exc}\n".encode())
        finally:
            os._exit(status)
    if variant.pidns:
        setns(pidns_fd, CLONE_NEWPID)
    _, status, usage = os.wait4(pid, 0)
    if status:
        raise RuntimeError(f"{variant.name}: child failed with status {status}")
    return time.thread_time() - start + usage.ru_utime + usage.ru_stime


def mixed(names: Sequence[str], ctx: Context, pidns_fd: int, count: int) -> dict[str, float]:
    """``count`` containers of each variant, interleaved one by one in a new random order each time.

    Returns the mean CPU (seconds) per container of each variant: drift in the machine's speed lands on all alike.
    """
    rng = random.Random()
    totals: dict[str, float] = dict.fromkeys(names, 0.0)
    order = list(names)
    for _ in range(count):
        rng.shuffle(order)
        for name in order:
            totals[name] += one(VARIANTS[name], ctx, pidns_fd)
    return {name: total / count for name, total in totals.items()}


# --- counting ------------------------------------------------------------------------------------


def batch(variant: Variant, ctx: Context, pidns_fd: int, count: int) -> dict[str, float]:
    """``count`` containers in a cgroup of their own: CPU of ours, of kernel threads, of the machine (seconds)."""
    group = CPUACCT / f"lonely-floor-{os.getpid()}-{variant.name}"
    group.mkdir()
    k0, m0 = kthread_cpu(), machine_busy()
    try:
        (group / "cgroup.procs").write_text(str(os.getpid()))
        try:
            for _ in range(count):
                one(variant, ctx, pidns_fd)
        finally:
            (CPUACCT / "cgroup.procs").write_text(str(os.getpid()))
        time.sleep(SETTLE)
        m1, k1 = machine_busy(), kthread_cpu()
        usage = int((group / "cpuacct.usage").read_text()) / 1e9
        user = int((group / "cpuacct.usage_user").read_text()) / 1e9
    finally:
        for _ in range(100):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)
    return {"ours": usage, "user": user, "kthreads": k1 - k0, "machine": m1 - m0}


def grow_to(target_mb: float) -> float:
    """Import pytest's modules, then add live objects until VmRSS reaches ``target_mb``; returns VmRSS in MB."""
    if target_mb > 15:
        import _pytest.config
        import _pytest.fixtures
        import _pytest.main
        import _pytest.python
        import _pytest.runner  # noqa: F401
        import pytest  # noqa: F401
    ballast: list[Any] = []
    globals()["_BALLAST"] = ballast
    while rss_mb() < target_mb:
        ballast.append([{"k": i, "v": str(i)} for i in range(2000)])
    gc.freeze()
    return rss_mb()


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def stub_filelock() -> None:
    """pytest-lonely imports filelock, whose os.register_at_fork hooks run Python at every fork: keep it out."""
    import types

    stub: Any = types.ModuleType("filelock")
    stub.FileLock = object  # never called here
    sys.modules["filelock"] = stub


def worker(parent: str, commands: Any, answers: Any) -> None:
    """A parent process as ``parent`` says; runs batches on command ("batch VARIANT COUNT"), answers in JSON.

    ``parent`` is a VmRSS in MB, with ``+filelock`` if filelock (and its at-fork hooks) is to be imported.
    """
    rss = float(parent.split("+", maxsplit=1)[0])
    if parent.endswith("+filelock"):
        import filelock  # noqa: F401
    else:
        stub_filelock()
    got = grow_to(rss)
    plans = lonely_plans() if rss >= 30 else {}  # pytest-lonely imports pytest: its rows need a pytest-sized parent
    ctx = Context(identity_userns(), plans)
    if plans:
        from pytest_lonely.sandbox import mountplan

        ctx.mountplan = mountplan
        if os.environ.get(BASELINE_ENV):
            ctx.baseline = import_baseline(os.environ[BASELINE_ENV])
    pidns_fd = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    answers.write(json.dumps({"rss": got, "lonely": bool(plans), "baseline": ctx.baseline is not None}) + "\n")
    answers.flush()
    for line in commands:
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("batch", "mixed"):
            break
        if parts[0] == "batch":
            result = batch(VARIANTS[parts[1]], ctx, pidns_fd, int(parts[2]))
        else:
            result = mixed(parts[1].split(","), ctx, pidns_fd, int(parts[2]))
        answers.write(json.dumps(result) + "\n")
        answers.flush()


class Parent:
    """The orchestrator's handle on one worker process."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", spec], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout is not None
        self.info: dict[str, Any] = json.loads(self.proc.stdout.readline())

    def batch(self, name: str, count: int, command: str = "batch") -> dict[str, float]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(f"{command} {name} {count}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.spec} died running {name}")
        result: dict[str, float] = json.loads(line)
        return result

    def close(self) -> None:
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        self.proc.wait()


# --- main ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--count", type=int, default=100, help="containers per cgroup batch, for kernel threads' CPU (0: skip)"
    )
    parser.add_argument("--mixed-count", type=int, default=40, help="containers of each variant per paired round")
    parser.add_argument(
        "--parents",
        default="36,36+filelock,12",
        help="parent VmRSS in MB, comma-separated, '+filelock' to import filelock (12: bare Python, nothing imported)",
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--baseline",
        help="a checkout of pytest-lonely (e.g. before a change) whose code builds the 'lonely-baseline' row",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, sys.stdin, sys.stdout)
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (namespaces, mounts, cgroups)")
    if args.baseline:
        os.environ[BASELINE_ENV] = args.baseline  # the workers inherit it
    load_before = os.getloadavg()
    sizes = [s for s in args.parents.split(",") if s]
    outputs: dict[str, dict[str, Any]] = {}
    parents = {spec: Parent(spec) for spec in sizes}
    try:
        jobs = [
            (spec, name)
            for spec in sizes
            for name in args.variants
            if (parents[spec].info["lonely"] or not VARIANTS[name].root.startswith("lonely"))
            and (parents[spec].info["baseline"] or VARIANTS[name].root != "baseline")
        ]
        for spec, name in jobs:  # warm-up
            parents[spec].batch(name, max(args.count // 10, 3))
        results: dict[str, dict[str, list[dict[str, float]]]] = {spec: collections.defaultdict(list) for spec in sizes}
        paired: dict[str, dict[str, list[float]]] = {spec: collections.defaultdict(list) for spec in sizes}
        rng = random.Random()
        order = list(sizes)
        for round_no in range(args.rounds):
            rng.shuffle(jobs)
            rng.shuffle(order)
            print(f"round {round_no + 1}/{args.rounds}, load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
            for spec in order:
                names = ",".join(name for s, name in jobs if s == spec)
                for name, value in parents[spec].batch(names, args.mixed_count, "mixed").items():
                    paired[spec][name].append(value)
            if args.count:
                for spec, name in jobs:
                    results[spec][name].append(parents[spec].batch(name, args.count))
        for spec in sizes:
            outputs[spec] = {"rss": parents[spec].info["rss"], "results": results[spec], "paired": paired[spec]}
    finally:
        for p in parents.values():
            p.close()
    load_after = os.getloadavg()
    print(
        f"machine: nproc {os.cpu_count()}, kernel {platform.release()}, python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.2f}' for x in load_before)} before / "
        f"{' '.join(f'{x:.2f}' for x in load_after)} after"
    )
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"per container, median of {args.rounds} rounds: 'paired' = CPU of the parent (unshare, fork, setns, reap) "
        f"and of the child's whole life including its exit (wait4 rusage), {args.mixed_count} containers of every "
        "variant per round interleaved one by one; 'kthreads' = kernel threads' CPU over a batch of "
        f"{args.count} containers of one variant and 0.3 s after (10 ms ticks: coarse); 'cgroup' = that batch's "
        "cpuacct CPU (/proc/stat in --json)"
    )
    print()
    header = ["variant"]
    for size in sizes:
        rss = outputs[size]["rss"]
        label = f"{rss:.0f} MB{' + filelock' if size.endswith('+filelock') else ''}"
        header += [f"{label}: paired", "- bare fork", "kthreads", "cgroup"]
    rows = []
    for name in args.variants:
        row = [VARIANTS[name].title]
        for size in sizes:
            res = outputs[size]["results"]
            pair = outputs[size]["paired"]
            if name not in pair:
                row += ["—"] * 4
                continue
            mine = statistics.median(pair[name]) * 1000
            base = statistics.median(pair["fork"]) * 1000 if "fork" in pair else None

            def med(key: str, res: Any = res, name: str = name) -> str:
                values: list[float] = [r[key] for r in res.get(name, [])]
                return f"{statistics.median(values) * 1000 / int(args.count):.3f}" if values else "—"

            row += [f"{mine:.3f}", f"{mine - base:+.3f}" if base is not None else "—", med("kthreads"), med("ours")]
        rows.append(row)
    print("| " + " | ".join(header) + " |")
    print("|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in outputs.items()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
