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

import contextlib
import inspect
import os
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any, Final

import pytest

#: The pytest versions this release is tested with, both included; pyproject's ``pytest>=8.0,<9.3`` says the same.
SUPPORTED_FIRST: Final = (8, 0)
SUPPORTED_LAST: Final = (9, 2)


def _parse_version(text: str) -> tuple[int, int] | None:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


#: (major, minor) of the running pytest; None if ``pytest.__version__`` cannot be read.
PYTEST_VERSION: Final = _parse_version(str(getattr(pytest, "__version__", "")))


def _version() -> tuple[int, int]:
    return PYTEST_VERSION or (0, 0)


def _why_unsupported() -> str | None:
    if PYTEST_VERSION is None or not SUPPORTED_FIRST <= PYTEST_VERSION <= SUPPORTED_LAST:
        first, last = SUPPORTED_FIRST, SUPPORTED_LAST
        return (
            f"pytest {getattr(pytest, '__version__', '?')} is outside the supported range "
            f"{first[0]}.{first[1]}-{last[0]}.{last[1]}"
        )
    for name, found in _REQUIRED.items():
        if found is None:
            return f"pytest internal {name} is missing"
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
    "_pytest.runner.SetupState.teardown_exact": getattr(
        _lookup("_pytest.runner", "SetupState"), "teardown_exact", None
    ),
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


def skip_reason(item: pytest.Item) -> str | None:
    """Why a skip marker skips this test, if one does: then it needs no container, pytest skips it in-process."""
    try:
        skipped = _evaluate_skip_marks(item)
    except Exception:  # the child raises the same error and reports it
        return None
    return None if skipped is None else str(skipped.reason)


def skip_at_item_location(message: str) -> BaseException:
    """A skip reported at the test's own location, not at the line that raised it, as skip marks do."""
    return pytest.skip.Exception(message, _use_item_location=True)


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


#: pytest's fixture scopes, narrowest first (``_pytest.scope.Scope`` is private).
_SCOPE_RANK: Final = {"function": 0, "class": 1, "module": 2, "package": 3, "session": 4}


def scope_node(item: pytest.Item, scope: str) -> Any:
    """The node a container of ``scope`` is shared under, as pytest scopes fixtures.

    A test outside a class has no class: pytest then scopes a class fixture
    to the test itself, and so does a class-scoped container.  Without a
    package, a package scope is the session's.
    """
    wanted: Any = {"class": pytest.Class, "module": pytest.Module, "package": pytest.Package}.get(scope)
    if scope == "session":
        return item.session
    if wanted is None:
        return item
    node = item.getparent(wanted)
    if node is None:
        return item.session if scope == "package" else item
    return node


def setup_broader_fixtures(item: pytest.Item, scope: str = "function") -> None:
    """Set up, before the fork, the collectors above the container's scope and the fixtures broader than it.

    The container inherits them, so a session fixture used by many isolated
    tests runs once, in the host process, and is torn down there when its
    scope ends.  Everything of the container's scope and narrower is set up
    inside, by pytest itself.  A session-wide container still leaves pytest's
    and the plugins' session fixtures (``tmp_path_factory``...) here: only the
    project's own run inside.  This mirrors ``SetupState.setup`` minus what
    the container sets up.
    """
    state = _setupstate(item)
    needed = item.listchain()
    top = scope_node(item, scope)
    for col, (_, exc) in state.stack.items():
        if col not in needed:  # pragma: no cover - the previous teardown makes this impossible
            raise RuntimeError(f"{col!r} was not torn down before {item.nodeid}")
        if exc:
            # pytest 8.0-8.2 keep the exception itself, 8.3+ (exception, traceback).
            if isinstance(exc, tuple):
                raise exc[0].with_traceback(exc[1])
            raise exc
    # The session is always ours: pytest's own session services need it active here.
    outside = needed[: max(1, needed.index(top))]
    for col in outside[len(state.stack) :]:
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
    rank = _SCOPE_RANK[scope]
    rootpath = item.config.rootpath
    # The item must look active while its broader fixtures are requested (pytest
    # treats a request for an inactive node as a teardown-time lookup), but it must
    # not stay on the stack: the child's own setup pushes it and fills the rest.
    pushed = item not in state.stack
    if pushed:
        state.stack[item] = ([], None)
    try:
        for name in item.fixturenames:  # type: ignore[attr-defined]
            defs = fixtureinfo.name2fixturedefs.get(name)
            # pytest 8.0-8.1 bind a unittest class's xunit fixtures (setUpClass) to the TestCase
            # instance, which only the item's own setup makes: those are left to the child.
            if not defs or getattr(defs[-1], "unittest", False):
                continue
            fixture_rank = _SCOPE_RANK.get(str(defs[-1].scope), 0)
            if fixture_rank > rank or (fixture_rank == rank == 4 and _from_outside(defs[-1], rootpath)):
                request.getfixturevalue(name)
    finally:
        if pushed:
            finalizers, _ = state.stack.pop(item)
            for finalizer in reversed(finalizers):  # nothing broader registers here; be safe if something did
                finalizer()


def fixtures_inside(item: pytest.Item, scope: str) -> list[str]:
    """The fixtures of ``item`` a container of ``scope`` sets up for more than one test (its scope's, and between)."""
    fixtureinfo = getattr(item, "_fixtureinfo", None)
    if fixtureinfo is None:
        return []
    rank = _SCOPE_RANK[scope]
    names = []
    for name in getattr(item, "fixturenames", ()):
        defs = fixtureinfo.name2fixturedefs.get(name)
        if defs and 0 < _SCOPE_RANK.get(str(defs[-1].scope), 0) <= rank:
            names.append(name)
    return names


def _from_outside(fixturedef: Any, rootpath: Path) -> bool:
    """A fixture of pytest's or an installed plugin's, not of the project's conftests and test modules."""
    try:
        source = inspect.getsourcefile(fixturedef.func)
    except TypeError:
        return True
    return source is None or not Path(source).resolve().is_relative_to(rootpath)


def _stack_exc(exc: BaseException) -> Any:
    """The shape ``SetupState.stack`` stores a setup failure in: 8.0-8.2 the exception, 8.3+ a pair."""
    if _version() < (8, 3):
        return exc
    return (exc, exc.__traceback__)


def teardown_towards(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Tear down, in the parent, every scope that ``nextitem`` does not share."""
    _setupstate(item).teardown_exact(nextitem)


def setup_stack_key(item: pytest.Item) -> tuple[int, ...]:
    """The collectors set up now: a container forked earlier is a faithful copy only while this is the same."""
    return tuple(map(id, _setupstate(item).stack))


#: Plugins whose ``pytest_runtest_protocol`` wrappers leave nothing in the process that differs from one
#: test to the next, or only what :func:`protocol_context` accounts for.
_KNOWN_PROTOCOL_WRAPPERS: Final = frozenset({"warnings", "assertion", "faulthandler", "unittest", "timeout", "lonely"})


def protocol_context(item: pytest.Item) -> object:
    """What the wrappers around this test's protocol put in the process that a container inherits.

    pytest's warnings plugin installs the test's ``filterwarnings`` marks; the
    assertion plugin, a ``pytest_assertion_pass`` hook bound to the test; an
    unknown wrapper, anything.  Two tests with equal contexts see the same
    process state; an unknown case makes the context the test's own node ID.
    """
    pm = item.config.pluginmanager
    for impl in pm.hook.pytest_runtest_protocol.get_hookimpls():
        if (impl.wrapper or impl.hookwrapper) and impl.plugin_name not in _KNOWN_PROTOCOL_WRAPPERS:
            return item.nodeid
    if pm.hook.pytest_assertion_pass.get_hookimpls() or "twisted.trial.unittest" in sys.modules:
        return item.nodeid
    return repr([(mark.args, mark.kwargs) for mark in item.iter_markers("filterwarnings")])


def disown_inherited_setup(session: pytest.Session) -> None:
    """In a container: what the parent set up is the parent's to tear down, never the container's.

    The container inherits the parent's setup stack, finalizers included.
    Emptied, the stack still says which collectors are set up, but tearing
    them down here runs only what was set up here: the container's own
    fixtures of every scope, module ones included for a module-wide container.
    """
    state = session._setupstate
    for col, (_, exc) in list(state.stack.items()):
        state.stack[col] = ([], exc)


def bound_teardown(item: pytest.Item, keep: Any) -> None:
    """In a container, tear down towards ``keep`` (the next test of the container, or None for all of it).

    pytest decides what to tear down from the next test; inside, the next
    test is the container's next, not the session's.  Patched on this
    session's ``SetupState`` instance only, so a pytest session started inside
    the test is unaffected.
    """
    state = _setupstate(item)
    teardown_exact = getattr(state, "_lonely_teardown_exact", state.teardown_exact)
    state._lonely_teardown_exact = teardown_exact
    state.teardown_exact = lambda nextitem: teardown_exact(keep)


def teardown_everything(session: pytest.Session) -> str | None:
    """Tear down every scope set up in this process; what went wrong, in words, or None.

    The unpatched ``teardown_exact``: :func:`bound_teardown` may have bound it.
    """
    state = session._setupstate
    teardown_exact = getattr(state, "_lonely_teardown_exact", state.teardown_exact)
    try:
        teardown_exact(None)
    except BaseException as exc:  # an exception group of every finalizer that raised
        return f"{type(exc).__name__}: {exc}"
    return None


_catch_warnings_for_item = _lookup("_pytest.warnings", "catch_warnings_for_item")


def item_warnings(item: pytest.Item, again: bool) -> contextlib.AbstractContextManager[None]:
    """The test's ``filterwarnings`` marks and the configured filters, as pytest's warnings plugin applies them.

    In-process they are applied around ``pytest_runtest_protocol``; a container
    inherits them for the test it was forked for, but a container that runs
    more tests must apply each later test's own (``again``).
    """
    if not again or _catch_warnings_for_item is None:
        return contextlib.nullcontext()
    manager: contextlib.AbstractContextManager[None] = _catch_warnings_for_item(
        item.config, ihook=item.ihook, when="runtest", item=item
    )
    return manager


def reset_request(item: pytest.Item) -> None:
    """A rerun needs a fresh fixture request, as pytest-rerunfailures makes one."""
    if hasattr(item, "_request") and not item._request:
        item._initrequest()  # type: ignore[attr-defined]


def release_request(item: pytest.Item) -> None:
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


def restore_subtest_context(report: pytest.TestReport, data: Any) -> None:
    """Undo the second ``saferepr`` pytest's ``SubtestContext`` applies when a subtest report is decoded.

    The context's constructor reprs its kwargs, and decoding constructs it
    again, so ``i=1`` would read ``i='1'`` in the parent (under xdist too).
    The child already sent the repr'd values: keep them as they are.
    """
    context = getattr(report, "context", None)
    sent = data.get("_subtest.context") if isinstance(data, dict) else None
    if context is None or not isinstance(sent, dict) or not isinstance(sent.get("kwargs"), dict):
        return
    try:
        object.__setattr__(context, "kwargs", dict(sent["kwargs"]))
    except (AttributeError, TypeError):  # another plugin's report type: leave it
        pass


_failed_subtests_key = _lookup("_pytest.subtests", "failed_subtests_key")  # pytest >= 9
_SubtestReport = _lookup("_pytest.subtests", "SubtestReport")


def failed_subtests(config: pytest.Config, report: pytest.TestReport) -> int:
    """How many subtests of ``report``'s test failed, as pytest 9 counts them in ``config.stash``.

    The count is made where the subtests run, in the child, and read where
    the verdict is made, in the parent's ``pytest_report_teststatus``: so the
    child sends it with the test's own reports and the parent stores it.
    """
    if _failed_subtests_key is None or (_SubtestReport is not None and isinstance(report, _SubtestReport)):
        return 0
    try:
        return int(config.stash[_failed_subtests_key].get(_subtest_key(report), 0))
    except (KeyError, AttributeError, TypeError):
        return 0


def _subtest_key(report: pytest.TestReport) -> object:
    """pytest 9.0-9.1 count failed subtests by ``report.nodeid``, 9.2 by the ``report.id`` object."""
    return report.nodeid if _version() < (9, 2) else getattr(report, "id", report.nodeid)


def set_failed_subtests(config: pytest.Config, report: pytest.TestReport, count: int) -> None:
    if _failed_subtests_key is None:
        return
    try:
        config.stash[_failed_subtests_key][_subtest_key(report)] = count
    except (KeyError, AttributeError, TypeError):
        pass


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


def redirect_capture(config: pytest.Config, out_fd: int, err_fd: int) -> None:
    """Inside a container: make pytest's fd-level capture write into the container's own files.

    The global ``FDCapture`` of fd 1 and 2 keeps its temporary file open at a
    number of its own, and points fd 1 and 2 at it while capturing.  That file
    is shared with the parent and every other container forked from it: one
    that outlives its test would write into the next test's captured output.
    Pointing those numbers at files of this container's own keeps pytest's
    capture working unchanged (it reads and truncates by number), and only
    this container ever writes there.  ``-s`` and ``--capture=sys`` have no
    such files, and nothing changes.
    """
    if out_fd < 0 or err_fd < 0:
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    capturing = getattr(capman, "_global_capturing", None)
    for name, own, target in (("out", out_fd, 1), ("err", err_fd, 2)):
        capture = getattr(capturing, name, None)
        tmpfile = getattr(capture, "tmpfile", None)
        if getattr(capture, "targetfd", None) != target:
            continue  # not an FDCapture: sys capture keeps its output in memory
        try:
            tmp_fd = tmpfile.fileno() if tmpfile is not None else -1
        except (OSError, ValueError, AttributeError):
            continue
        if not isinstance(tmp_fd, int) or tmp_fd <= 2:
            continue
        capturing_now = os.path.sameopenfile(target, tmp_fd)
        os.dup2(own, tmp_fd)
        if capturing_now:
            os.dup2(own, target)


# --- capture ------------------------------------------------------------------------------------


class Capture:
    """pytest's ``CaptureManager``, which has no public API, for the parent's side of one test.

    ``item_capture`` files what a phase printed under the item, as pytest
    does; the global capture is kept on while a container runs, so the
    parent's threads are captured into the running test, and turned off
    around each report, which the terminal must show.  Without the capture
    plugin (``-p no:capture``) everything here does nothing.
    """

    def __init__(self, config: pytest.Config) -> None:
        self._capman: Any = config.pluginmanager.getplugin("capturemanager")

    def phase(self, when: str, item: pytest.Item) -> contextlib.AbstractContextManager[None]:
        if self._capman is None:
            return contextlib.nullcontext()
        manager: contextlib.AbstractContextManager[None] = self._capman.item_capture(when, item)
        return manager

    def resume(self) -> None:
        if self._capman is not None:
            self._capman.resume_global_capture()

    def suspend(self) -> None:
        if self._capman is not None:
            self._capman.suspend_global_capture(in_=False)

    def read(self) -> tuple[str, str]:
        """What was captured since the last read, and what :meth:`peek` already gave is not given again.

        It truncates pytest's capture files: call it once the container is
        done, when no thread of ours writes on the container's behalf.
        """
        if self._capman is None:
            return "", ""
        out, err = self._capman.read_global_capture()
        seen, self._seen = self._seen, (0, 0)
        return str(out)[seen[0] :], str(err)[seen[1] :]

    _seen: tuple[int, int] = (0, 0)
    _peeked: tuple[int, int] = (0, 0)

    def peek(self) -> tuple[str, str]:
        """What this process printed since the last peek, read without truncating pytest's capture files.

        Truncating while another thread writes loses that thread's line (the
        file offset is shared): while a container runs, its tests' server
        threads in this process write at any time.  Only fd capture has files
        to peek into; otherwise nothing is seen until :meth:`read`.
        """
        capturing = getattr(self._capman, "_global_capturing", None)
        texts = []
        for index, name in enumerate(("out", "err")):
            tmpfile = getattr(getattr(capturing, name, None), "tmpfile", None)
            try:
                fd = tmpfile.fileno() if tmpfile is not None else -1
                size = os.fstat(fd).st_size if fd >= 0 else 0
            except (OSError, ValueError, AttributeError):
                size, fd = 0, -1
            start = self._peeked[index]
            data = os.pread(fd, size - start, start) if fd >= 0 and size > start else b""
            texts.append(data)
        self._peeked = (self._peeked[0] + len(texts[0]), self._peeked[1] + len(texts[1]))
        out, err = (t.decode("utf-8", "replace") for t in texts)
        self._seen = (self._seen[0] + len(out), self._seen[1] + len(err))
        return out, err
