"""pytest-lonely: run pytest tests in lightweight Linux containers."""

from __future__ import annotations

from .container import Changed, ChangesUnavailable, Container, ImageInfo
from .errors import LonelyWarning
from .sandbox.limits import Limits, Usage

__version__ = "0.1.0"
__all__ = [
    "Changed",
    "ChangesUnavailable",
    "Container",
    "ImageInfo",
    "Limits",
    "LonelyWarning",
    "Usage",
    "__version__",
]
