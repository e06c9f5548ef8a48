"""Per-test cost of pytest-lonely's isolation, measured on whole pytest processes.

Why whole processes: what a user pays is the wall time of ``pytest``, and the
isolation cost lives partly outside any one test (the plan is built once, the
dying container is reaped later, the kernel tears namespaces down in the
background).  Timing only the test body would miss all of that.

Why two sizes: a pytest process has a large fixed cost (interpreter start,
plugin loading, collection) that would swamp a per-test number.  Each round
runs every variant with ``N`` tests and with ``N0`` tests; the fixed cost is
the same in both, so ``(wall(N) - wall(N0)) / (N - N0)`` is the marginal cost
of one more test.  The median over rounds is reported.

Why interleaved, shuffled rounds: the machine's speed drifts (other load,
thermal limits, page cache).  Running every variant once per round, in a new
random order each round, spreads the drift over all variants instead of
charging it to whichever happened to run last.

Only the standard library is used, so the script runs in any environment
that can run pytest-lonely itself (``tox -e bench``).
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
NOBODY: Final = 65534
SYSTEM_PYTHON: Final = "/usr/bin/python3"
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

#: Spawned fresh for every measured run, so that RUSAGE_CHILDREN covers exactly one pytest
#: process (and the children it waited for).  The wall time is taken here too, around the
#: pytest process alone, so the wrapper's own start-up is not in it.
WRAPPER: Final = """\
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"wall": wall, "rc": proc.returncode, "maxrss_kb": rss, "output": proc.stdout[-4000:]}))
"""

TEST_FILE: Final = """\
import pytest


@pytest.mark.parametrize("i", range({n}))
def test_x(i):
    pass
"""


@dataclasses.dataclass
class Variant:
    """One way of running the same tests; ``baseline`` names the variant its overhead is measured against."""

    name: str
    title: str
    pytest_args: tuple[str, ...]
    baseline: str = "inprocess"
    rootless: bool = False
    unavailable: str | None = None  # why the row cannot be measured here
    expect_failures: bool = False  # measured anyway, but the tests are known not to pass
    env: tuple[tuple[str, str], ...] = ()  # extra environment for this variant's pytest
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)


def make_variants() -> dict[str, Variant]:
    """Every variant, in table order."""
    rootfs = REPO / "fixtures" / "rootfs"
    variants = [
        Variant("inprocess", "in-process (`-p lonely`, nothing isolated)", ("-p", "lonely"), baseline=""),
        Variant("isolated", "isolated, default root (`--lonely-all`)", ("-p", "lonely", "--lonely-all")),
        Variant(
            "isolated-inline",
            "isolated, default root, namespaces built in the child (`PYTEST_LONELY_PREBUILD=0`)",
            ("-p", "lonely", "--lonely-all"),
            env=(("PYTEST_LONELY_PREBUILD", "0"),),
        ),
        Variant(
            "rootfs",
            "isolated, `--lonely-rootfs fixtures/rootfs`",
            ("-p", "lonely", "--lonely-all", "--lonely-rootfs", str(rootfs)),
        ),
        Variant(
            "network",
            "isolated, `--lonely-network none`",
            ("-p", "lonely", "--lonely-all", "--lonely-network", "none"),
        ),
        Variant(
            "rootless-inprocess",
            f"in-process, uid {NOBODY}, {SYSTEM_PYTHON} (baseline for rootless)",
            ("-p", "lonely"),
            baseline="",
            rootless=True,
        ),
        Variant(
            "rootless",
            f"isolated, rootless (uid {NOBODY}, `--lonely-all`)",
            ("-p", "lonely", "--lonely-all"),
            baseline="rootless-inprocess",
            rootless=True,
        ),
        Variant(
            "forked", "pytest-forked (`-p no:lonely --forked`)", ("-p", "no:lonely", "-p", "pytest_forked", "--forked")
        ),
        Variant("plain", "plain pytest (`-p no:lonely`)", ("-p", "no:lonely")),
    ]
    return {v.name: v for v in variants}


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for pytest: no inherited pytest options, no auto-loaded plugins.

    Auto-loading is off so that every variant loads exactly the plugins its
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


def pytest_command(variant: Variant, n: int, python: str) -> list[str]:
    """The pytest command line; ``setpriv`` execs, so the rootless pytest is still the wrapper's direct child."""
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *variant.pytest_args, f"test_n{n}.py"]
    if variant.rootless:
        command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *command]
    return command


def run_once(command: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """One pytest process under a fresh wrapper; returns wall seconds, exit code, peak RSS and output tail."""
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


def per_test_ms(variant: Variant, tests: int) -> list[float]:
    """Marginal ms per test in each round: (wall(N) - wall(N0)) / (N - N0)."""
    by_round: dict[int, dict[int, float]] = {}
    for run in variant.runs:
        by_round.setdefault(run["round"], {})[run["n"]] = run["wall"]
    return [
        (walls[tests] - walls[N0]) * 1000 / (tests - N0)
        for _, walls in sorted(by_round.items())
        if tests in walls and N0 in walls
    ]


def measure(
    variants: list[Variant], tests: int, rounds: int, contexts: dict[bool, tuple[str, Path, dict[str, str]]]
) -> None:
    """Warm up every variant once, then run the interleaved, shuffled rounds."""
    rng = random.Random()
    for variant in variants:  # warm-up: byte-code caches, page cache, the plugin's first probe
        python, cwd, env = contexts[variant.rootless]
        run_once(pytest_command(variant, N0, python), cwd, {**env, **dict(variant.env)})
    for round_no in range(rounds):
        order = variants[:]
        rng.shuffle(order)
        print(f"round {round_no + 1}/{rounds}: {', '.join(v.name for v in order)}", file=sys.stderr, flush=True)
        for variant in order:
            python, cwd, env = contexts[variant.rootless]
            env = {**env, **dict(variant.env)}
            sizes = [tests, N0]
            rng.shuffle(sizes)
            for n in sizes:
                result = run_once(pytest_command(variant, n, python), cwd, env)
                problem = problem_in(result["output"], n, cwd)
                if problem and problem not in variant.problems:
                    variant.problems.append(problem)
                variant.runs.append(
                    {
                        "round": round_no,
                        "n": n,
                        "wall": result["wall"],
                        "rc": result["rc"],
                        "maxrss_kb": result["maxrss_kb"],
                    }
                )


def fmt(value: float | None, spec: str) -> str:
    """A table cell: a missing number shows as a dash rather than breaking the row."""
    return "—" if value is None else format(value, spec)


def table(variants: dict[str, Variant], chosen: list[str], tests: int) -> list[str]:
    """The Markdown table; a row's overhead and ratio are against its own baseline variant."""
    medians = {
        name: statistics.median(samples)
        for name, v in variants.items()
        if (samples := per_test_ms(v, tests)) and name in chosen
    }
    lines = [
        "| variant | median ms/test | min, max over rounds | overhead ms over in-process | ratio to in-process "
        "| peak RSS MB | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name in chosen:
        v = variants[name]
        notes: list[str] = []
        median = medians.get(name)
        overhead = ratio = None
        if v.unavailable:
            notes.append(f"not run: {v.unavailable}")
        if not v.baseline:
            notes.append("baseline")
        elif median is not None and v.baseline in medians:
            overhead = median - medians[v.baseline]
            ratio = median / medians[v.baseline] if medians[v.baseline] > 0 and median > 0 else None
            if v.baseline != "inprocess":
                notes.append(f"vs `{v.baseline}` (same interpreter and uid)")
        samples = per_test_ms(v, tests)
        spread = f"{min(samples):.3f}, {max(samples):.3f}" if samples else "—"
        big = [run["maxrss_kb"] for run in v.runs if run["n"] == tests]
        rss = statistics.median(big) / 1024 if big else None
        if v.problems:
            lead = "tests did not pass, timings include failure reporting"
            notes.append(f"{lead}: {'; '.join(v.problems[:2])}".replace("|", "\\|"))
        lines.append(
            f"| {v.title} | {fmt(median, '.3f')} | {spread} | {fmt(overhead, '+.3f')} | {fmt(ratio, '.1f')} "
            f"| {fmt(rss, '.0f')} | {' '.join(notes)} |"
        )
    return lines


def machine() -> dict[str, str]:
    """What the numbers depend on, for the header."""
    try:
        pytest_version = importlib.metadata.version("pytest")
    except importlib.metadata.PackageNotFoundError:
        pytest_version = "?"
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return {
        "nproc": str(len(os.sched_getaffinity(0))),
        "kernel": platform.release(),
        "python": f"{platform.python_version()} ({sys.executable})",
        "pytest": pytest_version,
        "loadavg": load,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse options, prepare the projects (and the rootless interpreter), measure, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--tests", type=int, default=300, help="tests in the big run (default: 300)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    variants = make_variants()
    parser.add_argument(
        "--only", metavar="VARIANT[,VARIANT]", help=f"run only these (baselines are added): {', '.join(variants)}"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.tests <= N0:
        parser.error(f"--tests must be more than {N0}: the per-test time is the difference to a {N0}-test run")
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    chosen = list(variants)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        unknown = wanted - set(variants)
        if unknown:
            parser.error(f"unknown variant(s) {', '.join(sorted(unknown))}; known: {', '.join(variants)}")
        wanted |= {variants[name].baseline for name in wanted if variants[name].baseline}
        chosen = [name for name in variants if name in wanted]

    info = machine()
    command_line = shlex.join([sys.executable, *sys.argv])
    forked_check = subprocess.run(
        [sys.executable, "-c", "import pytest_forked"], capture_output=True, text=True, check=False
    )
    if forked_check.returncode:
        variants["forked"].unavailable = "pytest-forked is not installed (`pip install pytest-forked`)"

    with tempfile.TemporaryDirectory(prefix="lonely-bench-") as tmp:
        root_project = Path(tmp) / "project"
        write_project(root_project, (args.tests, N0))
        contexts: dict[bool, tuple[str, Path, dict[str, str]]] = {False: (sys.executable, root_project, clean_env())}
        if any(variants[name].rootless for name in chosen):
            rootless_dir = Path(tmp) / "rootless"
            rootless_dir.mkdir()
            python, why = build_rootless_python(rootless_dir)
            if python is None:
                for name in chosen:
                    if variants[name].rootless:
                        variants[name].unavailable = why
            else:
                project = rootless_dir / "project"
                write_project(project, (args.tests, N0))
                for root, _, filenames in os.walk(project):  # 65534 may then cache its assertion rewrites
                    os.chown(root, NOBODY, NOBODY)
                    for filename in filenames:
                        os.chown(os.path.join(root, filename), NOBODY, NOBODY)
                os.chmod(Path(tmp), 0o755)
                contexts[True] = (python, project, clean_env(HOME=str(project)))
        runnable = [variants[name] for name in chosen if not variants[name].unavailable]
        measure(runnable, args.tests, args.rounds, contexts)
        commands = {
            name: shlex.join(pytest_command(variants[name], args.tests, contexts[variants[name].rootless][0]))
            for name in chosen
            if variants[name].rootless in contexts
        }

    info["loadavg after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"machine: nproc {info['nproc']}, kernel {info['kernel']}, python {info['python']}, pytest {info['pytest']}, "
        f"load average {info['loadavg']} before / {info['loadavg after']} after"
    )
    print(f"command: `{command_line}`")
    print(
        f"per-test time = (wall({args.tests} tests) - wall({N0} tests)) / {args.tests - N0}, median of "
        f"{args.rounds} round(s); peak RSS = median ru_maxrss of the {args.tests}-test pytest process"
    )
    print()
    for line in table(variants, chosen, args.tests):
        print(line)
    print()
    print("pytest commands (run in a temporary project dir; PYTEST_DISABLE_PLUGIN_AUTOLOAD=1):")
    for name, command in commands.items():
        print(f"- {name}: `{command}`")

    if args.json:
        raw = {
            "machine": info,
            "command": command_line,
            "tests": args.tests,
            "n0": N0,
            "rounds": args.rounds,
            "variants": {
                name: {
                    "title": variants[name].title,
                    "baseline": variants[name].baseline,
                    "command": commands.get(name),
                    "unavailable": variants[name].unavailable,
                    "problems": variants[name].problems,
                    "per_test_ms": per_test_ms(variants[name], args.tests),
                    "runs": variants[name].runs,
                }
                for name in chosen
            },
        }
        args.json.write_text(json.dumps(raw, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
