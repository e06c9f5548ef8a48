"""Which tests share a container, and how a shared container ends.

With ``scope="module"`` (or class, package, session), the isolated tests that
run one after another under the same module (class, ...) with the same
container keywords share one container, where the fixtures of that scope
live: pytest sets them up inside for the first test and tears them down
inside after the last, exactly where it would in-process.  A test for one
container only (the default ``function`` scope) is a group of one.

Whether the next test joins the container is decided as pytest decides what
to tear down: from ``nextitem``, one test ahead.  A group ends when the next
test is not a member (another module, another keyword, an in-process test),
when its container dies (a crash, a timeout: the rest of the group gets a
fresh container, where the group's fixtures are set up again), or when the
session stops early (``-x``): then the container is asked to tear down what
it set up before it is ended.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Hashable
from typing import Any, Final

import pytest

from . import _pytest_compat as compat
from . import preflight, wire
from .container import Container
from .errors import LonelyWarning
from .sandbox import protocol
from .sandbox.box import Box, Outcome
from .sandbox.spec import ContainerSpec
from .session import SESSION_KEY

#: Seconds a container may take to tear down its fixtures when the session stops early.
FINISH_TIMEOUT: Final = 60.0


@dataclasses.dataclass
class Group:
    """One container and the tests it serves."""

    #: What a test must share to join it; None: it serves one test only.
    key: Hashable | None
    box: Box
    #: What every test of it is told about its container (one id, one hostname).
    container: Container
    spec: ContainerSpec
    first: pytest.Item
    last: pytest.Item
    #: How ``--lonely-usage`` names it.
    name: str
    #: Whether its container may be handed another test.
    alive: bool = True
    #: Orders handed over: the first one also brings the hostname and environment.
    orders: int = 0

    def tail(self, timeout: float) -> tuple[Any, ...]:
        """GO's first part: the container's id, hostname and environment, and this test's timeout."""
        return (self.spec.id, self.spec.hostname, timeout, self.spec.env)


def key_of(item: pytest.Item, ready: preflight.Ready, index: int | None) -> Hashable | None:
    """What the tests sharing a container with ``item`` have in common; None: a container of its own."""
    scope = ready.spec.scope
    if scope == "function" or index is None:
        return None
    node = compat.scope_node(item, scope)
    if node is item:  # a class scope outside a class: pytest scopes it to the test itself
        return None
    return (scope, id(node), ready.spec.container_keywords())


def name_of(item: pytest.Item, ready: preflight.Ready) -> str:
    scope = ready.spec.scope
    if scope == "function":
        return item.nodeid
    node = compat.scope_node(item, scope)
    return f"{node.nodeid or '<session>'} ({scope})"


def joins(item: pytest.Item | None, key: Hashable | None) -> bool:
    """Whether ``item``, the next test, would run in the container of ``key``."""
    if item is None or key is None or not preflight.is_isolated(item):
        return False
    state = item.config.stash[SESSION_KEY]
    try:
        spec = preflight.spec_for(item, state.defaults)
    except Exception:  # a bad marker: that test fails on its own, in no container
        return False
    if spec.scope != key[0]:  # type: ignore[index]
        return False
    node = compat.scope_node(item, spec.scope)
    return node is not item and (spec.scope, id(node), spec.container_keywords()) == key


def shared(item: pytest.Item) -> bool:
    """Whether ``item`` asks for a container shared with other tests (a scope wider than the function)."""
    state = item.config.stash[SESSION_KEY]
    try:
        return preflight.spec_for(item, state.defaults).scope != "function"
    except Exception:  # a bad marker: that test fails on its own
        return False


def finish(group: Group, coverage: bool) -> Outcome:
    """Have a container whose next test will not come tear down what it set up, before it is ended.

    What its fixtures raise is said in a warning: in-process, pytest would
    tear them down at the end of the session, where an error is no test's.
    """

    def on_frame(kind: protocol.Kind, payload: Any) -> None:
        if kind is protocol.Kind.WARNING:
            record = wire.decode_warning(payload)
            group.first.config.hook.pytest_warning_recorded.call_historic(
                kwargs=dict(warning_message=record, nodeid="", when="runtest", location=None)
            )
        elif kind is protocol.Kind.COVERAGE:
            wire.decode_coverage(payload)
        else:
            raise protocol.ProtocolError(f"a {kind.value!r} frame while tearing the container down")

    order = wire.encode_finish(coverage)
    outcome = group.box.run(group.tail(FINISH_TIMEOUT), order, FINISH_TIMEOUT, on_frame)
    if outcome.kind not in ("done", "exit", "interrupt"):
        message = LonelyWarning(
            f"the container of {group.name} did not tear its fixtures down when the session stopped: "
            f"{outcome.kind}{': ' + str(outcome.payload) if outcome.payload else ''}"
        )
        record = warnings.WarningMessage(message, LonelyWarning, "pytest-lonely", 0)
        group.first.config.hook.pytest_warning_recorded.call_historic(
            kwargs=dict(warning_message=record, nodeid="", when="runtest", location=None)
        )
    return outcome
