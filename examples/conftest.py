"""pytest-lonely's hooks, marked optional so that this conftest also works with ``-p no:lonely``."""

import pytest


@pytest.hookimpl(optionalhook=True)
def pytest_lonely_setup_container(container, item):
    # Runs inside the container, as PID 1, before the test's own setup: gone with the container.
    with open("/etc/lonely-motd", "w") as f:
        f.write(f"welcome to {container.hostname}\n")


@pytest.hookimpl(optionalhook=True)
def pytest_lonely_container_finished(item, container, exitstatus):
    # Runs in the parent once the container is gone.
    item.user_properties.append(("container_exit", exitstatus))
