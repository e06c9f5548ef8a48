"""End-to-end tests of the core runner: real inner pytest sessions, real namespaces, real mounts.

Nothing written inside a container reaches the host (the root is a
copy-on-write view), so the inner tests assert what they can see themselves
and report the rest through ordinary pytest channels: captured output (-rA),
junitxml, the terminal, or a file that only the PARENT writes (fixtures
broader than a function run there).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import xml.etree.ElementTree as ET

import pytest
from helpers.inner import RunLonely

root = pytest.mark.skipif(os.geteuid() != 0, reason="root mode: the rootless layout differs")

HEX12 = re.compile(r"[0-9a-f]{12}")

# Imported by the inner session in the PARENT: the pytest process's pid, and platform's uname cache
# primed with the host's name before any container is forked.
IDENTITY_CONFTEST = """
import os
import platform

SESSION_PID = os.getpid()
platform.uname()
PRIMED_NODE = platform.node()
"""

IDENTITY_TESTS = """
import os
import platform
import re
import socket
import shutil
import subprocess
import tempfile

import pytest

import conftest

HEX12 = re.compile(r"[0-9a-f]{12}")


def names():
    return {
        "socket": socket.gethostname(),
        "uname": os.uname().nodename,
        "platform": platform.node(),
        "env": os.environ["HOSTNAME"],
    }


@pytest.mark.isolated
def test_pid1_sees_only_itself():
    assert os.getpid() == 1
    assert os.getppid() == 0
    assert sorted(e for e in os.listdir("/proc") if e.isdigit()) == ["1"]
    ps = subprocess.Popen(["ps", "-e", "-o", "pid=,comm="], stdout=subprocess.PIPE, text=True)
    out, _ = ps.communicate()
    assert ps.returncode == 0
    rows = {int(pid): comm for pid, comm in (line.split(None, 1) for line in out.splitlines())}
    assert set(rows) == {1, ps.pid}, out
    assert rows[ps.pid] == "ps"


@pytest.mark.isolated
def test_default_hostname(container):
    assert HEX12.fullmatch(container.id)
    assert container.hostname == container.id
    assert names() == dict.fromkeys(names(), container.id)
    # The parent really did cache the host's name before the fork.
    assert conftest.PRIMED_NODE == os.environ["LONELY_HOST_NAME"] != container.id
    print(f"CID={container.id}")


@pytest.mark.isolated(hostname="lonely-box")
def test_marker_hostname(container):
    assert container.hostname == "lonely-box"
    assert names() == dict.fromkeys(names(), "lonely-box")
    print(f"CID={container.id}")


@pytest.mark.isolated
def test_container_fields(container):
    assert type(container.host_pid) is int
    assert container.host_pid > 1
    assert container.host_pid != conftest.SESSION_PID
    assert container.namespaces == {"pid", "mnt", "uts", "ipc"}
    assert container.rootless is False
    assert container.rootfs is None
    print(f"CID={container.id}")


def test_unmarked_with_container_fixture(container):
    assert os.getpid() == 1
    assert os.getppid() == 0
    print(f"CID={container.id}")


def test_unmarked_runs_in_process():
    assert os.getpid() == conftest.SESSION_PID != 1
"""


@root
def test_identity_pid_hostname_and_container_fixture(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PID 1 with a private process table, own hostname everywhere Python looks, and the container fixture."""
    host_name = socket.gethostname()
    monkeypatch.setenv("HOSTNAME", host_name)
    monkeypatch.setenv("LONELY_HOST_NAME", host_name)
    pytester.makeconftest(IDENTITY_CONFTEST)
    pytester.makepyfile(test_identity=IDENTITY_TESTS)
    result = run_lonely("-rA", "--strict-markers", timeout=60)
    result.assert_outcomes(passed=6)
    result.stdout.fnmatch_lines(["lonely: root mode, namespaces pid,mnt,uts,ipc, rootfs host view*"])
    ids = [line[4:] for line in result.stdout.lines if line.startswith("CID=")]
    assert len(ids) == 4, result.stdout.str()
    assert all(HEX12.fullmatch(cid) for cid in ids), ids
    assert len(set(ids)) == len(ids), f"container ids repeat within one run: {ids}"


TMPDIR_TESTS = """
import os, tempfile, pytest

CACHED = tempfile.gettempdir()  # chosen in pytest before any fork, as a suite's helper module may do

@pytest.mark.isolated
@pytest.mark.parametrize("n", range(2))  # the second container comes from the zygote
def test_mkstemp_in_tmpdir(n):
    fd, path = tempfile.mkstemp()
    os.close(fd)
    assert os.path.dirname(path) == CACHED == os.environ["TMPDIR"]
"""


def test_a_tmpdir_under_tmp_exists_inside(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI often sets ``TMPDIR`` below ``/tmp``; the container's fresh ``/tmp`` must have it (plumbum's suite does)."""
    tmpdir = tempfile.mkdtemp(prefix="lonely-tmpdir-", dir="/tmp")
    try:
        monkeypatch.setenv("TMPDIR", tmpdir)
        pytester.makepyfile(test_tmpdir=TMPDIR_TESTS)
        result = run_lonely("-rA", timeout=60)
        result.assert_outcomes(passed=2)
        assert os.listdir(tmpdir) == [], "the container's files stay in the container's /tmp"
    finally:
        shutil.rmtree(tmpdir)


def test_marker_is_registered(run_lonely: RunLonely) -> None:
    result = run_lonely("--markers", timeout=60)
    assert result.ret == 0
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.isolated(hostname=None, rootfs=None, timeout=None, network=None, "
            'memory=None, pids=None, cpus=None, privileged=False, scope="function"):*'
        ]
    )


def test_explicit_plugin_without_autoload_and_dash_s(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`-p lonely` alone must be enough; with -s the container's output goes straight to the terminal."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.isolated
        def test_loud():
            print(f"straight to the terminal from pid {os.getpid()}")
            assert os.getpid() == 1
        """
    )
    result = run_lonely("-s", "-rA", "--strict-markers", timeout=60)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*straight to the terminal from pid 1*"])
    result.stdout.no_fnmatch_line("*Captured stdout call*")


def test_no_lonely_disables_plugin(pytester: pytest.Pytester) -> None:
    """With -p no:lonely the marker is unknown and the fixture is missing (the entry point is blocked)."""
    pytester.makepyfile(
        test_marked="""
        import pytest

        @pytest.mark.isolated
        def test_marked():
            pass
        """,
        test_fixture="""
        def test_fixture(container):
            pass

        def test_plain():
            pass
        """,
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:lonely", "-p", "no:cacheprovider", "--strict-markers", "--continue-on-collection-errors", timeout=60
    )
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*'isolated' not found in `markers` configuration option*"])
    result.stdout.fnmatch_lines(["*fixture 'container' not found*"])
    result.stdout.no_fnmatch_line("lonely: *")


STOP_TESTS = """
import pytest

@pytest.mark.isolated
def test_1_fails():
    assert False, "first"

@pytest.mark.isolated
def test_2_fails():
    assert False, "second"

@pytest.mark.isolated
def test_3_passes():
    pass

def test_4_plain():
    pass
"""


@pytest.mark.parametrize(("option", "failed"), [("-x", 1), ("--maxfail=1", 1), ("--maxfail=2", 2)])
def test_maxfail_counts_isolated_failures(
    pytester: pytest.Pytester, run_lonely: RunLonely, option: str, failed: int
) -> None:
    pytester.makepyfile(test_stop=STOP_TESTS)
    result = run_lonely(option, timeout=60)
    result.assert_outcomes(failed=failed)
    result.stdout.fnmatch_lines([f"*stopping after {failed} failures*"])


def test_last_failed_reruns_only_the_isolated_failure(pytester: pytest.Pytester) -> None:
    """--lf needs the cache plugin, which sees the reports in the parent."""
    pytester.makepyfile(test_stop=STOP_TESTS.replace('assert False, "second"', "pass"))
    first = pytester.runpytest_subprocess("-p", "lonely", timeout=60)
    first.assert_outcomes(failed=1, passed=3)
    second = pytester.runpytest_subprocess("-p", "lonely", "--lf", "-v", timeout=60)
    second.assert_outcomes(failed=1)
    second.stdout.fnmatch_lines(
        ["*collected 1 item", "run-last-failure: rerun previous 1 failure", "test_stop.py::test_1_fails FAILED*"]
    )
    second.stdout.no_fnmatch_line("*test_2_fails*")


REPORT_TESTS = """
import os
import time
import warnings

import pytest


@pytest.mark.isolated
def test_pass():
    assert os.getpid() == 1
    print("hello from the container")


@pytest.mark.isolated
def test_fail():
    print("output of a failing test")
    assert 1 == 2


@pytest.mark.isolated
def test_skip():
    pytest.skip("not today")


@pytest.mark.isolated
def test_slow():
    time.sleep(0.3)


@pytest.mark.isolated
def test_warns(record_property):
    record_property("answer", 42)
    record_property("where", "inside")
    warnings.warn("boom", UserWarning)


def test_plain():
    pass
"""


def test_reports_durations_junitxml_warnings_and_output(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """Reports from the child feed every consumer of reports in the parent as if the test ran in-process."""
    pytester.makepyfile(test_report=REPORT_TESTS)
    xml_path = pytester.path / "junit.xml"
    result = run_lonely("-rA", "--durations=3", f"--junitxml={xml_path}", "-o", "junit_family=xunit1", timeout=60)
    result.assert_outcomes(passed=4, failed=1, skipped=1, warnings=1)
    out = result.stdout

    # Captured output: a passing test's under -rA, a failing test's in its failure section.
    out.fnmatch_lines(
        [
            "*= FAILURES =*",
            "*_ test_fail _*",
            "E * assert 1 == 2",
            "*- Captured stdout call -*",
            "output of a failing test",
        ]
    )
    out.fnmatch_lines(["*= PASSES =*", "*_ test_pass _*", "*- Captured stdout call -*", "hello from the container"])

    # -rA short summary (a superset of -rs), with the skip located in the test file.
    out.fnmatch_lines(["*short test summary info*"])
    for line in (
        "PASSED test_report.py::test_pass",
        "PASSED test_report.py::test_slow",
        "PASSED test_report.py::test_warns",
        "PASSED test_report.py::test_plain",
        "SKIPPED [[]1[]] test_report.py:*: not today",
        "FAILED test_report.py::test_fail - assert 1 == 2",
    ):
        out.fnmatch_lines([line])

    # --durations lists the isolated test with its call phase.
    out.fnmatch_lines(["*slowest 3 durations*"])
    slow = [line for line in out.lines if re.fullmatch(r"\s*[\d.]+s call\s+test_report\.py::test_slow", line)]
    assert len(slow) == 1, out.str()
    assert float(slow[0].split()[0].rstrip("s")) >= 0.3

    # The warning raised in the child is charged to the right test.
    out.fnmatch_lines(["*= warnings summary =*", "test_report.py::test_warns", "*test_report.py:*: UserWarning: boom"])

    suite = ET.parse(xml_path).getroot().find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped"), suite.get("errors")) == (
        "6",
        "1",
        "1",
        "0",
    )
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"test_pass", "test_fail", "test_skip", "test_slow", "test_warns", "test_plain"}
    assert all(case.get("classname") == "test_report" for case in cases.values())
    assert [child.tag for child in cases["test_pass"]] == []
    assert [child.tag for child in cases["test_fail"]] == ["failure"]
    skipped = cases["test_skip"].find("skipped")
    assert skipped is not None
    assert skipped.get("message") == "not today"
    assert "test_report.py:" in (skipped.text or "")
    props = cases["test_warns"].find("properties")
    assert props is not None
    assert [(p.get("name"), p.get("value")) for p in props] == [("answer", "42"), ("where", "inside")]


FIXTURE_CONFTEST = """
import os

import pytest

SESSION_PID = os.getpid()


def log(event):
    # A container's writes land in its own copy of the filesystem: the assertion makes one seen.
    assert os.getpid() == SESSION_PID, f"{event} ran in a container"
    with open(os.environ["LONELY_FIXTURE_LOG"], "a") as f:
        f.write(f"{event} {os.getpid()}\\n")


log("import")


@pytest.fixture(scope="session")
def shared():
    log("session-setup")
    yield "shared"
    log("session-teardown")


@pytest.fixture(scope="module")
def per_module():
    log("module-setup")
    yield
    log("module-teardown")


@pytest.fixture(scope="class")
def per_class():
    log("class-setup")
    yield
    log("class-teardown")


@pytest.fixture
def per_test():
    print(f"func-setup pid={os.getpid()}")
    assert os.getpid() == 1
    yield
    print(f"func-teardown pid={os.getpid()}")
    assert os.getpid() == 1
"""

FIXTURE_TESTS_ONE = """
import os

import pytest

import conftest


@pytest.mark.isolated
def test_a(shared, per_module, tmp_path, monkeypatch, capsys):
    assert os.getpid() == 1
    assert shared == "shared"
    monkeypatch.setenv("LONELY_LEAK", "from test_a")
    assert os.environ["LONELY_LEAK"] == "from test_a"
    (tmp_path / "note.txt").write_text("inside")
    assert (tmp_path / "note.txt").read_text() == "inside"
    print("via capsys")
    assert capsys.readouterr().out == "via capsys\\n"


def test_b_plain():
    assert os.getpid() == conftest.SESSION_PID != 1
    assert "LONELY_LEAK" not in os.environ


class TestGroup:
    @pytest.mark.isolated
    def test_c(self, per_class, per_module, shared, per_test):
        assert os.getpid() == 1

    @pytest.mark.isolated
    def test_d(self, per_class, per_module):
        assert os.getpid() == 1
"""

FIXTURE_TESTS_TWO = """
import os

import pytest


@pytest.mark.isolated
def test_e(per_module, shared):
    assert os.getpid() == 1
    assert "LONELY_LEAK" not in os.environ


@pytest.mark.isolated
@pytest.mark.parametrize("n", range(3))
def test_f(per_module, shared, n):  # from the second on, containers come from a zygote forked before their setup
    assert os.getpid() == 1
"""


def test_fixture_scopes(pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch) -> None:
    """Broader fixtures run once per scope in the parent; function fixtures run in the child.

    A broader fixture's teardown never runs in a container too (pytest 8.0 and
    8.1 register a cached fixture's finish again at each request).
    """
    log = pytester.path / "fixtures.log"
    monkeypatch.setenv("LONELY_FIXTURE_LOG", str(log))
    pytester.makeconftest(FIXTURE_CONFTEST)
    pytester.makepyfile(test_one=FIXTURE_TESTS_ONE, test_two=FIXTURE_TESTS_TWO)
    result = run_lonely("-rA", timeout=60)
    result.assert_outcomes(passed=8)

    events = [line.split() for line in log.read_text().splitlines()]
    pids = {int(pid) for _, pid in events}
    assert len(pids) == 1, events
    assert pids != {1}
    assert [event for event, _ in events] == [
        "import",
        "session-setup",
        "module-setup",
        "class-setup",
        "class-teardown",
        "module-teardown",
        "module-setup",
        "module-teardown",
        "session-teardown",
    ]
    result.stdout.fnmatch_lines(
        [
            "*_ TestGroup.test_c _*",
            "*- Captured stdout setup -*",
            "func-setup pid=1",
            "*- Captured stdout teardown -*",
            "func-teardown pid=1",
        ]
    )


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


def _pgrep(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False)
    return [int(pid) for pid in found.stdout.split()]


HOST_TESTS = """
import ctypes
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

CANARY = Path(os.environ["LONELY_CANARY"])
SLEEP = os.environ["LONELY_SLEEP_ARG"]


def sleepers():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\\0")[:2] == [b"sleep", SLEEP.encode()]:
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.isolated
def test_writes_to_etc():
    CANARY.write_text("inside")
    assert CANARY.read_text() == "inside"


@pytest.mark.isolated
def test_leaves_a_daemon_behind():
    subprocess.run(f"setsid sleep {SLEEP} &", shell=True, check=True)
    deadline = time.monotonic() + 10
    while not sleepers():
        assert time.monotonic() < deadline, "the sleeper never started"
        time.sleep(0.01)


@pytest.mark.isolated
def test_segfaults():
    print("last words before the crash")
    ctypes.string_at(0)


@pytest.mark.isolated
def test_after_the_crash():
    assert os.getpid() == 1
"""


def test_crash_and_host_left_unchanged(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A segfaulting child fails only its own test; files, mounts and processes made inside stay inside."""
    canary = f"/etc/lonely-canary-{secrets.token_hex(6)}"
    sleep_arg = f"987.{secrets.randbelow(10**6):06d}"
    pattern = f"sleep {sleep_arg}"
    assert not os.path.exists(canary)
    assert not _pgrep(pattern)
    monkeypatch.setenv("LONELY_CANARY", canary)
    monkeypatch.setenv("LONELY_SLEEP_ARG", sleep_arg)
    pytester.makepyfile(test_host=HOST_TESTS)
    mounts_before = _mountpoints()
    try:
        result = run_lonely(timeout=60)
        leaked_file = os.path.exists(canary)
        leaked_procs = _pgrep(pattern)
        mounts_after = _mountpoints()
    finally:
        if os.path.exists(canary):
            os.unlink(canary)
        for pid in _pgrep(pattern):
            os.kill(pid, signal.SIGKILL)

    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_segfaults _*",
            "*container exited with signal 11 (SIGSEGV)*",
            "*- Captured stdout call -*",
            "last words before the crash",
        ]
    )
    result.stdout.fnmatch_lines(["FAILED test_host.py::test_segfaults - Failed: container exited with signal 11*"])
    assert not leaked_file, f"{canary} written inside a container appeared on the host"
    assert mounts_after == mounts_before
    assert not leaked_procs, f"processes started in a container outlived it: {leaked_procs}"
