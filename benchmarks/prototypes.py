"""What candidate changes to the engine would save, measured on pytest-lonely itself before anyone writes them.

Each row runs the same trivial isolated tests as cpu_phases.py (pytest 8.3.5
venvs) with the change emulated from the outside: a generated conftest that
patches the plugin, or a module put first on ``PYTHONPATH``.  The package
itself is not changed.  The conftest measures ``pytest_runtestloop`` only
(collection and start-up vary more than what is measured): the CPU of the
run's ``cpuacct`` cgroup (pytest, the zygote, every container, exits
included) plus the kernel threads' (``/proc/PID/stat``), divided by the
tests.  Rows run once per round, rounds interleaved and shuffled; each row is
compared with the unchanged plugin by the median of per-round differences,
and with pytest-forked.

Rows marked *price only* remove something the boundary needs; they say what
that piece costs, not that it should go.

Root only.  Only the standard library is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_phases as cp

BENCH_DIR: Final = str(Path(__file__).resolve().parent)

#: A stand-in for filelock with the same interface the engine uses, and no at-fork hooks: what importing
#: filelock only where a tarball or image is unpacked (or using fcntl.flock) would give.
FILELOCK_STUB: Final = '''\
"""Stand-in for filelock (benchmarks/prototypes.py): fcntl.flock, no os.register_at_fork hooks."""
import fcntl
import os


class Timeout(Exception):
    pass


class FileLock:
    def __init__(self, path, timeout=-1):
        self.path = path
        self.fd = -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        self.fd = -1
'''

CONFTEST_HEAD: Final = """\
import json
import os
import sys
import time

import pytest

sys.path.insert(0, {bench_dir!r})
import cpu_phases


def _usage():
    with open(os.environ["BENCH_GROUP"] + "/cpuacct.usage") as f:
        return int(f.read()) / 1e9


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtestloop(session):
    k0, u0, w0 = sum(cpu_phases.kthread_cpu().values()), _usage(), time.perf_counter()
    try:
        return (yield)
    finally:
        w1, u1, k1 = time.perf_counter(), _usage(), sum(cpu_phases.kthread_cpu().values())
        with open(os.environ["BENCH_OUT"], "w") as f:
            json.dump({{"ours": u1 - u0, "kthreads": k1 - k0, "wall": w1 - w0, "tests": len(session.items)}}, f)
"""

#: Conftest bodies, by patch name.
PATCHES: Final = {
    "thp": """
import thp


def pytest_collection_finish(session):
    thp.collapse()  # in pytest, before the first test: the zygote and every container inherit the huge pages
""",
    "sys-norec": """
def pytest_configure(config):
    from pytest_lonely.sandbox import _syscalls as sc, rootfs

    original = rootfs.plan
    flags = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC

    def plan(layout, key):
        ops = []
        for op in original(layout, key):
            if op[0] == "bind_ro" and op[2] == rootfs.NEW + "/sys":
                ops += [("mount", op[1], op[2], None, sc.MS_BIND, None), ("mount", None, op[2], None, flags, None)]
            else:
                ops.append(op)
        return tuple(ops)

    rootfs.plan = plan
""",
    "no-covers": """
def pytest_configure(config):
    from pytest_lonely.sandbox import init

    init._seal_proc = lambda root: None
""",
}


@dataclasses.dataclass(frozen=True)
class Proto:
    name: str
    title: str
    patches: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    stub_filelock: bool = False
    python: str = "lonely"
    args: tuple[str, ...] = cp.LONELY
    baseline: str = "plain"


PROTOS: Final = {
    p.name: p
    for p in (
        Proto("plain", "plain pytest 8.3.5", args=(), baseline=""),
        Proto("forked-plain", "plain pytest 8.3.5 (forked's venv)", python="forked", args=(), baseline=""),
        Proto("forked", "pytest-forked 1.7.5", python="forked", args=cp.FORKED, baseline="forked-plain"),
        Proto("lonely", "pytest-lonely as is"),
        Proto("no-filelock", "no filelock at-fork hooks", stub_filelock=True),
        Proto("thp", "THP collapse in pytest before the first test", patches=("thp",)),
        Proto("prefault-off", "PYTEST_LONELY_PREFAULT=0", env=(("PYTEST_LONELY_PREFAULT", "0"),)),
        Proto("no-filelock+thp", "no filelock hooks + THP", patches=("thp",), stub_filelock=True),
        Proto(
            "all3",
            "no filelock hooks + THP + PREFAULT=0",
            patches=("thp",),
            stub_filelock=True,
            env=(("PYTEST_LONELY_PREFAULT", "0"),),
        ),
        Proto("sys-norec", "price only: /sys bound without its submounts", patches=("sys-norec",)),
        Proto("no-covers", "price only: no /proc covers, no hidden proc", patches=("no-covers",)),
    )
}


def make_project(where: Path, proto: Proto, tests: int) -> None:
    cp.write_project(where, (tests,), conftest=False)
    text = CONFTEST_HEAD.format(bench_dir=BENCH_DIR) + "".join(PATCHES[p] for p in proto.patches)
    (where / "conftest.py").write_text(text)
    if proto.stub_filelock:
        (where / "stub").mkdir()
        (where / "stub" / "filelock.py").write_text(FILELOCK_STUB)


def run(proto: Proto, python: str, project: Path, tests: int, out: Path) -> dict[str, float]:
    """One pytest run in a cpuacct cgroup of its own; the conftest measures its run loop."""
    group = cp.CPUACCT / f"lonely-proto-{os.getpid()}"
    group.mkdir()
    try:
        env = cp.clean_env(proto.env)
        if proto.stub_filelock:
            env["PYTHONPATH"] = str(project / "stub")
        env.update(BENCH_GROUP=str(group), BENCH_OUT=str(out))
        out.unlink(missing_ok=True)
        command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *proto.args, f"test_n{tests}.py"]
        done = subprocess.run(
            ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *command],
            cwd=project, env=env, capture_output=True, text=True, check=False, timeout=cp.RUN_TIMEOUT,
        )  # fmt: skip
        if not cp.passed(done.stdout, tests):
            raise RuntimeError(f"{proto.name}: tests did not all pass: {done.stdout[-1500:]}{done.stderr[-1500:]}")
        result: dict[str, float] = json.loads(out.read_text())
        return result
    finally:
        for _ in range(200):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.05)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--only", nargs="+", default=list(PROTOS), choices=list(PROTOS))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root")
    chosen = [p for p in PROTOS if p in args.only or p in {"plain", "forked-plain", "forked", "lonely"}]
    py = cp.pythons(cp.cache_dir())
    load_before = os.getloadavg()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in chosen}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="lonely-proto-") as tmp_name:
        tmp = Path(tmp_name)
        for name in chosen:
            make_project(tmp / name, PROTOS[name], args.tests)
        out = tmp / "loop.json"
        for name in chosen:  # warm-up
            run(PROTOS[name], py[PROTOS[name].python], tmp / name, args.tests, out)
        rng = random.Random()
        for round_no in range(args.rounds):
            order = list(chosen)
            rng.shuffle(order)
            loads.append(os.getloadavg()[0])
            print(f"round {round_no + 1}/{args.rounds}, load {loads[-1]:.2f}", file=sys.stderr, flush=True)
            for name in order:
                results[name].append(run(PROTOS[name], py[PROTOS[name].python], tmp / name, args.tests, out))

    def per_test(name: str, key: str) -> list[float]:
        def value(r: dict[str, float]) -> float:
            return r["ours"] + r["kthreads"] if key == "all" else r[key]

        return [value(r) * 1000 / r["tests"] for r in results[name]]

    def paired(name: str, other: str, key: str) -> float | None:
        """Median over rounds of (name - other) within the same round: drift cancels."""
        a, b = per_test(name, key), per_test(other, key)
        return statistics.median(x - y for x, y in zip(a, b, strict=True)) if a and b else None

    def spread(values: list[float]) -> str:
        q = statistics.quantiles(values, n=4) if len(values) >= 4 else [min(values), 0, max(values)]
        return f"{q[0]:.2f}..{q[-1]:.2f}"

    print(
        f"machine: nproc {os.cpu_count()}, kernel {platform.release()}, python {platform.python_version()}, "
        f"load average {' '.join(f'{x:.2f}' for x in load_before)} before / "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} after, 1-min load at round starts "
        f"{min(loads):.2f}..{max(loads):.2f}"
    )
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"per test = CPU over pytest_runtestloop / {args.tests} tests, median of {args.rounds} interleaved rounds; "
        "'ours' = the run's cpuacct cgroup, 'all' = ours + kernel threads; Δ = median of per-round differences"
    )
    print()
    forked_all = paired("forked", "forked-plain", "all")
    print(
        "| row | ours ms/test | all ms/test (IQR) | over plain (all) | ÷ forked's (all) | Δ vs as is: ours "
        "| Δ all (IQR) | wall ms/test |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in chosen:
        proto = PROTOS[name]
        everything = per_test(name, "all")
        over = paired(name, proto.baseline, "all") if proto.baseline else None
        ratio = over / forked_all if over is not None and forked_all and name != "forked" else None
        lonely_row = proto.python == "lonely" and bool(proto.baseline) and name != "lonely"
        d_ours = paired(name, "lonely", "ours") if lonely_row else None
        diffs = [x - y for x, y in zip(everything, per_test("lonely", "all"), strict=True)] if lonely_row else []
        d_all = f"{statistics.median(diffs):+.2f} ({spread(diffs)})" if diffs else "—"
        print(
            f"| {proto.title} | {statistics.median(per_test(name, 'ours')):.2f} "
            f"| {statistics.median(everything):.2f} ({spread(everything)}) | {cp.cell(over, '+.2f')} "
            f"| {cp.cell(ratio)} | {cp.cell(d_ours, '+.2f')} | {d_all} "
            f"| {statistics.median(per_test(name, 'wall')):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
