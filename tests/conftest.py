"""Fixtures for the whole suite: the guard that the host is left as found, and roots and images both layers use.

Helpers that tests call live in ``helpers/`` (on ``sys.path`` through pyproject's pytest ``pythonpath``);
``plugin/conftest.py`` adds what only the adapter's tests need (inner sessions, uid 65534).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import images
from helpers.host import BUSYBOX, BUSYBOX_APPLETS, children, mount_table
from helpers.rootless_env import build_busybox_root


@pytest.fixture(autouse=True, scope="session")
def host_left_as_found() -> Iterator[None]:
    """Every test in this suite must leave the mount table and the process tree as it found them."""
    before = mount_table()
    yield
    after = mount_table()
    assert after == before, f"mounts leaked into the host: {sorted(set(after) - set(before))}"
    assert not children(), f"child processes left behind: {children()}"


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete root (it has usr/): Debian's static BusyBox and nothing of the host."""
    if not Path(BUSYBOX).exists():
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    return build_busybox_root(tmp_path_factory.mktemp("busybox-root"), BUSYBOX, BUSYBOX_APPLETS)


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> images.Images:
    """Every form of the test image, made once per session (about a second)."""
    missing = images.missing_tools()
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install umoci skopeo busybox-static)")
    return images.build(tmp_path_factory.mktemp("images"))
