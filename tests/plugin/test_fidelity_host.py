"""The last differences from in-process that real suites found (CPython's, psutil's), checked both ways.

Each inner session runs one check function in-process (an unmarked test: the plugin leaves it in pytest's
process) and in containers of every kind of root: the host view (forked from pytest, then from the zygote),
``network=False``, a skeleton directory, a tarball, a ``docker save`` image, a complete BusyBox root, and
``privileged=True`` as root.  The check records what it saw as a junit property; the outer tests compare.

Four sessions: root and rootless (pytest as uid 65534), each on this host and in a private mount namespace
where the host's ``/etc/hosts`` is a bind mount, as Docker makes it (there, in root mode, with
``PYTEST_LONELY_PREBUILD=0``: every container builds its own root).  The host's mount table is never changed.
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
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.host import BUSYBOX, BUSYBOX_APPLETS, FIXTURE_ROOTFS
from helpers.inner import parse_junit
from helpers.rootless_env import (
    CLEAN_ENV,
    NOBODY,
    XDIST_GROUP,
    Env,
    build_busybox_root,
    chown_tree,
    make_world_readable,
    world_tempdir,
)

needs_root = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="needs Linux and root (rootless runs as uid 65534)"
)

MODES = ("root", "root-hosts-bound", "rootless", "rootless-hosts-bound")
WRITTEN = 4 << 20  # what the disk-usage check writes into the root

INNER_CONFTEST = """
import json
from pathlib import Path

ROOTS = json.loads((Path(__file__).parent / "roots.json").read_text())
"""

INNER_TEST = r'''
import errno
import json
import os
import shutil
import socket
import subprocess
import tempfile

import pytest
from conftest import ROOTS

KINDS = [pytest.param("in_process", id="in_process")] + [
    pytest.param(name, marks=pytest.mark.isolated(**keywords), id=name) for name, keywords in ROOTS["kinds"]
]


def unescape(field):
    return field.encode().decode("unicode_escape")


def root_dir():
    """A new directory in the container's own root, in its copy-on-write layer.

    Rootless, a directory of the host's that belongs to another user cannot take a new file even when
    its mode allows it (the copy-up of a directory owned by an unmapped uid fails with EOVERFLOW).
    """
    for parent in ("/var/tmp", "/root", "/"):
        try:
            return tempfile.mkdtemp(dir=parent)
        except OSError:
            continue
    raise AssertionError("no directory of the root takes a new file")


def hostname_facts():
    name = socket.gethostname()
    out = {"hostname": name, "fqdn": socket.getfqdn()}
    try:
        out["address"] = socket.gethostbyname(name)
        out["reverse"] = socket.gethostbyaddr(out["address"])[0]
    except OSError as exc:
        out["error"] = str(exc)
    try:
        out["localhost"] = socket.gethostbyname("localhost")
    except OSError as exc:
        out["localhost"] = f"error: {exc}"
    try:
        with open("/etc/hosts") as f:
            out["hosts"] = f.read()
    except FileNotFoundError:
        out["hosts"] = None
    with open("/proc/self/mountinfo") as f:
        out["hosts_mounted"] = any(line.split()[4] == "/etc/hosts" for line in f)
    return out


def inode_facts(top):
    """CPython's TestScandir.test_attributes: a dir, a file and a symlink made in ``top``; what scandir and stat say."""
    parent = os.path.dirname(top)
    try:
        os.mkdir(os.path.join(top, "dir"))
        with open(os.path.join(top, "file"), "w") as f:
            f.write("x")
        os.symlink("file", os.path.join(top, "link"))
        out = {"mismatches": [], "devices": []}
        for where in (top, parent):
            with os.scandir(where) as entries:
                for entry in entries:
                    try:
                        st = os.stat(entry.path, follow_symlinks=False)
                    except FileNotFoundError:  # someone else's file in /var/tmp, gone meanwhile
                        continue
                    if os.path.ismount(entry.path):  # stat shows the root of what is mounted there, anywhere
                        continue
                    if entry.inode() != st.st_ino:
                        out["mismatches"].append([entry.path, entry.inode(), st.st_ino])
        paths = [top] + [os.path.join(top, name) for name in ("dir", "file", "link")]
        out["devices"] = sorted({os.stat(path, follow_symlinks=False).st_dev for path in paths})
        return out
    finally:
        shutil.rmtree(top)


def mount_facts(isolated):
    missing = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = unescape(line.split()[4])
            try:
                os.stat(point)
            except OSError as exc:
                if exc.errno not in (errno.EACCES, errno.EPERM):
                    missing.append([point, exc.strerror])
    out = {"missing": missing}
    if isolated and shutil.which("unshare") and shutil.which("sh"):
        script = "mount -t proc -o ro,nosuid,nodev,noexec proc /proc && exec readlink /proc/self"
        run = subprocess.run(
            ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "sh", "-c", script],
            capture_output=True, text=True, check=False,
        )
        out["nested_proc"] = run.stdout.strip() or run.stderr.strip()
    return out


def disk_facts(isolated):
    out = {"root": list(shutil.disk_usage("/"))}
    if isolated:
        where = root_dir()
        before = shutil.disk_usage(where)
        with open(os.path.join(where, "written"), "wb") as f:
            f.write(b"x" * ROOTS["written"])
        out["grew"] = shutil.disk_usage(where).used - before.used
        shutil.rmtree(where)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_facts(kind, record_property):
    isolated = os.getpid() == 1
    assert isolated == (kind != "in_process")
    facts = {
        "hostname": hostname_facts(),
        "inodes": inode_facts(tempfile.mkdtemp(dir=os.getcwd())),
        "mounts": mount_facts(isolated),
        "disk": disk_facts(isolated),
    }
    if isolated:
        facts["inodes_in_root"] = inode_facts(root_dir())
    record_property("facts", json.dumps(facts))
'''


# --------------------------------------------------------------------------- roots of every kind


def _tar_of(tree: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(tree.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(tree)), recursive=False)
    return buffer.getvalue()


def docker_save(tree: Path, dest: Path) -> Path:
    """A one-layer ``docker save`` archive of ``tree``, tagged ``lonely:fidelity``."""
    layer = _tar_of(tree)
    diff_id = hashlib.sha256(layer).hexdigest()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
        }
    ).encode()
    config_name = f"{hashlib.sha256(config).hexdigest()}.json"
    manifest = json.dumps(
        [{"Config": config_name, "RepoTags": ["lonely:fidelity"], "Layers": [f"{diff_id}/layer.tar"]}]
    )
    with tarfile.open(dest, "w") as tar:
        for name, data in (
            (f"{diff_id}/layer.tar", layer),
            (config_name, config),
            ("manifest.json", manifest.encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return dest


@dataclasses.dataclass(frozen=True)
class Roots:
    base: Path
    kinds: list[tuple[str, dict[str, Any]]]


def make_roots(base: Path, rootless: bool) -> Roots:
    skeleton = Path(shutil.copytree(FIXTURE_ROOTFS, base / "skeleton", symlinks=True))
    tarball = base / "skeleton.tar.gz"
    tarball.write_bytes(gzip.compress(_tar_of(skeleton)))
    image = docker_save(skeleton, base / "image.tar")
    kinds: list[tuple[str, dict[str, Any]]] = [
        ("host", {}),
        ("host_from_the_zygote", {}),
        ("network_none", {"network": False}),
        ("skeleton", {"rootfs": str(skeleton)}),
        ("tarball", {"rootfs": str(tarball)}),
        ("image", {"rootfs": str(image)}),
    ]
    if os.path.exists(BUSYBOX):
        # No /etc/hosts: the container gets Docker's loopback lines.  Owned by root, so rootless it is the
        # README's exception: nothing can be made in its /etc, and there is no file to bind over.
        busybox = build_busybox_root(base / "busybox-root", BUSYBOX, BUSYBOX_APPLETS)
        kinds.append(("busybox_complete_root", {"rootfs": str(busybox)}))
        if rootless:
            own = Path(shutil.copytree(busybox, base / "busybox-root-of-the-user", symlinks=True))
            chown_tree(own, NOBODY, NOBODY)
            kinds.append(("busybox_root_of_the_user", {"rootfs": str(own)}))
    if not rootless:
        kinds.append(("privileged", {"privileged": True}))
    make_world_readable(base)
    return Roots(base, kinds)


# --------------------------------------------------------------------------- the inner sessions


@dataclasses.dataclass(frozen=True)
class Session:
    mode: str
    facts: dict[str, dict[str, Any]]  # by kind
    output: str

    def isolated(self) -> Iterator[tuple[str, dict[str, Any]]]:
        for kind, facts in self.facts.items():
            if kind != "in_process":
                yield kind, facts

    def __getitem__(self, kind: str) -> dict[str, Any]:
        return self.facts[kind]


@pytest.fixture(scope="module")
def host_hosts() -> Iterator[tuple[bytes, int]]:
    """The host's /etc/hosts before any inner session; it must be the same after all of them."""
    before = (Path("/etc/hosts").read_bytes(), os.stat("/etc/hosts").st_mtime_ns)
    yield before
    assert (Path("/etc/hosts").read_bytes(), os.stat("/etc/hosts").st_mtime_ns) == before


@pytest.fixture(
    scope="module", params=[pytest.param(m, marks=XDIST_GROUP) if m.startswith("rootless") else m for m in MODES]
)
def session(request: pytest.FixtureRequest, host_hosts: tuple[bytes, int]) -> Iterator[Session]:
    mode: str = request.param
    rootless = mode.startswith("rootless")
    nobody_env: Env | None = request.getfixturevalue("nobody_env") if rootless else None
    python = nobody_env.python if nobody_env is not None else Path(sys.executable)
    base = world_tempdir("lonely-fidelity-")
    try:
        roots = make_roots(base / "roots", rootless)
        project = base / "project"
        project.mkdir()
        (project / "roots.json").write_text(json.dumps({"kinds": roots.kinds, "written": WRITTEN}))
        (project / "conftest.py").write_text(INNER_CONFTEST)
        (project / "test_inner.py").write_text(textwrap.dedent(INNER_TEST))
        cache = base / "cache"
        cache.mkdir()
        env = {**CLEAN_ENV, "HOME": str(project), "PYTEST_LONELY_CACHE_DIR": str(cache)}
        argv = [str(python), "-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", "-p", "no:randomly", "-rA"]
        argv += ["--junitxml=report.xml", "-o", "junit_family=xunit1"]
        if rootless:
            chown_tree(project, NOBODY, NOBODY)
            chown_tree(cache, NOBODY, NOBODY)
            argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
        if mode.endswith("hosts-bound"):
            # As in Docker: the host's /etc/hosts is a bind mount, here in a mount namespace of this session's own.
            bound = base / "hosts"
            bound.write_bytes(Path("/etc/hosts").read_bytes())
            bound.chmod(0o644)
            if not rootless:
                env["PYTEST_LONELY_PREBUILD"] = "0"
            script = f'mount --bind "{bound}" /etc/hosts && exec "$@"'
            argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv]
        proc = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)
        output = proc.stdout + proc.stderr
        cases = parse_junit(project / "report.xml")
        facts: dict[str, dict[str, Any]] = {}
        for name, case in cases.items():
            assert case.outcome == "passed", f"{mode}: {name}: {case.message}\n{output[-4000:]}"
            facts[name.partition("[")[2].rstrip("]")] = json.loads(case.properties["facts"])
        assert set(facts) == {"in_process", *(k for k, _ in roots.kinds)}, output[-4000:]
        yield Session(mode, facts, output)
    finally:
        shutil.rmtree(base)


# --------------------------------------------------------------------------- the four rows


#: Rootless, a root directory owned by another user, without /etc/hosts: the README's exception.
UNRESOLVED = ("rootless", "busybox_complete_root")


@needs_root
def test_the_hostname_resolves_inside_as_it_does_in_process(session: Session) -> None:
    """CPython's testHostnameRes and testSockName: gethostbyname(gethostname()) works, to a loopback address."""
    here = session["in_process"]["hostname"]
    assert "error" not in here, f"this host cannot resolve its own name, so there is nothing to compare: {here}"
    for kind, facts in session.isolated():
        seen = facts["hostname"]
        if (session.mode.partition("-")[0], kind) == UNRESOLVED:
            assert seen["hosts"] is None
            assert "error" in seen
            continue
        assert "error" not in seen, f"{session.mode}/{kind}: {seen}"
        assert seen["address"].startswith("127."), f"{session.mode}/{kind}: {seen}"
        assert seen["reverse"] == seen["hostname"] == seen["fqdn"], f"{session.mode}/{kind}: {seen}"
        assert seen["localhost"] == "127.0.0.1", f"{session.mode}/{kind}: {seen}"
        assert seen["hostname"] != here["hostname"]
        assert here["hostname"] not in seen["hosts"].split("\n", 1)[0], "the host's name must not be the first line"


@needs_root
def test_the_hosts_file_is_written_in_place_where_the_root_can_take_it(session: Session) -> None:
    """Else (read-only, or owned by a uid outside a rootless map) a file of the container's own is bound over it."""
    writable = {"host", "host_from_the_zygote", "network_none", "privileged", "skeleton", "tarball", "image"}
    writable |= {"busybox_complete_root", "busybox_root_of_the_user"}
    if session.mode == "root-hosts-bound":
        writable -= {"host", "host_from_the_zygote", "network_none", "privileged"}  # the host's file is read-only
    elif session.mode.startswith("rootless"):
        writable = {"tarball", "image", "busybox_root_of_the_user"}  # unpacked by the user, or the user's
    for kind, facts in session.isolated():
        if (session.mode.partition("-")[0], kind) == UNRESOLVED:
            continue
        assert facts["hostname"]["hosts_mounted"] == (kind not in writable), f"{session.mode}/{kind}"


@needs_root
def test_the_root_keeps_its_own_hosts_lines(session: Session) -> None:
    """The container's /etc/hosts is its root's own plus one line; a root without one gets Docker's."""
    host = Path("/etc/hosts").read_text()
    skeleton = (FIXTURE_ROOTFS / "etc" / "hosts").read_text()
    expected = {"host": host, "host_from_the_zygote": host, "network_none": host, "privileged": host}
    expected |= {"skeleton": skeleton, "tarball": skeleton, "image": skeleton}
    docker = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    expected["busybox_complete_root"] = expected["busybox_root_of_the_user"] = docker
    for kind, facts in session.isolated():
        if (session.mode.partition("-")[0], kind) == UNRESOLVED:
            continue
        first, _, rest = facts["hostname"]["hosts"].partition("\n")
        assert first == f"127.0.1.1\t{facts['hostname']['hostname']}", f"{session.mode}/{kind}"
        assert rest == expected[kind], f"{session.mode}/{kind}"


@needs_root
def test_scandir_and_stat_agree_on_inode_numbers(session: Session) -> None:
    """CPython's TestScandir.test_attributes: entry.inode() == os.stat(entry.path).st_ino, one st_dev per filesystem."""
    assert session["in_process"]["inodes"]["mismatches"] == []
    for kind, facts in session.isolated():
        for where in ("inodes", "inodes_in_root"):
            assert facts[where]["mismatches"] == [], f"{session.mode}/{kind} ({where})"
            assert len(facts[where]["devices"]) == 1, f"{session.mode}/{kind} ({where}): {facts[where]}"


@needs_root
def test_every_listed_mount_point_exists_and_nested_proc_still_mounts(session: Session) -> None:
    """psutil's test_disk_partitions stats every mount point; the README promises a nested PID namespace its /proc."""
    assert session["in_process"]["mounts"]["missing"] == []
    for kind, facts in session.isolated():
        assert facts["mounts"]["missing"] == [], f"{session.mode}/{kind}"
        if "nested_proc" in facts["mounts"]:
            assert facts["mounts"]["nested_proc"] == "1", f"{session.mode}/{kind}"
    assert "nested_proc" in session["host"]["mounts"]


@needs_root
def test_disk_usage_reports_the_test_layer(session: Session) -> None:
    """shutil.disk_usage() inside describes the tmpfs that holds the test's writes (see README), not the host's disk."""
    total, used, free = session["in_process"]["disk"]["root"]
    assert total > 0
    assert used > 0
    assert free >= 0
    for kind, facts in session.isolated():
        total, used, free = facts["disk"]["root"]
        assert total > 0, f"{session.mode}/{kind}"
        assert total >= used, f"{session.mode}/{kind}"
        assert facts["disk"]["grew"] >= WRITTEN, f"{session.mode}/{kind}: {facts['disk']}"
