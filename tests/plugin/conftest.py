"""Fixtures for the adapter's tests: inner pytest sessions, as root and as uid 65534."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.inner import RunLonely
from helpers.modes import MODES, Inner
from helpers.rootless_env import SYSTEM_PYTHON, XDIST_GROUP, Env, SystemPythonUnfit, build_env, world_tempdir


@pytest.fixture
def run_lonely(pytester: pytest.Pytester) -> RunLonely:
    """Run pytest with the plugin in a subprocess (anything that forks must not run in-process)."""

    def run(*args: str, timeout: float = 120) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-p", "lonely", "-p", "no:cacheprovider", *args, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def nobody_env() -> Iterator[Env]:
    """Everything uid 65534 needs (see helpers/rootless_env.py), built once per session and removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("needs root to become uid 65534")
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} is missing: the rootless tests run Debian's python3 as uid 65534")
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is missing: it runs pytest as uid 65534")
    base = world_tempdir("lonely-rootless-")
    try:
        try:
            env = build_env(base)
        except SystemPythonUnfit as exc:
            pytest.skip(str(exc))
        yield env
    finally:
        shutil.rmtree(base)
        assert not base.exists()


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        names = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        as_nobody = "nobody_env" in names or (callspec is not None and callspec.params.get("inner") == "rootless")
        if as_nobody and item.get_closest_marker("xdist_group") is None:
            item.add_marker(XDIST_GROUP)


@pytest.fixture(params=MODES)
def inner(request: pytest.FixtureRequest) -> Iterator[Inner]:
    """A project directory and a way to run pytest on it, in each mode (see helpers/modes.py)."""
    mode: str = request.param
    python = Path(sys.executable)
    if mode == "rootless":
        python = request.getfixturevalue("nobody_env").python
    base = world_tempdir("lonely-inner-")
    try:
        project = base / "project"
        project.mkdir()
        yield Inner(mode, project, python)
    finally:
        shutil.rmtree(base, ignore_errors=True)
