"""The wire between a container and its parent: frame kinds and their framing.

A frame is a 4-byte little-endian length followed by a :mod:`marshal`-encoded
``(kind, payload)`` tuple.  marshal keeps tuples as tuples (junitxml insists a
skip's ``longrepr`` is one, which JSON would break), is the fastest encoder in
the standard library, and refuses arbitrary objects, so nothing executable ever
crosses the pipe.  Values marshal cannot encode are replaced by their
``repr()`` on the sending side, see :func:`plain`.

This module is the one vocabulary of the wire: every frame kind is a member of
:class:`Kind`, and :class:`FrameReader` refuses any other, loudly, so a frame
can never be dropped because one side spells it differently.
"""

from __future__ import annotations

import enum
import marshal
import os
import struct
from typing import Any, Final

HEADER: Final = struct.Struct("<I")
MAX_FRAME: Final = 1 << 30


class Kind(str, enum.Enum):
    """Every frame on the wire.  Values are what travels; members are what code compares."""

    #: Caller to container: ``(tail, order)``, the work of a container built ahead of time (see zygote.py).
    GO = "go"

    #: ``{"host_pid": int}``: the container is up; its PID 1 as the host sees it (rootless only).
    HELLO = "hello"
    #: A test report, as ``pytest_report_to_serializable`` made it.
    REPORT = "report"
    #: A warning recorded inside, re-emitted against the item in the parent.
    WARNING = "warning"
    #: ``("lines"|"arcs", {filename: [...]})`` measured inside.
    COVERAGE = "coverage"
    #: A note for the parent to warn about once per session (a plugin's results that cannot cross).
    NOTICE = "notice"
    #: ``pytest.exit()`` inside: ``(msg, returncode)``.
    EXIT = "exit"
    #: KeyboardInterrupt inside.
    INTERRUPT = "interrupt"
    #: The container could not be built, or the engine failed: a message.
    ERROR = "error"
    #: Nothing more will come; the parent may stop reading.
    DONE = "done"


#: Kinds after which the container sends nothing more.
TERMINAL: Final = frozenset({Kind.EXIT, Kind.INTERRUPT, Kind.ERROR, Kind.DONE})
_BY_VALUE: Final = {k.value: k for k in Kind}

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


def pack(body: bytes) -> bytes:
    """Length-prefix ``body``: the framing shared by the pipe and the prebuild helper's socket."""
    return HEADER.pack(len(body)) + body


def encode(kind: Kind, payload: Any) -> bytes:
    try:
        body = marshal.dumps((kind.value, payload))
    except ValueError:
        body = marshal.dumps((kind.value, plain(payload)))
    return pack(body)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Sender:
    """The container's end of the pipe; remembers whether a terminal frame went out."""

    __slots__ = ("fd", "finished")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.finished = False

    def __call__(self, kind: Kind, payload: Any = None) -> None:
        write_all(self.fd, encode(kind, payload))
        if kind in TERMINAL:
            self.finished = True


class FrameReader:
    """Incremental decoder: feed it whatever ``os.read`` returned, get whole frames back."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[Kind, Any]]:
        self._buf += data
        frames: list[tuple[Kind, Any]] = []
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
            kind = _BY_VALUE.get(frame[0])
            if kind is None:
                raise ProtocolError(f"unknown frame kind {frame[0]!r}; known are {', '.join(_BY_VALUE)}")
            frames.append((kind, frame[1]))
            pos = end
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame: non-zero at EOF means the writer died mid-frame."""
        return len(self._buf)
