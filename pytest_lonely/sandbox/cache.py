"""The on-disk cache every process shares, and the in-process memo its owner keeps in front of it.

Every xdist worker and every later session asks for the same unpacked trees (rootfs tarballs, image layers,
merged image roots), so each is built once, under a content key.  Building them concurrently into one place would
let a worker boot a half-written tree, so :func:`build_once` builds in a private temp directory beside the
destination while holding a per-key file lock, and the tree only becomes visible through one atomic ``rename``.

Asking the disk again costs a hash or a re-read of an archive's headers; the parent asks once per test.
:class:`FileMemo` remembers the answers for as long as the file they came from is unchanged.  It is plain state
of whoever creates it (the adapter's per-run session), not of this module, so what a forked child inherits is
visible at the call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["FileMemo", "build_once", "file_identity", "remove_tree"]

V = TypeVar("V")


def build_once(
    directory: Path,
    key: str,
    build: Callable[[Path], None],
    *,
    unusable: Callable[[OSError], Exception],
    failed: Callable[[BaseException], Exception],
    errors: tuple[type[BaseException], ...] = (OSError,),
) -> tuple[Path, bool]:
    """Return (``directory/key``, True if this call built it), building it with ``build(tmp)`` if it is missing.

    ``build`` fills a fresh 0755 directory beside the destination; it is renamed into place only when ``build``
    returns, and removed when it raises.  The caller phrases the errors: ``unusable`` for a cache directory (or
    its lock) that cannot be used, ``failed`` for a temp directory that cannot be made or a ``build`` that
    raised one of ``errors``; anything else ``build`` raises passes through unchanged.
    """
    dest = directory / key
    # Fast path without the lock: ``dest`` only ever appears by an atomic rename of a complete tree.
    if dest.is_dir():
        return dest, False
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = _lock(directory / f"{key}.lock")
    except OSError as exc:
        raise unusable(exc) from exc
    try:
        if dest.is_dir():  # another process finished while we waited for the lock
            return dest, False
        _remove_stale_temps(directory, key)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=directory))
        except OSError as exc:
            raise failed(exc) from exc
        try:
            # mkdtemp's 0700 would make "/" untraversable for non-root users in the container; ``build`` may
            # still set another mode (a rootfs tarball's "." member does).
            tmp.chmod(0o755)
            build(tmp)
            os.rename(tmp, dest)
        except errors as exc:
            remove_tree(tmp)
            raise failed(exc) from exc
        except BaseException:
            remove_tree(tmp)
            raise
        return dest, True
    finally:
        os.close(lock)  # closing the file releases the flock


def _lock(path: Path) -> int:
    """Hold an exclusive ``flock`` on ``path`` (made if missing); close the returned fd to release it.

    ``fcntl.flock`` rather than the filelock package: importing filelock
    registers ``os.register_at_fork`` hooks that run Python around every fork
    of the process, a container's included (measured: +0.5 ms of CPU per fork).
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_stale_temps(directory: Path, key: str) -> None:
    """Temp dirs for ``key`` are only made under its lock, so any seen while holding it belong to a dead process."""
    prefix = f".{key}.tmp-"
    stale: list[Path] = []
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        stale = [Path(e.path) for e in entries if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]
    for path in stale:
        remove_tree(path)


def remove_tree(path: Path) -> None:
    """Best-effort removal that also copes with read-only directories from an archive.

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


def file_identity(resolved: Path, st: os.stat_result) -> tuple[str, int, int, int, int]:
    """(path, device, inode, size, mtime): a rewritten file changes size or mtime, a replaced one its inode."""
    return (str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class FileMemo(Generic[V]):
    """Answers this process already worked out from files, keyed by :func:`file_identity` and what else they
    depend on.  A cached answer must cost a stat, not a re-read.  Its owner decides how long it lives."""

    def __init__(self) -> None:
        self._answers: dict[Hashable, V] = {}

    def get(self, key: Hashable) -> V | None:
        return self._answers.get(key)

    def put(self, key: Hashable, value: V) -> None:
        self._answers[key] = value

    def clear(self) -> None:
        """Forget everything, as a new process would."""
        self._answers.clear()

    def __len__(self) -> int:
        return len(self._answers)
