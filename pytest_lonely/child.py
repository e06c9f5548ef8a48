"""The test's phases inside the container: the body the engine runs as PID 1.

This module must not import the parent side of the plugin: the child's only
link to the parent is the pipe.  It runs pytest's own ``runtestprotocol``
with reports logged through the hook as usual, and one plugin of ours
forwards every report and warning that the outer session logs (the test's
own, a subtest's, a plugin's) down the pipe the moment it exists.  Every
other implementation of those two hooks is silenced in here, because the
terminal, junitxml, ``-x`` and xdist act on the reports in the parent.
A pytest session started inside the test has its own plugin manager and is
left alone.
"""

from __future__ import annotations

import dataclasses
import traceback
import warnings
from typing import Any

import pytest

from . import _pytest_compat as compat
from . import wire
from .container import Container
from .errors import LonelyWarning
from .sandbox import protocol
from .sandbox.spec import Body, Inside


def current(config: pytest.Config) -> Container | None:
    """The container this process runs in, or None in the parent."""
    forwarder = config.pluginmanager.get_plugin(Forwarder.NAME)
    return forwarder.container if isinstance(forwarder, Forwarder) else None


def setup_container_hook(item: pytest.Item) -> None:
    """Call ``pytest_lonely_setup_container`` as the first part of the test's setup phase.

    Inside the setup phase, an exception there is an ordinary setup error,
    and every plugin's setup and teardown stay paired.  Only for the item
    this container was made for, not for the tests of a session it runs.
    """
    forwarder = item.config.pluginmanager.get_plugin(Forwarder.NAME)
    if isinstance(forwarder, Forwarder) and forwarder.container is not None and item is forwarder.first_item:
        item.config.hook.pytest_lonely_setup_container(container=forwarder.container, item=item)


class Forwarder:
    """Sends what the outer session logs to the parent.

    Registered once, in the parent at configure time, where it does nothing:
    registering a plugin replays every historic hook call to it, which would
    cost each container milliseconds.  Inside a container it is given the
    pipe, and every other implementation of its two hooks is silenced.
    """

    NAME = "lonely-forwarder"

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.send: protocol.Sender | None = None
        #: Inside a container: its description (the ``container`` fixture), and the test it was made for.
        self.container: Container | None = None
        self.first_item: pytest.Item | None = None
        #: Whether this copy of pytest was made a container's (see :func:`prepare_copy`).
        self.prepared = False

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.send is not None:
            _check_properties(report)
            data = wire.encode_report(self.config, report)
            # The test's own teardown report is the last thing its code makes: it goes with what follows.
            last = report.when == "teardown" and type(report) is pytest.TestReport
            send = self.send.hold if last else self.send
            try:
                send(protocol.Kind.REPORT, data)
            except protocol.FrameTooBig:
                send(protocol.Kind.REPORT, wire.shrink_longrepr(data, protocol.MAX_FRAME // 4))

    @pytest.hookimpl(tryfirst=True)
    def pytest_warning_recorded(self, warning_message: warnings.WarningMessage) -> None:
        if self.send is not None:
            self.send(protocol.Kind.WARNING, wire.encode_warning(warning_message))


def _forwarder(config: pytest.Config) -> Forwarder:
    pm = config.pluginmanager
    forwarder = pm.get_plugin(Forwarder.NAME)
    if not isinstance(forwarder, Forwarder):  # pragma: no cover - registered by pytest_configure
        forwarder = Forwarder(config)
        pm.register(forwarder, Forwarder.NAME)
    return forwarder


def prepare_copy(session: pytest.Session) -> None:
    """What makes a copy of pytest a container's, the same in every container (done once in a zygote).

    Every other implementation of the two hooks the forwarder sends is
    silenced (terminal, junitxml, ``-x`` and xdist act in the parent), and the
    parent's setup stack is disowned: what the parent set up, the parent tears
    down; what is set up here, here.
    """
    config = session.config
    forwarder = _forwarder(config)
    if forwarder.prepared:
        return
    compat.silence_hook(config.pluginmanager, "pytest_runtest_logreport", forwarder)
    compat.silence_hook(config.pluginmanager, "pytest_warning_recorded", forwarder)
    compat.disown_inherited_setup(session)
    forwarder.prepared = True


def _take_over(item: pytest.Item, container: Container, inside: Inside) -> Forwarder:
    """The first order a container runs: from now on this process is a container, not a copy of pytest."""
    forwarder = _forwarder(item.config)
    forwarder.container = dataclasses.replace(container, host_pid=inside.host_pid, _ask=inside.ask)
    forwarder.first_item = item
    # Output goes to this container's own files from now on: nothing it prints after its test is over
    # can land in the next test's captured output.
    compat.redirect_capture(item.config, *inside.outputs)
    prepare_copy(item.session)
    return forwarder


def body_for(item: pytest.Item, container: Container, coverage: bool, keep: Any = None) -> Body:
    """What PID 1 runs for one test: its phases, streamed to the parent.

    ``keep``: the next test this container runs (what it shares with this one
    stays set up), the test itself for a rerun, or None: this is the
    container's last test, and everything set up in it is torn down.
    """

    def body(inside: Inside) -> None:
        send = inside.send
        forwarder = _forwarder(item.config)
        first = forwarder.container is None
        if first:
            forwarder = _take_over(item, container, inside)
        forwarder.send = send
        compat.bound_teardown(item, keep)
        with compat.item_warnings(item, again=not first), warnings.catch_warnings(record=True) as recorded:
            for note in inside.notes:
                warnings.warn(LonelyWarning(note), stacklevel=1)
            try:
                compat.runtestprotocol(item, nextitem=keep if isinstance(keep, pytest.Item) else None)
            except pytest.exit.Exception as exc:
                send(protocol.Kind.EXIT, (str(exc.msg), exc.returncode))
            except KeyboardInterrupt:
                send(protocol.Kind.INTERRUPT, traceback.format_exc())
            finally:
                for w in recorded:
                    send(protocol.Kind.WARNING, wire.encode_warning(w))
        if coverage and not send.finished:
            _send_coverage(send, again=keep is not None)

    return body


def finish_body(session: pytest.Session, coverage: bool) -> Body:
    """The session stopped early: tear down what this container set up, then end."""

    def body(inside: Inside) -> None:
        send = inside.send
        with warnings.catch_warnings(record=True) as recorded:
            failure = compat.teardown_everything(session)
        if failure is not None:
            message = f"the container's fixtures raised while it was torn down at the end: {failure}"
            send(protocol.Kind.WARNING, wire.encode_warning(_warning(LonelyWarning(message))))
        for w in recorded:
            send(protocol.Kind.WARNING, wire.encode_warning(w))
        if coverage:
            _send_coverage(send, again=False)

    return body


def _warning(message: Warning) -> warnings.WarningMessage:
    return warnings.WarningMessage(message, type(message), "pytest-lonely", 0)


def _send_coverage(send: protocol.Sender, again: bool) -> None:
    """Lines measured so far; in a container that runs more tests, measuring goes on afterwards."""
    payload = wire.encode_coverage(again=again)
    if payload is not None:
        send(protocol.Kind.COVERAGE, payload)


def body_from_order(session: pytest.Session, order: Any) -> Body:
    """The body for the work the parent named (see :func:`wire.encode_order`).

    The container is a copy of the parent taken at this test or at an earlier
    one (a zygote), with the same broader fixtures and setup stack (the
    parent's key says so); tests are found by their index in the session's
    items, which collection fixed before any test ran.
    """
    decoded = wire.decode_order(order)
    if decoded is None:
        return finish_body(session, wire.order_coverage(order))
    index, nodeid, container, coverage, keep = decoded
    item = _item(session, index, nodeid)
    compat.reset_request(item)
    keep_node: Any = None
    if keep == wire.KEEP_RERUN:
        keep_node = item.parent
    elif keep >= 0:
        keep_node = _item(session, keep, None)
    return body_for(item, container, coverage, keep_node)


def _item(session: pytest.Session, index: int, nodeid: str | None) -> pytest.Item:
    item = session.items[index] if 0 <= index < len(session.items) else None
    if item is None or (nodeid is not None and item.nodeid != nodeid):
        raise RuntimeError(f"this copy of pytest has no test {nodeid!r} at index {index}")
    return item


def _check_properties(rep: pytest.TestReport) -> None:
    """``record_property`` values must cross the pipe: anything else is sent as its repr, with a warning."""
    for index, (name, value) in enumerate(rep.user_properties):
        if not wire.crosses(value):
            rep.user_properties[index] = (name, repr(value))
            warnings.warn(
                LonelyWarning(
                    f"record_property({name!r}, ...) value of type {type(value).__name__} cannot leave the "
                    f"container; its repr() was recorded instead"
                ),
                stacklevel=1,
            )
