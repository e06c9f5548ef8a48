"""Where the CPU of one trivial isolated test goes, phase by phase, next to pytest-forked's fork.

Why CPU and not wall time: on a 2-core machine shared with other engineers the
wall time of a run moves by tens of percent from one round to the next, while
the CPU a run costs moves little; and on two cores a CPU-bound pipeline's CPU
*is* its wall time.

Why three ways of counting, each over whole pytest processes:

* **account** runs (nothing attached): the CPU of our process tree from a
  ``cpuacct`` cgroup made for the run (every process in it, the containers'
  exit and the zygote included, reaped or not), the CPU of kernel threads
  (``/proc/PID/stat`` of every kthread: kworkers, RCU, ksoftirqd, where the
  kernel defers namespace and mount teardown) and the whole machine's busy
  time (``/proc/stat`` user+nice+system+irq+softirq), next to
  ``getrusage(RUSAGE_CHILDREN)``, which misses the kernel threads.
* **profile** runs: ``perf record -a -g --kernel-callchains -e cpu-clock`` over
  the whole run (this machine has no hardware counters), each sample given to
  a process role (pytest, zygote, test child, prebuild helper, kernel thread,
  somebody else's process) and, for kernel samples, to a phase by the kernel
  functions on its call chain (``copy_page_range``: fork's page-table copy,
  ``do_wp_page``: copy-on-write faults, ``copy_mnt_ns``: the mount namespace
  copy, ``put_mnt_ns``/``cleanup_mnt``: teardown, ...).  A generated conftest
  names the plugin's processes (``prctl(PR_SET_NAME)``) so that their samples
  can be told apart, and adds up ``CLOCK_PROCESS_CPUTIME_ID`` around the
  plugin's own Python functions (building the root, waiting for GO, the test's
  protocol, the frames, prefault), which perf cannot see inside CPython 3.11.
* Every number is a **marginal cost per test**: ``(x(N tests) - x(N0 tests)) /
  (N - N0)`` within a round, the median over interleaved, shuffled rounds.

pytest-forked 1.7.5 fails on pytest 9.2, so both tools run on pytest 8.3.5,
each in a venv of its own (made under ``~/.cache/pytest-lonely-bench/``, the
pytest-lonely one a copy of this checkout, one venv per state of its sources:
see _bench.py, shared with overhead.py), each against its own plain run.

Written against the engine of 6a88a55, before aed963b replaced the launcher with engine/box/fork/keeper
and removed the namespace pool and prefault: its variants ``PREBUILD=namespaces`` and ``PREFAULT=0`` are
gone with them, and the conftest's clocks on the launcher's, the pool's and prefault's functions report
those names as missing.  The perf roles (by process name) and the kernel phases do not depend on them.

Root only (perf -a, cgroups, root mode).  Only the standard library is used.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import platform
import random
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parent.parent
PYTEST_VERSION: Final = "8.3.5"
FORKED_VERSION: Final = "1.7.5"
RUN_TIMEOUT: Final = 900.0
CPUACCT: Final = Path("/sys/fs/cgroup/cpuacct")
USER_HZ: Final = os.sysconf("SC_CLK_TCK")
PF_KTHREAD: Final = 0x00200000

TEST_FILE: Final = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_x(i):
    pass
"""

#: Started fresh for every run: joins the run's cgroup, runs pytest, reports its own PID (the root of our
#: process tree in perf's data), wall time and RUSAGE_CHILDREN.
WRAPPER: Final = """\
import json, os, resource, subprocess, sys, time
cgroup = os.environ.pop("BENCH_CGROUP", "")
if cgroup:
    with open(cgroup + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"pid": os.getpid(), "wall": wall, "rc": proc.returncode, "minflt": ru.ru_minflt,
                  "rusage": ru.ru_utime + ru.ru_stime, "output": proc.stdout[-3000:]}))
"""

#: Python phases perf cannot see: CPU (user+sys, CLOCK_PROCESS_CPUTIME_ID) summed per label over the run,
#: in a MAP_SHARED mapping made before any fork (a container closes inherited fds, a mapping stays).
LABELS: Final = (
    "pytest: IsolatedRun.run (the plugin's whole per-test work in pytest)",
    "pytest: Engine.run",
    "pytest: on_frame (decode and log the reports)",
    "pytest: Engine._fork (fork a container; kernel included)",
    "pytest: Zygote.take",
    "pytest: Engine.reap",
    "pytest: pool take + prefetch",
    "zygote: _request (fork a container, hand it over)",
    "zygote: _fork (kernel fork included)",
    "zygote: _reap",
    "pool: _build (mount tree, namespaces)",
    "rootfs.apply (the mount plan, in a container or the pool helper)",
    "rootfs.enter_scratch + switch_root + mount_proc + _seal_proc",
    "ct: prefault take_ahead (MADV_POPULATE_WRITE)",
    "ct: prefault snapshot (pagemap scan)",
    "ct: _await_go (read GO, make the body)",
    "ct: body (runtestprotocol and frames)",
    "ct: runtestprotocol",
    "ct: encode_report",
    "ct: Sender (marshal + write)",
    "ct: prefault record (after DONE)",
    # Marks: a container's CPU and faults since its fork, when it gets there (summed over containers).
    "ct@ 1 init.main entry (after CPython's and everyone's at-fork hooks)",
    "ct@ 2 _pid1 entry (guard, cgroup, unshare mnt)",
    "ct@ 3 close_fds_except (root built, locked)",
    "ct@ 4 _await_go entry (after prefault take_ahead)",
    "ct@ 5 body start (GO read, body made)",
    "ct@ 6 runtestprotocol entry",
    "ct@ 7 runtestprotocol exit",
    "ct@ 8 body end",
    "ct@ 9 _exit (after DONE, prefault record)",
)

CONFTEST: Final = '''\
"""Generated by benchmarks/cpu_phases.py: names the plugin's processes, adds up CPU per phase."""

import atexit
import ctypes
import functools
import importlib
import json
import mmap
import os
import resource
import struct
import time

LABELS = {labels!r}
INDEX = {{name: i for i, name in enumerate(LABELS)}}
SLOT = struct.Struct("<dqq")
SHARED = mmap.mmap(-1, SLOT.size * len(LABELS), flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
OWNER = os.getpid()
OUT = os.environ.get("BENCH_PHASES_OUT", "")
_libc = ctypes.CDLL(None, use_errno=True)
_cpu = time.process_time
MISSING = []


def name(text):
    _libc.prctl(15, ctypes.c_char_p(text.encode()), 0, 0, 0)


def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def add(label, seconds, minflt, count=1):
    offset = INDEX[label] * SLOT.size
    total, n, f = SLOT.unpack_from(SHARED, offset)
    SLOT.pack_into(SHARED, offset, total + seconds, n + count, f + minflt)


def patch(module_name, path, make):
    try:
        owner = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        original = getattr(owner, attr)
    except (ImportError, AttributeError):
        MISSING.append(module_name + "." + path)
        return
    setattr(owner, attr, functools.wraps(original)(make(original)))


def timed(label):
    def make(original):
        def wrapper(*args, **kwargs):
            start, f0 = _cpu(), faults()
            try:
                return original(*args, **kwargs)
            finally:
                add(label, _cpu() - start, faults() - f0)
        return wrapper
    return make


def renamed(text, then=None):
    def make(original):
        def wrapper(*args, **kwargs):
            name(text)
            if then is not None:
                then()
            return original(*args, **kwargs)
        return wrapper
    return make


STATE = {{"container": False}}


def container_started():
    STATE["container"] = True
    add("ct@ 1 init.main entry (after CPython's and everyone's at-fork hooks)", _cpu(), faults())
    real_exit = os._exit

    def _exit(status):
        add("ct@ 9 _exit (after DONE, prefault record)", _cpu(), faults())
        real_exit(status)

    os._exit = _exit


def at(label, rename):
    def make(original):
        def wrapper(*args, **kwargs):
            if STATE["container"]:
                add(label, _cpu(), faults())
                name(rename)
            return original(*args, **kwargs)
        return wrapper
    return make


def make_await_go(original):
    def wrapper(*args, **kwargs):
        add("ct@ 4 _await_go entry (after prefault take_ahead)", _cpu(), faults())
        name("lz-ct-go")
        start, f0 = _cpu(), faults()
        try:
            return original(*args, **kwargs)
        finally:
            add("ct: _await_go (read GO, make the body)", _cpu() - start, faults() - f0)
    return wrapper


def make_runtestprotocol(original):
    def wrapper(*args, **kwargs):
        add("ct@ 6 runtestprotocol entry", _cpu(), faults())
        name("lz-ct-test")
        start, f0 = _cpu(), faults()
        try:
            return original(*args, **kwargs)
        finally:
            add("ct: runtestprotocol", _cpu() - start, faults() - f0)
            add("ct@ 7 runtestprotocol exit", _cpu(), faults())
            name("lz-ct-tail")
    return wrapper


def make_body_for(original):
    def body_for(*args, **kwargs):
        body = original(*args, **kwargs)

        def timed_body(inside):
            add("ct@ 5 body start (GO read, body made)", _cpu(), faults())
            start, f0 = _cpu(), faults()
            try:
                return body(inside)
            finally:
                add("ct: body (runtestprotocol and frames)", _cpu() - start, faults() - f0)
                add("ct@ 8 body end", _cpu(), faults())
        return timed_body
    return body_for


def pytest_configure(config):
    if not config.pluginmanager.has_plugin("lonely"):
        return
    sb = "pytest_lonely.sandbox"
    patch("pytest_lonely.runner", "IsolatedRun.run", timed(LABELS[0]))
    patch(sb + ".launcher", "Engine.run", timed("pytest: Engine.run"))
    patch("pytest_lonely.runner", "IsolatedRun.on_frame", timed("pytest: on_frame (decode and log the reports)"))
    patch(sb + ".launcher", "Engine._fork", timed("pytest: Engine._fork (fork a container; kernel included)"))
    patch(sb + ".zygote", "Zygote.take", timed("pytest: Zygote.take"))
    patch(sb + ".launcher", "Engine.reap", timed("pytest: Engine.reap"))
    patch(sb + ".pool", "NamespacePool.take", timed("pytest: pool take + prefetch"))
    patch(sb + ".pool", "NamespacePool.prefetch", timed("pytest: pool take + prefetch"))
    patch(sb + ".zygote", "_serve", renamed("lz-zygote"))
    patch(sb + ".zygote", "_Server._request", timed("zygote: _request (fork a container, hand it over)"))
    patch(sb + ".zygote", "_Server._fork", timed("zygote: _fork (kernel fork included)"))
    patch(sb + ".zygote", "_Server._reap", timed("zygote: _reap"))
    patch(sb + ".pool", "_serve", renamed("lz-pool"))
    patch(sb + ".pool", "_build", timed("pool: _build (mount tree, namespaces)"))
    patch(sb + ".init", "main", renamed("lz-ct-init", container_started))
    patch(sb + ".rootfs", "apply", timed("rootfs.apply (the mount plan, in a container or the pool helper)"))
    for fn in ("enter_scratch", "switch_root", "mount_proc"):
        patch(sb + ".rootfs", fn, timed("rootfs.enter_scratch + switch_root + mount_proc + _seal_proc"))
    patch(sb + ".init", "_seal_proc", timed("rootfs.enter_scratch + switch_root + mount_proc + _seal_proc"))
    patch(sb + ".init", "_take_ahead", timed("ct: prefault take_ahead (MADV_POPULATE_WRITE)"))
    patch(sb + ".prefault", "snapshot", timed("ct: prefault snapshot (pagemap scan)"))
    patch(sb + ".prefault", "record", timed("ct: prefault record (after DONE)"))
    patch(sb + ".init", "_await_go", make_await_go)
    patch(sb + ".init", "_pid1", at("ct@ 2 _pid1 entry (guard, cgroup, unshare mnt)", "lz-ct-build"))
    patch(sb + "._syscalls", "close_fds_except", at("ct@ 3 close_fds_except (root built, locked)", "lz-ct-pref"))
    patch("pytest_lonely.child", "body_for", make_body_for)
    patch("pytest_lonely._pytest_compat", "runtestprotocol", make_runtestprotocol)
    patch("pytest_lonely.wire", "encode_report", timed("ct: encode_report"))
    patch(sb + ".protocol", "Sender.__call__", timed("ct: Sender (marshal + write)"))


@atexit.register
def dump():
    if os.getpid() != OWNER or not OUT:
        return
    data = {{label: SLOT.unpack_from(SHARED, i * SLOT.size) for i, label in enumerate(LABELS)}}
    with open(OUT, "w") as f:
        json.dump({{"phases": data, "missing": MISSING}}, f)
'''


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    title: str
    python: str  # "lonely" or "forked": which venv
    args: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    baseline: str = ""


LONELY: Final = ("-p", "lonely", "--lonely-all")
FORKED: Final = ("-p", "pytest_forked", "--forked")
VARIANTS: Final = {
    v.name: v
    for v in (
        Variant("plain", f"plain pytest {PYTEST_VERSION} (lonely's venv)", "lonely", ()),
        Variant("forked-plain", f"plain pytest {PYTEST_VERSION} (forked's venv)", "forked", ()),
        Variant("forked", f"pytest-forked {FORKED_VERSION}", "forked", FORKED, (), "forked-plain"),
        Variant("lonely", "pytest-lonely default (zygote)", "lonely", LONELY, (), "plain"),
        Variant("prebuild-off", "PREBUILD=0", "lonely", LONELY, (("PYTEST_LONELY_PREBUILD", "0"),), "plain"),
        Variant("privileged", "--lonely-privileged", "lonely", (*LONELY, "--lonely-privileged"), (), "plain"),
        Variant("network", "--lonely-network none", "lonely", (*LONELY, "--lonely-network", "none"), (), "plain"),
    )
}  # fmt: skip


# --- venvs -------------------------------------------------------------------------------------


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-lonely-bench"


def pythons(cache: Path) -> dict[str, str]:
    """The two venvs overhead.py uses too (see _bench.py): one pytest-lonely venv per state of the sources."""
    import _bench

    found = {}
    for role, make in (("lonely", _bench.lonely_venv), ("forked", _bench.forked_venv)):
        python, why = make(cache)
        if python is None:
            raise SystemExit(why)
        found[role] = python
    return found


# --- counting CPU ------------------------------------------------------------------------------


def machine_busy() -> float:
    """Seconds of CPU the whole machine spent busy since boot: user+nice+system+irq+softirq."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / USER_HZ


def kthread_cpu() -> dict[str, float]:
    """CPU seconds per kernel-thread kind (kworker, rcu, ksoftirqd, other) since each thread started."""
    totals: dict[str, float] = collections.defaultdict(float)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index(b"(") + 1 : data.rindex(b")")].decode(errors="replace")
        fields = data[data.rindex(b")") + 2 :].split()
        if not int(fields[6]) & PF_KTHREAD:
            continue
        totals[kthread_kind(comm)] += (int(fields[11]) + int(fields[12])) / USER_HZ
    return dict(totals)


def kthread_kind(comm: str) -> str:
    if comm.startswith("kworker"):
        return "kworker"
    if comm.startswith("rcu"):
        return "rcu threads"
    if comm.startswith("ksoftirqd"):
        return "ksoftirqd"
    return "other kthreads"


@contextlib.contextmanager
def cpuacct_group() -> Iterator[Path]:
    """A cpuacct cgroup for one run, removed afterwards (its processes are all gone by then)."""
    path = CPUACCT / f"lonely-bench-{os.getpid()}-{random.randrange(1 << 30)}"
    path.mkdir()
    try:
        yield path
    finally:
        for _ in range(200):
            try:
                path.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def group_cpu(path: Path) -> tuple[float, float]:
    """(user, system) seconds the cgroup's processes used, from cpuacct (exact, in ns)."""
    return (int((path / "cpuacct.usage_user").read_text()) / 1e9, int((path / "cpuacct.usage_sys").read_text()) / 1e9)


# --- perf --------------------------------------------------------------------------------------

_HEADER = re.compile(r"^(.*?)\s+(-?\d+)/(-?\d+)\s+(\d+)\s*$")
_FORK = re.compile(r"PERF_RECORD_FORK\((\d+):(\d+)\):\((\d+):(\d+)\)")
_COMM = re.compile(r"PERF_RECORD_COMM(?: exec)?: (.*):(\d+)/(\d+)\s*$")

#: Kernel phases, first match wins: (phase, functions any of which on the call chain puts a sample there).
KERNEL_RULES: Final[tuple[tuple[str, frozenset[str]], ...]] = tuple(
    (phase, frozenset(names.split()))
    for phase, names in (
        ("softirq in our tasks (RCU callbacks, timers)", "handle_softirqs __do_softirq do_softirq"),
        ("madvise (prefault MADV_POPULATE_WRITE)", "__x64_sys_madvise do_madvise madvise_populate"),
        ("prefault: /proc/self/pagemap, maps", "pagemap_read show_map show_map_vma"),
        ("ns create: mount ns copy (copy_mnt_ns)", "copy_mnt_ns"),
        ("ns create: net ns (copy_net_ns)", "copy_net_ns setup_net"),
        (
            "ns create: other unshare (pid, uts, ipc, user)",
            "create_new_namespaces unshare_nsproxy_namespaces copy_namespaces ksys_unshare __x64_sys_unshare "
            "create_user_ns unshare_userns",
        ),
        ("setns", "__x64_sys_setns"),
        ("fork: dup_mmap (page-table copy)", "dup_mmap dup_mm copy_page_range"),
        ("fork: rest of copy_process", "copy_process kernel_clone __do_sys_clone __x64_sys_clone __x64_sys_clone3"),
        (
            "mount teardown (cleanup_mnt, superblocks)",
            "cleanup_mnt __cleanup_mnt deactivate_super deactivate_locked_super delayed_mntput",
        ),
        ("exit: exit_mmap (unmap, free page tables)", "exit_mmap mmput"),
        (
            "exit: namespace teardown (put_mnt_ns, umount_tree, pidns)",
            "put_mnt_ns free_nsproxy exit_task_namespaces switch_task_namespaces zap_pid_ns_processes umount_tree "
            "namespace_unlock drop_collected_mounts put_pid_ns free_pid_ns",
        ),
        ("exit: rest of do_exit (files, signals)", "do_exit do_group_exit release_task"),
        ("mount plan: pivot_root", "__x64_sys_pivot_root __do_sys_pivot_root"),
        ("mount plan: umount", "__x64_sys_umount ksys_umount path_umount"),
        ("mount plan: proc mount", "proc_fill_super proc_get_tree"),
        ("mount plan: overlay mount", "ovl_fill_super ovl_get_tree ovl_parse_param ovl_get_layers ovl_lookup_layer"),
        (
            "mount plan: other mounts (tmpfs, bind, remount, mount_setattr)",
            "__x64_sys_mount __x64_sys_mount_setattr __x64_sys_open_tree __x64_sys_move_mount __x64_sys_fsopen "
            "__x64_sys_fsconfig __x64_sys_fsmount",
        ),
        ("CoW faults (do_wp_page)", "do_wp_page wp_page_copy"),
        ("other page faults", "handle_mm_fault __handle_mm_fault do_user_addr_fault"),
        ("page faults (entry, unresolved)", "exc_page_fault asm_exc_page_fault"),
        (
            "fs syscalls (mkdir, stat, open, chdir, symlink)",
            "__x64_sys_mkdir __x64_sys_mkdirat __x64_sys_symlink __x64_sys_symlinkat __x64_sys_chdir "
            "__x64_sys_fchdir __x64_sys_newstat __x64_sys_newlstat __x64_sys_newfstatat __x64_sys_statx "
            "__x64_sys_openat __x64_sys_open __x64_sys_chmod __x64_sys_fchmodat __x64_sys_readlink "
            "__x64_sys_readlinkat __x64_sys_getdents64 __x64_sys_access __x64_sys_faccessat2 __x64_sys_unlink "
            "__x64_sys_unlinkat __x64_sys_rename __x64_sys_renameat2 __x64_sys_getcwd __do_sys_newfstatat "
            "vfs_fstatat __do_sys_newlstat __do_sys_newstat do_mkdirat do_symlinkat",
        ),
        ("wait / reap", "__x64_sys_wait4 __x64_sys_waitid kernel_waitid do_wait"),
        (
            "read/write (pipes, files)",
            "__x64_sys_read __x64_sys_write __x64_sys_pread64 __x64_sys_pwrite64 ksys_read ksys_write",
        ),
        (
            "sockets (zygote, pool messages)",
            "__x64_sys_sendmsg __x64_sys_recvmsg __x64_sys_sendto __x64_sys_recvfrom __x64_sys_socketpair",
        ),
        ("close / fput", "__x64_sys_close __x64_sys_close_range __fput task_work_run filp_close"),
        ("poll / select", "__x64_sys_poll __x64_sys_ppoll __x64_sys_select __x64_sys_pselect6 do_sys_poll"),
        (
            "mmap / munmap / brk / mprotect",
            "__x64_sys_mmap __x64_sys_munmap __x64_sys_brk __x64_sys_mprotect vm_mmap_pgoff __vm_munmap "
            "__do_sys_mremap __do_sys_brk",
        ),
        ("exec", "__x64_sys_execve __x64_sys_execveat"),
        ("scheduler (context switches, wake-ups)", "schedule __schedule finish_task_switch schedule_tail"),
        ("other syscalls", "do_syscall_64"),
    )
)
KTHREAD_RULES: Final[tuple[tuple[str, frozenset[str]], ...]] = tuple(
    (phase, frozenset(names.split()))
    for phase, names in (
        ("mount teardown (delayed_mntput)", "cleanup_mnt __cleanup_mnt delayed_mntput deactivate_super"),
        ("net ns teardown (cleanup_net)", "cleanup_net ops_exit_list"),
        ("RCU callbacks (rcu_do_batch)", "rcu_do_batch rcu_core"),
        ("expedited RCU grace periods", "rcu_exp_sel_wait_wake sync_rcu_exp_select_cpus wait_rcu_exp_gp"),
        ("page freeing / reclaim", "free_pages_and_swap_cache tlb_finish_mmu __free_pages"),
    )
)

#: Process roles, in table order.
ROLES: Final = (
    "pytest",
    "zygote",
    "test child",
    "other child of pytest",
    "prebuild helper",
    "wrapper",
    "kernel threads",
    "others (not ours)",
    "idle",
)


def _detail(chain: Sequence[str], anchors: frozenset[str]) -> str:
    """What a sample did inside its phase: an RCU callback, a work item, else the callee of the outermost anchor."""
    for special in ("rcu_do_batch", "process_one_work"):
        if special in chain:
            i = chain.index(special)
            return chain[i - 1] if i > 0 else "(self)"
    for i in range(len(chain) - 1, -1, -1):
        if chain[i] in anchors:
            return chain[i - 1] if i > 0 else "(self)"
    return chain[0] if chain else "(user)"


def kernel_phase(chain: Sequence[str]) -> tuple[str, str]:
    """(phase, detail) of a sample from one of our processes; chain is leaf first, empty in user mode."""
    if not chain:
        return "user", ""
    names = set(chain)
    for phase, anchors in KERNEL_RULES:
        if names & anchors:
            return phase, _detail(chain, anchors)
    return "other kernel", chain[0]


def kthread_phase(comm: str, chain: Sequence[str]) -> tuple[str, str]:
    kind = kthread_kind(comm)
    names = set(chain)
    for phase, anchors in KTHREAD_RULES:
        if names & anchors:
            return f"{kind}: {phase}", _detail(chain, anchors)
    return f"{kind}: other", _detail(chain, frozenset())


@dataclasses.dataclass
class Profile:
    """Seconds of CPU by (role, phase) from one perf recording, and by (phase, detail) over all of ours."""

    seconds: dict[tuple[str, str], float]
    details: dict[tuple[str, str], float]


def parse_perf(text: Iterable[str], root: int) -> Profile:
    """Samples of ``perf script --show-task-events -F comm,pid,tid,period,ip,sym``, by role and phase."""
    parent: dict[int, int] = {}
    last_comm: dict[int, str] = {}
    by_pid: dict[tuple[int, str, str], float] = collections.defaultdict(float)
    by_comm: dict[tuple[int, str, str], float] = collections.defaultdict(float)
    kthread_samples: dict[tuple[str, str], float] = collections.defaultdict(float)
    comm = ""
    pid = -1
    period = 0
    chain: list[str] = []
    in_sample = False

    def is_kthread(p: int) -> bool:
        seen = 0
        while p > 2 and seen < 64:
            p = parent.get(p, 0)
            seen += 1
        return p == 2

    def flush() -> None:
        if not in_sample:
            return
        seconds = period / 1e9
        if pid == 0:
            by_pid[(0, "idle", "")] += seconds
        elif is_kthread(pid):
            kthread_samples[kthread_phase(comm, chain)] += seconds
        else:
            phase, detail = kernel_phase(chain)
            by_pid[(pid, phase, detail)] += seconds
            by_comm[(pid, comm, phase)] += seconds

    for line in text:
        if "PERF_RECORD_" in line:
            flush()
            in_sample = False
            if m := _FORK.search(line):
                child, _, ppid, _ = (int(x) for x in m.groups())
                if child != ppid:
                    parent[child] = ppid
            elif m := _COMM.search(line):
                name, cpid, ctid = m.group(1), int(m.group(2)), int(m.group(3))
                if cpid == ctid:
                    last_comm[cpid] = name
            continue
        if line.startswith(("\t", " ")):
            if in_sample:
                parts = line.split(None, 1)
                if len(parts) == 2:
                    chain.append(parts[1].split("+", 1)[0].strip())
            continue
        m = _HEADER.match(line.rstrip("\n"))
        if m is None:
            continue
        flush()
        comm, pid, period = m.group(1).strip(), int(m.group(2)), int(m.group(4))
        chain = []
        in_sample = True
    flush()

    roles = assign_roles(root, parent, last_comm)
    seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
    details: dict[tuple[str, str], float] = collections.defaultdict(float)
    for (p, phase, detail), value in by_pid.items():
        role = "idle" if p == 0 else roles.get(p, "others (not ours)")
        seconds[(role, phase)] += value
        if role not in ("idle", "others (not ours)") and phase != "user":
            details[(phase, detail)] += value
    for (phase, detail), value in kthread_samples.items():
        seconds[("kernel threads", phase)] += value
        details[(f"kthread {phase}", detail)] += value
    for (p, comm, phase), value in by_comm.items():
        if roles.get(p) == "test child":
            details[(f"container {ct_phase(comm)}", kernel_group(phase))] += value
    return Profile(dict(seconds), dict(details))


def assign_roles(root: int, parent: dict[int, int], last_comm: dict[int, str]) -> dict[int, str]:
    """Our processes' roles: the wrapper, pytest (its child), and below it by the names the conftest gave."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for child, ppid in parent.items():
        children[ppid].append(child)
    roles = {root: "wrapper"}

    def named(pid: int, otherwise: str) -> str:
        comm = last_comm.get(pid, "")
        if comm.startswith("lz-ct"):
            return "test child"
        return {"lz-zygote": "zygote", "lz-pool": "prebuild helper"}.get(comm, otherwise)

    def walk(pid: int, inherited: str) -> None:
        for child in children.get(pid, []):
            role = named(child, inherited)
            roles[child] = role
            walk(child, role)

    for pytest_pid in children.get(root, []):
        roles[pytest_pid] = "pytest"
        for child in children.get(pytest_pid, []):
            role = named(child, "other child of pytest")
            roles[child] = role
            walk(child, role)
    return roles


#: A container's phases, by the name the conftest gives it on the way (before init.main it has its parent's).
CT_PHASES: Final = {
    "lz-ct-init": "2 init.main until _pid1 (guard, cgroup, unshare mnt)",
    "lz-ct-build": "3 build the root, /proc, lock",
    "lz-ct-pref": "4 prefault take_ahead, until _await_go",
    "lz-ct-go": "5 wait for GO, make the body, until runtestprotocol",
    "lz-ct-test": "6 runtestprotocol (the test's phases and reports)",
    "lz-ct-tail": "7 after the test: DONE, prefault record, exit",
}
CT_BEFORE_MAIN: Final = "1 fork until init.main (at-fork hooks)"


def ct_phase(comm: str) -> str:
    return CT_PHASES.get(comm, CT_BEFORE_MAIN)


def kernel_group(phase: str) -> str:
    """Coarse kinds of kernel work, for the container timeline table."""
    if phase == "user":
        return "user"
    if "fault" in phase or phase.startswith("madvise"):
        return "page faults (incl. prefault madvise)"
    if phase.startswith(("mount", "ns create", "setns", "fs syscalls")):
        return "mounts, namespaces, fs"
    if phase.startswith("exit"):
        return "exit (exit_mmap, teardown)"
    return "other kernel"


# --- running -----------------------------------------------------------------------------------


def clean_env(extra: Iterable[tuple[str, str]] = ()) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["COLUMNS"] = "200"
    env.update(extra)
    return env


def write_project(path: Path, sizes: Sequence[int], conftest: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "pytest.ini").write_text("[pytest]\n")
    for n in sizes:
        (path / f"test_n{n}.py").write_text(TEST_FILE.replace("{n}", str(n)))
    if conftest:
        (path / "conftest.py").write_text(CONFTEST.format(labels=LABELS))


def passed(output: str, n: int) -> bool:
    found = re.search(r"(\d+) passed", output)
    return bool(found and int(found.group(1)) == n and not re.search(r"\d+ (failed|errors?)\b", output))


@dataclasses.dataclass
class Run:
    variant: str
    mode: str  # "account" or "profile"
    n: int
    round: int
    wall: float = 0.0
    rusage: float = 0.0
    group_user: float = 0.0
    group_sys: float = 0.0
    kthreads: dict[str, float] = dataclasses.field(default_factory=dict)
    machine: float = 0.0
    ok: bool = True
    profile: dict[str, float] = dataclasses.field(default_factory=dict)  # "role|phase" -> seconds
    details: dict[str, float] = dataclasses.field(default_factory=dict)  # "phase|detail" -> seconds
    phases: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # label -> [seconds, count, faults]


def run_one(
    variant: Variant, python: str, project: Path, n: int, *, mode: str, round_no: int, period: int, tmp: Path
) -> Run:
    run = Run(variant.name, mode, n, round_no)
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *variant.args, f"test_n{n}.py"]
    phases_out = tmp / "phases.json"
    perf_data = tmp / "perf.data"
    phases_out.unlink(missing_ok=True)
    env = clean_env(variant.env)
    env["BENCH_PHASES_OUT"] = str(phases_out)
    wrapper = [sys.executable, "-c", WRAPPER, *command]
    if mode == "profile":
        wrapper = [
            "perf", "record", "-q", "-a", "-g", "--kernel-callchains", "-e", "cpu-clock", "-c", str(period),
            "-o", str(perf_data), "--", *wrapper,
        ]  # fmt: skip
    with cpuacct_group() as group:
        env["BENCH_CGROUP"] = str(group)
        k0 = kthread_cpu()
        m0 = machine_busy()
        done = subprocess.run(
            wrapper, cwd=project, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
        )
        m1 = machine_busy()
        k1 = kthread_cpu()
        run.group_user, run.group_sys = group_cpu(group)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"run failed: {shlex.join(wrapper)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    run.wall, run.rusage = result["wall"], result["rusage"]
    run.machine = m1 - m0
    run.kthreads = {kind: k1.get(kind, 0.0) - k0.get(kind, 0.0) for kind in set(k0) | set(k1)}
    run.ok = passed(result["output"], n)
    if not run.ok:
        print(f"  {variant.name} n={n}: tests did not all pass: {result['output'][-300:]}", file=sys.stderr)
    if phases_out.exists():
        run.phases = {k: list(v) for k, v in json.loads(phases_out.read_text())["phases"].items()}
    if mode == "profile":
        script = subprocess.run(
            ["perf", "script", "-i", str(perf_data), "--show-task-events", "-F", "comm,pid,tid,period,ip,sym"],
            capture_output=True,
            text=True,
            check=True,
        )
        parsed = parse_perf(script.stdout.splitlines(), int(result["pid"]))
        run.profile = {f"{role}|{phase}": value for (role, phase), value in parsed.seconds.items()}
        run.details = {f"{phase}|{detail}": value for (phase, detail), value in parsed.details.items()}
        perf_data.unlink(missing_ok=True)
    return run


# --- tables ------------------------------------------------------------------------------------


def marginal(
    runs: list[Run], variant: str, mode: str, sizes: tuple[int, int], value: Callable[[Run], float]
) -> float | None:
    """Median over rounds of (value(n) - value(n0)) / (n - n0), in ms; ``value`` maps a Run to seconds."""
    n, n0 = sizes
    by_round: dict[int, dict[int, Run]] = collections.defaultdict(dict)
    for run in runs:
        if run.variant == variant and run.mode == mode:
            by_round[run.round][run.n] = run
    samples = [
        (value(pair[n]) - value(pair[n0])) * 1000 / (n - n0) for pair in by_round.values() if n in pair and n0 in pair
    ]
    return statistics.median(samples) if samples else None


def cell(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def markdown(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def report(runs: list[Run], chosen: list[str], n: int, n0: int) -> list[str]:
    """The tables, as Markdown lines."""
    out: list[str] = []

    def m(variant: str, value: Callable[[Run], float], mode: str = "account") -> float | None:
        return marginal(runs, variant, mode, (n, n0), value)

    def over(variant: str, value: Callable[[Run], float], mode: str = "account") -> float | None:
        base = VARIANTS[variant].baseline
        mine, theirs = m(variant, value, mode), m(base, value, mode) if base else None
        return None if mine is None or theirs is None else mine - theirs

    def group(r: Run) -> float:
        return r.group_user + r.group_sys

    def with_kthreads(r: Run) -> float:
        return group(r) + sum(r.kthreads.values())

    measures: tuple[tuple[str, Callable[[Run], float]], ...] = (
        ("ours", group),
        ("ours+kthreads", with_kthreads),
        ("machine", lambda r: r.machine),
    )
    out += ["### CPU per test, account runs (no perf, no conftest); ms per test, median of rounds", ""]
    rows = []
    forked = {key: over("forked", fn) for key, fn in measures} if "forked" in chosen else {}
    for name in chosen:
        base = bool(VARIANTS[name].baseline)
        extra = [cell(over(name, fn), "+.2f") if base else "—" for _, fn in measures]
        ratios = []
        for key, fn in measures:
            mine, ref = over(name, fn), forked.get(key)
            ratios.append(cell(mine / ref) if base and mine is not None and ref else "—")
        rows.append(
            [
                VARIANTS[name].title,
                cell(m(name, lambda r: r.wall)),
                cell(m(name, lambda r: r.rusage)),
                cell(m(name, group)),
                cell(m(name, lambda r: r.group_user)),
                cell(m(name, lambda r: r.group_sys)),
                cell(m(name, lambda r: sum(r.kthreads.values()))),
                cell(m(name, lambda r: r.machine)),
                *extra,
                *ratios,
            ]
        )
    out += markdown(
        [
            "variant", "wall", "RUSAGE_CHILDREN", "ours (cgroup)", "user", "sys", "kthreads", "machine",
            "over plain: ours", "ours+kthreads", "machine", "÷ forked's: ours", "ours+kthreads", "machine",
        ],
        rows,
    )  # fmt: skip
    out.append("")

    profiled = [name for name in chosen if any(r.variant == name and r.mode == "profile" for r in runs)]
    if not profiled:
        return out
    titles = [VARIANTS[name].title for name in profiled]

    def pm(name: str, key: str) -> float | None:
        return m(name, lambda r: r.profile.get(key, 0.0), "profile")

    def summed(name: str, keep: Callable[[str, str], bool]) -> float | None:
        def value(r: Run) -> float:
            return sum(v for k, v in r.profile.items() if keep(*k.split("|", 1)))

        return m(name, value, "profile")

    ours = ROLES[:-2]
    out += summary(runs, profiled, m)

    def role_is(role: str) -> Callable[[str, str], bool]:
        return lambda r, _p: r == role

    def phase_is(phase: str) -> Callable[[str, str], bool]:
        return lambda r, p: p == phase and r in ours[:-1]

    def detail_of(key: str) -> Callable[[Run], float]:
        return lambda r: r.details.get(key, 0.0)

    out += ["### perf: CPU per test by process and phase (ms per test, median of profile rounds)", ""]
    rows = []
    keys = sorted({k for r in runs if r.mode == "profile" for k in r.profile})
    for role in ROLES:
        if role == "idle":
            continue
        role_keys = [k for k in keys if k.split("|", 1)[0] == role]
        by_key = {k: [pm(name, k) for name in profiled] for k in role_keys}
        shown = [k for k in role_keys if max(abs(v or 0.0) for v in by_key[k]) >= 0.03]
        shown.sort(key=lambda k: -max(v or 0.0 for v in by_key[k]))
        total = [summed(name, role_is(role)) for name in profiled]
        if max(abs(v or 0.0) for v in total) < 0.03:
            continue
        rows.append([f"**{role}, total**", *(f"**{cell(v)}**" for v in total)])
        for k in shown:
            rows.append([f"{role}: {k.split('|', 1)[1]}", *(cell(v) for v in by_key[k])])
    rows.append(
        ["**all ours + kernel threads**", *(f"**{cell(summed(name, lambda r, _p: r in ours))}**" for name in profiled)]
    )
    out += markdown(["process: phase", *titles], rows)
    out.append("")

    out += ["### perf: kernel CPU per test by phase, summed over all our processes (ms per test)", ""]
    phases = sorted({k.split("|", 1)[1] for k in keys if k.split("|", 1)[0] in ours[:-1]} - {"user"})
    rows = []
    for phase in phases:
        values = [summed(name, phase_is(phase)) for name in profiled]
        if max(abs(v or 0.0) for v in values) >= 0.02:
            rows.append([phase, *(cell(v) for v in values)])
    for phase in sorted({k.split("|", 1)[1] for k in keys if k.startswith("kernel threads|")}):
        values = [pm(name, f"kernel threads|{phase}") for name in profiled]
        if max(abs(v or 0.0) for v in values) >= 0.02:
            rows.append([f"kthread {phase}", *(cell(v) for v in values)])
    out += markdown(["kernel phase", *titles], rows)
    out.append("")

    lonely = [name for name in profiled if VARIANTS[name].python == "lonely" and VARIANTS[name].baseline]
    groups: tuple[str, ...] = ("user", "page faults (incl. prefault madvise)", "mounts, namespaces, fs")
    groups += ("exit (exit_mmap, teardown)", "other kernel")
    for name in lonely:
        out += [f"### perf: a container's life by phase, {VARIANTS[name].title} (ms per test)", ""]
        rows = []
        for phase in (CT_BEFORE_MAIN, *CT_PHASES.values()):
            parts = [m(name, detail_of(f"container {phase}|{g}"), "profile") for g in groups]
            ct_total = sum(v or 0.0 for v in parts)
            rows.append([phase, *(cell(v) for v in parts), f"**{ct_total:.2f}**"])
        out += markdown(["container phase", *groups, "total"], rows)
        out.append("")
    detail_keys = sorted(
        {k for r in runs if r.mode == "profile" and r.variant in lonely for k in r.details if not k.startswith("cont")}
    )
    rows = []
    for key in detail_keys:
        values = [m(name, detail_of(key), "profile") for name in lonely]
        if max(abs(v or 0.0) for v in values) >= 0.04:
            rows.append([*key.split("|", 1), *(cell(v) for v in values)])
    rows.sort(key=lambda row: (row[0], -max(float(x) if x != "—" else 0.0 for x in row[2:])))
    out += ["### perf: what the kernel phases did (callee of the phase's anchor, RCU callback, work item)", ""]
    out += markdown(["phase", "function", *(VARIANTS[name].title for name in lonely)], rows)
    out.append("")

    out += [
        "### conftest: the plugin's Python phases, CPU (user+sys) ms per test / minor faults per test",
        "",
        "(`at ...` rows: a container's CPU and faults since its fork, up to that point)",
        "",
    ]
    rows = []

    def cpu_of(label: str) -> Callable[[Run], float]:
        return lambda r: r.phases.get(label, [0.0, 0, 0])[0]

    def faults_of(label: str) -> Callable[[Run], float]:
        return lambda r: r.phases.get(label, [0.0, 0, 0])[2] / 1000  # ms scaling makes it faults per test

    for label in LABELS:
        pairs = [(m(name, cpu_of(label), "profile"), m(name, faults_of(label), "profile")) for name in lonely]
        if all(cpu is None or abs(cpu) < 0.005 for cpu, _ in pairs):
            continue
        rows.append([label, *(f"{cell(cpu)} / {cell(f, '.0f')}" for cpu, f in pairs)])
    out += markdown(["phase", *(VARIANTS[name].title for name in lonely)], rows)
    return out


#: The issue's phases, each a set of (process role, perf phase) cells and conftest labels; first match wins.
SUMMARY: Final = (
    "pytest: user (hooks, the plugin, decoding and logging reports)",
    "pytest: kernel, other than fork and page faults",
    "zygote: user",
    "zygote: kernel, other than fork and page faults",
    "test child: user (Python: at-fork hooks, build, GO, the test's phases, frames)",
    "fork: page-table copy (dup_mmap) and the rest of copy_process",
    "copy-on-write faults (do_wp_page)",
    "other page faults, and fault entry/exit",
    "prefault in the kernel: MADV_POPULATE_WRITE, pagemap and maps scans",
    "namespace creation (unshare, setns; copy_mnt_ns, copy_net_ns)",
    "mount plan (mount, overlay, proc, pivot_root, umount)",
    "mount and namespace teardown in the task (put_mnt_ns, cleanup_mnt, superblocks)",
    "exit_mmap (unmap, free page tables)",
    "rest of exit (files, signals, release)",
    "kernel threads: RCU callbacks and grace periods, kworkers (free_ipc, cleanup_net, delayed_mntput)",
    "kernel threads: others (kdamond, kswapd, ...)",
    "prebuild helper (all of it)",
    "other kernel work of the test child (pipes, poll, sockets, other syscalls)",
    "other child of pytest (pytest-forked's test child: all of it but user)",
    "file syscalls (mkdir, stat, open, symlink: the mount plan's, pytest-forked's temporary files)",
)


def summary_row(role: str, phase: str) -> str | None:
    """Which SUMMARY row a (role, perf phase) cell belongs to."""
    if role in ("idle", "others (not ours)", "wrapper"):
        return None
    if role == "prebuild helper":
        return SUMMARY[16]
    if role == "kernel threads":
        return SUMMARY[14] if phase.startswith(("kworker", "rcu", "ksoftirqd")) else SUMMARY[15]
    if phase == "user":
        return {"pytest": SUMMARY[0], "zygote": SUMMARY[2]}.get(role, SUMMARY[4])
    prefixes = (
        ("fork:", 5),
        ("CoW", 6),
        ("other page faults", 7),
        ("page faults", 7),
        ("madvise", 8),
        ("prefault", 8),
        ("ns create", 9),
        ("setns", 9),
        ("mount plan", 10),
        ("fs syscalls", 19),
        ("mount teardown", 11),
        ("exit: namespace", 11),
        ("exit: exit_mmap", 12),
        ("exit:", 13),
    )
    for prefix, index in prefixes:
        if phase.startswith(prefix):
            return SUMMARY[index]
    if role == "other child of pytest":
        return SUMMARY[18]
    return {"pytest": SUMMARY[1], "zygote": SUMMARY[3]}.get(role, SUMMARY[17])


Marginal = Callable[[str, Callable[["Run"], float], str], "float | None"]


def summary(runs: list[Run], profiled: list[str], m: Marginal) -> list[str]:
    """The per-phase table the issue asks for: perf cells grouped, plus the conftest's Python-level shares."""
    out = ["### Per-phase CPU of one trivial isolated test (perf, ms per test, median of profile rounds)", ""]

    def row_value(row: str) -> Callable[[Run], float]:
        def value(r: Run) -> float:
            return sum(v for k, v in r.profile.items() if summary_row(*k.split("|", 1)) == row)

        return value

    rows = []
    totals = [0.0] * len(profiled)
    for row in SUMMARY:
        values = [m(name, row_value(row), "profile") for name in profiled]
        if max(abs(v or 0.0) for v in values) < 0.02:
            continue
        totals = [t + (v or 0.0) for t, v in zip(totals, values, strict=True)]
        rows.append([row, *(cell(v) for v in values)])
    rows.append(["**total (all of ours + kernel threads)**", *(f"**{t:.2f}**" for t in totals)])

    def labels_sum(names: tuple[str, ...]) -> Callable[[Run], float]:
        return lambda r: sum(r.phases.get(x, [0.0, 0, 0])[0] for x in names)

    extra = (
        ("frames out: encode_report, marshal, write", ("ct: encode_report", "ct: Sender (marshal + write)")),
        ("frames in: decode and log the reports", ("pytest: on_frame (decode and log the reports)",)),
        ("prefault: take_ahead, snapshot, record", (
            "ct: prefault take_ahead (MADV_POPULATE_WRITE)", "ct: prefault snapshot (pagemap scan)",
            "ct: prefault record (after DONE)")),
        ("replaying the mount plan", (
            "rootfs.apply (the mount plan, in a container or the pool helper)",
            "rootfs.enter_scratch + switch_root + mount_proc + _seal_proc")),
    )  # fmt: skip
    for title, names in extra:
        values = [
            m(name, labels_sum(names), "profile")
            if VARIANTS[name].python == "lonely" and VARIANTS[name].baseline
            else None
            for name in profiled
        ]
        rows.append([f"*of which (conftest clocks, user+sys): {title}*", *(cell(v) for v in values)])
    out += markdown(["phase", *(VARIANTS[name].title for name in profiled)], rows)
    out.append("")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--n0", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile-rounds", type=int, default=3, help="rounds with perf attached (of --rounds)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--period-us", type=int, default=250, help="perf cpu-clock sampling period (µs)")
    parser.add_argument("--cache-dir", type=Path, default=cache_dir())
    parser.add_argument("--json", type=Path, help="write every run's raw numbers here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: perf -a, a cpuacct cgroup, root-mode containers")
    chosen = [v for v in VARIANTS if v in args.variants or v in {VARIANTS[x].baseline for x in args.variants}]
    py = pythons(args.cache_dir)
    load_before = os.getloadavg()
    runs: list[Run] = []
    rng = random.Random()
    with tempfile.TemporaryDirectory(prefix="lonely-cpu-") as tmp_name:
        tmp = Path(tmp_name)
        projects = {"account": tmp / "account", "profile": tmp / "profile"}
        write_project(projects["account"], (args.tests, args.n0), conftest=False)
        write_project(projects["profile"], (args.tests, args.n0), conftest=True)
        for name in chosen:  # warm-up: byte-code and page caches
            variant = VARIANTS[name]
            for project in projects.values():
                run_one(variant, py[variant.python], project, args.n0, mode="account", round_no=-1, period=0, tmp=tmp)
        period = args.period_us * 1000
        for round_no in range(args.rounds):
            modes = ["account", "profile"] if round_no < args.profile_rounds else ["account"]
            jobs = [(name, mode, n) for name in chosen for mode in modes for n in (args.tests, args.n0)]
            rng.shuffle(jobs)
            load = os.getloadavg()[0]
            print(f"round {round_no + 1}/{args.rounds}: {len(jobs)} runs, load {load:.2f}", file=sys.stderr, flush=True)
            for name, mode, n in jobs:
                variant = VARIANTS[name]
                runs.append(
                    run_one(
                        variant,
                        py[variant.python],
                        projects[mode],
                        n,
                        mode=mode,
                        round_no=round_no,
                        period=period,
                        tmp=tmp,
                    )
                )
    load_after = os.getloadavg()
    print(
        f"machine: nproc {os.cpu_count()}, kernel {platform.release()}, python {platform.python_version()}, "
        f"pytest {PYTEST_VERSION} in both venvs, load average {' '.join(f'{x:.2f}' for x in load_before)} before / "
        f"{' '.join(f'{x:.2f}' for x in load_after)} after"
    )
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"per test = (x({args.tests} tests) - x({args.n0} tests)) / {args.tests - args.n0}, median of "
        f"{args.rounds} account rounds / {min(args.profile_rounds, args.rounds)} profile rounds"
    )
    failing = sorted({(r.variant, r.n) for r in runs if not r.ok})
    if failing:
        print(f"**runs whose tests did not all pass:** {failing}")
    print()
    for line in report(runs, chosen, args.tests, args.n0):
        print(line)
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in runs]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
