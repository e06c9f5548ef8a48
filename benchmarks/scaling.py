"""How the cost of an isolated test grows with the size of the pytest process that forks it.

Every isolated test is a ``fork()`` of the pytest process.  The kernel copies
the parent's page tables at fork and, when the child exits, tears down its
view of every mapped page; pages either side writes in the meantime are
copied (copy-on-write).  All of that scales with the parent's resident size,
which in a real suite is large: imported modules, collected items, session
fixtures.  This script makes the parent big on purpose, with a conftest that
allocates live, GC-tracked Python objects (small lists and dicts) until
VmRSS has grown by the requested amount, and compares the per-test time of
trivial isolated tests with the same tests in-process.

Why a ``gc.freeze()`` variant: CPython's cyclic GC writes to every object it
traverses, so a collection in the child would copy the whole heap.
pytest-lonely already freezes around its fork; the variant where the conftest
freezes right after allocating shows whether doing it yourself changes
anything (and the "frozen at end" column shows that the user's freeze
survives: the plugin leaves an existing freeze alone).

Why an mmap variant: the mitigation.  Fork copies the page tables of
anonymous memory (the Python heap), but not those of file mappings, which the
child simply faults in again.  The same gigabyte as a read-only mapped file
(``numpy.load(..., mmap_mode="r")``, ``mmap``) costs nothing at fork.

Why time inside the process: allocating 1 GB takes seconds and varies from
run to run, far more than the thing measured, so the conftest measures the
run loop itself (``pytest_runtestloop``, which covers every test's setup,
fork, run, report and teardown): its wall time, the CPU of every process of
the run (a cgroup made for it: pytest, the zygote, the containers, reaped or
not) and the whole machine's busy time, each divided by the number of tests.

Why a huge-pages row: fork copies, and exit frees, one page-table entry per
4 KiB page of the heap, 512 times fewer for transparent huge pages.  pytest-
lonely is to back pytest's heap with huge pages where the kernel allows it
(``PYTEST_LONELY_HUGEPAGES=0`` turns that off); where the installed build
knows that switch, every live-objects size also runs with it off, so the
table shows what the huge pages buy and what they cost in RSS.

Issue 23's goal: with 1 GB of live objects the overhead per test is at most
twice the overhead at 0 MB of ballast (a pytest of about 34 MB).

Only the standard library is used; run with the interpreter that has
pytest-lonely installed (``tox -e bench``), as root for the CPU column.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import _bench as b

RUN_TIMEOUT: Final = 900.0

CONFTEST: Final = '''\
"""Ballast for the scaling benchmark: live objects allocated before any test, and a timer around the run loop."""

import gc
import json
import os
import time

import pytest


def _rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _allocate(mb):
    """GC-tracked containers (lists and dicts, with ints and strs) until VmRSS has grown by ``mb``."""
    keep = []
    target = _rss_kb() + mb * 1024
    start = 0
    gc.disable()  # allocation speed is not what is measured
    try:
        while mb and _rss_kb() < target:
            keep.append([[j, str(j)] if j % 4 else {"j": j, "s": str(j)} for j in range(start, start + 10_000)])
            start += 10_000
    finally:
        gc.enable()
    return keep


def _map(mb):
    """The same size as a read-only memory-mapped file: page tables of file mappings are not copied at fork."""
    import mmap
    import tempfile

    if not mb:
        return []
    with tempfile.TemporaryFile() as f:
        f.truncate(mb << 20)
        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
    sum(mapped[i] for i in range(0, mb << 20, 4096))  # fault every page in
    return [mapped]


{cgroup_cpu}


def _anon_huge_kb():
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


KIND = os.environ["BENCH_KIND"]
BALLAST = _map(int(os.environ["BENCH_ALLOC_MB"])) if KIND == "mmap" else _allocate(int(os.environ["BENCH_ALLOC_MB"]))
if KIND == "frozen":
    gc.freeze()
_STATS = {"rss_kb": _rss_kb(), "frozen_start": gc.get_freeze_count()}


def _bare_fork_ms(times=5):
    """fork + _exit + waitpid at this size, no namespaces: the kernel's share of an isolated test."""
    samples = []
    for _ in range(times):
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        samples.append((time.perf_counter() - start) * 1000)
    return sorted(samples)[len(samples) // 2]


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session):
    _STATS["bare_fork_ms"] = _bare_fork_ms()
    gen2 = gc.get_stats()[2]["collections"]
    cpu, busy = _cgroup_cpu(), _machine_busy()
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _STATS["loop_s"] = time.perf_counter() - start
        _STATS["loop_machine_s"] = _machine_busy() - busy
        if cpu is not None:
            _STATS["loop_cpu_s"] = _cgroup_cpu() - cpu
        _STATS["anon_huge_end_kb"] = _anon_huge_kb()
        _STATS["gen2_collections"] = gc.get_stats()[2]["collections"] - gen2
        _STATS["frozen_end"] = gc.get_freeze_count()
        _STATS["rss_end_kb"] = _rss_kb()
        with open(os.environ["BENCH_OUT"], "w") as f:
            json.dump(_STATS, f)
'''

TEST_FILE: Final = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_x(i):
    pass
"""

#: Modes: (pytest arguments, extra environment).
MODES: Final = {
    "isolated": (("-p", "lonely", "--lonely-all"), ()),
    "inprocess": (("-p", "lonely"), ()),
    "hugepages-off": (("-p", "lonely", "--lonely-all"), (("PYTEST_LONELY_HUGEPAGES", "0"),)),
}
HUGEPAGES_SWITCH: Final = "PYTEST_LONELY_HUGEPAGES"
#: How the parent's memory is filled: live Python objects, the same frozen by the conftest, or a mapped file.
KINDS: Final = {"objects": "live objects", "frozen": "live objects, gc.freeze()", "mmap": "read-only mmap of a file"}
#: Issue 23: the overhead at 1 GB of live objects over the overhead at 0 MB of ballast.
GOAL_RATIO: Final = 2.0
RUN_TIMEOUT: Final = 900.0


def run_once(
    project: Path, mode: str, *, size_mb: int, kind: str, tests: int, out: Path, extra_env: dict[str, str]
) -> dict[str, Any]:
    """One pytest process; returns the conftest's measurements plus a ``problem`` if not every test passed."""
    args, mode_env = MODES[mode]
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "test_scale.py"]
    env = b.clean_env(BENCH_ALLOC_MB=str(size_mb), BENCH_KIND=kind, BENCH_OUT=str(out), **extra_env, **dict(mode_env))
    out.unlink(missing_ok=True)
    with b.CpuCgroup.made(f"lonely-bench-scaling-{out.parent.name}") as cgroup:
        done = b.run_measured(command, project, env, RUN_TIMEOUT, cgroup)
    output = done["output"]
    passed = re.search(r"(\d+) passed", output)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if done["rc"] or not passed or int(passed.group(1)) != tests:
        lines = [line for line in output.splitlines() if line.strip()]
        result["problem"] = (lines[-1] if lines else f"exit status {done['rc']}")[:160]
    elif done.get("lingering"):
        result["problem"] = f"{done['lingering']} process(es) outlived pytest"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run every (size, kind, mode) once per round in shuffled order, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tests", type=int, default=None, help="trivial tests per run (default: 100; 50 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 5; 2 with --quick)")
    parser.add_argument(
        "--sizes", default="0,100,1000", help="MB of live objects the parent allocates (default: 0,100,1000)"
    )
    parser.add_argument("--quick", action="store_true", help="50 tests, 2 rounds: proves it runs; decides nothing")
    parser.add_argument(
        "--prebuild",
        choices=("1", "0"),
        help="PYTEST_LONELY_PREBUILD for the runs: 1 (default: containers from a zygote), 0 (every container "
        "forked from pytest)",
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    tests = args.tests if args.tests is not None else (50 if args.quick else 100)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    extra_env = {"PYTEST_LONELY_PREBUILD": args.prebuild} if args.prebuild else {}
    try:
        sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--sizes: comma-separated whole MB, got {args.sizes!r}")
    if tests < 1 or rounds < 1 or not sizes or min(sizes) < 0:
        parser.error("--tests and --rounds must be at least 1, --sizes non-negative")
    hugepages = b.package_knows(sys.executable, HUGEPAGES_SWITCH)
    modes = [mode for mode in MODES if mode != "hugepages-off" or hugepages]

    load_before = b.loadavg()
    configs = [
        (size, kind, mode)
        for size in sizes
        for kind in KINDS
        for mode in modes
        if (size or kind == "objects") and (mode != "hugepages-off" or kind == "objects")
    ]
    runs: dict[tuple[int, str, str], list[dict[str, Any]]] = {config: [] for config in configs}
    rng = random.Random()
    with tempfile.TemporaryDirectory(prefix="lonely-scaling-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        (project / "pytest.ini").write_text("[pytest]\n")
        (project / "conftest.py").write_text(CONFTEST.replace("{cgroup_cpu}", b.CONFTEST_CGROUP_CPU))
        (project / "test_scale.py").write_text(TEST_FILE.replace("{n}", str(tests)))
        out = Path(tmp) / "stats.json"
        for mode in ("isolated", "inprocess"):  # warm-up: byte-code caches, page cache
            run_once(project, mode, size_mb=0, kind="objects", tests=tests, out=out, extra_env=extra_env)
        for round_no in range(rounds):
            order = configs[:]
            rng.shuffle(order)
            print(f"round {round_no + 1}/{rounds}", file=sys.stderr, flush=True)
            for size, kind, mode in order:
                result = run_once(project, mode, size_mb=size, kind=kind, tests=tests, out=out, extra_env=extra_env)
                result["round"] = round_no
                runs[size, kind, mode].append(result)

    print(b.machine_line(load_before))
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"per test = over pytest_runtestloop / {tests} tests: wall time, and CPU of every process of the run (a "
        f"cgroup); overhead = isolated minus in-process within the same round, median of {rounds} round(s); parent "
        "RSS = VmRSS after the conftest allocated (and froze); bare fork+exit = median of 5 plain fork/_exit/waitpid "
        "of the parent before the run loop; AnonHuge = pytest's AnonHugePages at the end of the loop"
    )
    if not hugepages:
        print(
            f"**{HUGEPAGES_SWITCH} is not in this build**: the `hugepages-off` rows are left out (they appear, one "
            "per size of live objects, once the switch exists)"
        )
    if extra_env:
        print(f"environment: {' '.join(f'{k}={v}' for k, v in extra_env.items())}")
    print()
    print(
        "| ballast MB | ballast kind | mode | parent RSS MB | ms/test | overhead ms/test | CPU ms/test "
        "| CPU overhead ms/test | machine overhead ms/test | bare fork+exit ms | RSS at end MB | AnonHuge at end MB "
        "| gen-2 GCs in loop | frozen objects at end | notes |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")

    def med(rs: list[dict[str, Any]], key: str, scale: float = 1.0) -> float | None:
        return b.median([r[key] * scale for r in rs if key in r])

    def paired(size: int, kind: str, mode: str, key: str) -> float | None:
        """(mode - in-process) within the same round, ms per test, median over rounds."""
        base = {r["round"]: r for r in runs[size, kind, "inprocess"] if key in r}
        diffs = [
            (r[key] - base[r["round"]][key]) * 1000 / tests
            for r in runs[size, kind, mode]
            if key in r and r["round"] in base
        ]
        return b.median(diffs)

    overhead: dict[tuple[int, str, str, str], float | None] = {}
    for size in sizes:
        for kind, label in KINDS.items():
            for mode in modes:
                if (size, kind, mode) not in runs:
                    continue
                rs = runs[size, kind, mode]
                cells = [str(size), label, mode]
                cells.append(b.fmt(med(rs, "rss_kb", 1 / 1024), ".0f"))
                cells.append(b.fmt(med(rs, "loop_s", 1000 / tests), ".3f"))
                for key in ("loop_s", "loop_cpu_s", "loop_machine_s"):
                    over = paired(size, kind, mode, key) if mode != "inprocess" else None
                    overhead[size, kind, mode, key] = over
                    if key == "loop_cpu_s":
                        cells.append(b.fmt(med(rs, "loop_cpu_s", 1000 / tests), ".3f"))
                    cells.append(b.fmt(over, "+.3f"))
                cells.append(b.fmt(med(rs, "bare_fork_ms"), ".1f"))
                cells.append(b.fmt(med(rs, "rss_end_kb", 1 / 1024), ".0f"))
                cells.append(b.fmt(med(rs, "anon_huge_end_kb", 1 / 1024), ".0f"))
                cells.append(b.fmt(med(rs, "gen2_collections"), ".0f"))
                cells.append(b.fmt(med(rs, "frozen_end"), ",.0f"))
                cells.append("; ".join(sorted({r["problem"] for r in rs if "problem" in r}))[:300])
                print("| " + " | ".join(cells) + " |")
    if not any("loop_cpu_s" in r for rs in runs.values() for r in rs):
        print()
        print("(no CPU columns: no cgroup could be made for the runs; run as root)")
    print()
    small, big = min(sizes), max(sizes)
    print(
        f"Goal (issue 23): the overhead at {big} MB of live objects ≤ {GOAL_RATIO:g} times the overhead at {small} MB:"
    )
    for mode in modes:
        if mode == "inprocess":
            continue
        for key, what in (("loop_cpu_s", "CPU"), ("loop_s", "wall")):
            low, high = overhead.get((small, "objects", mode, key)), overhead.get((big, "objects", mode, key))
            ratio = high / low if high is not None and low and low > 0 else None
            print(
                f"- {mode}, {what}: {b.fmt(high, '+.3f')} / {b.fmt(low, '+.3f')} ms per test = "
                f"**{b.fmt(ratio, '.2f')}** ({b.verdict(ratio, GOAL_RATIO)})"
            )
    if not hugepages:
        print(f"- hugepages-off: — (placeholder: {HUGEPAGES_SWITCH} is not in this build)")

    if args.json:
        raw = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "tests": tests,
            "rounds": rounds,
            "runs": [
                {"ballast_mb": size, "kind": kind, "mode": mode, **run}
                for (size, kind, mode), rs in runs.items()
                for run in rs
            ],
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
