"""Inner pytest sessions: how the tests start them, and how they read what the sessions reported."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest


class RunLonely(Protocol):
    """The ``run_lonely`` fixture: pytest in a subprocess of pytester's project, ``-p lonely`` and these args."""

    def __call__(self, *args: str, timeout: float = ...) -> pytest.RunResult: ...


def requires_plugin(dist: str, module: str, *, builtin: bool = False) -> pytest.MarkDecorator:
    """Skip a test whose inner sessions need the pytest plugin ``dist`` (importable as ``module``).

    The inner sessions run this interpreter, so what is importable here is what
    they have.  The reason names the distribution, so that ``python -m pytest``
    without the ``test`` extras says what to install instead of failing on an
    unknown option.  ``builtin`` is true where this pytest already ships the
    feature (pytest 9's ``subtests``), and then nothing is needed.
    """
    missing = not builtin and importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"needs the pytest plugin {dist} (pip install {dist})")


_SLEEP_TAG = re.compile(r"(?<![\d.])(987\.\d+|654\.321)(?!\d)")


def unique_sleeps(text: str) -> str:
    """Make the marker arguments of test daemons (``sleep 987.321``) unique to this pytest process.

    Tests look for their daemons with ``pgrep -f``; two suites running at once (tox -p) must not see
    each other's.  Apply it once to every string that starts or looks for such a daemon.
    """
    return _SLEEP_TAG.sub(lambda m: f"{m.group(1)}{os.getpid()}", text)


@dataclasses.dataclass(frozen=True)
class Case:
    """One test case of an inner session's junitxml report."""

    outcome: str  # passed, failed, error or skipped
    message: str
    properties: dict[str, str]


def junit_cases(path: Path) -> Iterator[tuple[str, str, Case]]:
    """(classname, name, case) of every test case of an inner session's junitxml report, in report order."""
    if not path.exists():
        return
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("skipped", "error", "failure"):
            element = case.find(kind)
            if element is not None:
                outcome = "failed" if kind == "failure" else kind
                message = (element.get("message") or "") + "\n" + (element.text or "")
        properties = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        yield case.get("classname", ""), case.get("name", ""), Case(outcome, message, properties)


def parse_junit(path: Path) -> dict[str, Case]:
    """Every test case of an inner session's junitxml report by name; none if the session wrote no report."""
    return {name: case for _, name, case in junit_cases(path)}
