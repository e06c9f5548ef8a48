"""Reliability (issue 4): crashes, timeouts, interrupts, leaks, big payloads and bad input.

Every test drives a real pytest session in a subprocess, with real namespaces and real signals.  Where the outer
test has to act while the inner session runs (kill a container, interrupt pytest) the inner session is started
with ``subprocess.Popen`` and talks back through a file opened by a session fixture: session fixtures are set up in
the parent and inherited by the fork, so that file is the one thing the container can write that the host sees
(everything else it writes lands in its throwaway copy-on-write root).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.inner import unique_sleeps

# --- helpers ----------------------------------------------------------------------------------------------------------


def handshake_conftest(path: Path) -> str:
    """An inner conftest whose ``handshake`` fixture writes lines to ``path`` on the host, from inside a container.

    A container inherits no file of the session's, so the fixture writes by path, into the session's
    basetemp (the one host directory a container may write to); ``path`` is a symlink to that file.
    """
    return f"""
import os

import pytest

@pytest.fixture(scope="session")
def handshake(tmp_path_factory):
    real = tmp_path_factory.getbasetemp() / "handshake.txt"
    real.touch()
    os.symlink(real, {str(path)!r})

    class Handshake:
        def write(self, text):
            with open(real, "a") as f:
                f.write(text)

    yield Handshake()
"""


def section(output: pytest.RunResult | str, title: str) -> str:
    """The text of one failure/error section (``____ title ____``) of a session's terminal output."""
    lines = output.stdout.lines if isinstance(output, pytest.RunResult) else output.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("_") and line.strip("_ ") == title:
            body = []
            for following in lines[i + 1 :]:
                if following.startswith(("____", "====")):
                    break
                body.append(following)
            return "\n".join(body)
    raise AssertionError(f"no section {title!r} in the output:\n" + "\n".join(lines[-100:]))


def line_of(source: str, needle: str) -> int:
    """1-based line number, in the file ``makepyfile`` writes (it strips ``source``), of the line with ``needle``."""
    found = [n for n, line in enumerate(source.strip().splitlines(), 1) if needle in line]
    assert len(found) == 1, (needle, found)
    return found[0]


def running(pattern: str) -> list[str]:
    """``pgrep -af pattern``: live processes (zombies have no command line) whose command line matches."""
    proc = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True, check=False)
    return proc.stdout.splitlines()


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2 :].split()[0] != b"Z"


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds (a hang guard, not a timing)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.05)


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return int(text.split()[0]) if text.endswith("\n") else None


#: Python raises KeyboardInterrupt only if SIGINT was not ignored when it started, and a background job of a
#: non-interactive shell (a CI script, ``nohup``) starts with SIGINT ignored: the inner session starts with the default.
DEFAULT_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


@contextlib.contextmanager
def spawned(pytester: pytest.Pytester, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """An inner ``pytest -p lonely`` running in the background; killed and reaped on the way out, whatever happens."""
    log = pytester.path / "inner-output.txt"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", DEFAULT_SIGINT, "-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", *args],
            cwd=pytester.path,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def kill_leftover(pid: int | None) -> None:
    """Clean-up after a failed assertion: SIGKILL to a container's PID 1 takes its whole PID namespace down."""
    if pid is not None and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- 1. crashes -------------------------------------------------------------------------------------------------------

CRASHES = """
import ctypes
import os
import sys

import pytest


@pytest.mark.isolated
def test_segfault():
    print("last words before SIGSEGV")
    ctypes.string_at(0)  # segfault here


def test_after_segfault():
    pass


@pytest.mark.isolated
def test_exit_status():
    print("last words before _exit")
    sys.stdout.flush()
    os._exit(7)


@pytest.mark.isolated
def test_isolated_after_exit_status():
    pass


@pytest.mark.isolated
def test_sys_exit():
    sys.exit(3)


@pytest.fixture
def dies_in_teardown():
    yield
    ctypes.string_at(0)


@pytest.mark.isolated
def test_teardown_segfaults(dies_in_teardown):
    pass


def test_last():
    pass
"""


def test_crashes_are_reported_with_their_cause_and_the_session_goes_on(run_lonely, pytester: pytest.Pytester) -> None:
    """A dead container fails its own test with the signal or status, plus what faulthandler saw, and nothing else."""
    pytester.makepyfile(test_crashes=CRASHES)
    result = run_lonely("-rA", timeout=60)

    # The teardown crash keeps the PASSED call report already streamed and adds an ERROR for the teardown.
    result.assert_outcomes(passed=4, failed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "PASSED test_crashes.py::test_after_segfault",
            "PASSED test_crashes.py::test_isolated_after_exit_status",
            "PASSED test_crashes.py::test_teardown_segfaults",
            "PASSED test_crashes.py::test_last",
            "ERROR test_crashes.py::test_teardown_segfaults - Failed: container exited*",
        ],
        consecutive=False,
    )

    segv = section(result, "test_segfault")
    assert "container exited with signal 11 (SIGSEGV)" in segv
    assert "Fatal Python error: Segmentation fault" in segv
    assert f'test_crashes.py", line {line_of(CRASHES, "# segfault here")} in test_segfault' in segv
    assert "last words before SIGSEGV" in segv  # output printed before the death

    status = section(result, "test_exit_status")
    assert "container exited with status 7" in status
    assert "last words before _exit" in status

    # sys.exit() is an ordinary exception inside the test, not a death of the container.
    sys_exit = section(result, "test_sys_exit")
    assert "SystemExit: 3" in sys_exit
    assert "container exited" not in sys_exit

    teardown = section(result, "ERROR at teardown of test_teardown_segfaults")
    assert "container exited with signal 11 (SIGSEGV)" in teardown
    assert "in dies_in_teardown" in teardown
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()


def test_container_killed_from_outside_is_reported_as_sigkill(pytester: pytest.Pytester) -> None:
    """SIGKILL to the container's PID 1 from the host (what the OOM killer does).

    Really exhausting memory is too risky on a shared 2-core box, so the kernel's OOM kill is simulated by the same
    signal sent from the host to the host PID the container reports about itself.
    """
    handshake = pytester.path / "handshake.txt"
    pytester.makeconftest(handshake_conftest(handshake))
    pytester.makepyfile(
        test_killed="""
        import time
        import pytest

        @pytest.mark.isolated
        def test_killed(handshake, container):
            print("printed before the kill")
            handshake.write(f"{container.host_pid}\\n")
            time.sleep(30)

        @pytest.mark.isolated
        def test_next_isolated():
            pass

        def test_next_plain():
            pass
        """
    )
    host_pid = None
    with spawned(pytester, "-rA") as (proc, log):
        try:
            wait_for(lambda: read_pid(handshake) is not None, 30, "the container to report its host PID")
            host_pid = read_pid(handshake)
            assert host_pid is not None
            os.kill(host_pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            kill_leftover(host_pid)
    output = log.read_text()
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, output
    killed = section(output, "test_killed")
    assert "container exited with signal 9 (SIGKILL)" in killed
    assert "printed before the kill" in killed
    assert "PASSED test_killed.py::test_next_isolated" in output
    assert "PASSED test_killed.py::test_next_plain" in output
    assert "1 failed, 2 passed" in output


EXITING = """
import pytest

def test_before():
    pass

{marker}
def test_exits():
    pytest.exit("bye")

def test_never_runs():
    pass
"""


def test_pytest_exit_inside_ends_the_session_as_without_isolation(run_lonely, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_exit_isolated=EXITING.format(marker="@pytest.mark.isolated"))
    pytester.makepyfile(test_exit_plain=EXITING.format(marker=""))
    isolated = run_lonely("-rA", "test_exit_isolated.py", timeout=60)
    plain = run_lonely("-rA", "test_exit_plain.py", timeout=60)

    assert plain.ret == pytest.ExitCode.INTERRUPTED
    assert isolated.ret == plain.ret
    assert isolated.parseoutcomes() == plain.parseoutcomes()
    isolated.stdout.fnmatch_lines(["*Exit: bye*"])
    assert "test_never_runs" not in isolated.stdout.str()
    assert "INTERNALERROR" not in isolated.stdout.str() + isolated.stderr.str()


# --- 2. timeouts ------------------------------------------------------------------------------------------------------

HANGING = """
import subprocess
import time

import pytest


@pytest.mark.isolated(timeout=1)
def test_hangs():
    subprocess.Popen(["setsid", "sleep", "987.321"])
    time.sleep(60)


@pytest.mark.isolated
def test_next():
    pass
"""


def test_timeout_kills_the_whole_container_and_shows_where_it_hung(run_lonely, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_hanging=unique_sleeps(HANGING))
    start = time.monotonic()
    result = run_lonely("-rA", timeout=60)
    elapsed = time.monotonic() - start

    result.assert_outcomes(passed=1, failed=1)
    hang = assert_timed_out(result, "test_hangs", 1)
    assert f'test_hanging.py", line {line_of(HANGING, "time.sleep(60)")} in test_hangs' in hang
    result.stdout.fnmatch_lines(["PASSED test_hanging.py::test_next"])
    assert not running(unique_sleeps("987.321")), "a daemon of the timed-out container survived"
    assert elapsed < 15, f"the inner session took {elapsed:.1f} s for a 1 s timeout"


def assert_timed_out(result: pytest.RunResult, test: str, seconds: int) -> str:
    """The failure of ``test`` says it timed out, after how long, and shows where it was stuck."""
    text = section(result, test)
    assert "Timeout" in text
    assert f"{seconds} second" in text
    assert f"in {test}" in text  # faulthandler's traceback of the hung test
    return text


def test_timeout_from_command_line_and_marker_zero_disables_it(run_lonely, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_cli_timeout="""
        import time
        import pytest

        @pytest.mark.isolated
        def test_hangs():
            time.sleep(30)

        @pytest.mark.isolated(timeout=0)
        def test_marker_disables_cli_timeout():
            time.sleep(2)
        """
    )
    result = run_lonely("-rA", "--lonely-timeout", "1", timeout=60)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["PASSED test_cli_timeout.py::test_marker_disables_cli_timeout"])
    assert_timed_out(result, "test_hangs", 1)


def test_timeout_from_ini(run_lonely, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nlonely_timeout = 1\n")
    pytester.makepyfile(
        test_ini_timeout="""
        import time
        import pytest

        @pytest.mark.isolated
        def test_hangs():
            time.sleep(30)
        """
    )
    result = run_lonely("-rA", timeout=60)
    result.assert_outcomes(failed=1)
    assert_timed_out(result, "test_hangs", 1)


def test_timeout_precedence_marker_over_command_line_over_ini(run_lonely, pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nlonely_timeout = 1\n")
    pytester.makepyfile(
        test_precedence="""
        import time
        import pytest

        @pytest.mark.isolated
        def test_command_line_beats_ini():
            time.sleep(2)

        @pytest.mark.isolated(timeout=1)
        def test_marker_beats_command_line():
            time.sleep(30)
        """
    )
    result = run_lonely("-rA", "--lonely-timeout=20", timeout=60)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["PASSED test_precedence.py::test_command_line_beats_ini"])
    assert_timed_out(result, "test_marker_beats_command_line", 1)


# --- 3. interrupts ----------------------------------------------------------------------------------------------------

LONG_RUNNING = """
import subprocess
import time

import pytest


def test_first():
    pass


@pytest.mark.isolated
def test_long(handshake, container):
    subprocess.Popen(["setsid", "sleep", "{tag}"])
    handshake.write(f"{{container.host_pid}}\\n")
    time.sleep(60)


def test_never_reached():
    pass
"""


def test_ctrl_c_stops_the_session_and_the_container(pytester: pytest.Pytester) -> None:
    handshake = pytester.path / "handshake.txt"
    pytester.makeconftest(handshake_conftest(handshake))
    pytester.makepyfile(test_interrupted=LONG_RUNNING.format(tag=unique_sleeps("987.555")))
    host_pid = None
    with spawned(pytester, "-rA") as (proc, log):
        try:
            wait_for(lambda: read_pid(handshake) is not None, 30, "the isolated test to start")
            host_pid = read_pid(handshake)
            wait_for(lambda: bool(running(unique_sleeps("987.555"))), 10, "the daemon inside the container")
            os.kill(proc.pid, signal.SIGINT)
            proc.wait(timeout=10)
        finally:
            kill_leftover(host_pid)
    output = log.read_text()
    assert "KeyboardInterrupt" in output
    assert "PASSED test_interrupted.py::test_first" in output
    assert "1 passed" in output
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, output
    assert host_pid is not None
    assert not pid_alive(host_pid), "the container's PID 1 outlived the interrupted session"
    assert not running(unique_sleeps("987.555")), "a daemon of the interrupted container survived"


def test_container_dies_with_its_pytest(pytester: pytest.Pytester) -> None:
    """SIGKILL to pytest itself (no handler runs): the kernel must still take the container down."""
    handshake = pytester.path / "handshake.txt"
    pytester.makeconftest(handshake_conftest(handshake))
    pytester.makepyfile(test_orphaned=LONG_RUNNING.format(tag=unique_sleeps("987.666")))
    host_pid = None
    with spawned(pytester) as (proc, _):
        try:
            wait_for(lambda: read_pid(handshake) is not None, 30, "the isolated test to start")
            host_pid = read_pid(handshake)
            assert host_pid is not None
            wait_for(lambda: bool(running(unique_sleeps("987.666"))), 10, "the daemon inside the container")
            proc.kill()
            proc.wait(timeout=10)
            wait_for(lambda: not pid_alive(host_pid), 5, f"the orphaned container's PID 1 ({host_pid}) to die")
            wait_for(lambda: not running(unique_sleeps("987.666")), 5, "the orphaned container's daemon to die")
        finally:
            kill_leftover(host_pid)


# --- 4. leaks ---------------------------------------------------------------------------------------------------------


def test_daemon_started_inside_is_gone_after_the_test(run_lonely, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_daemon=unique_sleeps(
            """
        import os
        import subprocess
        import time

        import pytest

        def running():
            out = subprocess.run(["pgrep", "-af", "987.777"], capture_output=True, text=True).stdout
            return out.splitlines()

        @pytest.mark.isolated
        def test_starts_daemon():
            os.system("setsid sleep 987.777 &")
            deadline = time.monotonic() + 10
            while not running():
                assert time.monotonic() < deadline, "the daemon never started"
                time.sleep(0.05)

        def test_daemon_is_gone():
            # In the host, right after the container's test: a few seconds for the kernel to finish the teardown.
            deadline = time.monotonic() + 5
            while running():
                assert time.monotonic() < deadline, running()
                time.sleep(0.05)
        """
        )
    )
    result = run_lonely("-p", "no:randomly", timeout=60)
    result.assert_outcomes(passed=2)
    assert not running(unique_sleeps("987.777"))


STRESS_CONFTEST = """
import json
import os

import pytest

SNAPSHOTS = {{}}


def snapshot():
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f)
    me = os.getpid()
    zombies = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{{entry}}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            fields = data[data.rindex(b")") + 2 :].split()
            if fields[0] == b"Z" and int(fields[1]) == me:
                zombies.append(int(entry))
    with open("/proc/self/status") as f:
        rss_kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return {{"mounts": mounts, "fds": len(os.listdir("/proc/self/fd")), "zombies": zombies, "rss_kb": rss_kb}}


def pytest_sessionstart(session):
    SNAPSHOTS["start"] = snapshot()


def pytest_runtest_logfinish(nodeid, location):
    # After the first container the launcher holds its few long-lived fds; growth from here on is a leak.
    SNAPSHOTS.setdefault("after_first", snapshot())


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    SNAPSHOTS["finish"] = snapshot()
    with open({out!r}, "w") as f:
        json.dump(SNAPSHOTS, f)
"""


def test_many_containers_leak_nothing_in_the_parent(run_lonely, pytester: pytest.Pytester) -> None:
    """400 containers in one session: the pytest process keeps its mounts, fds and memory, and reaps every child."""
    out = pytester.path / "snapshots.json"
    pytester.makeconftest(STRESS_CONFTEST.format(out=str(out)))
    pytester.makepyfile(
        test_stress="""
        import pytest

        @pytest.mark.isolated
        @pytest.mark.parametrize("n", range(400))
        def test_trivial(n):
            pass
        """
    )
    result = run_lonely("-q", timeout=120)
    result.assert_outcomes(passed=400)
    snaps = json.loads(out.read_text())
    start, first, finish = snaps["start"], snaps["after_first"], snaps["finish"]
    assert finish["mounts"] == start["mounts"]
    assert finish["fds"] <= first["fds"], f"fds grew from {first['fds']} to {finish['fds']} over 399 containers"
    assert finish["fds"] <= start["fds"] + 4, "more long-lived fds than the launcher needs"
    assert finish["zombies"] == []
    growth_mb = (finish["rss_kb"] - start["rss_kb"]) / 1024
    assert growth_mb < 30, f"RSS grew by {growth_mb:.1f} MB over 400 containers"


# --- 5. pipe robustness -----------------------------------------------------------------------------------------------

PIPES = """
import sys

import pytest


@pytest.mark.isolated
def test_floods_stdout():
    line = "x" * 1023 + "\\n"
    for _ in range(20 * 1024):
        sys.stdout.write(line)


@pytest.mark.isolated
def test_long_assertion_message():
    assert False, "m" * 200_000 + "END-OF-LONG-MESSAGE-5c1e"


@pytest.mark.isolated
def test_unserialisable_properties(record_property):
    record_property("plain", 42)
    record_property("object", object())
    record_property("function", lambda: None)
"""


def test_big_outputs_and_odd_values_cross_the_pipe(run_lonely, pytester: pytest.Pytester) -> None:
    """20 MB of captured output, a 200 kB message and values marshal refuses must neither hang nor get lost."""
    pytester.makepyfile(test_pipes=PIPES)
    xml_path = pytester.path / "junit.xml"
    result = run_lonely("-rA", f"--junitxml={xml_path}", timeout=90)

    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["PASSED test_pipes.py::test_floods_stdout"])
    assert result.stdout.str().count("x" * 1023) >= 20 * 1024  # -rA shows the whole captured output
    long_message = section(result, "test_long_assertion_message")
    assert "m" * 200_000 + "END-OF-LONG-MESSAGE-5c1e" in long_message

    result.stdout.fnmatch_lines(["PASSED test_pipes.py::test_unserialisable_properties"])
    warnings_summary = result.stdout.str().split("warnings summary", 1)[-1]
    assert "record_property('object'" in warnings_summary
    assert "record_property('function'" in warnings_summary

    case = next(c for c in ET.parse(xml_path).iter("testcase") if c.get("name") == "test_unserialisable_properties")
    props = {p.get("name"): p.get("value") or "" for p in case.iter("property")}
    assert props["plain"] == "42"
    assert props["object"].startswith("<object object at 0x")
    assert props["function"].startswith("<function test_unserialisable_properties.<locals>.<lambda> at 0x")


# --- 6. bad input -----------------------------------------------------------------------------------------------------

BAD_MARKERS = """
import pytest


@pytest.mark.isolated(bogus=1)
def test_unknown_keyword():
    pass


def test_plain_still_runs():
    pass


@pytest.mark.isolated("x")
def test_positional():
    pass


@pytest.mark.isolated(hostname="h" * 65)
def test_hostname_too_long():
    pass


@pytest.mark.isolated(hostname="has space")
def test_hostname_with_space():
    pass


@pytest.mark.isolated(hostname="a/b")
def test_hostname_with_slash():
    pass


@pytest.mark.isolated
def test_isolated_still_runs():
    pass


@pytest.mark.isolated(timeout=-1)
def test_negative_timeout():
    pass


@pytest.mark.isolated(timeout="abc")
def test_text_timeout():
    pass


@pytest.mark.isolated(rootfs="no-such-root")
def test_missing_rootfs():
    pass


@pytest.mark.isolated(rootfs="notes.txt")
def test_text_file_rootfs():
    pass


@pytest.mark.isolated(rootfs="corrupt.tar.gz")
def test_corrupt_tarball():
    pass


@pytest.mark.isolated(rootfs="escaping.tar")
def test_escaping_tarball():
    pass


@pytest.mark.isolated(hostname="fine")
def test_isolated_after_all_that():
    pass
"""

# (test, substrings its error must contain: the argument, the value, the source)
BAD_MARKER_EXPECTATIONS = [
    ("test_unknown_keyword", ["bogus", "isolated(bogus=", "test_unknown_keyword", "allowed are"]),
    ("test_positional", ["positional", "'x'", "test_positional"]),
    ("test_hostname_too_long", ["hostname=", "h" * 65, "marker", "test_hostname_too_long", "64"]),
    ("test_hostname_with_space", ["hostname=", "'has space'", "marker", "test_hostname_with_space"]),
    ("test_hostname_with_slash", ["hostname=", "'a/b'", "marker", "test_hostname_with_slash"]),
    ("test_negative_timeout", ["timeout=", "-1", "marker", "test_negative_timeout"]),
    ("test_text_timeout", ["timeout=", "'abc'", "marker", "test_text_timeout"]),
    ("test_missing_rootfs", ["rootfs=", "no-such-root", "marker", "test_missing_rootfs", "does not exist"]),
    ("test_text_file_rootfs", ["rootfs=", "notes.txt", "marker", "test_text_file_rootfs", "tarball"]),
    # A tarball that passes the path checks but cannot be unpacked must still say where rootfs= came from.
    ("test_corrupt_tarball", ["rootfs", "corrupt.tar.gz", "isolated(rootfs="]),
    ("test_escaping_tarball", ["rootfs", "escaping.tar", "'../escaped-by-tar'", "isolated(rootfs="]),
]


def make_escaping_tar(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in (("etc/os-release", b"ID=evil\n"), ("../escaped-by-tar", b"outside\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_marker_values_fail_only_their_test(
    run_lonely, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each bad marker is an error on its own test, says what was wrong and where, and never crashes pytest."""
    cache = pytester.path / "cache"
    monkeypatch.setenv("PYTEST_LONELY_CACHE_DIR", str(cache))
    (pytester.path / "notes.txt").write_text("not a root filesystem\n")
    (pytester.path / "corrupt.tar.gz").write_bytes(b"\x1f\x8b\x08\x00" + os.urandom(64) + b"not gzip at all" * 50)
    make_escaping_tar(pytester.path / "escaping.tar")
    pytester.makepyfile(test_bad_markers=BAD_MARKERS)
    result = run_lonely("-rA", timeout=60)

    everything = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in everything
    assert "pytest_lonely" not in everything  # no traceback into the plugin anywhere
    result.assert_outcomes(passed=3, errors=len(BAD_MARKER_EXPECTATIONS))
    result.stdout.fnmatch_lines(
        [
            "PASSED test_bad_markers.py::test_plain_still_runs",
            "PASSED test_bad_markers.py::test_isolated_still_runs",
            "PASSED test_bad_markers.py::test_isolated_after_all_that",
        ],
        consecutive=False,
    )
    problems = []
    for test, wanted in BAD_MARKER_EXPECTATIONS:
        text = section(result, f"ERROR at setup of {test}")
        missing = [w for w in wanted if w not in text]
        if missing:
            problems.append(f"{test}: missing {missing} in:\n{text}")
        if "pytest_lonely" in text:
            problems.append(f"{test}: traceback into the plugin:\n{text}")
    assert not problems, "\n\n".join(problems)
    assert not list(pytester.path.rglob("escaped-by-tar")), "a tarball member escaped its extraction directory"


@pytest.mark.parametrize(
    ("args", "ini", "wanted"),
    [
        (["--lonely-timeout=-5"], None, ["--lonely-timeout", "-5"]),
        (["--lonely-timeout=abc"], None, ["--lonely-timeout", "abc"]),
        (["--lonely-network=bogus"], None, ["--lonely-network", "bogus"]),
        (["--lonely-unavailable=bogus"], None, ["--lonely-unavailable", "bogus"]),
        ([], "lonely_timeout = x", ["lonely_timeout", "'x'"]),
    ],
    ids=["timeout-negative", "timeout-text", "network", "unavailable", "ini-timeout"],
)
def test_bad_option_values_are_usage_errors(
    run_lonely, pytester: pytest.Pytester, args: list[str], ini: str | None, wanted: list[str]
) -> None:
    if ini is not None:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = run_lonely(*args, timeout=60)
    everything = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR, everything
    assert "INTERNALERROR" not in everything
    assert "pytest_lonely" not in everything
    error = "\n".join(line for line in result.stderr.lines if "ERROR" in line)
    for w in wanted:
        assert w in error, f"{w!r} missing from the usage error: {error!r}"
