"""The hosts file a container gets (rootfs.hosts_text), pure: no container, no session."""

from __future__ import annotations

import pytest

from pytest_lonely.sandbox import rootfs


def test_hosts_text_puts_the_hostname_first() -> None:
    text = rootfs.hosts_text("127.0.0.1 localhost\n127.0.1.1 hostbox.example hostbox\n", "web-1")
    assert text == "127.0.1.1\tweb-1\n127.0.0.1 localhost\n127.0.1.1 hostbox.example hostbox\n"


def test_hosts_text_without_a_file_has_dockers_loopback_lines() -> None:
    text = rootfs.hosts_text(None, "web-1")
    assert text == "127.0.1.1\tweb-1\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"


@pytest.mark.parametrize("hostname", ["localhost", "LocalHost", "hostbox", "alias"])
def test_hosts_text_leaves_a_file_that_names_the_hostname_alone(hostname: str) -> None:
    current = "127.0.0.1 localhost\n10.0.0.1 hostbox alias # not: web-1\n"
    assert rootfs.hosts_text(current, hostname) is None
    assert rootfs.hosts_text(current, "web-1") is not None  # a name in a comment names nothing


def test_the_engine_writes_are_listed_in_one_place() -> None:
    assert rootfs.HOSTS in rootfs.ENGINE_WRITES
