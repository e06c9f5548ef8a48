"""The parent's side of one isolated test.

The parent sets up the broader-scoped fixtures itself (so that a session
fixture runs once, not once per container), has the engine run the test's
phases as PID 1 of a container, and feeds the reports that come back into
``pytest_runtest_logreport`` as if the test had run in-process.  While it
waits, its own capture stays on, so what the parent's threads print lands in
the running test's output, as it would in-process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import re
import sys
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import pytest

from . import _pytest_compat as compat
from . import child, groups, preflight, wire
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
        self.attempt = attempt
        #: The container this attempt runs in, once it does.
        self.group: groups.Group | None = None
        #: The "filesystem changes" text, once made: a test shows it once, with its first failure.
        self._changes_text: str | None = None
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
        index = self.state.item_index(item)
        key = groups.key_of(item, ready, index)
        scope = ready.spec.scope if key is not None else "function"
        setup = self.in_parent("setup", lambda: compat.setup_broader_fixtures(item, scope))
        if setup.excinfo is not None:
            report = self.reporter.make(setup)
            self.reporter.log(report)
            if compat.check_interactive_exception(setup, report):
                item.ihook.pytest_exception_interact(node=item, call=setup, report=report)
            self.teardown()
            return

        coverage = "coverage" in sys.modules
        group = self.group = self._group(ready, key, index, coverage)
        group.box.shared = key is not None
        keep = self._keep(group)
        if index is None:
            order: Any = wire.encode_order(-1, item.nodeid, group.container, coverage, wire.KEEP_NONE)
        else:
            order = wire.encode_order(index, item.nodeid, group.container, coverage, keep)
        self._resume_capture()
        try:
            outcome = group.box.run(
                group.tail(ready.spec.timeout), order, ready.spec.timeout, self.on_frame, self._terminal()
            )
        except (Exception, pytest.fail.Exception) as exc:  # raised in the parent while waiting: pytest-timeout
            outcome = Outcome(
                "aborted",
                payload=str(exc) if isinstance(exc, pytest.fail.Exception) else f"{type(exc).__name__}: {exc}",
            )
        except BaseException:
            self._end(group, None)  # Ctrl-C in pytest: the container was killed, and nothing more runs
            raise
        finally:
            self._suspend_capture()
        group.orders += 1
        group.last = item
        self.reporter.judge(outcome)  # a refused DONE ends even a shared container
        self._changed(outcome)
        ended = outcome.ended or keep == wire.KEEP_NONE
        if ended:
            self._end(group, outcome)
        if outcome.kind in ("crashed", "timeout", "refused", "aborted") and group.key is not None:
            left = compat.fixtures_inside(item, scope)
            if left:
                note = (
                    f"the container's {scope} fixtures were not torn down: {', '.join(left)}; the rest of its "
                    "tests run in a fresh container, where they are set up again"
                )
                outcome.payload = f"{outcome.payload}; {note}" if outcome.payload else note
        if outcome.kind == "interrupt" and isinstance(outcome.payload, str):
            self._show_interrupted(outcome.payload)
        leftover = self.capture.read()  # the container is done: nobody writes for it now
        self.reporter.conclude(outcome, ready.spec.timeout, ready.spec.memory, leftover, self._changes_text)
        preflight.note_lost_example(item, any(r.failed for r in self.reporter.seen.values()), self.state)
        self.teardown()
        compat.release_request(item)
        if ended:
            self._finished(group, outcome)

    def _group(self, ready: preflight.Ready, key: Hashable | None, index: int | None, coverage: bool) -> groups.Group:
        """The container this test runs in: its group's, if that is alive, else a new one."""
        group: groups.Group | None = self.state.group
        if group is not None and (key is None or group.key != key or not group.alive):
            close_group(self.state, finish=True)
            group = None
        if group is not None:
            return group
        box = self.state.engine().launch(ready.engine_spec, self._work(index, ready, coverage))
        group = groups.Group(
            key=key,
            box=box,
            container=ready.container,
            spec=ready.engine_spec,
            first=self.item,
            last=self.item,
            name=groups.name_of(self.item, ready),
        )
        if key is not None:
            self.state.group = group
        return group

    def _changed(self, outcome: Outcome) -> None:
        """Before the container goes: what it changed, for a test that failed (or every test, with keep=all)."""
        keep = self.state.options.keep
        failed = outcome.kind not in ("done", "exit", "interrupt") or any(r.failed for r in self.reporter.seen.values())
        if self._changes_text is None and (failed or keep == "all"):
            self._changes_text = self._describe_changes(keep_files=keep == "all" or (keep == "failed" and failed))
            if not failed:  # keep=all: the passing test's call report shows it (-rA), junitxml has a property
                shown = self.reporter.seen.get("call") or self.reporter.seen.get("setup")
                if shown is not None:
                    shown.sections.append(("filesystem changes", self._changes_text))
                held = self.reporter.held_teardown
                if held is not None:
                    held.user_properties.append(("lonely filesystem changes", self._changes_text))

    def _describe_changes(self, keep_files: bool) -> str:
        """The report section: what changed, at most a few dozen lines, and where the files were kept."""
        assert self.group is not None
        box = self.group.box
        try:
            found = box.changed()
        except OSError as exc:
            return f"the container's layers could not be read: {exc}"
        if found is None:
            return "the container's layers cannot be read here (it was not built from an overlay of its own)"
        lines = found.lines(LISTED_CHANGES) or ["(nothing changed)"]
        if keep_files:
            lines.append(self._keep_files(box))
        return "\n".join(lines)

    def _keep_files(self, box: Any) -> str:
        """``--lonely-keep``: copy the evidence under the session's basetemp, where tmp_path's retention applies."""
        factory = compat.tmp_path_factory(self.config)
        if factory is None:
            return "not kept: pytest's tmp_path plugin is disabled"
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.item.nodeid)[-100:]
        name += f"-{self.attempt}" if self.attempt else ""
        dest = factory.getbasetemp() / "lonely-keep" / name
        try:
            dest.mkdir(parents=True)
            kept = box.keep(str(dest))
        except (OSError, ValueError) as exc:
            return f"not kept in {dest}: {exc}"
        if kept is None:
            return "not kept: the container's layers cannot be read here"
        note = "" if kept.complete else f"; {len(kept.not_copied)} not copied, listed in NOT_COPIED"
        return f"kept in {dest}: {kept.copied} copied ({kept.bytes} bytes), {kept.deleted} deleted in DELETED{note}"

    def _keep(self, group: groups.Group) -> int:
        """What the container keeps set up after this test: the next test's scopes, or nothing."""
        if group.key is None:
            return wire.KEEP_NONE
        if self.nextitem is self.item:
            return wire.KEEP_RERUN
        if not groups.joins(self.nextitem, group.key) or self.nextitem is None:
            return wire.KEEP_NONE
        index = self.state.item_index(self.nextitem)
        return wire.KEEP_NONE if index is None else index

    def _end(self, group: groups.Group, outcome: Outcome | None) -> None:
        """The container's work is over: whatever is left of it goes; its status is read if it says something."""
        if self.state.group is group:
            self.state.group = None
        group.alive = False
        self.state.engine().end(group.box, outcome, need_status=self._need_status())
        if outcome is not None and outcome.usage is not None:
            self.state.usage[group.name] = outcome.usage

    def _finished(self, group: groups.Group, outcome: Outcome) -> None:
        self.config.hook.pytest_lonely_container_finished(
            item=group.last,
            container=dataclasses.replace(group.container, host_pid=outcome.host_pid),
            exitstatus=outcome.exitstatus,
        )

    def _need_status(self) -> bool:
        return bool(self.config.hook.pytest_lonely_container_finished.get_hookimpls())

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

    def _work(self, index: int | None, ready: preflight.Ready, coverage: bool) -> Work:
        """How the container turns orders into bodies: it finds each test by its index in the session's items.

        A container forked straight from this process could use the item
        itself; one from a zygote (a copy of this process taken at an earlier
        test, with the same state as the key says) finds it by index, which
        collection fixed before any test ran.  An item not in the session's
        items (a plugin's own) is run only by containers forked from here, and
        so is every test when a container-finished hook may change our state.
        """
        item = self.item
        if index is None:
            body = child.body_for(item, ready.container, coverage)
            return Work(factory=lambda _order: body)
        factory = functools.partial(child.body_from_order, item.session)
        # pytest_lonely_container_finished runs here after every container and may change what the next one
        # must see (a conftest keeps a list): a zygote's copy of this process would not have it.
        if self._need_status():
            return Work(factory=factory)
        key = (self.state.generation, compat.setup_stack_key(item), compat.protocol_context(item))
        return Work(factory=factory, key=key, prepare=functools.partial(child.prepare_copy, item.session))

    def on_frame(self, kind: protocol.Kind, payload: Any) -> None:
        """The one dispatcher of the adapter's frames; a kind without a handler is a bug, said loudly."""
        handler = self._handlers.get(kind)
        if handler is None:
            raise protocol.ProtocolError(f"no handler for frame kind {kind.value!r}")
        handler(payload)

    @contextlib.contextmanager
    def _to_the_terminal(self) -> Iterator[None]:
        """Reports are written to the terminal: not into the capture that is on while we wait.

        Only around the writing: while it is off, what this process's threads
        print goes to the terminal, not to the running test.
        """
        self._suspend_capture()
        try:
            yield
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
        if report.failed and type(report) is pytest.TestReport and self._changes_text is None:
            keep = self.state.options.keep
            self._changes_text = self._describe_changes(keep_files=keep != "none")
            _add_section(report, "filesystem changes", self._changes_text)
        with self._to_the_terminal():
            self.reporter.log(report)

    def _add_parent_output(self, report: pytest.TestReport) -> None:
        """What this process's threads printed while the container ran belongs to the running phase's report.

        In-process, pytest's capture files a server thread's log lines under
        the test that was running.  The container writes into files of its
        own, so the parent reads its own capture as each report arrives.  Not
        at the setup report: the parent may read it late, when the container
        is already in the test's call, whose requests those threads serve;
        what they print during setup goes with the call.
        """
        if report.when == "setup":
            return
        out, err = self.capture.peek()
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
        with self._to_the_terminal():
            self.item.ihook.pytest_warning_recorded.call_historic(
                kwargs=dict(warning_message=record, nodeid=self.item.nodeid, when="runtest", location=None)
            )

    def teardown(self) -> None:
        """Tear down, in the parent, what the next test does not share, and log the teardown report."""
        item = self.item
        stopping = bool(item.session.shouldfail or item.session.shouldstop)
        nextitem = None if stopping else self.nextitem
        if stopping and self.state.group is not None:
            close_group(self.state, finish=True)  # its next test will not come
        call = self.in_parent("teardown", lambda: compat.teardown_towards(item, nextitem))
        report = self.reporter.teardown(call)
        if compat.check_interactive_exception(call, report):
            item.ihook.pytest_exception_interact(node=item, call=call, report=report)


#: Lines of "filesystem changes" a report shows; the rest is counted.
LISTED_CHANGES = 40


def _add_section(report: pytest.TestReport, title: str, text: str) -> None:
    """A section of the failure itself: the terminal shows it after the traceback, junitxml in the failure's text."""
    longrepr: Any = report.longrepr
    if hasattr(longrepr, "addsection"):
        longrepr.addsection(title, text)
    elif isinstance(longrepr, str):
        report.longrepr = f"{longrepr}\n\n{title}:\n{text}"
    else:
        report.sections.append((title, text))


def close_group(state: Any, finish: bool) -> None:
    """End the session's shared container, if one is alive; ``finish``: it tears down its fixtures first."""
    group: groups.Group | None = state.group
    if group is None:
        return
    state.group = None
    group.alive = False
    outcome = None
    try:
        if finish:
            outcome = groups.finish(group, "coverage" in sys.modules)
    finally:
        need_status = bool(group.first.config.hook.pytest_lonely_container_finished.get_hookimpls())
        state.engine().end(group.box, outcome, need_status=need_status)
    if outcome is not None:
        if outcome.usage is not None:
            state.usage[group.name] = outcome.usage
        group.first.config.hook.pytest_lonely_container_finished(
            item=group.last,
            container=dataclasses.replace(group.container, host_pid=outcome.host_pid),
            exitstatus=outcome.exitstatus,
        )
