"""Fidelity: every example behaves as it does in-process, and no report is lost.

Issue "Runs on every pytest from 8.0 to 9.2 ... and loses no report".  Each
section guards one bug of that issue.  Wherever it can, a test runs the same
files twice in real pytest subprocesses, once with pytest-lonely
(``run_lonely``) and once in-process (``run_in_process``: ``-p no:lonely``, the
marker registered so that nothing else changes), and compares what a user
sees: the outcome line, the short summary, the report sections, the files
left on disk.  The in-process run is the specification; the isolated run must
match it.  Nothing here forks in this process.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.inner import RunLonely, requires_plugin

PYTEST_9 = pytest.version_tuple[0] >= 9


@pytest.fixture(autouse=True)
def _not_an_xdist_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner sessions must not believe they are xdist workers when this suite runs under ``-n``.

    pytest-benchmark turns itself off under xdist, and the conftests here name
    their reports after ``PYTEST_XDIST_WORKER``.
    """
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID"):
        monkeypatch.delenv(name, raising=False)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


needs_subtests = requires_plugin("pytest-subtests", "pytest_subtests", builtin=PYTEST_9)
needs_benchmark = requires_plugin("pytest-benchmark", "pytest_benchmark")
needs_hypothesis = requires_plugin("hypothesis", "hypothesis")
needs_xdist = requires_plugin("pytest-xdist", "xdist")


IN_PROCESS = (
    "-p",
    "no:lonely",
    "-p",
    "no:cacheprovider",
    "-o",
    "markers=isolated: reference run without pytest-lonely",
)
LONELY = ("-p", "lonely", "-p", "no:cacheprovider")


@pytest.fixture
def run_in_process(pytester: pytest.Pytester) -> RunLonely:
    """The reference run: the same files with pytest-lonely blocked and ``isolated`` a known marker."""

    def run(*args: str, timeout: float = 120) -> pytest.RunResult:
        return pytester.runpytest_subprocess(*IN_PROCESS, *args, timeout=timeout)

    return run


def run_default_basetemp(pytester: pytest.Pytester, lonely: bool, *args: str) -> pytest.RunResult:
    """A pytest subprocess WITHOUT ``--basetemp`` (``runpytest_subprocess`` always adds one).

    pytest then numbers its basetemps under ``$PYTEST_DEBUG_TEMPROOT/pytest-of-USER/`` and applies
    ``tmp_path_retention_count`` to them.
    """
    return pytester.run(sys.executable, "-m", "pytest", *(LONELY if lonely else IN_PROCESS), *args, timeout=120)


_HEADER = re.compile(r"^=+ (.*?) =+$")
_TEST_HEADER = re.compile(r"^_{2,} (.+?) _{2,}$")
_SUB_HEADER = re.compile(r"^-{2,} (.+?) -{2,}$")


def section(result: pytest.RunResult, title: str) -> list[str]:
    """The lines of the LAST ``=== title ===`` block of the terminal output (empty if there is none).

    The last: a test that runs pytest itself may show its inner session's blocks in its captured output.
    """
    blocks: list[list[str]] = []
    inside = False
    for line in result.outlines:
        header = _HEADER.match(line)
        if header:
            inside = header.group(1) == title
            if inside:
                blocks.append([])
            continue
        if inside:
            blocks[-1].append(line)
    return blocks[-1] if blocks else []


def short_summary(result: pytest.RunResult) -> list[str]:
    return section(result, "short test summary info")


def report_sections(result: pytest.RunResult) -> dict[tuple[str, str], list[str]]:
    """(test header, sub-section title) -> lines, from the FAILURES, ERRORS and PASSES blocks.

    The sub-section title is ``""`` for the traceback part, else e.g.
    ``Captured stderr call``.
    """
    found: dict[tuple[str, str], list[str]] = {}
    block = test = sub = None
    for line in result.outlines:
        header = _HEADER.match(line)
        if header:
            block = header.group(1) if header.group(1) in ("FAILURES", "ERRORS", "PASSES") else None
            test = sub = None
            continue
        if block is None:
            continue
        if m := _TEST_HEADER.match(line):
            test, sub = m.group(1), ""
            found.setdefault((test, sub), [])
            continue
        if test is None:
            continue
        if m := _SUB_HEADER.match(line):
            sub = m.group(1)
            found.setdefault((test, sub), [])
            continue
        assert sub is not None
        found[(test, sub)].append(line)
    return found


def progress_region(result: pytest.RunResult) -> list[str]:
    """What pytest printed while the tests ran: from ``collected N items`` to the first ``===`` header."""
    lines = result.outlines
    start = next((i for i, line in enumerate(lines) if re.match(r"^collect(ed|ing)", line)), 0)
    region = []
    for line in lines[start + 1 :]:
        if _HEADER.match(line):
            break
        region.append(line)
    return region


def without_durations(lines: list[str]) -> list[str]:
    return [re.sub(r" in [\d.]+s( \(.*?\))?", "", line) for line in lines]


def container_children(pid: int) -> list[str]:
    """Children of ``pid`` that are zombies, or containers still alive (another PID or user namespace)."""
    me = str(pid)
    own = {ns: os.readlink(f"/proc/{pid}/ns/{ns}") for ns in ("pid", "user")}
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if fields[1].decode() != me:
            continue
        if fields[0] == b"Z":
            found.append(f"{entry} (zombie)")
            continue
        try:
            if any(os.readlink(f"/proc/{entry}/ns/{ns}") != own[ns] for ns in own):
                found.append(f"{entry} (running container)")
        except OSError:
            continue
    return sorted(found)


# The same check, as source for inner sessions (their conftest or tests).
CONTAINER_CHILDREN_SRC = inspect.getsource(container_children)


# --------------------------------------------------------------------------------------------------
# 1. Subtests: every report the isolated item's session logs reaches the outer session
# --------------------------------------------------------------------------------------------------

SUBTESTS_UNITTEST = {
    "fails": """
import unittest

import pytest


@pytest.mark.isolated
class TestIso(unittest.TestCase):
    def test_sub(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertNotEqual(i, 1)


def test_plain_after():
    pass
""",
    "passes": """
import unittest

import pytest


@pytest.mark.isolated
class TestIso(unittest.TestCase):
    def test_sub(self):
        for i in range(3):
            with self.subTest(i=i):
                self.assertLess(i, 3)


def test_plain_after():
    pass
""",
}

SUBTESTS_FIXTURE = {
    "fails": """
import pytest


@pytest.mark.isolated
def test_sub(subtests):
    for i in range(3):
        with subtests.test(msg="step", i=i):
            assert i != 1


def test_plain_after():
    pass
""",
    "passes": """
import pytest


@pytest.mark.isolated
def test_sub(subtests):
    for i in range(3):
        with subtests.test(msg="step", i=i):
            assert i < 3


def test_plain_after():
    pass
""",
    "fails_inside_and_after": """
import pytest


@pytest.mark.isolated
def test_sub(subtests):
    with subtests.test(msg="inner"):
        assert 0, "the subtest fails"
    assert 0, "the test itself fails too"


def test_plain_after():
    pass
""",
}


def _subtest_progress(result: pytest.RunResult) -> list[str]:
    """The -v lines of the subtests (SUBPASSED/SUBFAILED on pytest 9, SUBPASS/SUBFAIL from pytest-subtests)."""
    lines = []
    for line in result.outlines:
        for part in re.split(r"(?=test_\w+\.py::)", line):
            if "SUB" in part and "::" in part:
                lines.append(re.sub(r"\s*\[\s*\d+%\]\s*$", "", part).strip())
    return lines


def assert_same_as_in_process(isolated: pytest.RunResult, reference: pytest.RunResult, progress: bool) -> None:
    everything = isolated.stdout.str() + isolated.stderr.str()
    assert "INTERNALERROR" not in everything, everything
    assert isolated.parseoutcomes() == reference.parseoutcomes(), everything
    assert isolated.ret == reference.ret, everything
    assert short_summary(isolated) == short_summary(reference), everything

    # Tracebacks only: in-process, pytest's own "u" progress letters for unittest subtests are written while
    # the test's capture is on and land in a PASSES section of their own, which is pytest's quirk, not ours.
    def tracebacks(result: pytest.RunResult) -> list[tuple[str, str]]:
        return [key for key, lines in report_sections(result).items() if key[1] == "" and any(x.strip() for x in lines)]

    assert tracebacks(isolated) == tracebacks(reference), everything
    if progress:
        assert _subtest_progress(isolated) == _subtest_progress(reference), everything


def _every_case(cases: dict[str, str]) -> dict[str, str]:
    """One test module per case, its names made unique so that every report section has a header of its own."""
    return {
        f"test_sub_{case}": source.replace("class TestIso(", f"class TestIso_{case}(")
        .replace("def test_sub(", f"def test_sub_{case}(")
        .replace("def test_plain_after(", f"def test_plain_after_{case}(")
        for case, source in sorted(cases.items())
    }


def test_unittest_subtests_as_in_process(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely
) -> None:
    """Bug 1: a failing ``self.subTest()`` inside an isolated TestCase must not be lost (reported PASSED).

    The outcome line, the exit code, the short summary (with its
    ``SUBFAILED(i=1)`` line) and the failure sections match the in-process run.
    Every case is a module of one session.
    """
    pytester.makepyfile(**_every_case(SUBTESTS_UNITTEST))
    reference = run_in_process("-rA")
    isolated = run_lonely("-rA")
    assert any("test_sub_fails" in line and "i=1" in line for line in short_summary(reference)), reference.stdout.str()
    assert_same_as_in_process(isolated, reference, progress=False)


@needs_subtests
@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_subtests_fixture_as_in_process(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely, verbose: bool
) -> None:
    """Bug 1: the ``subtests`` fixture (pytest 9, or pytest-subtests before) in an isolated test.

    Its SUBPASSED/SUBFAILED reports are made and logged by the child's
    session; they must reach the outer session's terminal, counts and exit code.
    Every case is a module of one session.
    """
    pytester.makepyfile(**_every_case(SUBTESTS_FIXTURE))
    args = ("-rA", "-v") if verbose else ("-rA",)
    reference = run_in_process(*args)
    isolated = run_lonely(*args)
    assert_same_as_in_process(isolated, reference, progress=verbose)


@needs_subtests
@needs_xdist
def test_subtests_fixture_under_xdist_as_in_process(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely
) -> None:
    """Bug 1 under ``-n 2``: subtest reports travel container -> worker -> controller."""
    pytester.makepyfile(test_sub=SUBTESTS_FIXTURE["fails"])
    reference = run_in_process("-n", "2", "-rA")
    isolated = run_lonely("-n", "2", "-rA")
    assert isolated.parseoutcomes() == reference.parseoutcomes(), isolated.stdout.str()
    assert sorted(short_summary(isolated)) == sorted(short_summary(reference)), isolated.stdout.str()


# --------------------------------------------------------------------------------------------------
# 2. Per-session results of other plugins: forwarded, or said once; never dropped silently
# --------------------------------------------------------------------------------------------------


def assert_kept_or_warned_once(
    result: pytest.RunResult, plugin: str, tests: dict[str, bool], shown_needs_no_warning: bool = True
) -> None:
    """For each isolated test (test id -> whether its result shows): shown, or named in ONE warning.

    The warning names ``plugin``; it appears on exactly one line of the
    warnings summary (pytest folds one message charged to several tests into
    one entry under their ids).  With ``shown_needs_no_warning``, a result
    that shows must not be warned about as well (the warning would be false);
    turn it off where the same plugin may rightly be warned about for
    something else (hypothesis: its example database).
    """
    everything = result.stdout.str()
    warnings_summary = section(result, "warnings summary")
    text = "\n".join(warnings_summary)
    mentions = [line for line in warnings_summary if plugin in line]
    warned = [test for test in tests if test in text and mentions]
    for test, shown in tests.items():
        assert shown or test in warned, f"{plugin}: the result of {test} was dropped silently\n{everything}"
        if shown_needs_no_warning:
            assert not (shown and test in warned), f"{plugin}: {test} shows AND is warned about\n{everything}"
    if warned:
        assert len(mentions) == 1, f"{plugin} must be warned about once, not {len(mentions)} times\n{everything}"


BENCH_TESTS = """
import pytest


@pytest.mark.isolated
def test_bench_iso_a(benchmark):
    benchmark(sum, range(50))


@pytest.mark.isolated
def test_bench_iso_b(benchmark):
    benchmark(sorted, range(50))


def test_bench_plain(benchmark):
    benchmark(sum, range(50))
"""

BENCH_FAST = ("--benchmark-min-rounds=1", "--benchmark-max-time=0.01", "--benchmark-sort=name")


def _benchmark_table(result: pytest.RunResult) -> set[str]:
    return {m.group(1) for line in result.outlines if (m := re.match(r"^(test_bench_\w+)\s+\d", line))}


@needs_benchmark
def test_benchmark_results_shown_or_warned_once(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely
) -> None:
    """Bug 2: pytest-benchmark's table silently leaves out every isolated test.

    pytest-benchmark keeps its results in the session object of the process
    that ran the benchmark.  The isolated tests must be in the table, as
    in-process, or be named in one warning that names pytest-benchmark.
    """
    pytester.makepyfile(test_bench=BENCH_TESTS)
    reference = run_in_process(*BENCH_FAST)
    assert _benchmark_table(reference) == {"test_bench_iso_a", "test_bench_iso_b", "test_bench_plain"}
    isolated = run_lonely(*BENCH_FAST)
    assert isolated.ret == 0, isolated.stdout.str()
    table = _benchmark_table(isolated)
    assert "test_bench_plain" in table, isolated.stdout.str()
    assert_kept_or_warned_once(
        isolated,
        "pytest-benchmark",
        {f"test_bench.py::{name}": name in table for name in ("test_bench_iso_a", "test_bench_iso_b")},
    )


@needs_benchmark
def test_benchmark_disabled_needs_no_warning(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """Bug 2, the other side: with ``--benchmark-disable`` nothing is collected, so nothing may be warned about."""
    pytester.makepyfile(test_bench=BENCH_TESTS)
    result = run_lonely("--benchmark-disable")
    assert result.parseoutcomes() == {"passed": 3}, result.stdout.str()
    assert not any("pytest-benchmark" in line for line in section(result, "warnings summary")), result.stdout.str()


HYPOTHESIS_TESTS = """
import pytest
from hypothesis import given, settings, strategies as st


@pytest.mark.isolated
@settings(max_examples=20)
@given(st.integers())
def test_hyp_iso(n):
    assert n == n


@settings(max_examples=20)
@given(st.integers())
def test_hyp_plain(n):
    assert n == n
"""


def _statistics_for(result: pytest.RunResult) -> set[str]:
    stats = section(result, "Hypothesis Statistics")
    return {m.group(1) for line in stats if (m := re.match(r"^(\S+::\S+):$", line))}


@needs_hypothesis
def test_hypothesis_statistics_shown_or_warned_once(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely
) -> None:
    """Bug 2: ``--hypothesis-show-statistics`` lists the isolated test as in-process, or one warning says why not.

    (Hypothesis carries its statistics on the report, so today they do show.)
    """
    pytester.makepyfile(test_hyp=HYPOTHESIS_TESTS)
    reference = run_in_process("--hypothesis-show-statistics")
    assert _statistics_for(reference) == {"test_hyp.py::test_hyp_iso", "test_hyp.py::test_hyp_plain"}
    isolated = run_lonely("--hypothesis-show-statistics")
    assert isolated.ret == 0, isolated.stdout.str()
    shown = _statistics_for(isolated)
    assert "test_hyp.py::test_hyp_plain" in shown, isolated.stdout.str()
    assert_kept_or_warned_once(
        isolated,
        "hypothesis",
        {"test_hyp.py::test_hyp_iso": "test_hyp.py::test_hyp_iso" in shown},
        shown_needs_no_warning=False,
    )


HYPOTHESIS_FAILING = """
import pytest
from hypothesis import given, strategies as st


@pytest.mark.isolated
@given(st.integers())
def test_hyp_fails(n):
    assert n < 10
"""


def _example_db_entries(root: Path) -> list[Path]:
    examples = root / ".hypothesis" / "examples"
    return [p for p in examples.rglob("*") if p.is_file()] if examples.is_dir() else []


_CI_VARIABLES = (
    "CI", "TF_BUILD", "BUILDKITE", "CIRCLECI", "CIRRUS_CI", "CODEBUILD_BUILD_ID", "GITHUB_ACTIONS",
    "GITLAB_CI", "HEROKU_TEST_RUN_ID", "TEAMCITY_VERSION", "bamboo.buildKey",
)  # fmt: skip


@needs_hypothesis
def test_hypothesis_example_database_kept_or_warned_once(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug 2 (a per-session result on disk): hypothesis saves a failing example to ``.hypothesis/examples``.

    In-process the next run replays it; written inside the container it is
    lost with the copy-on-write root.  It must reach the host, or one warning
    names hypothesis and the test.
    """
    # On CI, hypothesis' "ci" profile keeps no example database: look as a developer's machine does.
    for name in _CI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    pytester.makepyfile(test_hyp=HYPOTHESIS_FAILING)
    reference = run_in_process()
    assert reference.parseoutcomes() == {"failed": 1}
    assert _example_db_entries(pytester.path), "in-process, hypothesis saves the failing example"
    shutil.rmtree(pytester.path / ".hypothesis")
    isolated = run_lonely()
    assert isolated.parseoutcomes().get("failed") == 1, isolated.stdout.str()
    kept = bool(_example_db_entries(pytester.path))
    assert_kept_or_warned_once(isolated, "hypothesis", {"test_hyp.py::test_hyp_fails": kept})


# --------------------------------------------------------------------------------------------------
# 3. A finished container is reaped before the next test starts, and none is left at the end
# --------------------------------------------------------------------------------------------------

ZOMBIE_HEAD = f"""
import asyncio
import logging
import os
import signal
import sys
import time
import warnings

import pytest

{CONTAINER_CHILDREN_SRC}
"""

# Two isolated tests that have just finished when the plain test (of ZOMBIE_PLAIN) after them starts.
ZOMBIE_ISOLATED = """

@pytest.mark.isolated
def test_iso_first_{plain}():
    pass


@pytest.mark.isolated
def test_iso_second_{plain}():
    pass
"""

ZOMBIE_PLAIN = {
    "wait": """
def test_plain_wait():
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    try:
        got, status = os.wait()
    finally:
        try:
            os.waitpid(pid, 0)  # our own child, if os.wait() reaped something else
        except ChildProcessError:
            pass
    assert got == pid, f"os.wait() reaped {got}, not our child {pid}"
    assert os.waitstatus_to_exitcode(status) == 3
""",
    "sigchld": """
def test_plain_sigchld_handler():
    reaped = []

    def on_sigchld(signum, frame):
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            reaped.append(pid)

    old = signal.signal(signal.SIGCHLD, on_sigchld)
    try:
        pid = os.fork()
        if pid == 0:
            os._exit(5)
        deadline = time.monotonic() + 10
        while pid not in reaped and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        signal.signal(signal.SIGCHLD, old)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    assert reaped == [pid], f"the SIGCHLD handler reaped {reaped}, expected only our child {pid}"
""",
    "asyncio": """
def _run(coro):
    # FastChildWatcher (Python < 3.14) reaps with waitpid(-1), like many event loops and process managers.
    if not hasattr(asyncio, "FastChildWatcher"):
        return asyncio.run(coro)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        policy = asyncio.get_event_loop_policy()
        loop = asyncio.new_event_loop()
        watcher = asyncio.FastChildWatcher()
        watcher.attach_loop(loop)
        policy.set_child_watcher(watcher)
    try:
        return loop.run_until_complete(coro)
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            policy.set_child_watcher(None)
            watcher.close()
        loop.close()


def test_plain_asyncio_subprocess(caplog):
    caplog.set_level(logging.DEBUG, logger="asyncio")

    async def main():
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "raise SystemExit(4)")
        return await proc.wait()

    assert _run(main()) == 4
    unknown = [r.getMessage() for r in caplog.records if "unknown pid" in r.getMessage()]
    assert not unknown, unknown
""",
    "last": """
def test_plain_last_no_child_left():
    try:
        reaped = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        reaped = (0, 0)
    assert reaped == (0, 0), f"a finished child was still waiting to be reaped: {reaped}"
    assert container_children(os.getpid()) == []
""",
}


def test_plain_test_after_isolated_sees_only_its_own_children(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely
) -> None:
    """Bug 3: a finished container is still a zombie child of pytest when the next (plain) test starts.

    ``os.wait()``, a SIGCHLD handler that reaps with ``waitpid(-1)``, an
    asyncio child watcher that does the same, and a last test that expects no
    child left: each must see only its own children, as in-process.  Each
    comes right after two isolated tests, all in one session.
    """
    source = ZOMBIE_HEAD + "".join(ZOMBIE_ISOLATED.format(plain=plain) + body for plain, body in ZOMBIE_PLAIN.items())
    pytester.makepyfile(test_zombie=source)
    # Python 3.12+ warns when a test forks while pytest-rerunfailures' thread runs: not what is tested here.
    quiet = ("-rA", "-W", "ignore:This process:DeprecationWarning")
    reference = run_in_process(*quiet)
    assert reference.parseoutcomes() == {"passed": 3 * len(ZOMBIE_PLAIN)}, reference.stdout.str()
    isolated = run_lonely(*quiet)
    assert isolated.parseoutcomes() == {"passed": 3 * len(ZOMBIE_PLAIN)}, isolated.stdout.str()


ZOMBIE_CONFTEST = f"""
import os

{CONTAINER_CHILDREN_SRC}

def pytest_sessionfinish(session):
    # An ordinary hook, as a user's conftest has it: it may run before or after pytest-lonely's own.
    who = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(os.environ["LONELY_ZOMBIE_DIR"], who), "w") as f:
        f.write(" ".join(container_children(os.getpid())))
"""

ZOMBIE_ONLY_ISOLATED = """
import pytest


@pytest.mark.isolated
@pytest.mark.parametrize("n", range(6))
def test_iso(n):
    pass
"""


@pytest.mark.parametrize("workers", [None, "2"], ids=["serial", "xdist-2"])
def test_no_container_left_at_session_finish(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch, workers: str | None
) -> None:
    """Bug 3 at the end: when the session finishes, no container of ours is a zombie or still running.

    Checked from an ordinary ``pytest_sessionfinish`` in a conftest (in every
    xdist worker too), after a session whose last test is isolated.
    """
    if workers and importlib.util.find_spec("xdist") is None:
        pytest.skip("needs the pytest plugin pytest-xdist (pip install pytest-xdist)")
    out = pytester.mkdir("zombies")
    monkeypatch.setenv("LONELY_ZOMBIE_DIR", str(out))
    pytester.makeconftest(ZOMBIE_CONFTEST)
    pytester.makepyfile(test_zombie=ZOMBIE_ONLY_ISOLATED)
    result = run_lonely(*(("-n", workers) if workers else ()))
    assert result.parseoutcomes() == {"passed": 6}, result.stdout.str()
    seen = {p.name: p.read_text() for p in out.iterdir()}
    expected = {"main", "gw0", "gw1"} if workers else {"main"}
    assert set(seen) == expected, seen
    assert seen == dict.fromkeys(expected, ""), f"containers left at sessionfinish, per process: {seen}"


# --------------------------------------------------------------------------------------------------
# 4. pytest run in-process inside an isolated test keeps its inner session to itself
# --------------------------------------------------------------------------------------------------

NESTED_INNER = """
import pytest


def test_inner_passes():
    pass


def test_inner_fails():
    assert 0, "inner failure"


def test_inner_skips():
    pytest.skip("inner skip")
"""

NESTED = {
    "runpytest": """
def test_outer(pytester):
    pytester.makepyfile(INNER)
    pytester.runpytest().assert_outcomes(passed=1, failed=1, skipped=1)
""",
    "inline_run": """
def test_outer(pytester):
    pytester.makepyfile(INNER)
    pytester.inline_run().assertoutcome(passed=1, failed=1, skipped=1)
""",
    "runpytest_subprocess": """
def test_outer(pytester):
    pytester.makepyfile(INNER)
    pytester.runpytest_subprocess().assert_outcomes(passed=1, failed=1, skipped=1)
""",
    "subprocess_exit": """
def test_outer(pytester):
    pytester.makepyfile("import os\\ndef test_inner_exits():\\n    os._exit(3)\\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == 3, result.stdout.str()
""",
    "subprocess_segfault": """
def test_outer(pytester):
    pytester.makepyfile("import faulthandler\\ndef test_inner_segfaults():\\n    faulthandler._sigsegv()\\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == -signal.SIGSEGV, result.stdout.str()
    assert "Segmentation fault" in result.stderr.str()
""",
}


def test_nested_pytest_reports_stay_inside(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely
) -> None:
    """Bug 4: an isolated test that runs pytest loses its inner session's reports to the outer one.

    The inner session sees its own passing, failing and skipped tests (and a
    crashing subprocess its own exit); the OUTER totals are exactly the outer
    tests, and no inner test id is listed by the outer session.  Every kind of
    nested run is one isolated ``test_outer_KIND``, followed by a plain test,
    in one outer session.
    """
    source = "import signal\n\nimport pytest\n\npytest_plugins = ['pytester']\n\n" + f"INNER = {NESTED_INNER!r}\n"
    for kind, body in NESTED.items():
        outer = body.replace("def test_outer(", f"def test_outer_{kind}(")
        source += f"\n\n@pytest.mark.isolated{outer}\n\ndef test_plain_after_{kind}():\n    pass\n"
    pytester.makepyfile(test_nested=source)
    # Named explicitly: the reference run leaves the inner sessions' test files under its basetemp.
    reference = run_in_process("-rA", "-v", "test_nested.py")
    assert reference.parseoutcomes() == {"passed": 2 * len(NESTED)}, reference.stdout.str()
    isolated = run_lonely("-rA", "-v", "test_nested.py")
    everything = isolated.stdout.str()
    assert isolated.parseoutcomes() == {"passed": 2 * len(NESTED)}, everything
    assert isolated.ret == 0, everything
    assert short_summary(isolated) == short_summary(reference), everything
    outer_lines = [line for line in progress_region(isolated) if "test_inner_" in line]
    assert outer_lines == [], f"the outer session listed inner tests: {outer_lines}"
    assert not any("test_inner_" in line for line in short_summary(isolated)), everything


# --------------------------------------------------------------------------------------------------
# 5. Output of the parent's own threads during an isolated test is captured under that test
# --------------------------------------------------------------------------------------------------

HTTP_CONFTEST = """
import http.server
import threading

import pytest


class Handler(http.server.BaseHTTPRequestHandler):
    # The default log_message writes each request to sys.stderr, from the server's thread,
    # before the response goes out: by the time the client has its answer, the line is written.
    def do_GET(self):
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="session")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/"
    srv.shutdown()
    srv.server_close()
    thread.join()
"""

HTTP_TESTS = """
import urllib.request

import pytest


@pytest.mark.isolated
@pytest.mark.parametrize("n", range(5))
def test_get(server, n):
    assert urllib.request.urlopen(f"{server}?n={n}", timeout=10).read() == b"hello"


@pytest.mark.isolated
def test_get_then_fail(server):
    assert urllib.request.urlopen(f"{server}?n=fail", timeout=10).read() == b"hello"
    assert 0, "fails on purpose"
"""


def _get_lines_by_test(result: pytest.RunResult) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for (test, sub), lines in report_sections(result).items():
        gets = [re.sub(r"^.*\"(GET [^\"]*)\".*$", r"\1", line) for line in lines if '"GET /' in line]
        if gets:
            found.setdefault(test, []).extend(f"{sub}: {g}" for g in gets)
    return found


def test_parent_thread_output_is_captured_under_the_running_test(
    pytester: pytest.Pytester, run_lonely: RunLonely, run_in_process: RunLonely
) -> None:
    """Bug 5: what the parent's threads write while an isolated test runs goes straight to the terminal.

    In-process, pytest's capture files a session fixture's server-thread log
    lines under the test that was running; isolated, they must be too: none in
    the terminal outside the report sections, each in its test's
    ``Captured stderr call`` section (-rA shows the passing tests' too).
    """
    pytester.makeconftest(HTTP_CONFTEST)
    pytester.makepyfile(test_http=HTTP_TESTS)
    reference = run_in_process("-rA")
    assert reference.parseoutcomes() == {"passed": 5, "failed": 1}, reference.stdout.str()
    expected = _get_lines_by_test(reference)
    assert expected["test_get_then_fail"] == ["Captured stderr call: GET /?n=fail HTTP/1.1"], expected
    isolated = run_lonely("-rA")
    assert isolated.parseoutcomes() == {"passed": 5, "failed": 1}, isolated.stdout.str()
    leaked = [line for line in progress_region(isolated) + isolated.errlines if '"GET /' in line]
    assert leaked == [], "the server thread's lines reached the terminal:\n" + "\n".join(leaked)
    assert _get_lines_by_test(isolated) == expected, isolated.stdout.str()


# --------------------------------------------------------------------------------------------------
# 6. tmp_path of an isolated test exists on the host, under the session's basetemp
# --------------------------------------------------------------------------------------------------

TMP_TESTS = """
import pytest


@pytest.mark.isolated
def test_iso_fails(tmp_path):
    (tmp_path / "out.txt").write_text("from the failing test")
    print(f"TMP_PATH={tmp_path}")
    assert 0, "fails on purpose"


@pytest.mark.isolated
def test_iso_passes(tmp_path, tmp_path_factory):
    (tmp_path / "out.txt").write_text("from the passing test")
    made = tmp_path_factory.mktemp("made")
    (made / "m.txt").write_text("made by mktemp")
    print(f"TMP_PATH={tmp_path}")
    print(f"MKTEMP={made}")


@pytest.mark.isolated
@pytest.mark.parametrize("n", [1, 2])
def test_iso_param(tmp_path, n):
    (tmp_path / f"p{n}.txt").write_text(str(n))
    print(f"TMP_PATH={tmp_path}")


def test_plain(tmp_path):
    (tmp_path / "plain.txt").write_text("plain")
    print(f"TMP_PATH={tmp_path}")
"""


def listing(root: Path) -> list[str]:
    """Every entry under ``root``: a dir, a file with its content, a link with its target (relative to root)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = path.relative_to(root)
            if path.is_symlink():
                target = Path(os.readlink(path))
                if target.is_absolute() and target.is_relative_to(root):
                    target = target.relative_to(root)
                found.append(f"{rel} -> {target}")
            elif path.is_dir():
                found.append(f"{rel}/")
            elif name == ".lock":
                found.append(f"{rel} (lock)")  # holds a pid
            else:
                found.append(f"{rel}: {path.read_text(errors='replace')}")
    return sorted(found)


def printed_paths(result: pytest.RunResult, key: str) -> dict[str, Path]:
    """test header -> the path it printed as ``KEY=...`` (from the -rA report sections)."""
    found = {}
    for (test, _), lines in report_sections(result).items():
        for line in lines:
            if line.startswith(f"{key}="):
                found[test] = Path(line.split("=", 1)[1])
    return found


@pytest.fixture(params=["basetemp", "basetemp-under-tmp", "default"])
def where(request: pytest.FixtureRequest, pytester: pytest.Pytester) -> Iterator[tuple[str, Path]]:
    """Where the basetemps go: in the test's dir, directly under /tmp (a fresh tmpfs inside today), or default."""
    if request.param == "basetemp":
        yield request.param, pytester.path
        return
    path = Path(tempfile.mkdtemp(prefix="lonely-fidelity-", dir="/tmp"))
    yield request.param, path
    shutil.rmtree(path, ignore_errors=True)


def test_tmp_path_reaches_the_host(
    pytester: pytest.Pytester,
    run_lonely: RunLonely,
    run_in_process: RunLonely,
    monkeypatch: pytest.MonkeyPatch,
    where: tuple[str, Path],
) -> None:
    """Bug 6: an isolated test's tmp_path is lost, and the path in its report does not exist.

    After the session the failing test's ``out.txt`` is on the host at the path
    it printed; every isolated test had its own dir under the ONE basetemp of
    the session (not each its own ``pytest-0``); ``mktemp`` dirs too; and the
    whole basetemp lists exactly as after the in-process run.  With
    ``--basetemp`` given (in the test's dir, or under /tmp) and without it
    (``PYTEST_DEBUG_TEMPROOT`` keeps the numbered dirs private to this test).
    """
    pytester.makepyfile(test_tmp=TMP_TESTS)
    roots = {}
    results = {}
    for name, run in (("in-process", run_in_process), ("isolated", run_lonely)):
        base = where[1] / name
        roots[name] = base
        if where[0] == "default":
            base.mkdir()
            monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", str(base))
            results[name] = run_default_basetemp(pytester, name == "isolated", "-rA")
        else:
            results[name] = run("-rA", f"--basetemp={base}")
        assert results[name].parseoutcomes() == {"passed": 4, "failed": 1}, results[name].stdout.str()

    isolated = results["isolated"]
    paths = printed_paths(isolated, "TMP_PATH")
    assert set(paths) == {"test_iso_fails", "test_iso_passes", "test_iso_param[1]", "test_iso_param[2]", "test_plain"}
    failing = paths["test_iso_fails"] / "out.txt"
    assert failing.is_file(), f"{failing}, reported by the failing test, does not exist on the host"
    assert failing.read_text() == "from the failing test"
    assert len({p.parent for p in paths.values()}) == 1, f"not one basetemp for the session: {paths}"
    assert len(set(paths.values())) == len(paths), f"tests shared a tmp_path: {paths}"
    made = printed_paths(isolated, "MKTEMP")["test_iso_passes"]
    assert made.parent == paths["test_plain"].parent
    assert (made / "m.txt").read_text() == "made by mktemp"

    assert listing(roots["isolated"]) == listing(roots["in-process"])


@pytest.mark.parametrize("policy", ["all", "failed", "none"])
def test_tmp_path_retention_as_in_process(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """Bug 6: ``tmp_path_retention_policy`` and ``tmp_path_retention_count`` apply to isolated tests.

    E.g. "failed" removes a passing test's dir at its teardown.  Two sessions
    in a row in a private temproot; what is left lists exactly as in-process.
    """
    pytester.makeini(f"[pytest]\ntmp_path_retention_policy = {policy}\ntmp_path_retention_count = 1\n")
    pytester.makepyfile(test_tmp=TMP_TESTS)
    listings = {}
    for name in ("in-process", "isolated"):
        root = pytester.mkdir(f"temproot-{name}")
        monkeypatch.setenv("PYTEST_DEBUG_TEMPROOT", str(root))
        for _ in range(2):
            result = run_default_basetemp(pytester, name == "isolated", "-rA")
            assert result.parseoutcomes() == {"passed": 4, "failed": 1}, result.stdout.str()
        listings[name] = listing(root)
    assert listings["isolated"] == listings["in-process"]


# --------------------------------------------------------------------------------------------------
# 7. Our hooks in a conftest, with pytest-lonely disabled
# --------------------------------------------------------------------------------------------------

OPTIONAL_HOOKS_CONFTEST = """
import os

import pytest


@pytest.hookimpl(optionalhook=True)
def pytest_lonely_setup_container(container, item):
    pass


@pytest.hookimpl(optionalhook=True)
def pytest_lonely_container_finished(item, container, exitstatus):
    with open(os.environ["LONELY_FINISHED_LOG"], "a") as f:
        f.write(f"{item.name} {exitstatus}\\n")
"""

OPTIONAL_HOOKS_TESTS = """
import pytest


@pytest.mark.isolated
def test_marked():
    pass


def test_plain():
    pass
"""


@pytest.mark.parametrize("how", ["-p no:lonely", "-p no:lonely -n 2", "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1"])
def test_optional_hooks_without_the_plugin(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Bug 7: a conftest implementing our hooks with ``optionalhook=True`` must work with the plugin off.

    Exit code 0, no INTERNALERROR, the marked test simply runs in-process.
    """
    if "-n" in how and importlib.util.find_spec("xdist") is None:
        pytest.skip("needs the pytest plugin pytest-xdist (pip install pytest-xdist)")
    monkeypatch.setenv("LONELY_FINISHED_LOG", str(pytester.path / "finished.log"))
    pytester.makeconftest(OPTIONAL_HOOKS_CONFTEST)
    pytester.makepyfile(test_hooks=OPTIONAL_HOOKS_TESTS)
    if how.startswith("PYTEST_DISABLE"):
        monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
        args: list[str] = []
    else:
        args = how.split()
    result = pytester.runpytest_subprocess(
        *args, "-p", "no:cacheprovider", "-o", "markers=isolated: plugin off", timeout=120
    )
    everything = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in everything, everything
    assert result.ret == 0, everything
    assert result.parseoutcomes() == {"passed": 2}, everything
    assert not (pytester.path / "finished.log").exists()


def test_optional_hooks_with_the_plugin(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bug 7, the other side: the same optional hooks are still called when the plugin is on."""
    log = pytester.path / "finished.log"
    monkeypatch.setenv("LONELY_FINISHED_LOG", str(log))
    pytester.makeconftest(OPTIONAL_HOOKS_CONFTEST)
    pytester.makepyfile(test_hooks=OPTIONAL_HOOKS_TESTS)
    result = run_lonely()
    assert result.parseoutcomes() == {"passed": 2}, result.stdout.str()
    assert log.read_text() == "test_marked 0\n"


def test_hooks_without_optionalhook_are_pytests_own_error(pytester: pytest.Pytester) -> None:
    """Bug 7, documented: WITHOUT ``optionalhook=True`` and the plugin off, pytest refuses the conftest.

    That is pytest's own validation (pluggy's "unknown hook", exit 3), the
    same for any plugin's hooks; the README tells users to mark them optional.
    """
    pytester.makeconftest(OPTIONAL_HOOKS_CONFTEST.replace("@pytest.hookimpl(optionalhook=True)\n", ""))
    pytester.makepyfile(test_hooks=OPTIONAL_HOOKS_TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "no:lonely", "-p", "no:cacheprovider", "-o", "markers=isolated: plugin off", timeout=120
    )
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    assert "unknown hook 'pytest_lonely_" in result.stdout.str() + result.stderr.str()


# --------------------------------------------------------------------------------------------------
# 8. Papercuts: missing plugins skip with their name; --lonely-network speaks command-line terms
# --------------------------------------------------------------------------------------------------


def test_requires_plugin_skips_naming_the_plugin(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug 8: a test that needs a plugin that is not installed skips, and the reason names the plugin."""
    # This suite's helpers, imported by the inner session.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")]))
    )
    pytester.makepyfile(
        test_needs="from helpers.inner import requires_plugin\n\n\n"
        '@requires_plugin("pytest-surely-not-installed", "pytest_surely_not_installed")\n'
        "def test_needs_it():\n    raise AssertionError('must not run')\n\n\n"
        '@requires_plugin("pytest", "pytest")\ndef test_has_it():\n    pass\n'
    )
    result = pytester.runpytest_subprocess("-p", "no:lonely", "-p", "no:cacheprovider", "-rs", timeout=60)
    assert result.parseoutcomes() == {"passed": 1, "skipped": 1}, result.stdout.str()
    result.stdout.fnmatch_lines(["SKIPPED *needs the pytest plugin pytest-surely-not-installed*"])


NETWORK_TEST = """
import pytest


@pytest.mark.isolated
def test_nothing():
    pass
"""


def _usage_error(result: pytest.RunResult) -> str:
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text, text
    assert result.ret == pytest.ExitCode.USAGE_ERROR, text
    return text


@pytest.mark.parametrize("value", ["off", "banana"])
def test_lonely_network_bad_value_on_the_command_line(
    pytester: pytest.Pytester, run_lonely: RunLonely, value: str
) -> None:
    """Bug 8: ``--lonely-network`` takes ``host`` or ``none``; anything else is a usage error in those terms.

    Not "True"/"False" (marker terms): the message names the option, the bad
    value and the two allowed words.
    """
    pytester.makepyfile(test_net=NETWORK_TEST)
    text = _usage_error(run_lonely(f"--lonely-network={value}"))
    error = next((line for line in text.splitlines() if repr(value) in line), text)
    for word in ("--lonely-network", "host", "none"):
        assert word in error, error
    for word in ("True", "False"):
        assert word not in error, error


def test_lonely_network_bad_value_in_the_ini(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """Bug 8: ``lonely_network = banana`` in the ini is a usage error that names the ini key, not the option."""
    pytester.makeini("[pytest]\nlonely_network = banana\n")
    pytester.makepyfile(test_net=NETWORK_TEST)
    text = _usage_error(run_lonely())
    error = next(line for line in text.splitlines() if "banana" in line)
    for word in ("lonely_network", "host", "none"):
        assert word in error, error
    for word in ("--lonely-network", "True", "False"):
        assert word not in error, error


@pytest.mark.parametrize("value", ["host", "none"])
def test_lonely_network_good_values(pytester: pytest.Pytester, run_lonely: RunLonely, value: str) -> None:
    """Bug 8, the other side: the two documented words still work."""
    pytester.makepyfile(test_net=NETWORK_TEST)
    result = run_lonely(f"--lonely-network={value}")
    assert result.parseoutcomes() == {"passed": 1}, result.stdout.str()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-p", "no:randomly"]))
