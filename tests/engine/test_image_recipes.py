"""The recipes images and rootfs tarballs share: build once into the shared cache, the caller's memo, untrusted tars,
tag selection.  Real files, real processes; no image tools needed."""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pytest_lonely.sandbox import archive, untrusted_tar
from pytest_lonely.sandbox.cache import FileMemo, build_once, file_identity
from pytest_lonely.sandbox.image import DOCKER_DIR, ImageError
from pytest_lonely.sandbox.image.manifest import choose
from pytest_lonely.sandbox.image.source import open_source

REPO = Path(__file__).resolve().parents[2]
SANDBOX = REPO / "pytest_lonely" / "sandbox"


class Oops(Exception):
    pass


def unusable(exc: OSError) -> Exception:
    return Oops(f"unusable: {exc}")


def failed(exc: BaseException) -> Exception:
    return Oops(f"failed: {exc}")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


# --- build_once -------------------------------------------------------------------------------------------------


def test_build_once_builds_once_and_publishes_a_complete_tree(tmp_path: Path) -> None:
    calls: list[Path] = []

    def build(tmp: Path) -> None:
        calls.append(tmp)
        assert tmp.parent == tmp_path / "c"  # beside the destination, so the rename stays on one filesystem
        assert tmp.name.startswith(".k.tmp-")
        (tmp / "f").write_text("x")

    first = build_once(tmp_path / "c", "k", build, unusable=unusable, failed=failed)
    again = build_once(tmp_path / "c", "k", build, unusable=unusable, failed=failed)
    assert first == (tmp_path / "c" / "k", True)
    assert again == (tmp_path / "c" / "k", False)
    assert len(calls) == 1
    assert (tmp_path / "c" / "k" / "f").read_text() == "x"
    assert os.stat(tmp_path / "c" / "k").st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert leftovers(tmp_path / "c") == []


def test_build_once_phrases_listed_errors_and_passes_others_through(tmp_path: Path) -> None:
    def build_then(exc: BaseException) -> Callable[[Path], None]:
        def build(tmp: Path) -> None:
            (tmp / "half").write_text("x")
            raise exc

        return build

    with pytest.raises(Oops, match=r"^failed: disk full$"):
        build_once(tmp_path, "a", build_then(OSError("disk full")), unusable=unusable, failed=failed)
    with pytest.raises(KeyError, match="mine"):  # not in ``errors``: the caller's own error, unchanged
        build_once(tmp_path, "b", build_then(KeyError("mine")), unusable=unusable, failed=failed)
    with pytest.raises(Oops, match="failed: 'listed'"):
        build_once(
            tmp_path, "c", build_then(KeyError("listed")), unusable=unusable, failed=failed, errors=(OSError, KeyError)
        )
    assert leftovers(tmp_path) == []
    assert not any((tmp_path / k).exists() for k in "abc")


def test_build_once_sweeps_temps_of_dead_builders_of_its_key_only(tmp_path: Path) -> None:
    (tmp_path / ".k.tmp-dead").mkdir()
    (tmp_path / ".k.tmp-dead" / "ro").mkdir(mode=0o500)  # read-only leftovers go too
    (tmp_path / ".other.tmp-alive").mkdir()
    build_once(tmp_path, "k", lambda tmp: None, unusable=unusable, failed=failed)
    assert leftovers(tmp_path) == [".other.tmp-alive"]


def test_build_once_says_when_the_cache_directory_is_unusable(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(Oops, match=r"^unusable: .*Not a directory"):
        build_once(tmp_path / "file" / "c", "k", lambda tmp: None, unusable=unusable, failed=failed)


def test_build_once_across_processes_builds_exactly_once(tmp_path: Path) -> None:
    """Three processes (as xdist workers would) ask at once: one builds, the others wait and reuse it."""
    script = textwrap.dedent(
        """
        import os, sys, time
        from pathlib import Path
        from pytest_lonely.sandbox.cache import build_once
        cache, go, log = map(Path, sys.argv[1:])
        while not go.exists():
            time.sleep(0.001)
        def build(tmp):
            with open(log, "a") as fh:
                fh.write(f"{os.getpid()}\\n")
            time.sleep(0.2)
            (tmp / "done").touch()
        dest, built = build_once(cache, "k", build, unusable=RuntimeError, failed=RuntimeError)
        print(built, (dest / "done").exists())
        """
    )
    go, log = tmp_path / "go", tmp_path / "log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", script, str(tmp_path / "c"), str(go), str(log)]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in "abc"]
    time.sleep(0.3)
    go.touch()
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert sorted(out.split()[0] for out, _ in outputs) == ["False", "False", "True"]
    assert all(out.split()[1] == "True" for out, _ in outputs)
    assert len(log.read_text().split()) == 1
    assert leftovers(tmp_path / "c") == []


# --- the caller's memo ------------------------------------------------------------------------------------------


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_the_memo_belongs_to_its_caller_and_notices_a_rewritten_file(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "root.tar", {"etc/a": b"one"})
    memo: FileMemo[str] = FileMemo()
    first, _ = archive.unpack(tarball, tmp_path / "cache", memo=memo)
    assert len(memo) == 1
    st = tarball.stat()
    assert memo.get(file_identity(tarball.resolve(), st)) == hashlib.sha256(tarball.read_bytes()).hexdigest()
    # Another caller's memo, or none, is not consulted: each works it out itself, and gets the same tree.
    assert archive.unpack(tarball, tmp_path / "cache")[0] == first
    assert archive.unpack(tarball, tmp_path / "cache", memo=FileMemo())[0] == first
    # The file is rewritten (new size and mtime): the memo does not answer for it any more.
    make_tar(tarball, {"etc/a": b"two, longer"})
    second, built = archive.unpack(tarball, tmp_path / "cache", memo=memo)
    assert built
    assert second != first
    assert (second / "etc/a").read_bytes() == b"two, longer"
    assert len(memo) == 2
    memo.clear()
    assert len(memo) == 0


def test_the_engine_keeps_no_mutable_state_in_module_globals() -> None:
    """Caches are state of an object the caller owns (the adapter's session), so a fork's inheritance shows at
    the call.  Module-level tables must be ``Final`` constants."""
    modules = [SANDBOX / "archive.py", SANDBOX / "cache.py", SANDBOX / "untrusted_tar.py"]
    modules += sorted((SANDBOX / "image").glob("*.py"))
    mutable = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
    found = []
    for path in modules:
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.AnnAssign) and "Final" in ast.unparse(node.annotation):
                continue
            if isinstance(node, ast.Assign) and [ast.unparse(t) for t in node.targets] == ["__all__"]:
                continue
            value = node.value if isinstance(node, (ast.Assign, ast.AnnAssign)) else None
            called = isinstance(value, ast.Call) and ast.unparse(value.func) in ("dict", "list", "set", "defaultdict")
            if isinstance(value, mutable) or called:
                found.append(f"{path.relative_to(SANDBOX)}:{node.lineno}")
    assert not found


# --- untrusted tars ---------------------------------------------------------------------------------------------


def entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def test_vet_names_the_archive_as_its_caller_calls_it() -> None:
    members = [entry("bin", tarfile.SYMTYPE, "/etc"), entry("bin/passwd")]
    with pytest.raises(untrusted_tar.Refused) as info:
        untrusted_tar.vet(members, "layer 'x' of image 'y'")
    assert str(info.value) == (
        "layer 'x' of image 'y' member 'bin/passwd' goes through symlink 'bin' -> '/etc' "
        "that points outside the destination; refused"
    )


def test_vet_selects_what_may_be_written() -> None:
    members = [
        entry("bin/su", mode=0o4755),
        entry("dev/sda", tarfile.BLKTYPE),
        entry("dev/disk", tarfile.LNKTYPE, "dev/sda"),  # a hard link to a device node is not a way to make one
        entry("bin/sh", tarfile.SYMTYPE, "/bin/busybox"),  # absolute, stored verbatim, never followed here
        entry("bin/sh2", tarfile.LNKTYPE, "bin/sh"),  # a hard link to a symlink: another symlink
    ]
    selected = {m.name: m for m in untrusted_tar.vet(members, "t")}
    assert sorted(selected) == ["bin/sh", "bin/sh2", "bin/su"]
    assert selected["bin/su"].mode == 0o755
    assert selected["bin/sh2"].issym()
    assert selected["bin/sh2"].linkname == "/bin/busybox"


def test_resolve_follows_relative_links_inside_and_refuses_the_rest() -> None:
    links = {"lib": "usr/lib", "up": "../..", "abs": "/etc"}
    assert untrusted_tar.resolve("lib/x", links, follow_final=True) == "usr/lib/x"
    assert untrusted_tar.resolve("abs", links, follow_final=False) == "abs"
    with pytest.raises(untrusted_tar.Unsafe, match="escapes"):
        untrusted_tar.resolve("up/x", links, follow_final=True)
    with pytest.raises(untrusted_tar.Unsafe, match="points outside"):
        untrusted_tar.resolve("abs/passwd", links, follow_final=True)
    with pytest.raises(untrusted_tar.Unsafe, match="loop"):
        untrusted_tar.resolve("a/x", {"a": "b", "b": "a"}, follow_final=True)


def test_complete_members_refuses_an_archive_cut_at_a_member_boundary(tmp_path: Path) -> None:
    whole = make_tar(tmp_path / "whole.tar", {"a": b"x" * 600, "b": b"y"})
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole.read_bytes()[: 512 * 3])  # a's header and data, nothing after
    with tarfile.open(whole) as tar:
        assert [m.name for m in untrusted_tar.complete_members(tar)] == ["a", "b"]
    with tarfile.open(cut) as tar, pytest.raises(tarfile.ReadError, match="no end-of-archive marker after member 'a'"):
        untrusted_tar.complete_members(tar)


def test_extract_writes_only_what_was_vetted(tmp_path: Path) -> None:
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w") as tar:
        for info in (entry("dev/null", tarfile.CHRTYPE), entry("tmp", tarfile.DIRTYPE, mode=0o1777)):
            tar.addfile(info)
        tar.addfile(entry("etc/motd"), io.BytesIO(b""))
    with tarfile.open(path) as tar:
        selected = untrusted_tar.vet(untrusted_tar.complete_members(tar), "t")
        untrusted_tar.extract(tar, selected, tmp_path / "out")
    assert not os.path.lexists(tmp_path / "out/dev/null")
    assert (tmp_path / "out/etc/motd").is_file()
    assert os.stat(tmp_path / "out/tmp").st_mode & 0o7777 == 0o1777  # the filter keeps what a rootfs needs


def test_normalize_and_describe() -> None:
    assert [untrusted_tar.normalize(n) for n in ("./a//b", "/a/b", "./", "a/../b")] == ["a/b", "a/b", ".", "b"]
    assert untrusted_tar.describe(ValueError("two\n  lines")) == "two lines"
    assert untrusted_tar.describe(EOFError()) == "EOFError"


# --- tag selection ----------------------------------------------------------------------------------------------


def docker_dir(tmp_path: Path, tags: list[list[str]]) -> Path:
    """A ``docker save`` directory listing one image per entry of ``tags``; choosing reads no layer content."""
    root = tmp_path / "docker"
    root.mkdir()
    (root / "layer.tar").touch()
    (root / "config.json").write_text(json.dumps({"rootfs": {"diff_ids": ["sha256:" + "0" * 64]}, "os": "linux"}))
    entries = [{"Config": "config.json", "Layers": ["layer.tar"], "RepoTags": t} for t in tags]
    (root / "manifest.json").write_text(json.dumps(entries))
    return root


@pytest.mark.parametrize("tag", ["v2", "busy:v2", "docker.io/library/busy:v2", "library/busy:v2"])
def test_a_tag_may_be_spelled_any_way_a_user_writes_it(tmp_path: Path, tag: str) -> None:
    root = docker_dir(tmp_path, [["docker.io/library/busy:v2"], ["other:v1"]])
    with open_source(root, DOCKER_DIR) as source:
        assert choose(source, tag).layers[0].blob == "layer.tar"


def test_tag_errors_list_the_tags_there_are(tmp_path: Path) -> None:
    root = docker_dir(tmp_path, [["busy:v2"], ["other:v1"], []])
    with open_source(root, DOCKER_DIR) as source:
        with pytest.raises(ImageError, match=r"manifest.json': holds 3 images; name one.*: busy:v2, other:v1$"):
            choose(source, None)
        with pytest.raises(ImageError, match=r"no image tagged 'v9'; the tags are: busy:v2, other:v1$"):
            choose(source, "v9")
