"""One container for a class, a module, a package or the session: its fixtures and daemons live inside.

Each scenario is a real session run twice, in-process (plugin blocked) and
isolated, and every test must have the same outcome in both, unless the
scenario says why not (a container that dies takes only its own test).
"""

from __future__ import annotations

import os
import re
import socket
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers.inner import requires_plugin

needs_xdist = requires_plugin("pytest-xdist", "xdist")
needs_reruns = requires_plugin("pytest-rerunfailures", "pytest_rerunfailures")
needs_cov = requires_plugin("pytest-cov", "pytest_cov")

IN_PROCESS = ("-p", "no:lonely", "-p", "no:cacheprovider", "-p", "no:randomly", "-o", "markers=isolated: off")
LONELY = ("-p", "lonely", "-p", "no:cacheprovider", "-p", "no:randomly")


def outcomes(path: Path) -> dict[str, str]:
    """Every test's outcome from a junitxml report; a test with an error after passing is "error"."""
    found: dict[str, str] = {}
    for case in ET.parse(path).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")]
        name = f"{case.get('classname')}::{case.get('name')}"
        found[name] = "error" if "error" in kinds else (kinds[0] if kinds else "passed")
    return found


def both(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, pytest.RunResult, dict[str, str]]:
    """The session in-process and isolated; the isolated one's outcomes must be the in-process ones."""
    plain = pytester.runpytest_subprocess(*IN_PROCESS, "--junitxml=plain.xml", *args, timeout=180)
    lonely = pytester.runpytest_subprocess(*LONELY, "--junitxml=lonely.xml", *args, timeout=180)
    expected = outcomes(pytester.path / "plain.xml")
    assert outcomes(pytester.path / "lonely.xml") == expected, lonely.stdout.str()
    assert lonely.ret == plain.ret, lonely.stdout.str()
    return plain, lonely, expected


def lines(result: pytest.RunResult, tag: str) -> list[str]:
    return re.findall(rf"^{tag} (.*)$", result.stdout.str(), re.MULTILINE)


# --- a module's daemon lives in the module's container -------------------------------------------------------------

DAEMON_CONFTEST = """
import os, socket, subprocess, sys, time
import pytest

SERVER = '''
import os, socket, sys
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen()
with open(sys.argv[1], "w") as f:
    f.write(str(os.getpid()))
print(s.getsockname()[1], flush=True)
while True:
    c, _ = s.accept()
    c.sendall(str(os.getpid()).encode())
    c.close()
'''

@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    pidfile = "/run/lonely-test-daemon-{tag}.pid" if os.getpid() == 1 else str(tmp_path_factory.mktemp("run") / "d.pid")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, pidfile], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    (tmp_path_factory.getbasetemp() / f"port-{{port}}").write_text("")  # for the host to check afterwards
    yield port, proc.pid, pidfile
    proc.kill()
    proc.wait()
    os.unlink(pidfile)


def ask(port):
    with socket.create_connection(("127.0.0.1", port)) as c:
        return int(c.recv(64))
"""

DAEMON_TESTS = """
import os, pytest
from conftest import ask

pytestmark = pytest.mark.isolated(scope="module")

def test_first(daemon, request):
    port, pid, pidfile = daemon
    assert ask(port) == pid
    with open("/etc/lonely-scope-{tag}", "w") as f:
        f.write("written by the first test")
    print(f"\\nID {{request.getfixturevalue('container').id if os.getpid() == 1 else 'in-process'}}")

def test_second(daemon, request):
    port, pid, pidfile = daemon
    assert ask(port) == pid
    assert open(pidfile).read() == str(pid)
    if os.getpid() == 1:
        assert open("/etc/lonely-scope-{tag}").read() == "written by the first test"
        print(f"\\nID {{request.getfixturevalue('container').id}}")

def test_third_sees_the_same_daemon(daemon):
    port, pid, _ = daemon
    assert ask(port) == pid
"""

OTHER_MODULE = """
import os, pytest

pytestmark = pytest.mark.isolated(scope="module")

def test_sees_nothing_of_the_first_module():
    assert not os.path.exists("/etc/lonely-scope-{tag}")
    assert not os.path.exists("/run/lonely-test-daemon-{tag}.pid")
"""


def test_a_module_fixture_daemon_lives_and_dies_in_the_module_container(pytester: pytest.Pytester) -> None:
    tag = str(os.getpid())
    pytester.makeconftest(DAEMON_CONFTEST.format(tag=tag))
    pytester.makepyfile(test_daemon=DAEMON_TESTS.format(tag=tag), test_other=OTHER_MODULE.format(tag=tag))
    basetemp = pytester.path / "basetemp"
    result = pytester.runpytest_subprocess(*LONELY, "-s", f"--basetemp={basetemp}", timeout=120)
    result.assert_outcomes(passed=4)
    ids = lines(result, "ID")
    assert len(ids) == 2, result.stdout.str()
    assert ids[0] == ids[1], "the tests of one module must share a container"
    assert not os.path.exists(f"/etc/lonely-scope-{tag}")
    assert not os.path.exists(f"/run/lonely-test-daemon-{tag}.pid")
    ports = [int(p.name.split("-")[1]) for p in basetemp.glob("port-*")]
    assert len(ports) == 1
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", ports[0]))  # the daemon is gone with its container


def test_the_module_daemon_tests_pass_in_process_too(pytester: pytest.Pytester) -> None:
    tag = str(os.getpid())
    pytester.makeconftest(DAEMON_CONFTEST.format(tag=tag))
    pytester.makepyfile(test_daemon=DAEMON_TESTS.format(tag=tag))
    result = pytester.runpytest_subprocess(*IN_PROCESS, timeout=120)
    result.assert_outcomes(passed=3)


# --- scopes, mixtures, and unmarked tests in between ---------------------------------------------------------------

MIXTURE = """
import os, pytest

CALLS = []

@pytest.fixture(scope="session")
def session_counter():
    CALLS.append("session")
    return CALLS

@pytest.fixture(scope="module")
def module_list():
    return []

@pytest.fixture(scope="class")
def class_list():
    return []

@pytest.mark.isolated(scope="class")
class TestClassScope:
    def test_a(self, class_list, module_list):
        class_list.append("a")
        module_list.append("class-a")
        assert class_list == ["a"]

    def test_b(self, class_list):
        class_list.append("b")
        assert class_list == ["a", "b"]

@pytest.mark.isolated(scope="module")
def test_module_1(module_list):
    module_list.append("m1")

@pytest.mark.isolated(scope="module")
def test_module_2(module_list):
    module_list.append("m2")
    assert module_list[-2:] == ["m1", "m2"]

def test_in_process_in_between(module_list):
    module_list.append("in-process")

@pytest.mark.isolated(scope="module")
def test_module_3(module_list):
    # In-process the unmarked test's entry is there; a container sets up the module's fixtures anew.
    # (Under xdist --dist load the in-process test may have run on another worker.)
    assert os.getpid() == 1 or module_list[-1:] in ([], ["in-process"])

@pytest.mark.isolated(scope="module", hostname="other")
def test_other_keywords_get_their_own_container(module_list):
    assert module_list is not None

@pytest.mark.isolated
def test_function_scope(session_counter, module_list):
    assert session_counter == ["session"]
"""

SESSION_SCOPE = """
import os, pytest

@pytest.fixture(scope="session")
def shared():
    return {"seen": []}

@pytest.mark.isolated(scope="session")
def test_one(shared):
    shared["seen"].append(1)

@pytest.mark.isolated(scope="session")
def test_two(shared):
    shared["seen"].append(2)
    assert shared["seen"] == [1, 2]
"""

SESSION_SCOPE_2 = """
import pytest

@pytest.mark.isolated(scope="session")
def test_three(shared):
    assert shared["seen"] == [1, 2]
"""


def test_scopes_and_unmarked_tests_in_one_file_as_in_process(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_mixture=MIXTURE)
    _, _, expected = both(pytester)
    assert set(expected.values()) == {"passed"}, expected


def test_a_session_container_serves_every_module(pytester: pytest.Pytester) -> None:
    fixture, tests = SESSION_SCOPE.split("@pytest.mark.isolated", maxsplit=1)
    pytester.makeconftest(fixture)
    pytester.makepyfile(test_a="import pytest\n\n@pytest.mark.isolated" + tests, test_b=SESSION_SCOPE_2)
    _, _, expected = both(pytester)
    assert set(expected.values()) == {"passed"}, expected


# --- a container that dies in the middle of its group ---------------------------------------------------------------

DYING = """
import os, time, pytest

pytestmark = pytest.mark.isolated(scope="module")

@pytest.fixture(scope="module")
def box(request):
    print(f"\\nSETUP {{os.getpid()}}", flush=True)
    yield {{"n": 0}}
    print("\\nTEARDOWN", flush=True)

def test_one(box):
    box["n"] += 1

def test_{kind}(box):
    box["n"] += 1
    {action}

def test_after(box):
    box["n"] += 1
    assert box["n"] == 1, "a fresh container: its fixtures set up again"

def test_last(box):
    box["n"] += 1
    assert box["n"] == 2
"""

ACTIONS = {
    "crash": "os._exit(3)",
    "segfault": "import ctypes; ctypes.string_at(0)",
    "timeout": "time.sleep(30)",
    "oom": "blob = [bytearray(1 << 20) for _ in range(512)]",
}


@pytest.mark.parametrize("kind", ACTIONS)
def test_the_rest_of_a_group_runs_in_a_fresh_container_after_a_death(pytester: pytest.Pytester, kind: str) -> None:
    if kind == "oom":
        from pytest_lonely.sandbox import cgroup
        from pytest_lonely.sandbox.limits import Limits

        why = cgroup.Manager.discover().why_not(Limits(memory=64 << 20))
        if why is not None:
            pytest.skip(why)
    pytester.makepyfile(test_dying=DYING.format(kind=kind, action=ACTIONS[kind]))
    args = ["-s", "--lonely-timeout=3"] + (["--lonely-memory=64M"] if kind == "oom" else [])
    result = pytester.runpytest_subprocess(*LONELY, "--junitxml=lonely.xml", *args, timeout=120)
    assert outcomes(pytester.path / "lonely.xml") == {
        "test_dying::test_one": "passed",
        f"test_dying::test_{kind}": "failure",
        "test_dying::test_after": "passed",
        "test_dying::test_last": "passed",
    }, result.stdout.str()
    out = result.stdout.str()
    assert len(lines(result, "SETUP")) == 2, out  # the first container, then a fresh one
    # Only the fresh container's; under -s pytest's progress dot may follow on the same line.
    assert re.findall(r"^TEARDOWN", out, re.MULTILINE) == ["TEARDOWN"], out
    assert "module fixtures were not torn down: box" in out, out


# --- what users rely on, in a group ---------------------------------------------------------------------------------

FAILING_GROUP = """
import pytest

pytestmark = pytest.mark.isolated(scope="module")

@pytest.fixture(scope="module")
def resource():
    yield "r"
    print("\\nRESOURCE DOWN", flush=True)

def test_a(resource):
    pass

def test_b(resource):
    assert False, "fails"

def test_c(resource):
    pass
"""


def test_x_stops_and_the_group_still_tears_down(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x=FAILING_GROUP)
    _, lonely, expected = both(pytester, "-x", "-s")
    assert expected == {"test_x::test_a": "passed", "test_x::test_b": "failure"}
    assert "RESOURCE DOWN" in lonely.stdout.str()


def test_last_failed_reruns_only_the_failure_in_a_container(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_lf=FAILING_GROUP)
    first = pytester.runpytest_subprocess("-p", "lonely", "-p", "no:randomly", timeout=120)
    first.assert_outcomes(passed=2, failed=1)
    again = pytester.runpytest_subprocess("-p", "lonely", "-p", "no:randomly", "--lf", "-rA", timeout=120)
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["FAILED test_lf.py::test_b*"])


@needs_reruns
def test_a_rerun_stays_in_the_group_container(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_rerun="""
        import os, pytest

        pytestmark = pytest.mark.isolated(scope="module")

        @pytest.fixture(scope="module")
        def attempts():
            return []

        def test_flaky(attempts, container):
            attempts.append(container.id)
            print(f"\\nATTEMPT {container.id}", flush=True)
            assert len(attempts) >= 2

        def test_after(attempts, container):
            print(f"\\nAFTER {container.id}", flush=True)
            assert len(attempts) == 2
        """
    )
    result = pytester.runpytest_subprocess(*LONELY, "-s", "--reruns", "2", timeout=120)
    assert result.parseoutcomes() == {"passed": 2, "rerun": 1}, result.stdout.str()
    ids = set(lines(result, "ATTEMPT")) | set(lines(result, "AFTER"))
    assert len(ids) == 1, result.stdout.str()


@needs_xdist
@pytest.mark.parametrize("dist", ["loadscope", "loadfile", "load"])
def test_xdist_distributions_give_the_same_outcomes(pytester: pytest.Pytester, dist: str) -> None:
    pytester.makepyfile(test_mixture=MIXTURE, test_x=FAILING_GROUP)
    plain = pytester.runpytest_subprocess(*IN_PROCESS, "--junitxml=plain.xml", timeout=180)
    lonely = pytester.runpytest_subprocess(*LONELY, "-n", "2", f"--dist={dist}", "--junitxml=x.xml", timeout=180)
    assert outcomes(pytester.path / "x.xml") == outcomes(pytester.path / "plain.xml"), lonely.stdout.str()
    assert lonely.ret == plain.ret


@needs_cov
def test_coverage_counts_every_test_of_a_group(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        mod="""
        def one():
            return 1

        def two():
            return 2

        def three():
            return 3
        """,
        test_cov="""
        import pytest
        import mod

        pytestmark = pytest.mark.isolated(scope="module")

        def test_one():
            assert mod.one() == 1

        def test_two():
            assert mod.two() == 2
        """,
    )
    result = pytester.runpytest_subprocess(*LONELY, "--cov=mod", "--cov-report=term-missing", timeout=120)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["mod.py*6*1*83%*8"])  # only three()'s body was not run


def test_all_tests_in_module_containers(pytester: pytest.Pytester) -> None:
    """``--lonely-all --lonely-scope=module``: every module in a container of its own, as in-process."""
    pytester.makepyfile(test_mixture=MIXTURE, test_x=FAILING_GROUP)
    pytester.runpytest_subprocess(*IN_PROCESS, "--junitxml=plain.xml", timeout=180)
    lonely = pytester.runpytest_subprocess(
        *LONELY, "--lonely-all", "--lonely-scope=module", "--junitxml=all.xml", timeout=180
    )
    assert outcomes(pytester.path / "all.xml") == outcomes(pytester.path / "plain.xml"), lonely.stdout.str()


def test_one_usage_row_and_one_finished_hook_per_container(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.hookimpl(optionalhook=True)
        def pytest_lonely_setup_container(container, item):
            print(f"\\nSETUP-HOOK {container.id} {item.name}", flush=True)

        @pytest.hookimpl(optionalhook=True)
        def pytest_lonely_container_finished(item, container, exitstatus):
            print(f"\\nFINISHED-HOOK {container.id} {item.name} {exitstatus}", flush=True)
        """
    )
    pytester.makepyfile(
        test_hooks="""
        import pytest

        pytestmark = pytest.mark.isolated(scope="module")

        def test_a(container):
            print(f"\\nID {container.id}", flush=True)

        def test_b(container):
            print(f"\\nID {container.id}", flush=True)
        """
    )
    result = pytester.runpytest_subprocess(*LONELY, "-s", "--lonely-usage=0", timeout=120)
    result.assert_outcomes(passed=2)
    ids = lines(result, "ID")
    assert len(set(ids)) == 1, result.stdout.str()
    assert lines(result, "SETUP-HOOK") == [f"{ids[0]} test_a"]
    assert lines(result, "FINISHED-HOOK") == [f"{ids[0]} test_b 0"]
    result.stdout.fnmatch_lines(["*test_hooks.py (module)"])


# --- bad values -----------------------------------------------------------------------------------------------------


def test_a_bad_scope_in_a_marker_fails_that_test_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.isolated(scope="galaxy")
        def test_bad():
            pass

        @pytest.mark.isolated(scope="module")
        def test_good():
            pass
        """
    )
    result = pytester.runpytest_subprocess(*LONELY, timeout=120)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        ["*scope='galaxy' from @pytest.mark.isolated(scope=...) on *test_bad*allowed are function, class, module*"]
    )


@pytest.mark.parametrize("where", ["cli", "ini"])
def test_a_bad_scope_for_the_run_is_a_usage_error(pytester: pytest.Pytester, where: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    if where == "ini":
        pytester.makeini("[pytest]\nlonely_scope = galaxy\n")
        result = pytester.runpytest_subprocess(*LONELY, timeout=60)
        label = "lonely_scope (ini)"
    else:
        result = pytester.runpytest_subprocess(*LONELY, "--lonely-scope=galaxy", timeout=60)
        label = "--lonely-scope (command line)"
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*scope='galaxy' from {label}*allowed are function, class, module, package, session*"]
    )
