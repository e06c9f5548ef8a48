"""What ``changes.diff`` and ``changes.keep`` cost the parent: CPU per call, for a handful of files and 10,000.

Why CPU and not wall time: the machine is shared and loaded; the walk is system calls (``scandir``,
``fstatat``, ``openat``, ``getxattr``) done by the calling process, so ``getrusage(RUSAGE_SELF)`` around
the calls counts all of it.  Rounds interleave the scenarios, and the median and range over rounds are
printed.

Each scenario is a real container root: a child with its own mount namespace replays the real plan of
the host view (``rootfs.plan`` of ``HostLayout.scan``: one overlay over the host's ``/`` and one per real
mount below it), as PID 1 does, switches root, writes ``/etc/hosts``, makes the scenario's changes, hands
the parent a descriptor of the scratch tmpfs and exits.  The parent then measures ``diff`` (the report
section of a failed test), ``diff`` with ``limit=None`` plus ``keep`` into a fresh directory
(``--lonely-keep``), ``snapshot`` (a per-test baseline) and ``layers_of`` (once per plan).

Root only; the standard library and the package only; no mount outlives the child.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pytest_lonely.sandbox import _syscalls as sc  # noqa: E402
from pytest_lonely.sandbox import changes, rootfs  # noqa: E402


def handful() -> None:
    """A typical failing system test: an installer wrote a config, touched a few files, removed one."""
    name = f"lonely-bench-{os.getpid()}"
    os.makedirs(f"/etc/{name}")
    with open(f"/etc/{name}/app.conf", "w") as f:
        f.write("key = value\n" * 20)
    os.makedirs(f"/var/lib/{name}")
    for i in range(3):
        with open(f"/var/lib/{name}/state{i}", "w") as f:
            f.write("x" * 4000)
    with open("/etc/hostname", "a") as f:  # a copy-up of a host file
        f.write("")
    os.symlink(f"/etc/{name}/app.conf", f"/var/lib/{name}/current")


def ten_thousand() -> None:
    """A test that writes 10,000 small files in 100 directories."""
    top = f"/var/tmp/lonely-bench-{os.getpid()}"
    for d in range(100):
        os.makedirs(f"{top}/d{d:03}")
        for i in range(100):
            fd = os.open(f"{top}/d{d:03}/f{i:03}", os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x" * 100)
            os.close(fd)


SCENARIOS: Final[dict[str, Callable[[], None]]] = {"handful": handful, "10,000 files": ten_thousand}


def build(plan: rootfs.Plan, act: Callable[[], None]) -> int:
    """A container root made as PID 1 makes it, changed by ``act``; returns the scratch tmpfs's descriptor."""
    ours, theirs = socket.socketpair()
    pid = sc.fork()
    if pid == 0:
        ours.close()
        try:
            sc.unshare(sc.CLONE_NEWNS)
            rootfs.enter_scratch()
            scratch = os.open("/", os.O_PATH | os.O_DIRECTORY)
            rootfs.apply(plan)
            rootfs.switch_root("/")
            rootfs.write_hosts("bench")
            act()
            socket.send_fds(theirs, [b"ready"], [scratch])
        finally:
            os._exit(0)
    theirs.close()
    message, fds, _, _ = socket.recv_fds(ours, 16, 1)
    os.waitpid(pid, 0)
    ours.close()
    if message != b"ready" or len(fds) != 1:
        raise SystemExit("the container root could not be built (run as root)")
    return fds[0]


def cpu_ms(fn: Callable[[], object], repeat: int, after: Callable[[], object] = lambda: None) -> float:
    """CPU per call of ``fn``; ``after`` (cleanup) runs after each call, outside the measurement."""
    used = 0.0
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_SELF)
        fn()
        done = resource.getrusage(resource.RUSAGE_SELF)
        used += (done.ru_utime - before.ru_utime) + (done.ru_stime - before.ru_stime)
        after()
    return used * 1000 / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=20, help="calls per measurement (the big scenario: /10)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the scenarios build real overlays")
    tmp = Path(tempfile.mkdtemp(prefix="lonely-bench-changes-"))
    try:
        plan = rootfs.plan(rootfs.HostLayout.scan(REPO), rootfs.PlanKey(None, rootless=False, network=False))
        layers = changes.layers_of(plan)
        fds = {name: build(plan, act) for name, act in SCENARIOS.items()}
        found = {name: changes.diff(fd, layers, hostname="bench", limit=None) for name, fd in fds.items()}
        samples: dict[tuple[str, str], list[float]] = {}
        dests = {"basetemp's fs": tmp, "tmpfs": Path("/dev/shm")}
        for _ in range(args.rounds):
            samples.setdefault(("layers_of", "(the plan)"), []).append(cpu_ms(lambda: changes.layers_of(plan), 200))
            for name, fd in fds.items():
                repeat = args.repeat if name == "handful" else max(1, args.repeat // 10)

                def report(fd: int = fd) -> object:
                    return changes.diff(fd, layers, hostname="bench")

                def baseline(fd: int = fd) -> object:
                    return changes.snapshot(fd, layers, hostname="bench")

                samples.setdefault(("diff (report)", name), []).append(cpu_ms(report, repeat))
                samples.setdefault(("snapshot", name), []).append(cpu_ms(baseline, repeat))
                for where, base in dests.items():
                    made: list[str] = []

                    def keep(fd: int = fd, base: Path = base, made: list[str] = made) -> object:
                        made.append(tempfile.mkdtemp(dir=base))
                        everything = changes.diff(fd, layers, hostname="bench", limit=None)
                        return changes.keep(fd, layers, everything, made[-1])

                    def clean(made: list[str] = made) -> None:
                        shutil.rmtree(made.pop())

                    samples.setdefault((f"diff + keep into {where}", name), []).append(cpu_ms(keep, repeat, clean))
        for fd in fds.values():
            os.close(fd)
    finally:
        shutil.rmtree(tmp)
    print(f"# changes.py CPU cost ({os.cpu_count()} cores, {platform.release()}, Python {platform.python_version()})")
    print(f"\n`python {' '.join(sys.argv)}`: {args.rounds} rounds, host-view plan with {len(layers)} layers\n")
    for name, result in found.items():
        print(f"- {name}: {len(result.changes)} changes, complete={result.complete}")
    print("\n| call | scenario | CPU ms per call, median | range over rounds |\n|---|---|---|---|")
    for (what, name), values in samples.items():
        print(f"| {what} | {name} | {statistics.median(values):.3f} | {min(values):.3f} to {max(values):.3f} |")


if __name__ == "__main__":
    main()
