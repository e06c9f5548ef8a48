"""Tests for pytest_lonely.sandbox.archive: real tarballs under tmp_path, real extraction, real processes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterable
from pathlib import Path

import pytest

import pytest_lonely.sandbox.archive
from pytest_lonely.sandbox.archive import ArchiveError, unpack

FORMATS = [
    (".tar", "w"),
    (".tar.gz", "w:gz"),
    (".tgz", "w:gz"),
    (".tar.bz2", "w:bz2"),
    (".tbz2", "w:bz2"),
    (".tar.xz", "w:xz"),
    (".txz", "w:xz"),
]


# --- building archives ------------------------------------------------------------------------------------------


def reg(name: str, data: bytes = b"", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def directory(name: str, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = mode
    return info, b""


def symlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    info.mode = 0o777
    return info, b""


def hardlink(name: str, target: str) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.LNKTYPE
    info.linkname = target
    return info, b""


def special(name: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o666
    info.devmajor, info.devminor = 1, 3
    return info, b""


def make_tar(path: Path, entries: Iterable[tuple[tarfile.TarInfo, bytes]], mode: str = "w") -> Path:
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return path


def busybox_like() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        directory("."),
        directory("bin"),
        reg("bin/busybox", b"\x7fELF pretend", 0o755),
        symlink("bin/sh", "/bin/busybox"),
        directory("etc"),
        reg("etc/hostname", b"lonely\n"),
    ]


def temp_dirs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if ".tmp-" in p.name) if cache.exists() else []


def tree_dirs(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.is_dir()) if cache.exists() else []


def sha_prefix(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:24]


# --- happy paths ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "mode"), FORMATS)
def test_each_format_round_trips(tmp_path: Path, suffix: str, mode: str) -> None:
    tarball = make_tar(tmp_path / f"rootfs{suffix}", busybox_like(), mode)
    dest, created = unpack(tarball, tmp_path / "cache")
    assert created
    assert dest == tmp_path / "cache" / sha_prefix(tarball)
    assert (dest / "etc/hostname").read_bytes() == b"lonely\n"
    assert os.readlink(dest / "bin/sh") == "/bin/busybox"  # absolute symlink kept verbatim
    assert os.stat(dest / "bin/busybox").st_mode & 0o777 == 0o755
    assert temp_dirs(tmp_path / "cache") == []


def test_second_call_reuses_the_tree(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "rootfs.tar.gz", busybox_like(), "w:gz")
    first = unpack(tarball, tmp_path / "cache")
    second = unpack(tarball, tmp_path / "cache")
    assert first == (first[0], True)
    assert second == (first[0], False)


def test_cache_is_keyed_by_content_not_path(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "a.tar", busybox_like())
    copy = tmp_path / "elsewhere" / "b.tar"
    copy.parent.mkdir()
    copy.write_bytes(tarball.read_bytes())
    other = make_tar(tmp_path / "c.tar", [reg("only", b"different")])
    dest, _ = unpack(tarball, tmp_path / "cache")
    assert unpack(copy, tmp_path / "cache") == (dest, False)
    other_dest, created = unpack(other, tmp_path / "cache")
    assert created
    assert other_dest != dest


def test_modes_kept_setuid_dropped_devices_skipped(tmp_path: Path) -> None:
    tarball = make_tar(
        tmp_path / "rootfs.tar",
        [
            directory("tmp", 0o1777),
            reg("usr/bin/su", b"su", 0o4755),
            reg("usr/bin/run", b"#!/bin/sh\n", 0o700),
            reg("etc/shadow", b"", 0o640),
            directory("dev"),
            special("dev/null", tarfile.CHRTYPE),
            special("dev/sda", tarfile.BLKTYPE),
            special("run/fifo", tarfile.FIFOTYPE),
        ],
    )
    dest, _ = unpack(tarball, tmp_path / "cache")
    assert stat.S_IMODE(os.stat(dest / "tmp").st_mode) == 0o1777
    assert stat.S_IMODE(os.stat(dest / "usr/bin/su").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "usr/bin/run").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(dest / "etc/shadow").st_mode) == 0o640
    assert sorted(os.listdir(dest / "dev")) == []
    assert not os.path.lexists(dest / "run/fifo")


def test_links_that_stay_inside_are_fine(tmp_path: Path) -> None:
    tarball = make_tar(
        tmp_path / "rootfs.tar.xz",
        [
            directory("usr/lib"),
            symlink("lib", "usr/lib"),  # merged /usr: members are then written through the symlink
            reg("lib/libc.so", b"libc", 0o755),
            hardlink("usr/lib/libc.so.6", "lib/libc.so"),
            reg("usr/bin/perl5", b"perl", 0o755),
            hardlink("usr/bin/perl", "usr/bin/perl5"),
            symlink("usr/bin/up", "../../.."),  # climbing out is harmless until something is written through it
            symlink("bin/sh", "/bin/busybox"),
            hardlink("bin/ash", "bin/sh"),  # GNU tar emits these for symlinks with st_nlink > 1
        ],
        "w:xz",
    )
    dest, _ = unpack(tarball, tmp_path / "cache")
    assert (dest / "usr/lib/libc.so").read_bytes() == b"libc"
    assert os.path.samefile(dest / "usr/lib/libc.so.6", dest / "usr/lib/libc.so")
    assert os.path.samefile(dest / "usr/bin/perl", dest / "usr/bin/perl5")
    assert os.readlink(dest / "usr/bin/up") == "../../.."
    assert os.readlink(dest / "bin/ash") == "/bin/busybox"


def test_hard_link_to_device_is_skipped_too(tmp_path: Path) -> None:
    tarball = make_tar(
        tmp_path / "rootfs.tar",
        [special("dev/sda", tarfile.BLKTYPE), hardlink("disk", "dev/sda"), reg("etc/hostname", b"x")],
    )
    dest, _ = unpack(tarball, tmp_path / "cache")
    assert not os.path.lexists(dest / "disk")
    assert not os.path.lexists(dest / "dev/sda")


def test_symlink_fallback_cannot_resurrect_a_device(tmp_path: Path) -> None:
    """os.symlink fails (ENAMETOOLONG), and tarfile's fallback copies the member the link names instead."""
    long_target = "a/../" * 1000 + "sda"
    tarball = make_tar(tmp_path / "rootfs.tar", [special("sda", tarfile.BLKTYPE), symlink("disk", long_target)])
    dest, _ = unpack(tarball, tmp_path / "cache")
    assert not os.path.lexists(dest / "sda")
    assert not os.path.exists(dest / "disk") or stat.S_ISREG(os.stat(dest / "disk").st_mode)


def test_hard_link_to_missing_member_is_an_error(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "rootfs.tar", [hardlink("usr/bin/perl", "usr/bin/perl5")])
    with pytest.raises(ArchiveError, match="not an earlier member") as excinfo:
        unpack(tarball, tmp_path / "cache")
    assert str(excinfo.value).startswith(f"rootfs tarball '{tarball}' member 'usr/bin/perl' ")
    assert temp_dirs(tmp_path / "cache") == []


def test_root_dir_is_traversable_without_dot_member(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "rootfs.tar", [reg("etc/hostname", b"x")])
    dest, _ = unpack(tarball, tmp_path / "cache")
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o755


def test_stale_temp_dir_from_dead_process_is_removed(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "rootfs.tar", busybox_like())
    cache = tmp_path / "cache"
    stale = cache / f".{sha_prefix(tarball)}.tmp-deadbeef"
    (stale / "half").mkdir(parents=True)
    unpack(tarball, cache)
    assert temp_dirs(cache) == []


# --- refusals ---------------------------------------------------------------------------------------------------


def assert_refused(tarball: Path, cache: Path, member: str, phrase: str) -> None:
    with pytest.raises(ArchiveError) as excinfo:
        unpack(tarball, cache)
    message = str(excinfo.value)
    prefix = f"rootfs tarball '{tarball}' member '{member}' "
    assert message.startswith(prefix)
    assert message.endswith("; refused")
    # tmp_path contains the test's name, so look for the phrase only in what the message adds to it.
    assert phrase in message[len(prefix) :].replace(str(tarball.parent), "<tmp>")
    assert temp_dirs(cache) == []
    assert tree_dirs(cache) == []  # checked before anything was extracted


def test_dotdot_member_refused(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "evil.tar", [reg("etc/ok", b"ok"), reg("../evil", b"pwned")])
    assert_refused(tarball, tmp_path / "cache", "../evil", "escapes the destination")
    assert not (tmp_path / "evil").exists()


def test_dotdot_in_the_middle_refused(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "evil.tar", [reg("etc/../../../evil", b"pwned")])
    assert_refused(tarball, tmp_path / "cache", "etc/../../../evil", "escapes the destination")
    assert not (tmp_path / "evil").exists()


def test_absolute_member_refused(tmp_path: Path) -> None:
    target = tmp_path / "outside" / "abs"
    tarball = make_tar(tmp_path / "evil.tar.gz", [reg(str(target), b"pwned")], "w:gz")
    assert_refused(tarball, tmp_path / "cache", str(target), "has an absolute path")
    assert not target.exists()


def test_hardlink_escape_refused(tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_text("host file")
    cache = tmp_path / "cache"
    relative = make_tar(tmp_path / "rel.tar", [hardlink("etc/passwd", "../../outside/secret")])
    assert_refused(
        relative, cache, "etc/passwd", "is a hard link to '../../outside/secret', which escapes the destination"
    )
    absolute = make_tar(tmp_path / "abs.tar", [hardlink("etc/passwd", str(secret))])
    assert_refused(
        absolute, cache, "etc/passwd", "is a hard link to '<tmp>/outside/secret', which has an absolute path"
    )
    assert secret.stat().st_nlink == 1


def test_hardlink_through_symlink_refused(tmp_path: Path) -> None:
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_text("host file")
    tarball = make_tar(
        tmp_path / "evil.tar",
        [symlink("l", str(secret.parent)), hardlink("stolen", "l/secret")],
    )
    assert_refused(
        tarball,
        tmp_path / "cache",
        "stolen",
        "is a hard link to 'l/secret', which goes through symlink 'l' -> '<tmp>/outside' that points outside",
    )
    assert secret.stat().st_nlink == 1


@pytest.mark.parametrize("link_kind", ["absolute", "relative"])
def test_write_through_symlink_refused(tmp_path: Path, link_kind: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = str(outside) if link_kind == "absolute" else "../../outside"
    phrase = "points outside the destination" if link_kind == "absolute" else "escapes the destination"
    tarball = make_tar(tmp_path / "evil.tar", [symlink("bin", link), reg("bin/passwd", b"pwned")])
    assert_refused(tarball, tmp_path / "cache", "bin/passwd", phrase)
    assert list(outside.iterdir()) == []


def test_write_through_symlink_replaced_file_refused(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("host file")
    tarball = make_tar(
        tmp_path / "evil.tar",
        [symlink("etc/motd", str(victim)), reg("etc/motd", b"pwned")],
    )
    assert_refused(tarball, tmp_path / "cache", "etc/motd", "goes through symlink 'etc/motd' -> '<tmp>/victim'")
    assert victim.read_text() == "host file"


def test_chained_symlinks_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tarball = make_tar(
        tmp_path / "evil.tar",
        [symlink("a", "b/c"), symlink("b", "."), symlink("c", str(outside)), reg("a/x", b"pwned")],
    )
    assert_refused(tarball, tmp_path / "cache", "a/x", "goes through symlink 'c' -> '<tmp>/outside'")
    assert list(outside.iterdir()) == []


def test_symlink_loop_refused(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "loop.tar", [symlink("a", "b"), symlink("b", "a"), reg("a/x", b"")])
    assert_refused(tarball, tmp_path / "cache", "a/x", "goes through a symlink loop")


# --- damaged input ----------------------------------------------------------------------------------------------


def assert_unreadable(tarball: Path, cache: Path) -> None:
    with pytest.raises(ArchiveError) as excinfo:
        unpack(tarball, cache)
    message = str(excinfo.value)
    assert message.startswith(f"rootfs tarball '{tarball}' is not a readable tar archive: ")
    assert "\n" not in message
    assert temp_dirs(cache) == []
    assert tree_dirs(cache) == []


def test_random_bytes_refused(tmp_path: Path) -> None:
    tarball = tmp_path / "junk.tar.gz"
    tarball.write_bytes(os.urandom(4096))
    assert_unreadable(tarball, tmp_path / "cache")


def test_empty_file_refused(tmp_path: Path) -> None:
    tarball = tmp_path / "empty.tar"
    tarball.write_bytes(b"")
    assert_unreadable(tarball, tmp_path / "cache")


def big_entries() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [reg(f"data/f{i}", os.urandom(8192)) for i in range(16)]


@pytest.mark.parametrize(("suffix", "mode"), [(s, m) for s, m in FORMATS if s.startswith(".tar")])
def test_truncated_archive_refused(tmp_path: Path, suffix: str, mode: str) -> None:
    whole = make_tar(tmp_path / f"whole{suffix}", big_entries(), mode).read_bytes()
    tarball = tmp_path / f"cut{suffix}"
    tarball.write_bytes(whole[: len(whole) * 2 // 3])
    assert_unreadable(tarball, tmp_path / "cache")


def test_plain_tar_cut_at_member_boundary_refused(tmp_path: Path) -> None:
    """tarfile alone would accept this as a shorter archive and cache a partial rootfs."""
    whole = make_tar(tmp_path / "whole.tar", [reg("a", b"x" * 512), reg("b", b"y" * 512)]).read_bytes()
    tarball = tmp_path / "cut.tar"
    tarball.write_bytes(whole[:1024])  # header + data of "a", nothing after
    assert_unreadable(tarball, tmp_path / "cache")


def test_corrupt_compressed_payload_refused(tmp_path: Path) -> None:
    data = bytearray(make_tar(tmp_path / "whole.tar.gz", big_entries(), "w:gz").read_bytes())
    data[-6] ^= 0xFF  # inside the gzip CRC trailer, after the tar end marker
    tarball = tmp_path / "crc.tar.gz"
    tarball.write_bytes(bytes(data))
    assert_unreadable(tarball, tmp_path / "cache")


def test_missing_tarball(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tar"
    with pytest.raises(ArchiveError, match="cannot be read") as excinfo:
        unpack(missing, tmp_path / "cache")
    assert str(missing) in str(excinfo.value)


def test_directory_is_not_a_tarball(tmp_path: Path) -> None:
    with pytest.raises(ArchiveError, match="not a regular file"):
        unpack(tmp_path, tmp_path / "cache")


# --- concurrency ------------------------------------------------------------------------------------------------

# Imports archive through the package, since it imports sibling engine modules (argv[1], its path, is unused).
CHILD = """
import json, os, sys, time
from pathlib import Path
from pytest_lonely.sandbox import archive
ready, go, tarball, cache = sys.argv[2:]
Path(ready).touch()
deadline = time.monotonic() + 30
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("never got the go signal")
    time.sleep(0.001)
dest, created = archive.unpack(Path(tarball), Path(cache))
print(json.dumps([str(dest), created]))
"""


def test_concurrent_first_use(tmp_path: Path) -> None:
    tarball = make_tar(tmp_path / "rootfs.tar.gz", busybox_like() + big_entries() * 4, "w:gz")
    cache = tmp_path / "cache"
    go = tmp_path / "go"
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                pytest_lonely.sandbox.archive.__file__,
                str(r),
                str(go),
                str(tarball),
                str(cache),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in ready
    ]
    try:
        deadline = time.monotonic() + 30
        while not all(r.exists() for r in ready):
            assert time.monotonic() < deadline, "children never became ready"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.005)
        go.touch()
        outputs = [p.communicate(timeout=30) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    results = [json.loads(out) for out, _err in outputs]
    assert results[0][0] == results[1][0] == str(cache / sha_prefix(tarball))
    assert sorted(created for _dest, created in results) == [False, True]
    assert temp_dirs(cache) == []
    assert tree_dirs(cache) == [sha_prefix(tarball)]
    assert os.readlink(Path(results[0][0]) / "bin/sh") == "/bin/busybox"
