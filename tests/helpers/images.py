"""Build real container images with real tools (umoci, skopeo, tar) for the image tests.

Hand-written index.json and manifests would only test our reading of our own idea of the format; images made by
umoci and skopeo carry what real tools emit (their whiteouts, their media types, their docker-archive layout).
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers.host import BUSYBOX

APPLETS = ("sh", "ls", "cat", "echo", "true", "env")
TOOLS = ("umoci", "skopeo", "tar")


def missing_tools() -> list[str]:
    found = [t for t in TOOLS if shutil.which(t) is None]
    if not os.path.exists(BUSYBOX):
        found.append("busybox (busybox-static)")
    return found


@dataclasses.dataclass(frozen=True)
class Images:
    """Every form of the test image.  ``multi`` holds tags base (1 layer), v2 (2) and v3 (3)."""

    multi: Path  # OCI layout, tags base, v2, v3
    single: Path  # OCI layout with only v3, gzip layers
    zstd: Path  # OCI layout with only v3, zstd layers
    plain: Path  # ``single`` with its layers stored uncompressed (skopeo and umoci always compress)
    oci_tar: Path  # tar of ``multi``
    oci_archive: Path  # skopeo's oci-archive of v3
    docker: Path  # skopeo's docker-archive of v3, tagged busy:v3
    docker_dir: Path  # that archive extracted


def run(*cmd: str | Path) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def busybox_tree(rootfs: Path) -> None:
    """Layer one: a static BusyBox with applet symlinks, a hard link, files for later layers to delete."""
    for d in ("bin", "usr/bin", "etc", "tmp", "opq/sub"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("/bin/busybox")
    (rootfs / "etc" / "keep").write_text("kept\n")
    os.link(rootfs / "etc" / "keep", rootfs / "etc" / "hard")
    (rootfs / "etc" / "gone").write_text("deleted in layer two\n")
    (rootfs / "opq" / "a").write_text("hidden by the opaque layer\n")
    (rootfs / "opq" / "sub" / "deep").write_text("hidden too\n")


def opaque_layer(path: Path) -> Path:
    """Layer three, as an uncompressed tar: umoci never emits an opaque marker, but other tools (Docker) do."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("opq",):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in (("opq/.wh..wh..opq", b""), ("opq/c", b"only me\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def build(work: Path) -> Images:
    work.mkdir(parents=True, exist_ok=True)
    multi = work / "multi"
    run("umoci", "init", "--layout", multi)
    run("umoci", "new", "--image", f"{multi}:base")
    bundle = work / "bundle"
    run("umoci", "unpack", "--image", f"{multi}:base", bundle)
    busybox_tree(bundle / "rootfs")
    run("umoci", "repack", "--image", f"{multi}:base", bundle)
    shutil.rmtree(bundle)
    # umoci diffs against the bundle's mtree from unpack: a fresh unpack makes the next repack a new layer.
    run("umoci", "unpack", "--image", f"{multi}:base", bundle)
    (bundle / "rootfs" / "etc" / "gone").unlink()
    (bundle / "rootfs" / "etc" / "new").write_text("added in layer two\n")
    run("umoci", "repack", "--image", f"{multi}:v2", bundle)
    shutil.rmtree(bundle)
    run(
        "umoci",
        "config",
        "--image",
        f"{multi}:v2",
        "--config.env",
        "FOO=bar",
        "--config.env",
        "EMPTY=",
        "--config.workingdir",
        "/tmp",
        "--config.user",
        "1000:1000",
    )
    run("umoci", "raw", "add-layer", "--image", f"{multi}:v2", "--tag", "v3", opaque_layer(work / "opaque.tar"))

    single = work / "single"
    run("skopeo", "copy", "-q", f"oci:{multi}:v3", f"oci:{single}:v3")
    zstd = work / "zstd"
    run(
        "skopeo", "copy", "-q", "--dest-compress", "--dest-compress-format", "zstd", f"oci:{multi}:v3", f"oci:{zstd}:v3"
    )
    oci_tar = work / "multi-oci.tar"
    run("tar", "-C", multi, "-cf", oci_tar, ".")
    oci_archive = work / "busy-oci-archive.tar"
    run("skopeo", "copy", "-q", f"oci:{multi}:v3", f"oci-archive:{oci_archive}:v3")
    docker = work / "busy-docker.tar"
    run("skopeo", "copy", "-q", f"oci:{multi}:v3", f"docker-archive:{docker}:busy:v3")
    docker_dir = work / "busy-docker"
    docker_dir.mkdir()
    run("tar", "-C", docker_dir, "-xf", docker)
    plain = work / "plain"
    shutil.copytree(single, plain)
    decompress_layers(plain, "v3")
    return Images(multi, single, zstd, plain, oci_tar, oci_archive, docker, docker_dir)


# --- reading and corrupting real layouts ------------------------------------------------------------------------


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.split(":", 1)[1]


def index(layout: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((layout / "index.json").read_text())
    return data


def descriptor(layout: Path, tag: str) -> dict[str, Any]:
    for entry in index(layout)["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return dict(entry)
    raise KeyError(tag)


def manifest(layout: Path, tag: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(blob(layout, descriptor(layout, tag)["digest"]).read_text())
    return data


def write_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob(layout, digest)
    path.write_bytes(data)
    return digest, len(data)


def rewrite_manifest(layout: Path, tag: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit one tag's manifest and re-point index.json at it, digests kept consistent (so only the edit is wrong)."""
    data = manifest(layout, tag)
    change(data)
    digest, size = write_blob(layout, json.dumps(data).encode())
    top = index(layout)
    for entry in top["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            entry["digest"], entry["size"] = digest, size
    (layout / "index.json").write_text(json.dumps(top))


def rewrite_config(layout: Path, tag: str, change: Callable[[dict[str, Any]], None]) -> None:
    config = json.loads(blob(layout, manifest(layout, tag)["config"]["digest"]).read_text())
    change(config)
    digest, size = write_blob(layout, json.dumps(config).encode())

    def point(m: dict[str, Any]) -> None:
        m["config"]["digest"], m["config"]["size"] = digest, size

    rewrite_manifest(layout, tag, point)


def platform_index(layout: Path, tag: str, platforms: list[tuple[str, str]]) -> None:
    """Make ``tag`` a multi-platform index, as ``docker buildx`` pushes: one manifest per (os, architecture).

    No local tool assembles an index from manifests without a registry, so this writes the index blob; the
    manifests in it are real ones (one per platform, made with ``umoci config --architecture``).
    """
    entries = []
    for os_name, arch in platforms:
        run("umoci", "config", "--image", f"{layout}:{tag}", "--tag", f"{tag}-{arch}", "--architecture", arch)
        entry = descriptor(layout, f"{tag}-{arch}")
        entry.pop("annotations", None)
        entry["platform"] = {"os": os_name, "architecture": arch}
        entries.append(entry)
    nested = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries}
    digest, size = write_blob(layout, json.dumps(nested).encode())
    top = index(layout)
    top["manifests"] = [
        {
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }
    ]
    (layout / "index.json").write_text(json.dumps(top))


def decompress_layers(layout: Path, tag: str) -> None:
    """Store every layer of ``tag`` as a plain tar (media type ``...layer.v1.tar``), digests kept consistent."""

    def change(m: dict[str, Any]) -> None:
        for layer in m["layers"]:
            data = gzip.decompress(blob(layout, layer["digest"]).read_bytes())
            layer["digest"], layer["size"] = write_blob(layout, data)
            layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar"

    rewrite_manifest(layout, tag, change)
