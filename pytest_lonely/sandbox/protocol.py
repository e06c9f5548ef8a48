"""The wire between a container and its parent: frame kinds, framing and a decoder safe for hostile bytes.

A frame is a 4-byte little-endian length followed by the UTF-8 JSON text of
``[kind, payload]``.  The container is untrusted: whatever it writes reaches
this decoder, so the decoder must not be able to build anything but plain
data, crash the interpreter, or be made to allocate without bound.  JSON in
CPython's C decoder builds only ``dict``, ``list``, ``str``, ``int``,
``float``, ``bool`` and ``None``, refuses malformed input with ``ValueError``,
deep nesting with ``RecursionError`` and huge integers with ``ValueError``;
``marshal``, which it replaces, builds code objects and is documented as
unsafe for untrusted data.  Tuples arrive as lists: the decoding side turns
back into tuples what it knows must be tuples.  A frame announcing more than
:data:`MAX_FRAME` bytes is refused before anything is allocated.

This module is the one vocabulary of the wire: every frame kind is a member of
:class:`Kind`, and :class:`FrameReader` refuses any other, and any kind that
only the parent may send, loudly.
"""

from __future__ import annotations

import enum
import json
import os
import struct
from typing import Any, Final

HEADER: Final = struct.Struct("<I")
#: The largest frame the parent accepts.  A report bigger than this is cut down in the container first.
MAX_FRAME: Final = 64 << 20


class Kind(str, enum.Enum):
    """Every frame on the wire.  Values are what travels; members are what code compares."""

    #: Parent to container: ``[tail, order]``, the work of one test (see :class:`~.spec.ContainerSpec.tail`).
    GO = "go"

    #: A test report, as ``pytest_report_to_serializable`` made it.
    REPORT = "report"
    #: A warning recorded inside, re-emitted against the item in the parent.
    WARNING = "warning"
    #: ``["lines"|"arcs", {filename: [...]}]`` measured inside.
    COVERAGE = "coverage"
    #: A question the test asks about its own container (``container.changes()``); the answer comes back
    #: on the GO pipe, as a frame of the same kind.
    CHANGES = "changes"
    #: ``pytest.exit()`` inside: ``[msg, returncode]``.
    EXIT = "exit"
    #: KeyboardInterrupt inside: where it was raised, as text.
    INTERRUPT = "interrupt"
    #: The container could not be built, or the engine failed: a message.
    ERROR = "error"
    #: The work the parent handed over is finished; the container waits for more or ends.
    DONE = "done"


#: Kinds after which the container sends nothing more for the work in hand.
TERMINAL: Final = frozenset({Kind.EXIT, Kind.INTERRUPT, Kind.ERROR, Kind.DONE})
#: Kinds a container may send; GO goes the other way only.
FROM_CONTAINER: Final = frozenset(Kind) - {Kind.GO}
#: Questions a container may ask while it runs a test; each is answered on the GO pipe.
QUESTIONS: Final = frozenset({Kind.CHANGES})
_BY_VALUE: Final = {k.value: k for k in Kind}


class ProtocolError(Exception):
    """The bytes are not a valid sequence of frames, or a frame breaks the rules of the conversation."""


class FrameTooBig(ValueError):
    """The sending side made a frame over :data:`MAX_FRAME`: it must send less (the receiver would refuse it)."""


def plain(value: object) -> Any:
    """``value`` with everything JSON cannot carry replaced by its ``repr()`` and every mapping key made a str."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if type(value) in (tuple, list):
        return [plain(v) for v in value]  # type: ignore[attr-defined]
    if type(value) is dict:
        return {k if type(k) is str else str(k): plain(v) for k, v in value.items()}
    if isinstance(value, str):  # str subclasses (enums, path-likes) travel as plain text
        return str(value)
    return repr(value)


def _text(kind: Kind, payload: Any) -> bytes:
    try:
        text = _dumps([kind.value, payload])
    except (TypeError, ValueError):  # a mapping with keys JSON refuses, or a self-referencing structure
        try:
            text = _dumps([kind.value, plain(payload)])
        except RecursionError:
            text = _dumps([kind.value, repr(payload)])
    # Lone surrogates (bytes a test printed that were not UTF-8) travel as they are, and come back.
    return text.encode("utf-8", "surrogatepass")


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=repr, ensure_ascii=False)


def pack(body: bytes) -> bytes:
    """Length-prefix ``body``."""
    return HEADER.pack(len(body)) + body


def encode(kind: Kind, payload: Any = None) -> bytes:
    text = _text(kind, payload)
    if len(text) > MAX_FRAME:
        raise FrameTooBig(f"a {kind.value!r} frame of {len(text)} bytes exceeds the limit of {MAX_FRAME} bytes")
    return pack(text)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Sender:
    """The container's end of the pipe; remembers whether a terminal frame went out."""

    __slots__ = ("_held", "fd", "finished")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.finished = False
        self._held = b""

    def __call__(self, kind: Kind, payload: Any = None) -> None:
        frame = encode(kind, payload)
        held, self._held = self._held, b""
        write_all(self.fd, held + frame if held else frame)
        if kind in TERMINAL:
            self.finished = True

    def hold(self, kind: Kind, payload: Any = None) -> None:
        """Send with the next frame, in one write: each write wakes the parent, which costs both sides.

        Only for a frame nothing runs after but the engine's own epilogue (a
        test's teardown report, before DONE).
        """
        self._held += encode(kind, payload)


def decode(body: bytes) -> tuple[Kind, Any]:
    """One frame's body; anything that is not ``[known kind, JSON value]`` is a :class:`ProtocolError`."""
    try:
        frame = json.loads(body.decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ProtocolError(f"undecodable frame ({len(body)} bytes): {str(exc)[:200]}") from None
    if not (type(frame) is list and len(frame) == 2 and type(frame[0]) is str):
        raise ProtocolError(f"malformed frame: expected [kind, payload], got {_glimpse(body)}")
    kind = _BY_VALUE.get(frame[0])
    if kind is None:
        raise ProtocolError(f"unknown frame kind {frame[0][:100]!r}; known are {', '.join(_BY_VALUE)}")
    return kind, frame[1]


def _glimpse(body: bytes) -> str:
    text = body[:80].decode("ascii", "replace")
    return repr(text) + ("..." if len(body) > 80 else "")


class FrameReader:
    """Incremental decoder: feed it whatever ``os.read`` returned, get whole frames back.

    ``allowed`` is the set of kinds the other side may send: a container may
    never send GO, and the container's side accepts only GO.
    """

    __slots__ = ("_allowed", "_buf", "error")

    def __init__(self, allowed: frozenset[Kind] = FROM_CONTAINER) -> None:
        self._buf = bytearray()
        self._allowed = allowed
        #: What was wrong with the stream, once something was: nothing after it is read.
        self.error: ProtocolError | None = None

    def feed(self, data: bytes) -> list[tuple[Kind, Any]]:
        """The whole frames so far.  At the first bad one, the frames before it and :attr:`error` set."""
        if self.error is not None:
            return []
        self._buf += data
        frames: list[tuple[Kind, Any]] = []
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= HEADER.size:
                (length,) = HEADER.unpack_from(buf, pos)
                if length > MAX_FRAME:
                    raise ProtocolError(f"a frame of {length} bytes exceeds the limit of {MAX_FRAME} bytes")
                end = pos + HEADER.size + length
                if len(buf) < end:
                    break
                kind, payload = decode(bytes(buf[pos + HEADER.size : end]))
                if kind not in self._allowed:
                    raise ProtocolError(f"a {kind.value!r} frame, which only goes the other way")
                frames.append((kind, payload))
                pos = end
        except ProtocolError as exc:
            self.error = exc
            buf.clear()
            return frames
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame: non-zero at EOF means the writer died mid-frame."""
        return len(self._buf)
