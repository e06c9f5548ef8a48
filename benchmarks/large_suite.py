"""Per-test cost of isolation in a suite that looks like a real one, next to the trivial-test cost.

Why another benchmark: ``overhead.py`` measures trivial tests in a 30 MB
pytest with no other plugin, which is the best case.  A real suite's parent
is bigger (collected items, fixtures, imported modules, session data) and
more plugins add hooks to every test; every isolated test pays for both,
since it forks that parent and runs those hooks in the child.  This script
generates such a suite: 2,000 tests in 40 modules, with classes, module- and
session-scoped fixtures and parametrization, the common plugins that are
installed loaded explicitly (pytest-xdist without ``-n``, pytest-cov without
``--cov``, pytest-timeout with a timeout, pytest-rerunfailures without
``--reruns``), and a conftest that builds about 80 MB of live Python objects
at import (a session's worth of data that every fork inherits).

Three modes per suite: plain pytest, ``--lonely-all`` (a container per
test) and ``--lonely-all --lonely-scope=module`` (a container per module of
50 tests, whose module and class fixtures are set up inside it).

Why time inside the process: collecting 2,000 tests and building 80 MB take
seconds and vary more than the per-test difference, so a conftest measures
``pytest_runtestloop`` (every test's setup, fork, run, report and teardown):
its wall time, the CPU of every process of the run (a cgroup made for it:
pytest, zygotes, containers, the keeper, reaped or not) and the whole
machine's busy time (``/proc/stat``), and the per-test numbers are those
divided by the number of tests.  The whole process's wall-time difference is
shown as well: it also holds the plugin's one-off costs (probe, plan, keeper)
and the reaping at the end.

Why the trivial suite: the ratio between the large suite's overhead and the
trivial one's says how much of the cost grows with the suite, which a
trivial benchmark alone would hide (issue 23: at most 1.2 for the 80 MB
row).  The "no ballast" suite tells the heap's share apart from the
plugins' and fixtures'.  The trivial suite has the same modules of 50 tests,
so that its module-scope row has as many containers as the large one's.

Only the standard library is used; run with the interpreter that has
pytest-lonely (and the plugins) installed, as root for the CPU column.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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

RUN_TIMEOUT: Final = 1800.0
TESTS_PER_MODULE: Final = 50
#: (entry-point name to pass to ``-p``, distribution, extra arguments that make it realistic).
PLUGINS: Final = (
    ("xdist", "pytest-xdist", ()),  # loaded, not used: no -n
    ("xdist.looponfail", "pytest-xdist", ()),
    ("pytest_cov", "pytest-cov", ()),  # loaded, not active: no --cov
    ("timeout", "pytest-timeout", ("--timeout", "300")),  # active: a per-test alarm, as many suites set
    ("rerunfailures", "pytest-rerunfailures", ()),  # loaded, no --reruns
)
MODES: Final = {
    "plain": ("-p", "no:lonely"),
    "isolated": ("-p", "lonely", "--lonely-all"),
    "module": ("-p", "lonely", "--lonely-all", "--lonely-scope=module"),
}
MODE_TITLES: Final = {
    "isolated": "`--lonely-all`",
    "module": "`--lonely-all --lonely-scope=module`",
}
#: Goals: issue 23 (the 80 MB row's overhead over the trivial row's), issue 21 (module scope over plain, ms/test).
GOAL_HEAP_RATIO: Final = 1.2
GOAL_MODULE_MS: Final = 1.0

CONFTEST: Final = '''\
"""The large suite's conftest: session data built at import, session fixtures, and a timer around the run loop."""

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


def _ballast(mb):
    """Live, GC-tracked objects (records as dicts, lists of ints and strs) until VmRSS has grown by ``mb``."""
    keep = []
    target = _rss_kb() + mb * 1024
    start = 0
    while mb and _rss_kb() < target:
        keep.append([{"id": j, "name": f"row-{j}", "tags": [j, j + 1]} if j % 3 else [j, str(j)]
                     for j in range(start, start + 5_000)])
        start += 5_000
    return keep


{cgroup_cpu}

_RSS_BEFORE = _rss_kb()
BALLAST = _ballast(int(os.environ.get("BENCH_BALLAST_MB", "0")))
_STATS = {"rss_before_kb": _RSS_BEFORE, "rss_after_ballast_kb": _rss_kb()}


@pytest.fixture(scope="session")
def session_data():
    return BALLAST


@pytest.fixture(scope="session")
def settings():
    return {"retries": 3, "endpoint": "http://localhost:0", "names": [f"n{i}" for i in range(100)]}


@pytest.fixture
def record(settings):
    return {"settings": settings, "values": list(range(20))}


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session):
    _STATS["rss_loop_start_kb"] = _rss_kb()
    _STATS["tests"] = session.testscollected
    cpu, busy = _cgroup_cpu(), _machine_busy()
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _STATS["loop_s"] = time.perf_counter() - start
        _STATS["loop_machine_s"] = _machine_busy() - busy
        if cpu is not None:
            _STATS["loop_cpu_s"] = _cgroup_cpu() - cpu
        out = os.environ.get("BENCH_OUT")
        if out:
            with open(out, "w") as f:
                json.dump(_STATS, f)
'''

MODULE: Final = '''\
"""Generated module {index}: a class, a parametrized class, parametrized and plain functions (50 tests)."""

import pytest


@pytest.fixture(scope="module")
def module_rows():
    return [{{"id": i, "value": i * {index}}} for i in range(500)]


class TestRows:
    @pytest.fixture
    def first(self, module_rows):
        return module_rows[0]

    def test_first(self, first):
        assert first["id"] == 0

    def test_len(self, module_rows):
        assert len(module_rows) == 500

    def test_session(self, session_data, settings):
        assert settings["retries"] == 3 and session_data is not None

    def test_sum(self, module_rows):
        assert sum(r["id"] for r in module_rows) == 124750

    def test_record(self, record):
        assert record["values"][-1] == 19

    def test_sorted(self, module_rows):
        assert sorted(module_rows, key=lambda r: -r["id"])[0]["id"] == 499

    def test_names(self, settings):
        assert "n42" in settings["names"]

    def test_dict(self):
        assert dict(a=1) == {{"a": 1}}

    def test_str(self):
        assert "x" * 3 == "xxx"

    def test_set(self, module_rows):
        assert len({{r["value"] for r in module_rows}}) in (1, 500)


@pytest.mark.parametrize("n", range(10))
class TestParam:
    def test_square(self, n):
        assert n * n >= 0


@pytest.mark.parametrize("a, b", [(i, i + 1) for i in range(20)])
def test_pairs(a, b, module_rows):
    assert b - a == 1 and module_rows


@pytest.mark.parametrize("text", [f"word{{i}}" for i in range(5)])
@pytest.mark.parametrize("upper", [False, True])
def test_text(text, upper, record):
    assert (text.upper() if upper else text).lower().startswith("word")
'''

TRIVIAL: Final = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_x(i):
    pass
"""

#: What is run: (configuration, label), each in every one of MODES.
CONFIGS: Final = (
    ("trivial", "trivial tests, no other plugin, no ballast"),
    ("large-noballast", "large suite, plugins, no ballast"),
    ("large", "large suite, plugins, ~80 MB ballast"),
)


def installed_plugins() -> list[tuple[str, str, tuple[str, ...]]]:
    """The PLUGINS whose entry point exists in this interpreter, with their versions."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
    found: list[tuple[str, str, tuple[str, ...]]] = []
    for name, dist, extra in PLUGINS:
        if name in names:
            found.append((name, f"{dist} {importlib.metadata.version(dist)}", extra))
    return found


def write_projects(root: Path, modules: int) -> tuple[Path, Path]:
    """The large suite (``modules`` modules of 50 tests) and a trivial one of as many modules and tests."""
    conftest = CONFTEST.replace("{cgroup_cpu}", b.CONFTEST_CGROUP_CPU)
    large = root / "large"
    large.mkdir()
    (large / "pytest.ini").write_text("[pytest]\n")
    (large / "conftest.py").write_text(conftest)
    for index in range(modules):
        (large / f"test_mod{index:02d}.py").write_text(MODULE.format(index=index))
    trivial = root / "trivial"
    trivial.mkdir()
    (trivial / "pytest.ini").write_text("[pytest]\n")
    (trivial / "conftest.py").write_text(conftest)
    for index in range(modules):
        (trivial / f"test_triv{index:02d}.py").write_text(TRIVIAL.replace("{n}", str(TESTS_PER_MODULE)))
    return large, trivial


def command_for(config: str, mode: str, plugins: list[tuple[str, str, tuple[str, ...]]]) -> list[str]:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *MODES[mode]]
    if config != "trivial":
        for name, _, extra in plugins:
            command += ["-p", name, *extra]
    return command


def run_once(command: list[str], cwd: Path, env: dict[str, str], out: Path, tests: int) -> dict[str, Any]:
    """One pytest process; the wrapper's numbers, the conftest's, and a ``problem`` unless all tests passed."""
    out.unlink(missing_ok=True)
    with b.CpuCgroup.made(f"lonely-bench-large-{out.parent.name}") as cgroup:
        result = b.run_measured(command, cwd, {**env, "BENCH_OUT": str(out)}, RUN_TIMEOUT, cgroup)
    if out.exists():
        result.update(json.loads(out.read_text()))
    output = result.pop("output")
    passed = re.search(r"(\d+) passed", output)
    if result["rc"] or not passed or int(passed.group(1)) != tests:
        lines = [line for line in output.splitlines() if line.strip()]
        first = next((line for line in lines if line.startswith(("FAILED", "ERROR", "E "))), "")
        result["problem"] = (first or (lines[-1] if lines else f"exit status {result['rc']}"))[:200]
    elif result.get("lingering"):
        result["problem"] = f"{result['lingering']} process(es) outlived pytest"
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the suites, run every (configuration, mode) once per round in shuffled order, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--modules", type=int, default=None, help="modules of 50 tests (default: 40; 8 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 5; 2 with --quick)")
    parser.add_argument(
        "--ballast-mb", type=int, default=80, help="MB of live objects the conftest builds (default: 80)"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=list(MODES),
        choices=list(MODES),
        metavar="MODE",
        help=f"modes to run: {', '.join(MODES)} (default: all; plain is always run)",
    )
    parser.add_argument("--quick", action="store_true", help="400 tests in 8 modules, 2 rounds")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    modules = args.modules if args.modules is not None else (8 if args.quick else 40)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    if modules < 1:
        parser.error(f"--modules must be at least 1, got {modules}")
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds}")
    if args.ballast_mb < 0:
        parser.error(f"--ballast-mb must not be negative, got {args.ballast_mb}")
    modes = [mode for mode in MODES if mode == "plain" or mode in args.modes]
    tests = modules * TESTS_PER_MODULE
    plugins = installed_plugins()
    load_before = b.loadavg()
    keys = [(config, mode) for config, _ in CONFIGS for mode in modes]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in keys}
    rng = random.Random()
    with tempfile.TemporaryDirectory(prefix="lonely-large-") as tmp:
        large, trivial = write_projects(Path(tmp), modules)
        out = Path(tmp) / "stats.json"

        def run(config: str, mode: str) -> dict[str, Any]:
            ballast = args.ballast_mb if config == "large" else 0
            env = b.clean_env(BENCH_BALLAST_MB=str(ballast))
            cwd = trivial if config == "trivial" else large
            return run_once(command_for(config, mode, plugins), cwd, env, out, tests)

        for config, _ in CONFIGS:  # warm-up: byte-code caches, page cache
            run(config, "plain")
        for round_no in range(rounds):
            order = keys[:]
            rng.shuffle(order)
            print(f"round {round_no + 1}/{rounds}", file=sys.stderr, flush=True)
            for config, mode in order:
                result = run(config, mode)
                result["round"] = round_no
                runs[config, mode].append(result)

    print(b.machine_line(load_before))
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"suite: {tests} tests in {modules} modules (a class of 10, a parametrized class of 10, 20 + 10 parametrized "
        f"functions each; module, session and function fixtures), ballast {args.ballast_mb} MB of live objects "
        f"built by the conftest at import; the trivial suite: {modules} modules of {TESTS_PER_MODULE} `pass` tests"
    )
    listed = ", ".join(f"{dist} (`-p {name}{' ' + ' '.join(extra) if extra else ''}`)" for name, dist, extra in plugins)
    print(f"plugins loaded in the large rows: {listed or 'none installed'}; PYTEST_DISABLE_PLUGIN_AUTOLOAD=1")
    print(
        f"per test = over pytest_runtestloop / {tests}: wall time, CPU of every process of the run (a cgroup), "
        f"and the whole machine's busy time (/proc/stat, includes other people's work); overhead = the mode minus "
        f"plain within the same round, median of {rounds} round(s); whole-process wall = the pytest process's wall "
        "time difference per test (adds one-off costs)"
    )
    print()
    print(
        "| suite | mode | parent RSS MB | loop ms/test | overhead ms/test | ratio to trivial | loop CPU ms/test "
        "| CPU overhead ms/test | ratio to trivial | machine overhead ms/test | whole-process wall overhead ms/test "
        "| notes |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")

    def per_test(rs: list[dict[str, Any]], key: str) -> float | None:
        return b.median([r[key] * 1000 / tests for r in rs if key in r])

    def paired(config: str, mode: str, key: str) -> list[float]:
        """(mode - plain) within the same round, ms per test, one value per round."""
        by_round = {r["round"]: r for r in runs[config, "plain"] if key in r}
        return [
            (r[key] - by_round[r["round"]][key]) * 1000 / tests
            for r in runs[config, mode]
            if key in r and r["round"] in by_round
        ]

    overhead_of: dict[tuple[str, str, str], float | None] = {}
    raw_rows = []
    for config, label in CONFIGS:
        for mode in modes:
            rs = runs[config, mode]
            rss = b.median([r["rss_loop_start_kb"] / 1024 for r in rs if "rss_loop_start_kb" in r])
            problems = sorted({r["problem"] for r in rs if "problem" in r})
            cells = [label if mode == "plain" else "", "plain" if mode == "plain" else MODE_TITLES[mode]]
            cells += [b.fmt(rss, ".0f"), b.fmt(per_test(rs, "loop_s"), ".3f")]
            ratios: dict[str, float | None] = {}
            for key in ("loop_s", "loop_cpu_s"):
                over = b.median(paired(config, mode, key)) if mode != "plain" else None
                overhead_of[config, mode, key] = over
                base = overhead_of.get(("trivial", mode, key))
                ratios[key] = over / base if over is not None and base and base > 0 else None
                if key == "loop_cpu_s":
                    cells.append(b.fmt(per_test(rs, "loop_cpu_s"), ".3f"))
                cells += [b.fmt(over, "+.3f"), b.fmt(ratios[key], ".2f")]
            for key in ("loop_machine_s", "wall"):
                cells.append(b.fmt(b.median(paired(config, mode, key)) if mode != "plain" else None, "+.3f"))
            cells.append("; ".join(problems)[:300].replace("|", "/"))
            print("| " + " | ".join(cells) + " |")
            raw_rows.append(
                {
                    "config": config,
                    "mode": mode,
                    "overhead_ms": overhead_of.get((config, mode, "loop_s")),
                    "cpu_overhead_ms": overhead_of.get((config, mode, "loop_cpu_s")),
                    "ratio_to_trivial": ratios.get("loop_s"),
                    "cpu_ratio_to_trivial": ratios.get("loop_cpu_s"),
                }
            )
    if not any("loop_cpu_s" in r for rs in runs.values() for r in rs):
        print()
        print("(no CPU columns: no cgroup could be made for the runs; run as root)")
    print()
    print("Goals:")
    if "isolated" in modes:
        for key, what in (("loop_cpu_s", "CPU"), ("loop_s", "wall")):
            heavy, trivial_over = (
                overhead_of.get(("large", "isolated", key)),
                overhead_of.get(("trivial", "isolated", key)),
            )
            ratio = heavy / trivial_over if heavy is not None and trivial_over and trivial_over > 0 else None
            print(
                f"- issue 23, the {args.ballast_mb} MB row over its trivial row, `--lonely-all`, {what}: "
                f"**{b.fmt(ratio, '.2f')}** (goal ≤ {GOAL_HEAP_RATIO}: {b.verdict(ratio, GOAL_HEAP_RATIO)})"
            )
    if "module" in modes:
        for config, label in CONFIGS:
            for key, what in (("loop_cpu_s", "CPU"), ("loop_s", "wall")):
                over = overhead_of.get((config, "module", key))
                print(
                    f"- issue 21, `--lonely-scope=module` over plain, {label}, {what}: **{b.fmt(over, '+.3f')} ms** "
                    f"per test (goal ≤ {GOAL_MODULE_MS} ms: {b.verdict(over, GOAL_MODULE_MS)})"
                )

    if args.json:
        raw = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "tests": tests,
            "rounds": rounds,
            "plugins": [dist for _, dist, _ in plugins],
            "rows": raw_rows,
            "runs": [{"config": c, "mode": m, **r} for (c, m), rs in runs.items() for r in rs],
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
