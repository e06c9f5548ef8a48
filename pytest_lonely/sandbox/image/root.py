"""The merged root: an image's layers flattened into the one directory the root-filesystem plan takes.

The tree (``<cache>/roots/sha256/<config hex>``) is made of hard links into the layer cache, so images sharing a
base layer share its inodes and its disk.  It is keyed by the config digest, which pins every diff_id and so the
whole tree, and built once by :func:`..cache.build_once` like the layers themselves.
"""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Sequence
from pathlib import Path

from ..cache import build_once, remove_tree
from ..untrusted_tar import describe
from .layer import changes
from .source import ImageError

__all__ = ["merged_root"]


def merged_root(
    image_path: Path, config_digest: str, layer_dirs: Sequence[Path], cache_root: Path
) -> tuple[Path, bool]:
    """(the merged tree of the unpacked ``layer_dirs``, lowest first; True if this call built it)."""
    directory = cache_root / "roots" / "sha256"
    what = f"image '{image_path}' (config {config_digest})"
    return build_once(
        directory,
        config_digest.split(":", 1)[1],
        lambda tmp: _merge(layer_dirs, tmp),
        unusable=lambda exc: ImageError(f"{what}: cache directory '{directory}' is not usable: {exc}"),
        failed=lambda exc: ImageError(f"{what}: cannot build the root in '{directory}': {describe(exc)}"),
        errors=(OSError, ValueError, KeyError),
    )


def _merge(layer_dirs: Sequence[Path], root: Path) -> None:
    modes: dict[Path, os.stat_result] = {}
    for layer_dir in layer_dirs:
        whiteouts, opaque = changes(layer_dir)
        _apply_layer(layer_dir / "fs", root, whiteouts, opaque, modes)
    # Directory modes last and deepest first: a read-only directory of a lower layer must not stop an
    # unprivileged caller from adding the upper layers' entries to it.
    for path in sorted(modes, key=lambda p: len(p.parts), reverse=True):
        if os.path.lexists(path) and stat.S_ISDIR(os.lstat(path).st_mode):
            _copy_meta(modes[path], path)


def _real_dir(root: Path, rel: str) -> Path | None:
    """``root/rel`` if every component is a real directory (never a symlink), else None."""
    path = root
    for part in rel.split("/"):
        if part in ("", "."):
            continue
        path = path / part
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                return None
        except FileNotFoundError:
            return None
    return path


def _remove(path: Path) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        remove_tree(path)
    else:
        os.unlink(path)


def _apply_layer(
    fs: Path, root: Path, whiteouts: Sequence[str], opaque: Sequence[str], modes: dict[Path, os.stat_result]
) -> None:
    """Apply one changeset the way overlayfs shows it: whiteouts and opaque dirs hide lower entries first, then
    the layer's entries are added (a directory merges into a lower directory, anything else replaces)."""
    for rel in opaque:
        target = _real_dir(root, rel)
        if target is not None:
            for child in os.listdir(target):
                _remove(target / child)
    for rel in whiteouts:
        parent = _real_dir(root, posixpath.dirname(rel))
        if parent is not None:
            _remove(parent / posixpath.basename(rel))
    _merge_dir(fs, root, modes, is_root=True)


def _merge_dir(src: Path, dst: Path, modes: dict[Path, os.stat_result], *, is_root: bool = False) -> None:
    st = os.lstat(src)
    if not is_root:
        try:
            existing = os.lstat(dst)
            if not stat.S_ISDIR(existing.st_mode):
                os.unlink(dst)
                os.mkdir(dst)
        except FileNotFoundError:
            os.mkdir(dst)
    modes[dst] = st  # the topmost layer's directory wins, as in overlayfs
    with os.scandir(src) as entries:
        for entry in entries:
            child_st = entry.stat(follow_symlinks=False)
            target = dst / entry.name
            if stat.S_ISDIR(child_st.st_mode):
                _merge_dir(Path(entry.path), target, modes)
                continue
            if stat.S_ISCHR(child_st.st_mode) and child_st.st_rdev == 0:
                continue  # an overlayfs whiteout, already applied from meta.json
            _remove(target)
            os.link(entry.path, target, follow_symlinks=False)


def _copy_meta(st: os.stat_result, dst: Path) -> None:
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    if os.geteuid() == 0:
        os.lchown(dst, st.st_uid, st.st_gid)
