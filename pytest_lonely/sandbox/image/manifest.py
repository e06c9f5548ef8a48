"""Which image a reference means, and what it is made of: index, tag, platform, manifest, config, layer list.

An OCI layout names its images in ``index.json`` (tags as annotations, possibly a nested per-platform index), a
``docker save`` archive in ``manifest.json`` (``RepoTags``).  Both come down to the same :class:`Chosen`: the
config's settings and the ordered :class:`Layer` list, each layer keyed by its uncompressed digest (the config's
``rootfs.diff_ids``), so the same layer shipped compressed in one format and plain in the other is one layer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from ..untrusted_tar import describe, normalize
from .source import OCI_ARCHIVE, OCI_LAYOUT, ImageError, Source

__all__ = ["Chosen", "Layer", "choose", "goarch"]

_DIGEST: Final = re.compile(r"sha256:([0-9a-f]{64})")
# An index may point at an index; past this depth it is a loop or an attack.
_MAX_NESTING: Final = 8
_UNTAGGED: Final = "(untagged)"

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

E = TypeVar("E")


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer as the image describes it; :mod:`.layer` fetches, verifies and unpacks it."""

    blob: str  # path inside the source
    digest: str | None  # of the blob as stored, when the format names it
    diff_id: str  # of the uncompressed tar
    compression: str  # none, gzip, zstd, or "detect" (docker save archives do not say)


@dataclasses.dataclass(frozen=True)
class Chosen:
    """The image a reference names, before anything is unpacked."""

    #: ``sha256:...`` of the chosen manifest; None for ``docker save`` archives, which carry no manifest blob.
    manifest_digest: str | None
    #: ``sha256:...`` of the config (Docker's image ID); it pins every layer.
    config_digest: str
    #: ``os/architecture[/variant]`` from the config.
    platform: str
    env: tuple[tuple[str, str], ...]
    working_dir: str
    user: str
    layers: tuple[Layer, ...]


def goarch(machine: str | None = None) -> str:
    """Map ``platform.machine()`` to the GOARCH name image indexes use."""
    machine = platform.machine() if machine is None else machine
    return _GOARCH.get(machine.lower(), machine.lower())


def choose(source: Source, tag: str | None) -> Chosen:
    """The image ``tag`` names in ``source`` (the only one, without a tag), for this machine's platform."""
    manifest_digest: str | None
    if source.kind in (OCI_LAYOUT, OCI_ARCHIVE):
        manifest_digest, config_digest, config, layers = _choose_oci(source, tag)
    else:
        manifest_digest = None
        config_digest, config, layers = _choose_docker(source, tag)
    env, working_dir, user, plat = _read_config(source, config)
    return Chosen(manifest_digest, config_digest, plat, env, working_dir, user, tuple(layers))


# --- tags -------------------------------------------------------------------------------------------------------


def _spellings(ref: str) -> set[str]:
    """Every spelling a user may write for one tag: ``v2``, ``busy:v2``, ``docker.io/library/busy:v2``."""
    out = {ref}
    for prefix in ("docker.io/library/", "docker.io/", "library/"):
        if ref.startswith(prefix):
            out.add(ref[len(prefix) :])
    _name, sep, tag = ref.rpartition(":")
    if sep and "/" not in tag:
        out.add(tag)
    return out


def _by_tag(
    entries: Sequence[E],
    tag: str | None,
    where: str,
    *,
    names: Callable[[E], Sequence[str]],
    shown: Callable[[E], Sequence[str]],
    variants: bool,
) -> list[E]:
    """The entries ``tag`` names (every entry without a tag), or an error that lists the tags there are.

    ``names`` gives an entry's tags as the file writes them (any of their :func:`_spellings` matches), ``shown``
    how the error lists them.  Several entries remain a choice only if they may be one image built for several
    platforms (``variants``) and look like it: a tag was given or they all show the same name.
    """
    if tag is not None:
        chosen = [e for e in entries if any(tag in _spellings(n) for n in names(e))]
        if not chosen:
            raise ImageError(f"{where}: no image tagged '{tag}'; the tags are: {_listing(entries, shown)}")
    else:
        chosen = list(entries)
    if len(chosen) > 1 and not (variants and (tag is not None or len({tuple(shown(e)) for e in chosen}) == 1)):
        raise ImageError(
            f"{where}: holds {len(chosen)} images; name one with PATH:TAG; the tags are: {_listing(chosen, shown)}"
        )
    return chosen


def _listing(entries: Sequence[E], shown: Callable[[E], Sequence[str]]) -> str:
    return ", ".join(sorted({t for e in entries for t in shown(e)}) or [_UNTAGGED])


# --- OCI image layouts ------------------------------------------------------------------------------------------


def _annotations(entry: Mapping[str, Any]) -> Mapping[str, Any]:
    return entry.get("annotations") or {}


def _oci_names(entry: Mapping[str, Any]) -> list[str]:
    values = (_annotations(entry).get(k) for k in ("org.opencontainers.image.ref.name", "io.containerd.image.name"))
    return [v for v in values if isinstance(v, str) and v]


def _oci_shown(entry: Mapping[str, Any]) -> list[str]:
    ann = _annotations(entry)
    value = ann.get("org.opencontainers.image.ref.name") or ann.get("io.containerd.image.name")
    return [str(value) if value else _UNTAGGED]


def _descriptor(entry: object, where: str) -> tuple[str, str, Mapping[str, Any]]:
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


def _choose_oci(source: Source, tag: str | None) -> tuple[str, str, Mapping[str, Any], list[Layer]]:
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
        _descriptor(entry, where)
    chosen = _by_tag(entries, tag, where, names=_oci_names, shown=_oci_shown, variants=True)
    entry = _pick_platform(chosen, where) if len(chosen) > 1 else chosen[0]
    for _depth in range(_MAX_NESTING):
        media, digest, _ = _descriptor(entry, where)
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
    raise ImageError(f"{where}: image indexes nest more than {_MAX_NESTING} deep")


def _read_manifest(source: Source, digest: str) -> tuple[str, Mapping[str, Any], list[Layer]]:
    name = _blob(digest)
    where = source.where(name)
    manifest = source.json(name, "image manifest", digest)
    if not isinstance(manifest, dict):
        raise ImageError(f"{where}: the manifest is not an object")
    config_desc = manifest.get("config")
    layer_descs = manifest.get("layers")
    if not isinstance(layer_descs, list):
        raise ImageError(f"{where}: the manifest has no 'layers' list")
    _, config_digest, _ = _descriptor(config_desc, where)
    config = source.json(_blob(config_digest), "image config", config_digest)
    diff_ids = _diff_ids(source, _blob(config_digest), config, len(layer_descs))
    layers = []
    for desc, diff_id in zip(layer_descs, diff_ids, strict=True):
        media, layer_digest, _ = _descriptor(desc, where)
        compression = _LAYER_TYPES.get(media)
        if compression is None:
            raise ImageError(
                f"{where}: layer {layer_digest} has unsupported media type '{media}'; "
                f"supported are: {', '.join(sorted(_LAYER_TYPES))}"
            )
        if not source.exists(_blob(layer_digest)):
            raise ImageError(f"{source.where(_blob(layer_digest))}: layer blob is missing")
        layers.append(Layer(_blob(layer_digest), layer_digest, diff_id, compression))
    return config_digest, config, layers


# --- docker save archives ---------------------------------------------------------------------------------------


def _repo_tags(entry: Mapping[str, Any]) -> list[str]:
    tags = entry.get("RepoTags") or []
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _choose_docker(source: Source, tag: str | None) -> tuple[str, Mapping[str, Any], list[Layer]]:
    where = source.where("manifest.json")
    entries = source.json("manifest.json", "the 'docker save' manifest")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ImageError(f"{where}: is not a non-empty list of images")
    # An archive lists one entry per image and no platforms: several entries are never one image.
    (entry,) = _by_tag(entries, tag, where, names=_repo_tags, shown=_repo_tags, variants=False)
    config_name = entry.get("Config")
    layer_names = entry.get("Layers")
    if not isinstance(config_name, str) or not isinstance(layer_names, list):
        raise ImageError(f"{where}: an image has no 'Config' file name or no 'Layers' list")
    data = source.read(config_name, "image config")
    config_digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    try:
        config = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{source.where(config_name)}: image config is not valid JSON: {describe(exc)}") from exc
    diff_ids = _diff_ids(source, config_name, config, len(layer_names))
    layers = []
    for name, diff_id in zip(layer_names, diff_ids, strict=True):
        if not isinstance(name, str) or not source.exists(name):
            raise ImageError(f"{source.where(str(name))}: layer file named in manifest.json is missing")
        # Docker >= 25 stores layers as blobs/sha256/<digest of the stored bytes>: verify that too.
        match = re.fullmatch(r"blobs/sha256/([0-9a-f]{64})", normalize(name))
        layers.append(Layer(name, f"sha256:{match.group(1)}" if match else None, diff_id, "detect"))
    return config_digest, config, layers


# --- the config -------------------------------------------------------------------------------------------------


def _diff_ids(source: Source, name: str, config: object, count: int) -> list[str]:
    where = source.where(name)
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(i, str) and _DIGEST.fullmatch(i) for i in ids):
        raise ImageError(f"{where}: the config has no valid rootfs.diff_ids list of 'sha256:' digests")
    if len(ids) != count:
        raise ImageError(f"{where}: the config lists {len(ids)} diff_ids but the image has {count} layers")
    return list(ids)


def _read_config(source: Source, config: object) -> tuple[tuple[tuple[str, str], ...], str, str, str]:
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
