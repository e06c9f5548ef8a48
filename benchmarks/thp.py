"""Huge pages for the heap containers are forked from: does collapsing it make fork cost independent of its size?

``fork()`` copies the page tables of every private anonymous mapping and the
child's exit frees them, 4 KiB page by 4 KiB page: the cost grows with the
parent's resident heap.  A 2 MiB transparent huge page is one page-table
entry instead of 512.  This script collapses the 2 MiB-aligned parts of a
Python process's private anonymous writable mappings into huge pages
(``madvise(MADV_HUGEPAGE)`` (14), then ``madvise(MADV_COLLAPSE)`` (25), Linux
6.1+), and measures, with and without:

* **micro**: a Python process holding N MB of live objects (pytest imported,
  the objects ``gc.freeze()``d) touches W of its objects, forks; the child
  touches 200 objects (copy-on-write faults) and exits; the parent reaps it.
  CPU per fork from a ``cpuacct`` cgroup per process (the child's exit
  included), plus the kernel threads' CPU, and wall time per fork (median
  within a batch, for the record only: the machine is shared).  The plain
  and the collapsed process live side by side and their batches alternate,
  shuffled, so that load lands on both alike.  AnonHugePages is read after
  every batch: the parent's own writes after a fork split its huge page
  mappings, so the benefit may fade, and the table shows how fast.
* **pytest**: pytest-lonely itself (pytest 8.3.5 venv, see cpu_phases.py) on
  300 trivial isolated tests with a conftest that allocates N MB of live
  objects and collapses the heap in pytest before the first test, or in the
  zygote when it starts, or not at all.  CPU per test is the run's
  ``cpuacct`` cgroup over ``pytest_runtestloop``, divided by the tests.

The THP settings are printed: ``enabled`` ``never`` must turn the feature off
(``MADV_COLLAPSE`` ignores it), ``defrag`` says whether faults in a
``MADV_HUGEPAGE`` range compact memory synchronously.

Root only (cgroups).  Only the standard library is used.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
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
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Final

from _bench import kthread_cpu  # run from benchmarks/: the CPU counters are written once there

MADV_HUGEPAGE: Final = 14
MADV_COLLAPSE: Final = 25
HUGE: Final = 2 << 20
CPUACCT: Final = Path("/sys/fs/cgroup/cpuacct")
THP: Final = Path("/sys/kernel/mm/transparent_hugepage")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


def thp_setting(name: str) -> str:
    """The selected value of a THP sysfs setting ("always [madvise] never" -> "madvise")."""
    try:
        text = (THP / name).read_text()
    except OSError:
        return "unavailable"
    found = re.search(r"\[(\w[\w+]*)\]", text)
    return found.group(1) if found else text.strip()


def anon_regions() -> list[tuple[int, int]]:
    """(start, end) of private anonymous writable mappings: the heap, pymalloc's arenas, big allocations."""
    regions = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if fields[1][:2] != "rw" or fields[1][3] != "p":
                continue
            name = fields[5] if len(fields) > 5 else ""
            if name not in ("", "[heap]"):
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            regions.append((start, end))
    return regions


def smaps_rollup() -> dict[str, int]:
    """kB fields of /proc/self/smaps_rollup (Rss, Pss, AnonHugePages, ...)."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


def collapse() -> dict[str, Any]:
    """MADV_HUGEPAGE + MADV_COLLAPSE over the 2 MiB-aligned parts of every private anonymous writable mapping.

    Honours ``enabled = never`` (MADV_COLLAPSE would not).  Returns what it did and what it cost.
    """
    before = smaps_rollup()
    if thp_setting("enabled") == "never":
        return {"skipped": "THP enabled = never", "before": before, "after": before}
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    advised = 0
    failed: collections.Counter[int] = collections.Counter()
    for start, end in anon_regions():
        lo = (start + HUGE - 1) // HUGE * HUGE
        hi = end // HUGE * HUGE
        if hi <= lo:
            continue
        advised += hi - lo
        if _libc.madvise(lo, hi - lo, MADV_HUGEPAGE) != 0:
            failed[ctypes.get_errno()] += 1
            continue
        if _libc.madvise(lo, hi - lo, MADV_COLLAPSE) != 0:
            failed[ctypes.get_errno()] += 1  # EAGAIN/EINVAL for some parts: the rest is still collapsed
    return {
        "cpu_s": time.thread_time() - cpu0,
        "wall_s": time.perf_counter() - wall0,
        "advised_mb": advised / (1 << 20),
        "errors": {os.strerror(k): v for k, v in failed.items()},
        "before": before,
        "after": smaps_rollup(),
    }


# --- micro: one process, forked in batches --------------------------------------------------------


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def allocate_to(target_mb: float) -> list[Any]:
    """scaling.py's ballast (small lists and dicts of ints and strs) until VmRSS reaches ``target_mb``."""
    keep: list[Any] = []
    start = 0
    gc.disable()
    try:
        while rss_kb() < target_mb * 1024:
            keep.append([[j, str(j)] if j % 4 else {"j": j, "s": str(j)} for j in range(start, start + 10_000)])
            start += 10_000
    finally:
        gc.enable()
    return keep


def micro_worker(size_mb: float, mode: str, commands: IO[str], answers: IO[str]) -> None:
    """A process of ``size_mb`` MB: collapses its heap if ``mode`` says so, then forks in batches on command."""
    import _pytest.python  # noqa: F401 - pytest's size and modules, as in a real run
    import pytest  # noqa: F401

    ballast = allocate_to(size_mb)
    objects = gc.get_objects()  # before the freeze: frozen objects are not listed
    gc.freeze()
    rng = random.Random(1)
    setup: dict[str, Any] = {"rss_mb": rss_kb() / 1024}
    if mode == "collapse":
        setup["collapse"] = collapse()
        setup["rss_after_mb"] = rss_kb() / 1024
    answers.write(json.dumps(setup) + "\n")
    answers.flush()
    for line in commands:
        parts = line.split()
        if not parts or parts[0] == "quit":
            break
        count, parent_writes = int(parts[1]), int(parts[2])
        walls = []
        forks = []
        for _ in range(count):
            touched = [objects[rng.randrange(len(objects))] for _ in range(parent_writes)]  # INCREF: writes
            picks = [objects[rng.randrange(len(objects))] for _ in range(200)]
            start = time.perf_counter()
            pid = os.fork()
            if pid == 0:
                kept = list(picks)  # the child's INCREFs: 200 copy-on-write faults at most
                del kept
                os._exit(0)
            forks.append(time.perf_counter() - start)
            os.waitpid(pid, 0)
            walls.append(time.perf_counter() - start)
            del touched
        roll = smaps_rollup()
        answers.write(
            json.dumps(
                {
                    "wall_ms": statistics.median(walls) * 1000,
                    "fork_ms": statistics.median(forks) * 1000,
                    "huge_mb": roll.get("AnonHugePages", 0) / 1024,
                    "rss_mb": roll.get("Rss", 0) / 1024,
                }
            )
            + "\n"
        )
        answers.flush()
    del ballast


class Worker:
    """The orchestrator's handle on a micro worker in a cpuacct cgroup of its own."""

    def __init__(self, size: float, mode: str) -> None:
        self.mode = mode
        self.group = CPUACCT / f"lonely-thp-{os.getpid()}-{mode}-{int(size)}"
        self.group.mkdir()
        group = self.group

        def enter() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--micro-worker", str(size), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=enter,  # noqa: PLW1509 - the orchestrator is single-threaded
        )
        assert self.proc.stdout is not None
        self.setup = json.loads(self.proc.stdout.readline())

    def usage(self) -> float:
        return int((self.group / "cpuacct.usage").read_text()) / 1e9

    def batch(self, count: int, parent_writes: int) -> dict[str, float]:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        k0, u0 = kthread_cpu(), self.usage()
        self.proc.stdin.write(f"batch {count} {parent_writes}\n")
        self.proc.stdin.flush()
        result: dict[str, float] = json.loads(self.proc.stdout.readline())
        time.sleep(0.1)
        result["cpu_ms"] = (self.usage() - u0) * 1000 / count
        result["kthreads_ms"] = (kthread_cpu() - k0) * 1000 / count
        return result

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: its error is on stderr
        self.proc.wait()
        for _ in range(100):
            try:
                self.group.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def micro(sizes: Sequence[float], batches: int, count: int, parent_writes: int) -> list[str]:
    out = [
        f"### micro: fork + child touches 200 objects + exit + reap; the parent touches {parent_writes} objects "
        f"between forks; {batches} batches of {count} forks per process, alternating",
        "",
    ]
    rows = []
    decay_rows = []
    for size in sizes:
        workers = {mode: Worker(size, mode) for mode in ("plain", "collapse")}
        try:
            results: dict[str, list[dict[str, float]]] = {mode: [] for mode in workers}
            for _ in range(batches):
                order = list(workers)
                random.shuffle(order)
                for mode in order:
                    results[mode].append(workers[mode].batch(count, parent_writes))
        finally:
            for w in workers.values():
                w.close()
        c = workers["collapse"].setup["collapse"]
        plain_rss = workers["plain"].setup["rss_mb"]
        after_rss = workers["collapse"].setup["rss_after_mb"]
        before_rss = workers["collapse"].setup["rss_mb"]

        def med(mode: str, key: str, res: dict[str, list[dict[str, float]]] = results) -> float:
            return statistics.median(r[key] for r in res[mode])

        rows.append(
            [
                f"{plain_rss:.0f}",
                f"{med('plain', 'cpu_ms'):.2f} → {med('collapse', 'cpu_ms'):.2f}",
                f"{med('plain', 'kthreads_ms'):.2f} → {med('collapse', 'kthreads_ms'):.2f}",
                f"{med('plain', 'wall_ms'):.2f} → {med('collapse', 'wall_ms'):.2f}",
                f"{med('plain', 'fork_ms'):.2f} → {med('collapse', 'fork_ms'):.2f}",
                f"{c['after'].get('AnonHugePages', 0) / 1024:.0f}",
                f"{before_rss:.0f} → {after_rss:.0f} ({(after_rss / before_rss - 1) * 100:+.1f}%)",
                f"{c['cpu_s'] * 1000:.0f} / {c['wall_s'] * 1000:.0f}",
                f"{c['cpu_s'] / max(c['advised_mb'], 1) * 1024 * 1000:.0f}",
                ", ".join(f"{k} x{v}" for k, v in c["errors"].items()) or "none",
            ]
        )
        huge = [r["huge_mb"] for r in results["collapse"]]
        cpu = [r["cpu_ms"] for r in results["collapse"]]
        marks = sorted({0, 1, 2, 4, 9, batches // 2, batches - 1} & set(range(batches)))
        decay_rows.append(
            [f"{plain_rss:.0f}", *(f"{huge[i]:.0f} MB / {cpu[i]:.2f}" for i in marks)] + [""] * (7 - len(marks))
        )
    out += markdown(
        [
            "RSS MB",
            "CPU ms/fork plain → huge",
            "kthreads ms/fork",
            "wall ms/fork (median)",
            "fork() returns, ms",
            "AnonHuge MB after collapse",
            "RSS MB before → after collapse",
            "collapse ms CPU / wall",
            "collapse CPU ms per GB",
            "collapse errors",
        ],
        rows,
    )
    out += [
        "",
        f"AnonHugePages of the collapsed process, and its CPU ms/fork, after batch 1, 2, 3, 5, 10, middle, last "
        f"({count} forks each):",
        "",
    ]
    out += markdown(["RSS MB", "1", "2", "3", "5", "10", "middle", "last"], decay_rows)
    return out


# --- pytest: pytest-lonely with and without collapsing -------------------------------------------

CONFTEST: Final = '''\
"""Generated by benchmarks/thp.py: ballast, a collapse in pytest or in the zygote, CPU over the run loop."""

import gc
import json
import os
import sys
import time

import pytest

sys.path.insert(0, {bench_dir!r})
import thp  # noqa: E402

OUT = os.environ["BENCH_OUT"]
WHERE = os.environ["BENCH_COLLAPSE"]
GROUP = os.environ["BENCH_CGROUP"]
BALLAST = thp.allocate_to(thp.rss_kb() / 1024 + int(os.environ["BENCH_ALLOC_MB"]))
gc.freeze()
STATS = {{"rss_mb": thp.rss_kb() / 1024}}


def usage():
    with open(GROUP + "/cpuacct.usage") as f:
        return int(f.read()) / 1e9


def pytest_configure(config):
    if WHERE != "zygote":
        return
    from pytest_lonely.sandbox import zygote

    original = zygote._serve

    def _serve(*args, **kwargs):
        thp.collapse()
        return original(*args, **kwargs)

    zygote._serve = _serve


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session):
    if WHERE == "pytest":
        STATS["collapse"] = thp.collapse()
        STATS["rss_after_mb"] = thp.rss_kb() / 1024
    start_cpu, start = usage(), time.perf_counter()
    try:
        return (yield)
    finally:
        STATS["loop_cpu_s"] = usage() - start_cpu
        STATS["loop_s"] = time.perf_counter() - start
        STATS["huge_end_mb"] = thp.smaps_rollup().get("AnonHugePages", 0) / 1024
        STATS["rss_end_mb"] = thp.rss_kb() / 1024
        with open(OUT, "w") as f:
            json.dump(STATS, f)
'''

TEST_FILE: Final = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_x(i):
    pass
"""


def pytest_runs(python: str, sizes: Sequence[int], rounds: int, tests: int) -> list[str]:
    modes = ("none", "pytest", "zygote")
    results: dict[tuple[int, str], list[dict[str, Any]]] = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="lonely-thp-") as tmp:
        project = Path(tmp)
        (project / "pytest.ini").write_text("[pytest]\n")
        (project / "conftest.py").write_text(CONFTEST.format(bench_dir=str(Path(__file__).resolve().parent)))
        (project / "test_t.py").write_text(TEST_FILE.replace("{n}", str(tests)))
        out = project / "stats.json"
        jobs = [(size, mode) for size in sizes for mode in modes]
        for round_no in range(rounds + 1):  # round 0 warms the caches and is dropped
            random.shuffle(jobs)
            print(f"pytest round {round_no}/{rounds}", file=sys.stderr, flush=True)
            for size, mode in jobs:
                group = CPUACCT / f"lonely-thp-run-{os.getpid()}"
                group.mkdir()
                try:
                    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
                    env.update(
                        PYTEST_DISABLE_PLUGIN_AUTOLOAD="1",
                        BENCH_OUT=str(out),
                        BENCH_COLLAPSE=mode,
                        BENCH_CGROUP=str(group),
                        BENCH_ALLOC_MB=str(size),
                    )
                    out.unlink(missing_ok=True)
                    done = subprocess.run(
                        ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), python, "-m", "pytest",
                         "-q", "-p", "no:cacheprovider", "-p", "lonely", "--lonely-all", "test_t.py"],
                        cwd=project, env=env, capture_output=True, text=True, check=False,
                    )  # fmt: skip
                    if f"{tests} passed" not in done.stdout:
                        raise RuntimeError(f"pytest failed ({size} MB, {mode}): {done.stdout[-1500:]}{done.stderr}")
                    if round_no:
                        results[size, mode].append(json.loads(out.read_text()))
                finally:
                    for _ in range(100):
                        try:
                            group.rmdir()
                            break
                        except OSError:
                            time.sleep(0.05)
    out_lines = [
        f"### pytest-lonely, {tests} trivial isolated tests, CPU per test over pytest_runtestloop (cgroup), "
        f"median of {rounds} rounds",
        "",
    ]
    rows = []
    for size in sizes:
        for mode in modes:
            rs = results[size, mode]

            def med(key: str, rs: list[dict[str, Any]] = rs) -> float:
                values: list[float] = [r[key] for r in rs]
                return statistics.median(values)

            collapse_ms = statistics.median(r["collapse"]["cpu_s"] * 1000 for r in rs) if mode == "pytest" else None
            rss_change = (
                f"{med('rss_mb'):.0f} → {med('rss_after_mb'):.0f}" if mode == "pytest" else f"{med('rss_mb'):.0f}"
            )
            rows.append(
                [
                    str(size),
                    {"none": "no", "pytest": "in pytest, before the first test", "zygote": "in the zygote"}[mode],
                    rss_change,
                    f"{med('loop_cpu_s') * 1000 / tests:.2f}",
                    f"{med('loop_s') * 1000 / tests:.2f}",
                    f"{med('huge_end_mb'):.0f}",
                    f"{med('rss_end_mb'):.0f}",
                    "—" if collapse_ms is None else f"{collapse_ms:.0f}",
                ]
            )
    out_lines += markdown(
        [
            "ballast MB",
            "collapse",
            "pytest RSS MB",
            "CPU ms/test",
            "wall ms/test",
            "pytest AnonHuge MB at end",
            "pytest RSS MB at end",
            "collapse CPU ms",
        ],
        rows,
    )
    return out_lines


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def default_python() -> str:
    """pytest-lonely's pytest 8.3.5 venv from cpu_phases.py, made if needed."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import cpu_phases

    return cpu_phases.pythons(cpu_phases.cache_dir())["lonely"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", default="34,136,1035", help="micro: process VmRSS in MB")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--count", type=int, default=50, help="forks per batch")
    parser.add_argument("--parent-writes", type=int, default=200, help="objects the parent touches between forks")
    parser.add_argument("--pytest-sizes", default="0,100,1000", help="pytest: ballast MB (empty: skip)")
    parser.add_argument("--rounds", type=int, default=5, help="pytest: rounds")
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--python", help="pytest: an interpreter with pytest-lonely (default: cpu_phases' venv)")
    parser.add_argument("--skip-micro", action="store_true")
    parser.add_argument("--micro-worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.micro_worker:
        micro_worker(float(args.micro_worker[0]), args.micro_worker[1], sys.stdin, sys.stdout)
        return 0
    if os.geteuid() != 0:
        parser.error("needs root (cgroups)")
    load_before = os.getloadavg()
    lines: list[str] = []
    if not args.skip_micro:
        lines += micro([float(s) for s in args.sizes.split(",") if s], args.batches, args.count, args.parent_writes)
        lines.append("")
    pytest_sizes = [int(s) for s in args.pytest_sizes.split(",") if s]
    if pytest_sizes:
        lines += pytest_runs(args.python or default_python(), pytest_sizes, args.rounds, args.tests)
    print(
        f"machine: nproc {os.cpu_count()}, kernel {platform.release()}, python {platform.python_version()}, "
        f"THP enabled={thp_setting('enabled')} defrag={thp_setting('defrag')} "
        f"khugepaged/defrag={(THP / 'khugepaged' / 'defrag').read_text().strip() if THP.exists() else '?'}, "
        f"load average {' '.join(f'{x:.2f}' for x in load_before)} before / "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after"
    )
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print()
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
