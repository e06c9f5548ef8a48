"""Hooks that pytest-lonely adds, for conftest files and other plugins.

Registered in ``pytest_addhooks``, as pytest-xdist does with its own
``newhooks``: implement them in a ``conftest.py`` or a plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .container import Container


@pytest.hookspec()
def pytest_lonely_setup_container(container: Container, item: pytest.Item) -> None:
    """Called inside the container, as PID 1, once its namespaces and root filesystem are ready.

    Runs before the test's own setup, so it can write files or start a
    service that the test then finds.  Whatever it changes dies with the
    container.  An exception here is reported as a setup error of the test.
    """


@pytest.hookspec()
def pytest_lonely_container_finished(item: pytest.Item, container: Container, exitstatus: int | None) -> None:
    """Called in the parent once the container is gone and reaped.

    ``exitstatus`` is the container's exit code, negative for the signal
    that killed it (``-9`` after a timeout).  ``container.host_pid`` is the
    PID its PID 1 had on the host.  When no plugin implements this hook,
    pytest-lonely reaps containers lazily, which saves about a millisecond
    per test.
    """
