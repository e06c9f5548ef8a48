"""The parent's side of one isolated test.

The parent sets up the broader-scoped fixtures itself (so that a session
fixture runs once, not once per container), forks the container, and feeds
the reports that come back over the pipe into ``pytest_runtest_logreport`` as
if the test had run in-process.  When the container dies without reporting a
phase, the missing report is made here, through pytest's own hooks.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import warnings
from typing import Any, Final, Literal

import pytest
from _pytest.runner import CallInfo, check_interactive_exception, get_reraise_exceptions
from _pytest.skipping import evaluate_xfail_marks, xfailed_key

from .sandbox import _syscalls as sc
from . import child
from .sandbox import archive, protocol, rootfs
from .container import Container
from .launcher import Outcome, describe_status
from .session import SESSION_KEY
from .spec import Spec, SpecError

MARKER: Final = "isolated"

Phase = Literal["setup", "call", "teardown"]


def _spec_for(item: pytest.Item, defaults: Spec) -> Spec:
    spec = defaults
    where = item.nodeid
    for mark in reversed(list(item.iter_markers(MARKER))):
        spec = spec.with_marker(tuple(mark.args), mark.kwargs, where, item.config.rootpath)
    return spec


class IsolatedRun:
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
            if skip:  # reported at the test's own location, not at this line
                raise pytest.skip.Exception(message, _use_item_location=True)
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
        key, ops = self.state.plan(root, spec.network)

        setup = self.in_parent("setup", lambda: _setup_in_parent(item))
        if setup.excinfo is not None:
            report = self.make_report(setup)
            self.log(report)
            if check_interactive_exception(setup, report):
                item.ihook.pytest_exception_interact(node=item, call=setup, report=report)
            return self.teardown()

        container = self.container(spec)
        try:
            outcome = self.launch(container, spec, key, ops)
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

    def launch(self, container: Container, spec: Spec, key: rootfs.PlanKey, ops: tuple[rootfs.Op, ...]) -> Outcome:
        item = self.item
        pool = self.state.pool()
        prepared = pool.take(key) if pool is not None else None

        def after_fork() -> None:
            # The child holds its own references now; build the next test's while this one runs.
            if prepared is not None:
                prepared.close()
            if pool is not None:
                pool.prefetch(key, ops)

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
                joins=prepared.joins if prepared is not None else (),
                notes=prepared.notes if prepared is not None else (),
            ),
            self.on_frame,
            spec.timeout,
            need_status=bool(self.config.hook.pytest_lonely_container_finished.get_hookimpls()),
            after_fork=after_fork,
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
            unit = "second" if spec.timeout == 1 else "seconds"
            message = f"Timeout: the test timed out after {spec.timeout:g} {unit}; its whole container was killed"
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
        if item.stash.get(xfailed_key, None) is None:
            item.stash[xfailed_key] = evaluate_xfail_marks(item)
    except Exception:  # a broken xfail condition was already reported by the child's setup
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
