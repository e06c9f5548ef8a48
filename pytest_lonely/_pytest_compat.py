"""The one fence around pytest's (and pluggy's) private API.

pytest-lonely runs a test's phases in one process and reports them in
another, so it must reach into pytest where no public API exists: the
``SetupState`` stack (to set up broader fixtures in the parent and stop the
child's teardown at the item), the exceptions pytest re-raises, the xfail
stash key, the skip-mark evaluation, the item's fixture request.  Every such
use lives here, each behind a small function that says why it exists, so a
future pytest that changes one of them breaks one function and one test
(``tests/test_compat.py``), not every user's session.

Importing this module never raises: what is missing is recorded in
:data:`UNSUPPORTED`, and the plugin then disables itself with that reason
instead of taking the session down.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, Final

import pytest

#: The pytest versions this release is tested with, as (major, minor) bounds, both included.
SUPPORTED: Final = ((8, 0), (9, 2))


def _version() -> tuple[int, int]:
    parts = pytest.__version__.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):  # pragma: no cover - pytest always has a numeric version
        return (0, 0)


def _why_unsupported() -> str | None:
    low, high = SUPPORTED
    if not low <= _version() <= high:
        return (
            f"pytest {pytest.__version__} is outside the supported range "
            f"{low[0]}.{low[1]}-{high[0]}.{high[1]}; install a supported pytest or upgrade pytest-lonely"
        )
    missing = [name for name, found in _REQUIRED.items() if found is None]
    if missing:
        return f"pytest {pytest.__version__} lacks the internals pytest-lonely needs: {', '.join(missing)}"
    return None


def _lookup(module: str, name: str) -> Any:
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except Exception:
        return None


_runner_runtestprotocol = _lookup("_pytest.runner", "runtestprotocol")
_check_interactive = _lookup("_pytest.runner", "check_interactive_exception")
_get_reraise = _lookup("_pytest.runner", "get_reraise_exceptions")  # pytest >= 9; 8.x spells it inline
_evaluate_skip_marks = _lookup("_pytest.skipping", "evaluate_skip_marks")
_evaluate_xfail_marks = _lookup("_pytest.skipping", "evaluate_xfail_marks")
_xfailed_key = _lookup("_pytest.skipping", "xfailed_key")
_Exit = _lookup("_pytest.outcomes", "Exit")

_REQUIRED: Final = {
    "_pytest.runner.runtestprotocol": _runner_runtestprotocol,
    "_pytest.runner.check_interactive_exception": _check_interactive,
    "_pytest.skipping.evaluate_skip_marks": _evaluate_skip_marks,
    "_pytest.skipping.evaluate_xfail_marks": _evaluate_xfail_marks,
    "_pytest.skipping.xfailed_key": _xfailed_key,
    "_pytest.outcomes.Exit": _Exit,
    "pytest.Session._setupstate": True if hasattr(pytest.Session, "__init__") else None,
}

#: Why the plugin cannot work with this pytest, or None when it can.
UNSUPPORTED: Final = _why_unsupported()


# --- running phases --------------------------------------------------------------------------------


def runtestprotocol(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """pytest's own phase logic (setup, call, teardown, with their reports logged through the hook)."""
    _runner_runtestprotocol(item, log=True, nextitem=nextitem)


def reraise_exceptions(config: pytest.Config) -> tuple[type[BaseException], ...]:
    """What ``CallInfo.from_call`` must let through: ``pytest.exit``, and Ctrl-C unless ``--pdb`` handles it."""
    if _get_reraise is not None:
        result: tuple[type[BaseException], ...] = _get_reraise(config)
        return result
    reraise: tuple[type[BaseException], ...] = (_Exit,)
    if not config.getoption("usepdb", False):
        reraise += (KeyboardInterrupt,)
    return reraise


def check_interactive_exception(call: pytest.CallInfo[Any], report: pytest.TestReport) -> bool:
    """Whether ``--pdb`` and friends should be offered this failure."""
    return bool(_check_interactive(call, report))


def skipped_by_marks(item: pytest.Item) -> bool:
    """A test that a skip marker skips needs no container: pytest can skip it in-process."""
    try:
        return _evaluate_skip_marks(item) is not None
    except Exception:  # the child raises the same error and reports it
        return False


def ensure_xfail_evaluated(item: pytest.Item) -> None:
    """A crash makes the call report in the parent, so the xfail marks must be known here too."""
    try:
        if item.stash.get(_xfailed_key, None) is None:
            item.stash[_xfailed_key] = _evaluate_xfail_marks(item)
    except Exception:  # a broken xfail condition was already reported by the child's setup
        pass


# --- fixtures and the setup stack -----------------------------------------------------------------


def _setupstate(item: pytest.Item) -> Any:
    return item.session._setupstate


def setup_broader_fixtures(item: pytest.Item) -> None:
    """Set up the collectors and every fixture broader than the function, before the fork.

    The child inherits them, so a session fixture used by many isolated tests
    runs once, in the host process, and is torn down there when its scope
    ends.  This mirrors ``SetupState.setup`` minus the item itself.
    """
    state = _setupstate(item)
    needed = item.listchain()
    for col, (_, exc) in state.stack.items():
        if col not in needed:  # pragma: no cover - the previous teardown makes this impossible
            raise RuntimeError(f"{col!r} was not torn down before {item.nodeid}")
        if exc:
            # pytest 8.0 keeps the exception itself, later versions (exception, traceback).
            if isinstance(exc, tuple):
                raise exc[0].with_traceback(exc[1])
            raise exc
    for col in needed[len(state.stack) : -1]:
        state.stack[col] = ([col.teardown], None)
        try:
            col.setup()
        except (Exception, pytest.skip.Exception) as exc:
            state.stack[col] = (state.stack[col][0], _stack_exc(exc))
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


def _stack_exc(exc: BaseException) -> Any:
    """The shape ``SetupState.stack`` stores a setup failure in: pytest 8.0 the exception, later a pair."""
    if _version() < (8, 1):
        return exc
    return (exc, exc.__traceback__)


def teardown_towards(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Tear down, in the parent, every scope that ``nextitem`` does not share."""
    _setupstate(item).teardown_exact(nextitem)


def stop_teardown_at_item(item: pytest.Item) -> None:
    """In the child, tear down only the item: broader scopes belong to the parent.

    Patched on this session's ``SetupState`` instance only, so a pytest
    session started inside the test is unaffected.
    """
    state = _setupstate(item)
    teardown_exact = state.teardown_exact
    parent_node = item.parent
    state.teardown_exact = lambda nextitem: teardown_exact(parent_node)


def prepare_rerun(item: pytest.Item) -> None:
    """A rerun needs a fresh fixture request, as pytest-rerunfailures makes one."""
    if hasattr(item, "_request") and not item._request:
        item._initrequest()  # type: ignore[attr-defined]


def forget_request(item: pytest.Item) -> None:
    """After the parent's teardown, drop the request and funcargs the child used, as pytest does."""
    if hasattr(item, "_request"):
        item._request = False
        item.funcargs = None  # type: ignore[attr-defined]


def report_sections(item: pytest.Item) -> list[tuple[str, str, str]]:
    """The captured output the parent filed under the item: (when, key, content)."""
    sections: list[tuple[str, str, str]] = item._report_sections
    return sections


def tmp_path_factory(config: pytest.Config) -> pytest.TempPathFactory | None:
    """The session's ``tmp_path_factory`` (the fixture only returns this attribute)."""
    return getattr(config, "_tmp_path_factory", None)


# --- hooks in the child ----------------------------------------------------------------------------


def _passthrough_wrapper(*args: Any, **kwargs: Any) -> Generator[None, Any, Any]:
    return (yield)


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def silence_hook(pm: pytest.PytestPluginManager, name: str, keep: object) -> None:
    """Make every implementation of hook ``name`` but ``keep``'s do nothing, in this process.

    The child must not let the terminal reporter, junitxml, xdist's worker or
    ``-x`` counting act on its reports: they act in the parent, once the
    report has crossed the pipe.  Only the implementations registered with
    this session's plugin manager are touched, so a pytest session started
    inside the test (pytester) keeps its own.  pluggy calls
    ``HookImpl.function``; old-style and new-style wrappers get a generator
    that passes the result through.  The child exits after the test, so
    nothing is restored.
    """
    caller = getattr(pm.hook, name)
    for impl in caller.get_hookimpls():
        if impl.plugin is keep:
            continue
        if impl.hookwrapper or getattr(impl, "wrapper", False):
            impl.function = _passthrough_wrapper
        else:
            impl.function = _noop


def capture_fds(config: pytest.Config) -> tuple[int, ...]:
    """The fds of pytest's global capture: each ``FDCapture``'s saved original and its temporary file.

    The container closes every other inherited fd, so these must be named.
    ``CaptureManager._global_capturing`` and ``FDCapture.targetfd_save`` are
    private; if they change, nothing is kept and pytest's capture inside
    would fail loudly (``tests/test_compat.py`` would say so first).
    """
    capman = config.pluginmanager.getplugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)
    fds: set[int] = set()
    for name in ("in_", "out", "err"):
        capture = getattr(capturing, name, None)
        saved = getattr(capture, "targetfd_save", None)
        if isinstance(saved, int) and saved > 2:
            fds.add(saved)
        tmpfile = getattr(capture, "tmpfile", None)
        try:
            fileno = tmpfile.fileno() if tmpfile is not None else -1
        except (OSError, ValueError, AttributeError):  # SysCapture's CaptureIO has no fd
            continue
        if isinstance(fileno, int) and fileno > 2:
            fds.add(fileno)
    return tuple(sorted(fds))
