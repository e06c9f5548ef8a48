"""What a test changed in its copy-on-write root, read from the layers' upper directories: ``docker diff``.

Every copy-on-write layer ``n`` of a container is an overlay whose upper
directory is ``/.u{n}`` on the scratch tmpfs PID 1 built the root in
(rootfs.py).  The parent keeps a descriptor of that tmpfs, which outlives the
container (a detached tmpfs stays alive while a descriptor refers to it), so
the answer survives a test killed by SIGKILL or the OOM killer, and the test
gets no door into its own upper layer.

The upper directory is hostile input: the container chose every name, mode,
symlink target, hard link and directory depth in it, and may still be changing
it while we read.  So everything here goes relative to directory descriptors
(``openat`` with ``O_NOFOLLOW``, ``fstatat`` without following, ``scandir`` of a
descriptor): no absolute path is ever built through the layer, no symlink in it
is ever followed, no device or fifo in it is ever opened, and every budget
(entries walked, depth, bytes copied) is bounded.

What is listed, and why (the semantics the README documents):

* ``A``: a path that did not exist when the test started; ``C``: one that
  existed and was changed (written, replaced, chmod'ed, or, for a directory,
  see below); ``D``: one that existed and is gone.  A deleted directory is one
  ``D`` line, not one per file it held.  Paths are as the test sees them,
  sorted component by component (a directory right before what it holds);
  names that are not UTF-8 are kept with ``surrogateescape``.
* A directory is ``C`` when its own listing changed (something was added to it
  or deleted from it: docker's rule, so ``ls`` shows a difference), when it
  was replaced (deleted and made again: overlayfs marks it opaque, and what it
  held before is listed ``D``), or when its own mode or owner changed.  A
  directory that is in the upper layer only because a file below it was
  copied up is *not* listed: ``echo >> /etc/passwd`` is ``C /etc/passwd`` alone,
  and ``touch /etc/app.conf`` is ``C /etc`` and ``A /etc/app.conf``, as in docker.
  ``/`` is never listed.  Unlike docker, a directory's mtime alone does not make
  it ``C``: ``sed -i`` (a temporary file renamed over the old one) and bytecode
  left out as ``__pycache__`` move it while the directory lists the same names.
  Docker lists a replaced directory as ``D`` then its new content; we list it
  ``C`` with what it lost as ``D``: the same facts, in lines a test can assert on.
* ``__pycache__`` entries are left out (and counted): Python writes bytecode
  wherever it imports from a writable directory, depending on the host's
  caches, which a test asserting "the installer wrote ``/etc/app.conf`` and
  touched nothing else" must not depend on.  ``pycache=True`` lists them.
* What the engine made is not the test's: the mount points and symlinks the
  plan makes (``layers_of`` reads them from the plan) and the files the
  container writes before the test (``rootfs.ENGINE_WRITES``: ``/etc/hosts``,
  whose text is a pure function of the root's own file and the hostname, so
  it is recognised by content) are listed only when they differ from what the
  engine made.  A chmod or chown of an engine-made directory is not seen.
* Only the container's copy-on-write layers count: ``/tmp``, ``/dev``, ``/proc``,
  ``/sys``, the writable windows (``tmp_path``) and read-only binds are other
  filesystems and never appear.  A host mount below a layer's lower directory
  is not looked into (overlayfs does not show it either).
* overlayfs features the engine does not ask for but a kernel may default to
  are read: ``metacopy`` (a chmod copies up only the metadata: :func:`keep`
  copies the bytes from the lower layer) and ``redirect_dir`` (a renamed
  directory keeps its files in the lower layer: they are listed under the new
  name, but :func:`keep` does not copy them).

``since`` (one container shared by several tests) is either a time from
:func:`clock_ns` or a :class:`Snapshot`; see :func:`diff`.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import heapq
import os
import re
import stat
import struct
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import Final, Literal, NamedTuple

from . import rootfs
from ._syscalls import LIBC

Kind = Literal["A", "C", "D"]

#: Changes :func:`diff` lists by default; the rest are counted (``Changes.more``).
LIMIT: Final = 1000
#: Entries one walk looks at, over all layers, before it stops; past it, counts are lower bounds.  It bounds
#: the parent's cost: about 5 us of CPU an entry, and up to ~700 bytes an entry of one directory at a time.
WALK_LIMIT: Final = 100_000
#: Directory levels below a layer's root that are walked; deeper ones are reported, not read.
MAX_DEPTH: Final = 256
#: Bytes :func:`keep` copies in all; a file that does not fit is listed in ``NOT_COPIED`` instead.
KEEP_MAX_BYTES: Final = 1 << 30
#: Problems kept word for word; the rest are counted.
_MAX_PROBLEMS: Final = 20
#: The largest root file the engine rewrites that :func:`diff` reads to recognise the engine's own text.
_ENGINE_FILE_MAX: Final = 1 << 20

#: The files :func:`keep` writes next to the copied tree (``fs/``).
DELETED: Final = "DELETED"
NOT_COPIED: Final = "NOT_COPIED"
TREE: Final = "fs"

_PYCACHE: Final = "__pycache__"


def _hosts(original: str | None, hostname: str | None) -> str | None:
    return None if hostname is None else rootfs.hosts_text(original, hostname)


#: How to recognise each of ``rootfs.ENGINE_WRITES``: its text, from the root's own file (``None``: it had
#: none) and the hostname; ``None`` when the engine leaves the file alone.
_ENGINE_TEXT: Final[dict[str, Callable[[str | None, str | None], str | None]]] = {rootfs.HOSTS: _hosts}
_O_DIR: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a fifo swapped in between the type check and the open must not block us.
_O_FILE: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY
_STRIPPED_BITS: Final = stat.S_ISUID | stat.S_ISGID
_UPPER: Final = re.compile(r"/\.u(\d+)(/.*)?")


# --- the layers, from the plan ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Made:
    """Something the plan makes in a layer before the test runs: not a change of the test's."""

    rel: str  #: path below the layer's root, without a leading slash
    type: Literal["dir", "file", "symlink"]
    target: str = ""  #: a symlink's target
    #: Made outside an ``optional`` group, so it certainly exists: its absence is a deletion.
    certain: bool = True


@dataclasses.dataclass(frozen=True)
class Layer:
    """One copy-on-write layer of a container, as the parent (on the host) sees it."""

    #: The upper directory is ``/.u{n}`` in the scratch root; ``None``: the rootless host view's top-level
    #: tmpfs (no overlay: the new directories and files at ``/`` live there), read through ``top_fd``.
    n: int | None
    #: Where the layer is mounted, as the test sees it: ``/``, ``/etc``, ``/work/project``.
    inside: str
    #: The lower directory as the parent sees it (``/oldroot/usr`` inside the build is ``/usr``), if any.
    lower: str | None
    #: Mounted with ``userxattr`` (rootless): its opaque directories carry ``user.overlay.*``, not ``trusted.``.
    userxattr: bool
    made: tuple[Made, ...] = ()
    #: ``rootfs.ENGINE_WRITES`` that land in this layer, below its root.
    writes: tuple[str, ...] = ()


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _inside(path: str) -> str:
    return path[len(rootfs.NEW) :] or "/"


def _lower(path: str) -> str:
    return (path[len(rootfs.OLD) :] or "/") if _under(path, rootfs.OLD) else path


def _rel(path: str, top: str) -> str:
    return path[len(top) :].strip("/") if top != "/" else path.strip("/")


def _prefixes(rel: str) -> list[str]:
    parts = rel.split("/") if rel else []
    return ["/".join(parts[: i + 1]) for i in range(len(parts))]


@dataclasses.dataclass
class _Building:
    n: int | None
    inside: str
    lower: str | None
    userxattr: bool
    made: list[Made] = dataclasses.field(default_factory=list)
    writes: list[str] = dataclasses.field(default_factory=list)

    def layer(self) -> Layer:
        made: dict[str, Made] = {}
        for m in self.made:  # one entry a path: the first kind made there, certain if any step was
            first = made.setdefault(m.rel, m)
            if m.certain and not first.certain:
                made[m.rel] = dataclasses.replace(first, certain=True)
        return Layer(self.n, self.inside, self.lower, self.userxattr, tuple(made.values()), tuple(self.writes))


def layers_of(plan: rootfs.Plan) -> tuple[Layer, ...]:
    """Each copy-on-write layer of ``plan``: its number, where it is mounted inside, its lower directory
    on the host, and what the plan itself makes in it (mount points, symlinks) before the test runs.

    The plan is replayed on paper: a directory, file or symlink the plan makes through ``/newroot``
    belongs to the filesystem mounted last over its parent at that point of the plan, and one made at
    ``/.u{n}/...`` belongs to layer ``n`` directly (a mount point prepared before the overlay went up).
    A layer whose group failed in the container has no upper directory and is skipped by :func:`diff`.
    """
    layers: list[_Building] = []
    pending: dict[int, list[Made]] = {}  # made at /.u{n}, by n, before or after layer n's overlay exists
    mounts: list[tuple[str, _Building | None]] = []  # (inside target, its layer if it is one), in mount order

    def owner(inside: str) -> _Building | None:
        parent = os.path.dirname(inside)
        for target, layer in reversed(mounts):
            if _under(parent, target):
                return layer
        return None

    def add(inside: str, kind: Literal["dir", "file", "symlink"], target: str, certain: bool) -> None:
        layer = owner(inside) if inside != "/" else None
        if layer is not None:
            layer.made.append(Made(_rel(inside, layer.inside), kind, target, certain))

    def add_upper(path: str, kind: Literal["dir", "file"], certain: bool) -> bool:
        match = _UPPER.fullmatch(path)
        if match is None:
            return False
        rel = (match.group(2) or "").strip("/")
        entries = pending.setdefault(int(match.group(1)), [])
        if kind == "dir":
            entries += [Made(p, "dir", "", certain) for p in _prefixes(rel)]
        elif rel:
            entries.append(Made(rel, kind, "", certain))
        return True

    for step, certain in _steps(plan):
        match step:
            case ("cow", lower, target, n, rootless):
                layers.append(_Building(n, _inside(target), _lower(lower), rootless))
                mounts.append((layers[-1].inside, layers[-1]))
            case ("mount", _, target, fstype, _, _) if target == rootfs.NEW and fstype == "tmpfs":
                layers.append(_Building(None, "/", None, False))
                mounts.append(("/", layers[-1]))
            case ("mount", _, target, _, _, _) | ("bind_ro", _, target) | ("bind", _, target):
                mounts.append((_inside(target), None))
            case ("mkdirs", path):
                if not add_upper(path, "dir", certain) and _under(path, rootfs.NEW):
                    for prefix in _prefixes(_rel(_inside(path), "/")):
                        add("/" + prefix, "dir", "", certain)
            case ("mkdir", path, _):
                if not add_upper(path, "dir", certain) and _under(path, rootfs.NEW):
                    add(_inside(path), "dir", "", certain)
            case ("touch", path):
                if not add_upper(path, "file", certain) and _under(path, rootfs.NEW):
                    add(_inside(path), "file", "", certain)
            case ("symlink", target, path):
                if _under(path, rootfs.NEW):
                    add(_inside(path), "symlink", target, certain)
    for layer in layers:
        if layer.n is not None:
            layer.made[:0] = pending.pop(layer.n, [])
    for path in rootfs.ENGINE_WRITES:
        found = owner(path)
        if found is not None:
            found.writes.append(_rel(path, found.inside))
            # The engine makes the file's directory if the root has none (rootfs.write_hosts).
            add(os.path.dirname(path), "dir", "", False)
    return tuple(layer.layer() for layer in layers)


def _steps(plan: rootfs.Plan) -> Iterator[tuple[rootfs.Step, bool]]:
    """The plan's steps in order, each with whether it is certain (outside an ``optional`` group)."""
    for op in plan:
        match op:
            case ("note", _):
                continue
            case ("optional", _, steps):
                for step in steps:
                    yield step, False
            case _:
                yield op, True


# --- results ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Change:
    kind: Kind
    #: As the test sees it; bytes that are not UTF-8 are kept as surrogates (``os.fsencode`` gives them back).
    path: str
    #: ``file``, ``dir``, ``symlink``, ``fifo``, ``socket``, ``char`` or ``block``: what is there now
    #: (for ``D``: what was there).
    type: str
    #: A regular file's size now; 0 otherwise.
    size: int = 0


@dataclasses.dataclass(frozen=True)
class Changes:
    """What :func:`diff` found: at most ``limit`` changes, sorted, and how many more there were."""

    changes: tuple[Change, ...]
    #: Changes found but not listed (beyond ``limit``).
    more: int = 0
    #: ``False`` when something was not read (a budget ran out, a directory could not be opened): the
    #: listing may miss changes and ``more`` is then a lower bound.  ``problems`` says what.
    complete: bool = True
    problems: tuple[str, ...] = ()
    #: ``__pycache__`` entries left out (see the module's docstring).
    pycache: int = 0

    def pairs(self) -> list[tuple[str, str]]:
        """``[("A", "/etc/app.conf"), ...]``: what a test asserts on."""
        return [(c.kind, c.path) for c in self.changes]

    def lines(self, max_lines: int = 40) -> list[str]:
        """The report section's lines: ``A /etc/app.conf``, at most ``max_lines`` of them, then what was left
        out.  Names are shown with :func:`display`, so a name cannot forge a line of the report."""
        lines = [f"{c.kind} {display(c.path)}" for c in self.changes[:max_lines]]
        rest = max(0, len(self.changes) - max_lines) + self.more
        if rest:
            lines.append(f"... and {rest} more" if self.complete else f"... and at least {rest} more")
        if self.pycache:
            lines.append(f"({self.pycache} __pycache__ entr{'y' if self.pycache == 1 else 'ies'} not listed)")
        lines += [f"could not read everything: {p}" for p in self.problems]
        return lines


def display(path: str) -> str:
    """``path`` with every byte that is not printable UTF-8 (and backslash) shown as ``\\xNN``."""
    out: list[str] = []
    for ch in path:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte surrogateescape kept
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif ch == "\\":
            out.append("\\\\")
        else:
            out.append(ch)
    return "".join(out)


class _Rec(NamedTuple):
    key: list[str]
    kind: Kind
    path: str
    type: str
    size: int
    #: What :class:`Snapshot` compares: (inode, ctime) of a file, (inode, mode, uid, gid, mtime) of a directory.
    sig: tuple[int, ...]

    def change(self) -> Change:
        return Change(self.kind, self.path, self.type, self.size)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """Every change of a container at one moment, to diff against later (see :func:`diff`'s ``since``)."""

    records: tuple[_Rec, ...]
    complete: bool
    problems: tuple[str, ...]
    pycache: bool
    hostname: str | None


# --- time ---------------------------------------------------------------------------------------

_CLOCK_REALTIME_COARSE: Final = 5


#: The file :func:`mark` stamps, in the scratch tmpfs outside every layer: never seen inside, never listed.
_MARK: Final = ".lonely-since"


def mark(scratch_fd: int) -> int:
    """Now, for :func:`diff`'s ``since``, as the container's filesystem itself stamps it.

    A fine-grained stamp that separates what came before from what comes
    after, made on the scratch tmpfs: touched, its time read (which makes the
    kernel stamp that file with the fine-grained clock the next time), then
    touched again.  With multigrain timestamps (Linux 6.13+), that stamp also
    becomes the floor of every stamp handed out later, coarse or not, so
    every change before it is older and every change after it is not.  On
    older kernels stamps are coarse: a change made in the same clock tick
    just before may then count as after, never the other way round.
    """
    fd = os.open(_MARK, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=scratch_fd)
    try:
        os.utime(fd)
        os.fstat(fd)
        os.utime(fd)
        return os.fstat(fd).st_ctime_ns
    finally:
        os.close(fd)


def clock_ns() -> int:
    """Now, for :func:`diff`'s ``since``, on the clock the kernel stamps files with.

    tmpfs takes timestamps from the coarse clock (or finer, never earlier), so a change made after
    this call never carries an earlier time.  A change made in the same tick before it (at most a
    few milliseconds) may be counted as after.
    """
    try:
        return time.clock_gettime_ns(_CLOCK_REALTIME_COARSE)
    except OSError:  # pragma: no cover - every Linux since 2.6.32 has it
        return time.clock_gettime_ns(time.CLOCK_REALTIME) - 10_000_000


_STATX_BTIME: Final = 0x800
_AT_SYMLINK_NOFOLLOW: Final = 0x100
_AT_EMPTY_PATH: Final = 0x1000
_statx = getattr(LIBC, "statx", None)


def _btime_ns(dir_fd: int, name: str) -> int | None:
    """A file's birth time (``statx``; tmpfs has it), ``None`` where the kernel or libc cannot tell."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(256)
    flags = _AT_SYMLINK_NOFOLLOW | (_AT_EMPTY_PATH if not name else 0)
    if _statx(ctypes.c_int(dir_fd), os.fsencode(name), ctypes.c_int(flags), ctypes.c_uint(_STATX_BTIME), buf):
        return None
    if not struct.unpack_from("I", buf, 0)[0] & _STATX_BTIME:
        return None
    sec, nsec = struct.unpack_from("qI", buf, 80)
    return int(sec) * 1_000_000_000 + int(nsec)


# --- the walk -----------------------------------------------------------------------------------


def _type(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char"
    return "block" if stat.S_ISBLK(mode) else "unknown"


def _key(path: str) -> list[str]:
    return path.split("/")


def _join(top: str, name: str) -> str:
    return top + name if top.endswith("/") else f"{top}/{name}"


def _sig(st: os.stat_result) -> tuple[int, ...]:
    if stat.S_ISDIR(st.st_mode):
        # Not ctime (a copy-up below a directory moves it), nor mtime (see _meta); what it holds is compared
        # entry by entry.
        return (st.st_ino, *_meta(st))
    return (st.st_ino, st.st_ctime_ns)


def _meta(st: os.stat_result) -> tuple[int, ...]:
    """What makes a directory ``C`` by itself.  Not its mtime: making and removing a temporary file
    (``sed -i``, an atomic rename over a file, bytecode left out as ``__pycache__``) moves it although
    the directory lists the same names."""
    return (st.st_mode, st.st_uid, st.st_gid)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class _Walk:
    """One walk's settings, budget and findings, shared by its layers."""

    def __init__(self, *, since: int | None, walk_limit: int, pycache: bool, hostname: str | None) -> None:
        self.since = since
        self.walk_limit = walk_limit
        self.pycache = pycache
        self.hostname = hostname
        self.seen = 0
        self.exhausted = False
        self.complete = True
        self.problems: list[str] = []
        self.more_problems = 0
        self.hidden = 0

    def problem(self, text: str) -> None:
        self.complete = False
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.more_problems += 1

    def failed(self, path: str, what: str, exc: OSError) -> None:
        self.problem(f"{display(path)}: {what}: {exc.strerror or exc}")

    def all_problems(self) -> tuple[str, ...]:
        extra = [f"{self.more_problems} more problems"] if self.more_problems else []
        return (*self.problems, *extra)

    def hides(self, name: str) -> bool:
        if name == _PYCACHE and not self.pycache:
            self.hidden += 1
            return True
        return False


@dataclasses.dataclass
class _Dir:
    """A directory being walked: the upper directory, and the lower one at the same path (what was there
    before), and the lower one whose entries show through (the same one, unless a redirect says where)."""

    rel: str
    inside: str
    depth: int
    upper: int | None
    before: int | None
    shown: int | None
    shown_is_before: bool
    #: Made at or after ``since`` (or no ``since``): what it lost counts as this test's deletions.
    fresh: bool = True
    opaque: bool = False
    owned: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Pending:
    """A directory found in a listing, walked when the walk reaches it."""

    name: str
    now: os.stat_result  # the upper entry, or the shown lower entry when ``from_shown``
    before: os.stat_result | None
    made: Made | None
    from_shown: bool = False


class _LayerWalk:
    """One layer: a depth-first walk in sorted order, so that the first ``limit`` changes found are the
    first ``limit`` of the sorted listing and the walk can stop there."""

    def __init__(self, walk: _Walk, layer: Layer, upper: int, lower: int | None) -> None:
        self.walk = walk
        self.layer = layer
        self.upper = upper
        self.lower = lower
        self.dev = os.fstat(upper).st_dev
        self.lower_dev = os.fstat(lower).st_dev if lower is not None else None
        self.overlay = layer.n is not None
        self.xattr = "user.overlay." if layer.userxattr else "trusted.overlay."
        self.made: dict[str, dict[str, Made]] = {}
        for m in layer.made:
            self.made.setdefault(os.path.dirname(m.rel), {}).setdefault(os.path.basename(m.rel), m)
        self.writes = frozenset(layer.writes)

    # -- reading ----------------------------------------------------------------------------------

    def scan(self, fd: int, inside: str) -> dict[str, os.stat_result]:
        found: dict[str, os.stat_result] = {}
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    if self.walk.seen >= self.walk.walk_limit:
                        if not self.walk.exhausted:
                            self.walk.exhausted = True
                            self.walk.problem(f"stopped after looking at {self.walk.walk_limit} entries")
                        break
                    self.walk.seen += 1
                    try:
                        found[entry.name] = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:  # deleted while we read: the container is still running
                        continue
                    except OSError as exc:
                        self.walk.failed(_join(inside, entry.name), "cannot stat", exc)
        except OSError as exc:
            self.walk.failed(inside, "cannot list", exc)
        return found

    def lstat(self, fd: int | None, name: str, inside: str) -> os.stat_result | None:
        if fd is None:
            return None
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self.walk.failed(_join(inside, name), "cannot look it up in the lower layer", exc)
            return None

    def getxattr(self, fd: int, name: str) -> bytes | None:
        try:
            return os.getxattr(fd, self.xattr + name)
        except OSError:  # ENODATA, or no xattrs at all
            return None

    def open_dir(self, fd: int, name: str | bytes, dev: int | None) -> int | None:
        """A subdirectory, never through a symlink nor into another filesystem (a mount point)."""
        child = os.open(name, _O_DIR, dir_fd=fd)
        if os.fstat(child).st_dev != dev:
            os.close(child)
            return None
        return child

    def read_small(self, fd: int, name: str, limit: int) -> bytes | None:
        try:
            f = os.open(name, _O_FILE, dir_fd=fd)
        except OSError:
            return None
        try:
            if not stat.S_ISREG(os.fstat(f).st_mode):
                return None
            data = os.read(f, limit + 1)
            return data if len(data) <= limit else None
        finally:
            os.close(f)

    # -- deciding ---------------------------------------------------------------------------------

    def since_ok(self, st: os.stat_result) -> bool:
        return self.walk.since is None or st.st_ctime_ns >= self.walk.since

    def born_since(self, fd: int, name: str) -> bool:
        """Made at or after ``since``; when the kernel cannot tell, assume so."""
        if self.walk.since is None:
            return True
        born = _btime_ns(fd, name)
        return born is None or born >= self.walk.since

    def made_unchanged(self, d: _Dir, name: str, st: os.stat_result, m: Made) -> bool:
        if m.type == "dir":
            return stat.S_ISDIR(st.st_mode)
        if m.type == "file":
            return stat.S_ISREG(st.st_mode) and st.st_size == 0
        if not stat.S_ISLNK(st.st_mode) or d.upper is None:
            return False
        try:
            return os.readlink(name, dir_fd=d.upper) == m.target
        except OSError:
            return False

    def engine_unchanged(self, d: _Dir, name: str, st: os.stat_result, before: os.stat_result | None) -> bool:
        """The file is what the engine wrote before the test: its text follows from the root's own file."""
        rel = f"{d.rel}/{name}" if d.rel else name
        text_of = _ENGINE_TEXT.get(_join(self.layer.inside, rel))
        if rel not in self.writes or text_of is None or d.upper is None or not stat.S_ISREG(st.st_mode):
            return False
        original: str | None = None
        if before is not None:
            if not stat.S_ISREG(before.st_mode) or d.before is None:
                return False
            raw = self.read_small(d.before, name, _ENGINE_FILE_MAX)
            if raw is None:
                return False
            original = raw.decode("utf-8", "surrogateescape")
        text = text_of(original, self.walk.hostname)
        if text is None:
            return False
        expected = text.encode("utf-8", "surrogateescape")
        if st.st_size != len(expected) or self.read_small(d.upper, name, len(expected)) != expected:
            return False
        if before is not None:  # rewritten in place: a copy-up keeps mode and owner
            return (st.st_mode, st.st_uid, st.st_gid) == (before.st_mode, before.st_uid, before.st_gid)
        return stat.S_IMODE(st.st_mode) & ~0o644 == 0  # made with 0644, less the umask

    def file_kind(
        self, d: _Dir, name: str, st: os.stat_result, before: os.stat_result | None, m: Made | None
    ) -> Kind | None:
        if not self.since_ok(st):
            return None
        if m is not None and self.made_unchanged(d, name, st, m):
            return None
        if self.engine_unchanged(d, name, st, before):
            return None
        if before is not None or m is not None:
            return "C"
        if d.upper is not None and not self.born_since(d.upper, name):
            return "C"  # made by an earlier test of a shared container, changed by this one
        return "A"

    def dir_is_added(self, d: _Dir, name: str, before: os.stat_result | None, m: Made | None) -> bool:
        return before is None and m is None and d.upper is not None and self.born_since(d.upper, name)

    def own_kind(self, parent: _Dir, p: _Pending, child: _Dir | None, changed_inside: bool) -> Kind | None:
        """A directory's own line, once its entries are known (``changed_inside``: one was added or deleted)."""
        if p.before is None and p.made is None:
            if p.from_shown or parent.upper is None or self.born_since(parent.upper, p.name):
                return "A"
            return "C" if changed_inside else None
        if changed_inside:
            return "C"
        fresh = child is not None and child.fresh
        if p.made is None and p.before is not None and not stat.S_ISDIR(p.before.st_mode):
            return "C" if fresh else None  # a file or symlink replaced by a directory
        if child is not None and child.opaque and fresh and p.made is None:
            # Deleted and made again.  (overlayfs also marks directories it makes where the lower layer has
            # none as opaque, but those have no ``before``.)
            return "C"
        meta_changed = p.made is None and p.before is not None and _meta(p.now) != _meta(p.before)
        if meta_changed and not p.from_shown and self.since_ok(p.now):
            return "C"
        return None

    # -- walking ----------------------------------------------------------------------------------

    def records(self) -> Generator[_Rec, None, None]:
        root = _Dir(
            rel="",
            inside=self.layer.inside,
            depth=0,
            upper=self.upper,
            before=self.lower,
            shown=self.lower if self.overlay else None,
            shown_is_before=self.overlay,
        )
        stack: list[tuple[_Dir, Iterator[_Rec | _Pending]]] = []
        try:
            changed, items = self.list(root)
            if changed and root.inside != "/":
                yield self.rec("C", root.inside, os.fstat(self.upper))
            stack.append((root, iter(items)))
            while stack:
                d, it = stack[-1]
                item = next(it, None)
                if item is None:
                    stack.pop()
                    for fd in d.owned:
                        os.close(fd)
                    continue
                if isinstance(item, _Rec):
                    yield item
                    continue
                child = self.open_child(d, item)
                inside = _join(d.inside, item.name)
                if child is None:
                    kind = self.own_kind(d, item, None, False)
                    if kind is not None:
                        yield self.rec(kind, inside, item.now)
                    continue
                if child.depth > MAX_DEPTH:
                    self.walk.problem(f"{display(inside)}: deeper than {MAX_DEPTH} levels, not read")
                    changed, items = False, []
                else:
                    changed, items = self.list(child)
                kind = self.own_kind(d, item, child, changed)
                if kind is not None:
                    yield self.rec(kind, inside, item.now)
                stack.append((child, iter(items)))
        finally:
            for d, _ in stack:
                for fd in d.owned:
                    os.close(fd)

    def rec(self, kind: Kind, path: str, st: os.stat_result) -> _Rec:
        if kind == "D":
            return _Rec(_key(path), kind, path, _type(st.st_mode), 0, ())
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        return _Rec(_key(path), kind, path, _type(st.st_mode), size, _sig(st))

    def open_child(self, d: _Dir, p: _Pending) -> _Dir | None:
        inside = _join(d.inside, p.name)
        rel = f"{d.rel}/{p.name}" if d.rel else p.name
        child = _Dir(rel, inside, d.depth + 1, None, None, None, False)
        try:
            if p.from_shown:
                assert d.shown is not None
                child.shown = self.open_dir(d.shown, p.name, self.lower_dev)
                if child.shown is None:
                    return None
                child.owned.append(child.shown)
            else:
                assert d.upper is not None
                child.upper = self.open_dir(d.upper, p.name, self.dev)
                if child.upper is None:
                    if p.made is None:
                        self.walk.problem(f"{display(inside)}: a mount point, not read")
                    return None
                child.owned.append(child.upper)
                if self.walk.since is not None:
                    child.fresh = self.born_since(child.upper, "")
        except (FileNotFoundError, NotADirectoryError):
            return None  # replaced while we read
        except OSError as exc:
            if exc.errno != errno.ELOOP:  # a symlink now: replaced while we read
                self.walk.failed(inside, "cannot open the directory", exc)
            return None
        if p.before is not None and stat.S_ISDIR(p.before.st_mode) and d.before is not None:
            try:
                child.before = self.open_dir(d.before, p.name, self.lower_dev)
            except OSError as exc:
                self.walk.failed(inside, "cannot open it in the lower layer", exc)
            if child.before is not None:
                child.owned.append(child.before)
        if child.upper is not None and self.overlay:
            child.opaque = self.getxattr(child.upper, "opaque") == b"y"
            redirect = self.getxattr(child.upper, "redirect")
            if child.opaque or d.shown is None:
                pass
            elif redirect:
                child.shown = self.resolve_redirect(d, redirect)
                if child.shown is not None:
                    child.owned.append(child.shown)
            elif d.shown_is_before:
                child.shown, child.shown_is_before = child.before, True
            else:
                with contextlib.suppress(OSError):
                    child.shown = self.open_dir(d.shown, p.name, self.lower_dev)
                if child.shown is not None:
                    child.owned.append(child.shown)
        return child

    def resolve_redirect(self, parent: _Dir, redirect: bytes) -> int | None:
        """The lower directory a renamed directory shows (overlayfs ``redirect_dir``): absolute from the layer's
        lower root, or relative to the parent's lower directory.  Component by component, never a symlink."""
        start = self.lower if redirect.startswith(b"/") else parent.shown
        if start is None:
            return None
        fd: int | None = None
        try:
            for part in [p for p in redirect.split(b"/") if p]:
                if part == b"..":
                    raise OSError(errno.EINVAL, "a redirect with ..")
                nxt = self.open_dir(start if fd is None else fd, part, self.lower_dev)
                if fd is not None:
                    os.close(fd)
                fd = nxt
                if fd is None:
                    return None
            return fd if fd is not None else os.open(".", _O_DIR, dir_fd=start)
        except OSError:
            if fd is not None:
                os.close(fd)
            return None

    def list(self, d: _Dir) -> tuple[bool, list[_Rec | _Pending]]:
        """The changes among ``d``'s entries, sorted by name, and whether one was added or deleted."""
        upper = self.scan(d.upper, d.inside) if d.upper is not None else {}
        made = self.made.get(d.rel, {})
        items: list[tuple[str, _Rec | _Pending]] = []
        visible: set[str] = set()
        changed = False
        for name, st in upper.items():
            inside = _join(d.inside, name)
            if self.overlay and _is_whiteout(st):
                if self.walk.hides(name):
                    continue
                before = self.lstat(d.before, name, d.inside)
                # Whiteouts share one inode, whose ctime moves with every new one: date them by their directory.
                if before is not None and self.since_ok(st) and (d.upper is None or self.dir_touched(d.upper)):
                    items.append((name, self.rec("D", inside, before)))
                    changed = True
                continue
            visible.add(name)
            if self.walk.hides(name):
                continue
            before = self.lstat(d.before, name, d.inside)
            m = made.get(name)
            if m is not None and st.st_dev != self.dev:
                continue  # a mount point the plan made (the container is running): what is mounted is not ours
            if stat.S_ISDIR(st.st_mode):
                items.append((name, _Pending(name, st, before, m)))
                changed = changed or self.dir_is_added(d, name, before, m)
                continue
            kind = self.file_kind(d, name, st, before, m)
            if kind is not None:
                items.append((name, self.rec(kind, inside, st)))
                changed = changed or kind == "A"
        if d.shown is not None and not d.shown_is_before and d.fresh:
            for name, st in self.scan(d.shown, d.inside).items():
                if name in upper or self.walk.hides(name):
                    continue  # hidden by the upper layer (an entry or a whiteout)
                visible.add(name)
                before = self.lstat(d.before, name, d.inside)
                if before is not None and (before.st_dev, before.st_ino) == (st.st_dev, st.st_ino):
                    continue
                shown_kind: Kind = "C" if before is not None or name in made else "A"
                if stat.S_ISDIR(st.st_mode) and shown_kind == "A":
                    items.append((name, _Pending(name, st, None, None, from_shown=True)))
                else:
                    items.append((name, self.rec(shown_kind, _join(d.inside, name), st)))
                changed = changed or shown_kind == "A"
        if d.before is not None and not d.shown_is_before and d.fresh:
            for name, st in self.scan(d.before, d.inside).items():
                if name in visible or (name in upper and self.overlay and _is_whiteout(upper[name])):
                    continue  # still there, or already listed by its whiteout
                if self.walk.hides(name):
                    continue
                items.append((name, self.rec("D", _join(d.inside, name), st)))
                changed = True
        if self.walk.since is None:
            for name, m in made.items():
                if m.certain and name not in visible and name not in upper and self.lstat(d.before, name, "") is None:
                    items.append((name, _Rec(_key(_join(d.inside, name)), "D", _join(d.inside, name), m.type, 0, ())))
                    changed = True
        items.sort(key=lambda item: item[0])
        return changed, [item for _, item in items]

    def dir_touched(self, fd: int) -> bool:
        """An entry of the directory was added, removed or renamed at or after ``since`` (its mtime: a
        copy-up restores it, a whiteout moves it)."""
        return self.walk.since is None or os.fstat(fd).st_mtime_ns >= self.walk.since


# --- the public calls ---------------------------------------------------------------------------


def _empty(fd: int) -> bool:
    try:
        with os.scandir(fd) as it:
            return next(it, None) is None
    except OSError:
        return False


class _Opened:
    """Each layer's upper and lower directory, opened once; closed together."""

    def __init__(self, scratch_fd: int, layers: Sequence[Layer], top_fd: int | None, walk: _Walk) -> None:
        self.roots: list[tuple[Layer, int, int | None]] = []
        for layer in layers:
            try:
                if layer.n is None:
                    if top_fd is None:
                        walk.problem(f"{display(layer.inside)}: the top-level tmpfs was not handed over, not read")
                        continue
                    upper = os.open(".", _O_DIR, dir_fd=top_fd)
                else:
                    upper = os.open(f".u{layer.n}", _O_DIR, dir_fd=scratch_fd)
            except FileNotFoundError:
                continue  # the layer was never made (its optional group failed)
            except OSError as exc:
                walk.failed(layer.inside, "cannot open the layer", exc)
                continue
            lower: int | None = None
            if layer.lower is not None:
                try:
                    lower = os.open(layer.lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                except OSError as exc:
                    if not _empty(upper):  # rootless, /root say: the container could not write there either
                        walk.failed(layer.inside, f"cannot open its lower directory {layer.lower}", exc)
            self.roots.append((layer, upper, lower))

    def close(self) -> None:
        for _, upper, lower in self.roots:
            os.close(upper)
            if lower is not None:
                os.close(lower)


def _records(opened: _Opened, walk: _Walk) -> Generator[_Rec, None, None]:
    """Every layer's changes merged in one sorted stream; a path two layers report is listed once."""
    streams = [_LayerWalk(walk, layer, upper, lower).records() for layer, upper, lower in opened.roots]
    last: list[str] | None = None
    try:
        for rec in heapq.merge(*streams, key=lambda r: r.key):
            if rec.key != last:
                last = rec.key
                yield rec
    finally:
        for stream in streams:
            stream.close()


def diff(
    scratch_fd: int,
    layers: Sequence[Layer],
    *,
    top_fd: int | None = None,
    hostname: str | None = None,
    since: int | Snapshot | None = None,
    limit: int | None = LIMIT,
    pycache: bool = False,
    walk_limit: int = WALK_LIMIT,
) -> Changes:
    """What changed in the container's copy-on-write layers, as ``docker diff`` lists it (see the module).

    ``scratch_fd`` is a directory descriptor of the scratch tmpfs the container's root was built in (any
    flags, ``O_PATH`` will do); ``top_fd`` one of ``/newroot``'s own tmpfs in the rootless host view
    (its layer has ``n=None``), without which that layer is reported as not read.  ``hostname`` is the
    container's: the ``/etc/hosts`` the engine wrote from it is not listed.  ``limit=None`` lists all.
    The cost is the walk of the upper layers, about 5 us of CPU an entry (0.3 ms for a handful of files,
    55 ms for 10,000: ``benchmarks/changes.py``); nothing runs unless this is called.

    ``since`` (containers shared by several tests):

    * a time from :func:`clock_ns` taken when the test started: what was touched since then, at no cost
      before.  Kinds are decided with the file's ctime and birth time, which a test cannot set back,
      and deletions by their directory's mtime (whiteouts share one inode).  What it cannot see: an
      entry an earlier test made (it was not in the root the container started with) and this test
      deleted or renamed away leaves no trace; one this test replaced (rename over it, delete and make
      again) is ``A``, not ``C``; a file an earlier test deleted and this one made again is ``C``; a
      deletion an earlier test made in a directory where this test also added or deleted something
      is listed again; a test that sets a directory's mtime back hides its deletions there.
    * a :class:`Snapshot` taken when the test started (:func:`snapshot`: a full walk, so only when
      asked): exact, every change since then and its kind.  ``hostname`` and ``pycache`` are then the
      snapshot's.
    """
    if isinstance(since, Snapshot):
        return _since_snapshot(scratch_fd, layers, top_fd=top_fd, base=since, limit=limit, walk_limit=walk_limit)
    walk = _Walk(since=since, walk_limit=walk_limit, pycache=pycache, hostname=hostname)
    opened = _Opened(scratch_fd, layers, top_fd, walk)
    try:
        return _collect(_records(opened, walk), walk, limit)
    finally:
        opened.close()


def _collect(records: Iterable[_Rec], walk: _Walk, limit: int | None) -> Changes:
    listed: list[Change] = []
    more = 0
    for rec in records:
        if limit is None or len(listed) < limit:
            listed.append(rec.change())
        else:
            more += 1
    return Changes(tuple(listed), more, walk.complete, walk.all_problems(), walk.hidden)


def snapshot(
    scratch_fd: int,
    layers: Sequence[Layer],
    *,
    top_fd: int | None = None,
    hostname: str | None = None,
    pycache: bool = False,
    walk_limit: int = WALK_LIMIT,
) -> Snapshot:
    """Every change so far, kept to diff against later: ``diff(..., since=snapshot(...))`` lists exactly
    what changed in between.  It walks the whole upper layer, so take one only when asked to."""
    walk = _Walk(since=None, walk_limit=walk_limit, pycache=pycache, hostname=hostname)
    opened = _Opened(scratch_fd, layers, top_fd, walk)
    try:
        records = tuple(_records(opened, walk))
    finally:
        opened.close()
    return Snapshot(records, walk.complete, walk.all_problems(), pycache, hostname)


def _since_snapshot(
    scratch_fd: int,
    layers: Sequence[Layer],
    *,
    top_fd: int | None,
    base: Snapshot,
    limit: int | None,
    walk_limit: int,
) -> Changes:
    walk = _Walk(since=None, walk_limit=walk_limit, pycache=base.pycache, hostname=base.hostname)
    if not base.complete:
        walk.problem("the snapshot this is compared with was incomplete")
    opened = _Opened(scratch_fd, layers, top_fd, walk)
    try:
        return _collect(_compose(base.records, _records(opened, walk)), walk, limit)
    finally:
        opened.close()


def _compose(old: Sequence[_Rec], new: Iterable[_Rec]) -> list[_Rec]:
    """Changes between two diffs against the same original root (both sorted): what moved in between.

    A path in both with the same identity did not change; one that existed at the snapshot (``A`` or
    ``C`` then) and exists now changed (``C``); ``D`` now, ``D`` (or from existing); gone from the diff
    now means back as in the original root.  Then docker's rules again: the directory of an added or
    deleted entry is ``C``, and a deleted directory is one ``D`` line.
    """
    out: dict[str, _Rec] = {}
    skipped: dict[str, _Rec] = {}
    old_it = iter(old)
    new_it = iter(new)
    a = next(old_it, None)
    b = next(new_it, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a.key < b.key):
            assert a is not None
            out[a.path] = a._replace(kind="D" if a.kind == "A" else "A" if a.kind == "D" else "C")
            a = next(old_it, None)
        elif a is None or b.key < a.key:
            out[b.path] = b
            b = next(new_it, None)
        else:
            existed = a.kind != "D"
            if (a.kind, a.type, a.sig) == (b.kind, b.type, b.sig):
                skipped[b.path] = b
            elif b.kind != "D":
                out[b.path] = b._replace(kind="C" if existed else "A")
            elif existed:
                out[b.path] = b
            a = next(old_it, None)
            b = next(new_it, None)
    for rec in list(out.values()):
        parent = os.path.dirname(rec.path)
        if rec.kind != "C" and parent not in (rec.path, "/") and parent not in out:
            base = skipped.get(parent)
            if base is not None:
                out[parent] = base._replace(kind="C")
    result: list[_Rec] = []
    for rec in sorted(out.values(), key=lambda r: r.key):
        if result and result[-1].kind == "D" and rec.key[: len(result[-1].key)] == result[-1].key:
            continue  # inside a deleted directory
        result.append(rec)
    return result


# --- keeping the evidence -----------------------------------------------------------------------


class KeepError(Exception):
    """:func:`keep` cannot use the directory it was given; the message names it."""


@dataclasses.dataclass(frozen=True)
class Kept:
    dest: str
    #: Regular files, symlinks and directories written under ``dest/fs``.
    copied: int
    bytes: int
    #: (path, why) of the added and changed entries not copied: over the size limit, not a file, a
    #: directory or a symlink, gone or unreadable.  Also in ``dest/NOT_COPIED``.
    not_copied: tuple[tuple[str, str], ...]
    deleted: int
    #: Everything the diff found is in ``dest``: the diff was complete and unlimited, nothing was skipped.
    complete: bool


class _Tree:
    """Directories along one path, opened from a root descriptor one component at a time, never through a
    symlink; consecutive paths share their common prefix (the changes come sorted)."""

    def __init__(self, root: int, dev: int | None) -> None:
        self.root = root
        self.dev = dev
        self.stack: list[tuple[str, int]] = []

    def at(self, parts: Sequence[str], make: bool = False) -> int:
        common = 0
        while common < min(len(self.stack), len(parts)) and self.stack[common][0] == parts[common]:
            common += 1
        self.pop_to(common)
        for part in parts[common:]:
            parent = self.stack[-1][1] if self.stack else self.root
            if make:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700, dir_fd=parent)
            fd = os.open(part, _O_DIR, dir_fd=parent)
            if self.dev is not None and os.fstat(fd).st_dev != self.dev:
                os.close(fd)
                raise OSError(errno.EXDEV, "a mount point")
            self.stack.append((part, fd))
        return self.stack[-1][1] if self.stack else self.root

    def pop_to(self, depth: int) -> None:
        while len(self.stack) > depth:
            self.popped(*self.stack.pop())

    def popped(self, name: str, fd: int) -> None:
        os.close(fd)

    def close(self) -> None:
        self.pop_to(0)


class _DestTree(_Tree):
    """The copy: directories are made ``0700`` and get their own mode and mtime once everything below them
    is written (a ``0555`` directory must still take its files)."""

    def __init__(self, root: int) -> None:
        super().__init__(root, None)
        self.finish: dict[int, tuple[int, int, int]] = {}  # fd -> (mode, atime, mtime)

    def popped(self, name: str, fd: int) -> None:
        mode, atime, mtime = self.finish.pop(fd, (0o755, -1, -1))
        try:
            if atime >= 0:
                os.utime(fd, ns=(atime, mtime))
            os.fchmod(fd, mode)
        finally:
            os.close(fd)


def _owning(layers: Sequence[tuple[Layer, _Tree]], path: str) -> tuple[Layer, _Tree] | None:
    best: tuple[Layer, _Tree] | None = None
    for layer, tree in layers:
        if _under(path, layer.inside) and (best is None or len(layer.inside) > len(best[0].inside)):
            best = (layer, tree)
    return best


def keep(
    scratch_fd: int,
    layers: Sequence[Layer],
    changes: Changes,
    dest: str,
    *,
    top_fd: int | None = None,
    max_bytes: int = KEEP_MAX_BYTES,
) -> Kept:
    """Copy the evidence out: the added and changed regular files, symlinks and directories of ``changes``
    into ``dest/fs/`` at their path inside, with their modes (less setuid and setgid: the copies belong
    to whoever runs pytest) and mtimes; the deleted paths into ``dest/DELETED``, one a line; what was
    not copied, and why, into ``dest/NOT_COPIED``.  Device nodes, fifos and sockets are listed, not
    copied.  At most ``max_bytes`` in all: a file that does not fit is listed, and smaller ones after it
    are still copied.  Pass the changes of a ``diff(..., limit=None)`` to copy everything.

    ``dest`` must be an empty directory, made by the caller under pytest's basetemp.  The container can
    write there too (the basetemp window), so nothing in ``dest`` is trusted either: every file is
    created exclusively, relative to directories opened without following symlinks.
    """
    try:
        dest_fd = os.open(dest, _O_DIR)
    except OSError as exc:
        raise KeepError(f"cannot keep the changes in {dest!r}: {exc.strerror}") from None
    try:
        if os.listdir(dest_fd):
            raise KeepError(f"cannot keep the changes in {dest!r}: it must be an empty directory")
        opened = _Opened(scratch_fd, layers, top_fd, _Walk(since=None, walk_limit=0, pycache=True, hostname=None))
        try:
            os.mkdir(TREE, 0o700, dir_fd=dest_fd)
            keeper = _Keeper(opened, os.open(TREE, _O_DIR, dir_fd=dest_fd), max_bytes)
            try:
                for change in changes.changes:
                    keeper.keep(change)
            finally:
                keeper.close()
        finally:
            opened.close()
        _write_list(dest_fd, DELETED, [display(p) for p in keeper.deleted])
        notes = [f"{display(p)}\t{why}" for p, why in keeper.skipped]
        if changes.more or not changes.complete:
            notes.append(f"# {'' if changes.complete else 'at least '}{changes.more} more changes were not listed")
        _write_list(dest_fd, NOT_COPIED, notes)
    except OSError as exc:  # someone else wrote into dest meanwhile (the container can: the basetemp window)
        raise KeepError(f"cannot keep the changes in {dest!r}: {exc.filename or ''} {exc.strerror}") from None
    finally:
        os.close(dest_fd)
    complete = changes.complete and not changes.more and not keeper.skipped
    return Kept(dest, keeper.copied, keeper.written, tuple(keeper.skipped), len(keeper.deleted), complete)


class _Keeper:
    """One :func:`keep`: where each change comes from (its layer's upper directory) and goes to."""

    def __init__(self, opened: _Opened, tree_fd: int, max_bytes: int) -> None:
        self.trees = [(layer, _Tree(upper, os.fstat(upper).st_dev)) for layer, upper, _ in opened.roots]
        self.out = _DestTree(tree_fd)
        self.max_bytes = max_bytes
        self.copied = 0
        self.written = 0
        self.skipped: list[tuple[str, str]] = []
        self.deleted: list[str] = []

    def close(self) -> None:
        for _, tree in self.trees:
            tree.close()
        self.out.close()
        os.close(self.out.root)

    def keep(self, change: Change) -> None:
        if change.kind == "D":
            self.deleted.append(change.path)
            return
        owner = _owning(self.trees, change.path)
        if owner is None:
            self.skipped.append((change.path, "not in a copy-on-write layer"))
            return
        try:
            why = self.copy(*owner, change.path)
        except OSError as exc:
            why = f"could not copy: {exc.strerror or exc}"
        if why is None:
            self.copied += 1
        else:
            self.skipped.append((change.path, why))

    def copy(self, layer: Layer, tree: _Tree, path: str) -> str | None:
        """Copy one entry; returns why it was not copied (``None``: it was)."""
        rel = _rel(path, layer.inside)
        parts = rel.split("/") if rel else []
        dest_parts = [p for p in path.split("/") if p]
        if not parts:  # the layer's root itself: a directory
            st = os.fstat(tree.at([]))
            fd = self.out.at(dest_parts, make=True)
            self.out.finish[fd] = (stat.S_IMODE(st.st_mode) & ~_STRIPPED_BITS, st.st_atime_ns, st.st_mtime_ns)
            return None
        try:
            src_dir = tree.at(parts[:-1])
            st = os.stat(parts[-1], dir_fd=src_dir, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            # Gone since the diff, or shown from the lower layer by a renamed directory (``redirect_dir``).
            return "not in the upper layer (gone, or shown from the lower layer)"
        except OSError as exc:
            return f"a directory on its way cannot be opened: {exc.strerror}"
        name = parts[-1]
        kind = _type(st.st_mode)
        if kind not in ("file", "dir", "symlink"):
            return f"a {kind}, not copied"
        if kind == "file" and self.written + st.st_size > self.max_bytes:
            return f"{st.st_size} bytes: does not fit in the {self.max_bytes}-byte limit of kept files"
        dst_dir = self.out.at(dest_parts[:-1], make=True)
        mode = stat.S_IMODE(st.st_mode) & ~_STRIPPED_BITS
        if kind == "dir":
            fd = self.out.at(dest_parts, make=True)
            self.out.finish[fd] = (mode, st.st_atime_ns, st.st_mtime_ns)
        elif kind == "symlink":
            os.symlink(os.readlink(name, dir_fd=src_dir), name, dir_fd=dst_dir)
            with contextlib.suppress(OSError):
                os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dst_dir, follow_symlinks=False)
        else:
            return self.copy_file(layer, src_dir, dst_dir, parts, mode)
        return None

    def copy_file(self, layer: Layer, src_dir: int, dst_dir: int, parts: list[str], mode: int) -> str | None:
        name = parts[-1]
        src = os.open(name, _O_FILE, dir_fd=src_dir)
        try:
            st = os.fstat(src)
            if not stat.S_ISREG(st.st_mode):
                return "replaced while it was copied"
            data = _metacopy_data(layer, src, parts)
            try:
                size = min(os.fstat(data).st_size, self.max_bytes - self.written)
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                dst = os.open(name, flags, 0o600, dir_fd=dst_dir)
                try:
                    self.written += _copy_bytes(data, dst, size)
                    os.fchmod(dst, mode)
                    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
                finally:
                    os.close(dst)
            finally:
                if data != src:
                    os.close(data)
        finally:
            os.close(src)
        return None


def _metacopy_data(layer: Layer, src: int, parts: list[str]) -> int:
    """Where a file's bytes are: overlayfs ``metacopy`` copies up only the metadata of a chmod'ed file and
    leaves the bytes in the lower layer (at the same path, or where ``redirect`` says)."""
    if layer.userxattr or layer.lower is None:  # userxattr mounts never metacopy
        return src
    try:
        os.getxattr(src, "trusted.overlay.metacopy")
    except OSError:
        return src
    try:
        redirect = os.getxattr(src, "trusted.overlay.redirect")
        where = [p for p in os.fsdecode(redirect).split("/") if p]
    except OSError:
        where = parts
    if ".." in where or not where:
        raise OSError(errno.EINVAL, "a metacopy file whose data cannot be found")
    fd = os.open(layer.lower, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in where[:-1]:
            nxt = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        data = os.open(where[-1], _O_FILE, dir_fd=fd)
    finally:
        os.close(fd)
    if not stat.S_ISREG(os.fstat(data).st_mode):
        os.close(data)
        raise OSError(errno.EINVAL, "a metacopy file whose data is not a regular file")
    return data


def _copy_bytes(src: int, dst: int, size: int) -> int:
    """Up to ``size`` bytes (the size when we looked: a file that grows meanwhile is cut there)."""
    done = 0
    while done < size:
        try:
            n = os.sendfile(dst, src, done, min(size - done, 1 << 30))
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS) or done:
                raise
            chunk = os.pread(src, min(size - done, 1 << 20), done)
            n = os.write(dst, chunk) if chunk else 0
        if n == 0:
            break  # the file shrank
        done += n
    return done


def _write_list(dest_fd: int, name: str, lines: list[str]) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dest_fd)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)
