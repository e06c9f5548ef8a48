"""Containers forked ahead of time by a zygote behave exactly like containers forked from pytest.

Every scenario is a test module; all of them run in one real pytest session
per mode: with the zygote (the default) and with ``PYTEST_LONELY_PREBUILD=0``,
where every container is forked from pytest itself, and both must give the
same outcome for every test.  Each test below checks its own scenario (the
module registered by its ``@scenario``).  The scenarios are the ways a snapshot of pytest taken at one test could
be stale at a later one: broader fixtures that change, the setup stack, a test
that runs in-process in between, the warnings filters of one test's marks,
and descriptors that a fixture closes in the parent.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import TypeVar

import pytest
from helpers.inner import junit_cases

MODES = {"zygote": "1", "direct": "0"}
INNER_ARGS = ("-p", "lonely", "-p", "no:cacheprovider", "-p", "no:randomly")


@dataclasses.dataclass(frozen=True)
class Scenario:
    source: str
    modes: tuple[str, ...]
    #: Why this scenario cannot run here (evaluated when the sessions start), or None.
    unavailable: Callable[[], str | None]


#: The test that checks a scenario -> the scenario.  Each is a module of its own in ONE session per mode.
SCENARIOS: dict[str, Scenario] = {}

Test = TypeVar("Test", bound=Callable[..., None])


def scenario(
    source: str, *, modes: tuple[str, ...] = tuple(MODES), unavailable: Callable[[], str | None] = lambda: None
) -> Callable[[Test], Test]:
    """Register ``source`` as the test module that the decorated test checks the outcomes of."""

    def register(test: Test) -> Test:
        SCENARIOS[test.__name__] = Scenario(textwrap.dedent(source), modes, unavailable)
        return test

    return register


@dataclasses.dataclass(frozen=True)
class Session:
    output: str
    #: module name -> test name -> outcome
    outcomes: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def sessions(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Session], dict[str, str]]:
    """Every scenario as a module of one real pytest session per mode; and why a scenario did not run.

    pytester is per test; these sessions are shared by the module's tests, so they run in a subprocess here as
    ``pytester.runpytest_subprocess`` would: a project directory of their own, none of the outer session's
    PYTEST_ADDOPTS or xdist variables.
    """
    project = tmp_path_factory.mktemp("zygote-scenarios")
    port = str(_free_port())
    skipped = {name: why for name, sc in SCENARIOS.items() if (why := sc.unavailable()) is not None}
    for name, sc in SCENARIOS.items():
        if name not in skipped:
            (project / f"{name}.py").write_text(sc.source.replace("__PORT__", port))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_ADDOPTS", "PYTEST_XDIST_"))}
    env["HOME"] = str(project)
    runs = {}
    for mode, value in MODES.items():
        files = [f"{name}.py" for name, sc in SCENARIOS.items() if mode in sc.modes and name not in skipped]
        xml = project / f"junit-{mode}.xml"
        args = [*INNER_ARGS, f"--junitxml={xml}", f"--basetemp={project / f'basetemp-{mode}'}", *files]
        done = subprocess.run(
            [sys.executable, "-m", "pytest", *args],
            cwd=project,
            env={**env, "PYTEST_LONELY_PREBUILD": value},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        output = done.stdout + done.stderr
        assert "INTERNALERROR" not in output, output
        grouped: dict[str, dict[str, str]] = {}
        for classname, name, case in junit_cases(xml):
            grouped.setdefault(classname.split(".")[0], {})[name] = case.outcome
        runs[mode] = Session(output, grouped)
    return runs, skipped


#: mode -> (test name -> outcome in one scenario, the output of the whole session)
Outcomes = dict[str, tuple[dict[str, str], str]]


@pytest.fixture
def outcomes(request: pytest.FixtureRequest, sessions: tuple[dict[str, Session], dict[str, str]]) -> Outcomes:
    """mode -> (every test's outcome in the requesting test's scenario, the session's output)."""
    runs, skipped = sessions
    name = request.function.__name__
    if name in skipped:
        pytest.skip(skipped[name])
    return {mode: (runs[mode].outcomes.get(name, {}), runs[mode].output) for mode in SCENARIOS[name].modes}


def same_in_both(outcomes: Outcomes, expected: dict[str, str]) -> None:
    for mode in MODES:
        got, output = outcomes[mode]
        assert got == expected, f"{mode}: {got}\n{output}"


@scenario(
    """
        import pytest

        SETUPS = []

        @pytest.fixture(scope="module", params=["a", "b"])
        def letter(request):
            SETUPS.append(request.param)
            return request.param

        @pytest.mark.parametrize("i", range(3))
        @pytest.mark.isolated
        def test_letter(letter, i, request):
            assert letter == request.node.callspec.params["letter"]
            assert SETUPS[-1] == letter and len(SETUPS) == (1 if letter == "a" else 2)
    """
)
def test_a_changing_module_fixture_is_seen_by_every_test(outcomes: Outcomes) -> None:
    """Params of a module fixture switch in the parent; a container may never show the old value."""
    same_in_both(
        outcomes,
        {f"test_letter[{letter}-{i}]": "passed" for letter in "ab" for i in range(3)},
    )


@scenario(
    """
        import pytest

        @pytest.fixture(scope="class")
        def owner(request):
            return request.cls.__name__

        @pytest.mark.isolated
        class TestOne:
            def test_a(self, owner): assert owner == "TestOne"
            def test_b(self, owner): assert owner == "TestOne"

        @pytest.mark.isolated
        class TestTwo:
            def test_a(self, owner): assert owner == "TestTwo"
            def test_b(self, owner): assert owner == "TestTwo"

        @pytest.mark.isolated
        def test_outside(request):
            assert request.cls is None
    """
)
def test_classes_and_their_fixtures(outcomes: Outcomes) -> None:
    same_in_both(
        outcomes,
        {"test_a": "passed", "test_b": "passed", "test_outside": "passed"},
    )


@scenario(
    """
        import os
        import pytest

        STATE = []

        @pytest.mark.parametrize("i", range(3))
        @pytest.mark.isolated
        def test_before(i):
            STATE.append("lost with the container")
            assert STATE == ["lost with the container"]

        def test_in_process():
            STATE.append("kept")
            with pytest.raises(ChildProcessError):  # no container, no zygote is pytest's child now
                os.waitpid(-1, os.WNOHANG)

        @pytest.mark.parametrize("i", range(3))
        @pytest.mark.isolated
        def test_after(i):
            assert STATE == ["kept"]
    """
)
def test_a_test_in_process_in_between_is_seen(outcomes: Outcomes) -> None:
    """What an in-process test changes in pytest's memory, the next container inherits, as from a fork."""
    same_in_both(
        outcomes,
        {"test_before[0]": "passed", "test_before[1]": "passed", "test_before[2]": "passed",
         "test_in_process": "passed",
         "test_after[0]": "passed", "test_after[1]": "passed", "test_after[2]": "passed"},
    )  # fmt: skip


@scenario(
    """
        import warnings
        import pytest

        pytestmark = pytest.mark.isolated

        def test_plain_1():
            warnings.warn("just a warning")

        @pytest.mark.filterwarnings("error")
        def test_strict_1():
            with pytest.raises(UserWarning):
                warnings.warn("an error here")

        @pytest.mark.filterwarnings("error")
        def test_strict_2():
            with pytest.raises(UserWarning):
                warnings.warn("an error here")

        def test_plain_2():
            warnings.warn("just a warning")

        def test_plain_3():
            warnings.warn("just a warning")
    """
)
def test_each_test_gets_its_own_warning_filters(outcomes: Outcomes) -> None:
    """A test's ``filterwarnings`` marks live in the process state a container inherits; they must not spill."""
    same_in_both(
        outcomes,
        {name: "passed" for name in ("test_plain_1", "test_strict_1", "test_strict_2", "test_plain_2", "test_plain_3")},
    )


@scenario(
    """
        import socket
        import subprocess
        import sys
        import pytest

        @pytest.fixture(scope="module")
        def reader():
            # The child exits once its stdin is closed: only if no copy of the write end is left open.
            proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
            yield proc
            proc.stdin.close()
            proc.wait(timeout=30)

        @pytest.fixture(scope="module", params=[1, 2])
        def server(request):
            s = socket.socket()
            s.bind(("127.0.0.1", __PORT__))
            s.listen()
            yield s
            s.close()

        @pytest.mark.parametrize("i", range(3))
        @pytest.mark.isolated
        def test_uses_them(reader, server, i):
            assert reader.returncode is None and server.fileno() >= 0
    """
)
def test_what_a_fixture_closes_in_the_parent_is_closed(outcomes: Outcomes) -> None:
    """A copy of pytest must not hold a fixture's descriptors open: no hang on a pipe, no port in use."""
    same_in_both(
        outcomes,
        {f"test_uses_them[{p}-{i}]": "passed" for p in (1, 2) for i in range(3)},
    )


@scenario(
    """
        import ctypes
        import socket
        import time
        import pytest

        pytestmark = pytest.mark.isolated

        @pytest.mark.parametrize("i", range(3))
        def test_hostname(container, i):
            assert socket.gethostname() == container.hostname

        @pytest.mark.isolated(hostname="chosen")
        def test_chosen(container):
            assert socket.gethostname() == "chosen"

        @pytest.mark.isolated(timeout=1)
        def test_too_slow():
            time.sleep(60)

        def test_crash():
            ctypes.string_at(0)

        def test_after():
            pass
    """,
    modes=("zygote",),
)
def test_hostname_timeout_and_crash_per_test(outcomes: Outcomes) -> None:
    """What a container learns only when it is handed its test: its hostname, timeout; and how it ended."""
    got, output = outcomes["zygote"]
    assert got == {
        **{f"test_hostname[{i}]": "passed" for i in range(3)},
        "test_chosen": "passed",
        "test_too_slow": "failed",
        "test_crash": "failed",
        "test_after": "passed",
    }, output
    assert "timeout" in output.lower(), output
    assert "signal 11" in output, output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("PYTEST_LONELY_PREBUILD", "yes", "use 1 (default) or 0"),
        ("PYTEST_LONELY_PREBUILD", "namespaces", "use 1 (default) or 0"),
        ("PYTEST_LONELY_HUGEPAGES", "yes", "use 1 (default) or 0"),
    ],
)
def test_a_bad_tuning_variable_is_a_usage_error(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, variable: str, value: str, allowed: str
) -> None:
    monkeypatch.setenv(variable, value)
    pytester.makepyfile("def test_one(): pass")
    result = pytester.runpytest_subprocess("-p", "lonely", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{variable}={value!r} from the environment*{allowed}*"])


def _no_limits() -> str | None:
    if os.geteuid() != 0:
        return "root mode: creating cgroups needs root here"
    from pytest_lonely.sandbox import cgroup
    from pytest_lonely.sandbox.limits import Limits

    return cgroup.Manager.discover().why_not(Limits(memory=64 << 20, pids=16))


@scenario(
    """
        import os
        import time
        import pytest

        pytestmark = pytest.mark.isolated(memory="64M", pids=16)

        @pytest.mark.parametrize("i", range(3))
        def test_too_big(i):
            block = bytearray(200 * 2**20)
            for k in range(0, len(block), 4096):
                block[k] = 1

        @pytest.mark.parametrize("i", range(3))
        @pytest.mark.isolated(memory=None)
        def test_too_many(i):
            with pytest.raises(BlockingIOError):
                for _ in range(32):
                    if os.fork() == 0:
                        try:
                            time.sleep(60)  # ended with the container's PID namespace
                        finally:
                            os._exit(0)

        @pytest.mark.parametrize("i", range(3))
        def test_small(i):
            assert len(bytearray(8 * 2**20)) == 8 * 2**20
    """,
    unavailable=_no_limits,
)
def test_limits_hold_in_containers_from_the_zygote(outcomes: Outcomes) -> None:
    """As root, a container built ahead of time is moved into its cgroup before GO: the limit still applies."""
    same_in_both(
        outcomes,
        {
            **{f"test_too_big[{i}]": "failed" for i in range(3)},
            **{f"test_too_many[{i}]": "passed" for i in range(3)},
            **{f"test_small[{i}]": "passed" for i in range(3)},
        },
    )


@scenario(
    """
        import os
        import pytest

        pytestmark = pytest.mark.isolated

        @pytest.mark.parametrize("i", range(6))
        def test_mixed(i):
            if i % 2:
                pytest.skip("odd")
            assert os.getpid() == 1

        @pytest.mark.skip(reason="by a marker")
        def test_marked():
            raise AssertionError("never runs")

        @pytest.mark.skipif("True", reason="by a condition")
        def test_condition():
            raise AssertionError("never runs")

        def test_after():
            assert os.getpid() == 1
    """
)
def test_tests_skipped_by_a_marker_do_not_break_a_group(outcomes: Outcomes) -> None:
    """A skip marker runs none of the test's code: the zygote stays, and the outcomes are the same."""
    same_in_both(
        outcomes,
        {
            **{f"test_mixed[{i}]": "skipped" if i % 2 else "passed" for i in range(6)},
            "test_marked": "skipped",
            "test_condition": "skipped",
            "test_after": "passed",
        },
    )
