"""Per-test cost of pytest-lonely's isolation next to pytest-forked's, in wall time and CPU, on whole pytest processes.

Why whole processes: what a user pays is the wall time of ``pytest``, and the
isolation cost lives partly outside any one test (the mount plan is made once,
a finished container exits and is reaped later, the kernel tears namespaces
down in its own threads).  Timing only the test body would miss all of that.

Why two sizes: a pytest process has a large fixed cost (interpreter start,
plugin loading, collection).  Each round runs every row with ``N`` tests and
with ``N0`` tests; the fixed cost is the same in both, so ``(x(N) - x(N0)) /
(N - N0)`` is the marginal cost of one more test, for x = wall time, CPU time
(``getrusage(RUSAGE_CHILDREN)`` of a fresh wrapper: pytest and every process
it or its children reaped, the keeper included), that CPU plus the kernel
threads' (deferred namespace and mount teardown), the whole machine's busy
time (``/proc/stat``), and minor faults.  Each row's overhead is taken against
its *own* plain run: the same interpreter, pytest version and uid, nothing
isolated.

Why pytest 8.3.5 in venvs of their own: pytest-forked 1.7.5 fails every test
on pytest 9.2, so both tools run on pytest 8.3.5, each in a venv holding
nothing else (made with pip under ``~/.cache/pytest-lonely-bench/``; the
pytest-lonely one is a copy of this checkout's sources, one venv per state of
them).  ``--here`` runs the pytest-lonely rows on this interpreter instead.

Why the tests are spread over modules and classes: ``--lonely-scope=module``
and ``class`` put consecutive tests of a module or class in one container, so
the same N trivial tests are laid out as modules of 20 tests, each two classes
of 10 (N = 300: 15 modules, 30 classes; N0 = 20: one module).  Every row runs
that same layout.  With ``--lonely-scope=session`` both runs use exactly one
container, so its cost cancels in ``x(N) - x(N0)``: that row is the cost of a
test *inside* a group, the number issue 21 bounds.

Why interleaved, shuffled rounds, 7 by default: the machine's speed drifts
(other load, the page cache).  Running every row once per round, in a new
random order each round, spreads the drift over all rows; the summary gives
each ratio's median and the middle half of its per-round values, and says
"undecided" while that range straddles the goal.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import _bench as b

N0: Final = 20  # the small run whose fixed cost is subtracted
DEFAULT_TESTS: Final = 300
DEFAULT_ROUNDS: Final = 7
TESTS_PER_MODULE: Final = 20
NOBODY: Final = 65534
SYSTEM_PYTHON: Final = "/usr/bin/python3"
#: Copied into the rootless interpreter's site-packages: pytest-lonely and what it needs, all pure Python.
ROOTLESS_PACKAGES: Final = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py", "pytest_lonely")
#: Copied too where the source interpreter has them (pytest 9 imports pygments unconditionally).
ROOTLESS_OPTIONAL: Final = ("pygments",)
RUN_TIMEOUT: Final = 900.0
NOT_SUPPORTED: Final = "n/a (option not supported by this build)"

#: Goals (issues 21 and 23).
GOAL_CPU: Final = 1.15
GOAL_WALL: Final = 0.7
GOAL_IN_GROUP_MS: Final = 0.5

MODULE: Final = """\
import pytest


class TestA:
    @pytest.mark.parametrize("i", range(10))
    def test_x(self, i):
        pass


class TestB:
    @pytest.mark.parametrize("i", range(10))
    def test_x(self, i):
        pass
"""

#: ``--layout flat``: the layout of the measurements before issue 21, one parametrized function.
FLAT: Final = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_x(i):
    pass
"""

LAYOUTS: Final = {
    "grouped": f"modules of {TESTS_PER_MODULE} trivial tests, each in two classes of 10 (`--layout grouped`)",
    "flat": "one module, one parametrized trivial function (`--layout flat`)",
}

#: Which interpreter a row runs on: pytest-lonely's (pinned venv or this one), pytest-forked's venv, or the
#: copy uid 65534 can read.
LONELY, FORKED, ROOTLESS, BASE = "lonely", "forked", "rootless", "base"

#: Per-test quantities, from each run: (key, scale to per-test units).
METRICS: Final = {"wall": 1000.0, "cpu": 1000.0, "cpuk": 1000.0, "machine": 1000.0, "minflt": 1.0}


@dataclasses.dataclass
class Row:
    """One way of running the same tests; ``baseline`` names the row its overhead is measured against."""

    name: str
    title: str
    pytest_args: tuple[str, ...]
    baseline: str = "plain"
    python: str = LONELY
    #: Off unless named with --enable or --only.
    optional: bool = False
    unavailable: str | None = None  # why the row cannot be measured here
    env: tuple[tuple[str, str], ...] = ()  # extra environment for this row's pytest
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def lonely_options(self) -> list[str]:
        """The ``--lonely-*`` options this row needs the plugin to know."""
        return [arg.split("=", 1)[0] for arg in self.pytest_args if arg.startswith("--lonely-")]


def make_rows(oci_image: Path | None, baseline: Path | None = None) -> dict[str, Row]:
    """Every row, in table order."""
    lonely = ("-p", "lonely", "--lonely-all")
    rows = [
        Row("plain", "plain pytest, pytest-lonely's interpreter (`-p no:lonely`)", ("-p", "no:lonely"), baseline=""),
        Row("forked-plain", f"plain pytest {b.PINNED_PYTEST}, pytest-forked's venv", (), baseline="", python=FORKED),
        Row(
            "forked",
            f"pytest-forked {b.FORKED_VERSION} (`-p pytest_forked --forked`)",
            ("-p", "pytest_forked", "--forked"),
            baseline="forked-plain",
            python=FORKED,
        ),
        Row("lonely", "pytest-lonely, a container per test (`--lonely-all`)", lonely),
        Row(
            "scope-class",
            "pytest-lonely, `--lonely-scope=class` (a container per 10 tests)",
            (*lonely, "--lonely-scope=class"),
        ),
        Row(
            "scope-module",
            "pytest-lonely, `--lonely-scope=module` (a container per 20 tests)",
            (*lonely, "--lonely-scope=module"),
        ),
        Row(
            "scope-session",
            "pytest-lonely, `--lonely-scope=session` (one container: a test inside a group)",
            (*lonely, "--lonely-scope=session"),
        ),
        Row(
            "rootfs",
            "pytest-lonely, `--lonely-rootfs fixtures/rootfs`",
            (*lonely, "--lonely-rootfs", str(b.REPO / "fixtures" / "rootfs")),
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
        # Off by default.
        Row("inprocess", "pytest-lonely loaded, nothing isolated (`-p lonely`)", ("-p", "lonely"), optional=True),
        Row(
            "prebuild-off",
            "pytest-lonely, every container forked from pytest (`PYTEST_LONELY_PREBUILD=0`)",
            lonely,
            optional=True,
            env=(("PYTEST_LONELY_PREBUILD", "0"),),
        ),
        Row(
            "hugepages-off",
            "pytest-lonely, no huge pages for pytest's heap (`PYTEST_LONELY_HUGEPAGES=0`)",
            lonely,
            optional=True,
            env=(("PYTEST_LONELY_HUGEPAGES", "0"),),
        ),
        Row(
            "memory",
            "pytest-lonely, cgroup `--lonely-memory 256M`",
            (*lonely, "--lonely-memory", "256M"),
            optional=True,
        ),
        Row("pids", "pytest-lonely, cgroup `--lonely-pids 64`", (*lonely, "--lonely-pids", "64"), optional=True),
        Row("cpus", "pytest-lonely, cgroup `--lonely-cpus 1`", (*lonely, "--lonely-cpus", "1"), optional=True),
        Row("privileged", "pytest-lonely, `--lonely-privileged`", (*lonely, "--lonely-privileged"), optional=True),
        Row(
            "base",
            f"pytest-lonely from `--baseline` ({baseline or 'DIR'}), a container per test (`--lonely-all`)",
            lonely,
            optional=True,
            python=BASE,
            unavailable=None if baseline else "n/a (no other checkout given: `--baseline DIR`)",
        ),
        Row(
            "oci",
            "pytest-lonely, OCI image rootfs (`--lonely-rootfs OCI_LAYOUT`)",
            (*lonely, "--lonely-rootfs", str(oci_image or "OCI_LAYOUT")),
            optional=True,
            unavailable=None if oci_image else "n/a (no OCI image layout given: `--oci-image DIR`)",
        ),
    ]
    return {row.name: row for row in rows}


def rows_help() -> str:
    """The rows for ``--help``: name, default or optional, what runs, against which baseline."""
    lines = ["rows (names for --only and --enable; a row's baseline is added automatically):"]
    for row in make_rows(None).values():
        env = " ".join(f"{k}={v}" for k, v in row.env)
        args = " ".join(row.pytest_args) or "(nothing)"
        where = {
            LONELY: "pytest-lonely's venv",
            FORKED: "pytest-forked's venv",
            ROOTLESS: f"uid {NOBODY}",
            BASE: "the --baseline checkout's venv",
        }[row.python]
        base = f"vs {row.baseline}" if row.baseline else "baseline"
        kind = "optional" if row.optional else "default"
        lines.append(f"  {row.name:<15} {kind:<8} {base:<20} {where}: {(env + ' ') if env else ''}pytest {args}")
    return "\n".join(lines)


def write_project(path: Path, sizes: Sequence[int], layout: str) -> None:
    """A project with a directory per size (``nN``): modules of 20 tests in two classes of 10, or one flat module."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "pytest.ini").write_text("[pytest]\n")  # pins the rootdir here
    for n in sizes:
        directory = path / f"n{n}"
        directory.mkdir()
        if layout == "flat":
            (directory / "test_m000.py").write_text(FLAT.replace("{n}", str(n)))
            continue
        for index in range(n // TESTS_PER_MODULE):
            (directory / f"test_m{index:03d}.py").write_text(MODULE)


_SITE_QUERY: Final = """\
import importlib.metadata, importlib.util, json, sys
required, optional = sys.argv[1].split(","), sys.argv[2].split(",")
owners = importlib.metadata.packages_distributions()
found, dists = [], set()
for name in required + optional:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        if name in required:
            print(json.dumps({"missing": name}))
            sys.exit(0)
        continue
    if spec.submodule_search_locations:
        found.append([name, next(iter(spec.submodule_search_locations)), True])
    else:
        found.append([name, spec.origin, False])
    dists.update(owners.get(name, ()))
meta = []
for dist_name in sorted(dists):
    dist = importlib.metadata.distribution(dist_name)
    meta.append([dist.metadata["Name"], dist.version, dist.read_text("METADATA"), dist.read_text("entry_points.txt")])
print(json.dumps({"modules": found, "dists": meta}))
"""


def build_rootless_python(where: Path, source_python: str) -> tuple[str | None, str | None]:
    """A venv of Debian's interpreter that uid 65534 can read, holding copies of ``source_python``'s packages.

    The pinned venv lives in root's home, which 65534 cannot read, so rootless
    mode gets a copy of the same pure-Python packages (the same pytest and
    pytest-lonely) with their metadata and entry points, so that ``-p lonely``
    finds the plugin by its entry-point name.
    """
    if os.geteuid() != 0:
        return None, f"needs root to switch to uid {NOBODY}"
    if shutil.which("setpriv") is None:
        return None, "setpriv not found"
    if not Path(SYSTEM_PYTHON).exists():
        return None, f"{SYSTEM_PYTHON} not found"
    query = subprocess.run(
        [source_python, "-I", "-c", _SITE_QUERY, ",".join(ROOTLESS_PACKAGES), ",".join(ROOTLESS_OPTIONAL)],
        capture_output=True,
        text=True,
        check=False,
        cwd=where,
    )
    try:
        site_info = json.loads(query.stdout)
    except json.JSONDecodeError:
        return None, f"could not list the packages of {source_python}: {query.stderr.strip()[-200:]}"
    if "missing" in site_info:
        return None, f"{site_info['missing']} is not importable from {source_python}"
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
    for name, source, is_package in site_info["modules"]:
        if is_package:
            shutil.copytree(source, site / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, site)
    for dist_name, version, metadata, entry_points in site_info["dists"]:
        info = site / f"{dist_name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        for filename, text in (("METADATA", metadata), ("entry_points.txt", entry_points)):
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
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *row.pytest_args, f"n{n}"]
    if row.python == ROOTLESS:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return command


def problem_in(result: dict[str, Any], n: int, cwd: Path) -> str | None:
    """None if all ``n`` tests passed and nothing outlived pytest, else the first reason, shortened.

    Only the reason (not the test id or the counts) is kept, so that the same
    failure in the big and the small run is noted once.
    """
    if result.get("lingering"):
        return f"{result['lingering']} process(es) still alive {b.ORPHAN_WAIT:g} s after pytest ended"
    output = result.get("output", "")
    passed = re.search(r"(\d+) passed", output)
    if passed and int(passed.group(1)) == n and not re.search(r"\d+ (failed|errors?)\b", output):
        return None
    lines = [line.strip().replace(f"{cwd}/", "") for line in output.splitlines() if line.strip()]
    first = next((line for line in lines if line.startswith(("FAILED", "ERROR", "E "))), "")
    reason = first.split(" - ", 1)[-1] if first else (lines[-1] if lines else "no output")
    reason = re.sub(r"\bn\d+/test_m\d+\.py\S*\s*", "", reason)
    return reason if len(reason) <= 160 else reason[:157] + "..."


def per_round(row: Row, tests: int, key: str) -> dict[int, float]:
    """Marginal cost per test in each round: (x(N) - x(N0)) / (N - N0), in ms (faults: per test)."""
    by_round: dict[int, dict[int, float]] = {}
    for run in row.runs:
        by_round.setdefault(run["round"], {})[run["n"]] = run[key]
    scale = METRICS[key]
    return {
        r: (values[tests] - values[N0]) * scale / (tests - N0)
        for r, values in sorted(by_round.items())
        if tests in values and N0 in values
    }


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
        b.run_measured(pytest_command(row, N0, python), cwd, {**env, **dict(row.env)}, RUN_TIMEOUT)
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
                result = b.run_measured(pytest_command(row, n, python), cwd, env, RUN_TIMEOUT)
                problem = problem_in(result, n, cwd)
                if problem and problem not in row.problems:
                    row.problems.append(problem)
                result["cpuk"] = result["cpu"] + result["kthreads"]
                row.runs.append({"round": round_no, "n": n, **{k: v for k, v in result.items() if k != "output"}})


class Results:
    """Per-round marginal costs of every measured row, and the overheads and ratios made of them."""

    def __init__(self, rows: dict[str, Row], chosen: list[str], tests: int) -> None:
        self.rows = rows
        self.chosen = chosen
        self.samples = {(name, key): per_round(rows[name], tests, key) for name in chosen for key in METRICS}

    def median(self, name: str, key: str) -> float | None:
        return b.median(list(self.samples[name, key].values()))

    def over_rounds(self, name: str, key: str) -> dict[int, float]:
        """The row's overhead over its baseline in each round (same round, so drift cancels)."""
        base = self.rows[name].baseline
        if not base:
            return {}
        mine, theirs = self.samples[name, key], self.samples.get((base, key), {})
        return {r: mine[r] - theirs[r] for r in mine if r in theirs}

    def overhead(self, name: str, key: str) -> float | None:
        """Median ms/test of the row minus its baseline's median."""
        base = self.rows[name].baseline
        mine = self.median(name, key)
        theirs = self.median(base, key) if base and (base, key) in self.samples else None
        return None if mine is None or theirs is None else mine - theirs

    def ratio(self, name: str, key: str) -> float | None:
        """The row's overhead over pytest-forked's (ratio of the medians)."""
        if name == "forked" or "forked" not in self.chosen:
            return None
        mine, forked = self.overhead(name, key), self.overhead("forked", key)
        return None if mine is None or forked is None or forked <= 0 else mine / forked

    def round_ratios(self, name: str, key: str) -> list[float]:
        """The row's overhead over pytest-forked's, round by round."""
        if "forked" not in self.chosen:
            return []
        mine, forked = self.over_rounds(name, key), self.over_rounds("forked", key)
        return [mine[r] / forked[r] for r in mine if r in forked and forked[r] > 0]


def table(res: Results, tests: int) -> list[str]:
    """The Markdown table; a row's overhead is against its own baseline row, each ratio against pytest-forked's."""
    lines = [
        "| row | wall ms/test | wall over own plain | ÷ forked's | CPU ms/test | CPU over own plain | ÷ forked's "
        "| CPU + kthreads over own plain | ÷ forked's | machine over own plain | ÷ forked's | minor faults/test "
        "| peak RSS MB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in res.chosen:
        row = res.rows[name]
        notes: list[str] = []
        if row.unavailable:
            notes.append(row.unavailable if row.unavailable.startswith("n/a") else f"not run: {row.unavailable}")
        if not row.baseline:
            notes.append("baseline")
        elif row.baseline != "plain":
            notes.append(f"vs `{row.baseline}`")
        if row.problems:
            lead = "tests did not pass or processes outlived pytest; timings include that"
            notes.append(f"{lead}: {'; '.join(row.problems[:2])}".replace("|", "\\|"))
        big = [run["maxrss_kb"] for run in row.runs if run["n"] == tests]
        rss = b.median(big)
        cells = [row.title, b.fmt(res.median(name, "wall"), ".3f")]
        cells += [b.fmt(res.overhead(name, "wall"), "+.3f"), b.fmt(res.ratio(name, "wall"), ".2f")]
        cells += [b.fmt(res.median(name, "cpu"), ".3f")]
        for key in ("cpu", "cpuk", "machine"):
            cells += [b.fmt(res.overhead(name, key), "+.3f"), b.fmt(res.ratio(name, key), ".2f")]
        cells += [b.fmt(res.median(name, "minflt"), ".0f"), b.fmt(None if rss is None else rss / 1024, ".0f")]
        cells.append(" ".join(notes))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def decide(values: list[float], limit: float) -> str:
    """met / NOT met / undecided, from the middle half of per-round values against the limit."""
    spread = b.quartiles(values)
    if spread is None:
        return "not measured"
    low, high = spread
    if high <= limit:
        return "met"
    if low > limit:
        return "NOT met"
    return "undecided (the middle half of the rounds straddles the goal: more rounds, or a quieter machine)"


def summary(res: Results) -> list[str]:
    """The goals of issues 23 and 21, each from the rows it needs, with the spread over rounds."""
    lines: list[str] = []
    names = {"cpu": "CPU (rusage)", "cpuk": "CPU + kernel threads", "machine": "whole machine", "wall": "wall"}

    def ratio_line(key: str, goal: float | None) -> str:
        values = res.round_ratios("lonely", key)
        spread = b.quartiles(values)
        mine, forked = res.overhead("lonely", key), res.overhead("forked", key)
        text = (
            f"- {names[key]}: **{b.fmt(res.ratio('lonely', key), '.2f')}** ({b.fmt(mine, '.3f')} / "
            f"{b.fmt(forked, '.3f')} ms per test); per round: median {b.fmt(b.median(values), '.2f')}, middle half "
            f"{b.fmt(spread[0] if spread else None, '.2f')}..{b.fmt(spread[1] if spread else None, '.2f')}"
        )
        if goal is not None:
            text += f"; goal ≤ {goal}: {decide(values, goal)}"
        return text

    if "lonely" in res.chosen and "forked" in res.chosen:
        lines.append("pytest-lonely (`lonely`) overhead ÷ pytest-forked's, each over its own plain pytest (issue 23):")
        lines.append(ratio_line("cpu", GOAL_CPU))
        lines.append(ratio_line("cpuk", None))
        lines.append(ratio_line("machine", None))
        lines.append(ratio_line("wall", GOAL_WALL))
    else:
        lines.append("pytest-lonely / pytest-forked ratios: — (need both the `lonely` and the `forked` rows)")
    if "base" in res.chosen and "lonely" in res.chosen:
        lines.append("")
        lines.append("This checkout (`lonely`) minus the `--baseline` checkout (`base`), over plain, round by round:")
        for key in ("cpu", "cpuk", "wall"):
            mine, base = res.over_rounds("lonely", key), res.over_rounds("base", key)
            values = [mine[r] - base[r] for r in mine if r in base]
            spread = b.quartiles(values)
            lines.append(
                f"- {names[key]}: median **{b.fmt(b.median(values), '+.3f')} ms** per test; middle half "
                f"{b.fmt(spread[0] if spread else None, '+.3f')}..{b.fmt(spread[1] if spread else None, '+.3f')}; "
                f"this checkout cheaper in {sum(v < 0 for v in values)} of {len(values)} rounds"
            )
    if "scope-session" in res.chosen:
        lines.append("")
        lines.append(
            f"A test inside a group (`scope-session`: one container in both runs, so its cost cancels), over plain "
            f"pytest (issue 21: ≤ {GOAL_IN_GROUP_MS} ms):"
        )
        for key in ("wall", "cpu", "cpuk"):
            values = list(res.over_rounds("scope-session", key).values())
            spread = b.quartiles(values)
            lines.append(
                f"- {names[key]}: **{b.fmt(res.overhead('scope-session', key), '+.3f')} ms** per test; per round "
                f"middle half {b.fmt(spread[0] if spread else None, '+.3f')}.."
                f"{b.fmt(spread[1] if spread else None, '+.3f')}; {decide(values, GOAL_IN_GROUP_MS)}"
            )
    if "scope-class" in res.chosen and "scope-module" in res.chosen:
        cls, mod = res.overhead("scope-class", "cpu"), res.overhead("scope-module", "cpu")
        if cls is not None and mod is not None:
            lines.append(
                f"- cross-check from the class and module rows (CPU; noisy: a difference times 20): a container "
                f"≈ {20 * (cls - mod):.2f} ms, a test inside it ≈ {2 * mod - cls:+.3f} ms"
            )
    return lines


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
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=rows_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--tests",
        type=int,
        default=DEFAULT_TESTS,
        help=f"tests in the big run, a multiple of {TESTS_PER_MODULE} (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help=f"interleaved rounds (default: {DEFAULT_ROUNDS}; 2 with --quick)"
    )
    parser.add_argument(
        "--layout",
        choices=("grouped", "flat"),
        default="grouped",
        help="grouped (default): modules of 20 tests, each two classes of 10; flat: one module, one parametrized "
        "function (the layout before issue 21; then scope-class is a container per test, scope-module one container)",
    )
    parser.add_argument("--quick", action="store_true", help="2 rounds: proves the rows run; decides nothing")
    parser.add_argument("--only", nargs="+", default=[], metavar="ROW", help="run only these rows (see below)")
    parser.add_argument("--enable", nargs="+", default=[], metavar="ROW", help="add optional rows (see below)")
    parser.add_argument("--oci-image", type=Path, metavar="DIR", help="an OCI image layout for the `oci` row")
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="another checkout of pytest-lonely (`git worktree add /tmp/base COMMIT`): enables the `base` row, that "
        f"checkout on pytest {b.PINNED_PYTEST} in a venv of its own, paired round by round with `lonely`",
    )
    parser.add_argument(
        "--here",
        action="store_true",
        help="run the pytest-lonely rows on this interpreter and its pytest, not on pytest "
        f"{b.PINNED_PYTEST} in a venv of their own (then not like for like with pytest-forked)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=b.cache_dir(), help="where the pinned venvs are kept (default: %(default)s)"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    tests = args.tests
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else DEFAULT_ROUNDS)
    if tests <= N0 or tests % TESTS_PER_MODULE:
        parser.error(
            f"--tests must be a multiple of {TESTS_PER_MODULE} above {N0}, got {tests}: the tests come in modules "
            f"of {TESTS_PER_MODULE}, and the per-test cost is the difference to a {N0}-test run"
        )
    if rounds < 1:
        parser.error(f"--rounds must be at least 1, got {rounds}")
    if args.oci_image is not None and not args.oci_image.is_dir():
        parser.error(f"--oci-image {str(args.oci_image)!r}: not a directory (an OCI image layout is a directory)")
    if args.baseline is not None and not (args.baseline / "pytest_lonely" / "plugin.py").is_file():
        parser.error(f"--baseline {str(args.baseline)!r}: not a pytest-lonely checkout (no pytest_lonely/plugin.py)")
    rows = make_rows(
        args.oci_image.resolve() if args.oci_image else None, args.baseline.resolve() if args.baseline else None
    )
    chosen = choose(parser, rows, args.only, args.enable + (["base"] if args.baseline else []))

    load_before = b.loadavg()
    command_line = shlex.join([sys.executable, *sys.argv])
    versions: dict[str, str] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="lonely-bench-") as tmp:
        project = Path(tmp) / "project"
        write_project(project, (tests, N0), args.layout)
        env = b.clean_env()
        contexts: dict[str, tuple[str, Path, dict[str, str]]] = {}
        why_not: dict[str, str] = {}
        wanted = {rows[name].python for name in chosen}
        if args.here:
            contexts[LONELY] = (sys.executable, project, env)
        else:
            python, why = b.lonely_venv(args.cache_dir)
            if python is None:
                why_not[LONELY] = why or "?"
            else:
                contexts[LONELY] = (python, project, env)
                gaps = b.wheel_gaps(python)
                if gaps:
                    notes.append(
                        f"the wheel built from this checkout leaves out {len(gaps)} source file(s) "
                        f"({', '.join(gaps[:3])}{', ...' if len(gaps) > 3 else ''}): copied into the venv from the "
                        "sources, so that what is measured is the checkout"
                    )
        if BASE in wanted and args.baseline is not None:
            python, why = b.lonely_venv(args.cache_dir, args.baseline.resolve())
            if python is None:
                why_not[BASE] = why or "?"
            else:
                contexts[BASE] = (python, project, env)
        if FORKED in wanted:
            python, why = b.forked_venv(args.cache_dir)
            if python is None:
                why_not[FORKED] = why or "?"
            else:
                contexts[FORKED] = (python, project, env)
        if ROOTLESS in wanted:
            if LONELY not in contexts:
                why_not[ROOTLESS] = why_not[LONELY]
            else:
                rootless_dir = Path(tmp) / "rootless"
                rootless_dir.mkdir()
                python, why = build_rootless_python(rootless_dir, contexts[LONELY][0])
                if python is None:
                    why_not[ROOTLESS] = why or "?"
                else:
                    rootless_project = rootless_dir / "project"
                    write_project(rootless_project, (tests, N0), args.layout)
                    for root, _, filenames in os.walk(rootless_project):  # 65534 may cache its assertion rewrites
                        os.chown(root, NOBODY, NOBODY)
                        for filename in filenames:
                            os.chown(os.path.join(root, filename), NOBODY, NOBODY)
                    os.chmod(Path(tmp), 0o755)
                    contexts[ROOTLESS] = (python, rootless_project, b.clean_env(HOME=str(rootless_project)))
        for kind, (python, _, _) in contexts.items():
            versions[kind] = f"{b.version_of(python, 'pytest')} ({python})"
        help_text = supported_options(*contexts[LONELY]) if LONELY in contexts else None
        for name in chosen:
            row = rows[name]
            if row.python in why_not:
                row.unavailable = why_not[row.python]
                continue
            if row.unavailable is not None or help_text is None:
                continue
            missing = [option for option in row.lonely_options if option not in help_text]
            switches = [key for key, _ in row.env if key.startswith("PYTEST_LONELY_")]
            missing += [key for key in switches if not b.package_knows(contexts[row.python][0], key)]
            if missing:
                row.unavailable = f"{NOT_SUPPORTED}: {', '.join(missing)}"
        runnable = [rows[name] for name in chosen if not rows[name].unavailable]
        measure(runnable, tests, rounds, contexts)
        commands = {
            name: " ".join(f"{k}={v}" for k, v in rows[name].env)
            + (" " if rows[name].env else "")
            + shlex.join(pytest_command(rows[name], tests, contexts[rows[name].python][0]))
            for name in chosen
            if rows[name].python in contexts and not rows[name].unavailable
        }

    pytest_versions = ", ".join(f"{kind}: {v}" for kind, v in versions.items())
    print(b.machine_line(load_before, pytest_versions))
    print(f"command: `{command_line}`")
    print(
        f"per test = (x({tests} tests) - x({N0} tests)) / {tests - N0}, median of {rounds} interleaved round(s), for "
        "x = wall time; CPU = getrusage(RUSAGE_CHILDREN) of a fresh subreaper wrapper (pytest and every process "
        "it reaped: containers, zygotes, the keeper); kthreads = CPU of all kernel threads; machine = /proc/stat "
        "user+nice+system+irq+softirq of the whole machine (includes other people's work); ÷ forked's = the row's "
        f"overhead over pytest-forked's, each over its own plain run; tests: {LAYOUTS[args.layout]}; peak RSS = "
        "median ru_maxrss of the big runs"
    )
    for note in notes:
        print(f"note: {note}")
    print()
    res = Results(rows, chosen, tests)
    for line in table(res, tests):
        print(line)
    print()
    troubled = [name for name in chosen if rows[name].problems]
    if troubled:
        print(f"**not every run was clean** (rows {', '.join(troubled)}): their numbers are not what the row says")
        for name in troubled:
            for problem in rows[name].problems:
                print(f"- {name}: {problem}")
        print()
    for line in summary(res):
        print(line)
    print()
    print("pytest commands (in a temporary project dir; PYTEST_DISABLE_PLUGIN_AUTOLOAD=1):")
    for name, command in commands.items():
        print(f"- {name}: `{command}`")

    if args.json:
        raw = {
            "command": command_line,
            "pytest": versions,
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
                    "per_test": {key: res.samples[name, key] for key in METRICS},
                    "overhead_ms": {key: res.overhead(name, key) for key in METRICS},
                    "ratio_to_forked": {key: res.ratio(name, key) for key in METRICS},
                    "runs": rows[name].runs,
                }
                for name in chosen
            },
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
