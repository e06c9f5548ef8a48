"""What a real unprivileged user needs to run pytest-lonely: an interpreter, packages and directories it may read.

The test suite's own virtualenv may live where uid 65534 cannot look (CI
clones under ``/root``, mode 0700), so the rootless tests build their own,
without network: Debian's ``/usr/bin/python3`` in a ``venv --without-pip``
whose site-packages receive copies of the pure-Python distributions pytest
needs (found through their installed file lists) and of ``pytest_lonely``
from this repository, with a minimal ``dist-info`` that declares the
``pytest11`` entry point so that ``-p lonely`` resolves as it does after
``pip install``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from helpers.host import BUSYBOX, BUSYBOX_APPLETS, FIXTURE_ROOTFS, REPO

SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY = 65534
#: Every test that runs pytest as uid 65534 carries it (plugin/conftest.py adds it to users of ``nobody_env``), so
#: that under ``pytest -n 2 --dist loadgroup`` they run on one worker, one at a time: the rootless tests watch
#: what uid 65534 leaves in /tmp, and the environment is built once.
XDIST_GROUP = pytest.mark.xdist_group("nobody")
#: What the plugin itself needs besides pytest and pytest's own requirements.
PLUGIN_DISTRIBUTIONS = ("pluggy",)
#: A plain environment for the inner sessions: nothing of the outer pytest (PYTEST_ADDOPTS, coverage, xdist).
CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
}


def world_tempdir(prefix: str) -> Path:
    """A fresh directory directly under /tmp that every user may enter and read (mkdtemp makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def make_world_readable(top: Path) -> None:
    """o+r on files, o+rx on directories and executables, whatever umask the CI runs with."""
    for dirpath, _dirnames, filenames in os.walk(top):
        os.chmod(dirpath, os.stat(dirpath).st_mode | 0o555)
        for name in filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                extra = 0o555 if st.st_mode & stat.S_IXUSR else 0o444
                os.chmod(path, st.st_mode | extra)


def readable_by_others(path: Path) -> bool:
    """Whether a user with no relation to the owner could read ``path`` (every ancestor searchable)."""
    path = path.resolve()
    if not os.stat(path).st_mode & stat.S_IROTH:
        return False
    return all(os.stat(p).st_mode & stat.S_IXOTH for p in [path, *path.parents])


def chown_tree(top: Path, uid: int, gid: int) -> None:
    os.lchown(top, uid, gid)
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            os.lchown(os.path.join(dirpath, name), uid, gid)


def _copy_distribution(name: str, site: Path) -> None:
    dist = importlib.metadata.distribution(name)
    files = dist.files
    if not files:
        raise RuntimeError(f"{name} has no installed file list (RECORD); cannot copy it into the rootless venv")
    for rel in files:
        if ".." in rel.parts or "__pycache__" in rel.parts:  # console scripts and stale bytecode
            continue
        source = Path(str(dist.locate_file(rel)))
        if not source.is_file():
            continue
        target = site / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def distributions() -> list[str]:
    """What ``python -m pytest -p lonely`` imports: pytest, its requirements that apply here, the plugin's own.

    Read from pytest's metadata, since they differ between releases (pygments is required from pytest 8.4 on,
    exceptiongroup and tomli only below Python 3.11).
    """
    from packaging.requirements import Requirement

    names = ["pytest"]
    for text in importlib.metadata.requires("pytest") or ():
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            names.append(req.name)
    return names + [name for name in PLUGIN_DISTRIBUTIONS if name not in names]


class SystemPythonUnfit(Exception):
    """The system interpreter cannot host this pytest (too old, or no venv module)."""


def build_venv(dest: Path) -> Path:
    """Create the venv in ``dest`` and return its interpreter; raises with the tool's output on failure."""
    made = subprocess.run(
        [str(SYSTEM_PYTHON), "-c", "import sys, venv; assert sys.version_info >= (3, 10), sys.version"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    if made.returncode:
        raise SystemPythonUnfit(f"{SYSTEM_PYTHON} cannot run this pytest in a venv: {made.stderr.strip()}")
    subprocess.run(
        [str(SYSTEM_PYTHON), "-m", "venv", "--without-pip", str(dest)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    python = dest / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
            env=CLEAN_ENV,
        ).stdout.strip()
    )
    for name in distributions():
        _copy_distribution(name, site)
    shutil.copytree(REPO / "pytest_lonely", site / "pytest_lonely", ignore=shutil.ignore_patterns("__pycache__"))
    info = site / "pytest_lonely-0.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pytest-lonely\nVersion: 0.0.0\n")
    (info / "entry_points.txt").write_text("[pytest11]\nlonely = pytest_lonely.plugin\n")
    # Bytecode once, as root: uid 65534 cannot write it and would compile everything on every run.
    # Pygments' hundreds of lexers are skipped; pytest imports only a few of its modules.
    subprocess.run(
        [str(python), "-m", "compileall", "-q", "-x", "/pygments/lexers/", str(site)],
        check=True,
        capture_output=True,
        timeout=120,
        env=CLEAN_ENV,
    )
    make_world_readable(dest)
    check = subprocess.run(
        [str(python), "-c", "import pytest, pytest_lonely.plugin"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=CLEAN_ENV,
    )
    if check.returncode:
        raise RuntimeError(f"the rootless venv cannot import pytest-lonely:\n{check.stderr}")
    return python


def build_busybox_root(dest: Path, busybox: str, applets: Sequence[str]) -> Path:
    """A complete root (it has usr/) holding only a static BusyBox and nothing of the host, readable by all."""
    for d in ("bin", "usr/bin", "etc", "proc", "dev", "tmp", "sys", "root"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, dest / "bin" / "busybox")
    (dest / "bin" / "busybox").chmod(0o755)
    for applet in applets:
        (dest / "bin" / applet).symlink_to("/bin/busybox")
    (dest / "etc" / "os-release").write_text('NAME="BusyBox"\nID=busybox\n')
    make_world_readable(dest)
    return dest


@dataclasses.dataclass(frozen=True)
class Env:
    """Everything uid 65534 needs, in one world-readable directory under /tmp (see ``build_env``)."""

    base: Path
    python: Path
    skeleton: Path
    busybox_root: Path | None

    def project(self, name: str, files: dict[str, str]) -> Path:
        """A project directory owned by uid 65534, as a user's checkout would be."""
        path = self.base / name
        path.mkdir()
        for rel, text in files.items():
            (path / rel).write_text(text)
        chown_tree(path, NOBODY, NOBODY)
        return path


def build_env(base: Path) -> Env:
    """The venv, the skeleton rootfs (copied if the checkout is private) and a BusyBox root, all in ``base``."""
    python = build_venv(base / "venv")
    skeleton = FIXTURE_ROOTFS
    if not readable_by_others(FIXTURE_ROOTFS):  # the checkout sits under a private home directory
        skeleton = Path(shutil.copytree(FIXTURE_ROOTFS, base / "skeleton", symlinks=True))
    busybox_root = None
    if os.path.exists(BUSYBOX):
        busybox_root = build_busybox_root(base / "busybox-root", BUSYBOX, BUSYBOX_APPLETS)
    return Env(base, python, skeleton, busybox_root)


def procs() -> Iterator[tuple[int, str]]:
    """(pid, /proc/PID/status text) of every process still there when we look."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/status") as f:
                    yield int(entry), f.read()
            except OSError:
                continue


def status_field(status: str, name: str) -> list[str]:
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.split()
    return []


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


def descendants(root: int) -> list[int]:
    """Processes below ``root`` in the host's process tree (PPid links), children first."""
    parents = {pid: int((status_field(text, "PPid") or ["0"])[0]) for pid, text in procs()}
    found: list[int] = []
    frontier = [root]
    while frontier:
        kids = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += kids
        frontier = kids
    return found


def started_in(pid: int, project: Path) -> bool:
    """Whether ``pid`` descends from a run in ``project``: every such process inherits HOME=project."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f"HOME={project}".encode() in f.read().split(b"\0")
    except OSError:
        return False


__all__ = [
    "CLEAN_ENV",
    "NOBODY",
    "SYSTEM_PYTHON",
    "XDIST_GROUP",
    "Env",
    "SystemPythonUnfit",
    "build_busybox_root",
    "build_env",
    "build_venv",
    "chown_tree",
    "cmdline",
    "descendants",
    "make_world_readable",
    "procs",
    "readable_by_others",
    "started_in",
    "status_field",
    "world_tempdir",
]
