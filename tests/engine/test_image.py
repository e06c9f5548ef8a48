"""Tests for pytest_lonely.sandbox.image: images made by umoci and skopeo, unpacked for real into a real cache."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import images

from pytest_lonely.sandbox.cache import FileMemo
from pytest_lonely.sandbox.image import Image, ImageError, detect, goarch, open_image, split_reference
from pytest_lonely.sandbox.image import layer as image_mod

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A fresh cache per test; the in-process memo is the caller's, and these tests pass one only where they say."""
    return tmp_path / "cache"


def tree(root: Path) -> dict[str, str]:
    """path -> what it is (file contents, symlink target, 'dir'), for comparing whole trees."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                out[rel] = "dir"
            elif rel != "bin/busybox":
                out[rel] = path.read_text()
    return out


EXPECTED_V3 = {
    "bin": "dir",
    "bin/busybox": "",
    **{f"bin/{a}": "-> /bin/busybox" for a in images.APPLETS},
    "usr": "dir",
    "usr/bin": "dir",
    "etc": "dir",
    "etc/keep": "kept\n",
    "etc/hard": "kept\n",
    "etc/new": "added in layer two\n",
    "tmp": "dir",
    "opq": "dir",
    "opq/c": "only me\n",
}
EXPECTED_V3.pop("bin/busybox")


def forms(built: images.Images) -> dict[str, tuple[str, str]]:
    """form -> (reference, expected kind)"""
    return {
        "oci-layout": (f"{built.single}", "oci-layout"),
        "oci-layout-zstd": (f"{built.zstd}", "oci-layout"),
        "oci-layout-uncompressed": (f"{built.plain}", "oci-layout"),
        "oci-layout-tag": (f"{built.multi}:v3", "oci-layout"),
        "oci-tar-tag": (f"{built.oci_tar}:v3", "oci-archive"),
        "skopeo-oci-archive": (f"{built.oci_archive}", "oci-archive"),
        "docker-archive": (f"{built.docker}", "docker-archive"),
        "docker-archive-name-tag": (f"{built.docker}:busy:v3", "docker-archive"),
        "docker-archive-tag": (f"{built.docker}:v3", "docker-archive"),
        "docker-dir": (f"{built.docker_dir}", "docker-dir"),
    }


FORMS = [
    "oci-layout",
    "oci-layout-zstd",
    "oci-layout-uncompressed",
    "oci-layout-tag",
    "oci-tar-tag",
    "skopeo-oci-archive",
    "docker-archive",
    "docker-archive-name-tag",
    "docker-archive-tag",
    "docker-dir",
]


# --- each form --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", FORMS)
def test_each_form_gives_the_same_root(built: images.Images, cache: Path, form: str) -> None:
    reference, kind = forms(built)[form]
    img = open_image(reference, cache)
    assert img.kind == kind
    assert tree(img.root) == EXPECTED_V3
    assert (img.root / "bin/busybox").read_bytes() == Path(images.BUSYBOX).read_bytes()
    assert len(img.layers) == 3
    assert img.unpack_seconds > 0
    assert img.complete  # it has usr/: the plan will not borrow the host's system directories
    # Every form holds the same config, so the same layers (keyed by diff_id) and the same root.
    assert img.config_digest == images.manifest(built.multi, "v3")["config"]["digest"]


def test_the_root_runs(built: images.Images, cache: Path) -> None:
    img = open_image(built.single, cache)
    out = subprocess.run(
        [img.root / "bin/busybox", "cat", img.root / "etc/new"], capture_output=True, text=True, check=True
    )
    assert out.stdout == "added in layer two\n"


def test_detect_reads_content_not_names(built: images.Images, tmp_path: Path) -> None:
    assert detect(built.multi) == "oci-layout"
    assert detect(built.oci_tar) == "oci-archive"
    assert detect(built.docker) == "docker-archive"
    assert detect(built.docker_dir) == "docker-dir"
    # A docker save archive renamed .tar.gz-ish is still one; a plain rootfs tarball is not an image.
    renamed = tmp_path / "rootfs.tgz"
    shutil.copy(built.docker, renamed)
    assert detect(renamed) == "docker-archive"
    plain = tmp_path / "image.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(built.multi / "index.json", "etc/index.json")
    assert detect(plain) is None
    assert detect(tmp_path) is None


def test_split_reference(tmp_path: Path) -> None:
    (tmp_path / "a:b").mkdir()
    (tmp_path / "img.tar").touch()
    assert split_reference("a:b", tmp_path) == (tmp_path / "a:b", None)  # exists as given: no tag
    assert split_reference("a:b:v1", tmp_path) == (tmp_path / "a:b", "v1")
    assert split_reference("img.tar:busy:v2", tmp_path) == (tmp_path / "img.tar", "busy:v2")
    with pytest.raises(ImageError, match=r"'nope:v1'.*does not exist"):
        split_reference("nope:v1", tmp_path)


# --- layers -----------------------------------------------------------------------------------------------------


def test_layer_two_carries_a_whiteout_and_the_file_is_gone(built: images.Images, cache: Path) -> None:
    second = images.manifest(built.multi, "v2")["layers"][1]["digest"]
    with tarfile.open(images.blob(built.multi, second)) as tar:
        assert "etc/.wh.gone" in tar.getnames()
    base = open_image(f"{built.multi}:base", cache)
    v2 = open_image(f"{built.multi}:v2", cache)
    assert (base.root / "etc/gone").exists()
    assert not (v2.root / "etc/gone").exists()
    assert (v2.root / "etc/new").exists()
    assert sorted(os.listdir(v2.root / "opq")) == ["a", "sub"]


def test_opaque_directory_hides_everything_below(built: images.Images, cache: Path) -> None:
    img = open_image(f"{built.multi}:v3", cache)
    assert sorted(os.listdir(img.root / "opq")) == ["c"]
    meta = json.loads((img.layers[2].parent / "meta.json").read_text())
    assert meta["opaque"] == ["opq"]


def test_hard_links_symlinks_and_modes_survive(built: images.Images, cache: Path) -> None:
    img = open_image(built.single, cache)
    assert os.stat(img.root / "etc/keep").st_ino == os.stat(img.root / "etc/hard").st_ino
    assert os.readlink(img.root / "bin/sh") == "/bin/busybox"  # absolute, kept verbatim, resolved only inside
    assert os.stat(img.root / "tmp").st_mode & 0o7777 == 0o1777
    assert os.stat(img.root / "bin/busybox").st_mode & 0o111


def test_config_env_workdir_user_and_digests(built: images.Images, cache: Path) -> None:
    img = open_image(f"{built.multi}:v3", cache)
    assert ("FOO", "bar") in img.env
    assert ("EMPTY", "") in img.env
    assert img.working_dir == "/tmp"
    assert img.user == "1000:1000"
    assert img.manifest_digest == images.descriptor(built.multi, "v3")["digest"]
    assert img.reference == f"{built.multi}:v3"
    assert img.tag == "v3"
    assert img.platform.startswith("linux/")
    base = open_image(f"{built.multi}:base", cache)
    assert ("FOO", "bar") not in base.env
    docker = open_image(built.docker, cache)
    assert docker.manifest_digest is None
    assert docker.env == img.env


# --- the cache --------------------------------------------------------------------------------------------------


def test_images_sharing_a_base_layer_share_its_cache_entry(built: images.Images, cache: Path) -> None:
    base = open_image(f"{built.multi}:base", cache)
    v3 = open_image(f"{built.multi}:v3", cache)
    assert v3.layers[0] == base.layers[0]
    assert base.layers[0].parent.parent == cache / "layers" / "sha256"
    assert len(base.unpacked_layers) == 1
    assert len(v3.unpacked_layers) == 2  # not the base layer again
    assert base.layers[0].parent.name not in {d.split(":")[1] for d in v3.unpacked_layers}
    # The two merged roots are hard links into the layer cache: one inode, one copy on disk.
    inode = os.stat(base.layers[0] / "bin/busybox").st_ino
    assert os.stat(base.root / "bin/busybox").st_ino == inode
    assert os.stat(v3.root / "bin/busybox").st_ino == inode
    # A docker save archive of the same image reuses everything.
    docker = open_image(built.docker, cache)
    assert docker.unpacked_layers == ()
    assert docker.root == v3.root
    assert docker.unpack_seconds == 0.0


def test_cached_open_is_cheap(built: images.Images, cache: Path) -> None:
    memo: FileMemo[Image] = FileMemo()
    first = open_image(built.docker, cache, memo=memo)
    assert first.unpack_seconds > 0
    started = time.perf_counter()
    again = open_image(built.docker, cache, memo=memo)
    memo_hit = time.perf_counter() - started
    memo.clear()  # as in a new process: reads the archive's headers and JSON, unpacks nothing
    started = time.perf_counter()
    cold = open_image(built.docker, cache, memo=memo)
    fresh_process = time.perf_counter() - started
    assert again.unpack_seconds == 0.0
    assert cold.unpack_seconds == 0.0
    assert again.root == cold.root == first.root
    print(
        f"first unpack {first.unpack_seconds * 1e3:.1f} ms, cached open {memo_hit * 1e6:.0f} us in-process, "
        f"{fresh_process * 1e3:.2f} ms after a restart"
    )
    assert memo_hit < 0.01
    assert fresh_process < 0.5


def test_concurrent_unpacks_share_one_extraction(built: images.Images, cache: Path, tmp_path: Path) -> None:
    """Two processes (as two xdist workers would) open one image at once: each layer is unpacked exactly once."""
    script = textwrap.dedent(
        """
        import json, sys, time
        from pathlib import Path
        from pytest_lonely.sandbox.image import open_image
        go = Path(sys.argv[3])
        while not go.exists():
            time.sleep(0.001)
        img = open_image(sys.argv[1], Path(sys.argv[2]))
        print(json.dumps({"unpacked": img.unpacked_layers, "root": str(img.root)}))
        """
    )
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, f"{built.multi}:v3", str(cache), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    time.sleep(0.3)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    unpacked = [set(r["unpacked"]) for r in results]
    assert not unpacked[0] & unpacked[1]
    assert len(unpacked[0] | unpacked[1]) == 3
    assert results[0]["root"] == results[1]["root"]
    assert tree(Path(results[0]["root"])) == EXPECTED_V3
    assert not [p for p in (cache / "layers" / "sha256").iterdir() if ".tmp-" in p.name]


# --- overlay-ready layers ---------------------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0, reason="overlay whiteouts (0:0 devices, trusted.* xattrs) need root")
def test_layers_stack_as_an_overlay(built: images.Images, cache: Path, tmp_path: Path) -> None:
    img = open_image(f"{built.multi}:v3", cache)
    assert img.overlay_ready
    target = tmp_path / "merged"
    target.mkdir()
    # In a private mount namespace of a child, so nothing leaks into the host's mount table.
    script = f"mount -t overlay overlay -o ro,lowerdir={img.lowerdir()} {target} && cd {target} && find . | sort"
    out = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    listed = {line[2:] for line in out.stdout.split() if line != "."}
    assert listed == set(EXPECTED_V3) | {"bin/busybox"}


# --- choosing among images --------------------------------------------------------------------------------------


def test_several_images_need_a_tag(built: images.Images, cache: Path) -> None:
    with pytest.raises(ImageError, match=r"index.json.*holds 3 images.*the tags are: base, v2, v3"):
        open_image(built.multi, cache)
    with pytest.raises(ImageError, match=r"multi-oci.tar' member 'index.json'.*no image tagged 'v9'.*base, v2, v3"):
        open_image(f"{built.oci_tar}:v9", cache)
    with pytest.raises(ImageError, match=r"manifest.json.*no image tagged 'v9'.*busy:v3"):
        open_image(f"{built.docker}:v9", cache)


@pytest.fixture
def layout_copy(built: images.Images, tmp_path: Path) -> Path:
    copy = tmp_path / "layout"
    shutil.copytree(built.multi, copy)
    return copy


def test_multi_platform_index_picks_this_machine(layout_copy: Path, cache: Path) -> None:
    other = "s390x" if goarch() != "s390x" else "arm64"
    images.platform_index(layout_copy, "v3", [("linux", other), ("linux", goarch())])
    img = open_image(f"{layout_copy}:v3", cache)
    assert img.platform == f"linux/{goarch()}"
    assert tree(img.root) == EXPECTED_V3


def test_multi_platform_index_without_this_machine(layout_copy: Path, cache: Path) -> None:
    others = [a for a in ("s390x", "riscv64", "arm64") if a != goarch()][:2]
    images.platform_index(layout_copy, "v3", [("linux", a) for a in others])
    with pytest.raises(ImageError, match=rf"no image for this machine's platform linux/{goarch()}.*linux/{others[1]}"):
        open_image(layout_copy, cache)


def test_goarch_names() -> None:
    assert goarch("x86_64") == "amd64"
    assert goarch("aarch64") == "arm64"
    assert goarch("armv7l") == "arm"


# --- bad input --------------------------------------------------------------------------------------------------


def test_truncated_archive(built: images.Images, cache: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    data = built.docker.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut.tar"):
        open_image(cut, cache)


def test_truncated_archive_at_a_member_boundary(built: images.Images, cache: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.tar"
    with tarfile.open(built.docker) as tar:
        last = tar.getmembers()[-1]
        end = last.offset_data + ((last.size + 511) // 512) * 512
    cut.write_bytes(built.docker.read_bytes()[:end])
    with pytest.raises(ImageError, match=r"cut.tar' is not a complete tar archive.*end-of-archive"):
        open_image(cut, cache)


def test_broken_index_json(layout_copy: Path, cache: Path) -> None:
    (layout_copy / "index.json").write_text('{"schemaVersion": 2, "manifests": [')
    with pytest.raises(ImageError, match=r"layout/index.json'.*not valid JSON"):
        open_image(f"{layout_copy}:v3", cache)
    (layout_copy / "index.json").write_text('{"schemaVersion": 2}')
    with pytest.raises(ImageError, match=r"layout/index.json'.*no 'manifests' list"):
        open_image(f"{layout_copy}:v3", cache)


def test_broken_manifest_json(built: images.Images, cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "docker"
    shutil.copytree(built.docker_dir, copy)
    (copy / "manifest.json").chmod(0o644)
    (copy / "manifest.json").write_text("[{")
    with pytest.raises(ImageError, match=r"docker/manifest.json'.*not valid JSON"):
        open_image(copy, cache)
    (copy / "manifest.json").write_text('{"Config": 1}')
    with pytest.raises(ImageError, match=r"docker/manifest.json'.*not a non-empty list"):
        open_image(copy, cache)


def test_broken_image_manifest_blob(layout_copy: Path, cache: Path) -> None:
    images.blob(layout_copy, images.descriptor(layout_copy, "v3")["digest"]).write_text("{")
    with pytest.raises(ImageError, match=r"image manifest does not match its digest"):
        open_image(f"{layout_copy}:v3", cache)


def test_missing_blob(layout_copy: Path, cache: Path) -> None:
    layer = images.manifest(layout_copy, "v3")["layers"][1]["digest"]
    images.blob(layout_copy, layer).unlink()
    with pytest.raises(ImageError, match=rf"{layer.split(':')[1]}'.*layer blob is missing"):
        open_image(f"{layout_copy}:v3", cache)


def test_missing_layer_in_docker_archive(built: images.Images, cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "docker"
    shutil.copytree(built.docker_dir, copy, symlinks=True)
    name = json.loads((copy / "manifest.json").read_text())[0]["Layers"][0]
    (copy / name).unlink()
    with pytest.raises(ImageError, match=rf"{name}'.*layer file named in manifest.json is missing"):
        open_image(copy, cache)


def test_digest_mismatch(layout_copy: Path, cache: Path) -> None:
    layers = images.manifest(layout_copy, "v3")["layers"]
    # A valid gzip tar, just not the one the manifest names.
    shutil.copy(images.blob(layout_copy, layers[2]["digest"]), images.blob(layout_copy, layers[1]["digest"]))
    with pytest.raises(ImageError, match=rf"{layers[1]['digest'].split(':')[1]}'.*digest mismatch"):
        open_image(f"{layout_copy}:v3", cache)
    assert not [
        p
        for p in (cache / "layers" / "sha256").iterdir()
        if ".tmp-" in p.name or p.name.startswith(layers[1]["digest"].split(":")[1])
    ]


def test_diff_id_mismatch(layout_copy: Path, cache: Path) -> None:
    def swap(config: dict[str, object]) -> None:
        ids = config["rootfs"]["diff_ids"]  # type: ignore[index]
        ids[1], ids[2] = ids[2], ids[1]

    images.rewrite_config(layout_copy, "v3", swap)
    with pytest.raises(ImageError, match=r"digest mismatch: the uncompressed layer hashes to"):
        open_image(f"{layout_copy}:v3", cache)


def test_unsupported_media_type(layout_copy: Path, cache: Path) -> None:
    def change(m: dict[str, object]) -> None:
        m["layers"][1]["mediaType"] = "application/vnd.oci.image.layer.v1.tar+bzip2"  # type: ignore[index]

    images.rewrite_manifest(layout_copy, "v3", change)
    with pytest.raises(ImageError, match=r"unsupported media type 'application/vnd.oci.image.layer.v1.tar\+bzip2'"):
        open_image(f"{layout_copy}:v3", cache)


def test_unsupported_manifest_media_type(layout_copy: Path, cache: Path) -> None:
    top = images.index(layout_copy)
    top["manifests"][0]["mediaType"] = "application/vnd.example.manifest+json"
    (layout_copy / "index.json").write_text(json.dumps(top))
    with pytest.raises(ImageError, match=r"index.json'.*unsupported media type 'application/vnd.example"):
        open_image(f"{layout_copy}:base", cache)


def test_corrupt_gzip_layer(layout_copy: Path, cache: Path) -> None:
    def change(m: dict[str, object]) -> None:
        layer = m["layers"][1]  # type: ignore[index]
        data = images.blob(layout_copy, layer["digest"]).read_bytes()
        layer["digest"], layer["size"] = images.write_blob(layout_copy, data[: len(data) - 9])

    images.rewrite_manifest(layout_copy, "v3", change)
    with pytest.raises(ImageError, match=r"the gzip layer cannot be read"):
        open_image(f"{layout_copy}:v3", cache)


def add_raw_layer(layout: Path, entries: list[tarfile.TarInfo], tmp_path: Path) -> None:
    layer = tmp_path / "evil.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for info in entries:
            tar.addfile(info, None)
    images.run("umoci", "raw", "add-layer", "--image", f"{layout}:v3", "--tag", "evil", layer)


def test_layer_escaping_through_a_symlink_is_refused(layout_copy: Path, cache: Path, tmp_path: Path) -> None:
    link = tarfile.TarInfo("etc2")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc"
    through = tarfile.TarInfo("etc2/pwned")
    add_raw_layer(layout_copy, [link, through], tmp_path)
    with pytest.raises(ImageError, match=r"member 'etc2/pwned' goes through symlink 'etc2' -> '/etc'.*refused"):
        open_image(f"{layout_copy}:evil", cache)
    assert not Path("/etc/pwned").exists()


def test_hard_link_out_and_escaping_whiteout_are_refused(layout_copy: Path, cache: Path, tmp_path: Path) -> None:
    hard = tarfile.TarInfo("shadow")
    hard.type, hard.linkname = tarfile.LNKTYPE, "../../../../etc/shadow"
    add_raw_layer(layout_copy, [hard], tmp_path)
    with pytest.raises(ImageError, match=r"member 'shadow' is a hard link to '../../../../etc/shadow'.*refused"):
        open_image(f"{layout_copy}:evil", cache)


def test_device_nodes_are_not_created(layout_copy: Path, cache: Path, tmp_path: Path) -> None:
    dev = tarfile.TarInfo("dev/sda")
    dev.type, dev.devmajor, dev.devminor = tarfile.BLKTYPE, 8, 0
    ok = tarfile.TarInfo("dev/ok")
    add_raw_layer(layout_copy, [dev, ok], tmp_path)
    img = open_image(f"{layout_copy}:evil", cache)
    assert (img.root / "dev/ok").exists()
    assert not os.path.lexists(img.root / "dev/sda")


def test_not_an_image(busybox_tarball: Path, cache: Path) -> None:
    with pytest.raises(ImageError, match=r"neither an OCI image layout.*nor a 'docker save' archive"):
        open_image(busybox_tarball, cache)


@pytest.fixture
def busybox_tarball(tmp_path: Path) -> Path:
    path = tmp_path / "rootfs.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(images.BUSYBOX, "bin/busybox")
    return path


def test_zstd_without_any_decompressor(built: images.Images, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(image_mod, "_zstd_reader", lambda raw: None)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ImageError, match=r"zstd/blobs/sha256/\w+' \(layer sha256:\w+\): is zstd-compressed.*zstandard"):
        open_image(built.zstd, cache)


def test_zstd_layer_digest_checked_with_the_binary(built: images.Images, cache: Path, tmp_path: Path) -> None:
    copy = tmp_path / "z"
    shutil.copytree(built.zstd, copy)
    layers = images.manifest(copy, "v3")["layers"]
    shutil.copy(images.blob(copy, layers[2]["digest"]), images.blob(copy, layers[0]["digest"]))
    with pytest.raises(ImageError, match=r"digest mismatch"):
        open_image(copy, cache)


def test_image_is_frozen(built: images.Images, cache: Path) -> None:
    img = open_image(built.single, cache)
    with pytest.raises(dataclasses.FrozenInstanceError):
        img.tag = "x"  # type: ignore[misc]
    assert isinstance(img, Image)
