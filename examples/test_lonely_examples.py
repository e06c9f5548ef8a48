"""A tour of pytest-lonely: run with ``pytest -p lonely examples/ -v``.

One test here crashes on purpose, to show how a dead container is reported.
"""

import ctypes
import os
import socket
import subprocess

import pytest


@pytest.mark.isolated
def test_i_am_pid_1() -> None:
    assert os.getpid() == 1
    # Only this container's processes are visible: us, and the ps we start.
    ps = subprocess.run(["ps", "-e", "-o", "pid=,comm="], capture_output=True, text=True, check=True)
    assert [line.split()[0] for line in ps.stdout.splitlines()] == ["1", "2"]


@pytest.mark.isolated(hostname="lonely-box")
def test_my_own_hostname() -> None:
    assert socket.gethostname() == "lonely-box"
    assert os.uname().nodename == "lonely-box"


@pytest.mark.isolated
def test_write_anywhere_it_is_thrown_away() -> None:
    with open("/etc/motd", "a") as f:
        f.write("this line never reaches the host\n")
    # A daemon outliving the test dies with the container.
    subprocess.Popen(["setsid", "sleep", "1000"])


def test_the_host_never_saw_it() -> None:
    with open("/etc/motd") as f:
        assert "never reaches the host" not in f.read()


def test_container_fixture(container) -> None:  # type: ignore[no-untyped-def]
    # Asking for the fixture isolates the test too.
    assert container.hostname == socket.gethostname() == container.id
    assert {"pid", "mnt", "uts", "ipc"} <= container.namespaces


@pytest.mark.isolated(rootfs="fixtures/rootfs")
def test_a_tiny_root_filesystem() -> None:
    with open("/etc/os-release") as f:
        assert 'NAME="Lonely Linux"' in f.read()
    assert not os.path.exists("/etc/debian_version")


@pytest.mark.isolated
def test_a_segfault_is_reported_not_fatal() -> None:
    print("about to crash")
    ctypes.string_at(0)  # SIGSEGV: this test fails, the session goes on
