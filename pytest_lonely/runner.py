"""The parent's side of one isolated test.

The parent sets up the broader-scoped fixtures itself (so that a session
fixture runs once, not once per container), has the engine run the test's
phases as PID 1 of a container, and feeds the reports that come back into
``pytest_runtest_logreport`` as if the test had run in-process.  While it
waits, its own capture stays on, so what the parent's threads print lands in
the running test's output, as it would in-process.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

from . import _pytest_compat as compat
from . import child, preflight, wire
from .reports import Phase, Reporter
from .sandbox import protocol
from .sandbox.box import Outcome
from .sandbox.spec import Work
from .session import SESSION_KEY


class IsolatedRun:
    """One attempt at one isolated test, from the parent's point of view."""

    def __init__(
        self, item: pytest.Item, nextitem: pytest.Item | None, attempt: int = 0, may_rerun: bool = False
    ) -> None:
        self.item = item
        # Between reruns keep every broader-scoped fixture: the next attempt needs them.
        self.nextitem = item if may_rerun else nextitem
        self.config = item.config
        self.state = self.config.stash[SESSION_KEY]
        self.capture = compat.Capture(self.config)
        self.reporter = Reporter(item, attempt, may_rerun)
        self._handlers: dict[protocol.Kind, Callable[[Any], None]] = {
            protocol.Kind.REPORT: self._report,
            protocol.Kind.WARNING: self._warn,
            protocol.Kind.COVERAGE: wire.decode_coverage,
        }

    @property
    def rerunning(self) -> bool:
        return self.reporter.rerunning

    def in_parent(self, when: Phase, func: Callable[[], None]) -> pytest.CallInfo[None]:
        """Run ``func`` with output captured into the item's sections, as pytest does for its own phases."""
        reraise = compat.reraise_exceptions(self.config)
        with self.capture.phase(when, self.item):
            return pytest.CallInfo.from_call(func, when=when, reraise=reraise)

    def run(self) -> None:
        item = self.item
        compat.reset_request(item)
        ready = preflight.prepare(item)
        if isinstance(ready, preflight.Refused):
            self.reporter.log(self.reporter.fail("setup", ready.message, skip=ready.skip))
            self.teardown()
            return

        setup = self.in_parent("setup", lambda: compat.setup_broader_fixtures(item))
        if setup.excinfo is not None:
            report = self.reporter.make(setup)
            self.reporter.log(report)
            if compat.check_interactive_exception(setup, report):
                item.ihook.pytest_exception_interact(node=item, call=setup, report=report)
            self.teardown()
            return

        hook = self.config.hook.pytest_lonely_container_finished
        coverage = "coverage" in sys.modules
        work, order = self._work(ready, coverage)
        self._resume_capture()
        try:
            outcome = self.state.engine().run(
                ready.engine_spec,
                work,
                order,
                self.on_frame,
                need_status=bool(hook.get_hookimpls()),
                terminal=self._terminal(),
            )
        except (Exception, pytest.fail.Exception) as exc:  # raised in the parent while waiting: pytest-timeout
            outcome = Outcome(
                "aborted",
                payload=str(exc) if isinstance(exc, pytest.fail.Exception) else f"{type(exc).__name__}: {exc}",
            )
        finally:
            self._suspend_capture()
        if outcome.usage is not None:
            self.state.usage[item.nodeid] = outcome.usage
        if outcome.kind == "interrupt" and isinstance(outcome.payload, str):
            self._show_interrupted(outcome.payload)
        self.reporter.conclude(outcome, ready.spec.timeout, ready.spec.memory, self.capture)
        preflight.note_lost_example(item, any(r.failed for r in self.reporter.seen.values()), self.state)
        self.teardown()
        compat.release_request(item)
        hook(
            item=item,
            container=dataclasses.replace(ready.container, host_pid=outcome.host_pid),
            exitstatus=outcome.exitstatus,
        )

    def _terminal(self) -> int:
        """The terminal to lend the container: with ``-s`` a debugger inside reads it, as in-process.

        The container's processes have a process group of their own, which the
        terminal would stop (SIGTTIN) for reading while pytest's is in the
        foreground; so while the test runs its group is the foreground one.
        """
        if self.config.getoption("capture", "fd") != "no":
            return -1
        try:
            if os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp():
                return 0
        except OSError:
            pass
        return -1

    def _work(self, ready: preflight.Ready, coverage: bool) -> tuple[Work, Any]:
        """What the container runs: the item, found by its index in the session's items.

        A container forked straight from this process could use the item
        itself; one from a zygote (a copy of this process taken at an earlier
        test, with the same state as the key says) finds it by index, which
        collection fixed before any test ran.  An item not in the session's
        items (a plugin's own) is run only by containers forked from here, and
        so is every test when a container-finished hook may change our state.
        """
        item = self.item
        index = self.state.item_index(item)
        order = (-1 if index is None else index, item.nodeid, wire.encode_container(ready.container), coverage)
        # pytest_lonely_container_finished runs here after every container and may change what the next one
        # must see (a conftest keeps a list): a zygote's copy of this process would not have it.
        if index is None or self.config.hook.pytest_lonely_container_finished.get_hookimpls():
            body = child.body_for(item, ready.container, coverage)
            return Work(factory=lambda _order: body), order
        key = (self.state.generation, compat.setup_stack_key(item), compat.protocol_context(item))
        return Work(factory=functools.partial(child.body_from_order, item.session), key=key), order

    def on_frame(self, kind: protocol.Kind, payload: Any) -> None:
        """The one dispatcher of the adapter's frames; a kind without a handler is a bug, said loudly."""
        handler = self._handlers.get(kind)
        if handler is None:
            raise protocol.ProtocolError(f"no handler for frame kind {kind.value!r}")
        # Reports are written to the terminal: not into the capture that is on while we wait.
        self._suspend_capture()
        try:
            handler(payload)
        finally:
            self._resume_capture()

    def _resume_capture(self) -> None:
        """Keep capturing while the container runs: a parent thread's output belongs to the running test."""
        self.capture.resume()

    def _suspend_capture(self) -> None:
        self.capture.suspend()

    def _report(self, data: Any) -> None:
        report = wire.decode_report(self.config, data)
        self.reporter.accept(report)
        self._add_parent_output(report)
        self.reporter.log(report)

    def _add_parent_output(self, report: pytest.TestReport) -> None:
        """What this process's threads printed while the container ran belongs to the running phase's report.

        In-process, pytest's capture files a server thread's log lines under
        the test that was running.  The container writes into files of its
        own, so the parent reads its own capture as each report arrives.
        """
        out, err = self.capture.read()
        when = report.when or "call"
        for key, text in (("stdout", out), ("stderr", err)):
            if not text:
                continue
            title = f"Captured {key} {when}"
            for index, (name, content) in enumerate(report.sections):
                if name == title:
                    report.sections[index] = (name, content + text)
                    break
            else:
                report.sections.append((title, text))

    def _show_interrupted(self, where: str) -> None:
        """Ctrl-C inside: show where the test was, which the parent's own traceback cannot."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("!", f"{self.item.nodeid} interrupted in its container")
            reporter.write_line(where.rstrip())

    def _warn(self, payload: Any) -> None:
        record = wire.decode_warning(payload)
        self.item.ihook.pytest_warning_recorded.call_historic(
            kwargs=dict(warning_message=record, nodeid=self.item.nodeid, when="runtest", location=None)
        )

    def teardown(self) -> None:
        """Tear down, in the parent, what the next test does not share, and log the teardown report."""
        item = self.item
        nextitem = None if item.session.shouldfail or item.session.shouldstop else self.nextitem
        call = self.in_parent("teardown", lambda: compat.teardown_towards(item, nextitem))
        report = self.reporter.teardown(call)
        if compat.check_interactive_exception(call, report):
            item.ihook.pytest_exception_interact(node=item, call=call, report=report)
