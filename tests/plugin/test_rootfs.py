"""The container's root filesystem, end to end: real inner pytest sessions, real namespaces, real mounts.

Values the inner tests compare against (the host's view of things) are computed by the inner conftest at import
time, which happens in the inner pytest *parent*, on the host, before any container is forked; the isolated tests
then check them from inside.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import textwrap
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.host import FIXTURE_ROOTFS
from helpers.inner import RunLonely

# Computed on the host by the inner conftest; the isolated tests check them from inside.
HOST_CONFTEST = """
import os
import sys

import pytest_lonely

HOST_CWD = os.getcwd()
HOST_PATHS = sorted(
    {
        p
        for p in [
            *sys.path,
            sys.executable,
            os.path.realpath(sys.executable),
            sys.prefix,
            sys.base_prefix,
            os.path.dirname(pytest_lonely.__file__),  # an editable install's checkout need not be on sys.path
        ]
        if p and os.path.isabs(p) and os.path.exists(p)
    }
)
"""

# Checks that hold for every root: host view, skeleton, complete root.
ALWAYS_CHECKS = """
import os
import stat
import sys

from conftest import HOST_CWD, HOST_PATHS, HOST_TMP_FILE, ROOTDIR

DEV_EXPECTED = {
    "null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm", "fd", "stdin", "stdout", "stderr",
}


def fstype_of(mountpoint):
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mountpoint:
                found = fields[fields.index("-") + 1]
    return found


def check_proc():
    pids = sorted(int(e) for e in os.listdir("/proc") if e.isdigit())
    assert pids == [1], f"/proc shows more than the container: {pids}"
    assert os.getpid() == 1
    with open("/proc/1/cmdline", "rb") as f:
        argv0 = f.read().split(b"\\0")[0]
    assert os.path.basename(argv0).startswith(b"python"), argv0


def check_tmp():
    assert fstype_of("/tmp") == "tmpfs"
    assert not os.path.lexists(HOST_TMP_FILE), "a host file in /tmp is visible inside"
    # The only things in /tmp are the paths down to what must stay reachable: the rootdir (pytester's
    # lives under /tmp) and the interpreter and sys.path entries (a CI checkout may live there too).
    wanted = [os.path.realpath(p) for p in (ROOTDIR, *HOST_PATHS)]
    wanted = [p for p in wanted if p.startswith("/tmp/")]
    for dirpath, dirnames, filenames in os.walk("/tmp"):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            on_the_way = any(w == path or w.startswith(path + "/") or path.startswith(w + "/") for w in wanted)
            assert on_the_way, f"{path} is in the container's /tmp but nothing put it there"
        dirnames[:] = [d for d in dirnames if not any(os.path.join(dirpath, d) == w for w in wanted)]


def check_reachable():
    missing = [p for p in HOST_PATHS if not os.path.exists(p)]
    assert not missing, f"interpreter or sys.path entries not reachable: {missing}"
    assert os.path.isfile(os.path.join(ROOTDIR, "conftest.py")), "the rootdir is not reachable"
    assert os.getcwd() == HOST_CWD
    import colorsys  # a lazy stdlib import, never imported by pytest

    assert colorsys.rgb_to_hsv(1.0, 0.0, 0.0)[2] == 1.0


def check_dev():
    names = set(os.listdir("/dev"))
    assert DEV_EXPECTED <= names, f"missing from /dev: {sorted(DEV_EXPECTED - names)}"
    for name in ("fd", "stdin", "stdout", "stderr", "ptmx"):
        assert os.path.islink("/dev/" + name), name
    for name in ("null", "zero", "full", "random", "urandom", "tty"):
        assert stat.S_ISCHR(os.stat("/dev/" + name).st_mode), name
    blocks = []
    for top, dirs, files in os.walk("/dev"):
        for name in dirs + files:
            path = os.path.join(top, name)
            if stat.S_ISBLK(os.lstat(path).st_mode):
                blocks.append(path)
    assert not blocks, f"block devices inside: {blocks}"
    assert fstype_of("/dev/pts") == "devpts"
    master, slave = os.openpty()
    try:
        assert os.ttyname(slave).startswith("/dev/pts/")
        os.write(slave, b"ping\\n")
        assert os.read(master, 100).startswith(b"ping")
    finally:
        os.close(master)
        os.close(slave)
    with open("/dev/shm/lonely-probe", "w") as f:
        f.write("x")
    os.unlink("/dev/shm/lonely-probe")
    with open("/dev/null", "wb") as f:
        assert f.write(b"discarded") == 9
    with open("/dev/zero", "rb") as f:
        assert f.read(4096) == bytes(4096)


def check_always():
    check_proc()
    check_tmp()
    check_reachable()
    check_dev()
"""


def inner_conftest(pytester: pytest.Pytester, **constants: object) -> None:
    lines = "".join(f"{name} = {value!r}\n" for name, value in constants.items())
    pytester.makeconftest(HOST_CONFTEST + "\nROOTDIR = " + repr(str(pytester.path)) + "\n" + lines)


def uniq() -> str:
    return uuid.uuid4().hex[:12]


def junit_messages(path: Path) -> dict[str, str]:
    """Test name -> text of its failure/error (message and details), '' for a passing test."""
    messages: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        parts = []
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                parts += [child.tag, child.get("message", ""), child.text or ""]
        messages[case.get("name", "")] = "\n".join(parts)
    return messages


def snapshot(root: Path) -> list[tuple[str, str, int, bytes | str]]:
    """Every entry under ``root``: path, type, mode and content (or link target)."""
    entries: list[tuple[str, str, int, bytes | str]] = []
    for top, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(top, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if path.is_symlink():
                entries.append((rel, "link", st.st_mode, os.readlink(path)))
            elif path.is_dir():
                entries.append((rel, "dir", st.st_mode, b""))
            else:
                entries.append((rel, "file", st.st_mode, path.read_bytes()))
    return sorted(entries)


def pack(src: Path, dest: Path, mode: str) -> Path:
    """A tarball of ``src`` with members ``./...``; symlinks (absolute ones too) stay symlinks."""
    with tarfile.open(dest, mode) as tar:
        tar.add(src, arcname=".")
    return dest


@pytest.fixture
def host_tmp_file() -> Iterator[str]:
    path = f"/tmp/lonely-host-{uniq()}"
    Path(path).write_text("host only\n")
    yield path
    os.unlink(path)


@pytest.fixture
def host_srv_file() -> Iterator[str]:
    path = f"/srv/lonely-host-{uniq()}"
    Path(path).write_text("host only\n")
    yield path
    os.unlink(path)


# --- 1. host view ----------------------------------------------------------------------------------------------


def test_host_view_shows_host_and_discards_writes(
    pytester: pytest.Pytester, run_lonely: RunLonely, host_srv_file: str
) -> None:
    """Without rootfs every host file is visible, and writes anywhere vanish with the container."""
    tag = uniq()
    canaries = [
        f"/etc/lonely-canary-{tag}",
        f"/var/lonely-canary-{tag}",
        f"/root/lonely-canary-{tag}",
        f"/opt/lonely-canary-{tag}",
        f"/usr/local/lonely-canary-{tag}",
        str(pytester.path / f"lonely-canary-{tag}"),
    ]
    inner_conftest(
        pytester,
        CANARIES=canaries,
        HOST_SRV_FILE=host_srv_file,
        HOST_OS_RELEASE=Path("/etc/os-release").read_text(),
        HOST_TOP=sorted(os.listdir("/")),
        HOST_ETC=sorted(os.listdir("/etc")),
    )
    pytester.makepyfile(
        test_host=textwrap.dedent(
            """
            import errno
            import os
            import subprocess
            import sys

            import pytest
            from conftest import CANARIES, HOST_ETC, HOST_OS_RELEASE, HOST_SRV_FILE, HOST_TOP


            @pytest.mark.isolated
            def test_1_sees_host_and_writes(container):
                assert container.rootfs is None
                with open("/etc/os-release") as f:
                    assert f.read() == HOST_OS_RELEASE
                assert sorted(os.listdir("/")) == HOST_TOP
                assert sorted(os.listdir("/etc")) == HOST_ETC
                with open(HOST_SRV_FILE) as f:
                    assert f.read() == "host only\\n"
                out = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True)
                assert out.stdout == "42\\n", out.stderr
                written = []
                for path in CANARIES:
                    try:
                        with open(path, "w") as f:
                            f.write("canary")
                    except OSError as exc:
                        assert exc.errno == errno.EROFS, (path, exc)
                        continue
                    with open(path) as f:
                        assert f.read() == "canary"
                    written.append(path)
                print("written:", written)


            @pytest.mark.isolated
            def test_2_does_not_see_first_writes():
                leaked = [p for p in CANARIES if os.path.lexists(p)]
                assert not leaked, f"writes of an earlier container are visible: {leaked}"
            """
        )
    )
    result = run_lonely("-p", "no:randomly", "-v", timeout=60)
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*test_1_sees_host_and_writes PASSED*", "*test_2_does_not_see_first_writes PASSED*"])
    leaked = [p for p in canaries if os.path.lexists(p)]
    assert not leaked, f"writes inside the container reached the host: {leaked}"


# --- 2. skeleton root ------------------------------------------------------------------------------------------


def test_skeleton_rootfs(pytester: pytest.Pytester, run_lonely: RunLonely, host_srv_file: str) -> None:
    """A root without usr/ borrows the host's system dirs read-only but shows nothing else of the host."""
    before = snapshot(FIXTURE_ROOTFS)
    tag = uniq()
    inner_conftest(pytester, FIXTURE=str(FIXTURE_ROOTFS), HOST_SRV_FILE=host_srv_file, TAG=tag)
    pytester.makepyfile(
        test_skeleton=textwrap.dedent(
            """
            import errno
            import os
            import shutil
            import subprocess
            from pathlib import Path

            import pytest
            from conftest import FIXTURE, HOST_SRV_FILE, TAG


            @pytest.mark.isolated(rootfs=FIXTURE)
            def test_inside(container):
                assert container.rootfs == Path(FIXTURE)
                listing = subprocess.run(["ls", "/"], capture_output=True, text=True, check=True).stdout.split()
                usual = {"bin", "dev", "etc", "home", "lib", "proc", "root", "sys", "tmp", "usr", "var"}
                assert usual <= set(listing), sorted(usual - set(listing))
                with open("/etc/os-release") as f:
                    assert 'NAME="Lonely Linux"' in f.read()
                ps = subprocess.run(["ps", "-e"], capture_output=True, text=True, check=True).stdout
                lines = ps.strip().splitlines()
                assert len(lines) == 3 and "PID" in lines[0], ps
                out = subprocess.run(["sh", "-c", "echo hi"], capture_output=True, text=True, check=True)
                assert out.stdout == "hi\\n"
                assert not os.path.lexists(HOST_SRV_FILE), "a host file in /srv is visible"
                assert not os.path.lexists("/etc/debian_version"), "the host's /etc is visible"
                assert sorted(os.listdir("/srv")) == [".keep"]

                # Writes land in a throwaway layer, never in the source tree.
                Path(f"/etc/lonely-canary-{TAG}").write_text("new")
                with open("/etc/hosts", "a") as f:
                    f.write("10.9.8.7 lonely-canary\\n")
                os.unlink("/etc/hostname")
                os.chmod("/etc/passwd", 0o600)
                Path("/home/lonely/made-inside").mkdir()
                Path("/var/log/lonely.log").write_text("log")
                Path("/srv/.keep").write_text("overwritten")
                shutil.rmtree("/opt")
                # The borrowed host /usr is read-only.
                with pytest.raises(OSError) as exc:
                    Path(f"/usr/lonely-canary-{TAG}").write_text("x")
                assert exc.value.errno == errno.EROFS
            """
        )
    )
    result = run_lonely(timeout=60)
    result.assert_outcomes(passed=1)
    assert snapshot(FIXTURE_ROOTFS) == before, "writes inside the container changed the rootfs directory"
    assert not os.path.lexists(f"/usr/lonely-canary-{tag}")


# --- 3. complete root ------------------------------------------------------------------------------------------


def test_complete_root_is_not_the_host(pytester: pytest.Pytester, run_lonely: RunLonely, busybox_root: Path) -> None:
    """A root with usr/ replaces the host's system dirs; the interpreter keeps working, lazy imports included."""
    inner_conftest(pytester, BUSYBOX_ROOT=str(busybox_root))
    pytester.makepyfile(
        test_complete=textwrap.dedent(
            """
            import os
            import subprocess
            import sys
            from pathlib import Path

            import pytest
            from conftest import BUSYBOX_ROOT, HOST_CWD, ROOTDIR


            @pytest.mark.isolated(rootfs=BUSYBOX_ROOT)
            def test_busybox_userland(container):
                assert container.rootfs == Path(BUSYBOX_ROOT)
                assert os.readlink("/bin/sh") == "/bin/busybox"
                help_text = subprocess.run(["sh", "--help"], capture_output=True, text=True)
                assert "BusyBox" in help_text.stdout + help_text.stderr
                out = subprocess.run(["sh", "-c", "echo hi"], capture_output=True, text=True, check=True)
                assert out.stdout == "hi\\n"
                assert not os.path.lexists("/usr/bin/apt-get"), "the host's /usr is visible"
                with open("/etc/os-release") as f:
                    assert "BusyBox" in f.read()
                assert os.path.isfile(os.path.join(ROOTDIR, "test_complete.py"))
                assert os.getcwd() == HOST_CWD


            @pytest.mark.isolated(rootfs=BUSYBOX_ROOT)
            def test_lazy_imports_work():
                assert "wave" not in sys.modules and "colorsys" not in sys.modules
                import colorsys
                import json
                import wave

                assert json.loads("[1]") == [1]
                assert wave.WAVE_FORMAT_PCM == 1
                assert colorsys.rgb_to_hsv(0.0, 0.0, 1.0)[0] > 0
            """
        ),
        # A C extension whose shared library lives in the host's /usr/lib is not found in a complete
        # root, unless it is already loaded when the container forks: the documented way is to import
        # it at module level (collection happens in the parent) or in conftest.py.
        test_preloaded=textwrap.dedent(
            """
            import sqlite3

            import pytest
            from conftest import BUSYBOX_ROOT


            @pytest.mark.isolated(rootfs=BUSYBOX_ROOT)
            def test_extension_imported_before_the_fork():
                assert sqlite3.connect(":memory:").execute("select 6 * 7").fetchone() == (42,)
            """
        ),
    )
    result = run_lonely("-v", timeout=60)
    result.stdout.fnmatch_lines(["*test_busybox_userland PASSED*"])
    result.stdout.fnmatch_lines(["*test_lazy_imports_work PASSED*"])
    result.stdout.fnmatch_lines(["*test_extension_imported_before_the_fork PASSED*"])
    result.assert_outcomes(passed=3)


# --- 4. tarballs -----------------------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh tarball cache for the inner sessions (they inherit the environment)."""
    path = tmp_path / "cache"
    monkeypatch.setenv("PYTEST_LONELY_CACHE_DIR", str(path))
    return path


def unpacked_dirs(cache: Path) -> list[str]:
    return sorted(e.name for e in cache.iterdir() if e.is_dir() and not e.name.startswith("."))


def leftovers(cache: Path) -> list[str]:
    """Anything in the cache that is neither an unpacked tree nor a lock file."""
    return sorted(e.name for e in cache.iterdir() if e.name.startswith(".") or not (e.is_dir() or e.suffix == ".lock"))


def test_tarball_rootfs(
    pytester: pytest.Pytester, run_lonely: RunLonely, busybox_root: Path, tmp_path: Path, cache: Path
) -> None:
    """rootfs=TARBALL in every compression; each distinct tarball is unpacked once into the cache."""
    tarballs = {
        "tar": pack(busybox_root, tmp_path / "busybox.tar", "w"),
        "gz": pack(busybox_root, tmp_path / "busybox.tar.gz", "w:gz"),
        "xz": pack(busybox_root, tmp_path / "busybox.tar.xz", "w:xz"),
        "skeleton": pack(FIXTURE_ROOTFS, tmp_path / "skeleton.tar.gz", "w:gz"),
    }
    with tarfile.open(tarballs["tar"]) as tar:
        assert tar.getmember("./bin/sh").linkname == "/bin/busybox"
    inner_conftest(pytester, TARBALLS={k: str(v) for k, v in tarballs.items()})
    pytester.makepyfile(
        test_tarballs=textwrap.dedent(
            """
            import os
            import subprocess
            from pathlib import Path

            import pytest
            from conftest import TARBALLS


            def check_busybox(container, kind):
                assert container.rootfs == Path(TARBALLS[kind]).resolve()
                assert os.readlink("/bin/sh") == "/bin/busybox"
                assert not os.path.lexists("/usr/bin/apt-get")
                with open("/etc/os-release") as f:
                    assert "BusyBox" in f.read()
                out = subprocess.run(["sh", "-c", "echo hi"], capture_output=True, text=True, check=True)
                assert out.stdout == "hi\\n"


            @pytest.mark.isolated(rootfs=TARBALLS["tar"])
            def test_tar(container):
                check_busybox(container, "tar")


            @pytest.mark.isolated(rootfs=TARBALLS["gz"])
            def test_gz_first(container):
                check_busybox(container, "gz")
                Path("/etc/written-inside").write_text("x")


            @pytest.mark.isolated(rootfs=TARBALLS["gz"])
            def test_gz_second(container):
                check_busybox(container, "gz")
                assert not os.path.exists("/etc/written-inside")


            @pytest.mark.isolated(rootfs=TARBALLS["xz"])
            def test_xz(container):
                check_busybox(container, "xz")


            @pytest.mark.isolated(rootfs=TARBALLS["skeleton"])
            def test_skeleton_tarball(container):
                assert container.rootfs == Path(TARBALLS["skeleton"]).resolve()
                with open("/etc/os-release") as f:
                    assert "Lonely Linux" in f.read()
                ps = subprocess.run(["ps", "-e"], capture_output=True, text=True, check=True).stdout
                assert len(ps.strip().splitlines()) == 3, ps
            """
        )
    )
    result = run_lonely("-p", "no:randomly", timeout=90)
    result.assert_outcomes(passed=5)
    # Four distinct tarballs, five tests: one tree each, nothing half-built left over.
    assert len(unpacked_dirs(cache)) == 4, sorted(os.listdir(cache))
    assert leftovers(cache) == []
    # A second session reuses the trees instead of unpacking again.
    inodes = {name: (cache / name).stat().st_ino for name in unpacked_dirs(cache)}
    result = run_lonely("-k", "gz_second or skeleton", timeout=60)
    result.assert_outcomes(passed=2, deselected=3)
    assert {name: (cache / name).stat().st_ino for name in unpacked_dirs(cache)} == inodes


def test_unsafe_and_corrupt_tarballs(
    pytester: pytest.Pytester, run_lonely: RunLonely, tmp_path: Path, cache: Path
) -> None:
    """Hostile or broken tarballs error their own tests, write nothing, and leave the session healthy."""
    tag = uniq()
    absolute = f"/etc/lonely-evil-{tag}"

    def evil(name: str, member: str) -> Path:
        path = tmp_path / name
        with tarfile.open(path, "w") as tar:
            for entry, data in (("etc/os-release", b"NAME=evil\n"), (member, b"pwned\n")):
                info = tarfile.TarInfo(entry)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(path) as tar:
            assert tar.getnames()[-1] == member
        return path

    dotdot = evil("dotdot.tar", "../evil")
    absolute_tar = evil("absolute.tar", absolute)
    corrupt = tmp_path / "x.tar.gz"
    corrupt.write_bytes(os.urandom(4096))
    inner_conftest(pytester, DOTDOT=str(dotdot), ABSOLUTE=str(absolute_tar), CORRUPT=str(corrupt))
    pytester.makepyfile(
        test_unsafe=textwrap.dedent(
            """
            import pytest
            from conftest import ABSOLUTE, CORRUPT, DOTDOT


            @pytest.mark.isolated(rootfs=DOTDOT)
            def test_dotdot():
                pass


            @pytest.mark.isolated(rootfs=ABSOLUTE)
            def test_absolute():
                pass


            @pytest.mark.isolated(rootfs=CORRUPT)
            def test_corrupt():
                pass


            @pytest.mark.isolated
            def test_healthy_after():
                pass


            def test_plain_after():
                pass
            """
        )
    )
    xml = tmp_path / "junit.xml"
    result = run_lonely("-p", "no:randomly", f"--junitxml={xml}", timeout=60)
    result.assert_outcomes(passed=2, errors=3)
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    messages = junit_messages(xml)
    assert "member '../evil'" in messages["test_dotdot"], messages["test_dotdot"]
    assert f"member '{absolute}'" in messages["test_absolute"], messages["test_absolute"]
    for name in ("test_dotdot", "test_absolute"):
        assert "escapes" in messages[name] or "refused" in messages[name], messages[name]
    assert str(corrupt) in messages["test_corrupt"], messages["test_corrupt"]
    assert "Traceback" not in messages["test_corrupt"], messages["test_corrupt"]
    assert messages["test_healthy_after"] == messages["test_plain_after"] == ""
    # Nothing was written: not next to the cache, not on the host, no tree and no temp dir in the cache.
    assert not os.path.lexists(absolute)
    assert not [p for p in tmp_path.rglob("*evil*") if p.name not in ("dotdot.tar", "absolute.tar")]
    assert not cache.exists() or (unpacked_dirs(cache) == [] and leftovers(cache) == [])


def test_concurrent_first_use(pytester: pytest.Pytester, busybox_root: Path, tmp_path: Path, cache: Path) -> None:
    """Two sessions racing to unpack the same tarball both get a complete tree, and it exists once."""
    tarball = pack(busybox_root, tmp_path / "race.tar.xz", "w:xz")
    inner_conftest(pytester, TARBALL=str(tarball))
    pytester.makepyfile(
        test_race=textwrap.dedent(
            """
            import os

            import pytest
            from conftest import TARBALL


            @pytest.mark.isolated(rootfs=TARBALL)
            def test_race():
                assert os.readlink("/bin/sh") == "/bin/busybox"
                assert os.path.isfile("/bin/busybox")
            """
        )
    )
    env = {**os.environ, "PYTEST_LONELY_CACHE_DIR": str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", f"--basetemp={tmp_path / n}"],
            cwd=pytester.path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in ("bt1", "bt2")
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=90)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out
        assert "1 passed" in out, out
    assert len(unpacked_dirs(cache)) == 1, sorted(os.listdir(cache))
    assert leftovers(cache) == []


# --- 5. always: /proc, /tmp, /dev, reachability ----------------------------------------------------------------


def test_proc_tmp_dev_in_every_root(
    pytester: pytest.Pytester, run_lonely: RunLonely, busybox_root: Path, host_tmp_file: str
) -> None:
    """Whatever the root, /proc, /tmp and /dev are the container's own, and the test's files stay reachable."""
    tag = uniq()
    inner_conftest(
        pytester, HOST_TMP_FILE=host_tmp_file, TAG=tag, FIXTURE=str(FIXTURE_ROOTFS), BUSYBOX_ROOT=str(busybox_root)
    )
    pytester.makepyfile(always_checks=ALWAYS_CHECKS)
    pytester.makepyfile(
        test_always=textwrap.dedent(
            """
            import os

            import pytest
            from always_checks import check_always
            from conftest import BUSYBOX_ROOT, FIXTURE, TAG

            ROOTS = [
                pytest.param("host", marks=pytest.mark.isolated),
                pytest.param("skeleton", marks=pytest.mark.isolated(rootfs=FIXTURE)),
                pytest.param("busybox", marks=pytest.mark.isolated(rootfs=BUSYBOX_ROOT)),
            ]


            @pytest.mark.parametrize("root", ROOTS)
            def test_1_checks_and_writes_tmp(root):
                check_always()
                for path in (f"/tmp/lonely-inside-{TAG}", f"/var/tmp/lonely-inside-{TAG}"):
                    if os.path.isdir(os.path.dirname(path)):
                        with open(path, "w") as f:
                            f.write("inside")


            @pytest.mark.parametrize("root", ROOTS)
            def test_2_tmp_was_discarded(root):
                assert not os.path.lexists(f"/tmp/lonely-inside-{TAG}")
                assert not os.path.lexists(f"/var/tmp/lonely-inside-{TAG}")
            """
        )
    )
    result = run_lonely("-p", "no:randomly", "-v", timeout=90)
    result.assert_outcomes(passed=6)
    assert not os.path.lexists(f"/tmp/lonely-inside-{tag}")
    assert not os.path.lexists(f"/var/tmp/lonely-inside-{tag}")


# --- 6. precedence and relative paths --------------------------------------------------------------------------


def make_labelled_roots(base: Path) -> None:
    """Skeleton roots a, b, c in several directories, each naming itself in /etc/os-release.

    Resolving a relative path against the wrong directory then boots a different, recognisable root instead of
    failing with "does not exist".
    """
    for where in (".", "proj", "proj/cfg", "proj/tests"):
        for letter in "abc":
            label = os.path.normpath(f"{where}/{letter}")
            (base / label / "etc").mkdir(parents=True)
            (base / label / "etc" / "os-release").write_text(f"NAME={label}\n")


PRECEDENCE_TESTS = """
import os
from pathlib import Path

import pytest

BASE = Path(__file__).resolve().parent.parent.parent


def booted():
    with open("/etc/os-release") as f:
        return f.read().strip().removeprefix("NAME=")


def test_default(container, pytestconfig):
    # ini names a (relative to the ini's directory); --lonely-rootfs b (relative to the rootdir) overrides it.
    expected = "proj/b" if pytestconfig.getoption("lonely_rootfs") else "proj/cfg/a"
    assert (booted(), container.rootfs) == (expected, BASE / expected)


@pytest.mark.isolated(rootfs="c")
def test_marker(container):
    # The marker beats both, and is relative to the rootdir (not the cwd, not the test's directory).
    assert (booted(), container.rootfs) == ("proj/c", BASE / "proj/c")
"""


def test_rootfs_precedence_and_relative_paths(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """marker > --lonely-rootfs > lonely_rootfs; marker and CLI resolve against the rootdir, ini against its file."""
    make_labelled_roots(pytester.path)
    (pytester.path / "proj" / "cfg" / "pytest.ini").write_text("[pytest]\nlonely_rootfs = a\n")
    (pytester.path / "proj" / "tests" / "test_precedence.py").write_text(PRECEDENCE_TESTS)
    common = ("-c", "proj/cfg/pytest.ini", "--rootdir=proj", "proj/tests", "-v")
    result = run_lonely(*common, timeout=60)
    result.assert_outcomes(passed=2)
    result = run_lonely(*common, "--lonely-rootfs", "b", timeout=60)
    result.assert_outcomes(passed=2)


def test_missing_rootfs(pytester: pytest.Pytester, run_lonely: RunLonely, tmp_path: Path) -> None:
    """A rootfs that does not exist names the path and where it was set: per test for a marker, at startup else."""
    pytester.makepyfile(
        test_missing=textwrap.dedent(
            """
            import pytest


            @pytest.mark.isolated(rootfs="no-such-root")
            def test_marker_missing():
                pass


            @pytest.mark.isolated
            def test_fine():
                pass
            """
        )
    )
    xml = tmp_path / "junit.xml"
    result = run_lonely("-p", "no:randomly", f"--junitxml={xml}", timeout=60)
    result.assert_outcomes(passed=1, errors=1)
    message = junit_messages(xml)["test_marker_missing"]
    assert str(pytester.path / "no-such-root") in message, message
    assert "marker" in message, message

    result = run_lonely("--lonely-rootfs", "cli-missing", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "--lonely-rootfs" in err, err
    assert str(pytester.path / "cli-missing") in err, err

    (pytester.path / "sub").mkdir()
    (pytester.path / "sub" / "pytest.ini").write_text("[pytest]\nlonely_rootfs = ini-missing\n")
    result = run_lonely("-c", "sub/pytest.ini", "--rootdir=.", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    err = result.stderr.str()
    assert "lonely_rootfs" in err, err
    assert str(pytester.path / "sub" / "ini-missing") in err, err
