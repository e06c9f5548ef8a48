"""What a container may use, and what it used: values, their parsing, and how people read them.

Pure: no file is read here.  The settings parse markers, options and ini keys with these functions,
the cgroup code turns a :class:`Limits` into files, and the reports print sizes with
:func:`format_bytes`, so each unit and each "allowed" sentence is written once.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Final

__all__ = [
    "CPUS_ALLOWED",
    "MEMORY_ALLOWED",
    "PIDS_ALLOWED",
    "Limits",
    "Usage",
    "cfs_quota",
    "format_bytes",
    "parse_cpus",
    "parse_memory",
    "parse_pids",
]

KiB: Final = 1024
MiB: Final = 1024 * KiB
GiB: Final = 1024 * MiB

#: The kernel's PID_MAX_LIMIT: ``pids.max`` refuses anything above it.
PIDS_LIMIT_MAX: Final = 4 * 1024 * 1024
#: Far above any machine, small enough that ``cpus * period`` stays an exact integer quota.
CPUS_MAX: Final = 100_000.0
#: The CFS bandwidth quota may not be below 1 ms, and the period not above 1 s.
_CFS_MIN_QUOTA_US: Final = 1000
_CFS_PERIOD_US: Final = 100_000
_CFS_MAX_PERIOD_US: Final = 1_000_000
CPUS_MIN: Final = _CFS_MIN_QUOTA_US / _CFS_MAX_PERIOD_US

MEMORY_ALLOWED: Final = "must be a number of bytes or one with a K, M or G suffix (binary units), e.g. 256M"
PIDS_ALLOWED: Final = f"must be a whole number of processes from 1 to {PIDS_LIMIT_MAX}, e.g. 64"
CPUS_ALLOWED: Final = (
    f"must be a number of CPUs from {CPUS_MIN:g} to {CPUS_MAX:g}, e.g. 1.5 (one and a half CPUs of time per second)"
)

_MEMORY = re.compile(r"(\d+(?:\.\d+)?)([KMG])?\Z", re.IGNORECASE)
_UNITS: Final = {"": 1, "K": KiB, "M": MiB, "G": GiB}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one container may use; ``None`` is "no limit".  Falsy when nothing is limited."""

    memory: int | None = None
    pids: int | None = None
    cpus: float | None = None

    def __bool__(self) -> bool:
        return self.memory is not None or self.pids is not None or self.cpus is not None

    def controllers(self) -> frozenset[str]:
        """The cgroup controllers that enforce these limits."""
        wanted = {"memory": self.memory, "pids": self.pids, "cpu": self.cpus}
        return frozenset(name for name, value in wanted.items() if value is not None)


def _reject_bool(value: object, allowed: str) -> None:
    # bool is an int: memory=True must not quietly mean one byte.
    if isinstance(value, bool):
        raise ValueError(allowed)


def parse_memory(value: str | int | None) -> int | None:
    """``"256M"`` -> 268435456.  Binary units; a fraction is allowed with a suffix (``1.5G``) and rounded down."""
    if value is None:
        return None
    _reject_bool(value, MEMORY_ALLOWED)
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        match = _MEMORY.match(value.strip())
        if match is None:
            raise ValueError(MEMORY_ALLOWED)
        digits, unit = match.groups()
        if "." in digits and not unit:
            raise ValueError(MEMORY_ALLOWED)
        number = int(float(digits) * _UNITS[(unit or "").upper()])
    else:
        raise ValueError(MEMORY_ALLOWED)
    if number < 1 or number >= 2**63:
        raise ValueError(f"{MEMORY_ALLOWED}; 0 and negative sizes are not limits (leave it unset for none)")
    return number


def parse_pids(value: str | int | None) -> int | None:
    """``"64"`` -> 64: the most processes (and threads) the container may have at once."""
    if value is None:
        return None
    _reject_bool(value, PIDS_ALLOWED)
    if isinstance(value, str):
        text = value.strip()
        if not text.isdigit():
            raise ValueError(PIDS_ALLOWED)
        number = int(text)
    elif isinstance(value, int):
        number = value
    else:
        raise ValueError(PIDS_ALLOWED)
    if not 1 <= number <= PIDS_LIMIT_MAX:
        raise ValueError(PIDS_ALLOWED)
    return number


def parse_cpus(value: str | float | None) -> float | None:
    """``"1.5"`` -> 1.5: CPU time per wall-clock second, as with ``docker run --cpus``."""
    if value is None:
        return None
    _reject_bool(value, CPUS_ALLOWED)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(CPUS_ALLOWED) from None
    elif isinstance(value, (int, float)):
        number = float(value)
    else:
        raise ValueError(CPUS_ALLOWED)
    if not math.isfinite(number) or not CPUS_MIN <= number <= CPUS_MAX:
        raise ValueError(CPUS_ALLOWED)
    return number


def format_bytes(n: int) -> str:
    """``268435456`` -> ``"256 MiB"``; a size as a person reads it, in the binary units the parser takes."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            value = n / size
            return f"{int(value)} {unit}" if n % size == 0 else f"{value:.1f} {unit}"
    return f"{n} bytes" if n != 1 else "1 byte"


def cfs_quota(cpus: float) -> tuple[int, int]:
    """``(quota_us, period_us)`` for ``cpus``: a 100 ms period, stretched to 1 s when the quota would be under 1 ms."""
    period = _CFS_PERIOD_US
    if cpus * period < _CFS_MIN_QUOTA_US:
        period = _CFS_MAX_PERIOD_US
    return max(_CFS_MIN_QUOTA_US, round(cpus * period)), period


@dataclasses.dataclass(frozen=True)
class Usage:
    """What a container used; ``None`` where this kernel or this host's hierarchies cannot tell."""

    memory_peak: int | None = None  #: bytes
    cpu_seconds: float | None = None  #: user + system
    pids_peak: int | None = None  #: most processes and threads at once
