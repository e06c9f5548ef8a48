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

Why time inside the process: collecting 2,000 tests and building 80 MB take
seconds and vary more than the per-test difference, so a conftest times
``pytest_runtestloop`` (every test's setup, fork, run, report and teardown)
and the per-test numbers are that time divided by the number of tests.  The
wall-time difference is shown as well: it also holds the plugin's one-off
costs (probe, plan, helper process) and the reaping at the end.

Why the trivial row: the ratio between the large suite's overhead and the
trivial one's says how much of the cost grows with the suite, which a
trivial benchmark alone would hide.  The "no ballast" row tells the heap's
share apart from the plugins' and fixtures'.

Only the standard library is used; run with the interpreter that has
pytest-lonely (and the plugins) installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
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
MODES: Final = {"plain": ("-p", "no:lonely"), "isolated": ("-p", "lonely", "--lonely-all")}

#: As in overhead.py: rusage of exactly one pytest process and everything it reaped.
WRAPPER: Final = """\
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "rc": proc.returncode, "maxrss_kb": ru.ru_maxrss, "minflt": ru.ru_minflt,
                  "cpu": ru.ru_utime + ru.ru_stime, "output": proc.stdout[-3000:]}))
"""

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
    start = time.perf_counter()
    try:
        return (yield)
    finally:
        _STATS["loop_s"] = time.perf_counter() - start
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

#: What is run: (configuration, label), each in both MODES.
CONFIGS: Final = (
    ("trivial", "trivial tests, no other plugin, no ballast"),
    ("large-noballast", "large suite, plugins, no ballast"),
    ("large", "large suite, plugins, ~80 MB ballast"),
)


def clean_env(**extra: str) -> dict[str, str]:
    """No inherited pytest options, no auto-loaded plugins: every run loads exactly the plugins it names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON", "BENCH_"))}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["COLUMNS"] = "300"
    env.update(extra)
    return env


def installed_plugins() -> list[tuple[str, str, tuple[str, ...]]]:
    """The PLUGINS whose entry point exists in this interpreter, with their versions."""
    names = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
    found: list[tuple[str, str, tuple[str, ...]]] = []
    for name, dist, extra in PLUGINS:
        if name in names:
            found.append((name, f"{dist} {importlib.metadata.version(dist)}", extra))
    return found


def write_projects(root: Path, modules: int) -> tuple[Path, Path]:
    """The large suite (``modules`` modules of 50 tests) and a trivial one of the same size."""
    large = root / "large"
    large.mkdir()
    (large / "pytest.ini").write_text("[pytest]\n")
    (large / "conftest.py").write_text(CONFTEST)
    for index in range(modules):
        (large / f"test_mod{index:02d}.py").write_text(MODULE.format(index=index))
    trivial = root / "trivial"
    trivial.mkdir()
    (trivial / "pytest.ini").write_text("[pytest]\n")
    (trivial / "conftest.py").write_text(CONFTEST)
    (trivial / "test_trivial.py").write_text(TRIVIAL.replace("{n}", str(modules * TESTS_PER_MODULE)))
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
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command],
        cwd=cwd,
        env={**env, "BENCH_OUT": str(out)},
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"benchmark wrapper failed: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    if out.exists():
        result.update(json.loads(out.read_text()))
    output = result.pop("output")
    passed = re.search(r"(\d+) passed", output)
    if result["rc"] or not passed or int(passed.group(1)) != tests:
        lines = [line for line in output.splitlines() if line.strip()]
        first = next((line for line in lines if line.startswith(("FAILED", "ERROR", "E "))), "")
        result["problem"] = (first or (lines[-1] if lines else f"exit status {result['rc']}"))[:200]
    return result


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def main(argv: Sequence[str] | None = None) -> int:
    """Generate the suites, run every (configuration, mode) once per round in shuffled order, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--modules", type=int, default=None, help="modules of 50 tests (default: 40; 8 with --quick)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3; 2 with --quick)")
    parser.add_argument(
        "--ballast-mb", type=int, default=80, help="MB of live objects the conftest builds (default: 80)"
    )
    parser.add_argument("--quick", action="store_true", help="400 tests in 8 modules, 2 rounds")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    modules = args.modules if args.modules is not None else (8 if args.quick else 40)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 3)
    if modules < 1:
        parser.error(f"--modules must be at least 1, got {modules}")
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds}")
    if args.ballast_mb < 0:
        parser.error(f"--ballast-mb must not be negative, got {args.ballast_mb}")
    tests = modules * TESTS_PER_MODULE
    plugins = installed_plugins()
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    keys = [(config, mode) for config, _ in CONFIGS for mode in MODES]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {key: [] for key in keys}
    rng = random.Random()
    with tempfile.TemporaryDirectory(prefix="lonely-large-") as tmp:
        large, trivial = write_projects(Path(tmp), modules)
        out = Path(tmp) / "stats.json"

        def run(config: str, mode: str) -> dict[str, Any]:
            ballast = args.ballast_mb if config == "large" else 0
            env = clean_env(BENCH_BALLAST_MB=str(ballast))
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

    print(
        f"machine: nproc {len(os.sched_getaffinity(0))}, kernel {platform.release()}, "
        f"python {platform.python_version()} ({sys.executable}), pytest {importlib.metadata.version('pytest')}, "
        f"load average {load_before} before / {' '.join(f'{x:.2f}' for x in os.getloadavg())} after"
    )
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`")
    print(
        f"suite: {tests} tests in {modules} modules (a class of 10, a parametrized class of 10, 20 + 10 parametrized "
        f"functions each; module, session and function fixtures), ballast {args.ballast_mb} MB of live objects "
        "built by the conftest at import"
    )
    listed = ", ".join(f"{dist} (`-p {name}{' ' + ' '.join(extra) if extra else ''}`)" for name, dist, extra in plugins)
    print(f"plugins loaded in the large rows: {listed or 'none installed'}; PYTEST_DISABLE_PLUGIN_AUTOLOAD=1")
    print(
        f"ms/test = time in pytest_runtestloop / {tests}, median of {rounds} round(s); wall overhead = whole-process "
        f"wall time difference / {tests} (adds the plugin's one-off costs); faults and CPU = rusage of pytest and "
        f"everything it reaped, difference / {tests}"
    )
    print()
    print(
        "| suite | parent RSS MB | ms/test plain | ms/test isolated | overhead ms/test | ratio to trivial overhead "
        "| wall overhead ms/test | extra CPU ms/test | extra minor faults/test | notes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    overhead_of: dict[str, float | None] = {}
    raw_rows = []
    for config, label in CONFIGS:
        plain, iso = runs[config, "plain"], runs[config, "isolated"]

        def per_test(rs: list[dict[str, Any]], key: str, scale: float = 1000.0) -> float | None:
            return median([r[key] * scale / tests for r in rs if key in r])

        def paired(
            key: str, scale: float = 1000.0, plain: list[dict[str, Any]] = plain, iso: list[dict[str, Any]] = iso
        ) -> float | None:
            """Median over rounds of (isolated - plain) within the same round."""
            by_round = {r["round"]: r for r in plain if key in r}
            diffs = [
                (r[key] - by_round[r["round"]][key]) * scale / tests for r in iso if key in r and r["round"] in by_round
            ]
            return median(diffs)

        overhead = paired("loop_s")
        overhead_of[config] = overhead
        base = overhead_of.get("trivial")
        ratio = overhead / base if overhead is not None and base and base > 0 else None
        rss = median([r["rss_loop_start_kb"] / 1024 for r in plain + iso if "rss_loop_start_kb" in r])
        problems = sorted(
            {f"{mode}: {r['problem']}" for mode, rs in (("plain", plain), ("iso", iso)) for r in rs if "problem" in r}
        )
        print(
            f"| {label} | {fmt(rss, '.0f')} | {fmt(per_test(plain, 'loop_s'), '.3f')} "
            f"| {fmt(per_test(iso, 'loop_s'), '.3f')} | {fmt(overhead, '+.3f')} | {fmt(ratio, '.2f')} "
            f"| {fmt(paired('wall'), '+.3f')} | {fmt(paired('cpu'), '+.3f')} | {fmt(paired('minflt', 1.0), '+.0f')} "
            f"| {'; '.join(problems)[:300].replace('|', '/')} |"
        )
        raw_rows.append({"config": config, "overhead_ms": overhead, "ratio_to_trivial": ratio})

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
