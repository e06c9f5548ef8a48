"""Opening an image: choose it, unpack its layers, merge its root, and describe the result as an :class:`Image`.

This is the one entry point the adapter calls; each step lives in its own module (:mod:`.source`,
:mod:`.manifest`, :mod:`.layer`, :mod:`.root`).  A cached open costs a stat when the caller hands in the
:class:`~..cache.FileMemo` it keeps for the run: the parent asks once per test.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from ..cache import FileMemo, file_identity
from ..untrusted_tar import describe
from .layer import unpack_layer
from .manifest import choose
from .root import merged_root
from .source import ImageError, Source, detect, open_source, split_reference

__all__ = ["Image", "open_image"]


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


def open_image(
    reference: str | Path, cache_root: Path, *, base: Path | None = None, memo: FileMemo[Image] | None = None
) -> Image:
    """Find the image ``reference`` names, unpack what is not cached yet, and describe it.

    ``cache_root`` is the project's cache directory; layers and merged roots live under ``layers/`` and
    ``roots/`` in it.  ``memo`` remembers opened images while their files are unchanged: with it, opening an
    image again costs a stat instead of re-reading the archive's headers.  Raises :class:`ImageError` for
    anything wrong with the image.
    """
    path, tag = split_reference(reference, base)
    try:
        resolved = path.resolve()
        # For a directory, its top file stands for it: tools rewrite index.json / manifest.json on every change.
        top = [resolved / n for n in ("index.json", "manifest.json") if (resolved / n).is_file()]
        st = (top[0] if top else resolved).stat()
    except (OSError, RuntimeError) as exc:
        raise ImageError(f"image '{reference}': '{path}' cannot be read: {describe(exc)}") from exc
    memo_key = (*file_identity(resolved, st), tag, str(cache_root))
    cached = memo.get(memo_key) if memo is not None else None
    if cached is not None and cached.root.is_dir() and all(p.is_dir() for p in cached.layers):
        return dataclasses.replace(cached, unpack_seconds=0.0, unpacked_layers=())
    kind = detect(resolved)
    if kind is None:
        raise ImageError(
            f"image '{reference}': '{path}' is neither an OCI image layout (oci-layout and index.json), "
            "an OCI layout tar, nor a 'docker save' archive (manifest.json)"
        )
    with open_source(resolved, kind) as source:
        image = _load(source, str(reference), path, tag, cache_root)
    if memo is not None:
        memo.put(memo_key, image)
    return image


def _load(source: Source, reference: str, path: Path, tag: str | None, cache_root: Path) -> Image:
    chosen = choose(source, tag)
    started = time.monotonic()
    layers = [unpack_layer(source, layer, cache_root) for layer in chosen.layers]
    root, built = merged_root(source.path, chosen.config_digest, [u.path for u in layers], cache_root)
    unpacked = tuple(layer.diff_id for layer, u in zip(chosen.layers, layers, strict=True) if u.unpacked)
    return Image(
        reference=reference,
        path=path,
        tag=tag,
        kind=source.kind,
        manifest_digest=chosen.manifest_digest,
        config_digest=chosen.config_digest,
        platform=chosen.platform,
        env=chosen.env,
        working_dir=chosen.working_dir,
        user=chosen.user,
        root=root,
        layers=tuple(u.path / "fs" for u in layers),
        overlay_ready=all(u.overlay for u in layers),
        unpack_seconds=time.monotonic() - started if unpacked or built else 0.0,
        unpacked_layers=unpacked,
    )
