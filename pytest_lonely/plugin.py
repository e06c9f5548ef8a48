"""The pytest hooks, on the parent side.

Options, configuration, the report header, the ``container`` fixture, and
``pytest_runtest_protocol``, which hands isolated tests to
:class:`~pytest_lonely.runner.IsolatedRun`.  Everything else in pytest
(terminal, junitxml, ``-x``, ``--lf``) works unchanged because it only ever
sees ordinary reports.
"""

from __future__ import annotations

import sys
from typing import Final

import pytest
from _pytest.skipping import evaluate_skip_marks

from . import child, hookspecs
from .container import Container
from .runner import MARKER, IsolatedRun
from .session import SESSION_KEY, Session
from .spec import FIELDS, SpecError, defaults_from

FIXTURE: Final = "container"

_UNAVAILABLE_CHOICES: Final = ("fail", "skip")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lonely", "run tests in lightweight Linux containers (pytest-lonely)")
    group.addoption(
        "--lonely-rootfs",
        metavar="PATH",
        default=None,
        help="root filesystem for isolated tests: a directory or a tarball (default: copy-on-write view of the host)",
    )
    group.addoption(
        "--lonely-timeout",
        metavar="SECONDS",
        default=None,
        help="kill an isolated test's whole container after this many seconds; 0 means never (default: 0)",
    )
    group.addoption(
        "--lonely-network",
        metavar="host|none",
        default=None,
        help="host: share the host network (default); none: private network namespace with only lo",
    )
    group.addoption("--lonely-all", action="store_true", default=None, help="isolate every test, marked or not")
    group.addoption(
        "--lonely-unavailable",
        metavar="fail|skip",
        default=None,
        help="what isolated tests do when this machine cannot create containers (default: fail)",
    )
    parser.addini("lonely_rootfs", "root filesystem for isolated tests (relative to this ini file)", default="")
    parser.addini("lonely_timeout", "seconds before an isolated test's container is killed (0: never)", default="")
    parser.addini("lonely_network", "host or none", default="")
    parser.addini("lonely_all", "isolate every test", type="bool", default=False)
    parser.addini("lonely_unavailable", "fail or skip isolated tests when containers are unavailable", default="")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(hostname=None, rootfs=None, timeout=None, network=None): run this test in its own "
        "container (PID, mount, UTS and IPC namespaces, throwaway root filesystem). See pytest-lonely.",
    )
    _refuse_rivals(config)
    inidir = config.inipath.parent if config.inipath else config.rootpath
    cli = {f.name: config.getoption(f.cli.lstrip("-").replace("-", "_")) for f in FIELDS if f.cli}
    ini = {f.name: config.getini(f.ini) for f in FIELDS if f.ini}
    try:
        defaults = defaults_from(cli, ini, config.rootpath, inidir)
    except SpecError as exc:
        raise pytest.UsageError(str(exc)) from None
    unavailable = config.getoption("lonely_unavailable") or config.getini("lonely_unavailable") or "fail"
    if unavailable not in _UNAVAILABLE_CHOICES:
        source = "--lonely-unavailable" if config.getoption("lonely_unavailable") else "lonely_unavailable (ini)"
        raise pytest.UsageError(f"{source}={unavailable!r}: allowed are {', '.join(_UNAVAILABLE_CHOICES)}")
    isolate_all = bool(config.getoption("lonely_all") or config.getini("lonely_all"))
    config.stash[SESSION_KEY] = Session(config, defaults, isolate_all, unavailable)


def _refuse_rivals(config: pytest.Config) -> None:
    """Two plugins that each fork a test would run it twice or not at all: say so instead."""
    if config.pluginmanager.has_plugin("isolated"):
        raise pytest.UsageError(
            "pytest-lonely and pytest-isolated are both loaded and both claim @pytest.mark.isolated; "
            "disable one of them: -p no:isolated or -p no:lonely"
        )
    if config.pluginmanager.has_plugin("pytest_forked") and config.getoption("forked", False):
        raise pytest.UsageError(
            "--forked (pytest-forked) and pytest-lonely both run tests in a child process; "
            "drop --forked (isolated tests already run in their own process) or disable pytest-lonely with -p no:lonely"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.stash.get(SESSION_KEY, None)
    if session is not None:
        session.close()


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is not None:
        state.reap()  # no container outlives the session


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[SESSION_KEY]
    availability = state.availability()
    if not availability.ok:
        return [f"lonely: isolation unavailable ({state.unavailable} isolated tests): {availability.reason}"]
    mode = "rootless" if state.rootless else "root"
    namespaces = ",".join(["user"] * state.rootless + ["pid", "mnt", "uts", "ipc"])
    if not state.defaults.network:
        namespaces += ",net"
    root = str(state.defaults.rootfs) if state.defaults.rootfs else "host view (copy-on-write)"
    extra = ", isolating all tests" if state.isolate_all else ""
    timeout = f", timeout {state.defaults.timeout:g}s" if state.defaults.timeout else ""
    return [f"lonely: {mode} mode, namespaces {namespaces}, rootfs {root}{timeout}{extra}"]


def is_isolated(item: pytest.Item) -> bool:
    """Marked, asking for the ``container`` fixture, or everything under ``--lonely-all``."""
    state = item.config.stash[SESSION_KEY]
    return (
        state.isolate_all or item.get_closest_marker(MARKER) is not None or FIXTURE in getattr(item, "fixturenames", ())
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    child.setup_container_hook(item)  # a no-op outside a container


@pytest.fixture
def container() -> Container:
    """The container this test runs in; requesting it isolates the test."""
    current = child.current()
    if current is None:
        pytest.fail("the 'container' fixture is only available inside an isolated test", pytrace=False)
    return current


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if not is_isolated(item) or _skipped_anyway(item):
        return None
    ihook = item.ihook
    reruns = _reruns(item)
    for attempt in range(reruns + 1):
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        run = IsolatedRun(item, nextitem, attempt=attempt, may_rerun=attempt < reruns)
        run.run()
        ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
        if not run.rerunning:
            break
    return True


def _reruns(item: pytest.Item) -> int:
    """How often pytest-rerunfailures wants this test re-run; each attempt gets a fresh container.

    Our protocol replaces pytest-rerunfailures' own for isolated tests, so
    we ask it for the count (``--reruns`` or the ``flaky`` marker) and mark
    failed attempts with its ``rerun`` outcome.
    """
    module = sys.modules.get("pytest_rerunfailures")
    if module is None or not item.config.pluginmanager.has_plugin("rerunfailures"):
        return 0
    try:
        return int(module.get_reruns_count(item) or 0)
    except Exception:
        return 0


def _skipped_anyway(item: pytest.Item) -> bool:
    """A test that a skip marker skips needs no container: let pytest skip it in-process."""
    try:
        return evaluate_skip_marks(item) is not None
    except Exception:  # the child will raise the same error and report it
        return False
