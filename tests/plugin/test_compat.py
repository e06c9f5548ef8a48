"""The compat fence: the pytest internals it relies on keep their shapes, nothing else touches them,
and a pytest it cannot serve disables the plugin instead of breaking the session.

A future pytest that moves one of these internals fails a test here, by name, rather than every user's
session.  When one fails: adapt ``pytest_lonely/_pytest_compat.py``, widen the tested range in
``SUPPORTED_LAST``, ``pyproject.toml`` and ``tox.ini`` together.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Any

import _pytest.capture
import _pytest.python
import _pytest.runner
import _pytest.skipping
import pytest

from pytest_lonely import _pytest_compat as compat

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "pytest_lonely"


def _params(func: Any) -> list[str]:
    return list(inspect.signature(func).parameters)


# --- the range -----------------------------------------------------------------------------------------------------


def test_this_pytest_is_supported() -> None:
    """If this fails, the fence says why: an internal is missing, or this pytest was never tested."""
    assert compat.UNSUPPORTED is None
    assert compat.PYTEST_VERSION is not None
    assert compat.SUPPORTED_FIRST <= compat.PYTEST_VERSION <= compat.SUPPORTED_LAST


def test_declared_range_is_the_tested_range() -> None:
    first, last = compat.SUPPORTED_FIRST, compat.SUPPORTED_LAST
    pyproject = (REPO / "pyproject.toml").read_text()
    declared = re.search(r'"pytest(>=[^"]*)"', pyproject)
    assert declared is not None, "pyproject.toml declares no pytest requirement"
    assert declared.group(1) == f">={first[0]}.{first[1]},<{last[0]}.{last[1] + 1}"
    tox = (REPO / "tox.ini").read_text()
    for major, minor in (first, last):
        assert f"pytest{major}{minor}: pytest~={major}.{minor}.0" in tox, (
            f"tox.ini does not test pytest {major}.{minor}"
        )


# --- the shapes the fence relies on ---------------------------------------------------------------------------------


def test_runtestprotocol_looks_up_call_and_report_in_its_module() -> None:
    """``run_protocol_streaming`` replaces ``call_and_report`` in ``_pytest.runner``; the protocol must see it."""
    protocol = _pytest.runner.runtestprotocol
    assert protocol.__globals__ is vars(_pytest.runner)
    assert "call_and_report" in protocol.__code__.co_names
    assert _params(protocol)[:3] == ["item", "log", "nextitem"]
    assert _params(_pytest.runner.call_and_report) == ["item", "when", "log", "kwds"]


def test_setup_state_shape() -> None:
    state = _pytest.runner.SetupState()
    assert state.stack == {}
    assert _params(state.setup) == ["item"]
    assert _params(state.teardown_exact) == ["nextitem"]


def test_check_interactive_exception_shape() -> None:
    assert _params(_pytest.runner.check_interactive_exception) == ["call", "report"]


def test_get_reraise_exceptions_exists_from_pytest_9() -> None:
    """8.x builds the tuple inline; the fence copies it there.  A backport would make this fail: drop the copy."""
    assert compat.PYTEST_VERSION is not None
    assert hasattr(_pytest.runner, "get_reraise_exceptions") == (compat.PYTEST_VERSION >= (9, 0))


def test_reraise_exceptions(pytester: pytest.Pytester) -> None:
    config = pytester.parseconfig()
    assert compat.reraise_exceptions(config) == (pytest.exit.Exception, KeyboardInterrupt)
    assert compat.reraise_exceptions(pytester.parseconfig("--pdb")) == (pytest.exit.Exception,)


def test_skipping_shapes(pytester: pytest.Pytester) -> None:
    item = pytester.getitem(
        """
        import pytest

        @pytest.mark.skipif(True, reason="because")
        @pytest.mark.xfail(reason="expected")
        def test_marked():
            pass
        """,
        funcname="test_marked",
    )
    assert compat.skip_reason(item) == "because"
    assert isinstance(_pytest.skipping.xfailed_key, pytest.StashKey)
    assert item.stash.get(_pytest.skipping.xfailed_key, None) is None
    compat.ensure_xfail_evaluated(item)
    assert item.stash[_pytest.skipping.xfailed_key].reason == "expected"  # type: ignore[union-attr]


def test_skip_at_item_location() -> None:
    assert "_use_item_location" in inspect.signature(pytest.skip.Exception).parameters
    exc = compat.skip_at_item_location("why")
    assert isinstance(exc, pytest.skip.Exception)
    assert exc._use_item_location


def test_function_item_shapes(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture(scope="session")
        def broad():
            return 1
        """
    )
    item = pytester.getitem("def test_func(broad, tmp_path):\n    pass\n")
    assert isinstance(item, pytest.Function)
    assert item._request
    assert callable(item._initrequest)
    assert item._report_sections == []
    assert "broad" in item.fixturenames
    defs = item._fixtureinfo.name2fixturedefs["broad"]
    assert defs[-1].scope == "session"
    assert item._fixtureinfo.name2fixturedefs["tmp_path"][-1].scope == "function"
    compat.release_request(item)
    assert item._request is False
    compat.reset_request(item)
    assert item._request


def test_capture_manager_shape() -> None:
    capman = _pytest.capture.CaptureManager
    assert _params(capman.item_capture) == ["self", "when", "item"]
    assert _params(capman.read_global_capture) == ["self"]


def test_callinfo_is_public() -> None:
    assert pytest.CallInfo is _pytest.runner.CallInfo
    assert {"when", "reraise"} <= set(inspect.signature(pytest.CallInfo.from_call).parameters)


# --- the fence is the only door -------------------------------------------------------------------------------------

_PRIVATE = re.compile(
    r"^\s*(?:from|import)\s+_pytest\b"  # any import of pytest's internals, TYPE_CHECKING ones included
    r"|\b_setupstate\b|\._request\b|\._initrequest\b|\._fixtureinfo\b|\._report_sections\b"
    r"|\b_use_item_location\b|[\"']capturemanager[\"']|\bxfailed_key\b|\bevaluate_(?:skip|xfail)_marks\b"
    r"|\bcall_and_report\b|\bruntestprotocol\b|\bcheck_interactive_exception\b|\bget_reraise_exceptions\b",
    re.MULTILINE,
)


# --- a pytest the fence cannot serve ---------------------------------------------------------------------------------

# Loaded with -p before -p lonely: breaks something the fence needs while the plugin is imported, and puts it back
# in pytest_configure, before pytest itself needs it.  The plugin must still load, say why it is off, and refuse to
# run isolated tests unisolated.
BREAK_INTERNAL = """
import _pytest.skipping

_saved = _pytest.skipping.evaluate_xfail_marks
del _pytest.skipping.evaluate_xfail_marks

def pytest_configure(config):
    _pytest.skipping.evaluate_xfail_marks = _saved
"""

OLD_PYTEST = """
import pytest

_saved = pytest.__version__
pytest.__version__ = "7.4.0"

def pytest_configure(config):
    pytest.__version__ = _saved
"""

TESTS = """
import pytest

@pytest.mark.isolated
def test_isolated():
    raise AssertionError("an isolated test ran without its container")

def test_plain():
    pass
"""


@pytest.mark.parametrize(
    ("breaker", "why"),
    [
        (BREAK_INTERNAL, "pytest internal _pytest.skipping.evaluate_xfail_marks is missing"),
        (OLD_PYTEST, "pytest 7.4.0 is outside the supported range 8.0-9.2"),
    ],
    ids=["missing-internal", "old-pytest"],
)
@pytest.mark.parametrize("unavailable", ["fail", "skip"])
def test_unsupported_pytest_disables_the_plugin(
    pytester: pytest.Pytester, breaker: str, why: str, unavailable: str
) -> None:
    pytester.makepyfile(breaker=breaker, test_disabled=TESTS)
    result = pytester.runpytest_subprocess(
        "-p", "breaker", "-p", "lonely", "-p", "no:cacheprovider", "-rA", f"--lonely-unavailable={unavailable}"
    )
    result.stdout.fnmatch_lines([f"lonely: disabled: {why}"])
    result.stdout.no_fnmatch_line("*an isolated test ran without its container*")
    if unavailable == "fail":
        result.assert_outcomes(passed=1, errors=1)
        result.stdout.fnmatch_lines(["ERROR test_disabled.py::test_isolated - Failed: lonely: disabled: *"])
    else:
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines([f"SKIPPED [[]1[]] test_disabled.py:*: lonely: disabled: {why}"])
