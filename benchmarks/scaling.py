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
run to run, far more than the thing measured, so the conftest times the run
loop itself (``pytest_runtestloop``, which covers every test's setup, fork,
run, report and teardown) and divides by the number of tests.

Only the standard library is used; run with the interpreter that has
pytest-lonely installed (``tox -e bench``).
"""

from __future__ import annotations

import argparse
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

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
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _STATS["loop_s"] = time.perf_counter() - start
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

MODES: Final = {"isolated": ("-p", "lonely", "--lonely-all"), "inprocess": ("-p", "lonely")}


def clean_env(**extra: str) -> dict[str, str]:
    """No inherited pytest options and no auto-loaded plugins: each run loads exactly what its command names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["COLUMNS"] = "300"
    env.update(extra)
    return env


#: How the parent's memory is filled: live Python objects, the same frozen by the conftest, or a mapped file.
KINDS: Final = {"objects": "live objects", "frozen": "live objects, gc.freeze()", "mmap": "read-only mmap of a file"}


#: ``--prebuild VALUE``: PYTEST_LONELY_PREBUILD for every run (clean_env drops the caller's).
EXTRA_ENV: dict[str, str] = {}


def run_once(project: Path, mode: str, *, size_mb: int, kind: str, tests: int, out: Path) -> dict[str, Any]:
    """One pytest process; returns the conftest's measurements plus a ``problem`` if not every test passed."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODES[mode], "test_scale.py"]
    env = clean_env(BENCH_ALLOC_MB=str(size_mb), BENCH_KIND=kind, BENCH_OUT=str(out), **EXTRA_ENV)
    out.unlink(missing_ok=True)
    done = subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )
    output = done.stdout + done.stderr
    passed = re.search(r"(\d+) passed", output)
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if done.returncode or not passed or int(passed.group(1)) != tests:
        lines = [line for line in output.splitlines() if line.strip()]
        result["problem"] = (lines[-1] if lines else f"exit status {done.returncode}")[:160]
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    """Median over rounds; runs that failed before the conftest wrote its numbers are left out."""
    values = [run[key] for run in runs if key in run]
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    """A table cell: a missing number shows as a dash rather than breaking the row."""
    return "—" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, run every (size, kind, mode) once per round in shuffled order, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tests", type=int, default=100, help="trivial tests per run (default: 100)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument(
        "--sizes", default="0,100,1000", help="MB of live objects the parent allocates (default: 0,100,1000)"
    )
    parser.add_argument(
        "--prebuild",
        choices=("1", "namespaces", "0"),
        help="PYTEST_LONELY_PREBUILD for the runs: 1 (default, zygote), namespaces (every container forked "
        "from pytest), 0",
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.prebuild:
        EXTRA_ENV["PYTEST_LONELY_PREBUILD"] = args.prebuild
    try:
        sizes = [int(size) for size in args.sizes.split(",") if size.strip()]
    except ValueError:
        parser.error(f"--sizes: comma-separated whole MB, got {args.sizes!r}")
    if args.tests < 1 or args.rounds < 1 or not sizes or min(sizes) < 0:
        parser.error("--tests and --rounds must be at least 1, --sizes non-negative")

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    configs = [(size, kind, mode) for size in sizes for kind in KINDS for mode in MODES if size or kind == "objects"]
    runs: dict[tuple[int, str, str], list[dict[str, Any]]] = {config: [] for config in configs}
    rng = random.Random()
    with tempfile.TemporaryDirectory(prefix="lonely-scaling-") as tmp:
        project = Path(tmp) / "project"
        project.mkdir()
        (project / "pytest.ini").write_text("[pytest]\n")
        (project / "conftest.py").write_text(CONFTEST)
        (project / "test_scale.py").write_text(TEST_FILE.replace("{n}", str(args.tests)))
        out = Path(tmp) / "stats.json"
        for mode in MODES:  # warm-up: byte-code caches, page cache
            run_once(project, mode, size_mb=0, kind="objects", tests=args.tests, out=out)
        for round_no in range(args.rounds):
            order = configs[:]
            rng.shuffle(order)
            print(f"round {round_no + 1}/{args.rounds}", file=sys.stderr, flush=True)
            for size, kind, mode in order:
                result = run_once(project, mode, size_mb=size, kind=kind, tests=args.tests, out=out)
                result["round"] = round_no
                runs[size, kind, mode].append(result)

    try:
        import importlib.metadata

        pytest_version = importlib.metadata.version("pytest")
    except Exception:
        pytest_version = "?"
    print(
        f"machine: nproc {len(os.sched_getaffinity(0))}, kernel {platform.release()}, "
        f"python {platform.python_version()} ({sys.executable}), pytest {pytest_version}, "
        f"load average {load_before} before / {' '.join(f'{x:.2f}' for x in os.getloadavg())} after"
    )
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"ms/test = time in pytest_runtestloop / {args.tests} tests, median of {args.rounds} round(s); "
        "parent RSS = VmRSS after the conftest allocated (and froze); bare fork+exit = median of 5 plain "
        "fork/_exit/waitpid of the parent before the run loop"
    )
    print()
    print(
        "| ballast MB | ballast kind | parent RSS MB | ms/test isolated | ms/test in-process | overhead ms "
        "| bare fork+exit ms "
        "| gen-2 GCs in loop (iso / in-proc) | frozen objects at end (iso / in-proc) | notes |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for size in sizes:
        for kind, label in KINDS.items():
            if (size, kind, "isolated") not in runs:
                continue
            iso, inp = runs[size, kind, "isolated"], runs[size, kind, "inprocess"]
            rss = median_of(iso + inp, "rss_kb")
            iso_ms = median_of(iso, "loop_s")
            inp_ms = median_of(inp, "loop_s")
            iso_ms = None if iso_ms is None else iso_ms * 1000 / args.tests
            inp_ms = None if inp_ms is None else inp_ms * 1000 / args.tests
            overhead = None if iso_ms is None or inp_ms is None else iso_ms - inp_ms
            problems = sorted(
                {
                    f"{mode}: {run['problem']}"
                    for mode, rs in (("iso", iso), ("in", inp))
                    for run in rs
                    if "problem" in run
                }
            )
            gcs = f"{fmt(median_of(iso, 'gen2_collections'), '.0f')} / {fmt(median_of(inp, 'gen2_collections'), '.0f')}"
            frozen = f"{fmt(median_of(iso, 'frozen_end'), ',.0f')} / {fmt(median_of(inp, 'frozen_end'), ',.0f')}"
            print(
                f"| {size} | {label} | {fmt(None if rss is None else rss / 1024, '.0f')} "
                f"| {fmt(iso_ms, '.3f')} | {fmt(inp_ms, '.3f')} | {fmt(overhead, '+.3f')} "
                f"| {fmt(median_of(iso + inp, 'bare_fork_ms'), '.1f')} | {gcs} | {frozen} "
                f"| {'; '.join(problems)[:300]} |"
            )

    if args.json:
        raw = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "tests": args.tests,
            "rounds": args.rounds,
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
