"""Reading and extracting tar archives from untrusted sources: rootfs tarballs and image layers alike.

The parent (possibly root) unpacks them on the host, so every member is vetted against a model of the tree
*before* anything is written: nothing may land outside the destination, neither through ``..``, nor an absolute
name, nor a hard link, nor a symlink the archive planted earlier.  Absolute symlinks themselves are normal in a
rootfs (``bin/sh -> /bin/busybox``) and are kept, because they only ever resolve inside the container.  Device
nodes and fifos are never created, and setuid/setgid bits are dropped.

Both callers (:mod:`.archive` for rootfs tarballs, :mod:`.image.layer` for image layers) use exactly this recipe:
:func:`complete_members`, then :func:`vet`, then :func:`extract`.
"""

from __future__ import annotations

import copy
import lzma
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

__all__ = [
    "CHUNK",
    "TAR_ERRORS",
    "Refused",
    "Unsafe",
    "check_lexically",
    "complete_members",
    "describe",
    "extract",
    "normalize",
    "resolve",
    "vet",
]

#: How much of an archive or blob is read at a time.
CHUNK: Final = 1 << 20
# Same bound as Linux's MAXSYMLINKS: past this the kernel would fail with ELOOP anyway.
_MAX_SYMLINK_HOPS: Final = 40
# tarfile grew extraction filters in 3.10.12 / 3.11.4 / 3.12; older interpreters reject the ``filter`` argument.
_HAS_FILTERS: Final = hasattr(tarfile, "tar_filter")
# A setuid-root binary from an untrusted tarball, unpacked by root, would be a host privilege escalation.
_DROPPED_BITS: Final = stat.S_ISUID | stat.S_ISGID
#: Everything tarfile and the decompressors raise for damaged input, so callers never show a raw traceback.
#: (KeyError: tarfile's hard-link fallback not finding its target.)
TAR_ERRORS: Final = (
    tarfile.TarError,
    OSError,
    EOFError,
    ValueError,
    OverflowError,
    KeyError,
    zlib.error,
    lzma.LZMAError,
)


class Unsafe(Exception):
    """A path would resolve outside the destination; carries the phrase for the caller's error message."""


class Refused(Exception):
    """:func:`vet` refused the archive; the message names the archive (as the caller called it) and the member."""


def describe(exc: BaseException) -> str:
    """One line, never empty: tarfile's "could not be opened" message spans several lines."""
    return " ".join(str(exc).split()) or type(exc).__name__


def normalize(name: str) -> str:
    """A member name as a path relative to the archive's root (``./a//b`` and ``/a/b`` are ``a/b``)."""
    return posixpath.normpath(name).lstrip("/") if name not in ("", ".", "./") else "."


def complete_members(tar: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Every member, refusing archives that merely stop, and making the decompressor verify its checksum.

    tarfile silently treats a missing or garbled header after the first one as the end of the archive, so an
    uncompressed tarball cut at a member boundary would otherwise be cached forever as a partial rootfs.  And
    tarfile stops reading at the end-of-archive marker, before the gzip/xz trailer whose CRC would reveal
    corrupted file contents, so the rest of the stream is drained here.  Raises one of :data:`TAR_ERRORS`.
    """
    members = tar.getmembers()
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) != tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        after = f" after member '{members[-1].name}'" if members else ""
        raise tarfile.ReadError(f"truncated or corrupt: no end-of-archive marker{after}")
    while tar.fileobj.read(CHUNK):
        pass
    return members


def _is_skipped(member: tarfile.TarInfo) -> bool:
    """The container mounts its own /dev, and creating device nodes on the host is a privilege we must not use."""
    return member.ischr() or member.isblk() or member.isfifo()


def vet(members: list[tarfile.TarInfo], what: str) -> list[tarfile.TarInfo]:
    """The members to extract, or :class:`Refused` before anything is written if any could land outside.

    ``what`` names the archive in the message (``rootfs tarball '...'``).  Lexical checks are not enough: an
    earlier member can be a symlink (``bin -> /etc``) that a later member (``bin/passwd``) is written through.
    So this replays the archive against a model of what extraction will have created so far, resolving each
    path the way the kernel will.  It does not depend on tarfile's filters, which older 3.10/3.11 releases lack.
    """
    symlinks: dict[str, str] = {}  # resolved path -> link text
    created: set[str] = set()  # resolved paths of everything else that will exist
    skipped: set[str] = set()  # device nodes and fifos, which are never created
    selected: list[tarfile.TarInfo] = []
    for entry in members:
        member, name = entry, entry.name
        try:
            check_lexically(name)
        except Unsafe as exc:
            raise Refused(f"{what} member '{name}' {exc}; refused") from None
        if member.islnk():
            target = _vet_hard_link(what, name, member.linkname, symlinks)
            if target in symlinks:
                # link(2) on a symlink makes another symlink with the same text.  Creating that symlink directly
                # keeps the result without trusting every os.link to leave an absolute target unfollowed.
                member = copy.copy(entry)
                member.type = tarfile.SYMTYPE
                member.linkname = symlinks[target]
            elif target not in created:
                if target not in skipped:
                    raise Refused(
                        f"{what} member '{name}' is a hard link to '{entry.linkname}', "
                        "which is not an earlier member of the archive"
                    )
                # A hard link to a device node would make tarfile create the device after all.
                member = copy.copy(entry)
                member.type = tarfile.CHRTYPE
        try:
            # tarfile replaces an existing entry with a new symlink, but opens, mkdirs, chmods or (as a hard-link
            # fallback) copies *through* an existing symlink for everything else.
            where = resolve(name, symlinks, follow_final=not (member.issym() or _is_skipped(member)))
        except Unsafe as exc:
            if _is_skipped(member):
                continue
            raise Refused(f"{what} member '{name}' {exc}; refused") from None
        if _is_skipped(member):
            skipped.add(where)
            continue
        if member.issym():
            symlinks[where] = member.linkname
            created.discard(where)
        else:
            created.add(where)
            if not member.isdir():
                member.mode &= ~_DROPPED_BITS
        selected.append(member)
    return selected


def _vet_hard_link(what: str, name: str, linkname: str, symlinks: Mapping[str, str]) -> str:
    """Refuse a hard link to anything outside, which would let the container write to a host file.

    Returns the resolved path of the link's target.
    """
    try:
        check_lexically(linkname)
        return resolve(linkname, symlinks, follow_final=False)
    except Unsafe as exc:
        raise Refused(f"{what} member '{name}' is a hard link to '{linkname}', which {exc}; refused") from None


def check_lexically(path: str) -> None:
    """:class:`Unsafe` if ``path`` is absolute or climbs out with ``..``, before any symlink is considered."""
    if path.startswith("/"):
        raise Unsafe("has an absolute path")
    normalized = posixpath.normpath(path)
    if normalized == ".." or normalized.startswith("../"):
        raise Unsafe("escapes the destination")


def resolve(path: str, symlinks: Mapping[str, str], *, follow_final: bool) -> str:
    """Walk ``path`` component by component as the kernel will, substituting symlinks the archive created.

    Returns the path relative to the destination.  An absolute symlink target is fine to *store* but, once
    followed on the host, leads outside the destination, so following one is refused.
    """
    pending = path.split("/")[::-1]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                raise Unsafe("escapes the destination")
            resolved.pop()
            continue
        candidate = "/".join([*resolved, part])
        target = symlinks.get(candidate)
        if target is None or (not pending and not follow_final):
            resolved.append(part)
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            raise Unsafe("goes through a symlink loop")
        if target.startswith("/"):
            raise Unsafe(f"goes through symlink '{candidate}' -> '{target}' that points outside the destination")
        pending.extend(target.split("/")[::-1])
    return "/".join(resolved)


def extract(tar: tarfile.TarFile, selected: list[tarfile.TarInfo], dest: Path) -> None:
    """Write the members :func:`vet` selected, and nothing else, into ``dest``.  Raises one of :data:`TAR_ERRORS`.

    tarfile's link fallbacks look targets up in its own member list; that list is cut down to what was vetted, so
    no fallback can ever extract a device node or an unvetted member.
    """
    tar.getmembers()[:] = selected
    if _HAS_FILTERS:
        tar.extractall(dest, selected, numeric_owner=True, filter=_rootfs_filter)
    else:
        tar.extractall(dest, selected, numeric_owner=True)


def _rootfs_filter(member: tarfile.TarInfo, dest_path: str) -> tarfile.TarInfo | None:
    """Second line of defence on interpreters that have filters.

    ``tar_filter`` re-checks each member against the real filesystem just before it is written, but it also
    strips group/other write and sticky bits, which a rootfs needs (``/tmp`` is 1777); those are restored from
    the already vetted member.  The ``data`` filter is unusable: it refuses absolute symlinks.
    """
    if _is_skipped(member):
        return None
    filtered = tarfile.tar_filter(member, dest_path)
    if filtered.mode != member.mode and not member.issym():
        filtered = filtered.replace(mode=member.mode, deep=False)
    return filtered
