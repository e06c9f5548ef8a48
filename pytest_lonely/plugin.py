"""The pytest hooks, on the parent side.

Options, configuration, the report header, the ``container`` fixture, and
``pytest_runtest_protocol``, which hands isolated tests to
:class:`~pytest_lonely.runner.IsolatedRun`.  Everything else in pytest
(terminal, junitxml, ``-x``, ``--lf``) works unchanged because it only ever
sees ordinary reports.
"""

from __future__ import annotations

import sys
import warnings

import pytest

from . import _pytest_compat as compat
from . import child, groups, hookspecs, preflight, settings
from .container import Container
from .errors import LonelyWarning
from .runner import IsolatedRun, close_group
from .sandbox import archive, image, namespaces
from .sandbox.hugepages import Heap
from .session import SESSION_KEY, Session, engine_tuning


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lonely", "run tests in lightweight Linux containers (pytest-lonely)")
    for _, how in settings.all_settings():
        if how.cli:
            if how.flag:
                group.addoption(how.cli, action="store_true", default=None, help=how.help)
            else:
                group.addoption(how.cli, metavar=how.metavar, default=None, help=how.help)
        if how.ini:
            if how.flag:
                parser.addini(how.ini, how.help, type="bool", default=False)
            else:
                parser.addini(how.ini, how.help, default="")


def pytest_addhooks(pluginmanager: pytest.PytestPluginManager) -> None:
    pluginmanager.add_hookspecs(hookspecs)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", settings.marker_help())
    _refuse_rivals(config)
    inidir = config.inipath.parent if config.inipath else config.rootpath
    try:
        defaults, options = settings.from_config(config.getoption, config.getini, config.rootpath, inidir)
        engine_tuning()  # a bad environment variable is a usage error now, not an error in the first test
    except settings.SettingError as exc:
        raise pytest.UsageError(str(exc)) from None
    state = config.stash[SESSION_KEY] = Session(config, defaults, options)
    config.pluginmanager.register(child.Forwarder(config), child.Forwarder.NAME)
    if defaults.rootfs is not None and defaults.rootfs.image is not None and state.disabled is None:
        # A bad image given for the whole run is a usage error now, not one failure per test later.
        try:
            state.root(defaults.rootfs)
        except (image.ImageError, archive.ArchiveError) as exc:
            raise pytest.UsageError(
                f"rootfs={str(defaults.rootfs)!r} from {defaults.origin('rootfs')}: {exc}"
            ) from None


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


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(SESSION_KEY, None)
    if state is None:
        return
    close_group(state, finish=True)
    state.reap()  # no container outlives the session
    for plugin, nodeids in state.lost_results.items():
        shown = ", ".join(nodeids[:5]) + (f" and {len(nodeids) - 5} more" if len(nodeids) > 5 else "")
        message = LonelyWarning(
            f"{plugin} keeps its results inside the test process, so they stay in the container: "
            f"the results of {len(nodeids)} isolated test(s) are missing from its summary: {shown}"
        )
        record = warnings.WarningMessage(message, LonelyWarning, "pytest-lonely", 0)
        session.config.hook.pytest_warning_recorded.call_historic(
            kwargs=dict(warning_message=record, when="runtest", nodeid="", location=None)
        )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    """``--lonely-usage=N``: the isolated tests that used the most memory, as ``--durations`` lists the slowest."""
    state = config.stash.get(SESSION_KEY, None)
    if state is None or state.options.usage is None:
        return
    count = state.options.usage
    terminalreporter.write_sep("=", f"{'all' if count == 0 else f'top {count}'} isolated tests by peak memory")
    why = state.usage_unavailable()
    if why is not None:
        terminalreporter.write_line(f"lonely: usage cannot be measured here: {why}")
        return
    rows = sorted(state.usage.items(), key=lambda row: -(row[1].memory_peak or 0))
    if count:
        rows = rows[:count]
    if not rows:
        terminalreporter.write_line("no isolated test ran")
        return
    terminalreporter.write_line(f"{'peak MiB':>9} {'CPU s':>8} {'procs':>6}  test")
    for nodeid, used in rows:
        memory = "n/a" if used.memory_peak is None else f"{used.memory_peak / 2**20:.1f}"
        cpu = "n/a" if used.cpu_seconds is None else f"{used.cpu_seconds:.3f}"
        procs = "n/a" if used.pids_peak is None else str(used.pids_peak)
        terminalreporter.write_line(f"{memory:>9} {cpu:>8} {procs:>6}  {nodeid}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash[SESSION_KEY]
    if state.disabled is not None:
        return [f"lonely: disabled: {state.disabled}"]
    availability = state.availability()
    if not availability.ok:
        return [f"lonely: isolation unavailable ({state.options.unavailable} isolated tests): {availability.reason}"]
    mode = "rootless" if state.rootless else "root"
    names = namespaces.describe(namespaces.for_container(rootless=state.rootless, network=state.defaults.network))
    root = _describe_root(state)
    extra = ", isolating all tests" if state.options.all else ""
    timeout = f", timeout {state.defaults.timeout:g}s" if state.defaults.timeout else ""
    lines = [f"lonely: {mode} mode, namespaces {names}, rootfs {root}{timeout}{extra}"]
    if config.get_verbosity() > 0:
        why = Heap(engine_tuning()[1]).unavailable
        if why is not None:
            lines.append(f"lonely: pytest's heap stays on small pages ({why}): forks cost more as it grows")
    if state.defaults.privileged and not state.rootless:
        lines.append(
            f"lonely: privileged by default ({state.defaults.origin('privileged')}): isolated tests run as host "
            "root with every capability; they can change the host's kernel settings, /sys, devices, network "
            "and clock, and escape the container; only file writes stay in the overlay"
        )
    return lines


def _describe_root(state: Session) -> str:
    configured = state.defaults.rootfs
    if configured is None:
        return "host view (copy-on-write)"
    if configured.image is None:
        return str(configured)
    opened = state.root(configured).image
    if opened is None:  # pragma: no cover - an image always opens to one
        return str(configured)
    digest = (opened.manifest_digest or opened.config_digest)[:19]
    took = f"unpacked in {opened.unpack_seconds:.2f} s" if opened.unpack_seconds else "cached"
    return f"image {configured} ({digest}, {took}; its Env applies, User and WorkingDir are ignored)"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    child.setup_container_hook(item)  # a no-op outside a container


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(request: pytest.FixtureRequest) -> None:
    _changed(request.config)


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_post_finalizer(request: pytest.FixtureRequest) -> None:
    _changed(request.config)


def _changed(config: pytest.Config) -> None:
    """A fixture was set up or finished here: a zygote forked before is no faithful copy any more."""
    state = config.stash.get(SESSION_KEY, None)
    if state is not None:
        state.generation += 1


@pytest.fixture
def container(request: pytest.FixtureRequest) -> Container:
    """The container this test runs in; requesting it isolates the test."""
    current = child.current(request.config)
    if current is None:
        pytest.fail("the 'container' fixture is only available inside an isolated test", pytrace=False)
    return current


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    state = item.config.stash[SESSION_KEY]
    isolated = preflight.is_isolated(item)
    if isolated and not groups.shared(item) and compat.skip_reason(item) is not None:
        return None  # pytest skips it in-process before any of its code runs: nothing to isolate or reap
    if not isolated:
        # A test that runs in-process must see only its own children: reap finished containers first.
        # It may change anything in this process, so no zygote forked before it is a copy of it.
        state.generation += 1
        close_group(state, finish=True)
        state.reap()
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
    if nextitem is None:
        close_group(state, finish=True)
        state.reap()  # the last test: no container may outlive it, whoever looks at sessionfinish
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
