"""Container images as root filesystems: OCI image layouts and ``docker save`` archives, read without a daemon.

An image is a stack of layer tarballs plus a config.  Each layer is unpacked exactly once, into a content-addressed
cache shared by every xdist worker and every later session (``<cache>/layers/sha256/<hex>/fs``), in the form
containerd's overlay snapshotter uses: OCI whiteouts (``.wh.NAME``) become overlayfs whiteouts (0:0 character
devices) and opaque markers (``.wh..wh..opq``) become the ``trusted.overlay.opaque`` xattr, so the ordered layer
directories can be stacked directly as an overlay's ``lowerdir``.  Because the root-filesystem plan takes one
directory, the layers are also merged into a single tree (``<cache>/roots/sha256/<config hex>``) made of hard links
into the layer cache: images sharing a base layer share its inodes and its disk.

Layers are keyed by their *uncompressed* digest (the config's ``rootfs.diff_ids``), not by the compressed blob's,
so the same layer shipped gzip-compressed in an OCI layout and uncompressed in a ``docker save`` archive is unpacked
once.  Both digests are verified while the blob streams through.  The merged root is keyed by the config digest,
which pins every diff_id and so the whole tree, for the same reason.

Everything in an image is untrusted input that the parent (possibly root) unpacks on the host, so each layer goes
through the same vetting as :mod:`.archive`: no member escapes, no device nodes, no links out, no setuid bits.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import importlib
import json
import os
import platform
import posixpath
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Final

import filelock

from .archive import (
    _HAS_FILTERS,
    _TAR_ERRORS,
    ArchiveError,
    _check_lexically,
    _describe,
    _remove_stale_temps,
    _remove_tree,
    _require_complete,
    _resolve,
    _rootfs_filter,
    _Unsafe,
    _vet,
)

__all__ = ["Image", "ImageError", "detect", "goarch", "open_image", "split_reference"]

_CHUNK: Final = 1 << 20
# index.json, manifests and configs are small; a multi-megabyte one is damage or an attack, not an image.
_MAX_JSON: Final = 16 << 20
_DIGEST: Final = re.compile(r"sha256:([0-9a-f]{64})")
_WHITEOUT: Final = ".wh."
_OPAQUE: Final = ".wh..wh..opq"
_OPAQUE_XATTR: Final = "trusted.overlay.opaque"

OCI_LAYOUT: Final = "oci-layout"
OCI_ARCHIVE: Final = "oci-archive"
DOCKER_ARCHIVE: Final = "docker-archive"
DOCKER_DIR: Final = "docker-dir"

_INDEX_TYPES: Final = frozenset(
    {"application/vnd.oci.image.index.v1+json", "application/vnd.docker.distribution.manifest.list.v2+json"}
)
_MANIFEST_TYPES: Final = frozenset(
    {"application/vnd.oci.image.manifest.v1+json", "application/vnd.docker.distribution.manifest.v2+json"}
)
# Layer media type -> compression.  Docker's schema2 types appear in OCI layouts copied from registries.
_LAYER_TYPES: Final[Mapping[str, str]] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
}
_GOARCH: Final[Mapping[str, str]] = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "armv6l": "arm",
    "armv8l": "arm",
    "i386": "386",
    "i686": "386",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "mips64": "mips64le",
    "loongarch64": "loong64",
}

# (kind, resolved source, st_dev, st_ino, st_size, st_mtime_ns, tag, cache root) -> Image.  A cached open must
# cost a stat, not a re-read of the archive's headers: the parent asks once per test.
_memo: dict[tuple[object, ...], Image] = {}


class ImageError(Exception):
    """The image cannot be used; the message names the file and what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class Image:
    """One image, unpacked.  Every path is in a cache shared with other processes: treat it as read-only."""

    #: The reference as the user gave it, and the path and tag it was split into.
    reference: str
    path: Path
    tag: str | None
    #: One of ``oci-layout``, ``oci-archive``, ``docker-archive``, ``docker-dir``.
    kind: str
    #: ``sha256:...`` of the chosen manifest; None for ``docker save`` archives, which carry no manifest blob.
    manifest_digest: str | None
    #: ``sha256:...`` of the config (Docker's image ID); it pins every layer, so it keys the merged root.
    config_digest: str
    #: ``os/architecture[/variant]`` from the config.
    platform: str
    #: From the config: ``Env`` as (name, value) pairs, ``WorkingDir`` and ``User`` ("" when unset).
    env: tuple[tuple[str, str], ...]
    working_dir: str
    user: str
    #: One directory holding the merged tree (hard links into the layer cache).
    root: Path
    #: The layer directories, lowest first, in overlayfs form (see ``overlay_ready`` and :meth:`lowerdir`).
    layers: tuple[Path, ...]
    #: False when whiteouts could not be made as overlayfs whiteouts (not root): then only ``root`` is faithful.
    overlay_ready: bool
    #: Seconds this open spent unpacking layers and merging the root; 0.0 when everything was cached.
    unpack_seconds: float
    #: Diff IDs of the layers this open unpacked itself (empty when another process or an earlier open did).
    unpacked_layers: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        """Same rule as for a root directory: a tree with ``usr/`` brings its own system, a skeleton borrows."""
        return (self.root / "usr").is_dir()

    def lowerdir(self) -> str:
        """The overlayfs ``lowerdir=`` value: the topmost layer comes first."""
        return ":".join(str(p) for p in reversed(self.layers))


# --- public entry points ----------------------------------------------------------------------------------------


def goarch(machine: str | None = None) -> str:
    """Map ``platform.machine()`` to the GOARCH name image indexes use."""
    machine = platform.machine() if machine is None else machine
    return _GOARCH.get(machine.lower(), machine.lower())


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
            names = {_norm(m.name) for m in tar}
    except _TAR_ERRORS:
        return None
    if "oci-layout" in names and "index.json" in names:
        return OCI_ARCHIVE
    if "manifest.json" in names:
        return DOCKER_ARCHIVE
    return None


def open_image(reference: str | Path, cache_root: Path, *, base: Path | None = None) -> Image:
    """Find the image ``reference`` names, unpack what is not cached yet, and describe it.

    ``cache_root`` is the project's cache directory (``session.cache_dir()``); layers and merged roots live under
    ``layers/`` and ``roots/`` in it.  Raises :class:`ImageError` for anything wrong with the image.
    """
    path, tag = split_reference(reference, base)
    try:
        resolved = path.resolve()
        # For a directory, its top file stands for it: tools rewrite index.json / manifest.json on every change.
        top = [resolved / n for n in ("index.json", "manifest.json") if (resolved / n).is_file()]
        st = (top[0] if top else resolved).stat()
    except (OSError, RuntimeError) as exc:
        raise ImageError(f"image '{reference}': '{path}' cannot be read: {_describe(exc)}") from exc
    memo_key = (str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, tag, str(cache_root))
    cached = _memo.get(memo_key)
    if cached is not None and cached.root.is_dir() and all(p.is_dir() for p in cached.layers):
        return dataclasses.replace(cached, unpack_seconds=0.0, unpacked_layers=())
    kind = detect(resolved)
    if kind is None:
        raise ImageError(
            f"image '{reference}': '{path}' is neither an OCI image layout (oci-layout and index.json), "
            "an OCI layout tar, nor a 'docker save' archive (manifest.json)"
        )
    with _open_source(resolved, kind) as source:
        image = _load(source, str(reference), path, tag, kind=kind, cache_root=cache_root)
    _memo[memo_key] = image
    return image


# --- reading the image's files ----------------------------------------------------------------------------------


class _Source:
    """The files of an image, in a directory or a tar archive, addressed by their path inside the image."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def where(self, name: str) -> str:
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
        except _TAR_ERRORS as exc:
            raise ImageError(f"{self.where(name)}: {what} cannot be read: {_describe(exc)}") from exc
        if len(data) > _MAX_JSON:
            raise ImageError(f"{self.where(name)}: {what} is larger than {_MAX_JSON >> 20} MiB")
        return data

    def json(self, name: str, what: str, digest: str | None = None) -> Any:
        data = self.read(name, what)
        if digest is not None and f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
            raise ImageError(f"{self.where(name)}: {what} does not match its digest {digest}")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ImageError(f"{self.where(name)}: {what} is not valid JSON: {_describe(exc)}") from exc


class _DirSource(_Source):
    def where(self, name: str) -> str:
        return f"image '{self.path / name}'"

    def _file(self, name: str) -> Path:
        try:
            _check_lexically(name)
        except _Unsafe as exc:
            raise ImageError(f"image '{self.path}': file name '{name}' {exc}; refused") from None
        return self.path / name

    def exists(self, name: str) -> bool:
        return self._file(name).is_file()

    def open(self, name: str) -> IO[bytes]:
        return open(self._file(name), "rb")


class _TarSource(_Source):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        try:
            self.tar = tarfile.open(path, "r:*")  # noqa: SIM115 -- closed by _open_source
            members = self.tar.getmembers()
            _require_complete(self.tar, members)
        except _TAR_ERRORS as exc:
            with contextlib.suppress(Exception):
                self.tar.close()
            raise ImageError(f"image archive '{path}' is not a complete tar archive: {_describe(exc)}") from exc
        self.members = {_norm(m.name): m for m in members}

    def where(self, name: str) -> str:
        return f"image archive '{self.path}' member '{name}'"

    def _member(self, name: str) -> tarfile.TarInfo | None:
        name = _norm(name)
        for _hop in range(40):
            member = self.members.get(name)
            if member is None or not member.issym():
                return member if member is not None and member.isreg() else None
            name = _norm(posixpath.join(posixpath.dirname(name), member.linkname))
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
def _open_source(path: Path, kind: str) -> Iterator[_Source]:
    if kind in (OCI_LAYOUT, DOCKER_DIR):
        yield _DirSource(path)
        return
    source = _TarSource(path)
    try:
        yield source
    finally:
        source.tar.close()


def _norm(name: str) -> str:
    return posixpath.normpath(name).lstrip("/") if name not in ("", ".", "./") else "."


# --- choosing the image -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layer:
    blob: str  # path inside the source
    digest: str | None  # of the blob as stored, when the format names it
    diff_id: str  # of the uncompressed tar
    compression: str  # none, gzip, zstd, or "detect" (docker save archives do not say)


def _load(source: _Source, reference: str, path: Path, tag: str | None, *, kind: str, cache_root: Path) -> Image:
    if kind in (OCI_LAYOUT, OCI_ARCHIVE):
        manifest_digest, config_digest, config, layers = _choose_oci(source, tag)
    else:
        manifest_digest = None
        config_digest, config, layers = _choose_docker(source, tag)
    env, working_dir, user, plat = _read_config(source, config)
    started = time.monotonic()
    layer_dirs: list[Path] = []
    unpacked: list[str] = []
    overlay_ready = True
    for layer in layers:
        layer_dir, did, overlay = _layer(source, layer, cache_root)
        layer_dirs.append(layer_dir)
        overlay_ready = overlay_ready and overlay
        if did:
            unpacked.append(layer.diff_id)
    root, built = _merged_root(source, config_digest, layer_dirs, cache_root)
    seconds = time.monotonic() - started if unpacked or built else 0.0
    return Image(
        reference=reference,
        path=path,
        tag=tag,
        kind=kind,
        manifest_digest=manifest_digest,
        config_digest=config_digest,
        platform=plat,
        env=env,
        working_dir=working_dir,
        user=user,
        root=root,
        layers=tuple(p / "fs" for p in layer_dirs),
        overlay_ready=overlay_ready,
        unpack_seconds=seconds,
        unpacked_layers=tuple(unpacked),
    )


def _names(annotations: Mapping[str, Any]) -> set[str]:
    """Every spelling a user may write for one image's tag: ``v2``, ``busy:v2``, ``docker.io/library/busy:v2``."""
    names: set[str] = set()
    for key in ("org.opencontainers.image.ref.name", "io.containerd.image.name"):
        value = annotations.get(key)
        if isinstance(value, str) and value:
            names |= _spellings(value)
    return names


def _spellings(ref: str) -> set[str]:
    out = {ref}
    for prefix in ("docker.io/library/", "docker.io/", "library/"):
        if ref.startswith(prefix):
            out.add(ref[len(prefix) :])
    _name, sep, tag = ref.rpartition(":")
    if sep and "/" not in tag:
        out.add(tag)
    return out


def _shown(ref: Mapping[str, Any]) -> str:
    value = ref.get("org.opencontainers.image.ref.name") or ref.get("io.containerd.image.name")
    return str(value) if value else "(untagged)"


def _descriptor(source: _Source, entry: object, where: str) -> tuple[str, str, Mapping[str, Any]]:
    """(mediaType, digest, annotations) of a descriptor, or an error naming the file."""
    if not isinstance(entry, dict):
        raise ImageError(f"{where}: a descriptor is not an object: {entry!r}")
    media = entry.get("mediaType")
    digest = entry.get("digest")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ImageError(f"{where}: descriptor digest {digest!r} is not 'sha256:' and 64 hex digits")
    annotations = entry.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ImageError(f"{where}: descriptor annotations are not an object")
    return str(media), digest, annotations


def _blob(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/", 1)


def _platform_of(entry: Mapping[str, Any]) -> str | None:
    plat = entry.get("platform")
    if not isinstance(plat, dict):
        return None
    text = f"{plat.get('os', '?')}/{plat.get('architecture', '?')}"
    return text + (f"/{plat['variant']}" if plat.get("variant") else "")


def _pick_platform(entries: list[dict[str, Any]], where: str) -> dict[str, Any]:
    """Indexes list one manifest per platform; take this machine's (linux, GOARCH), as a runtime would."""
    arch = goarch()
    fits = [
        e
        for e in entries
        if isinstance(e.get("platform"), dict)
        and e["platform"].get("os", "linux") == "linux"
        and e["platform"].get("architecture") == arch
    ]
    if not fits:
        have = ", ".join(sorted({p for e in entries if (p := _platform_of(e))})) or "none"
        raise ImageError(f"{where}: no image for this machine's platform linux/{arch}; the index has: {have}")
    if len(fits) > 1 and arch == "arm":
        wanted = "v" + platform.machine()[4:5] if platform.machine().startswith("armv") else ""
        fits = [e for e in fits if e["platform"].get("variant") == wanted] or fits
    return fits[0]


def _choose_oci(source: _Source, tag: str | None) -> tuple[str, str, Mapping[str, Any], list[_Layer]]:
    layout = source.json("oci-layout", "the oci-layout file")
    if not isinstance(layout, dict) or not isinstance(layout.get("imageLayoutVersion"), str):
        raise ImageError(f"{source.where('oci-layout')}: has no imageLayoutVersion")
    index = source.json("index.json", "the image index")
    where = source.where("index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise ImageError(f"{where}: has no 'manifests' list")
    if not entries:
        raise ImageError(f"{where}: lists no images")
    for entry in entries:
        _descriptor(source, entry, where)
    if tag is not None:
        chosen = [e for e in entries if tag in _names(e.get("annotations") or {})]
        if not chosen:
            tags = sorted({_shown(e.get("annotations") or {}) for e in entries})
            raise ImageError(f"{where}: no image tagged '{tag}'; the tags are: {', '.join(tags)}")
    else:
        chosen = entries
    if len(chosen) > 1:
        shown = {_shown(e.get("annotations") or {}) for e in chosen}
        if len(shown) > 1 and tag is None:
            raise ImageError(
                f"{where}: holds {len(chosen)} images; name one with PATH:TAG; the tags are: {', '.join(sorted(shown))}"
            )
        entry = _pick_platform(chosen, where)
    else:
        entry = chosen[0]
    for _depth in range(8):
        media, digest, _ = _descriptor(source, entry, where)
        if media in _MANIFEST_TYPES:
            return (digest, *_read_manifest(source, digest))
        if media not in _INDEX_TYPES:
            raise ImageError(
                f"{where}: unsupported media type '{media}' for {digest}; "
                f"supported are: {', '.join(sorted(_MANIFEST_TYPES | _INDEX_TYPES))}"
            )
        where = source.where(_blob(digest))
        nested = source.json(_blob(digest), "image index", digest)
        children = nested.get("manifests") if isinstance(nested, dict) else None
        if not isinstance(children, list) or not children:
            raise ImageError(f"{where}: has no 'manifests' list")
        entry = children[0] if len(children) == 1 else _pick_platform(children, where)
    raise ImageError(f"{where}: image indexes nest more than 8 deep")


def _read_manifest(source: _Source, digest: str) -> tuple[str, Mapping[str, Any], list[_Layer]]:
    name = _blob(digest)
    where = source.where(name)
    manifest = source.json(name, "image manifest", digest)
    if not isinstance(manifest, dict):
        raise ImageError(f"{where}: the manifest is not an object")
    config_desc = manifest.get("config")
    layer_descs = manifest.get("layers")
    if not isinstance(layer_descs, list):
        raise ImageError(f"{where}: the manifest has no 'layers' list")
    _, config_digest, _ = _descriptor(source, config_desc, where)
    config = source.json(_blob(config_digest), "image config", config_digest)
    diff_ids = _diff_ids(source, _blob(config_digest), config, len(layer_descs))
    layers = []
    for desc, diff_id in zip(layer_descs, diff_ids, strict=True):
        media, layer_digest, _ = _descriptor(source, desc, where)
        compression = _LAYER_TYPES.get(media)
        if compression is None:
            raise ImageError(
                f"{where}: layer {layer_digest} has unsupported media type '{media}'; "
                f"supported are: {', '.join(sorted(_LAYER_TYPES))}"
            )
        if not source.exists(_blob(layer_digest)):
            raise ImageError(f"{source.where(_blob(layer_digest))}: layer blob is missing")
        layers.append(_Layer(_blob(layer_digest), layer_digest, diff_id, compression))
    return config_digest, config, layers


def _diff_ids(source: _Source, name: str, config: object, count: int) -> list[str]:
    where = source.where(name)
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) and _DIGEST.fullmatch(i) for i in ids):
        raise ImageError(f"{where}: the config has no valid rootfs.diff_ids list of 'sha256:' digests")
    if len(ids) != count:
        raise ImageError(f"{where}: the config lists {len(ids)} diff_ids but the image has {count} layers")
    return list(ids)


def _choose_docker(source: _Source, tag: str | None) -> tuple[str, Mapping[str, Any], list[_Layer]]:
    where = source.where("manifest.json")
    entries = source.json("manifest.json", "the 'docker save' manifest")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ImageError(f"{where}: is not a non-empty list of images")

    def tags_of(entry: Mapping[str, Any]) -> list[str]:
        tags = entry.get("RepoTags") or []
        return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []

    if tag is not None:
        chosen = [e for e in entries if any(tag in _spellings(t) for t in tags_of(e))]
        if not chosen:
            known = sorted({t for e in entries for t in tags_of(e)}) or ["(untagged)"]
            raise ImageError(f"{where}: no image tagged '{tag}'; the tags are: {', '.join(known)}")
    else:
        chosen = entries
    if len(chosen) > 1:
        known = sorted({t for e in chosen for t in tags_of(e)}) or ["(untagged)"]
        raise ImageError(
            f"{where}: holds {len(chosen)} images; name one with PATH:TAG; the tags are: {', '.join(known)}"
        )
    entry = chosen[0]
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ImageError(f"{where}: an image has no 'Config' file name or no 'Layers' list")
    data = source.read(config_name, "image config")
    config_digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{source.where(config_name)}: image config is not valid JSON: {_describe(exc)}") from exc
    diff_ids = _diff_ids(source, config_name, config, len(layer_names))
    layers = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        if not isinstance(name, str) or not source.exists(name):
            raise ImageError(f"{source.where(str(name))}: layer file named in manifest.json is missing")
        # Docker >= 25 stores layers as blobs/sha256/<digest of the stored bytes>: verify that too.
        match = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", _norm(name))
        layers.append(_Layer(name, f"sha256:{match.group(1)}" if match else None, diff_id, "detect"))
    return config_digest, config, layers


def _read_config(source: _Source, config: object) -> tuple[tuple[tuple[str, str], ...], str, str, str]:
    if not isinstance(config, dict):
        raise ImageError(f"image '{source.path}': the image config is not an object")
    inner = config.get("config") or {}
    if not isinstance(inner, dict):
        raise ImageError(f"image '{source.path}': the image config's 'config' is not an object")
    env_list = inner.get("Env") or []
    if not isinstance(env_list, list) or not all(isinstance(e, str) for e in env_list):
        raise ImageError(f"image '{source.path}': the image config's Env is not a list of strings")
    env = tuple((name, value) for name, _, value in (e.partition("=") for e in env_list))
    working_dir = inner.get("WorkingDir") or ""
    user = inner.get("User") or ""
    plat = f"{config.get('os', '?')}/{config.get('architecture', '?')}"
    if config.get("variant"):
        plat += f"/{config['variant']}"
    return env, str(working_dir), str(user), plat


# --- unpacking one layer ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(directory: Path, key: str, what: str) -> Iterator[None]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(directory / f"{key}.lock"))
        lock.acquire()
    except OSError as exc:
        raise ImageError(f"{what}: cache directory '{directory}' is not usable: {exc}") from exc
    try:
        yield
    finally:
        lock.release()


def _layer(source: _Source, layer: _Layer, cache_root: Path) -> tuple[Path, bool, bool]:
    """(cache directory of the layer, True if this call unpacked it, True if it is in overlayfs form)."""
    hexdigest = layer.diff_id.split(":", 1)[1]
    directory = cache_root / "layers" / "sha256"
    dest = directory / hexdigest
    what = f"{source.where(layer.blob)} (layer {layer.diff_id})"
    did = False
    if not dest.is_dir():  # a layer only appears by an atomic rename of a complete tree
        with _locked(directory, hexdigest, what):
            if not dest.is_dir():
                _remove_stale_temps(directory, hexdigest)
                _build_layer(source, layer, directory, dest, what)
                did = True
    try:
        meta = json.loads((dest / "meta.json").read_text())
        return dest, did, bool(meta["overlay"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImageError(f"{what}: cached layer '{dest}' is damaged ({_describe(exc)}); delete it") from exc


def _build_layer(source: _Source, layer: _Layer, directory: Path, dest: Path, what: str) -> None:
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=directory))
    except OSError as exc:
        raise ImageError(f"{what}: cannot unpack into '{directory}': {exc}") from exc
    try:
        started = time.monotonic()
        tar_path = tmp / "layer.tar"
        _decompress(source, layer, tar_path, what)
        fs = tmp / "fs"
        fs.mkdir(mode=0o755)
        whiteouts, opaque, overlay = _extract_layer(tar_path, fs, what)
        tar_path.unlink()
        meta = {
            "diff_id": layer.diff_id,
            "whiteouts": whiteouts,
            "opaque": opaque,
            "overlay": overlay,
            "seconds": round(time.monotonic() - started, 6),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))
        tmp.chmod(0o755)
        os.rename(tmp, dest)
    except OSError as exc:
        _remove_tree(tmp)
        raise ImageError(f"{what}: cannot unpack into '{directory}': {_describe(exc)}") from exc
    except BaseException:
        _remove_tree(tmp)
        raise


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
        while self.read(_CHUNK):
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


def _decompress(source: _Source, layer: _Layer, out_path: Path, what: str) -> None:
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
            while chunk := reader.read(_CHUNK):
                plain.update(chunk)
                out.write(chunk)
            stored = raw.drain()
    except ImageError:
        raise
    except Exception as exc:  # decompressors raise their own types (zstd.ZstdError, gzip.BadGzipFile, EOFError)
        raise ImageError(f"{what}: the {compression} layer cannot be read: {_describe(exc)}") from exc
    _verify(layer, stored, f"sha256:{plain.hexdigest()}", what)


def _decompress_with_binary(source: _Source, layer: _Layer, out_path: Path, what: str) -> None:
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
            while chunk := raw.read(_CHUNK):
                proc.stdin.write(chunk)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        stored = raw.drain()
        err = proc.stderr.read() if proc.stderr else b""
        if proc.wait() != 0:
            raise ImageError(
                f"{what}: the zstd layer cannot be read: {_describe(Exception(err.decode(errors='replace')))}"
            )
    plain = hashlib.sha256()
    with open(out_path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            plain.update(chunk)
    _verify(layer, stored, f"sha256:{plain.hexdigest()}", what)


def _verify(layer: _Layer, stored: str, plain: str, what: str) -> None:
    if layer.digest is not None and stored != layer.digest:
        raise ImageError(f"{what}: digest mismatch: the blob hashes to {stored}, the manifest says {layer.digest}")
    if plain != layer.diff_id:
        raise ImageError(
            f"{what}: digest mismatch: the uncompressed layer hashes to {plain}, the config says {layer.diff_id}"
        )


def _extract_layer(tar_path: Path, fs: Path, what: str) -> tuple[list[str], list[str], bool]:
    """Unpack one layer's changeset; returns (whiteouts, opaque directories, True if in overlayfs form)."""
    whiteouts: list[str] = []
    opaque: list[str] = []
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = tar.getmembers()
            _require_complete(tar, members)
            regular = []
            for member in members:
                name = _norm(member.name)
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
                selected = _vet(tar_path, regular)
            except ArchiveError as exc:
                raise ImageError(str(exc).replace(f"rootfs tarball '{tar_path}'", what)) from None
            symlinks = {_norm(m.name): m.linkname for m in selected if m.issym()}
            for path in whiteouts + opaque:
                try:
                    _resolve(path, symlinks, follow_final=False)
                except _Unsafe as exc:
                    raise ImageError(f"{what}: whiteout for '{path}' {exc}; refused") from None
            members[:] = selected
            if _HAS_FILTERS:
                tar.extractall(fs, selected, numeric_owner=True, filter=_rootfs_filter)
            else:
                tar.extractall(fs, selected, numeric_owner=True)
    except ImageError:
        raise
    except _TAR_ERRORS as exc:
        raise ImageError(f"{what}: the layer is not a readable tar archive: {_describe(exc)}") from exc
    return whiteouts, opaque, _overlay_form(fs, whiteouts, opaque)


def _check_whiteout(name: str, what: str) -> None:
    try:
        _check_lexically(name)
    except _Unsafe as exc:
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


# --- merging the layers into one root ---------------------------------------------------------------------------


def _merged_root(
    source: _Source, config_digest: str, layer_dirs: Sequence[Path], cache_root: Path
) -> tuple[Path, bool]:
    hexdigest = config_digest.split(":", 1)[1]
    directory = cache_root / "roots" / "sha256"
    dest = directory / hexdigest
    what = f"image '{source.path}' (config {config_digest})"
    if dest.is_dir():
        return dest, False
    with _locked(directory, hexdigest, what):
        if dest.is_dir():
            return dest, False
        _remove_stale_temps(directory, hexdigest)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{hexdigest}.tmp-", dir=directory))
        except OSError as exc:
            raise ImageError(f"{what}: cannot build the root in '{directory}': {exc}") from exc
        try:
            tmp.chmod(0o755)
            modes: dict[Path, os.stat_result] = {}
            for layer_dir in layer_dirs:
                meta = json.loads((layer_dir / "meta.json").read_text())
                _apply_layer(layer_dir / "fs", tmp, meta["whiteouts"], meta["opaque"], modes)
            # Directory modes last and deepest first: a read-only directory of a lower layer must not stop an
            # unprivileged caller from adding the upper layers' entries to it.
            for path in sorted(modes, key=lambda p: len(p.parts), reverse=True):
                if os.path.lexists(path) and stat.S_ISDIR(os.lstat(path).st_mode):
                    _copy_meta(modes[path], path)
            os.rename(tmp, dest)
        except (OSError, ValueError, KeyError) as exc:
            _remove_tree(tmp)
            raise ImageError(f"{what}: cannot build the root in '{directory}': {_describe(exc)}") from exc
        except BaseException:
            _remove_tree(tmp)
            raise
    return dest, True


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
        _remove_tree(path)
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
