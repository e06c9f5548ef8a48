"""``/proc/self/mountinfo``, read one way for every caller: the mount plan and cgroup discovery.

A line is ``ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS``
(proc(5)).  The kernel escapes space, tab, newline and backslash in paths as ``\\ooo``, so a field
never holds a space and `` - `` only ever separates the two halves.  Bytes that are not UTF-8 survive
as surrogates, so an odd mount point elsewhere on the host can never stop a reader.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Final

__all__ = ["MOUNTINFO", "Entry", "parse", "read", "read_text", "unescape"]

MOUNTINFO: Final = "/proc/self/mountinfo"

_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One mount, as this process's mount namespace shows it; paths unescaped."""

    root: str  #: the directory of the filesystem mounted here (not ``/`` for a bind of a subdirectory)
    mount_point: str  #: relative to this process's root
    options: str  #: per-mount options (``rw,nosuid,relatime``)
    fstype: str
    source: str
    super_options: str  #: per-superblock options; cgroup v1 lists its controllers here


def unescape(field: str) -> str:
    """``/mnt/a\\040b`` -> ``/mnt/a b``."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse(text: str) -> list[Entry]:
    """Every well-formed line of ``text``, in mount order; malformed lines are skipped, never fatal."""
    entries: list[Entry] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(" "), right.split(" ")
        if len(fields) < 6 or len(tail) < 3:
            continue
        entries.append(
            Entry(
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                options=fields[5],
                fstype=tail[0],
                source=unescape(tail[1]),
                super_options=tail[2],
            )
        )
    return entries


def read_text(path: str = MOUNTINFO) -> str:
    """A mountinfo file's text (this process's by default); ``OSError`` if it cannot be read."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        return f.read()


def read(path: str = MOUNTINFO) -> list[Entry]:
    """:func:`parse` of :func:`read_text`."""
    return parse(read_text(path))
