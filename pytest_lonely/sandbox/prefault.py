"""Copy-on-write faults taken ahead of time, by a container waiting for its test.

The containers a zygote forks write to much the same pages of their copy of
pytest as each other: the refcounts and caches of the same runner and
fixture objects.  Each first write is a copy-on-write fault (about 4 µs on a
2-core VM, some 550 of them in a trivial test's phases), and it lands inside
the test's setup, call and teardown, which ``--durations`` reports.

So a container (a sample of them: see :func:`samples`) notes which of its
private pages it copied while it ran its test (``/proc/self/pagemap``:
present and exclusively mapped at the end, but not yet when it started
waiting), in memory shared with the containers the same zygote forks later;
a container waiting for its test copies those pages
ahead of time with ``MADV_POPULATE_WRITE`` (Linux 5.14), and stops as soon
as its test arrives.  Only private writable mappings of its own are touched,
so the contents never change; a page that is not mapped any more is skipped.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import select
import struct
from typing import Final

_PAGE: Final = mmap.PAGESIZE
_MADV_POPULATE_WRITE: Final = 23
_EINVAL: Final = 22
_HEADER: Final = struct.Struct("<QQ")  # sequence (odd while being written), number of ranges
_RANGE: Final = struct.Struct("<QQ")  # start, length in bytes
#: Bytes of shared memory for a record: room for about 16,000 ranges.
SIZE: Final = 1 << 18
_MAX_RANGES: Final = (SIZE - _HEADER.size) // _RANGE.size
#: At most this many pages are copied ahead of time (64 MiB): a hint must never cost more than the test.
_MAX_PAGES: Final = 16384
#: Byte 7 of a pagemap entry holds bit 63 (present) and bit 56 (exclusively mapped).
_MINE: Final = bytes(1 if byte & 0x81 == 0x81 else 0 for byte in range(256))
_RUN: Final = re.compile(b"\x01+")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int

#: Which pages of each private writable mapping (start, end) are this process's own: one byte per page.
Snapshot = dict[tuple[int, int], bytes]


def samples(index: int) -> bool:
    """Whether the zygote's container number ``index`` (from 0) writes down what it copied.

    Writing it down costs two scans of the page map (a few ms, after the
    test); the first containers of a zygote and then one in 32 are enough.
    """
    return index < 3 or index % 32 == 0


def shared_record() -> mmap.mmap:
    """Memory the zygote's later containers all share: made once, before the first of them."""
    return mmap.mmap(-1, SIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)


def _private_writable() -> list[tuple[int, int]]:
    """(start, end) of the private writable mappings: the only ones copy-on-write applies to."""
    found = []
    with open("/proc/self/maps", "rb") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            perms = fields[1]
            if perms[:2] == b"rw" and perms[3:4] == b"p":
                start, end = fields[0].split(b"-")
                found.append((int(start, 16), int(end, 16)))
    return found


def snapshot() -> Snapshot:
    """The pages this process has its own copy of, now."""
    taken: Snapshot = {}
    fd = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        for start, end in _private_writable():
            data = os.pread(fd, (end - start) // _PAGE * 8, start // _PAGE * 8)
            taken[(start, end)] = data[7::8].translate(_MINE)
    finally:
        os.close(fd)
    return taken


def record(shared: mmap.mmap, before: Snapshot) -> None:
    """Write down the pages copied since ``before``, for the next containers to copy ahead of time."""
    ranges: list[tuple[int, int]] = []
    pages = 0
    for (start, end), now in snapshot().items():
        earlier = before.get((start, end))
        fresh = now
        if earlier is not None and len(earlier) == len(now):
            # One byte per page, 0 or 1: "copied now and not then" is a bitwise and-not of the two.
            fresh = (int.from_bytes(now, "big") & ~int.from_bytes(earlier, "big")).to_bytes(len(now), "big")
        for run in _RUN.finditer(fresh):
            ranges.append((start + run.start() * _PAGE, (run.end() - run.start()) * _PAGE))
            pages += run.end() - run.start()
        if pages >= _MAX_PAGES or len(ranges) >= _MAX_RANGES:
            break
    sequence = _HEADER.unpack_from(shared, 0)[0] | 1
    _HEADER.pack_into(shared, 0, sequence, 0)  # odd: a reader now ignores the body
    body = b"".join(_RANGE.pack(start, length) for start, length in ranges)
    shared[_HEADER.size : _HEADER.size + len(body)] = body
    _HEADER.pack_into(shared, 0, sequence + 1, len(ranges))


def _recorded(shared: mmap.mmap) -> list[tuple[int, int]]:
    sequence, count = _HEADER.unpack_from(shared, 0)
    if sequence % 2 or not count or count > _MAX_RANGES:
        return []
    body = shared[_HEADER.size : _HEADER.size + count * _RANGE.size]
    if _HEADER.unpack_from(shared, 0)[0] != sequence:  # rewritten meanwhile: only a hint, skip it
        return []
    return [_RANGE.unpack_from(body, i * _RANGE.size) for i in range(count)]


def take_ahead(shared: mmap.mmap, wake_fd: int) -> None:
    """Copy the recorded pages that are in private writable mappings of ours; stop once ``wake_fd`` is readable."""
    wanted = _recorded(shared)
    if not wanted:
        return
    poller = select.poll()
    poller.register(wake_fd, select.POLLIN)
    for start, length in _clip(wanted, _private_writable()):
        if poller.poll(0):
            return
        if _libc.madvise(start, length, _MADV_POPULATE_WRITE) != 0 and ctypes.get_errno() == _EINVAL:
            return  # before Linux 5.14; anything else (a page gone meanwhile) only skips that range


def _clip(wanted: list[tuple[int, int]], mine: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``wanted`` (start, length) that lie in ``mine`` (start, end, sorted, disjoint)."""
    out = []
    j = 0
    for start, length in sorted(wanted):
        end = start + length
        while j < len(mine) and mine[j][1] <= start:
            j += 1
        k = j
        while k < len(mine) and mine[k][0] < end:
            lo, hi = max(start, mine[k][0]), min(end, mine[k][1])
            out.append((lo, hi - lo))
            k += 1
    return out
