"""Prototype of the boundary fix (not part of the package).  Run as root: python proto.py probes|bench.

Root mode only.  Container = fork of this process:
  parent: unshare(NEWPID), fork, setns(own pidns)          (as the launcher does today)
  PID 1 (host root, host mount ns):
    1. unshare(NEWNS) [+NEWCGROUP if asked, still init-owned]   -> M1, owned by the initial userns
    2. rootfs.enter_scratch(); rootfs.apply(plan)  (host-root mounts: RO binds, overlays, /dev, /tmp)
    3. mount fresh proc on NEW/proc; RO bind-over-self of /proc/{sys,sysrq-trigger,irq,bus,fs,...}
       /sys: RO rbind of the host /sys (mount_setattr RDONLY recursive)
    4. switch_root (pivot, detach old)
    5. enter the user namespace U (map 0 0 4294967295), one of:
         parent  : unshare(NEWUSER), tell the parent over a pipe, the parent writes /proc/PID/{uid,gid}_map
         setns   : setns(userns_fd, NEWUSER) into a U made once per session
         helper  : PID 1 forks a helper before unshare(NEWUSER), the helper writes the maps and exits
    6. unshare(NEWNS | NEWUTS | NEWIPC [| NEWNET] [| NEWCGROUP])  -> M2 owned by U: every mount locked
    7. sethostname, lo up, close_range(3, ~0, CLOSE_RANGE_CLOEXEC) + keep the report pipe
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [_REPO, os.path.join(_REPO, "tests")]
import boundary_probes as bp  # noqa: E402

from pytest_lonely.sandbox import _syscalls as sc  # noqa: E402
from pytest_lonely.sandbox import rootfs  # noqa: E402

CLONE_NEWCGROUP = 0x02000000
MAP = b"0 0 4294967295\n"
PROC_COVERS = ("sys", "sysrq-trigger", "irq", "bus", "fs", "acpi", "scsi", "driver", "latency_stats", "mtrr")
libc = ctypes.CDLL(None, use_errno=True)
CLOSE_RANGE_CLOEXEC = 4


def close_range_cloexec(keep: tuple[int, ...]) -> None:
    if libc.syscall(436, 3, 0xFFFFFFFF, CLOSE_RANGE_CLOEXEC) < 0:  # close_range
        raise OSError(ctypes.get_errno(), "close_range")
    for fd in keep:
        os.set_inheritable(fd, True)  # clears FD_CLOEXEC


def write_maps(pid: int) -> None:
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY)
        try:
            os.write(fd, MAP)
        finally:
            os.close(fd)


def session_userns() -> int:
    """A user namespace with the identity map, kept by an fd; made once (costs one fork)."""
    r, w = os.pipe()
    r2, w2 = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.close(w2)
        sc.unshare(sc.CLONE_NEWUSER)
        os.write(w, b"u")
        os.read(r2, 1)
        os._exit(0)
    os.close(w)
    os.close(r2)
    os.read(r, 1)
    write_maps(pid)
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    os.close(w2)
    os.waitpid(pid, 0)
    os.close(r)
    return fd


def cover_proc(new: str) -> None:
    for name in PROC_COVERS:
        path = f"{new}/proc/{name}"
        if not os.path.lexists(path):
            continue
        sc.mount(path, path, None, sc.MS_BIND | sc.MS_REC)
        sc.mount(None, path, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.mount_flags_of(path))


def sys_ro(new: str) -> None:
    os.makedirs(f"{new}/sys", exist_ok=True)
    sc.mount(f"{rootfs.OLD}/sys", f"{new}/sys", None, sc.MS_BIND | sc.MS_REC)
    sc.mount_setattr_rdonly(f"{new}/sys")


def strip_sys(ops: tuple[rootfs.Op, ...]) -> tuple[rootfs.Op, ...]:
    """Drop the plan's fresh sysfs: /sys becomes a read-only rbind of the host's (see the design notes)."""
    return tuple(op for op in ops if not (op[0] == rootfs.MOUNT and op[3] == "sysfs"))


def pid1(
    ops, how: str, network: bool, userns_fd: int, sync: tuple[int, int], report_w: int, job, cgroupns: str, joins=None
) -> None:
    status = 1
    try:
        t0 = time.perf_counter()
        if joins is None:
            flags = sc.CLONE_NEWNS | (CLONE_NEWCGROUP if cgroupns == "before" else 0)
            sc.unshare(flags)
            rootfs.enter_scratch()
            notes = rootfs.apply(ops)
            rootfs.mount_proc(rootfs.NEW + "/proc")
            tc = time.perf_counter()
            if how != "none":
                cover_proc(rootfs.NEW)
            tcov = time.perf_counter() - tc
            if os.environ.get("HIDDEN_PROC"):
                # a fully visible, read-only proc, hidden under an empty tmpfs: lets nested proc mounts be ro
                os.makedirs(rootfs.NEW + "/dev/.p/proc")
                sc.mount(
                    "proc",
                    rootfs.NEW + "/dev/.p/proc",
                    "proc",
                    sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC,
                )
                sc.mount("tmpfs", rootfs.NEW + "/dev/.p", "tmpfs", sc.MS_RDONLY, "size=0")
            sys_ro(rootfs.NEW)
            rootfs.switch_root("/")
        else:
            sc.setns(joins["mnt"], sc.CLONE_NEWNS)
            rootfs.mount_proc("/proc")
            if how != "none":
                cover_proc("")
            os.chdir("/")
        ta = time.perf_counter()
        if how == "parent":
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(sync[1], b"u")
            os.read(sync[0], 1)
        elif how == "setns":
            sc.setns(userns_fd, sc.CLONE_NEWUSER)
        elif how == "helper":
            r, w = os.pipe()
            helper = os.fork()
            if helper == 0:
                os.read(r, 1)
                write_maps(os.getppid())
                os._exit(0)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(w, b"u")
            os.waitpid(helper, 0)
            os.close(r)
            os.close(w)
        flags = 0
        if how != "none":
            flags |= sc.CLONE_NEWNS
        if joins is None:
            flags |= sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | (0 if network else sc.CLONE_NEWNET)
        if cgroupns == "after":
            flags |= CLONE_NEWCGROUP
        tb = time.perf_counter()
        sc.unshare(flags)
        tcc = time.perf_counter()
        if joins is not None:
            for kind, flag in (("uts", sc.CLONE_NEWUTS), ("ipc", sc.CLONE_NEWIPC), ("net", sc.CLONE_NEWNET)):
                if kind in joins:
                    sc.setns(joins[kind], flag)
        socket.sethostname("proto")
        if not network and joins is None:
            sc.interface_up("lo")
        close_range_cloexec((report_w,))
        built = time.perf_counter() - t0
        result = job() if job else None
        os.write(
            report_w,
            json.dumps(
                {
                    "built_ms": built * 1000,
                    "result": result,
                    "user_ms": (tb - ta) * 1000,
                    "unshare_ms": (tcc - tb) * 1000,
                    "cover_ms": tcov * 1000 if joins is None else 0,
                }
            ).encode(),
        )
        status = 0
    except BaseException as exc:
        os.write(report_w, json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
    finally:
        os._exit(status)


def container(ops, how="setns", network=True, userns_fd=-1, job=None, cgroupns="none", joins=None):
    pidns = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
    sync_a = os.pipe()  # child -> parent
    sync_b = os.pipe()  # parent -> child
    rep_r, rep_w = os.pipe()
    t0 = time.perf_counter()
    sc.unshare(sc.CLONE_NEWPID)
    pid = os.fork()
    if pid == 0:
        pid1(ops, how, network, userns_fd, (sync_b[0], sync_a[1]), rep_w, job, cgroupns, joins)
    sc.setns(pidns, sc.CLONE_NEWPID)
    os.close(pidns)
    os.close(rep_w)
    if how == "parent":
        os.read(sync_a[0], 1)
        write_maps(pid)
        os.write(sync_b[1], b"g")
    data = b""
    while chunk := os.read(rep_r, 65536):
        data += chunk
    t1 = time.perf_counter()
    os.waitpid(pid, 0)
    for fd in (*sync_a, *sync_b, rep_r):
        os.close(fd)
    out = json.loads(data or b'{"error": "no report"}')
    out["total_ms"] = (t1 - t0) * 1000
    return out


def prebuild(ops, network: bool, userns_fd: int):
    """What the pool helper would hand over: M1 (init-owned, root built), and UTS/IPC/NET owned by U.

    Done here in a throwaway child (off the critical path in the real pool)."""
    r, w = os.pipe()
    back = os.pipe()
    pid = os.fork()
    if pid == 0:
        sc.unshare(sc.CLONE_NEWNS)
        rootfs.enter_scratch()
        rootfs.apply(ops)
        sys_ro(rootfs.NEW)
        rootfs.switch_root("/")
        sc.setns(userns_fd, sc.CLONE_NEWUSER)
        sc.unshare(sc.CLONE_NEWUTS | sc.CLONE_NEWIPC | (0 if network else sc.CLONE_NEWNET))
        if not network:
            sc.interface_up("lo")
        os.write(w, b"r")
        os.read(back[0], 1)
        os._exit(0)
    os.read(r, 1)
    fds = {k: os.open(f"/proc/{pid}/ns/{k}", os.O_RDONLY | os.O_CLOEXEC) for k in ("mnt", "uts", "ipc", "net")}
    if network:
        os.close(fds.pop("net"))
    os.write(back[1], b"x")
    os.waitpid(pid, 0)
    for fd in (r, w, *back):
        os.close(fd)
    return fds


# ------------------------------------------------------------------------------------------ probes

HOST_RO = "/tmp/lonely-proto-ro"
HOST_FILES = "/tmp/lonely-proto-files"


def probes_job():
    res = {}
    knob = "/sys/kernel/mm/ksm/pages_to_scan"
    for name, fn in (
        ("sysctl", lambda: bp.sysctl_write("/proc/sys/kernel/printk_ratelimit", "6")),
        ("core_pattern", lambda: bp.sysctl_open_for_writing("/proc/sys/kernel/core_pattern")),
        ("sys_knob", lambda: bp.sys_knob(knob, "101")),
        ("ro_bind", lambda: bp.ro_bind(HOST_RO, "pwned")),
        ("handle", lambda: bp.open_by_forged_handle([HOST_RO, "/usr"], "lost+found")),
        ("ip_addr", lambda: bp.host_lo_address("127.0.0.77")),
        ("cgroup", lambda: bp.cgroup_mkdir("lonely-proto-cg")),
        ("adjtimex", bp.adjtimex_tick),
        ("mknod", lambda: bp.mknod_kmsg(["/dev", "/tmp", "/root", "/var/tmp"])),
        ("fds", lambda: bp.inherited_fds([])),
        ("fresh_proc_rw", lambda: _fresh("proc", 0)),
        ("fresh_proc_ro", lambda: _fresh("proc", sc.MS_RDONLY)),
    ):
        p = fn()
        res[name] = p.log
    works = {}
    for name, fn in (
        ("uid0", lambda: os.getuid() == 0 or 1 / 0),
        ("sethostname", lambda: socket.sethostname("again")),
        ("etc_passwd", lambda: open("/etc/passwd", "a").close()),
        ("chown", lambda: (open("/tmp/c", "w").close(), os.chown("/tmp/c", 4242, 4242))),
        ("tmpfs", bp.mount_tmpfs),
        ("nested_pid_proc", bp.nested_pid_namespace_proc),
        (
            "nested_pid_proc_ro",
            lambda: bp.run(
                "unshare",
                "--pid",
                "--fork",
                "--mount",
                "sh",
                "-c",
                "mount -t proc -o ro proc /proc && readlink /proc/self",
            ),
        ),
        ("bind80", lambda: bp.bind_low_port(80)),
        ("ip_own_net", lambda: bp.run("ip", "addr", "add", "10.9.9.9/24", "dev", "lo")),
        ("iptables", lambda: bp.run("iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")),
        ("setsid_daemon", lambda: bp.run("setsid", "sh", "-c", "sleep 0.01 & kill -TERM $!; echo ok")),
    ):
        try:
            fn()
            works[name] = "ok"
        except BaseException as exc:
            works[name] = f"FAILED {type(exc).__name__}: {exc}"[:160]
    return {"probes": res, "works": works}


def _fresh(fstype, flags):
    p = bp.Probe()
    where = bp._scratch(fstype)
    if p.attempt(f"mount fresh {fstype} flags={flags}", lambda: bp.mount(fstype, where, fstype, flags)):
        bp.umount(where)
    return p


def host_state():
    def rd(p):
        with open(p) as f:
            return f.read().strip()

    return {
        "printk_ratelimit": rd("/proc/sys/kernel/printk_ratelimit"),
        "ksm": rd("/sys/kernel/mm/ksm/pages_to_scan"),
        "ro_dir": sorted(os.listdir(HOST_RO)),
        "lo": os.popen("ip -o -4 addr show dev lo").read().count("inet"),
        "cg": [r for r in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids") if os.path.isdir(r + "/lonely-proto-cg")],
        "hostname": socket.gethostname(),
    }


def restore(before):
    with open("/proc/sys/kernel/printk_ratelimit", "w") as f:
        f.write(before["printk_ratelimit"])
    with open("/sys/kernel/mm/ksm/pages_to_scan", "w") as f:
        f.write(before["ksm"])
    for n in os.listdir(HOST_RO):
        os.unlink(os.path.join(HOST_RO, n))
    os.system("ip addr del 127.0.0.77/32 dev lo 2>/dev/null")
    for r in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids"):
        if os.path.isdir(r + "/lonely-proto-cg"):
            os.rmdir(r + "/lonely-proto-cg")
    socket.sethostname(before["hostname"])


def main() -> None:
    os.makedirs(HOST_RO, exist_ok=True)
    sys.path.insert(0, HOST_RO)  # a directory on sys.path under /tmp: the plan binds it read-only
    layout = rootfs.HostLayout.scan(rootfs.Path("/tmp/boundary-proto"))
    what = sys.argv[1]
    userns_fd = session_userns()
    ops_net = strip_sys(rootfs.plan(layout, rootfs.PlanKey(None, False, True)))
    ops_nonet = strip_sys(rootfs.plan(layout, rootfs.PlanKey(None, False, False)))
    if what == "probes":
        how = sys.argv[2] if len(sys.argv) > 2 else "setns"
        cg = sys.argv[3] if len(sys.argv) > 3 else "none"
        pre = len(sys.argv) > 4 and sys.argv[4] == "prebuilt"
        for network in (True, False):
            before = host_state()
            try:
                ops = ops_net if network else ops_nonet
                joins = prebuild(ops, network, userns_fd) if pre else None
                out = container(ops, how, network, userns_fd, probes_job, cg, joins)
                if joins:
                    for fd in joins.values():
                        os.close(fd)
                after = host_state()
                print(
                    json.dumps(
                        {
                            "network": network,
                            "how": how,
                            "cgroupns": cg,
                            "prebuilt": pre,
                            **out,
                            "host_changed": {k: (before[k], after[k]) for k in before if before[k] != after[k]},
                        },
                        indent=1,
                    )
                )
            finally:
                restore(before)
    elif what == "bench":
        n = int(sys.argv[2]) if len(sys.argv) > 2 else 100
        hows = ("none", "parent", "setns", "helper")
        times = {h: [] for h in hows}
        steps = {h: {"user_ms": [], "unshare_ms": [], "cover_ms": []} for h in hows}
        built = {h: [] for h in hows}
        for _ in range(n):
            for h in hows:
                out = container(ops_net, h, True, userns_fd)
                assert "error" not in out, out
                times[h].append(out["total_ms"])
                built[h].append(out["built_ms"])
                for k in steps[h]:
                    steps[h][k].append(out[k])
        t = time.perf_counter()
        for _ in range(20):
            os.close(session_userns())
        mk = (time.perf_counter() - t) / 20 * 1000
        for h in hows:
            print(
                f"{h:7s} total median {statistics.median(times[h]):.3f} ms  mean {statistics.mean(times[h]):.3f}"
                f"  (inside PID 1 until ready: median {statistics.median(built[h]):.3f} ms) "
                + " ".join(f"{k} {statistics.median(v):.3f}" for k, v in steps[h].items())
            )
        print(f"making one session user namespace (fork+unshare+maps): {mk:.3f} ms")
    os.close(userns_fd)


if __name__ == "__main__":
    main()
