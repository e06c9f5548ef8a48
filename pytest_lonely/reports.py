"""The reports of one isolated test, as the parent logs them.

Reports made in the child arrive over the pipe and are logged as they come.
Whatever the child could not report (it crashed, timed out, or was never
started) is made here, through ``pytest_runtest_makereport`` so that xfail
and friends apply, and reruns are marked the way pytest-rerunfailures marks
them.
"""

from __future__ import annotations

import os
from typing import Final, Literal

import pytest

from . import _pytest_compat as compat
from .sandbox.box import Outcome
from .sandbox.limits import format_bytes
from .sandbox.process import describe_status
from .sandbox.protocol import ProtocolError

Phase = Literal["setup", "call", "teardown"]
_OUTCOMES: Final = ("passed", "failed", "skipped")


class Reporter:
    """Logs the reports of one attempt at one isolated test."""

    def __init__(self, item: pytest.Item, attempt: int, may_rerun: bool) -> None:
        self.item = item
        self.attempt = attempt
        self.may_rerun = may_rerun
        self.rerunning = False
        self.seen: dict[str, pytest.TestReport] = {}
        #: The child's teardown report: the parent may still add its own teardown to it.
        self.held_teardown: pytest.TestReport | None = None

    def accept(self, report: pytest.TestReport) -> None:
        """Refuse a report from the container that pytest could not have made for this test at this point.

        A container may lie about its own outcome, as test code in-process
        can; it may not report for another test, report a phase twice or out
        of pytest's order, or invent an outcome.
        """
        item = self.item
        if report.nodeid != item.nodeid:
            raise ProtocolError(f"a report for {report.nodeid!r} while running {item.nodeid!r}")
        if report.when not in ("setup", "call", "teardown"):
            raise ProtocolError(f"a report for phase {report.when!r}; pytest has setup, call and teardown")
        if report.outcome not in _OUTCOMES:
            raise ProtocolError(f"a {report.when} report with outcome {report.outcome!r}")
        if self.held_teardown is not None:
            raise ProtocolError(f"a {report.when} report after the teardown report")
        if type(report) is not pytest.TestReport:  # a subtest's (or another plugin's) report: in any phase
            return
        setup = self.seen.get("setup")
        if report.when == "setup" and self.seen:
            raise ProtocolError("a second setup report")
        if report.when == "call" and (setup is None or not setup.passed or "call" in self.seen):
            raise ProtocolError(
                "a call report " + ("twice" if "call" in self.seen else "without a passed setup before it")
            )
        if report.when == "teardown" and setup is None:
            raise ProtocolError("a teardown report without a setup report before it")

    def log(self, report: pytest.TestReport) -> None:
        # The item's own phase reports decide which phase is missing after a crash; a subtest's
        # report (a subclass) or another plugin's is only passed on.
        own = type(report) is pytest.TestReport and report.nodeid == self.item.nodeid
        if own and report.when == "teardown":
            self.held_teardown = report
            return
        if own:
            self.seen[report.when or ""] = report
        self._log(report)

    def _log(self, report: pytest.TestReport) -> None:
        if self.attempt or self.may_rerun:
            report.rerun = self.attempt  # type: ignore[attr-defined]
            if report.failed and (self.rerunning or (self.may_rerun and not hasattr(report, "wasxfail"))):
                report.outcome = "rerun"  # type: ignore[assignment]
                self.rerunning = True
        self.item.ihook.pytest_runtest_logreport(report=report)

    def make(self, call: pytest.CallInfo[None]) -> pytest.TestReport:
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
                raise compat.skip_at_item_location(message)
            pytest.fail(message, pytrace=False)

        return self.make(pytest.CallInfo.from_call(raise_, when=when))

    def unfinished(self) -> str | None:
        """What a container that said DONE left unreported, in words; None if pytest would accept its reports."""
        setup = self.seen.get("setup")
        if setup is None:
            return "no setup report"
        if setup.passed and "call" not in self.seen and not _no_call(self.item.config):
            return "a passed setup but no call report"
        if self.held_teardown is None:
            return "no teardown report"
        return None

    def judge(self, outcome: Outcome) -> None:
        """Turn a container's claim that pytest cannot accept into a refusal, before the caller decides its fate.

        A shared container that said DONE too early, or sent an exit pytest
        cannot act on, must not be handed its group's next test: what it sends
        next would land in that test's report.
        """
        if outcome.kind == "exit":
            payload = outcome.payload
            if not (
                isinstance(payload, list)
                and len(payload) == 2
                and isinstance(payload[0], str)
                and (payload[1] is None or type(payload[1]) is int)
            ):
                outcome.kind, outcome.payload = "refused", f"pytest.exit() with {payload!r}, not [message, returncode]"
        elif outcome.kind == "done":
            missing = self.unfinished()
            if missing is not None:
                outcome.kind, outcome.payload = "refused", f"it said it was done after {missing}"

    def conclude(
        self,
        outcome: Outcome,
        timeout: float,
        memory: int | None,
        leftover: tuple[str, str],
        changes: str | None = None,
    ) -> None:
        """Act on how the container ended: re-raise an exit, or make the missing phase's report."""
        self.judge(outcome)
        if outcome.kind == "exit":
            pytest.exit(outcome.payload[0], outcome.payload[1])
        if outcome.kind == "interrupt":
            raise KeyboardInterrupt
        if outcome.kind == "done":
            self._file_leftover("teardown", leftover)
            return
        if outcome.kind == "refused":
            message = (
                f"pytest-lonely refused what this test's container sent: {outcome.payload}; "
                "the container was killed and nothing more it sent was used"
            )
        elif outcome.kind in ("error", "aborted"):
            message = str(outcome.payload)
        elif outcome.kind == "timeout":
            unit = "second" if timeout == 1 else "seconds"
            message = f"Timeout: the test timed out after {timeout:g} {unit}; its whole container was killed"
            if outcome.payload:
                message += f"; {outcome.payload}"
        elif outcome.oom_killed and memory is not None:
            message = f"container killed by the kernel's OOM killer: memory limit {format_bytes(memory)} reached"
            if outcome.payload:
                message += f"; {outcome.payload}"
        else:
            message = describe_status(outcome.exitstatus)
            if outcome.payload:
                message += f"; {outcome.payload}"
        if outcome.diag:
            message += "\n\n" + trim_traceback(outcome.diag)
        if changes is not None:
            message += "\n\nfilesystem changes:\n" + changes
        phase = self.missing_phase()
        if phase == "teardown" and self.held_teardown is not None and outcome.kind != "refused":
            self._file_leftover("teardown", leftover)
            return  # the teardown report arrived complete; whatever killed the container came after
        if phase == "teardown" and self.held_teardown is not None:
            self.held_teardown = None  # a refused container's teardown report is not believed either
        out, err = outcome.stdout + leftover[0], outcome.stderr + leftover[1]
        if out:
            self.item.add_report_section(phase, "stdout", out)
        if err:
            self.item.add_report_section(phase, "stderr", err)
        if phase == "call":
            compat.ensure_xfail_evaluated(self.item)
        report = self.fail(phase, message)
        report.duration = outcome.elapsed
        if phase == "teardown":
            self.held_teardown = report
        else:
            self.log(report)

    def _file_leftover(self, when: Phase, leftover: tuple[str, str]) -> None:
        """What this process printed after the container's last report: the last phase's, as in-process."""
        for key, text in zip(("stdout", "stderr"), leftover, strict=True):
            if text:
                self.item.add_report_section(when, key, text)

    def missing_phase(self) -> Phase:
        setup = self.seen.get("setup")
        if setup is None:
            return "setup"
        if setup.passed and "call" not in self.seen and not _no_call(self.item.config):
            return "call"
        return "teardown"

    def teardown(self, call: pytest.CallInfo[None]) -> pytest.TestReport:
        """Log the one teardown report: the child's, with the parent's own teardown merged into it."""
        held = self.held_teardown
        if held is None or (call.excinfo is not None and held.passed):
            report = self.make(call)
        else:
            report = held
            for when, key, content in compat.report_sections(self.item):
                section = (f"Captured {key} {when}", content)
                if when == "teardown" and section not in report.sections:
                    report.sections.append(section)
        self._log(report)
        return report


def _no_call(config: pytest.Config) -> bool:
    """``--setup-only`` and ``--setup-plan`` run no call phase."""
    return bool(config.getoption("setuponly", False) or config.getoption("setupplan", False))


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
