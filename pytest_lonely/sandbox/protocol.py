"""Framing of the one-way pipe from a container back to pytest.

A frame is a 4-byte little-endian length followed by a :mod:`marshal`-encoded
``(kind, payload)`` tuple.  marshal keeps tuples as tuples (junitxml insists a
skip's ``longrepr`` is one, which JSON would break), is the fastest encoder in
the standard library, and refuses arbitrary objects, so nothing executable ever
crosses the pipe.  Values marshal cannot encode are replaced by their
``repr()`` on the child side, see :func:`plain`.
"""

from __future__ import annotations

import marshal
import os
import struct
from typing import Any, Final

HEADER: Final = struct.Struct("<I")
MAX_FRAME: Final = 1 << 30

# Frame kinds, child -> parent.
HELLO: Final = "hello"  # {"host_pid": int}: the container is up, its PID 1 as the host sees it
REPORT: Final = "report"  # a report from pytest_report_to_serializable
WARNING: Final = "warning"  # a warning recorded inside, re-emitted against the item in the parent
EXIT: Final = "exit"  # pytest.exit() inside: (msg, returncode)
INTERRUPT: Final = "interrupt"  # KeyboardInterrupt inside
ERROR: Final = "error"  # the container could not be built: a message for a setup error
COVERAGE: Final = "coverage"  # ("lines"|"arcs", {filename: [...]}) measured inside
DONE: Final = "done"  # nothing more will come; the parent may stop reading

_PLAIN_SCALARS: Final = (str, int, float, bool, bytes, type(None))


class ProtocolError(Exception):
    """The byte stream is not a valid sequence of frames (a child died mid-write, or worse)."""


def plain(value: object) -> Any:
    """Return ``value`` with everything marshal cannot carry replaced by its ``repr()``."""
    if type(value) in _PLAIN_SCALARS:
        return value
    if type(value) is tuple:
        return tuple(plain(v) for v in value)
    if type(value) is list:
        return [plain(v) for v in value]
    if type(value) is dict:
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, (str, int, float)):  # subclasses such as enums and str-paths
        return repr(value) if not isinstance(value, str) else str(value)
    return repr(value)


def encode(kind: str, payload: Any) -> bytes:
    try:
        body = marshal.dumps((kind, payload))
    except ValueError:
        body = marshal.dumps((kind, plain(payload)))
    return HEADER.pack(len(body)) + body


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class FrameReader:
    """Incremental decoder: feed it whatever ``os.read`` returned, get whole frames back."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        self._buf += data
        frames: list[tuple[str, Any]] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, pos)
            if length > MAX_FRAME:
                raise ProtocolError(f"frame of {length} bytes exceeds the limit of {MAX_FRAME}")
            end = pos + HEADER.size + length
            if len(buf) < end:
                break
            try:
                frame = marshal.loads(bytes(buf[pos + HEADER.size : end]))
            except (EOFError, ValueError, TypeError) as exc:
                raise ProtocolError(f"undecodable frame: {exc}") from None
            if not (isinstance(frame, tuple) and len(frame) == 2 and isinstance(frame[0], str)):
                raise ProtocolError(f"malformed frame: {type(frame).__name__}")
            frames.append(frame)
            pos = end
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame: non-zero at EOF means the writer died mid-frame."""
        return len(self._buf)
