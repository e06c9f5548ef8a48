"""The pytest hooks, on the parent side.

For an isolated test the parent takes over ``pytest_runtest_protocol``: it
sets up the broader-scoped fixtures itself (so that a session fixture runs
once, not once per container), forks the container, and feeds the reports
that come back over the pipe into ``pytest_runtest_logreport`` as if the test
had run in-process.  Everything else (terminal, junitxml, ``-x``, ``--lf``)
then works unchanged because it only ever sees ordinary reports.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Final, Literal

import pytest
from _pytest.runner import CallInfo, check_interactive_exception, get_reraise_exceptions

from . import _syscalls as sc
from . import archive, child, hookspecs, probe, protocol, rootfs
from .container import Container
from .launcher import Launcher, Outcome, describe_status
from .spec import FIELDS, Spec, SpecError, defaults_from

MARKER: Final = "isolated"
FIXTURE: Final = "container"

_UNAVAILABLE_CHOICES: Final = ("fail", "skip")

Phase = Literal["setup", "call", "teardown"]


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


@dataclasses.dataclass
class Session:
    """Per-process state, kept in ``config.stash``."""

    config: pytest.Config
    defaults: Spec
    isolate_all: bool
    unavailable: str
    rootless: bool = dataclasses.field(default_factory=lambda: os.geteuid() != 0)
    _availability: probe.Availability | None = None
    _launcher: Launcher | None = None
    _layout: rootfs.HostLayout | None = None
    _plans: dict[rootfs.PlanKey, tuple[rootfs.Op, ...]] = dataclasses.field(default_factory=dict)
    _unpacked: dict[Path, Path] = dataclasses.field(default_factory=dict)

    def availability(self) -> probe.Availability:
        if self._availability is None:
            self._availability = probe.probe(self.rootless)
        return self._availability

    def launcher(self) -> Launcher:
        if self._launcher is None:
            self._launcher = Launcher(self.rootless)
        return self._launcher

    def plan(self, rootfs_dir: Path | None, network: bool) -> tuple[rootfs.Op, ...]:
        key = rootfs.PlanKey(None if rootfs_dir is None else str(rootfs_dir), self.rootless, network)
        ops = self._plans.get(key)
        if ops is None:
            if self._layout is None:
                self._layout = rootfs.HostLayout.scan(self.config.rootpath)
            ops = self._plans[key] = rootfs.plan(self._layout, key)
        return ops

    def rootfs_dir(self, path: Path) -> Path:
        """The directory to use as root: ``path`` itself, or where its tarball was unpacked."""
        if path.is_dir():
            return path
        unpacked = self._unpacked.get(path)
        if unpacked is None:
            unpacked, _ = archive.unpack(path, cache_dir())
            self._unpacked[path] = unpacked
        return unpacked

    def close(self) -> None:
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None


SESSION_KEY: Final = pytest.StashKey[Session]()


def cache_dir() -> Path:
    """Where unpacked tarballs live; shared by xdist workers and later runs."""
    configured = os.environ.get("PYTEST_LONELY_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = Path(xdg) if xdg else Path.home() / ".cache"
    if os.access(home.parent if not home.exists() else home, os.W_OK):
        return home / "pytest-lonely"
    return Path(tempfile.gettempdir()) / f"pytest-lonely-{os.getuid()}"


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
    if state is not None and state._launcher is not None:
        state._launcher.reap(block=True)


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


@pytest.fixture
def container() -> Container:
    """The container this test runs in; requesting it isolates the test."""
    current = child.current()
    if current is None:
        pytest.fail("the 'container' fixture is only available inside an isolated test", pytrace=False)
    return current


def _spec_for(item: pytest.Item, defaults: Spec) -> Spec:
    spec = defaults
    where = item.nodeid
    for mark in reversed(list(item.iter_markers(MARKER))):
        spec = spec.with_marker(tuple(mark.args), mark.kwargs, where, item.config.rootpath)
    return spec


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    if not is_isolated(item) or _skipped_anyway(item):
        return None
    ihook = item.ihook
    reruns = _reruns(item)
    for attempt in range(reruns + 1):
        ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
        run = _Run(item, nextitem, attempt=attempt, may_rerun=attempt < reruns)
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
        from _pytest.skipping import evaluate_skip_marks

        return evaluate_skip_marks(item) is not None
    except Exception:  # the child will raise the same error and report it
        return False


class _Run:
    """One isolated test, from the parent's point of view."""

    def __init__(
        self, item: pytest.Item, nextitem: pytest.Item | None, attempt: int = 0, may_rerun: bool = False
    ) -> None:
        self.item = item
        # Between reruns keep every broader-scoped fixture: the next attempt needs them.
        self.nextitem = item if may_rerun else nextitem
        self.attempt = attempt
        self.may_rerun = may_rerun
        self.rerunning = False
        self.config = item.config
        self.state = self.config.stash[SESSION_KEY]
        self.capman = self.config.pluginmanager.getplugin("capturemanager")
        self.seen: dict[str, pytest.TestReport] = {}
        self.held_teardown: pytest.TestReport | None = None

    # -- reporting -------------------------------------------------------------------------

    def log(self, report: pytest.TestReport) -> None:
        self.seen[report.when or ""] = report
        if self.attempt or self.may_rerun:
            report.rerun = self.attempt  # type: ignore[attr-defined]
            if report.failed and (self.rerunning or (self.may_rerun and not hasattr(report, "wasxfail"))):
                report.outcome = "rerun"  # type: ignore[assignment]
                self.rerunning = True
        self.item.ihook.pytest_runtest_logreport(report=report)

    def make_report(self, call: CallInfo[None]) -> pytest.TestReport:
        """A report made in the parent, through the hook so that xfail and friends apply.

        Some plugins keep per-item state that their own setup-phase hook
        creates, and that state only exists in the child; if such a plugin
        fails on a report we make here, pytest's own report stands in.
        """
        try:
            report: pytest.TestReport = self.item.ihook.pytest_runtest_makereport(item=self.item, call=call)
        except Exception:
            report = pytest.TestReport.from_item_and_call(self.item, call)
        return report

    def fail(self, when: Phase, message: str, skip: bool = False) -> pytest.TestReport:
        def raise_() -> None:
            if skip:
                pytest.skip(message)
            pytest.fail(message, pytrace=False)

        return self.make_report(CallInfo.from_call(raise_, when=when))

    def in_parent(self, when: Phase, func: Any) -> CallInfo[None]:
        """Run ``func`` with output captured into the item's sections, as pytest does for its own phases."""
        reraise = get_reraise_exceptions(self.config)
        if self.capman is None:
            return CallInfo.from_call(func, when=when, reraise=reraise)
        with self.capman.item_capture(when, self.item):
            return CallInfo.from_call(func, when=when, reraise=reraise)

    # -- the protocol ----------------------------------------------------------------------

    def run(self) -> None:
        item = self.item
        if hasattr(item, "_request") and not item._request:
            item._initrequest()  # type: ignore[attr-defined]  # a rerun, as pytest-rerunfailures does
        # Abort outside the except blocks, or the report would chain our exception into it.
        problem = None
        try:
            spec = _spec_for(item, self.state.defaults)
        except SpecError as exc:
            problem = str(exc)
        if problem is not None:
            return self.abort(problem)
        availability = self.state.availability()
        if not availability.ok:
            return self.abort(f"isolation unavailable: {availability.reason}", skip=self.state.unavailable == "skip")
        root = None
        try:
            root = None if spec.rootfs is None else self.state.rootfs_dir(spec.rootfs)
        except archive.ArchiveError as exc:
            problem = f"rootfs={str(spec.rootfs)!r} from {spec.origin('rootfs')}: {exc}"
        if problem is not None:
            return self.abort(problem)
        ops = self.state.plan(root, spec.network)

        setup = self.in_parent("setup", lambda: _setup_in_parent(item))
        if setup.excinfo is not None:
            report = self.make_report(setup)
            self.log(report)
            if check_interactive_exception(setup, report):
                item.ihook.pytest_exception_interact(node=item, call=setup, report=report)
            return self.teardown()

        container = self.container(spec)
        try:
            outcome = self.launch(container, spec, ops)
        except (Exception, pytest.fail.Exception) as exc:  # raised in the parent while waiting: pytest-timeout
            outcome = Outcome(
                "aborted",
                payload=str(exc) if isinstance(exc, pytest.fail.Exception) else f"{type(exc).__name__}: {exc}",
            )
        self.conclude(outcome, spec)
        self.teardown()
        if hasattr(item, "_request"):
            item._request = False
            item.funcargs = None  # type: ignore[attr-defined]
        self.config.hook.pytest_lonely_container_finished(
            item=item,
            container=dataclasses.replace(container, host_pid=outcome.host_pid),
            exitstatus=outcome.exitstatus,
        )

    def launch(self, container: Container, spec: Spec, ops: tuple[rootfs.Op, ...]) -> Outcome:
        item = self.item
        return self.state.launcher().run(
            lambda write_fd, diag_fd: child.Launch(
                item=item,
                container=container,
                ops=ops,
                flags=self.unshare_flags(spec),
                uid=os.getuid(),
                gid=os.getgid(),
                parent_pid=os.getpid(),
                write_fd=write_fd,
                diag_fd=diag_fd,
                cwd=os.getcwd(),
                coverage="coverage" in sys.modules,
            ),
            self.on_frame,
            spec.timeout,
            need_status=bool(self.config.hook.pytest_lonely_container_finished.get_hookimpls()),
        )

    def abort(self, message: str, skip: bool = False) -> None:
        self.log(self.fail("setup", message, skip=skip))
        self.teardown()

    def container(self, spec: Spec) -> Container:
        cid = os.urandom(6).hex()
        namespaces = {"pid", "mnt", "uts", "ipc"}
        if self.state.rootless:
            namespaces.add("user")
        if not spec.network:
            namespaces.add("net")
        return Container(
            id=cid,
            hostname=spec.hostname or cid,
            host_pid=0,
            namespaces=frozenset(namespaces),
            rootless=self.state.rootless,
            rootfs=spec.rootfs,
            timeout=spec.timeout,
        )

    def unshare_flags(self, spec: Spec) -> int:
        flags = sc.CLONE_NEWNS | sc.CLONE_NEWUTS | sc.CLONE_NEWIPC
        if self.state.rootless:
            flags |= sc.CLONE_NEWPID  # root mode makes the PID namespace before the fork
        if not spec.network:
            flags |= sc.CLONE_NEWNET
        return flags

    def on_frame(self, kind: str, payload: Any) -> None:
        if kind == protocol.REPORT:
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=payload)
            if report.when == "teardown":
                self.held_teardown = report  # the parent may still add its own teardown to it
            else:
                self.log(report)
        elif kind == protocol.WARNING:
            self.warn(payload)
        elif kind == protocol.COVERAGE:
            _merge_coverage(payload)

    def warn(self, payload: dict[str, Any]) -> None:
        category: type[Warning] = UserWarning
        try:
            found = getattr(importlib.import_module(payload["module"]), payload["qualname"])
            if isinstance(found, type) and issubclass(found, Warning):
                category = found
        except Exception:
            pass
        try:
            message: Warning = category(payload["message"])
        except Exception:
            message = UserWarning(payload["message"])
        record = warnings.WarningMessage(message, category, payload["filename"], payload["lineno"])
        self.item.ihook.pytest_warning_recorded.call_historic(
            kwargs=dict(warning_message=record, nodeid=self.item.nodeid, when="runtest", location=None)
        )

    def conclude(self, outcome: Outcome, spec: Spec) -> None:
        if outcome.kind == "exit":
            msg, returncode = outcome.payload
            pytest.exit(msg, returncode)
        if outcome.kind == "interrupt":
            raise KeyboardInterrupt
        if outcome.kind == "done":
            return
        if outcome.kind in ("error", "aborted"):
            message = str(outcome.payload)
        elif outcome.kind == "timeout":
            message = f"Timeout: the test timed out after {spec.timeout:g} seconds; its whole container was killed"
        else:
            message = describe_status(outcome.exitstatus)
            if outcome.payload:
                message += f"; {outcome.payload}"
        if outcome.diag:
            message += "\n\n" + trim_traceback(outcome.diag)
        phase = self.missing_phase()
        if phase == "teardown" and self.held_teardown is not None:
            return  # the teardown report arrived complete; whatever killed the container came after
        if self.capman is not None:
            out, err = self.capman.read_global_capture()
            if out:
                self.item.add_report_section(phase, "stdout", out)
            if err:
                self.item.add_report_section(phase, "stderr", err)
        if phase == "call":
            _evaluate_xfail(self.item)
        report = self.fail(phase, message)
        report.duration = outcome.elapsed
        if phase == "teardown":
            self.held_teardown = report
        else:
            self.log(report)

    def missing_phase(self) -> Phase:
        setup = self.seen.get("setup")
        if setup is None:
            return "setup"
        if setup.passed and "call" not in self.seen and not self.config.getoption("setuponly", False):
            return "call"
        return "teardown"

    def teardown(self) -> None:
        """Tear down, in the parent, what the next test does not share, and log the teardown report."""
        item = self.item
        nextitem = None if item.session.shouldfail or item.session.shouldstop else self.nextitem
        call = self.in_parent("teardown", lambda: item.session._setupstate.teardown_exact(nextitem))
        held = self.held_teardown
        if held is None or (call.excinfo is not None and held.passed):
            report = self.make_report(call)
        else:
            report = held
            for when, key, content in item._report_sections:
                section = (f"Captured {key} {when}", content)
                if when == "teardown" and section not in report.sections:
                    report.sections.append(section)
        self.log(report)
        if check_interactive_exception(call, report):
            item.ihook.pytest_exception_interact(node=item, call=call, report=report)


_INTERNAL_FRAMES: Final = (
    "/_pytest/",
    "/pluggy/",
    f"{os.sep}pytest_lonely{os.sep}",
    "<frozen runpy>",
    "/pytest/__main__.py",
)


def trim_traceback(text: str) -> str:
    """Cut a faulthandler dump at the first pytest, pluggy or pytest-lonely frame.

    faulthandler prints the innermost frame first, so what comes after the
    test's own frames is only the machinery that called it.
    """
    kept: list[str] = []
    cut = False
    for line in text.rstrip().splitlines():
        if line.startswith("  File ") and any(marker in line for marker in _INTERNAL_FRAMES):
            cut = True
            continue
        if cut and line.startswith("  File "):
            continue
        if not line.startswith("  "):
            cut = False
        kept.append(line)
    return "\n".join(kept)


def _setup_in_parent(item: pytest.Item) -> None:
    """Set up the collectors and every fixture broader than the function, before the fork.

    The child inherits them, so a session fixture used by many isolated tests
    runs once, in the host process, and is torn down there when its scope
    ends.  This mirrors ``SetupState.setup`` minus the item itself.
    """
    state = item.session._setupstate
    needed = item.listchain()
    for col, (_, exc) in state.stack.items():
        if col not in needed:  # pragma: no cover - the previous teardown makes this impossible
            raise RuntimeError(f"{col!r} was not torn down before {item.nodeid}")
        if exc:
            raise exc[0].with_traceback(exc[1])
    for col in needed[len(state.stack) : -1]:
        state.stack[col] = ([col.teardown], None)
        try:
            col.setup()
        except (Exception, pytest.skip.Exception) as exc:
            state.stack[col] = (state.stack[col][0], (exc, exc.__traceback__))
            raise
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    request = getattr(item, "_request", None)
    if fixtureinfo is None or not request:
        return
    # The item must look active while its broader fixtures are requested (pytest
    # treats a request for an inactive node as a teardown-time lookup), but it must
    # not stay on the stack: the child's own setup pushes it and fills the rest.
    state.stack[item] = ([], None)
    try:
        for name in item.fixturenames:  # type: ignore[attr-defined]
            defs = fixtureinfo.name2fixturedefs.get(name)
            if defs and defs[-1].scope != "function":
                request.getfixturevalue(name)
    finally:
        finalizers, _ = state.stack.pop(item)
        for finalizer in reversed(finalizers):  # nothing broader registers here; be safe if something did
            finalizer()


def _evaluate_xfail(item: pytest.Item) -> None:
    """A crash synthesises the call report here, so the xfail marks must be known here too."""
    try:
        from _pytest.skipping import evaluate_xfail_marks, xfailed_key

        if item.stash.get(xfailed_key, None) is None:
            item.stash[xfailed_key] = evaluate_xfail_marks(item)
    except Exception:
        pass


def _merge_coverage(payload: tuple[str, dict[str, list[Any]]]) -> None:
    coverage = sys.modules.get("coverage")
    cov = coverage.Coverage.current() if coverage is not None else None
    if cov is None:
        return
    kind, measured = payload
    data = cov.get_data()
    if kind == "arcs":
        data.add_arcs({f: [tuple(a) for a in arcs] for f, arcs in measured.items()})
    else:
        data.add_lines(measured)
