"""Unpack a rootfs tarball once per content into a shared, content-addressed cache.

Every xdist worker and every session asks for the same rootfs, so unpacking it per test would dominate start-up,
and unpacking it concurrently into one place would let a worker boot a half-written tree.  The tree therefore
lives under the sha256 of the tarball's bytes, is built in a private temp directory while holding a per-key file
lock, and only becomes visible through one atomic ``rename``.

The tarball is untrusted input that the parent (possibly root) unpacks on the host, so every member is vetted
against a model of the tree *before* anything is written: nothing may land outside the cache, neither through
``..``, nor an absolute name, nor a hard link, nor a symlink the archive planted earlier.  Absolute symlinks
themselves are normal in a rootfs (``bin/sh -> /bin/busybox``) and are kept, because they only ever resolve
inside the container.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import lzma
import os
import posixpath
import shutil
import stat
import tarfile
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import filelock

__all__ = ["ArchiveError", "unpack"]

_CHUNK: Final = 1 << 20
_KEY_HEX: Final = 24
# Same bound as Linux's MAXSYMLINKS: past this the kernel would fail with ELOOP anyway.
_MAX_SYMLINK_HOPS: Final = 40
# tarfile grew extraction filters in 3.10.12 / 3.11.4 / 3.12; older interpreters reject the ``filter`` argument.
_HAS_FILTERS: Final = hasattr(tarfile, "tar_filter")
# A setuid-root binary from an untrusted tarball, unpacked by root, would be a host privilege escalation.
_DROPPED_BITS: Final = stat.S_ISUID | stat.S_ISGID
# Everything tarfile and the decompressors raise for damaged input, so callers never see a raw traceback.
# (KeyError: tarfile's hard-link fallback not finding its target.)
_TAR_ERRORS: Final = (
    tarfile.TarError,
    OSError,
    EOFError,
    ValueError,
    OverflowError,
    KeyError,
    zlib.error,
    lzma.LZMAError,
)

# (resolved path, st_dev, st_ino, st_size, st_mtime_ns) -> sha256 hex.  Hashing a large rootfs costs far more than
# a stat, and the parent asks once per test; a rewritten file changes size or mtime and so gets hashed again.
_key_memo: dict[tuple[str, int, int, int, int], str] = {}


class ArchiveError(Exception):
    """The rootfs tarball cannot be used; the message names the tarball and what is wrong with it."""


class _Unsafe(Exception):
    """A path in the archive would resolve outside the destination; carries the phrase for the error message."""


def unpack(tarball: Path, cache_root: Path) -> tuple[Path, bool]:
    """Return (directory holding the unpacked tree, True if this call did the extraction).

    The directory is shared by every process using the same cache, so callers must treat it as read-only.
    """
    key = _content_key(tarball)[:_KEY_HEX]
    dest = cache_root / key
    # Fast path without the lock: ``dest`` only ever appears by an atomic rename of a complete tree.
    if dest.is_dir():
        return dest, False
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(cache_root / f"{key}.lock"))
        lock.acquire()
    except OSError as exc:
        raise ArchiveError(
            f"rootfs tarball '{tarball}' cannot be unpacked: cache directory '{cache_root}' is not usable: {exc}"
        ) from exc
    try:
        if dest.is_dir():  # another process finished while we waited for the lock
            return dest, False
        _remove_stale_temps(cache_root, key)
        _build(tarball, cache_root, key, dest)
        return dest, True
    finally:
        lock.release()


def _content_key(tarball: Path) -> str:
    """Name the tree by content, not path, so copies and renames of one tarball share a single unpacked tree."""
    try:
        resolved = tarball.resolve()
        st = resolved.stat()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python < 3.13
        raise ArchiveError(f"rootfs tarball '{tarball}' cannot be read: {_describe(exc)}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"rootfs tarball '{tarball}' is not a regular file")
    memo_key = (str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _key_memo.get(memo_key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    try:
        with open(resolved, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ArchiveError(f"rootfs tarball '{tarball}' cannot be read: {_describe(exc)}") from exc
    key = digest.hexdigest()
    _key_memo[memo_key] = key
    return key


def _build(tarball: Path, cache_root: Path, key: str, dest: Path) -> None:
    """Extract beside ``dest`` and rename, so other processes see either no tree or a complete one."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=cache_root))
    except OSError as exc:
        raise ArchiveError(f"rootfs tarball '{tarball}' cannot be unpacked into '{cache_root}': {exc}") from exc
    try:
        # mkdtemp's 0700 would make "/" untraversable for non-root users in the container; an explicit "."
        # member in the archive overrides this.
        tmp.chmod(0o755)
        _extract(tarball, tmp)
        os.rename(tmp, dest)
    except OSError as exc:
        _remove_tree(tmp)
        raise ArchiveError(f"rootfs tarball '{tarball}' cannot be unpacked into '{cache_root}': {exc}") from exc
    except BaseException:
        _remove_tree(tmp)
        raise


def _extract(tarball: Path, dest: Path) -> None:
    problem = "is not a readable tar archive"
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = tar.getmembers()
            _require_complete(tar, members)
            selected = _vet(tarball, members)
            # tarfile's link fallbacks look targets up in this very list; leave only what was vetted, so no
            # fallback can ever extract a device node or an unvetted member.
            members[:] = selected
            problem = "cannot be unpacked"
            if _HAS_FILTERS:
                tar.extractall(dest, selected, numeric_owner=True, filter=_rootfs_filter)
            else:
                tar.extractall(dest, selected, numeric_owner=True)
    except _TAR_ERRORS as exc:
        raise ArchiveError(f"rootfs tarball '{tarball}' {problem}: {_describe(exc)}") from exc


def _require_complete(tar: tarfile.TarFile, members: list[tarfile.TarInfo]) -> None:
    """Reject archives that merely stop, and make the decompressor verify its checksum.

    tarfile silently treats a missing or garbled header after the first one as the end of the archive, so an
    uncompressed tarball cut at a member boundary would otherwise be cached forever as a partial rootfs.  And
    tarfile stops reading at the end-of-archive marker, before the gzip/xz trailer whose CRC would reveal
    corrupted file contents, so the rest of the stream is drained here.
    """
    tar.fileobj.seek(tar.offset)
    block = tar.fileobj.read(tarfile.BLOCKSIZE)
    if len(block) != tarfile.BLOCKSIZE or block.count(0) != tarfile.BLOCKSIZE:
        after = f" after member '{members[-1].name}'" if members else ""
        raise tarfile.ReadError(f"truncated or corrupt: no end-of-archive marker{after}")
    while tar.fileobj.read(_CHUNK):
        pass


def _is_skipped(member: tarfile.TarInfo) -> bool:
    """The container mounts its own /dev, and creating device nodes on the host is a privilege we must not use."""
    return member.ischr() or member.isblk() or member.isfifo()


def _vet(tarball: Path, members: list[tarfile.TarInfo]) -> list[tarfile.TarInfo]:
    """Refuse the whole archive before writing anything if any member could land outside the destination.

    Lexical checks are not enough: an earlier member can be a symlink (``bin -> /etc``) that a later member
    (``bin/passwd``) is written through.  So this replays the archive against a model of what extraction will
    have created so far, resolving each path the way the kernel will.  It does not depend on tarfile's filters,
    which older 3.10/3.11 releases lack.
    """
    symlinks: dict[str, str] = {}  # resolved path -> link text
    created: set[str] = set()  # resolved paths of everything else that will exist
    skipped: set[str] = set()  # device nodes and fifos, which are never created
    selected: list[tarfile.TarInfo] = []
    for entry in members:
        member, name = entry, entry.name
        try:
            _check_lexically(name)
        except _Unsafe as exc:
            raise ArchiveError(f"rootfs tarball '{tarball}' member '{name}' {exc}; refused") from None
        if member.islnk():
            target = _vet_hard_link(tarball, name, member.linkname, symlinks)
            if target in symlinks:
                # link(2) on a symlink makes another symlink with the same text.  Creating that symlink directly
                # keeps the result without trusting every os.link to leave an absolute target unfollowed.
                member = copy.copy(entry)
                member.type = tarfile.SYMTYPE
                member.linkname = symlinks[target]
            elif target not in created:
                if target not in skipped:
                    raise ArchiveError(
                        f"rootfs tarball '{tarball}' member '{name}' is a hard link to '{entry.linkname}', "
                        "which is not an earlier member of the archive"
                    )
                # A hard link to a device node would make tarfile create the device after all.
                member = copy.copy(entry)
                member.type = tarfile.CHRTYPE
        try:
            # tarfile replaces an existing entry with a new symlink, but opens, mkdirs, chmods or (as a hard-link
            # fallback) copies *through* an existing symlink for everything else.
            where = _resolve(name, symlinks, follow_final=not (member.issym() or _is_skipped(member)))
        except _Unsafe as exc:
            if _is_skipped(member):
                continue
            raise ArchiveError(f"rootfs tarball '{tarball}' member '{name}' {exc}; refused") from None
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


def _vet_hard_link(tarball: Path, name: str, linkname: str, symlinks: Mapping[str, str]) -> str:
    """Refuse a hard link to anything outside, which would let the container write to a host file.

    Returns the resolved path of the link's target.
    """
    try:
        _check_lexically(linkname)
        return _resolve(linkname, symlinks, follow_final=False)
    except _Unsafe as exc:
        raise ArchiveError(
            f"rootfs tarball '{tarball}' member '{name}' is a hard link to '{linkname}', which {exc}; refused"
        ) from None


def _check_lexically(path: str) -> None:
    if path.startswith("/"):
        raise _Unsafe("has an absolute path")
    normalized = posixpath.normpath(path)
    if normalized == ".." or normalized.startswith("../"):
        raise _Unsafe("escapes the destination")


def _resolve(path: str, symlinks: Mapping[str, str], *, follow_final: bool) -> str:
    """Walk ``path`` component by component as the kernel will, substituting symlinks the archive created.

    Returns the path relative to the destination.  An absolute symlink target is fine to *store* but, once
    followed on the host, leads outside the cache, so following one is refused.
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
                raise _Unsafe("escapes the destination")
            resolved.pop()
            continue
        candidate = "/".join([*resolved, part])
        target = symlinks.get(candidate)
        if target is None or (not pending and not follow_final):
            resolved.append(part)
            continue
        hops += 1
        if hops > _MAX_SYMLINK_HOPS:
            raise _Unsafe("goes through a symlink loop")
        if target.startswith("/"):
            raise _Unsafe(f"goes through symlink '{candidate}' -> '{target}' that points outside the destination")
        pending.extend(target.split("/")[::-1])
    return "/".join(resolved)


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


def _remove_stale_temps(cache_root: Path, key: str) -> None:
    """Temp dirs for ``key`` are only made under its lock, so any seen while holding it belong to a dead process."""
    prefix = f".{key}.tmp-"
    stale: list[Path] = []
    with contextlib.suppress(OSError), os.scandir(cache_root) as entries:
        stale = [Path(e.path) for e in entries if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]
    for path in stale:
        _remove_tree(path)


def _remove_tree(path: Path) -> None:
    """Best-effort removal that also copes with read-only directories from the archive.

    Never follows symlinks while making directories writable: as root, a chmod through ``etc -> /etc`` would
    change the host.
    """
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        return
    with contextlib.suppress(OSError):
        if stat.S_ISDIR(os.lstat(path).st_mode):
            os.chmod(path, 0o700)
    for root, dirs, _files in os.walk(path):
        for name in dirs:
            child = os.path.join(root, name)
            with contextlib.suppress(OSError):
                if stat.S_ISDIR(os.lstat(child).st_mode):
                    os.chmod(child, 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _describe(exc: BaseException) -> str:
    """One line, never empty: tarfile's "could not be opened" message spans several lines."""
    return " ".join(str(exc).split()) or type(exc).__name__
