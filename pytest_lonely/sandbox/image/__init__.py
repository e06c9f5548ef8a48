"""Container images as root filesystems: OCI image layouts and ``docker save`` archives, read without a daemon.

An image is a stack of layer tarballs plus a config.  Opening one (:mod:`.open`) takes four steps, one module
each:

- :mod:`.source`: the ``PATH[:TAG]`` reference, the format detected from content, reading the image's files;
- :mod:`.manifest`: index, tag and platform selection, manifest and config: which layers, in which order;
- :mod:`.layer`: each layer fetched, decompressed, verified and unpacked (whiteouts included) into the cache;
- :mod:`.root`: the layers merged into the one directory a container mounts as its root.

Everything in an image is untrusted input that the parent (possibly root) unpacks on the host, so each layer goes
through the same vetting as a rootfs tarball (:mod:`..untrusted_tar`).  This module only re-exports.
"""

from __future__ import annotations

from .manifest import goarch
from .open import Image, open_image
from .source import DOCKER_ARCHIVE, DOCKER_DIR, OCI_ARCHIVE, OCI_LAYOUT, ImageError, detect, split_reference

__all__ = [
    "DOCKER_ARCHIVE",
    "DOCKER_DIR",
    "OCI_ARCHIVE",
    "OCI_LAYOUT",
    "Image",
    "ImageError",
    "detect",
    "goarch",
    "open_image",
    "split_reference",
]
