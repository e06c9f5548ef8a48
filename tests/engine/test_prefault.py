"""Copy-on-write faults taken ahead of time: real forks, real page maps, contents never change."""

from __future__ import annotations

import ctypes
import mmap
import os

import pytest

from pytest_lonely.sandbox import prefault

PAGE = mmap.PAGESIZE
PAGES = 64


def _exclusive(address: int, pages: int) -> int:
    """How many of the pages from ``address`` this process has its own copy of."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(address // PAGE * 8)
        data = f.read(pages * 8)
    return sum(1 for byte in data[7::8] if byte & 0x81 == 0x81)


def _in_child(work) -> int:  # type: ignore[no-untyped-def]
    """Run ``work`` in a forked child; its return value (a small int) as the exit status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 99
        try:
            status = work()
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.fixture
def buffer() -> tuple[bytearray, int]:
    """A private buffer the parent has written, so that each child starts sharing every page of it."""
    data = bytearray(os.urandom((PAGES + 1) * PAGE))
    address = ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))
    return data, (address + PAGE - 1) // PAGE * PAGE


def test_a_record_names_the_pages_a_test_copied_and_the_next_one_copies_them_ahead(
    buffer: tuple[bytearray, int],
) -> None:
    data, start = buffer
    offset = start - ctypes.addressof((ctypes.c_char * len(data)).from_buffer(data))
    shared = prefault.shared_record()
    expected = bytes(data)

    def first() -> int:
        before = prefault.snapshot()
        for page in range(0, PAGES, 2):  # the "test" writes every other page
            data[offset + page * PAGE] ^= 0
        prefault.record(shared, before)
        return 0

    def second() -> int:
        if _exclusive(start, PAGES) != 0:
            return 1  # nothing copied yet: all shared with the parent
        read, _write = os.pipe()  # nothing arrives on it: copy everything recorded
        prefault.take_ahead(shared, read)
        copied = _exclusive(start, PAGES)
        if bytes(data) != expected:
            return 3  # populating must never change a byte
        return 0 if copied == PAGES // 2 else 2

    assert _in_child(first) == 0
    recorded = prefault._recorded(shared)
    covered = {(a - start) // PAGE for a, length in recorded for a in range(a, a + length, PAGE)}
    assert set(range(0, PAGES, 2)) <= covered
    assert not covered & set(range(1, PAGES, 2))
    assert _in_child(second) == 0


def test_taking_ahead_stops_when_the_test_arrives(buffer: tuple[bytearray, int]) -> None:
    _, start = buffer
    shared = prefault.shared_record()
    prefault._HEADER.pack_into(shared, 0, 2, 1)
    prefault._RANGE.pack_into(shared, prefault._HEADER.size, start, PAGES * PAGE)

    def waiting_with_go_already_there() -> int:
        read, write = os.pipe()
        os.write(write, b"go")
        prefault.take_ahead(shared, read)
        return _exclusive(start, PAGES)

    assert _in_child(waiting_with_go_already_there) == 0


def test_a_record_being_written_or_pointing_nowhere_is_ignored(buffer: tuple[bytearray, int]) -> None:
    _, start = buffer
    shared = prefault.shared_record()
    prefault._HEADER.pack_into(shared, 0, 3, 1)  # odd sequence: a writer is busy
    prefault._RANGE.pack_into(shared, prefault._HEADER.size, start, PAGE)
    assert prefault._recorded(shared) == []
    # Unmapped addresses (a mapping the recorder had and we do not) are clipped away, never touched.
    assert prefault._clip([(0x1000, 0x3000)], [(0x2000, 0x3000), (0x10000, 0x20000)]) == [(0x2000, 0x1000)]
    assert prefault._clip([(0x10000, 0x1000)], [(0x2000, 0x3000)]) == []
