"""Huge pages for the heap containers are forked from: fork cost that does not grow with pytest's heap.

``fork()`` copies the page tables of every private anonymous mapping and the
child's exit frees them, 4 KiB page by 4 KiB page, so a container of a
pytest holding a gigabyte of fixtures costs tens of milliseconds however
little its test touches.  A 2 MiB transparent huge page is one page-table
entry instead of 512, and a child's write to it still copies only 4 KiB (the
kernel splits the child's mapping).  So before it forks, the engine collapses
the 2 MiB-aligned parts of the caller's private anonymous memory into huge
pages (``MADV_HUGEPAGE``, then ``MADV_COLLAPSE``, Linux 6.1+), and again only
once that memory has grown by :data:`REGROW` since: measured on a 2-core VM,
1.4 to 2.9 s of CPU per GB collapsed, about +1% of resident memory, and the
per-test overhead at 1 GB of live objects from 57 to 21 ms.  A process below
:data:`REGROW` is left alone: at pytest's own 34 MB it gains nothing.

``MADV_COLLAPSE`` ignores the administrator's ``transparent_hugepage``
setting, so ``never`` is honoured here.  ``PYTEST_LONELY_HUGEPAGES=0`` turns
it off.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

from ._syscalls import LIBC

MADV_HUGEPAGE: Final = 14
MADV_COLLAPSE: Final = 25
HUGE: Final = 2 << 20
#: Collapse (again) once this much private memory is resident beyond what the last collapse saw.
REGROW: Final = 64 << 20
_ENABLED: Final = "/sys/kernel/mm/transparent_hugepage/enabled"

_madvise = LIBC.madvise
_madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_madvise.restype = ctypes.c_int


def setting() -> str:
    """The administrator's THP mode (``always``, ``madvise``, ``never``), or "" where the kernel has none."""
    try:
        with open(_ENABLED) as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def _resident() -> int:
    """Resident anonymous bytes, read from ``/proc/self/statm`` (O(1), unlike ``smaps``)."""
    with open("/proc/self/statm") as f:
        fields = f.read().split()
    # resident - shared (file-backed) ~ anonymous; statm is in pages.
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")


def _regions() -> list[tuple[int, int]]:
    """The 2 MiB-aligned parts of private anonymous writable mappings (the heap, malloc arenas, obmalloc)."""
    found = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and fields[5] not in ("[heap]",):
                continue  # a file, a stack, the vdso: not the heap
            if fields[1][:2] != "rw" or fields[1][3] != "p":
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            low, high = -(-start // HUGE) * HUGE, end // HUGE * HUGE
            if high > low:
                found.append((low, high - low))
    return found


class Heap:
    """The caller's heap on huge pages, collapsed again only when it has grown."""

    def __init__(self, enabled: bool = True) -> None:
        mode = setting()
        #: Why the heap stays on small pages, if it does: said once in ``-v`` output.
        self.unavailable: str | None = None
        if not enabled:
            self.unavailable = "turned off (PYTEST_LONELY_HUGEPAGES=0)"
        elif mode in ("", "never"):
            self.unavailable = f"transparent huge pages are {'off' if mode == 'never' else 'not in this kernel'}"
        elif _kernel() < (6, 1):
            self.unavailable = f"Linux {os.uname().release} cannot collapse memory into huge pages (6.1+)"
        self._seen = 0
        self.collapsed = 0

    def prepare(self) -> None:
        """Before a fork: collapse what the heap grew by, if that is worth it.  Never fails."""
        if self.unavailable is not None:
            return
        try:
            resident = _resident()
        except (OSError, ValueError, IndexError):
            return
        if resident - self._seen < REGROW:
            return
        self._seen = resident
        for start, length in _regions():
            # A range that cannot be collapsed (EAGAIN, ENOMEM, a mapping that is not eligible) stays as it is.
            if _madvise(start, length, MADV_HUGEPAGE) == 0 and _madvise(start, length, MADV_COLLAPSE) == 0:
                self.collapsed += length


def _kernel() -> tuple[int, int]:
    parts = os.uname().release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return (0, 0)
