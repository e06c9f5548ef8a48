"""Per-test cost of pytest-lonely's isolation next to pytest-forked's, measured on whole pytest processes.

Why whole processes: what a user pays is the wall time of ``pytest``, and the
isolation cost lives partly outside any one test (the plan is built once, the
dying container is reaped later, the kernel tears namespaces down in the
background).  Timing only the test body would miss all of that.

Why two sizes: a pytest process has a large fixed cost (interpreter start,
plugin loading, collection) that would swamp a per-test number.  Each round
runs every row with ``N`` tests and with ``N0`` tests; the fixed cost is the
same in both, so ``(wall(N) - wall(N0)) / (N - N0)`` is the marginal cost of
one more test.  Each row's overhead is taken against its *own* plain run:
the same interpreter, pytest version and uid, nothing isolated.

Why interleaved, shuffled rounds: the machine's speed drifts (other load,
thermal limits, page cache).  Running every row once per round, in a new
random order each round, spreads the drift over all rows instead of charging
it to whichever happened to run last.

Why pytest-forked gets a venv of its own: pytest-forked 1.7.5 fails every test
on pytest 9.2 (it ``marshal``s reports that now carry a ``NodeId`` object), so
the comparison runs it on pytest 8.3.5, with nothing else installed, in a venv
this script creates with pip under ``~/.cache/pytest-lonely-bench/`` and
reuses afterwards.

Rows for features that have not landed yet (cgroup limits, OCI images,
privileged mode) are off by default (``--enable ROW``); a row whose option the
installed plugin does not know reads "n/a (option not supported by this
build)" instead of failing the run.

Only the standard library is used, so the script runs in any environment that
can run pytest-lonely itself (``tox -e bench``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
N0: Final = 20  # the small run whose fixed cost is subtracted
DEFAULT_TESTS: Final = 300
NOBODY: Final = 65534
SYSTEM_PYTHON: Final = "/usr/bin/python3"
FORKED_PYTEST: Final = "8.3.5"
FORKED_VERSION: Final = "1.7.5"
#: Copied into the rootless interpreter's site-packages: pytest-lonely and what it needs, all pure Python
#: (pygments and the ``py`` shim: pytest 9 imports them unconditionally).
ROOTLESS_PACKAGES: Final = (
    "pytest",
    "_pytest",
    "pluggy",
    "iniconfig",
    "packaging",
    "pygments",
    "py",
    "filelock",
    "pytest_lonely",
)
RUN_TIMEOUT: Final = 900.0
NOT_SUPPORTED: Final = "n/a (option not supported by this build)"

#: Spawned fresh for every measured run, so that RUSAGE_CHILDREN covers exactly one pytest
#: process and every descendant it (or they) waited for: the containers' CPU time and page
#: faults land here even though the parent pytest never waits for them on the hot path.
#: The wall time is taken around the pytest process alone, so the wrapper's start-up is not in it.
WRAPPER: Final = """\
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "rc": proc.returncode, "maxrss_kb": ru.ru_maxrss, "minflt": ru.ru_minflt,
                  "cpu": ru.ru_utime + ru.ru_stime, "output": proc.stdout[-4000:]}))
"""

TEST_FILE: Final = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_x(i):
    pass
"""

#: Which interpreter a row runs on: the benchmark's own, pytest-forked's venv, or the copy uid 65534 can read.
MAIN, FORKED, ROOTLESS = "main", "forked", "rootless"


@dataclasses.dataclass
class Row:
    """One way of running the same tests; ``baseline`` names the row its overhead is measured against."""

    name: str
    title: str
    pytest_args: tuple[str, ...]
    baseline: str = "plain"
    python: str = MAIN
    #: Off unless named with --enable or --only: a feature that may not exist in this build yet.
    optional: bool = False
    unavailable: str | None = None  # why the row cannot be measured here
    env: tuple[tuple[str, str], ...] = ()  # extra environment for this row's pytest
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def lonely_options(self) -> list[str]:
        """The ``--lonely-*`` options this row needs the plugin to know."""
        return [arg for arg in self.pytest_args if arg.startswith("--lonely-")]


def make_rows(oci_image: Path | None) -> dict[str, Row]:
    """Every row, in table order.  Placeholder rows name the options the issue plans; edit them as features land."""
    lonely = ("-p", "lonely", "--lonely-all")
    rows = [
        Row("plain", "plain pytest (`-p no:lonely`)", ("-p", "no:lonely"), baseline=""),
        Row("forked-plain", f"plain pytest {FORKED_PYTEST}, pytest-forked's venv", (), baseline="", python=FORKED),
        Row(
            "forked",
            f"pytest-forked {FORKED_VERSION} (`-p pytest_forked --forked`, pytest {FORKED_PYTEST})",
            ("-p", "pytest_forked", "--forked"),
            baseline="forked-plain",
            python=FORKED,
        ),
        Row("lonely", "pytest-lonely, root, default root (`--lonely-all`)", lonely),
        Row(
            "rootfs",
            "pytest-lonely, `--lonely-rootfs fixtures/rootfs`",
            (*lonely, "--lonely-rootfs", str(REPO / "fixtures" / "rootfs")),
        ),
        Row("network", "pytest-lonely, `--lonely-network none`", (*lonely, "--lonely-network", "none")),
        Row(
            "rootless-plain",
            f"plain pytest, uid {NOBODY}, {SYSTEM_PYTHON} (baseline for rootless)",
            ("-p", "no:lonely"),
            baseline="",
            python=ROOTLESS,
        ),
        Row(
            "rootless",
            f"pytest-lonely, rootless (uid {NOBODY}, `--lonely-all`)",
            lonely,
            baseline="rootless-plain",
            python=ROOTLESS,
        ),
        # Off by default: the plugin loaded but nothing isolated, and the pre-built namespaces switched off.
        Row("inprocess", "pytest-lonely loaded, nothing isolated (`-p lonely`)", ("-p", "lonely"), optional=True),
        Row(
            "no-zygote",
            "pytest-lonely, every container forked from pytest (`PYTEST_LONELY_PREBUILD=namespaces`)",
            lonely,
            optional=True,
            env=(("PYTEST_LONELY_PREBUILD", "namespaces"),),
        ),
        Row(
            "prebuild-off",
            "pytest-lonely, nothing built ahead of time (`PYTEST_LONELY_PREBUILD=0`)",
            lonely,
            optional=True,
            env=(("PYTEST_LONELY_PREBUILD", "0"),),
        ),
        # Placeholders for features as they land.
        Row(
            "memory",
            "pytest-lonely, cgroup `--lonely-memory 256M`",
            (*lonely, "--lonely-memory", "256M"),
            optional=True,
        ),
        Row("pids", "pytest-lonely, cgroup `--lonely-pids 64`", (*lonely, "--lonely-pids", "64"), optional=True),
        Row("cpus", "pytest-lonely, cgroup `--lonely-cpus 1`", (*lonely, "--lonely-cpus", "1"), optional=True),
        Row(
            "oci",
            "pytest-lonely, OCI image rootfs (`--lonely-rootfs OCI_LAYOUT`)",
            (*lonely, "--lonely-rootfs", str(oci_image or "OCI_LAYOUT")),
            optional=True,
            unavailable=None if oci_image else "n/a (no OCI image layout given: `--oci-image DIR`)",
        ),
        Row("privileged", "pytest-lonely, `--lonely-privileged`", (*lonely, "--lonely-privileged"), optional=True),
    ]
    return {row.name: row for row in rows}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for pytest: no inherited pytest options, no auto-loaded plugins.

    Auto-loading is off so that every row loads exactly the plugins its
    command line names: otherwise whatever else is installed (xdist, cov,
    timeout, rerunfailures...) would add its own per-test hooks to every row.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON"))}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["COLUMNS"] = "300"  # so the short test summary is not cut at 80 columns
    env.update(extra)
    return env


def write_project(path: Path, sizes: Sequence[int]) -> None:
    """A project with one test file per size; the empty ``pytest.ini`` pins the rootdir to it."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "pytest.ini").write_text("[pytest]\n")
    for n in sizes:
        (path / f"test_n{n}.py").write_text(TEST_FILE.replace("{n}", str(n)))


def cache_dir() -> Path:
    """Where the pytest-forked venv lives between runs (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-lonely-bench"


def ensure_forked_venv(cache: Path) -> tuple[str | None, str | None]:
    """A venv holding only pytest 8.3.5 and pytest-forked 1.7.5, made with pip the first time and then reused.

    Returns ``(python, None)`` or ``(None, why not)``.  A venv whose versions
    do not match (an interrupted install, say) is made anew.
    """
    venv = cache / f"forked-{FORKED_VERSION}-pytest-{FORKED_PYTEST}"
    python = venv / "bin" / "python"
    probe = "import importlib.metadata as m; print(m.version('pytest'), m.version('pytest-forked'))"
    want = f"{FORKED_PYTEST} {FORKED_VERSION}"

    def versions() -> str:
        if not python.exists():
            return ""
        done = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    if versions() == want:
        return str(python), None
    print(f"creating {venv} (pytest {FORKED_PYTEST}, pytest-forked {FORKED_VERSION})", file=sys.stderr, flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True, check=False)
    if made.returncode:
        return None, f"`{sys.executable} -m venv {venv}` failed: {made.stderr.strip()[-200:]}"
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    installed = subprocess.run(
        [*pip, f"pytest=={FORKED_PYTEST}", f"pytest-forked=={FORKED_VERSION}"],
        capture_output=True,
        text=True,
        check=False,
    )
    got = versions()
    if installed.returncode or got != want:
        shutil.rmtree(venv, ignore_errors=True)
        tail = (installed.stderr.strip().splitlines() or ["no output"])[-1]
        return (
            None,
            f"pip could not install pytest=={FORKED_PYTEST} pytest-forked=={FORKED_VERSION} into {venv}: {tail}",
        )
    return str(python), None


def build_rootless_python(where: Path) -> tuple[str | None, str | None]:
    """A venv of Debian's interpreter that uid 65534 can read, holding copies of the pure-Python packages.

    The benchmark's own interpreter may live somewhere 65534 cannot read (a
    home directory, a tox dir under /root), so rootless mode gets its own.
    Returns ``(python, None)`` or ``(None, why not)``.
    """
    if os.geteuid() != 0:
        return None, f"needs root to switch to uid {NOBODY}"
    if shutil.which("setpriv") is None:
        return None, "setpriv not found"
    if not Path(SYSTEM_PYTHON).exists():
        return None, f"{SYSTEM_PYTHON} not found"
    venv = where / "venv"
    made = subprocess.run(
        [SYSTEM_PYTHON, "-m", "venv", "--without-pip", str(venv)], capture_output=True, text=True, check=False
    )
    if made.returncode:
        return None, f"{SYSTEM_PYTHON} -m venv failed: {made.stderr.strip().splitlines()[-1:]}"
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    site = Path(purelib)
    owners = importlib.metadata.packages_distributions()
    dists: set[str] = set()
    for name in ROOTLESS_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            return None, f"{name} is not importable from {sys.executable}"
        if spec.submodule_search_locations:
            source = Path(next(iter(spec.submodule_search_locations)))
            shutil.copytree(source, site / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(spec.origin, site)
        dists.update(owners.get(name, ()))
    # Metadata and entry points, so that `-p lonely` finds the plugin by its entry-point name.
    for dist_name in dists:
        dist = importlib.metadata.distribution(dist_name)
        info = site / f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}.dist-info"
        info.mkdir()
        for filename in ("METADATA", "entry_points.txt"):
            text = dist.read_text(filename)
            if text:
                (info / filename).write_text(text)
    # Byte-compile now, with the interpreter that will run it: 65534 cannot write __pycache__.
    compiled = subprocess.run([str(python), "-m", "compileall", "-q", str(site)], capture_output=True, check=False)
    if compiled.returncode:
        return None, "compileall failed in the rootless venv"
    for root, dirnames, filenames in os.walk(where):
        for name in dirnames:
            os.chmod(os.path.join(root, name), 0o755)
        for name in filenames:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode | 0o444)
    os.chmod(where, 0o755)
    return str(python), None


def pytest_command(row: Row, n: int, python: str) -> list[str]:
    """The pytest command line; ``setpriv`` execs, so the rootless pytest is still the wrapper's direct child."""
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *row.pytest_args, f"test_n{n}.py"]
    if row.python == ROOTLESS:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return command


def run_once(command: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """One pytest process under a fresh wrapper; returns wall seconds, exit code, rusage and output tail."""
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"benchmark wrapper failed: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def problem_in(output: str, n: int, cwd: Path) -> str | None:
    """None if all ``n`` tests passed, else the first failure's reason, shortened.

    Only the reason (not the test id or the counts) is kept, so that the same
    failure in the big and the small run is noted once.
    """
    passed = re.search(r"(\d+) passed", output)
    if passed and int(passed.group(1)) == n and not re.search(r"\d+ (failed|errors?)\b", output):
        return None
    lines = [line.strip().replace(f"{cwd}/", "") for line in output.splitlines() if line.strip()]
    first = next((line for line in lines if line.startswith(("FAILED", "ERROR", "E "))), "")
    reason = first.split(" - ", 1)[-1] if first else (lines[-1] if lines else "no output")
    reason = re.sub(r"\btest_n\d+\.py\S*\s*", "", reason)
    return reason if len(reason) <= 160 else reason[:157] + "..."


def per_test(row: Row, tests: int, key: str = "wall", scale: float = 1000.0) -> list[float]:
    """Marginal cost per test in each round: (x(N) - x(N0)) / (N - N0), for x = wall, cpu or minflt."""
    by_round: dict[int, dict[int, float]] = {}
    for run in row.runs:
        by_round.setdefault(run["round"], {})[run["n"]] = run[key]
    return [
        (values[tests] - values[N0]) * scale / (tests - N0)
        for _, values in sorted(by_round.items())
        if tests in values and N0 in values
    ]


def supported_options(python: str, cwd: Path, env: dict[str, str]) -> str | None:
    """``pytest -p lonely --help`` of this interpreter, to tell which ``--lonely-*`` options the build knows."""
    done = subprocess.run(
        [python, "-m", "pytest", "-p", "lonely", "--help"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout if done.returncode == 0 else None


def measure(rows: list[Row], tests: int, rounds: int, contexts: dict[str, tuple[str, Path, dict[str, str]]]) -> None:
    """Warm up every row once, then run the interleaved, shuffled rounds."""
    rng = random.Random()
    for row in rows:  # warm-up: byte-code caches, page cache, the plugin's first probe
        python, cwd, env = contexts[row.python]
        run_once(pytest_command(row, N0, python), cwd, {**env, **dict(row.env)})
    for round_no in range(rounds):
        order = rows[:]
        rng.shuffle(order)
        print(f"round {round_no + 1}/{rounds}: {', '.join(r.name for r in order)}", file=sys.stderr, flush=True)
        for row in order:
            python, cwd, env = contexts[row.python]
            env = {**env, **dict(row.env)}
            sizes = [tests, N0]
            rng.shuffle(sizes)
            for n in sizes:
                result = run_once(pytest_command(row, n, python), cwd, env)
                problem = problem_in(result["output"], n, cwd)
                if problem and problem not in row.problems:
                    row.problems.append(problem)
                row.runs.append({"round": round_no, "n": n, **{k: v for k, v in result.items() if k != "output"}})


def fmt(value: float | None, spec: str) -> str:
    """A table cell: a missing number shows as a dash rather than breaking the row."""
    return "—" if value is None else format(value, spec)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def overheads(rows: dict[str, Row], chosen: list[str], tests: int, key: str = "wall") -> dict[str, float]:
    """Each measured row's median ms/test (of wall or CPU time) minus its baseline's."""
    medians = {name: m for name in chosen if (m := median_or_none(per_test(rows[name], tests, key))) is not None}
    return {
        name: medians[name] - medians[rows[name].baseline]
        for name in medians
        if rows[name].baseline and rows[name].baseline in medians
    }


def table(rows: dict[str, Row], chosen: list[str], tests: int) -> list[str]:
    """The Markdown table; a row's overhead is against its own baseline row, the last ratio against pytest-forked's."""
    over = overheads(rows, chosen, tests)
    forked = over.get("forked")
    lines = [
        "| row | median ms/test | min, max | overhead ms over own plain | overhead / pytest-forked's "
        "| CPU ms/test (all processes) | minor faults/test (all processes) | peak RSS MB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in chosen:
        row = rows[name]
        samples = per_test(row, tests)
        notes: list[str] = []
        if row.unavailable:
            notes.append(row.unavailable if row.unavailable.startswith("n/a") else f"not run: {row.unavailable}")
        if not row.baseline:
            notes.append("baseline")
        elif row.baseline != "plain":
            notes.append(f"vs `{row.baseline}`")
        if row.problems:
            lead = "tests did not pass, timings include failure reporting"
            notes.append(f"{lead}: {'; '.join(row.problems[:2])}".replace("|", "\\|"))
        overhead = over.get(name)
        ratio = overhead / forked if overhead is not None and forked and name != "forked" and forked > 0 else None
        big = [run["maxrss_kb"] for run in row.runs if run["n"] == tests]
        rss = statistics.median(big) / 1024 if big else None
        lines.append(
            f"| {row.title} | {fmt(median_or_none(samples), '.3f')} "
            f"| {f'{min(samples):.3f}, {max(samples):.3f}' if samples else '—'} | {fmt(overhead, '+.3f')} "
            f"| {fmt(ratio, '.2f')} | {fmt(median_or_none(per_test(row, tests, 'cpu')), '.3f')} "
            f"| {fmt(median_or_none(per_test(row, tests, 'minflt', 1.0)), '.0f')} | {fmt(rss, '.0f')} "
            f"| {' '.join(notes)} |"
        )
    return lines


def machine() -> dict[str, str]:
    """What the numbers depend on, for the header."""
    try:
        pytest_version = importlib.metadata.version("pytest")
    except importlib.metadata.PackageNotFoundError:
        pytest_version = "?"
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "pytest": pytest_version,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def choose(parser: argparse.ArgumentParser, rows: dict[str, Row], only: list[str], enable: list[str]) -> list[str]:
    """The rows to run, in table order: the default set (or --only), plus --enable, plus their baselines."""

    def names(values: list[str], option: str) -> set[str]:
        wanted = {name.strip() for value in values for name in value.split(",") if name.strip()}
        unknown = wanted - set(rows)
        if unknown:
            parser.error(f"{option}: unknown row(s) {', '.join(sorted(unknown))}; known: {', '.join(rows)}")
        return wanted

    wanted = names(only, "--only") if only else {name for name, row in rows.items() if not row.optional}
    wanted |= names(enable, "--enable")
    wanted |= {rows[name].baseline for name in wanted if rows[name].baseline}
    return [name for name in rows if name in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, prepare the projects and interpreters, measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tests", type=int, default=None, help=f"tests in the big run (default: {DEFAULT_TESTS})")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="2 rounds instead of 5 (about a minute on 2 cores)")
    rows = make_rows(None)
    defaults = [name for name, row in rows.items() if not row.optional]
    optional = [name for name, row in rows.items() if row.optional]
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="ROW",
        help=f"run only these rows (their baselines are added); default: {' '.join(defaults)}",
    )
    parser.add_argument(
        "--enable", nargs="+", default=[], metavar="ROW", help=f"add optional rows: {' '.join(optional)}"
    )
    parser.add_argument("--oci-image", type=Path, metavar="DIR", help="an OCI image layout for the `oci` row")
    parser.add_argument(
        "--cache-dir", type=Path, default=cache_dir(), help="where pytest-forked's venv is kept (default: %(default)s)"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    tests = DEFAULT_TESTS if args.tests is None else args.tests
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    if tests <= N0:
        parser.error(
            f"--tests must be more than {N0}, got {tests}: the per-test time is the difference to a {N0}-test run"
        )
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds}")
    if args.oci_image is not None and not args.oci_image.is_dir():
        parser.error(f"--oci-image {str(args.oci_image)!r}: not a directory (an OCI image layout is a directory)")
    rows = make_rows(args.oci_image.resolve() if args.oci_image else None)
    chosen = choose(parser, rows, args.only, args.enable)

    info = machine()
    command_line = shlex.join([sys.executable, *sys.argv])
    with tempfile.TemporaryDirectory(prefix="lonely-bench-") as tmp:
        root_project = Path(tmp) / "project"
        write_project(root_project, (tests, N0))
        contexts: dict[str, tuple[str, Path, dict[str, str]]] = {MAIN: (sys.executable, root_project, clean_env())}
        wanted_pythons = {rows[name].python for name in chosen}
        why_not: dict[str, str] = {}
        if FORKED in wanted_pythons:
            python, why = ensure_forked_venv(args.cache_dir)
            if python is None:
                why_not[FORKED] = why or "?"
            else:
                contexts[FORKED] = (python, root_project, clean_env())
                info["pytest (forked venv)"] = FORKED_PYTEST
        if ROOTLESS in wanted_pythons:
            rootless_dir = Path(tmp) / "rootless"
            rootless_dir.mkdir()
            python, why = build_rootless_python(rootless_dir)
            if python is None:
                why_not[ROOTLESS] = why or "?"
            else:
                project = rootless_dir / "project"
                write_project(project, (tests, N0))
                for root, _, filenames in os.walk(project):  # 65534 may then cache its assertion rewrites
                    os.chown(root, NOBODY, NOBODY)
                    for filename in filenames:
                        os.chown(os.path.join(root, filename), NOBODY, NOBODY)
                os.chmod(Path(tmp), 0o755)
                contexts[ROOTLESS] = (python, project, clean_env(HOME=str(project)))
        help_text = supported_options(*contexts[MAIN])
        for name in chosen:
            row = rows[name]
            if row.python in why_not:
                row.unavailable = why_not[row.python]
            elif row.unavailable is None and help_text is not None:
                missing = [option for option in row.lonely_options if option not in help_text]
                if missing:
                    row.unavailable = f"{NOT_SUPPORTED}: {', '.join(missing)}"
        runnable = [rows[name] for name in chosen if not rows[name].unavailable]
        measure(runnable, tests, rounds, contexts)
        commands = {
            name: shlex.join(pytest_command(rows[name], tests, contexts[rows[name].python][0]))
            for name in chosen
            if rows[name].python in contexts and not rows[name].unavailable
        }

    info["loadavg after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: nproc {info['nproc']}, kernel {info['kernel']}, python {info['python']}, pytest {info['pytest']}, "
        f"load average {info['loadavg']} before / {info['loadavg after']} after"
    )
    print(f"command: `{command_line}`")
    print(
        f"per-test = (x({tests} tests) - x({N0} tests)) / {tests - N0}, median of {rounds} round(s), for x = wall "
        "time, CPU time and minor faults of the pytest process and every process it reaped (containers included); "
        f"peak RSS = median ru_maxrss of the {tests}-test runs"
    )
    print()
    for line in table(rows, chosen, tests):
        print(line)
    over = overheads(rows, chosen, tests)
    cpu_over = overheads(rows, chosen, tests, "cpu")
    print()
    if "lonely" in over and "forked" in over and over["forked"] > 0:
        print(
            f"**pytest-lonely / pytest-forked overhead ratio: {over['lonely'] / over['forked']:.2f}** "
            f"({over['lonely']:.3f} ms / {over['forked']:.3f} ms per test; the issue's target is 0.50 or less)"
        )
        if cpu_over.get("forked", 0) > 0 and "lonely" in cpu_over:
            print(
                f"CPU-time overhead ratio (less sensitive to other load on the machine): "
                f"{cpu_over['lonely'] / cpu_over['forked']:.2f} ({cpu_over['lonely']:.3f} ms / "
                f"{cpu_over['forked']:.3f} ms of CPU per test)"
            )
    else:
        print("pytest-lonely / pytest-forked overhead ratio: — (needs both the `lonely` and the `forked` rows)")
    print()
    print("pytest commands (run in a temporary project dir; PYTEST_DISABLE_PLUGIN_AUTOLOAD=1):")
    for name, command in commands.items():
        print(f"- {name}: `{command}`")

    if args.json:
        raw = {
            "machine": info,
            "command": command_line,
            "tests": tests,
            "n0": N0,
            "rounds": rounds,
            "rows": {
                name: {
                    "title": rows[name].title,
                    "baseline": rows[name].baseline,
                    "command": commands.get(name),
                    "unavailable": rows[name].unavailable,
                    "problems": rows[name].problems,
                    "per_test_ms": per_test(rows[name], tests),
                    "overhead_ms": over.get(name),
                    "cpu_overhead_ms": cpu_over.get(name),
                    "runs": rows[name].runs,
                }
                for name in chosen
            },
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
