"""Where an image's files come from: the ``PATH[:TAG]`` reference, the format read from content, and the files.

Four formats are read without a daemon: an OCI image layout directory, the same as a tar (``oci-archive``), a
``docker save`` archive, and a ``docker save`` archive unpacked into a directory.  Everything after this module
reads the image through a :class:`Source`, so the other modules never care whether it is a directory or a tar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Final

from ..untrusted_tar import TAR_ERRORS, Unsafe, check_lexically, complete_members, describe, normalize

__all__ = [
    "DOCKER_ARCHIVE",
    "DOCKER_DIR",
    "OCI_ARCHIVE",
    "OCI_LAYOUT",
    "ImageError",
    "Source",
    "detect",
    "open_source",
    "split_reference",
]

OCI_LAYOUT: Final = "oci-layout"
OCI_ARCHIVE: Final = "oci-archive"
DOCKER_ARCHIVE: Final = "docker-archive"
DOCKER_DIR: Final = "docker-dir"

# index.json, manifests and configs are small; a multi-megabyte one is damage or an attack, not an image.
_MAX_JSON: Final = 16 << 20
_MAX_SYMLINK_HOPS: Final = 40


class ImageError(Exception):
    """The image cannot be used; the message names the file and what is wrong with it."""


def split_reference(reference: str | Path, base: Path | None = None) -> tuple[Path, str | None]:
    """Split ``PATH[:TAG]``.  A path that exists as given has no tag, so paths may contain ':'.

    Relative paths are taken from ``base`` (default: the current directory).
    """
    text = os.fspath(reference)
    base = Path.cwd() if base is None else base
    whole = base / Path(text).expanduser()
    if os.path.lexists(whole):
        return whole, None
    # The tag itself may hold ':' (``busy:v2``, ``docker.io/library/busy:v2``): the longest existing path wins.
    at = len(text)
    while (at := text.rfind(":", 0, at)) > 0:
        path = base / Path(text[:at]).expanduser()
        if text[at + 1 :] and os.path.lexists(path):
            return path, text[at + 1 :]
    raise ImageError(f"image '{text}': '{whole}' does not exist (nor does any PATH of a PATH:TAG split of it)")


def detect(path: Path) -> str | None:
    """The kind of image at ``path``, from its content; None for a plain root tree or rootfs tarball."""
    if path.is_dir():
        if (path / "oci-layout").is_file() and (path / "index.json").is_file():
            return OCI_LAYOUT
        if (path / "manifest.json").is_file():
            return DOCKER_DIR
        return None
    try:
        with tarfile.open(path, "r:*") as tar:
            names = {normalize(m.name) for m in tar}
    except TAR_ERRORS:
        return None
    if "oci-layout" in names and "index.json" in names:
        return OCI_ARCHIVE
    if "manifest.json" in names:
        return DOCKER_ARCHIVE
    return None


class Source:
    """The files of an image, in a directory or a tar archive, addressed by their path inside the image."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        #: One of ``oci-layout``, ``oci-archive``, ``docker-archive``, ``docker-dir``.
        self.kind = kind

    def where(self, name: str) -> str:
        """The file, as error messages name it."""
        raise NotImplementedError

    def exists(self, name: str) -> bool:
        raise NotImplementedError

    def open(self, name: str) -> IO[bytes]:
        raise NotImplementedError

    def read(self, name: str, what: str) -> bytes:
        """A whole small file; ``what`` says what it is for the error message."""
        if not self.exists(name):
            raise ImageError(f"{self.where(name)}: {what} is missing")
        try:
            with self.open(name) as fh:
                data = fh.read(_MAX_JSON + 1)
        except TAR_ERRORS as exc:
            raise ImageError(f"{self.where(name)}: {what} cannot be read: {describe(exc)}") from exc
        if len(data) > _MAX_JSON:
            raise ImageError(f"{self.where(name)}: {what} is larger than {_MAX_JSON >> 20} MiB")
        return data

    def json(self, name: str, what: str, digest: str | None = None) -> Any:
        """A small JSON file, checked against ``digest`` (``sha256:...``) when one is given."""
        data = self.read(name, what)
        if digest is not None and f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise ImageError(f"{self.where(name)}: {what} does not match its digest {digest}")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageError(f"{self.where(name)}: {what} is not valid JSON: {describe(exc)}") from exc


class _DirSource(Source):
    def where(self, name: str) -> str:
        return f"image '{self.path / name}'"

    def _file(self, name: str) -> Path:
        try:
            check_lexically(name)
        except Unsafe as exc:
            raise ImageError(f"image '{self.path}': file name '{name}' {exc}; refused") from None
        return self.path / name

    def exists(self, name: str) -> bool:
        return self._file(name).is_file()

    def open(self, name: str) -> IO[bytes]:
        return open(self._file(name), "rb")


class _TarSource(Source):
    def __init__(self, path: Path, kind: str) -> None:
        super().__init__(path, kind)
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 -- closed by open_source
            members = complete_members(self.tar)
        except TAR_ERRORS as exc:
            with contextlib.suppress(Exception):
                self.tar.close()
            raise ImageError(f"image archive '{path}' is not a complete tar archive: {describe(exc)}") from exc
        self.members = {normalize(m.name): m for m in members}

    def where(self, name: str) -> str:
        return f"image archive '{self.path}' member '{name}'"

    def _member(self, name: str) -> tarfile.TarInfo | None:
        name = normalize(name)
        for _hop in range(_MAX_SYMLINK_HOPS):
            member = self.members.get(name)
            if member is None or not member.issym():
                return member if member is not None and member.isreg() else None
            name = normalize(posixpath.join(posixpath.dirname(name), member.linkname))
        return None

    def exists(self, name: str) -> bool:
        return self._member(name) is not None

    def open(self, name: str) -> IO[bytes]:
        member = self._member(name)
        fh = self.tar.extractfile(member) if member is not None else None
        if fh is None:
            raise ImageError(f"{self.where(name)}: is missing")
        return fh


@contextlib.contextmanager
def open_source(path: Path, kind: str) -> Iterator[Source]:
    """The files of the image at ``path``, of the ``kind`` :func:`detect` found."""
    if kind in (OCI_LAYOUT, DOCKER_DIR):
        yield _DirSource(path, kind)
        return
    source = _TarSource(path, kind)
    try:
        yield source
    finally:
        source.tar.close()
