"""Exception and warning types shared by the parent and the child side."""

from __future__ import annotations

import pytest


class LonelyWarning(pytest.PytestWarning):
    """Something about the container is not as asked, but the test can still run."""
