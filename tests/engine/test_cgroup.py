"""Tests of the cgroup engine: real cgroups on this machine, real limits hit by real child processes.

Every cgroup is made below this pytest process's own cgroups by a fresh :class:`Manager`, and the
``manager`` fixture removes it all in its teardown; ``no_leftovers`` checks that nothing named after
this process is left in any hierarchy after each test, passed or failed.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_lonely.sandbox import _syscalls
from pytest_lonely.sandbox.cgroup import Cgroup, CgroupError, Manager, enter
from pytest_lonely.sandbox.cgroupfs import DELEGATE_FIX, Hierarchy, discover_hierarchies
from pytest_lonely.sandbox.limits import (
    CPUS_ALLOWED,
    MEMORY_ALLOWED,
    PIDS_ALLOWED,
    Limits,
    cfs_quota,
    format_bytes,
    parse_cpus,
    parse_memory,
    parse_pids,
)

ROOT = Path(__file__).resolve().parents[2]
linux = pytest.mark.skipif(sys.platform != "linux", reason="cgroups need Linux")
root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
MiB = 1 << 20


# --------------------------------------------------------------------------- parsers (pure)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("256M", 256 * MiB),
        ("256m", 256 * MiB),
        (" 1G ", 1 << 30),
        ("1.5G", 3 << 29),
        ("64K", 64 << 10),
        ("4096", 4096),
        (4096, 4096),
        (None, None),
    ],
)
def test_parse_memory(text: str | int | None, expected: int | None) -> None:
    assert parse_memory(text) == expected


@pytest.mark.parametrize(
    "bad", ["lots", "", "256MB", "256 M", "-1", "0", "0M", 0, -5, "1.5", "12T", "M", True, 2**63, 1.5, "1e9"]
)
def test_parse_memory_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="must be a number of bytes or one with a K, M or G suffix") as info:
        parse_memory(bad)  # type: ignore[arg-type]
    assert MEMORY_ALLOWED in str(info.value)
    assert "e.g. 256M" in str(info.value)


@pytest.mark.parametrize(("text", "expected"), [("16", 16), (1, 1), (" 64 ", 64), (4194304, 4194304), (None, None)])
def test_parse_pids(text: str | int | None, expected: int | None) -> None:
    assert parse_pids(text) == expected


@pytest.mark.parametrize("bad", ["0", 0, -1, "-1", "ten", "1.5", 1.5, "", True, 4194305, "16 procs"])
def test_parse_pids_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="whole number of processes") as info:
        parse_pids(bad)  # type: ignore[arg-type]
    assert str(info.value) == PIDS_ALLOWED
    assert "whole number of processes from 1" in PIDS_ALLOWED


@pytest.mark.parametrize(("text", "expected"), [("1.5", 1.5), (0.25, 0.25), (2, 2.0), ("0.001", 0.001), (None, None)])
def test_parse_cpus(text: str | float | None, expected: float | None) -> None:
    assert parse_cpus(text) == expected


@pytest.mark.parametrize("bad", ["0", 0, 0.0, -1, "-0.5", "fast", "", "nan", "inf", float("nan"), 0.0001, 1e9, True])
def test_parse_cpus_rejects(bad: object) -> None:
    with pytest.raises(ValueError, match="number of CPUs") as info:
        parse_cpus(bad)  # type: ignore[arg-type]
    assert str(info.value) == CPUS_ALLOWED
    assert "e.g. 1.5" in CPUS_ALLOWED


def test_limits_truthiness_and_controllers() -> None:
    assert not Limits()
    assert Limits(pids=1)
    assert Limits(memory=1, cpus=0.5).controllers() == {"memory", "cpu"}


@pytest.mark.parametrize(
    ("n", "text"),
    [(256 * MiB, "256 MiB"), (1, "1 byte"), (1000, "1000 bytes"), (1536, "1.5 KiB"), (3 << 29, "1.5 GiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_cfs_quota_stretches_the_period_for_tiny_shares() -> None:
    assert cfs_quota(1.5) == (150_000, 100_000)
    assert cfs_quota(0.25) == (25_000, 100_000)
    assert cfs_quota(0.001) == (1000, 1_000_000)  # 0.1 ms per 100 ms is below the kernel's 1 ms minimum


# --------------------------------------------------------------------------- discovery (pure, made-up layouts)

HYBRID_MOUNTS = """\
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory,clone_children
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
24 22 0:21 / /proc rw,nosuid - proc proc rw
"""
HYBRID_CGROUP = "4:memory:/ci/job1\n2:cpu,cpuacct:/ci\n1:name=systemd:/ci\n0::/ci/job1\n"


def test_discover_comounted_v1_and_v2() -> None:
    found, notes = discover_hierarchies(HYBRID_MOUNTS, HYBRID_CGROUP)
    assert notes == []
    by_mount = {h.mount_point: h for h in found}
    assert by_mount["/sys/fs/cgroup/cpu,cpuacct"].controllers == {"cpu", "cpuacct"}
    assert by_mount["/sys/fs/cgroup/cpu,cpuacct"].own == "/sys/fs/cgroup/cpu,cpuacct/ci"
    assert by_mount["/sys/fs/cgroup/memory"].own == "/sys/fs/cgroup/memory/ci/job1"
    assert by_mount["/sys/fs/cgroup/unified"].version == 2
    assert by_mount["/sys/fs/cgroup/unified"].own == "/sys/fs/cgroup/unified/ci/job1"
    assert "/sys/fs/cgroup/systemd" not in by_mount  # a named hierarchy controls nothing


def test_discover_v2_inside_a_cgroup_namespace() -> None:
    """In a cgroup namespace /proc/self/cgroup says '/', and the mount's root is '/' too."""
    found, _ = discover_hierarchies("30 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "0::/\n")
    assert [(h.version, h.own) for h in found] == [(2, "/sys/fs/cgroup")]


def test_discover_notes_a_mount_that_hides_our_cgroup() -> None:
    mounts = "30 1 0:26 /other /mnt/cg rw - cgroup2 cgroup2 rw\n"
    found, notes = discover_hierarchies(mounts, "0::/ours\n")
    assert found == []
    assert notes == ["/mnt/cg shows only /other, not our cgroup /ours"]


def test_discover_nothing_is_not_an_error() -> None:
    assert discover_hierarchies("", "") == ([], [])
    m = Manager(())
    assert m.why_not(Limits()) is None
    assert "no cgroup hierarchy is mounted" in (m.why_not(Limits(memory=MiB)) or "")


# --------------------------------------------------------------------------- real cgroups: fixtures and helpers


def _ours_everywhere() -> list[str]:
    """Every directory named after this pytest process in any cgroup mount (there must be none between tests)."""
    name = f"lonely-{os.getpid()}"
    found = []
    for h in Manager.discover().hierarchies:
        for dirpath, dirnames, _ in os.walk(h.mount_point):
            found += [os.path.join(dirpath, d) for d in dirnames if d.startswith(name)]
            dirnames[:] = [d for d in dirnames if not d.startswith(name)]
    return found


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = Manager.discover()
    try:
        yield m
    finally:
        m.cleanup()
    assert _ours_everywhere() == [], "cgroups left behind"


def _need(m: Manager, limits: Limits, usage: bool = False) -> None:
    reason = m.why_not(limits, usage)
    if reason:
        pytest.skip(reason)


def spawn(cgroup: Cgroup, body: Callable[[int], int]) -> tuple[int, int]:
    """Fork a child that enters ``cgroup`` first, then runs ``body(write_fd)``; returns ``(pid, read_fd)``."""
    fds = cgroup.attach_fds()
    r, w = os.pipe()
    pid = _syscalls.fork()
    if pid == 0:  # pragma: no cover - child
        code = 70
        try:
            os.close(r)
            enter(fds)
            code = body(w)
        except BaseException:
            pass
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    os.close(w)
    return pid, r


def read_all(fd: int) -> bytes:
    out = b""
    while chunk := os.read(fd, 65536):
        out += chunk
    os.close(fd)
    return out


def wait(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


def _cgroup_of(pid: int | str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read()


def _rel(h: Hierarchy, path: str) -> str:
    return "/" + os.path.relpath(path, h.mount_point)


# --------------------------------------------------------------------------- real cgroups: limits


@linux
@root
def test_memory_limit_kills_and_is_reported(manager: Manager) -> None:
    limits = Limits(memory=parse_memory("64M"))
    _need(manager, limits)
    group = manager.create("oom", limits)

    def allocate(w: int) -> int:
        chunks = []
        for i in range(160):
            chunks.append(b"x" * MiB)  # written, so every page is charged
            os.write(w, b"%d\n" % i)
        return 0

    pid, r = spawn(group, allocate)
    written = read_all(r).split()
    status = wait(pid)
    assert os.WIFSIGNALED(status), f"the child survived 160 MiB under a 64 MiB limit (status {status})"
    assert os.WTERMSIG(status) == signal.SIGKILL
    assert len(written) < 160
    assert group.oom_killed()
    peak = group.usage().memory_peak
    assert peak is not None
    assert 48 * MiB < peak <= 64 * MiB
    assert f"memory limit {format_bytes(64 * MiB)} reached" == "memory limit 64 MiB reached"
    group.remove()


@linux
@root
def test_no_oom_without_pressure(manager: Manager) -> None:
    limits = Limits(memory=64 * MiB)
    _need(manager, limits)
    group = manager.create("calm", limits)
    pid, r = spawn(group, lambda w: len(b"x" * MiB) - MiB)
    read_all(r)
    assert wait(pid) == 0
    assert not group.oom_killed()


@linux
@root
def test_pids_limit_makes_fork_fail_with_eagain(manager: Manager) -> None:
    limits = Limits(pids=16)
    _need(manager, limits)
    group = manager.create("pids", limits)

    def fork_many(w: int) -> int:
        hold_r, hold_w = os.pipe()
        started = failed = other = 0
        for _ in range(64):
            try:
                kid = os.fork()
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    failed += 1
                else:
                    other += 1
                continue
            if kid == 0:
                os.close(hold_w)
                os.read(hold_r, 1)  # until our parent exits
                os._exit(0)
            started += 1
        os.write(w, f"{started} {failed} {other}".encode())
        return 0

    pid, r = spawn(group, fork_many)
    started, failed, other = map(int, read_all(r).split())
    assert wait(pid) == 0
    assert (started, failed, other) == (15, 49, 0)  # the child itself is the 16th
    usage = group.usage()
    if os.path.exists(os.path.join(group.paths[0], "pids.peak")) or any(
        os.path.exists(os.path.join(p, "pids.peak")) for p in group.paths
    ):
        assert usage.pids_peak == 16
    group.remove()  # the 15 grandchildren are orphans still waiting on the pipe: remove kills them
    assert not group.procs()


@linux
@root
def test_cpu_quota_caps_a_busy_loop(manager: Manager) -> None:
    limits = Limits(cpus=0.25)
    _need(manager, limits, usage=True)
    group = manager.create("cpu", limits, usage=True)

    def spin(w: int) -> int:
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            pass
        return 0

    pid, r = spawn(group, spin)
    read_all(r)
    assert wait(pid) == 0
    cpu = group.usage().cpu_seconds
    assert cpu is not None
    assert 0.05 < cpu <= 0.6, f"{cpu:.3f} s of CPU in 2 s wall under cpus=0.25"


@linux
@root
def test_usage_without_limits(manager: Manager) -> None:
    _need(manager, Limits(), usage=True)
    group = manager.create("usage", Limits(), usage=True)

    def work(w: int) -> int:
        data = b"y" * (32 * MiB)
        end = time.process_time() + 0.2
        while time.process_time() < end:
            pass
        hold_r, hold_w = os.pipe()
        kids = []
        for _ in range(3):
            kid = os.fork()
            if kid == 0:
                os.close(hold_w)
                os.read(hold_r, 1)  # all three alive at once
                os._exit(0)
            kids.append(kid)
        os.close(hold_w)
        for kid in kids:
            os.waitpid(kid, 0)
        return len(data) - 32 * MiB

    pid, r = spawn(group, work)
    read_all(r)
    assert wait(pid) == 0
    usage = group.usage()
    assert usage.memory_peak is not None
    assert usage.memory_peak >= 32 * MiB
    assert usage.cpu_seconds is not None
    assert usage.cpu_seconds >= 0.15
    has_peak = any(os.path.exists(os.path.join(p, "pids.peak")) for p in group.paths)
    assert usage.pids_peak == (4 if has_peak else None)  # 4.x-6.x kernels without pids.peak say None
    assert not group.oom_killed()


# --------------------------------------------------------------------------- real cgroups: entering


@linux
@root
def test_pid1_of_a_new_pid_namespace_enters_through_inherited_fds(manager: Manager) -> None:
    """Root mode: unshare(CLONE_NEWPID), fork PID 1, which writes '0' as its first act; then check from inside."""
    limits = Limits(memory=128 * MiB, pids=32)
    _need(manager, limits)
    group = manager.create("pidns", limits)
    fds = group.attach_fds()
    r, w = os.pipe()
    own_ns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _syscalls.unshare(_syscalls.CLONE_NEWPID)
        pid = _syscalls.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                enter(fds)
                os.write(w, f"{os.getpid()}\n{_cgroup_of('self')}".encode())
            finally:
                os._exit(0)
    finally:
        _syscalls.setns(own_ns, _syscalls.CLONE_NEWPID)
        os.close(own_ns)
    for fd in fds:
        os.close(fd)
    os.close(w)
    inside_pid, inside = read_all(r).decode().split("\n", 1)
    assert wait(pid) == 0
    assert inside_pid == "1"
    for h, path in group.dirs.items():
        line = f"::{_rel(h, path)}\n" if h.version == 2 else f":{','.join(sorted(h.controllers))}:{_rel(h, path)}\n"
        assert line in inside, inside


@linux
@root
def test_rootless_shape_enters_from_a_user_namespace(manager: Manager) -> None:
    """Rootless shape: a middle process in a new user namespace forks PID 1, which enters with the fds of root.

    The kernel checks the opener's credentials, so the unmapped uid inside does not matter.
    """
    limits = Limits(pids=8)
    _need(manager, limits)
    group = manager.create("userns", limits)
    fds = group.attach_fds()
    r, w = os.pipe()
    middle = _syscalls.fork()
    if middle == 0:  # pragma: no cover - child
        code = 1
        try:
            _syscalls.unshare(_syscalls.CLONE_NEWUSER | _syscalls.CLONE_NEWPID)
            init = os.fork()
            if init == 0:
                try:
                    enter(fds)
                    os.write(w, f"{os.getpid()} {os.geteuid()}".encode())
                finally:
                    os._exit(0)
            code = os.waitstatus_to_exitcode(os.waitpid(init, 0)[1])
        finally:
            os._exit(code)
    for fd in fds:
        os.close(fd)
    os.close(w)
    assert read_all(r).decode() == "1 65534"
    assert wait(middle) == 0
    assert group.usage().pids_peak in (1, None)


@linux
@root
def test_container_cannot_raise_its_limits_or_leave(manager: Manager) -> None:
    """The dirs are host root's and 0755: a process that is not global root can neither write limits nor move out."""
    limits = Limits(memory=64 * MiB, pids=16)
    _need(manager, limits)
    group = manager.create("escape", limits)
    for path in group.paths:
        st = os.stat(path)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)
    targets = [os.path.join(p, f) for p in group.paths for f in ("memory.limit_in_bytes", "memory.max", "pids.max")]
    targets = [t for t in targets if os.path.exists(t)]
    targets += [os.path.join(os.path.dirname(p), "cgroup.procs") for p in group.paths]  # the way out

    def try_writes(w: int) -> int:
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)
        results = []
        for target in targets:
            try:
                with open(target, "w") as f:
                    f.write("0" if target.endswith("procs") else "max")
                results.append("written")
            except OSError as e:
                results.append(errno.errorcode[e.errno or 0])
        os.write(w, " ".join(results).encode())
        return 0

    pid, r = spawn(group, try_writes)
    results = read_all(r).decode().split()
    assert wait(pid) == 0
    assert results == ["EACCES"] * len(targets)
    assert len(targets) >= 4


# --------------------------------------------------------------------------- real cgroups: ending


@linux
@root
def test_kill_a_whole_tree_with_v1_only(manager: Manager) -> None:
    """The v1 path: kill what cgroup.procs lists until it is empty, with no cgroup.kill to help."""
    v1 = Manager([h for h in manager.hierarchies if h.version == 1])
    try:
        limits = Limits(pids=64)
        _need(v1, limits)
        group = v1.create("kill1", limits)
        _kill_tree(group)
    finally:
        v1.cleanup()


@linux
@root
def test_kill_a_whole_tree(manager: Manager) -> None:
    limits = Limits(pids=64)
    _need(manager, limits)
    _kill_tree(manager.create("kill", limits))


def _kill_tree(group: Cgroup) -> None:
    def family(w: int) -> int:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for _ in range(5):
            if os.fork() == 0:
                os.setsid()  # gone from our session and process group: only the cgroup still holds it
                time.sleep(300)
                os._exit(0)
        os.write(w, b"ready")
        time.sleep(300)
        return 0

    pid, r = spawn(group, family)
    assert os.read(r, 5) == b"ready"
    os.close(r)
    assert len(group.procs()) == 6
    t = time.perf_counter()
    group.kill()
    elapsed = time.perf_counter() - t
    assert group.procs() == set()
    assert os.WTERMSIG(wait(pid)) == signal.SIGKILL
    assert elapsed < 1.0
    group.remove()
    assert not any(os.path.exists(p) for p in group.paths)


@linux
@root
def test_sub_cgroups_made_by_the_test_are_removed(manager: Manager) -> None:
    limits = Limits(memory=64 * MiB, pids=32)
    _need(manager, limits)
    group = manager.create("nested", limits)
    paths = group.paths

    def nest(w: int) -> int:
        for path in paths:
            deep = os.path.join(path, "a", "b")
            os.makedirs(deep)
            os.makedirs(os.path.join(path, "c"))
            with open(os.path.join(deep, "cgroup.procs"), "w") as f:
                f.write("0")
        os.write(w, b"ready")
        time.sleep(300)
        return 0

    pid, r = spawn(group, nest)
    assert os.read(r, 5) == b"ready"
    os.close(r)
    assert all(os.path.isdir(os.path.join(p, "a", "b")) for p in paths)
    group.remove()
    assert os.WTERMSIG(wait(pid)) == signal.SIGKILL
    assert not any(os.path.exists(p) for p in paths)


@linux
@root
def test_200_cycles_leave_nothing_and_stay_cheap(manager: Manager) -> None:
    limits = Limits(memory=256 * MiB, pids=64, cpus=1.5)
    _need(manager, limits)
    setup, teardown = [], []
    for i in range(200):
        t0 = time.perf_counter()
        group = manager.create(f"c{i}", limits)
        t1 = time.perf_counter()
        pid, r = spawn(group, lambda w: 0)
        read_all(r)
        assert wait(pid) == 0
        t2 = time.perf_counter()
        group.remove()
        setup.append(t1 - t0)
        teardown.append(time.perf_counter() - t2)
    parents = list(manager._parents.values())
    assert parents
    assert [e for p in parents for e in os.listdir(p) if os.path.isdir(os.path.join(p, e))] == []
    create_ms, remove_ms = statistics.median(setup) * 1000, statistics.median(teardown) * 1000
    print(f"create+configure {create_ms:.3f} ms, remove {remove_ms:.3f} ms (median of 200, {len(parents)} hierarchies)")
    assert create_ms + remove_ms < 5.0  # about 0.6 ms here; a loose bound for a loaded CI machine


@linux
@root
def test_stale_session_parents_of_dead_pytests_are_removed(manager: Manager) -> None:
    limits = Limits(pids=8)
    _need(manager, limits)
    dead = _syscalls.fork()
    if dead == 0:  # pragma: no cover - child
        os._exit(0)
    wait(dead)
    hierarchy = next(h for h in manager.hierarchies if "pids" in h.controllers)
    stale = os.path.join(hierarchy.own, f"lonely-{dead}")
    os.makedirs(os.path.join(stale, "old-test", "sub"))
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        with open(os.path.join(stale, "old-test", "sub", "cgroup.procs"), "w") as f:
            f.write(str(sleeper.pid))
        manager.create("fresh", limits)  # the first use of a hierarchy sweeps it
        assert not os.path.exists(stale)
        assert sleeper.wait(timeout=5) == -signal.SIGKILL
    finally:
        sleeper.kill()
        sleeper.wait()
        if os.path.exists(stale):
            Cgroup("stale", Limits(), {hierarchy: stale}).remove()


@linux
@root
def test_live_sessions_are_not_swept(manager: Manager) -> None:
    limits = Limits(pids=8)
    _need(manager, limits)
    sleeper = subprocess.Popen(["sleep", "300"])
    hierarchy = next(h for h in manager.hierarchies if "pids" in h.controllers)
    other = os.path.join(hierarchy.own, f"lonely-{sleeper.pid}")
    try:
        os.mkdir(other)
        assert manager.cleanup_stale() == []
        assert os.path.isdir(other)
    finally:
        sleeper.kill()
        sleeper.wait()
        os.rmdir(other)


# --------------------------------------------------------------------------- cgroup v2 on the unified hierarchy


@pytest.fixture
def v2(manager: Manager) -> Iterator[Manager]:
    only = Manager([h for h in manager.hierarchies if h.version == 2])
    if not only.hierarchies:
        pytest.skip("no cgroup v2 hierarchy is mounted")
    try:
        yield only
    finally:
        only.cleanup()


@linux
@root
def test_v2_procs_events_and_kill(v2: Manager) -> None:
    """cgroup.procs, cgroup.events and cgroup.kill need no controller: tested for real on the unified hierarchy."""
    group = v2.create("v2", Limits(), usage=True)
    (path,) = group.paths
    assert group.populated() is False

    def sleep(w: int) -> int:
        if os.fork() == 0:
            time.sleep(300)
        os.write(w, b"ready")
        time.sleep(300)
        return 0

    pid, r = spawn(group, sleep)
    assert os.read(r, 5) == b"ready"
    os.close(r)
    with open(os.path.join(path, "cgroup.events")) as f:
        assert "populated 1" in f.read()
    assert len(group.procs()) == 2
    assert pid in group.procs()
    assert f"0::{_rel(v2.hierarchies[0], path)}\n" in _cgroup_of(pid)
    with open(os.path.join(path, "cgroup.kill"), "w") as f:
        f.write("1")  # what kill() does first: one write for the whole tree
    assert os.WTERMSIG(wait(pid)) == signal.SIGKILL
    group.kill()
    assert group.populated() is False
    assert group.usage().cpu_seconds is not None  # v2's core cpu.stat counts without the cpu controller
    group.remove()
    assert not os.path.exists(path)


@linux
@root
def test_v2_without_controllers_names_what_is_missing(v2: Manager) -> None:
    for controller, limits in (("memory", Limits(memory=MiB)), ("pids", Limits(pids=4)), ("cpu", Limits(cpus=1))):
        if controller in v2.hierarchies[0].controllers:
            continue
        reason = v2.why_not(limits)
        assert reason is not None
        assert reason.startswith(f"this machine has no {controller!r} cgroup controller (")
        assert f"cgroup v2 at {v2.hierarchies[0].mount_point}" in reason
        with pytest.raises(CgroupError, match=r"no .* cgroup controller"):
            v2.create("refused", limits)


@linux
@root
def test_missing_v1_controller_message(manager: Manager) -> None:
    without_pids = Manager([h for h in manager.hierarchies if "pids" not in h.controllers or h.version == 2])
    reason = without_pids.why_not(Limits(pids=16))
    if "pids" in next((h.controllers for h in without_pids.hierarchies if h.version == 2), frozenset()):
        pytest.skip("this machine's v2 hierarchy has pids")
    assert reason is not None
    assert reason.startswith("this machine has no 'pids' cgroup controller (cgroup v1 controllers ")
    assert without_pids.why_not(Limits()) is None


# --------------------------------------------------------------------------- rootless


_ROOTLESS_SCRIPT = """
from pytest_lonely.sandbox import cgroup
from pytest_lonely.sandbox.limits import Limits
m = cgroup.Manager.discover()
assert m.why_not(Limits()) is None
print(m.why_not(Limits(memory=64 << 20)))
try:
    m.create("x", Limits(pids=4))
except cgroup.CgroupError as e:
    print("refused:", e)
"""


@linux
@root
def test_rootless_without_delegation_says_how_to_fix_it() -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv not installed")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("/usr/bin/python3 is missing")
    base = tempfile.mkdtemp(prefix="lonely-cgroup-")
    try:
        package = os.path.join(base, "pytest_lonely", "sandbox")
        os.makedirs(package)
        for init in (os.path.dirname(package), package):
            open(os.path.join(init, "__init__.py"), "w").close()
        for module in ("cgroup.py", "cgroupfs.py", "limits.py", "mountinfo.py"):
            shutil.copy(ROOT / "pytest_lonely" / "sandbox" / module, package)
        for dirpath, _, files in os.walk(base):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        cmd = [
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            _ROOTLESS_SCRIPT,
        ]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={"PYTHONPATH": base}, timeout=60, check=False, cwd="/"
        )
        assert proc.returncode == 0, proc.stderr
        why, refused = proc.stdout.splitlines()
        assert why.startswith("cannot create cgroups below /sys/fs/cgroup/")
        assert "owned by uid 0; pytest runs as uid 65534" in why
        assert "not delegated to this user" in why
        assert DELEGATE_FIX in why
        assert refused.startswith("refused: cannot create cgroups below")
    finally:
        shutil.rmtree(base)
