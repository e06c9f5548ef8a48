"""pytest-lonely: run pytest tests in lightweight Linux containers."""

from __future__ import annotations

from .container import Container
from .errors import LonelyWarning

__version__ = "0.1.0"
__all__ = ["Container", "LonelyWarning", "__version__"]
