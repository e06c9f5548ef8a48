"""Namespaces built ahead of time (root mode): the same containers as when each child builds its own."""

from __future__ import annotations

import os

import pytest
from helpers.host import FIXTURE_ROOTFS
from helpers.inner import RunLonely

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the namespace pool is a root-mode feature")

INNER = f"""
import os
import socket
import pytest

ROOTFS = {str(FIXTURE_ROOTFS)!r}


def check_container(container, hostname=None):
    assert os.getpid() == 1
    assert [p for p in os.listdir("/proc") if p.isdigit()] == ["1"]
    assert socket.gethostname() == (hostname or container.id)
    with open("/etc/lonely-pool-canary", "w") as f:  # thrown away with the container
        f.write(container.id)


@pytest.mark.parametrize("i", range(3))
@pytest.mark.isolated
def test_host_view(container, i):
    check_container(container)


@pytest.mark.isolated(hostname="pooled")
def test_hostname(container):
    check_container(container, "pooled")


@pytest.mark.isolated(network=False)
def test_private_network(container):
    check_container(container)
    assert [name for _, name in socket.if_nameindex()] == ["lo"]


@pytest.mark.isolated(rootfs=ROOTFS)
def test_skeleton(container):
    assert os.getpid() == 1
    with open("/etc/os-release") as f:
        assert "Lonely Linux" in f.read()


@pytest.mark.parametrize("i", range(2))
@pytest.mark.isolated
def test_back_to_the_host_view(container, i):
    check_container(container)
    assert not os.path.exists("/etc/os-release") or "Lonely Linux" not in open("/etc/os-release").read()


def test_on_the_host():
    assert os.getpid() != 1
    assert not os.path.exists("/etc/lonely-pool-canary")
"""


def _builders(basetemp: str) -> set[int]:
    """Processes still running this test's inner pytest (the builder is a fork of it, with its command line)."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if basetemp.encode() in f.read():
                        found.add(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("prebuild", ["1", "0"])
def test_same_containers_with_and_without_prebuilt_namespaces(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch, prebuild: str
) -> None:
    """Alternating settings exercise the pool's misses (a different plan) as well as its hits."""
    monkeypatch.setenv("PYTEST_LONELY_PREBUILD", prebuild)
    pytester.makepyfile(test_pool_inner=INNER)
    result = run_lonely("-v", timeout=120)
    result.assert_outcomes(passed=9)
    assert not os.path.exists("/etc/lonely-pool-canary")
    assert not _builders(str(pytester.path)), "a namespace builder outlived its pytest session"


def test_a_broken_pool_falls_back_to_building_in_the_child(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """If the builder dies, every test still gets its container: the child builds it, as without the pool."""
    pytester.makeconftest(
        """
        import os, signal
        import pytest
        from pytest_lonely import session

        def pytest_lonely_container_finished(item, container, exitstatus):
            # In the parent, after the first container: the builder dies mid-session.
            pool = item.config.stash[session.SESSION_KEY].engine()._pool
            if pool is not None and pool._pid and item.name == "test_a":
                os.kill(pool._pid, signal.SIGKILL)
        """
    )
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.isolated
        def test_a():
            assert os.getpid() == 1

        @pytest.mark.parametrize("i", range(3))
        @pytest.mark.isolated
        def test_b(i):
            assert os.getpid() == 1
        """
    )
    result = run_lonely("-v", timeout=60)
    result.assert_outcomes(passed=4)
