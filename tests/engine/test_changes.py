"""changes.py against real overlays: a child builds a container root exactly as PID 1 does, the test's steps
write, delete, rename and replace through it, and the parent reads the scratch tmpfs through a descriptor.

Each box is a forked child with its own mount namespace (and, rootless, its own user namespace as uid
65534), so no mount outlives it.  It runs ``rootfs.enter_scratch``, opens the scratch root (what the
parent keeps), replays a real plan with ``rootfs.apply``, switches root and writes ``/etc/hosts`` with
``rootfs.write_hosts``; then it runs the test's steps on request.  The parent diffs while the box is
alive (a test calling ``container.changes()``) and after it exited (a failed test's report: the overlay is
gone, the descriptor of the scratch tmpfs is all that is left).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pytest_lonely.sandbox import _syscalls as sc
from pytest_lonely.sandbox import changes, namespaces, rootfs

NOBODY = 65534
HOSTNAME = "boxy"
PR_SET_DUMPABLE = 4
Step = Callable[[], None]

needs_root = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="needs Linux and root (mount namespaces, overlays)"
)


# --- the box --------------------------------------------------------------------------------------


def _child(sock: socket.socket, plan: rootfs.Plan, steps: Sequence[Step], rootless: bool) -> None:
    """The container's PID 1, as far as its root goes; never returns."""
    status = 1
    try:
        if rootless:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            sc.prctl(PR_SET_DUMPABLE, 1)  # changing uids made /proc/self root's; the ID maps are written there
            sc.unshare(sc.CLONE_NEWUSER | sc.CLONE_NEWNS)
            namespaces.map_root(NOBODY, NOBODY)
        else:
            sc.unshare(sc.CLONE_NEWNS)
        rootfs.enter_scratch()
        scratch = os.open("/", os.O_PATH | os.O_DIRECTORY)
        rootfs.apply(plan)
        top = os.open(rootfs.NEW, os.O_RDONLY | os.O_DIRECTORY)
        rootfs.switch_root("/")
        rootfs.write_hosts(HOSTNAME)
        socket.send_fds(sock, [b"ready"], [scratch, top])
        while data := sock.recv(16):
            try:
                steps[int(data)]()
                sock.sendall(b"ok")
            except BaseException:
                sock.sendall(b"error " + traceback.format_exc().encode())
        status = 0
    except BaseException:
        with contextlib.suppress(OSError):
            sock.sendall(b"error " + traceback.format_exc().encode())
    finally:
        os._exit(status)


class Box:
    """A container root built from ``plan`` in a child; ``run(i)`` runs ``steps[i]`` inside it."""

    def __init__(self, plan: rootfs.Plan, steps: Sequence[Step], *, rootless: bool = False) -> None:
        self.layers = changes.layers_of(plan)
        ours, theirs = socket.socketpair()
        self.pid = sc.fork()
        if self.pid == 0:  # pragma: no cover - the child
            ours.close()
            _child(theirs, plan, steps, rootless)
        theirs.close()
        self.sock = ours
        message, fds, _, _ = socket.recv_fds(ours, 1 << 16, 2)
        if message != b"ready":
            self.close()
            raise AssertionError(f"the box did not start:\n{message.decode(errors='replace')}")
        self.scratch, self.top = fds

    def run(self, index: int) -> None:
        self.sock.sendall(str(index).encode())
        answer = self.sock.recv(1 << 16)
        assert answer == b"ok", answer.decode(errors="replace")

    def close(self) -> None:
        """The container ends: its mount namespace, and so the overlays, go with it."""
        if self.pid:
            self.sock.close()
            os.waitpid(self.pid, 0)
            self.pid = 0

    def release(self) -> None:
        self.close()
        for fd in (getattr(self, "scratch", -1), getattr(self, "top", -1)):
            if fd >= 0:
                os.close(fd)

    def diff(self, **kwargs: Any) -> changes.Changes:
        kwargs.setdefault("hostname", HOSTNAME)
        return changes.diff(self.scratch, self.layers, top_fd=self.top, **kwargs)


@contextlib.contextmanager
def box(plan: rootfs.Plan, *steps: Step, rootless: bool = False) -> Iterator[Box]:
    b = Box(plan, steps, rootless=rootless)
    try:
        yield b
    finally:
        b.release()


def as_nobody(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a child that is plain uid 65534 (the rootless parent), its result pickled back."""
    r, w = os.pipe()
    pid = sc.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            data = pickle.dumps(("ok", fn()))
        except BaseException:
            data = pickle.dumps(("error", traceback.format_exc()))
        with os.fdopen(w, "wb") as f:
            f.write(data)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        status, value = pickle.loads(f.read())
    os.waitpid(pid, 0)
    assert status == "ok", value
    return value


def own_root_plan(lower: Path, *, rootless: bool = False) -> rootfs.Plan:
    """The plan of ``rootfs=lower``: with the stdlib bound in (pre-made mount points in the upper layer) and
    /proc, /dev and /tmp made through the overlay when the root has none."""
    layout = rootfs.HostLayout(mounts=(), top=(), needed=((os.path.dirname(os.__file__), False),), dev_nodes=())
    return rootfs.plan(layout, rootfs.PlanKey(str(lower), rootless=rootless, network=False))


def write(path: str, text: str = "x", mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def make_tree(top: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("/"):
            path.mkdir(exist_ok=True)
        else:
            path.write_text(text)
    return top


LOWER = {
    "etc/passwd": "root:x:0:0::/root:/bin/sh\n",
    "etc/hosts": "127.0.0.1\tlocalhost\n",
    "etc/gone": "deleted by the test\n",
    "etc/keep": "left alone\n",
    "etc/ssl/cert": "certificate\n",
    "opt/old/deep/file": "replaced with its directory\n",
    "opt/old/other": "replaced with its directory\n",
    "var/lib/state": "state\n",
    "srv/moved": "renamed\n",
    "srv/asdir": "becomes a directory\n",
    "srv/tree/a/b": "deleted with its directory\n",
    "usr/lib/python3/pkg/__init__.py": "",
    "home/": "",
}


def make_lower(top: Path) -> Path:
    make_tree(top, LOWER)
    (top / "srv/link").symlink_to("/etc")  # the lower layer's symlinks are never followed either
    return top


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    top = make_lower(tmp_path / "lower")
    os.utime(top / "etc", ns=(10**18, 10**18))  # a copy-up must keep it: a changed mtime would show
    return top


# --- pure: the layers, from the plan --------------------------------------------------------------


def test_the_host_view_has_one_layer_per_real_mount() -> None:
    layout = rootfs.HostLayout(
        mounts=(rootfs.Mount("/", "ext4"), rootfs.Mount("/data", "xfs"), rootfs.Mount("/proc", "proc")),
        top=(),
        needed=(),
        dev_nodes=("null",),
    )
    plan = rootfs.plan(layout, rootfs.PlanKey(None, rootless=False, network=False, writable=("/tmp/bt",)))
    layers = changes.layers_of(plan)
    assert [(x.n, x.inside, x.lower, x.userxattr) for x in layers] == [
        (0, "/", "/", False),
        (1, "/data", "/data", False),
    ]
    # /proc, /sys, /dev and /tmp are made through the overlay if the host has none; /dev/null is on /dev's tmpfs.
    assert {m.rel for m in layers[0].made} == {"proc", "sys", "dev", "tmp", "etc"}
    assert layers[0].writes == ("etc/hosts",)


def test_the_rootless_host_view_has_a_top_level_tmpfs() -> None:
    layout = rootfs.HostLayout(
        mounts=(rootfs.Mount("/", "ext4"), rootfs.Mount("/mnt/x", "ext4")),
        top=(("bin", "symlink", "usr/bin"), ("etc", "dir", ""), ("mnt", "dir", ""), ("f", "file", "")),
        needed=(),
        dev_nodes=(),
    )
    layers = changes.layers_of(rootfs.plan(layout, rootfs.PlanKey(None, rootless=True, network=False)))
    top, etc = layers
    assert (top.n, top.inside, top.lower) == (None, "/", None)
    made = {m.rel: (m.type, m.target, m.certain) for m in top.made}
    assert made["bin"] == ("symlink", "usr/bin", True)
    assert made["etc"] == made["mnt"] == made["proc"] == ("dir", "", True)
    assert made["f"] == ("file", "", False)  # in an optional group: it may not exist
    assert (etc.n, etc.inside, etc.lower, etc.userxattr, etc.writes) == (0, "/etc", "/etc", True, ("hosts",))


def test_mount_points_made_in_the_upper_layer_belong_to_it(tmp_path: Path) -> None:
    # A project outside /tmp, wherever this checkout is: one under /tmp is shown after the fresh /tmp instead.
    here = tempfile.mkdtemp(prefix="lonely-project-", dir="/var/tmp")
    try:
        _mount_points_of(tmp_path, here)
    finally:
        shutil.rmtree(here)


def _mount_points_of(tmp_path: Path, here: str) -> None:
    stdlib = os.path.dirname(os.__file__)
    layout = rootfs.HostLayout(mounts=(), top=(), needed=((stdlib, False), (here, True)), dev_nodes=())
    plan = rootfs.plan(layout, rootfs.PlanKey(str(tmp_path), rootless=False, network=False))
    root, project = changes.layers_of(plan)
    assert (project.n, project.inside, project.lower) == (1, here, here)
    made = {m.rel for m in root.made if m.certain}
    assert {stdlib.strip("/"), here.strip("/"), os.path.dirname(here).strip("/")} <= made


def test_every_file_the_engine_writes_is_recognised() -> None:
    """A new entry in rootfs.ENGINE_WRITES must say how its text follows from the root's own file."""
    assert set(rootfs.ENGINE_WRITES) <= set(changes._ENGINE_TEXT)


def test_lines_escape_what_could_forge_a_line() -> None:
    result = changes.Changes(
        (changes.Change("A", "/etc/a\nC /etc/forged", "file"), changes.Change("A", "/caf\udce9", "file")),
        more=3,
        complete=False,
        problems=("/x: cannot list: Permission denied",),
        pycache=2,
    )
    assert result.lines(max_lines=1) == [
        "A /etc/a\\x0aC /etc/forged",
        "... and at least 4 more",
        "(2 __pycache__ entries not listed)",
        "could not read everything: /x: cannot list: Permission denied",
    ]
    assert changes.display("/caf\udce9\\") == "/caf\\xe9\\\\"


# --- real overlays --------------------------------------------------------------------------------


def _typical() -> None:
    write("/etc/app.conf", "written by the installer\n")
    with open("/etc/passwd", "a") as f:
        f.write("app:x:1000:1000::/home/app:/bin/sh\n")
    os.unlink("/etc/gone")
    os.chmod("/etc/ssl/cert", 0o600)
    shutil.rmtree("/opt/old")  # replaced wholesale: overlayfs makes the new one opaque
    os.mkdir("/opt/old")
    write("/opt/old/other", "new")
    os.makedirs("/var/cache/app/x")
    os.rename("/srv/moved", "/srv/renamed")
    os.unlink("/srv/asdir")
    os.mkdir("/srv/asdir")
    shutil.rmtree("/srv/tree")
    os.unlink("/srv/link")
    os.mkdir("/srv/link")
    write("/srv/link/passwd")
    os.symlink("/etc/shadow", "/home/escape")
    os.mkdir("/usr/lib/python3/pkg/__pycache__")
    write("/usr/lib/python3/pkg/__pycache__/__init__.cpython-311.pyc")
    os.chmod("/var/lib", 0o700)


#: What ``_typical`` lists: note no /opt (its listing is the same), no /etc/ssl (only a file in it changed), no
#: /usr/lib/python3/pkg (only __pycache__ was added), and C /var/lib for its chmod.
TYPICAL = [
    ("C", "/etc"),
    ("A", "/etc/app.conf"),
    ("D", "/etc/gone"),
    ("C", "/etc/passwd"),
    ("C", "/etc/ssl/cert"),
    ("C", "/home"),
    ("A", "/home/escape"),
    ("C", "/opt/old"),
    ("D", "/opt/old/deep"),
    ("C", "/opt/old/other"),
    ("C", "/srv"),
    ("C", "/srv/asdir"),
    ("C", "/srv/link"),  # a symlink to /etc in the lower layer, a directory now: never followed
    ("A", "/srv/link/passwd"),
    ("D", "/srv/moved"),
    ("A", "/srv/renamed"),
    ("D", "/srv/tree"),  # one line for the directory and all it held
    ("C", "/var"),
    ("A", "/var/cache"),
    ("A", "/var/cache/app"),
    ("A", "/var/cache/app/x"),
    ("C", "/var/lib"),
]


def _sorted(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return sorted(pairs, key=lambda p: p[1].split("/"))


@needs_root
def test_a_typical_test_alive_and_after_its_container_ended(lower: Path) -> None:
    with box(own_root_plan(lower), _typical) as b:
        assert b.diff().pairs() == []  # the engine's mount points and /etc/hosts are not the test's
        b.run(0)
        alive = b.diff()
        b.close()
        dead = b.diff()
    assert alive == dead
    assert dead.pairs() == TYPICAL
    assert (dead.complete, dead.more, dead.pycache, dead.problems) == (True, 0, 1, ())
    assert dead.changes[dead.pairs().index(("A", "/etc/app.conf"))] == changes.Change(
        "A", "/etc/app.conf", "file", len("written by the installer\n")
    )
    assert dead.changes[dead.pairs().index(("A", "/home/escape"))].type == "symlink"


@needs_root
def test_parent_directories_and_pycache(lower: Path) -> None:
    def modify_only() -> None:
        with open("/etc/ssl/cert", "a") as f:
            f.write("more")

    def pycache() -> None:
        os.mkdir("/usr/lib/python3/pkg/__pycache__")

    with box(own_root_plan(lower), modify_only, pycache) as b:
        b.run(0)
        # A copy-up makes /etc and /etc/ssl in the upper layer, but their listings did not change.
        assert b.diff().pairs() == [("C", "/etc/ssl/cert")]
        b.run(1)
        assert b.diff().pairs() == [("C", "/etc/ssl/cert")]
        assert b.diff().pycache == 1
        assert b.diff(pycache=True).pairs() == [
            ("C", "/etc/ssl/cert"),
            ("C", "/usr/lib/python3/pkg"),
            ("A", "/usr/lib/python3/pkg/__pycache__"),
        ]


@needs_root
def test_the_engines_hosts_file_is_listed_once_the_test_changes_it(lower: Path) -> None:
    def rewrite() -> None:
        with open("/etc/hosts", "a") as f:
            f.write("10.0.0.1\tdb\n")

    with box(own_root_plan(lower), rewrite) as b:
        assert b.diff().pairs() == []
        assert b.diff(hostname=None).pairs() == [("C", "/etc/hosts")]  # who cannot tell lists it
        assert b.diff(hostname="other").pairs() == [("C", "/etc/hosts")]
        b.run(0)
        assert b.diff().pairs() == [("C", "/etc/hosts")]


@needs_root
def test_a_root_without_etc_gets_the_engines_etc(tmp_path: Path) -> None:
    top = make_tree(tmp_path / "bare", {"bin/sh": ""})
    with box(own_root_plan(top), lambda: write("/etc/app.conf")) as b:
        assert b.diff().pairs() == []
        b.run(0)
        assert b.diff().pairs() == [("C", "/etc"), ("A", "/etc/app.conf")]


@needs_root
def test_the_host_view_lists_only_what_the_test_did(tmp_path: Path) -> None:
    """The real plan over the host's own root (every real mount its own layer): no engine artifact shows."""
    name = f"lonely-changes-{os.getpid()}"
    plan = rootfs.plan(
        rootfs.HostLayout.scan(tmp_path), rootfs.PlanKey(None, rootless=False, network=False, writable=(str(tmp_path),))
    )

    def act() -> None:
        write(f"/etc/{name}")
        write(f"/var/tmp/{name}")
        write(str(tmp_path / "window"))  # the basetemp window: the host's own directory, not a layer

    with box(plan, act) as b:
        assert b.diff().pairs() == []
        b.run(0)
        b.close()
        assert b.diff().pairs() == [("C", "/etc"), ("A", f"/etc/{name}"), ("C", "/var/tmp"), ("A", f"/var/tmp/{name}")]
    assert not os.path.exists(f"/etc/{name}")
    (tmp_path / "window").unlink()


@needs_root
def test_keep_copies_the_evidence(lower: Path, tmp_path: Path) -> None:
    def act() -> None:
        write("/etc/app.conf", "conf", 0o640)
        write("/etc/big", "b" * 5000)
        os.chmod("/etc/passwd", 0o4755)  # setuid: the copy must not be
        os.symlink("/etc/shadow", "/etc/escape")
        os.mkfifo("/etc/fifo")
        os.mknod("/etc/null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.makedirs("/var/spool/app", mode=0o750)
        os.link("/etc/app.conf", "/etc/hardlink")
        write("/etc/caf\udce9", "latin-1 name")
        os.unlink("/etc/gone")
        os.chmod("/opt/old", 0o555)
        write("/opt/old/late", "in a read-only directory")
        os.chmod("/opt/old", 0o555)

    dest = tmp_path / "kept"
    dest.mkdir()
    with box(own_root_plan(lower), act) as b:
        b.run(0)
        b.close()
        found = b.diff(limit=None)
        kept = changes.keep(b.scratch, b.layers, found, str(dest), max_bytes=1000)
    fs = dest / "fs"
    assert (fs / "etc/app.conf").read_text() == "conf"
    assert stat.S_IMODE((fs / "etc/app.conf").stat().st_mode) == 0o640
    assert (fs / "etc/hardlink").read_text() == "conf"
    assert stat.S_IMODE((fs / "etc/passwd").stat().st_mode) == 0o755
    assert (fs / "etc/passwd").read_text().startswith("root:")
    assert os.readlink(fs / "etc/escape") == "/etc/shadow"
    assert os.fsencode("caf\udce9") in os.listdir(os.fsencode(fs / "etc"))
    assert stat.S_IMODE((fs / "var/spool/app").stat().st_mode) == 0o750
    assert (fs / "opt/old/late").read_text() == "in a read-only directory"
    assert stat.S_IMODE((fs / "opt/old").stat().st_mode) == 0o555
    assert not (fs / "etc/big").exists()
    assert not (fs / "etc/fifo").exists()
    assert not (fs / "etc/null").exists()
    assert not (fs / "etc/keep").exists()  # unchanged: not evidence
    assert (dest / changes.DELETED).read_text() == "/etc/gone\n"
    not_copied = dict(line.split("\t") for line in (dest / changes.NOT_COPIED).read_text().splitlines())
    assert not_copied == {
        "/etc/big": "5000 bytes: does not fit in the 1000-byte limit of kept files",
        "/etc/fifo": "a fifo, not copied",
        "/etc/null": "a char, not copied",
    }
    assert (kept.deleted, kept.complete, kept.bytes) == (
        1,
        False,
        sum(len(x) for x in ("conf", "conf", "latin-1 name", "in a read-only directory")) + len(LOWER["etc/passwd"]),
    )


@needs_root
def test_keep_wants_an_empty_directory_it_can_open(lower: Path, tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "full")
    with box(own_root_plan(lower)) as b:
        found = b.diff()
        for dest, why in (("full", "it must be an empty directory"), ("link", "Not a directory"), ("none", "No such")):
            with pytest.raises(changes.KeepError, match=why) as info:
                changes.keep(b.scratch, b.layers, found, str(tmp_path / dest))
            assert str(tmp_path / dest) in str(info.value)


@needs_root
def test_keep_never_resolves_a_path_through_a_symlink(lower: Path, tmp_path: Path) -> None:
    """A hostile listing (or a layer changed since the diff) names a file below a symlink to the host's /etc."""
    dest = tmp_path / "kept"
    dest.mkdir()
    with box(own_root_plan(lower), lambda: os.symlink("/etc", "/home/etc")) as b:
        b.run(0)
        forged = changes.Changes((changes.Change("C", "/home/etc/passwd", "file"),))
        kept = changes.keep(b.scratch, b.layers, forged, str(dest))
    assert kept.copied == 0
    assert kept.not_copied[0][0] == "/home/etc/passwd"
    assert not (dest / "fs/home/etc/passwd").exists()


@needs_root
def test_a_huge_upper_layer_is_listed_up_to_the_limit(lower: Path) -> None:
    def many() -> None:
        os.mkdir("/srv/many")
        for i in range(10_000):
            os.close(os.open(f"/srv/many/{i:05}", os.O_CREAT | os.O_WRONLY, 0o644))

    with box(own_root_plan(lower), many) as b:
        b.run(0)
        b.close()
        first = b.diff(limit=100)
        assert first.pairs() == [("C", "/srv"), ("A", "/srv/many")] + [("A", f"/srv/many/{i:05}") for i in range(98)]
        assert (first.more, first.complete) == (10_002 - 100, True)
        cut = b.diff(limit=10, walk_limit=500)
        assert not cut.complete
        assert cut.problems == ("stopped after looking at 500 entries",)
        assert len(cut.changes) == 10
        assert cut.more > 0
        assert cut.lines(max_lines=2)[-2] == f"... and at least {cut.more + 8} more"


@needs_root
def test_a_deep_tree_is_walked_to_a_bounded_depth(lower: Path, tmp_path: Path) -> None:
    """Paths far longer than PATH_MAX: nothing is ever opened by its whole path."""
    name = "d" * 250

    def deep() -> None:
        fd = os.open("/srv", os.O_RDONLY | os.O_DIRECTORY)
        for _ in range(changes.MAX_DEPTH + 40):
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        write_fd = os.open("leaf", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.close(write_fd)
        os.close(fd)

    dest = tmp_path / "kept"
    dest.mkdir()
    with box(own_root_plan(lower), deep) as b:
        b.run(0)
        b.close()
        found = b.diff(limit=None)
        kept = changes.keep(b.scratch, b.layers, found, str(dest))
    assert not found.complete
    assert len(found.problems) == 1
    assert found.problems[0].endswith(f": deeper than {changes.MAX_DEPTH} levels, not read")
    # C /srv, and A for each directory down to MAX_DEPTH levels below /, the last one not read
    assert len(found.changes) == 1 + changes.MAX_DEPTH
    assert len(found.changes[-1].path) > 60_000
    assert kept.copied == len(found.changes)
    assert not kept.not_copied


@needs_root
def test_a_layer_that_changes_while_it_is_walked(lower: Path, tmp_path: Path) -> None:
    """The container is running: entries appear, vanish, and turn into symlinks and fifos under the walk."""

    def churn() -> None:
        def loop() -> None:
            i = 0
            while True:
                i += 1
                top = f"/srv/churn{i % 5}"
                with contextlib.suppress(OSError):
                    os.makedirs(f"{top}/a/b")
                    write(f"{top}/a/b/f", "x" * (i % 100))
                    os.rename(f"{top}/a", f"{top}/c")
                    shutil.rmtree(top)
                    os.symlink("/etc", top)
                    os.unlink(top)
                    os.mkfifo(top)
                    os.unlink(top)

        import threading

        threading.Thread(target=loop, daemon=True).start()

    with box(own_root_plan(lower), churn) as b:
        b.run(0)
        for i in range(30):
            found = b.diff(limit=None)
            assert found.problems == ()
            assert all(c.path.startswith("/srv") for c in found.changes)
            dest = tmp_path / f"kept{i}"
            dest.mkdir()
            changes.keep(b.scratch, b.layers, found, str(dest))


@needs_root
def test_names_that_are_not_utf8_and_fifos(lower: Path) -> None:
    def act() -> None:
        write(os.fsdecode(b"/srv/caf\xe9"))
        os.mkfifo("/srv/pipe")
        os.mkdir(os.fsdecode(b"/srv/\xff\xfe"))

    with box(own_root_plan(lower), act) as b:
        b.run(0)
        found = b.diff()
    assert found.pairs() == [
        ("C", "/srv"),
        ("A", "/srv/caf\udce9"),
        ("A", "/srv/pipe"),
        ("A", "/srv/\udcff\udcfe"),
    ]
    assert [c.type for c in found.changes] == ["dir", "file", "fifo", "dir"]
    assert found.lines()[1] == "A /srv/caf\\xe9"


# --- one container, several tests -----------------------------------------------------------------


def _earlier_test() -> None:
    write("/srv/made-earlier", "1")
    write("/srv/made-earlier-and-replaced", "1")
    os.unlink("/etc/gone")
    os.mkdir("/var/earlier")


def _this_test() -> None:
    with open("/srv/made-earlier", "a") as f:
        f.write("2")
    write("/srv/made-earlier-and-replaced.tmp", "2")
    os.rename("/srv/made-earlier-and-replaced.tmp", "/srv/made-earlier-and-replaced")
    write("/etc/app.conf")
    os.unlink("/var/lib/state")
    os.rmdir("/var/earlier")


@needs_root
def test_since_a_time(lower: Path) -> None:
    with box(own_root_plan(lower), _earlier_test, _this_test) as b:
        b.run(0)
        time.sleep(0.05)  # past the coarse clock's tick: the boundary itself may count either way
        since = changes.clock_ns()
        assert b.diff(since=since).pairs() == []
        b.run(1)
        b.close()
        found = b.diff(since=since)
    # What a time cannot tell (documented): the earlier test's deletion in a directory this test also
    # changed is listed again, a file replaced by a rename is new, rmdir /var/earlier leaves no trace.
    assert found.pairs() == [
        ("C", "/etc"),
        ("A", "/etc/app.conf"),
        ("D", "/etc/gone"),
        ("C", "/srv"),
        ("C", "/srv/made-earlier"),
        ("A", "/srv/made-earlier-and-replaced"),
        ("C", "/var/lib"),
        ("D", "/var/lib/state"),
    ]


@needs_root
def test_since_a_snapshot(lower: Path) -> None:
    with box(own_root_plan(lower), _earlier_test, _this_test) as b:
        b.run(0)
        base = changes.snapshot(b.scratch, b.layers, top_fd=b.top, hostname=HOSTNAME)
        assert b.diff(since=base).pairs() == []
        b.run(1)
        b.close()
        found = b.diff(since=base)
    assert found.pairs() == [
        ("C", "/etc"),
        ("A", "/etc/app.conf"),
        ("C", "/srv/made-earlier"),
        ("C", "/srv/made-earlier-and-replaced"),
        ("C", "/var"),
        ("D", "/var/earlier"),
        ("C", "/var/lib"),
        ("D", "/var/lib/state"),
    ]


# --- overlayfs features the engine does not ask for, but a kernel may default to ------------------


@needs_root
def test_metacopy_and_redirected_directories(lower: Path, tmp_path: Path) -> None:
    data = rootfs._overlay_data(rootfs.OLD + str(lower), 0, rootless=False) + ",metacopy=on,redirect_dir=on"
    plan: rootfs.Plan = (
        ("mkdir", rootfs.NEW, 0o755),
        ("mkdir", "/.u0", 0o755),
        ("mkdir", "/.w0", 0o755),
        ("mount", "overlay", rootfs.NEW, "overlay", sc.MS_NODEV, data),
    )

    def act() -> None:
        os.chmod("/etc/passwd", 0o600)  # metacopy: only the metadata is copied up
        os.rename("/etc/ssl", "/etc/tls")  # redirect_dir: the directory moves without its files

    dest = tmp_path / "kept"
    dest.mkdir()
    with box(plan, act) as b:
        b.layers = (changes.Layer(0, "/", str(lower), userxattr=False, writes=("etc/hosts",)),)
        b.run(0)
        b.close()
        found = b.diff()
        kept = changes.keep(b.scratch, b.layers, found, str(dest))
    assert found.pairs() == [
        ("C", "/etc"),
        ("C", "/etc/passwd"),
        ("D", "/etc/ssl"),
        ("A", "/etc/tls"),
        ("A", "/etc/tls/cert"),
    ]
    assert (dest / "fs/etc/passwd").read_text() == LOWER["etc/passwd"]  # the bytes are in the lower layer
    # The renamed directory's files are still in the lower layer, at their old path: listed, not copied.
    assert kept.not_copied == (("/etc/tls/cert", "not in the upper layer (gone, or shown from the lower layer)"),)
    assert kept.copied == 3


# --- rootless -------------------------------------------------------------------------------------


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory uid 65534 owns and can reach, with a root it owns in ``lower`` (rootless, a copy-up keeps
    the owner, so only a root of its own is writable through the overlay) and an empty ``kept``."""
    top = Path(tempfile.mkdtemp(prefix="lonely-changes-", dir="/tmp"))
    try:
        make_lower(top / "lower")
        (top / "kept").mkdir()
        os.chmod(top, 0o755)
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [*dirnames, *filenames, "."]:
                os.lchown(os.path.join(dirpath, name), NOBODY, NOBODY)
        yield top
    finally:
        shutil.rmtree(top)


@needs_root
def test_rootless_as_the_same_unprivileged_user(nobody_dir: Path) -> None:
    def act() -> None:
        _typical()
        os.makedirs("/srv/locked/inner")
        write("/srv/locked/inner/secret")
        os.chmod("/srv/locked", 0)

    dest = nobody_dir / "kept"
    with box(own_root_plan(nobody_dir / "lower", rootless=True), act, rootless=True) as b:
        assert b.layers[0].userxattr
        assert as_nobody(b.diff).pairs() == []
        b.run(0)
        b.close()
        found = as_nobody(b.diff)
        kept = as_nobody(lambda: changes.keep(b.scratch, b.layers, found, str(dest)))
    # The replaced /opt/old is opaque by user.overlay.opaque; /srv/locked cannot be read even by its owner.
    assert found.pairs() == _sorted([*TYPICAL, ("A", "/srv/locked")])
    assert not found.complete
    assert found.problems == ("/srv/locked: cannot open the directory: Permission denied",)
    assert (dest / "fs/etc/app.conf").read_text() == "written by the installer\n"
    assert stat.S_IMODE((dest / "fs/srv/locked").stat().st_mode) == 0
    assert (kept.copied, kept.deleted) == (len(found.changes) - 4, 4)


@needs_root
def test_rootless_host_view_top_level(tmp_path: Path) -> None:
    """The rootless host view's ``/`` is a tmpfs of its own (``top_fd``), with the plan's mount points and
    symlinks in it; while the container runs, each top-level directory has a layer mounted on it."""
    layout = rootfs.HostLayout.scan(tmp_path)
    plan = rootfs.plan(layout, rootfs.PlanKey(None, rootless=True, network=False))
    link = next((name for name, kind, _ in layout.top if kind == "symlink" and name == "sbin"), None)

    def act() -> None:
        os.makedirs("/lonely-new/dir")
        write("/lonely-new/dir/file")
        if link is not None:
            os.unlink("/" + link)  # the plan made it: deleting it is the test's change

    with box(plan, act, rootless=True) as b:
        assert as_nobody(b.diff).pairs() == []
        b.run(0)
        alive = as_nobody(b.diff)
        b.close()
        dead = as_nobody(b.diff)
        unseen = as_nobody(lambda: changes.diff(b.scratch, b.layers, hostname=HOSTNAME))
    expected = [("A", "/lonely-new"), ("A", "/lonely-new/dir"), ("A", "/lonely-new/dir/file")]
    if link is not None:
        expected.append(("D", "/" + link))
    assert alive.pairs() == dead.pairs() == expected
    assert alive.complete
    assert unseen.pairs() == []
    assert unseen.problems == ("/: the top-level tmpfs was not handed over, not read",)
