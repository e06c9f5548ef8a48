"""Unpack a rootfs tarball once per content into a shared, content-addressed cache.

Every xdist worker and every session asks for the same rootfs, so unpacking it per test would dominate start-up.
The tree therefore lives under the sha256 of the tarball's bytes (so copies and renames of one tarball share it),
built once by :func:`.cache.build_once`.  The tarball is untrusted input that the parent (possibly root) unpacks
on the host, so it goes through :mod:`.untrusted_tar`'s vetting before anything is written.
"""

from __future__ import annotations

import hashlib
import stat
import tarfile
from pathlib import Path
from typing import Final

from . import untrusted_tar
from .cache import FileMemo, build_once, file_identity
from .untrusted_tar import TAR_ERRORS, describe

__all__ = ["ArchiveError", "unpack"]

_KEY_HEX: Final = 24


class ArchiveError(Exception):
    """The rootfs tarball cannot be used; the message names the tarball and what is wrong with it."""


def unpack(tarball: Path, cache_root: Path, *, memo: FileMemo[str] | None = None) -> tuple[Path, bool]:
    """Return (directory holding the unpacked tree, True if this call did the extraction).

    The directory is shared by every process using the same cache, so callers must treat it as read-only.
    ``memo`` keeps the tarball's content key while the file is unchanged: hashing a large rootfs costs far more
    than a stat.
    """
    key = _content_key(tarball, memo)[:_KEY_HEX]
    return build_once(
        cache_root,
        key,
        lambda tmp: _extract(tarball, tmp),
        unusable=lambda exc: ArchiveError(
            f"rootfs tarball '{tarball}' cannot be unpacked: cache directory '{cache_root}' is not usable: {exc}"
        ),
        failed=lambda exc: ArchiveError(f"rootfs tarball '{tarball}' cannot be unpacked into '{cache_root}': {exc}"),
    )


def _content_key(tarball: Path, memo: FileMemo[str] | None) -> str:
    """Name the tree by content, not path, so copies and renames of one tarball share a single unpacked tree."""
    try:
        resolved = tarball.resolve()
        st = resolved.stat()
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python < 3.13
        raise ArchiveError(f"rootfs tarball '{tarball}' cannot be read: {describe(exc)}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise ArchiveError(f"rootfs tarball '{tarball}' is not a regular file")
    memo_key = file_identity(resolved, st)
    cached = memo.get(memo_key) if memo is not None else None
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    try:
        with open(resolved, "rb") as fh:
            while chunk := fh.read(untrusted_tar.CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ArchiveError(f"rootfs tarball '{tarball}' cannot be read: {describe(exc)}") from exc
    key = digest.hexdigest()
    if memo is not None:
        memo.put(memo_key, key)
    return key


def _extract(tarball: Path, dest: Path) -> None:
    problem = "is not a readable tar archive"
    what = f"rootfs tarball '{tarball}'"
    try:
        with tarfile.open(tarball, "r:*") as tar:
            members = untrusted_tar.complete_members(tar)
            try:
                selected = untrusted_tar.vet(members, what)
            except untrusted_tar.Refused as exc:
                raise ArchiveError(str(exc)) from None
            problem = "cannot be unpacked"
            untrusted_tar.extract(tar, selected, dest)
    except TAR_ERRORS as exc:
        raise ArchiveError(f"{what} {problem}: {describe(exc)}") from exc
