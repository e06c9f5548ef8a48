"""Where a layer is unpacked: fetched from the image, decompressed and verified, extracted with its whiteouts.

Each layer is unpacked exactly once, into a content-addressed cache shared by every xdist worker and every later
session (``<cache>/layers/sha256/<diff_id hex>/fs``), in the form containerd's overlay snapshotter uses: OCI
whiteouts (``.wh.NAME``) become overlayfs whiteouts (0:0 character devices) and opaque markers
(``.wh..wh..opq``) become the ``trusted.overlay.opaque`` xattr, so the ordered layer directories can be stacked
directly as an overlay's ``lowerdir``.  Beside ``fs`` a ``meta.json`` records the whiteouts, which
:mod:`.root` applies when it merges the layers.

Layers are keyed by their *uncompressed* digest, and both digests are verified while the blob streams through.
A layer is untrusted input that the parent (possibly root) unpacks on the host, so it goes through
:mod:`..untrusted_tar`'s vetting, and every whiteout must stay inside the layer too.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import importlib
import json
import os
import posixpath
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Final, NamedTuple

from .. import untrusted_tar
from ..cache import build_once
from ..untrusted_tar import CHUNK, TAR_ERRORS, Unsafe, check_lexically, describe, normalize
from .manifest import Layer
from .source import ImageError, Source

__all__ = ["Unpacked", "changes", "unpack_layer"]

_WHITEOUT: Final = ".wh."
_OPAQUE: Final = ".wh..wh..opq"
_OPAQUE_XATTR: Final = "trusted.overlay.opaque"
_META: Final = "meta.json"


class Unpacked(NamedTuple):
    #: The layer's cache directory (``fs`` and ``meta.json`` in it).
    path: Path
    #: True if this call unpacked it (False: an earlier call or another process did).
    unpacked: bool
    #: True if its whiteouts are overlayfs whiteouts, so ``fs`` stacks as a lowerdir (needs root).
    overlay: bool


def unpack_layer(source: Source, layer: Layer, cache_root: Path) -> Unpacked:
    """The layer's directory in the cache, unpacking it from ``source`` first if no process has yet."""
    hexdigest = layer.diff_id.split(":", 1)[1]
    directory = cache_root / "layers" / "sha256"
    what = f"{source.where(layer.blob)} (layer {layer.diff_id})"
    dest, did = build_once(
        directory,
        hexdigest,
        lambda tmp: _build(source, layer, tmp, what),
        unusable=lambda exc: ImageError(f"{what}: cache directory '{directory}' is not usable: {exc}"),
        failed=lambda exc: ImageError(f"{what}: cannot unpack into '{directory}': {describe(exc)}"),
    )
    try:
        meta = json.loads((dest / _META).read_text())
        return Unpacked(dest, did, bool(meta["overlay"]))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{what}: cached layer '{dest}' is damaged ({describe(exc)}); delete it") from exc


def changes(layer_dir: Path) -> tuple[list[str], list[str]]:
    """(whiteouts, opaque directories) of an unpacked layer.  Raises OSError, ValueError or KeyError."""
    meta = json.loads((layer_dir / _META).read_text())
    return list(meta["whiteouts"]), list(meta["opaque"])


def _build(source: Source, layer: Layer, tmp: Path, what: str) -> None:
    started = time.monotonic()
    tar_path = tmp / "layer.tar"
    _decompress(source, layer, tar_path, what)
    fs = tmp / "fs"
    fs.mkdir(mode=0o755)
    whiteouts, opaque, overlay = _extract(tar_path, fs, what)
    tar_path.unlink()
    meta = {
        "diff_id": layer.diff_id,
        "whiteouts": whiteouts,
        "opaque": opaque,
        "overlay": overlay,
        "seconds": round(time.monotonic() - started, 6),
    }
    (tmp / _META).write_text(json.dumps(meta))


# --- decompress and verify --------------------------------------------------------------------------------------


class _Hashing:
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.hash.update(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def drain(self) -> str:
        while self.read(CHUNK):
            pass
        return f"sha256:{self.hash.hexdigest()}"


def _zstd_reader(raw: Any) -> Any | None:
    """A zstd decompressing reader from the stdlib (3.14) or the ``zstandard`` module; None if neither exists."""
    try:
        stdlib = importlib.import_module("compression.zstd")
        return stdlib.ZstdFile(raw)
    except ImportError:
        pass
    try:
        zstandard = importlib.import_module("zstandard")
    except ImportError:
        return None
    return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)


def _sniff(head: bytes) -> str:
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    return "none"


def _decompress(source: Source, layer: Layer, out_path: Path, what: str) -> None:
    """Write the layer's tar to ``out_path``, verifying the stored and the uncompressed digest on the way."""
    compression = layer.compression
    try:
        with source.open(layer.blob) as fh:
            if compression == "detect":
                compression = _sniff(fh.read(4))
            if compression == "zstd" and _zstd_reader(_Hashing(fh)) is None:
                _decompress_with_binary(source, layer, out_path, what)
                return
        with source.open(layer.blob) as fh, open(out_path, "wb") as out:
            raw = _Hashing(fh)
            reader: Any = raw
            if compression == "gzip":
                reader = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[call-overload]
            elif compression == "zstd":
                reader = _zstd_reader(raw)
            plain = hashlib.sha256()
            while chunk := reader.read(CHUNK):
                plain.update(chunk)
                out.write(chunk)
            stored = raw.drain()
    except ImageError:
        raise
    except Exception as exc:  # decompressors raise their own types (zstd.ZstdError, gzip.BadGzipFile, EOFError)
        raise ImageError(f"{what}: the {compression} layer cannot be read: {describe(exc)}") from exc
    _verify(layer, stored, f"sha256:{plain.hexdigest()}", what)


def _decompress_with_binary(source: Source, layer: Layer, out_path: Path, what: str) -> None:
    """No zstd module: hash the blob while feeding it to the ``zstd`` program, then hash what it wrote."""
    binary = shutil.which("zstd")
    if binary is None:
        raise ImageError(
            f"{what}: is zstd-compressed, and there is no zstd decompressor: use Python >= 3.14, "
            "'pip install zstandard', or install the zstd program (apt-get install zstd)"
        )
    with source.open(layer.blob) as fh, open(out_path, "wb") as out:
        raw = _Hashing(fh)
        proc = subprocess.Popen([binary, "-d", "-c", "-q"], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        try:
            while chunk := raw.read(CHUNK):
                proc.stdin.write(chunk)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        stored = raw.drain()
        err = proc.stderr.read() if proc.stderr else b""
        if proc.wait() != 0:
            raise ImageError(
                f"{what}: the zstd layer cannot be read: {describe(Exception(err.decode(errors='replace')))}"
            )
    plain = hashlib.sha256()
    with open(out_path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            plain.update(chunk)
    _verify(layer, stored, f"sha256:{plain.hexdigest()}", what)


def _verify(layer: Layer, stored: str, plain: str, what: str) -> None:
    if layer.digest is not None and stored != layer.digest:
        raise ImageError(f"{what}: digest mismatch: the blob hashes to {stored}, the manifest says {layer.digest}")
    if plain != layer.diff_id:
        raise ImageError(
            f"{what}: digest mismatch: the uncompressed layer hashes to {plain}, the config says {layer.diff_id}"
        )


# --- extract, with whiteouts ------------------------------------------------------------------------------------


def _extract(tar_path: Path, fs: Path, what: str) -> tuple[list[str], list[str], bool]:
    """Unpack one layer's changeset; returns (whiteouts, opaque directories, True if in overlayfs form)."""
    whiteouts: list[str] = []
    opaque: list[str] = []
    try:
        with tarfile.open(tar_path, "r:") as tar:
            regular = []
            for member in untrusted_tar.complete_members(tar):
                name = normalize(member.name)
                base = posixpath.basename(name)
                if base.startswith(_WHITEOUT):
                    _check_whiteout(name, what)
                    parent = posixpath.dirname(name)
                    if base == _OPAQUE:
                        opaque.append(parent or ".")
                    elif not base.startswith(".wh..wh."):  # aufs bookkeeping (.wh..wh.plnk): nothing to apply
                        whiteouts.append(posixpath.join(parent, base[len(_WHITEOUT) :]))
                    continue
                regular.append(member)
            try:
                selected = untrusted_tar.vet(regular, what)
            except untrusted_tar.Refused as exc:
                raise ImageError(str(exc)) from None
            symlinks = {normalize(m.name): m.linkname for m in selected if m.issym()}
            for path in whiteouts + opaque:
                try:
                    untrusted_tar.resolve(path, symlinks, follow_final=False)
                except Unsafe as exc:
                    raise ImageError(f"{what}: whiteout for '{path}' {exc}; refused") from None
            untrusted_tar.extract(tar, selected, fs)
    except ImageError:
        raise
    except TAR_ERRORS as exc:
        raise ImageError(f"{what}: the layer is not a readable tar archive: {describe(exc)}") from exc
    return whiteouts, opaque, _overlay_form(fs, whiteouts, opaque)


def _check_whiteout(name: str, what: str) -> None:
    try:
        check_lexically(name)
    except Unsafe as exc:
        raise ImageError(f"{what}: member '{name}' {exc}; refused") from None
    if posixpath.basename(name) in (".wh.", ".wh..", ".wh..."):
        raise ImageError(f"{what}: member '{name}' is a whiteout of nothing; refused")


def _overlay_form(fs: Path, whiteouts: Sequence[str], opaque: Sequence[str]) -> bool:
    """Turn OCI whiteouts into overlayfs ones, so the layer stacks as a lowerdir.  Needs root; False without it.

    A 0:0 character device is overlayfs's whiteout: it opens nothing, so it is not a device node in the sense the
    safety rules forbid.
    """
    try:
        for path in whiteouts:
            target = fs / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if not os.path.lexists(target):
                os.mknod(target, stat.S_IFCHR | 0o000, os.makedev(0, 0))
        for path in opaque:
            target = fs / path
            target.mkdir(parents=True, exist_ok=True)
            os.setxattr(target, _OPAQUE_XATTR, b"y", follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True
