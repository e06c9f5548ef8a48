"""A container's root built from a plan compiled once in the parent: one libc call per step, in a tight loop.

The child that builds a root is a fresh fork of pytest: every Python object
it creates or writes to (a reference count is a write) costs a copy-on-write
fault on top of the interpreter's work.  Interpreting the plan there
(``match`` on tagged tuples, path strings built and ``os.fsencode``d, a
Python wrapper around every ctypes call) cost about as much CPU as the
system calls themselves.  So :func:`compile` turns a plan
(:data:`rootfs.Plan`, which stays the source of truth: ``changes.layers_of``
reads it too) into calls whose every decision is taken (``mkdirs`` expanded
into the directories still to check, optional groups kept as blocks) and
whose arguments are ready: ints, paths passed as addresses of bytes the
program keeps (see ``_syscalls.address``), so that a call writes to none of
them.  :func:`run` makes the calls in order.  Only when one fails does the
child look at what it stood for: the error path words the message the plan's
interpreter gave, naming the operation and the path, from the plan.

The parts of a root that depend on no plan (the scratch pivot, the fresh
``/proc`` and what covers it, the final pivot) are programs compiled once at
import: :data:`SCRATCH`, :func:`proc_program`, :data:`SWITCH`.  PID 1 runs them through
:func:`enter_scratch`, :func:`build`, :func:`mount_proc` and :func:`switch_root`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Callable
from typing import Any, Final

from . import _syscalls as sc
from . import rootfs
from .rootfs import HIDDEN_PROC, NEW, PROC_COVERS, RootfsError

#: How a failed call is read (``how``, see :func:`_problem`), the operation of the plan it stands for
#: (``origin``: an index in the plan; -1: a fixed program, whose errors are raised as they are), how its
#: error is worded (``words``: ``(name, *arguments)`` as ``_syscalls.error`` takes them, or
#: ``(None, path[, path2])`` for an error worded as ``os`` words it), and what else its reading needs.
Reading = tuple[int, int, tuple[Any, ...], Any]
#: Calls made one after the other; a failure ends the block (the whole run, or an optional group).
#: ``(functions, their arguments, their readings)``: the loop touches only the first two.
Block = tuple[tuple[Callable[..., int], ...], tuple[tuple[Any, ...], ...], tuple[Reading, ...]]

# How a failure is read.
_PLAIN: Final = 0  # an error, worded by ``words``
_EXISTS_OK: Final = 1  # touch, symlink: something is at the path already, which is all the plan asks
_DIR: Final = 2  # a directory on the way to a mount point: it may exist, as a directory, not a symlink
_UPPER: Final = 3  # an overlay's upper directory: it may exist already (the plan made mount points in it)
_OVERLAY: Final = 4  # the overlay: again without xino on EINVAL, else the lower directory bound read-only
_READ_ONLY: Final = 5  # mount_setattr of a fresh bind: a remount instead; if that fails too, the bind goes
_COVER: Final = 6  # a bind over a /proc entry: ENOENT means this kernel has no such entry, skip its block


@dataclasses.dataclass(frozen=True, eq=False)
class Program:
    """A plan compiled for the child (equal only to itself: its calls hold ctypes functions)."""

    #: The plan it was compiled from, read only to word an error.
    plan: rootfs.Plan
    blocks: tuple[Block, ...]
    #: The plan's own notes, in order; and each with the index of its operation, to merge with failures.
    notes: tuple[str, ...] = ()
    placed_notes: tuple[tuple[int, str], ...] = ()
    #: The bytes whose addresses the calls pass: they live as long as the program.
    strings: tuple[bytes, ...] = dataclasses.field(default=(), repr=False)


#: The program of the empty plan.
EMPTY: Final = Program((), ())

#: What :func:`_problem` returns for a failure that ends its block quietly.
_SKIP: Final = OSError("skipped")
_BIND_REC: Final = sc.MS_BIND | sc.MS_REC
_NO_EXEC: Final = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC

Step = tuple[sc.Call, Reading]


class _Builder:
    """The calls of one program, the strings they point to, and the directories known to be there."""

    def __init__(self) -> None:
        self.blocks: list[Block] = []
        self._strings: dict[str, bytes] = {}
        #: Directories an earlier mandatory step made or checked and that nothing mounted since can have
        #: hidden: a later ``mkdirs`` need not look at them again.
        self.dirs: set[str] = set()

    def at(self, text: str) -> int:
        """The address of ``text``, encoded, NUL-terminated, kept by the program."""
        data = self._strings.get(text)
        if data is None:
            data = self._strings[text] = os.fsencode(text)
        return sc.address(data)

    def at_or_null(self, text: str | None) -> int | None:
        return None if text is None else self.at(text)

    def block(self, steps: list[Step]) -> None:
        if steps:
            calls = tuple(call for call, _ in steps)
            self.blocks.append((tuple(c[0] for c in calls), tuple(c[1] for c in calls), tuple(r for _, r in steps)))

    def covered(self, target: str) -> None:
        """Something was mounted on ``target``: what was below it is another filesystem's now."""
        inside = target.rstrip("/") + "/"
        self.dirs = {path for path in self.dirs if not path.startswith(inside)}

    def program(self, plan: rootfs.Plan, notes: list[tuple[int, str]]) -> Program:
        placed = tuple(notes)
        return Program(plan, tuple(self.blocks), tuple(t for _, t in placed), placed, tuple(self._strings.values()))

    # --- the calls ------------------------------------------------------------------------------------

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> sc.Call:
        at = self.at_or_null
        return sc.mount_call(at(source), self.at(target), at(fstype), flags, at(data))


def _mount_words(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> tuple[Any, ...]:
    return ("mount", source, target, fstype, hex(flags), data)


# --- compiling, in the parent -----------------------------------------------------------------------------


def compile(plan: rootfs.Plan) -> Program:
    """``plan`` as calls.  Runs in the parent; see :func:`compiled` for the cache."""
    builder = _Builder()
    run: list[Step] = []  # consecutive mandatory steps share a block: a failure there ends the build anyway
    notes: list[tuple[int, str]] = []
    for index, op in enumerate(plan):
        match op:
            case ("note", text):
                notes.append((index, text))
            case ("optional", _, group):
                builder.block(run)
                run = []
                # What a group makes does not count after it: the group may have stopped before.
                builder.block([step for member in group for step in _steps(builder, member, index, learn=False)])
            case _:
                run += _steps(builder, op, index, learn=True)
    builder.block(run)
    return builder.program(plan, notes)


def _steps(b: _Builder, op: rootfs.Step, index: int, learn: bool) -> list[Step]:
    match op:
        case ("mkdir", path, mode):
            steps: list[Step] = [(sc.mkdir_call(b.at(path), mode), (_PLAIN, index, (None, path), None))]
            if mode != 0o755:  # the umask may have taken bits away
                steps.append((sc.chmod_call(b.at(path), mode), (_PLAIN, index, (None, path), None)))
            if learn:
                b.dirs.add(path)
            return steps
        case ("mkdirs", path):
            steps = []
            current = ""
            for part in path.strip("/").split("/"):
                current += "/" + part
                if current not in b.dirs:
                    steps.append((sc.mkdir_call(b.at(current), 0o755), (_DIR, index, (None, current), path)))
                    if learn:
                        b.dirs.add(current)
            return steps
        case ("touch", path):
            return [(sc.create_call(b.at(path), 0o644), (_EXISTS_OK, index, (None, path), None))]
        case ("symlink", target, path):
            return [(sc.symlink_call(b.at(target), b.at(path)), (_EXISTS_OK, index, (None, target, path), None))]
        case ("mount", source, target, fstype, flags, data):
            b.covered(target)
            words = _mount_words(source, target, fstype, flags, data)
            return [(b.mount(source, target, fstype, flags, data), (_PLAIN, index, words, None))]
        case ("bind", source, target):
            b.covered(target)
            words = _mount_words(source, target, None, _BIND_REC, None)
            return [(b.mount(source, target, None, _BIND_REC, None), (_PLAIN, index, words, None))]
        case ("bind_ro", source, target):
            b.covered(target)
            return _bind_ro(b, source, target, index)
        case ("cow", lower, target, n, rootless):
            b.covered(target)
            upper, work = f"/.u{n}", f"/.w{n}"
            steps = []
            if upper not in b.dirs:
                steps.append((sc.mkdir_call(b.at(upper), 0o755), (_UPPER, index, (None, upper), None)))
            steps.append((sc.mkdir_call(b.at(work), 0o755), (_PLAIN, index, (None, work), None)))
            # nodev: a device node in a lower layer (or made by a test) must not open the host's device.
            data = rootfs._overlay_data(lower, n, rootless)
            without_xino = rootfs._overlay_data(lower, n, rootless, xino=False)
            retry = b.mount("overlay", target, "overlay", sc.MS_NODEV, without_xino)
            fallback = (retry, _bind_ro(b, lower, target, index))
            mount = b.mount("overlay", target, "overlay", sc.MS_NODEV, data)
            return [*steps, (mount, (_OVERLAY, index, (), fallback))]
    raise ValueError(f"not a step of a mount plan: {op!r}")


def _bind_ro(b: _Builder, source: str, target: str, index: int) -> list[Step]:
    """A recursive bind, then read-only in one call for the whole tree (``mount_setattr``, Linux >= 5.12)."""
    return [
        (
            b.mount(source, target, None, _BIND_REC, None),
            (_PLAIN, index, _mount_words(source, target, None, _BIND_REC, None), None),
        ),
        (sc.mount_setattr_rdonly_call(b.at(target)), (_READ_ONLY, index, (), target)),
    ]


_CACHE: dict[int, Program] = {}
_CACHE_SIZE: Final = 64


def compiled(plan: rootfs.Plan) -> Program:
    """``plan`` compiled, once per plan object: the session keeps one plan per configuration, and a zygote one
    per shape it was asked for, so in the process that forks containers this is a dictionary lookup."""
    program = _CACHE.get(id(plan))
    if program is None or program.plan is not plan:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.clear()
        program = _CACHE[id(plan)] = compile(plan)
    return program


# --- running, in the child --------------------------------------------------------------------------------


def run(program: Program) -> list[str]:
    """Make the program's calls in order; returns the notes (what the root cannot show).

    A call of an optional group that fails skips the rest of its group with a note (a host mount we cannot
    show is no reason to fail the test); any other failure raises :class:`~.rootfs.RootfsError` naming the
    plan's operation, or, in a fixed program, the ``OSError`` itself.
    """
    failed: list[tuple[int, str]] | None = None
    for functions, arguments, readings in program.blocks:
        for function, args in zip(functions, arguments, strict=True):
            try:
                if not function(*args):
                    continue
                problem = _problem(sc.last_errno(), readings[_position(arguments, args)], None)
            except OSError as exc:  # only from a call made in Python (an unknown architecture, no libc)
                problem = _problem(exc.errno or 0, readings[_position(arguments, args)], exc)
            if problem is None:
                continue
            if problem is not _SKIP:
                failed = _fail(program, readings[_position(arguments, args)][1], problem, failed)
            break
    if failed is None:
        return list(program.notes)
    return [text for _, text in sorted([*program.placed_notes, *failed])]


def _position(arguments: tuple[tuple[Any, ...], ...], args: tuple[Any, ...]) -> int:
    return next(i for i, candidate in enumerate(arguments) if candidate is args)


def _fail(
    program: Program, origin: int, problem: Exception, failed: list[tuple[int, str]] | None
) -> list[tuple[int, str]]:
    if origin < 0:
        raise problem
    op = program.plan[origin]
    if op[0] == "optional":
        return [*(failed or ()), (origin, f"{op[1]} is not available inside the container: {problem}")]
    raise RootfsError(f"building the container root failed at {op[0]} {op[1:]!r}: {problem}") from problem


def _problem(err: int, reading: Reading, raised: OSError | None) -> Exception | None:
    """What a failed call amounts to: None if it did what the plan asks after all, :data:`_SKIP`, or the error
    to report.  ``raised``: what a call made in Python raised, reported as it is."""
    how, _, words, extra = reading
    if raised is not None:
        return raised
    if how == _EXISTS_OK and err == errno.EEXIST:
        return None
    if how == _DIR and err == errno.EEXIST:
        return _check_dir(words[1], extra)
    if how == _UPPER and err == errno.EEXIST and os.path.isdir(words[1]):
        return None
    if how == _COVER and err == errno.ENOENT:
        return _SKIP
    if how == _OVERLAY:
        return _overlay_failed(err, extra)
    if how == _READ_ONLY:
        return _remount_read_only(extra)
    return _error(err, words)


def _error(err: int, words: tuple[Any, ...]) -> OSError:
    """The error the plan's interpreter raised for this call: an ``os`` function's, or a ``_syscalls`` one's."""
    name, *args = words
    if name is None:
        return OSError(err, os.strerror(err), args[0], None, args[1] if len(args) > 1 else None)
    return sc.error(err, name, *args)


def _check_dir(current: str, mount_point: str) -> Exception | None:
    """A directory on the way to a mount point exists: it must not lead out of the root."""
    try:
        mode = os.lstat(current).st_mode
    except OSError as exc:
        return exc
    if stat.S_ISLNK(mode):
        why = "is a symlink in the root"
    elif not stat.S_ISDIR(mode):
        why = "is not a directory"
    else:
        return None
    return RootfsError(f"cannot create mount point {mount_point[len(NEW) :]!r}: {current[len(NEW) :]!r} {why}")


def _overlay_failed(err: int, fallback: tuple[sc.Call, list[Step]]) -> Exception | None:
    """The overlay refused: without ``xino`` if the kernel does not know it (before 4.17: inode numbers then
    differ between stat and readdir), else the lower directory read-only instead."""
    (function, args), bind_ro = fallback
    if err == errno.EINVAL and not function(*args):
        return None
    for (function, args), reading in bind_ro:
        if function(*args):
            return _problem(sc.last_errno(), reading, None)
    return None


def _remount_read_only(target: str) -> Exception | None:
    """``mount_setattr`` failed (Linux < 5.12): a read-only remount, repeating the flags the kernel keeps
    locked.  If that fails too, the bind goes: never leave a writable window onto the host behind."""
    try:
        sc.mount(None, target, None, sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | sc.mount_flags_of(target))
    except OSError as exc:
        try:
            sc.umount2(target, sc.MNT_DETACH)
        except OSError as undo:
            return undo
        return exc
    return None


# --- the fixed programs -----------------------------------------------------------------------------------


def _fixed(*blocks: list[tuple[str, Any]]) -> Program:
    """A program of no plan (its errors are raised as they are): blocks of ``(kind, arguments)``."""
    b = _Builder()
    for block in blocks:
        steps: list[Step] = []
        for kind, args in block:
            how = _COVER if kind == "cover" else _PLAIN
            if kind in ("mount", "cover"):
                call, words = b.mount(*args), _mount_words(*args)
            elif kind == "mkdir":
                call, words = sc.mkdir_call(b.at(args[0]), args[1]), (None, args[0])
            elif kind == "chdir":
                call, words = sc.chdir_call(b.at(args[0])), (None, args[0])
            elif kind == "pivot_root":
                call, words = sc.pivot_root_call(b.at(args[0]), b.at(args[1])), ("pivot_root", *args)
            else:
                call, words = sc.umount2_call(b.at(args[0]), args[1]), ("umount2", *args)
            steps.append((call, (how, -1, words, None)))
        b.block(steps)
    return b.program((), [])


#: Make all mounts private, then pivot into a fresh tmpfs with the host at ``/oldroot``.
SCRATCH: Final = _fixed(
    [
        ("mount", (None, "/", None, sc.MS_REC | sc.MS_PRIVATE, None)),
        ("mount", ("tmpfs", "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755")),
        ("chdir", ("/tmp",)),
        ("mkdir", ("oldroot", 0o755)),
        ("pivot_root", (".", "oldroot")),
        ("chdir", ("/",)),
    ]
)

_PROC: Final = NEW + "/proc"


def _covers() -> list[list[tuple[str, Any]]]:
    """Read-only binds over the parts of a fresh ``/proc`` that reach the whole host (bubblewrap's and Docker's list).

    Made as host root before the user namespace, so the copy into it locks them: root inside cannot
    remount or unmount them.  The uid-0 map makes euid 0 global root, and ``/proc/sys`` checks only
    that, so nothing but these binds stops a sysctl write.  A fresh proc has no submounts, so its
    flags are known and no ``statvfs`` is needed.  Every name is tried, each in a block of its own: an
    entry this kernel lacks fails the bind with ENOENT and its block is skipped (as a check for it first
    would), and one that appears later (``/proc/scsi`` once its module loads) is covered too.
    """
    read_only = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | _NO_EXEC
    return [
        [("cover", (path, path, None, _BIND_REC, None)), ("mount", (None, path, None, read_only, None))]
        for path in (f"{_PROC}/{name}" for name in PROC_COVERS)
    ]


def _hidden_proc() -> list[tuple[str, Any]]:
    """A fully visible, read-only proc under a read-only tmpfs, so a nested PID namespace may mount one.

    The kernel allows a new proc in a user namespace only if a proc at least as restrictive is fully
    visible; ``/proc`` is not (its covers), this one is.  The tmpfs goes over its parent: a mount on the
    proc itself would make it "not fully visible" again.  The tmpfs holds an empty ``proc`` directory, so
    that every mount point ``/proc/self/mountinfo`` lists exists inside (psutil's ``disk_partitions``
    stats them all): the hidden proc's own mount point is listed too.
    """
    hidden = NEW + HIDDEN_PROC
    return [
        ("mount", ("proc", hidden + "/proc", "proc", sc.MS_RDONLY | _NO_EXEC, None)),
        ("mount", ("tmpfs", hidden, "tmpfs", _NO_EXEC, "size=4k,nr_inodes=2,mode=0755")),
        ("mkdir", (hidden + "/proc", 0o555)),
        ("mount", (None, hidden, None, sc.MS_REMOUNT | sc.MS_RDONLY | _NO_EXEC, None)),
    ]


#: A fresh /proc for PID 1's own PID namespace (only that namespace's PID 1 may mount it), then root mode
#: (``locked``: not privileged) covers what reaches the host and hides a read-only proc for nested
#: containers.  Before the switch: rootless, the kernel wants a visible /proc there.
_PROC_OPEN: Final = _fixed([("mount", ("proc", _PROC, "proc", _NO_EXEC, None))])
_PROC_LOCKED: Final = _fixed([("mount", ("proc", _PROC, "proc", _NO_EXEC, None))], *_covers(), _hidden_proc())


def proc_program(locked: bool) -> Program:
    return _PROC_LOCKED if locked else _PROC_OPEN


#: Pivot into ``/newroot`` and drop every trace of the host tree.
SWITCH: Final = _fixed(
    [("chdir", (NEW,)), ("pivot_root", (".", ".")), ("umount2", (".", sc.MNT_DETACH))],
)


# --- what PID 1 calls, in this order (each a patch point for the benchmarks' phase timers) ---------------


def enter_scratch() -> None:
    """Make all mounts private, then pivot into a fresh tmpfs with the host at ``/oldroot``."""
    run(SCRATCH)


def build(program: Program) -> list[str]:
    """Assemble ``/newroot`` in the scratch root; returns what it cannot show (see :func:`run`)."""
    return run(program)


def mount_proc(locked: bool) -> None:
    """``/newroot/proc``, and when ``locked`` its covers and the hidden proc (see :func:`proc_program`)."""
    run(_PROC_LOCKED if locked else _PROC_OPEN)


def switch_root(cwd: str) -> None:
    """Pivot into ``/newroot``, drop every trace of the host tree, and start where pytest was."""
    run(SWITCH)
    rootfs.enter_cwd(cwd)
