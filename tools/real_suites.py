#!/usr/bin/env python3
"""Run third-party test suites plain and under ``--lonely-all``, and compare every test's outcome.

Why: "isolate every test" (and "one container per module") is only a promise if
suites written without pytest-lonely in mind give the same outcome for every
test inside containers as in-process.  Our own tests cannot show that: they were
written for the plugin.  Real suites spawn processes, open terminals, set
signal handlers, keep module- and session-scoped fixtures, and find what the
plugin changes that nobody thought of.

How: for each suite of :data:`SUITES` the pinned sdist is downloaded from PyPI,
unpacked, and installed with its test dependencies and pytest-lonely (built
once per invocation from ``--checkout``) into a venv of its own under the cache
directory.  The suite then runs once per mode (:data:`MODES`), each time in a
fresh copy of the unpacked sdist at the same path (so that one mode's writes
never reach the next), with ``-p no:cacheprovider -p no:randomly``,
``PYTHONHASHSEED=0`` and ``--junitxml``.  Each run is the child of a small
wrapper that is a child subreaper: the CPU column counts every process the run
made (pytest-lonely's keeper is double-forked, not pytest's child), and a
process still alive after pytest ended is reported and killed by its PID.

junitxml alone cannot tell an XPASS from a pass, nor name a test by its node
id, so a ten-line plugin (:data:`TAGGER`, loaded with ``-p``) adds both as
properties of each ``<testcase>``, from the reports pytest's own process
receives (in-process or from a container alike).

A difference that is understood (a limit or a bug of pytest-lonely, with its
reproducer in tools/README.md) is listed in the suite's ``known`` and reported
apart; any other is new.  Only the standard library is used; everything a suite
needs is pip-installed into its venv.  Prints Markdown; the exit code is 1 if a
test's outcome differs between the modes for a reason not known, 2 if a suite
could not be set up or run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Known:
    """A difference that is understood: a limit or a bug of pytest-lonely, with a reproducer in tools/README.md.

    Still reported, but apart, and it does not make the exit code 1: the
    table stays a regression check.  A known difference no longer seen is
    reported too, so that the entry goes once the cause is fixed.
    """

    #: The modes in which the outcome differs from plain.
    modes: tuple[str, ...]
    reason: str
    #: False: deselected in those modes, because it would hang there.
    run: bool = True


@dataclasses.dataclass(frozen=True)
class Suite:
    """One third-party suite: what to download, install and run."""

    name: str
    version: str
    #: Test dependencies, pip requirement strings (the suite's own dependencies come with it).
    deps: tuple[str, ...]
    #: Test paths, relative to the unpacked sdist (the run's working directory and rootdir).
    paths: tuple[str, ...]
    #: Extra pytest arguments, for every mode.
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Node id -> why it is deselected (``--deselect``) in every mode: it fails or is flaky in plain runs too.
    deselect: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Node ids of tests that take 5 s or more, mostly waiting for a timeout: deselected unless ``--full``.
    slow: tuple[str, ...] = ()
    #: Globs of fixed paths (outside ``$TMPDIR``) where the suite leaves files in plain runs: what a run
    #: created or changed there is removed after it.
    litter: tuple[str, ...] = ()
    #: How the suite's selection was narrowed, other than by :attr:`deselect`, and why.
    notes: tuple[str, ...] = ()
    #: Node id, or a prefix of node ids (a file, a class) -> a difference understood.
    known: Mapping[str, Known] = dataclasses.field(default_factory=dict)
    #: Why this suite is in the table: what it exercises.
    why: str = ""

    def known_for(self, test_id: str) -> tuple[str, Known] | None:
        for prefix, known in self.known.items():
            if test_id.startswith(prefix):
                return prefix, known
        return None


#: The suites.  Pins are exact so that a difference between two runs of this
#: script is a difference of pytest-lonely; update them together with the
#: deselect lists.
SUITES: Final[tuple[Suite, ...]] = (
    Suite(
        name="pexpect",
        version="4.9.0",
        deps=("pytest",),
        paths=("tests",),
        deselect={
            "tests/test_replwrap.py::REPLWrapTestCase::test_existing_spawn": "fails in plain runs too: this "
            "machine's bash prints the bracketed-paste sequence `ESC[?2004l` the test does not expect",
            "tests/test_replwrap.py::REPLWrapTestCase::test_zsh": "fails in plain runs too: no `zsh` on this machine",
        },
        slow=(
            "tests/test_pxssh.py::PxsshTestCase::test_login_zsh",
            "tests/test_ctrl_chars.py::TestCtrlChars::test_control_chars",
            "tests/test_socket_fd.py::ExpectTestCase::test_interrupt",
            "tests/test_socket.py::ExpectTestCase::test_interrupt",
            "tests/test_pxssh.py::PxsshTestCase::test_login_tcsh",
            "tests/test_destructor.py::TestCaseDestructor::test_destructor",
            "tests/test_expect.py::ExpectTestCase::test_waitnoecho_order",
            "tests/test_socket_fd.py::ExpectTestCase::test_multiple_interrupts",
            "tests/test_socket.py::ExpectTestCase::test_timeout",
            "tests/test_socket.py::ExpectTestCase::test_multiple_interrupts",
            "tests/test_socket_fd.py::ExpectTestCase::test_timeout",
            "tests/test_expect.py::ExpectTestCase::test_increasing_searchwindowsize",
            "tests/test_performance.py::PerformanceTestCase::test_large_stdout_stream",
            "tests/test_expect.py::ExpectTestCase::test_before_after_timeout",
            "tests/test_run.py::RunFuncTestCase::test_run_callback",
            "tests/test_run.py::RunUnicodeFuncTestCase::test_run_callback",
            "tests/test_expect.py::ExpectTestCase::test_expect_timeout",
            "tests/test_timeout_pattern.py::Exp_TimeoutTestCase::test_pattern_printout",
            "tests/test_timeout_pattern.py::Exp_TimeoutTestCase::test_stacktraceMunging",
            "tests/test_popen_spawn.py::ExpectTestCase::test_expect_timeout",
        ),
        why="spawns children on pseudo-terminals: job control, signals, `SIGWINCH`, `waitpid`, `pxssh` over a fake ssh",
    ),
    Suite(
        name="sh",
        version="2.4.0",
        deps=("pytest",),
        paths=("tests",),
        deselect={
            "tests/sh_test.py::FunctionalTests::test_custom_timeout_signal": "fails at random in plain runs too "
            "(`0 != SIGHUP`: a race between the timeout and the child's exit on a loaded machine)",
        },
        slow=(
            "tests/sh_test.py::FunctionalTests::test_general_signal",
            "tests/sh_test.py::FunctionalTests::test_timeout_race_condition_process_exit",
            "tests/sh_test.py::FunctionalTests::test_bad_sig_raise_exception",
            "tests/sh_test.py::FunctionalTests::test_ok_code_ignores_bad_sig_exception",
            "tests/sh_test.py::FunctionalTests::test_grandchild_no_sighup",
        ),
        why="spawns thousands of processes with pipes and ttys: process groups, sessions, signals, background jobs",
    ),
    Suite(
        name="supervisor",
        version="4.3.0",
        deps=("pytest", "pexpect"),
        paths=("supervisor/tests",),
        env={"END_TO_END": "1"},
        deselect={
            "supervisor/tests/test_end_to_end.py::EndToEndTests::test_issue_565": "fails in plain runs too "
            "(a 30 s timeout): its `fixtures/hello.sh` is missing from the sdist",
        },
        slow=(
            "supervisor/tests/test_end_to_end.py::EndToEndTests::test_issue_663",
            "supervisor/tests/test_end_to_end.py::EndToEndTests::test_issue_836",
            "supervisor/tests/test_end_to_end.py::EndToEndTests::test_issue_1418_pidproxy_cmd_with_args",
            "supervisor/tests/test_end_to_end.py::EndToEndTests::test_issue_1418_pidproxy_cmd_with_no_args",
        ),
        litter=("/tmp/issue-*", "/tmp/donothing.*", "/tmp/supervisord.*", "/tmp/foo"),
        why="a process supervisor: `END_TO_END=1` starts real `supervisord` daemons (fixed sockets and "
        "pidfiles in `/tmp`) and drives them over pexpect",
    ),
    Suite(
        name="attrs",
        version="26.1.0",
        deps=("pytest", "hypothesis", "pympler", "cloudpickle"),
        paths=("tests",),
        args=("--hypothesis-seed=0",),
        deselect={
            "tests/test_converters.py::TestPipe::test_wrapped_annotation": "fails in plain runs too on Python "
            "3.11: the pipe converter's return annotation comes out `None`",
        },
        why='a parametrized fixture of scope="module" (`tests/test_validators.py`), one of scope="session" '
        "(`tests/test_funcs.py`), hypothesis",
    ),
    Suite(
        name="execnet",
        version="2.1.2",
        deps=("pytest",),
        paths=("testing",),
        args=("-k", "not main_thread_only"),
        deselect={
            "testing/test_gateway.py::TestBasicGateway::test__rinfo": "fails at random in plain runs too (5 of 25 "
            "here): the remote sends its cwd before it runs `os.chdir('..')`, and the test reads the cwd at once",
            "testing/test_gateway.py::TestPopenGateway::test_waitclose_on_remote_killed": "fails at random in plain "
            "runs too (1 of 6 here): whether `send()` to a just-killed remote raises yet is a race",
            "testing/test_xspec.py::TestMakegateway::test_popen_nice": "xfails or xpasses at random in plain runs too "
            "(its xfail says timing): `os.nice()` is per thread on Linux, and the remote runs the test's code on "
            "any thread of its pool",
        },
        notes=(
            "`-k 'not main_thread_only'`: in one pytest process the `main_thread_only` half of the suite reuses "
            "the gateways the `thread` half left in the session-scoped `group` (the two halves only differ in "
            "name); in a container per module or per test it makes real `main_thread_only` gateways, and several "
            "tests fail, and `test_channel_iter` hangs, for a reason of execnet's",
        ),
        known={
            "testing/test_rsync.py": Known(
                ("function",),
                "its module-scoped gateways (`gw1`, `gw2`: child interpreters over pipes, served by I/O threads) "
                "are made in pytest, broader than a container per test: inside, the threads are gone and the pipes "
                "are `/dev/null`, and the first test that sends hangs. README: broader fixtures run in pytest",
                run=False,
            ),
            "testing/test_gateway.py::TestBasicGateway::test_remote_exec_module_is_removed[": Known(
                ("function",),
                "fails in plain runs after its first parameter: `import remote` gets the module the first "
                "parameter left in `sys.modules`, whose file is gone; a container per test starts clean",
            ),
        },
        why='fixtures of scope="module" (`testing/test_rsync.py`), session-scoped gateways to child '
        "interpreters over pipes and sockets (`testing/conftest.py`), threads",
    ),
    Suite(
        name="plumbum",
        version="2.0.2",
        # pytest 8: on 9.2 its conftest's `config.inicfg` is a deprecation turned error by its filterwarnings.
        deps=("pytest>=8.4,<9", "pytest-asyncio", "pytest-cov", "pytest-mock", "pytest-timeout", "psutil"),
        paths=("tests",),
        args=("--timeout=60",),  # its own 300 s would let one hang eat the time budget
        known={
            "tests/test_local.py::TestLocalMachine::test_local_daemon": Known(
                ("function", "module"),
                "a daemon (double fork) is re-parented to the container's PID 1, which is the test itself, so "
                "`os.waitpid(daemon_pid)` reaps it instead of raising `ChildProcessError`",
            ),
            "tests/test_nohup.py::TestNohupLocal::test_closed_filehandles": Known(
                ("function", "module"),
                "hangs until pytest-timeout: the orphaned `nohup sleep 1` exits and stays a zombie of PID 1 "
                "(the test), which never reaps it while the test runs; plumbum waits with `kill(pid, 0)`",
            ),
        },
        why="a `setup_class` (class scope, `tests/test_color.py`), local commands and pipelines, daemons "
        "(`test_daemon_launcher.py`), `nohup`, mounts",
    ),
)

#: Mode name -> the pytest arguments that make it.
MODES: Final[Mapping[str, tuple[str, ...]]] = {
    "plain": ("-p", "no:lonely"),
    "function": ("-p", "lonely", "--lonely-all"),
    "module": ("-p", "lonely", "--lonely-all", "--lonely-scope=module"),
}
COMMON_ARGS: Final = ("-p", "no:cacheprovider", "-p", "no:randomly", "-p", "real_suites_tagger", "-q")
OUTCOMES: Final = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")

#: Loaded into every run with ``-p``: the node id and the outcome as pytest's
#: terminal counts it, as ``<property>`` of the ``<testcase>`` (junitxml
#: writes the teardown report's ``user_properties``).  ``tryfirst`` so that it
#: runs before junitxml's own hook.
TAGGER: Final = '''\
"""real_suites.py: node id and outcome of each test as junitxml properties."""
import pytest

_outcomes = {}


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logreport(report):
    seen = _outcomes.setdefault(report.nodeid, [])
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if report.passed:
            seen.append("xpassed" if xfail else "passed")
        elif report.skipped:
            seen.append("xfailed" if xfail else "skipped")
        else:
            seen.append("failed")
    elif report.skipped:
        seen.append("xfailed" if xfail else "skipped")
    elif report.failed:
        seen.append("error")
    if report.when == "teardown":
        outcome = ",".join(dict.fromkeys(_outcomes.pop(report.nodeid, [])))
        props = [p for p in report.user_properties if p[0] not in ("rs_nodeid", "rs_outcome")]
        report.user_properties = [*props, ("rs_nodeid", report.nodeid), ("rs_outcome", outcome)]
'''

#: The wrapper around one pytest run: a child subreaper, so that every process
#: the run leaves behind is reaped (and its CPU counted) here or reported.  It
#: reaps orphans as they come, all the time, as init would: a test that waits
#: for a daemon by polling ``kill(pid, 0)`` would otherwise wait for a zombie.
WRAPPER: Final = """\
import ctypes, json, os, resource, signal, subprocess, sys, threading, time
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
log, timeout, orphan_wait = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
start = time.perf_counter()
with open(log, "wb") as out:
    proc = subprocess.Popen(sys.argv[4:], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
timed_out, reaped, lock = threading.Event(), threading.Event(), threading.Lock()

def kill_run():  # Ctrl-C first, so that pytest still writes its junitxml; then the whole session
    timed_out.set()
    with lock:  # pytest is not reaped while we hold it: its PID and group cannot be anybody else's
        if not reaped.is_set():
            os.kill(proc.pid, signal.SIGINT)
    if not reaped.wait(30):
        with lock:
            if not reaped.is_set():
                os.killpg(proc.pid, signal.SIGKILL)

timer = threading.Timer(timeout, kill_run) if timeout else None
if timer:
    timer.daemon = True
    timer.start()
while True:  # reap orphans as they come; pytest itself only under the lock
    info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT)
    if info.si_pid == proc.pid:
        with lock:
            reaped.set()
            rc = os.waitstatus_to_exitcode(os.waitpid(proc.pid, 0)[1])
        break
    os.waitpid(info.si_pid, 0)
wall = time.perf_counter() - start
if timer:
    timer.cancel()
me = str(os.getpid()).encode()

def children():
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[1] != me:
                    continue
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                found[int(entry.name)] = f.read().replace(b"\\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            pass
    return found

stray = {}
deadline = time.monotonic() + orphan_wait
while True:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid:
        continue
    if time.monotonic() < deadline:
        time.sleep(0.01)
        continue
    left = children()
    stray.update(left)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.05)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "rc": rc, "timed_out": timed_out.is_set(),
                  "stray": [f"{pid} {cmd}" for pid, cmd in stray.items()]}))
"""


class SetupError(Exception):
    """A suite could not be downloaded, installed or run: reported, and the next suite goes on."""


@dataclasses.dataclass
class TestResult:
    outcome: str
    message: str = ""


@dataclasses.dataclass
class Run:
    mode: str
    wall: float
    cpu: float
    rc: int
    timed_out: bool
    stray: list[str]
    results: dict[str, TestResult]
    summary: str


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pytest-lonely-suites"


def progress(text: str) -> None:
    print(f"[real_suites {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def run_checked(cmd: Sequence[str | os.PathLike[str]], what: str) -> str:
    """Run a setup command; its output only when it fails, in the error."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise SetupError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return str(proc.stdout)


# --- setting a suite up ------------------------------------------------------------------------


def lonely_wheel(checkout: Path, cache: Path) -> Path:
    """One wheel of pytest-lonely from the checkout, as it is now (uncommitted changes included).

    Built from a copy so that setuptools' ``build/`` and ``*.egg-info`` never
    land in the checkout.
    """
    if not (checkout / "pyproject.toml").is_file() or not (checkout / "pytest_lonely").is_dir():
        raise SetupError(f"--checkout {checkout}: not a pytest-lonely checkout (no pyproject.toml and pytest_lonely/)")
    source = cache / "lonely-src"
    wheels = cache / "lonely-wheel"
    for path in (source, wheels):
        shutil.rmtree(path, ignore_errors=True)
    ignore = shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".tox", ".coverage*"
    )
    shutil.copytree(checkout, source, ignore=ignore)
    builder = cache / "builder"
    if not (builder / "bin" / "pip").exists():
        run_checked([sys.executable, "-m", "venv", builder], "making the venv that builds pytest-lonely")
    progress(f"building pytest-lonely from {checkout}")
    run_checked(
        [builder / "bin" / "python", "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, source],
        "building pytest-lonely",
    )
    found = sorted(wheels.glob("pytest_lonely-*.whl"))
    if len(found) != 1:
        raise SetupError(f"building pytest-lonely gave {found}, expected one wheel")
    return found[0]


def describe_checkout(checkout: Path) -> str:
    try:
        proc = subprocess.run(
            ["git", "-C", str(checkout), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return str(checkout)
    return f"{checkout} @ {proc.stdout.strip()}" if proc.returncode == 0 else str(checkout)


def ensure_venv(suite: Suite, cache: Path, wheel: Path) -> None:
    """The suite's venv, with the sdist unpacked beside it; remade when the pin or the deps change."""
    home = cache / "suites" / f"{suite.name}-{suite.version}"
    venv = home / "venv"
    stamp = venv / "real-suites.json"
    want = {"suite": suite.name, "version": suite.version, "deps": list(suite.deps), "python": sys.version}
    python = venv / "bin" / "python"
    fresh = not (stamp.is_file() and json.loads(stamp.read_text()) == want)
    if fresh:
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        progress(f"{suite.name}: making a venv")
        run_checked([sys.executable, "-m", "venv", venv], "making the venv")
        sdists = home / "sdist"
        progress(f"{suite.name}: downloading the sdist {suite.name}=={suite.version}")
        run_checked(
            [
                python,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                suite.name,
                "-d",
                sdists,
                f"{suite.name}=={suite.version}",
            ],
            "downloading the sdist",
        )
        archives = sorted(sdists.iterdir())
        if len(archives) != 1:
            raise SetupError(f"downloading {suite.name}=={suite.version} gave {archives}, expected one sdist")
        unpack(archives[0], home / "src")
        progress(f"{suite.name}: installing it with {', '.join(suite.deps)}")
        run_checked([python, "-m", "pip", "install", "-q", source_dir(home), *suite.deps], "installing the suite")
    progress(f"{suite.name}: installing {wheel.name}")
    run_checked(
        [python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel], "installing pytest-lonely"
    )
    # Dependencies of pytest-lonely itself (pytest, pluggy) in its range, should the suite's have pinned others.
    run_checked([python, "-m", "pip", "install", "-q", wheel], "installing pytest-lonely's dependencies")
    site = run_checked([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], "finding site")
    (Path(site.strip()) / "real_suites_tagger.py").write_text(TAGGER)
    if fresh:
        stamp.write_text(json.dumps(want))


def unpack(archive: Path, into: Path) -> None:
    into.mkdir(parents=True)
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(into)
        return
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(into, filter="data")
        else:  # Python before 3.10.12/3.11.4: a PyPI sdist of a pinned version, trusted as pip trusts it
            tf.extractall(into)


def source_dir(home: Path) -> Path:
    """The sdist's single top-level directory."""
    tops = [p for p in (home / "src").iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise SetupError(f"{home / 'src'}: expected one top-level directory in the sdist, found {tops}")
    return tops[0]


def pytest_version(home: Path) -> str:
    if not (home / "venv" / "bin" / "python").exists():
        return "no venv"
    code = "import pytest, platform; print(pytest.__version__, platform.python_version())"
    pytest_ver, python_ver = run_checked([home / "venv" / "bin" / "python", "-c", code], "pytest --version").split()
    return f"pytest {pytest_ver}, Python {python_ver}"


# --- running it --------------------------------------------------------------------------------


def run_env(suite: Suite) -> dict[str, str]:
    """The environment of a run: no inherited pytest or Python switches, fixed hash seed, wide terminal."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"PYTHONHASHSEED": "0", "COLUMNS": "200"})
    env.update(suite.env)
    return env


def run_mode(
    suite: Suite,
    home: Path,
    mode: str,
    *,
    results: Path,
    extra: Sequence[str],
    timeout: float,
    orphan_wait: float,
    full: bool,
) -> Run:
    """One pytest run of the suite in a fresh copy of its sdist (same path for every mode)."""
    work = home / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(source_dir(home), work, symlinks=True)
    junit = results / f"{suite.name}-{mode}.xml"
    log = results / f"{suite.name}-{mode}.log"
    junit.unlink(missing_ok=True)
    not_here = [prefix for prefix, known in suite.known.items() if not known.run and mode in known.modes]
    deselect = [f"--deselect={node}" for node in [*suite.deselect, *([] if full else suite.slow), *not_here]]
    cmd = [
        str(home / "venv" / "bin" / "python"),
        "-m",
        "pytest",
        *COMMON_ARGS,
        *MODES[mode],
        f"--junitxml={junit}",
        *suite.args,
        *deselect,
        *extra,
        *suite.paths,
    ]
    progress(f"{suite.name}: {mode}: {' '.join(cmd[3:])}")
    before = litter_of(suite)
    started = time.time()
    # Short (unix socket paths live here), and not under /tmp: a $TMPDIR under /tmp does not exist inside
    # a container, whose /tmp is its own (see tools/README.md).
    tmpdir = tempfile.mkdtemp(prefix=f"real-suites-{suite.name}-", dir="/var/tmp")
    env = {**run_env(suite), "TMPDIR": tmpdir}
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(log), str(timeout), str(orphan_wait), *cmd],
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    shutil.rmtree(tmpdir, ignore_errors=True)
    remove_litter(suite, before, started)
    try:
        measured = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise SetupError(f"{suite.name} {mode}: the run wrapper failed:\n{proc.stdout}{proc.stderr}") from exc
    summary = last_line(log)
    if measured["timed_out"]:
        summary = f"timed out after {timeout:.0f} s; {summary}"
    progress(f"{suite.name}: {mode}: {summary} ({measured['wall']:.0f} s)")
    measured["summary"] = summary
    (results / f"{suite.name}-{mode}.json").write_text(json.dumps(measured))
    return load_run(suite, mode, results)


def load_run(suite: Suite, mode: str, results: Path) -> Run:
    """A run from what :func:`run_mode` left in the results directory: its junitxml and its measurements."""
    junit = results / f"{suite.name}-{mode}.xml"
    try:
        measured = json.loads((results / f"{suite.name}-{mode}.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SetupError(f"{suite.name} {mode}: no measurements in {results}: {exc}") from exc
    tests = parse_junit(junit) if junit.is_file() else {}
    if not tests:
        raise SetupError(f"{suite.name} {mode}: no test results in {junit}; pytest said: {measured['summary']}")
    return Run(
        mode=mode,
        wall=measured["wall"],
        cpu=measured["cpu"],
        rc=measured["rc"],
        timed_out=measured["timed_out"],
        stray=measured["stray"],
        results=tests,
        summary=measured["summary"],
    )


def litter_of(suite: Suite) -> dict[str, float]:
    """Path -> mtime of what the suite's litter globs match now."""
    found = {}
    for pattern in suite.litter:
        for path in glob.glob(pattern):
            with contextlib.suppress(OSError):
                found[path] = os.lstat(path).st_mtime
    return found


def remove_litter(suite: Suite, before: Mapping[str, float], started: float) -> None:
    """Remove what the run made at the suite's fixed paths; what was there before and unchanged stays."""
    for path, mtime in litter_of(suite).items():
        if path in before and before[path] == mtime and mtime < started:
            continue
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def last_line(log: Path) -> str:
    try:
        lines = [line.strip(" =") for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no output)"
    return lines[-1] if lines else "(no output)"


def parse_junit(path: Path) -> dict[str, TestResult]:
    """Test id -> outcome and failure message; the node id and outcome from :data:`TAGGER` where present."""
    tests: dict[str, TestResult] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        if not case.get("name") and not case.get("classname"):
            continue  # the empty <testcase/> junitxml writes for a report of no test (after a Ctrl-C)
        props = {p.get("name"): p.get("value", "") for p in case.iter("property")}
        test_id = props.get("rs_nodeid") or f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = props.get("rs_outcome") or junit_outcome(case)
        message = ""
        for tag in ("failure", "error"):
            for node in case.findall(tag):
                message += failure_excerpt(node.get("message", ""), node.text or "")
        key, n = test_id, 1
        while key in tests:  # a node id twice (rare: a test both in a class and a rerun); keep both
            n += 1
            key = f"{test_id} #{n}"
        tests[key] = TestResult(outcome or "passed", message)
    return tests


def junit_outcome(case: ET.Element) -> str:
    """The outcome from junitxml's own elements (collection errors, and runs without the tagger)."""
    found = []
    for child in case:
        if child.tag == "failure":
            found.append("failed")
        elif child.tag == "error":
            found.append("error")
        elif child.tag == "skipped":
            found.append("xfailed" if child.get("type") == "pytest.xfail" else "skipped")
    return ",".join(dict.fromkeys(found)) or "passed"


def failure_excerpt(message: str, text: str, max_lines: int = 12) -> str:
    """The message, then the ``E`` lines of the traceback (or its last lines): what one needs to start looking."""
    lines = text.splitlines()
    errors = [line for line in lines if line.startswith("E ")]
    picked = errors[:max_lines] if errors else lines[-max_lines:]
    head = message.strip().splitlines()[0][:300] if message.strip() else ""
    return "\n".join([head, *picked]).strip() + "\n"


# --- the report --------------------------------------------------------------------------------


def outcome_in(run: Run, test_id: str) -> str:
    return run.results[test_id].outcome if test_id in run.results else "absent"


def differing(runs: Sequence[Run]) -> list[str]:
    ids = sorted(set().union(*(run.results for run in runs)))
    return [test_id for test_id in ids if len({outcome_in(run, test_id) for run in runs}) > 1]


def is_known(suite: Suite, runs: Sequence[Run], test_id: str) -> bool:
    """Every mode that differs from plain is one the suite's :class:`Known` entry names."""
    found = suite.known_for(test_id)
    plain = next((run for run in runs if run.mode == "plain"), None)
    if found is None or plain is None:
        return False
    return all(run.mode in found[1].modes for run in runs if outcome_in(run, test_id) != outcome_in(plain, test_id))


def lonely_message(runs: Sequence[Run], test_id: str) -> str:
    """The failure text from a lonely run (the plain run's where only it has one)."""
    for run in sorted(runs, key=lambda run: run.mode == "plain"):
        if test_id in run.results and run.results[test_id].message.strip():
            return run.results[test_id].message
    return ""


def report_suite(suite: Suite, versions: str, runs: Sequence[Run]) -> tuple[str, int]:
    """The suite's section, and how many tests differ for a reason not in its :attr:`Suite.known`."""
    out = [f"### {suite.name} {suite.version}", ""]
    out.append(f"{suite.why}. {versions}; `{' '.join(suite.paths)}` {' '.join(suite.args)}".rstrip())
    if suite.env:
        out.append("Environment: " + " ".join(f"`{k}={v}`" for k, v in suite.env.items()) + ".")
    out.append("")
    diff = differing(runs)
    new = [test_id for test_id in diff if not is_known(suite, runs, test_id)]
    known = [test_id for test_id in diff if test_id not in new]
    out.append(
        "| mode | tests | "
        + " | ".join(OUTCOMES)
        + " | other | new diff | known diff | exit | wall s | CPU s | stray |"
    )
    out.append("|---" * (len(OUTCOMES) + 9) + "|")
    plain = next((run for run in runs if run.mode == "plain"), None)
    for run in runs:
        counts = Counter(result.outcome for result in run.results.values())
        other = sum(n for outcome, n in counts.items() if outcome not in OUTCOMES)
        rc = f"{run.rc}" + (" (timeout)" if run.timed_out else "")

        def differs(test_id: str, run: Run = run) -> bool:
            return plain is not None and run is not plain and outcome_in(run, test_id) != outcome_in(plain, test_id)

        cells = [run.mode, str(len(run.results)), *(str(counts.get(o, 0)) for o in OUTCOMES), str(other)]
        cells += [str(sum(map(differs, new))), str(sum(map(differs, known)))]
        cells += [rc, f"{run.wall:.1f}", f"{run.cpu:.1f}", str(len(run.stray))]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for run in runs:
        out.append(f"- {run.mode}: `{run.summary}`")
        out.extend(f"  - left behind, killed: `{line[:160]}`" for line in run.stray)
    if suite.deselect or suite.notes:
        out.append("")
        out.append("Deselected in every mode:")
        out.extend(f"- `{node}`: {reason}" for node, reason in suite.deselect.items())
        out.extend(f"- {note}" for note in suite.notes)
    if new:
        out.append("")
        out.append(f"**{len(new)} test(s) differ:**")
        out.append("")
        for test_id in new:
            out.append(f"- `{test_id}`: " + ", ".join(f"{run.mode} {outcome_in(run, test_id)}" for run in runs))
            message = lonely_message(runs, test_id)
            if message.strip():
                out.append("")
                out.append("  ```")
                out.extend(f"  {line}" for line in message.rstrip().splitlines())
                out.append("  ```")
    if suite.known:
        out.append("")
        out.append("Known differences:")
        for prefix, entry in suite.known.items():
            tests = [test_id for test_id in known if suite.known_for(test_id) == (prefix, entry)]
            modes = "/".join(entry.modes) + ("" if entry.run else ", not run there")
            seen = f"{len(tests)} test(s)" if tests or not entry.run else "**not seen this time**"
            out.append(f"- `{prefix}` ({modes}; {seen}): {entry.reason}")
            if entry.run:
                out.extend(
                    f"  - `{test_id}`: " + ", ".join(f"{run.mode} {outcome_in(run, test_id)}" for run in runs)
                    for test_id in tests
                )
    out.append("")
    return "\n".join(out), len(new)


def machine_line() -> str:
    load = Path("/proc/loadavg").read_text().split()[:3]
    return f"{os.cpu_count()} CPUs, Linux {platform.release()}, load average {' '.join(load)}"


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    box: list[float] = []
    start = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> int:
    by_name = {suite.name: suite for suite in SUITES}
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="suites: " + ", ".join(f"{s.name}=={s.version}" for s in SUITES) + "; modes: " + ", ".join(MODES),
    )
    parser.add_argument("--suites", nargs="+", choices=list(by_name), default=list(by_name), metavar="NAME")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), metavar="MODE")
    parser.add_argument("--checkout", type=Path, default=REPO, help="pytest-lonely to test (default: %(default)s)")
    parser.add_argument("--cache", type=Path, default=cache_root(), help="venvs, sdists, results (%(default)s)")
    parser.add_argument("--full", action="store_true", help="also run the slow tests of each suite (about +12 min)")
    parser.add_argument("-k", dest="keyword", help="passed to pytest as -k")
    parser.add_argument("--pytest-arg", action="append", default=[], help="one more pytest argument (repeatable)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed (0: never)")
    parser.add_argument("--orphan-wait", type=float, default=10, help="seconds a run's orphans may take to exit")
    parser.add_argument("--output", type=Path, help="also write the Markdown report here")
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: the report from the results of the last runs"
    )
    args = parser.parse_args(argv)
    if args.timeout < 0 or args.orphan_wait < 0:
        parser.error("--timeout and --orphan-wait must be >= 0")
    extra = [*(["-k", args.keyword] if args.keyword else []), *args.pytest_arg]

    cache: Path = args.cache.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    results = cache / "results"
    results.mkdir(exist_ok=True)
    header = [
        "## Real suites under pytest-lonely",
        "",
        f"pytest-lonely: {describe_checkout(args.checkout.resolve())}. Machine: {machine_line()}.",
        "Modes: " + "; ".join(f"{m} `{' '.join(MODES[m])}`" for m in args.modes) + "; every run: "
        f"`{' '.join(a for a in COMMON_ARGS if a != '-q')}`, `PYTHONHASHSEED=0`"
        + (f", `{' '.join(extra)}`" if extra else "")
        + ".",
        "",
    ]
    sections: list[str] = []
    total_diff, failures = 0, []
    with timed() as elapsed:
        try:
            wheel = None if args.report_only else lonely_wheel(args.checkout.resolve(), cache)
        except SetupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for name in args.suites:
            suite = by_name[name]
            home = cache / "suites" / f"{suite.name}-{suite.version}"
            try:
                if wheel is not None:
                    ensure_venv(suite, cache, wheel)
                versions = pytest_version(home)
                runs = [
                    load_run(suite, mode, results)
                    if wheel is None
                    else run_mode(
                        suite,
                        home,
                        mode,
                        results=results,
                        extra=extra,
                        timeout=args.timeout,
                        orphan_wait=args.orphan_wait,
                        full=args.full,
                    )
                    for mode in args.modes
                ]
            except SetupError as exc:
                failures.append(name)
                sections.append(f"### {suite.name} {suite.version}\n\n**not run**: {exc}\n")
                progress(f"{name}: not run: {exc}")
                continue
            finally:
                shutil.rmtree(home / "work", ignore_errors=True)
            text, n_diff = report_suite(suite, versions, runs)
            total_diff += n_diff
            sections.append(text)
    if args.report_only:
        header.append(f"Reported from the results of earlier runs in `{results}`.")
    else:
        header.append(f"Total wall time {elapsed[0] / 60:.1f} min; junitxml and logs in `{results}`.")
    header.append("")
    report = "\n".join(header + sections)
    print(report)
    if args.output:
        args.output.write_text(report)
    if failures:
        return 2
    return 1 if total_diff else 0


if __name__ == "__main__":
    sys.exit(main())
