"""mountplan: a plan compiled into calls in the parent, and the calls made in the child.

The compiled form is read back call by call (the function, its arguments with the paths read from the
addresses the program passes), for small plans and for the fixed programs.  The runs are real: a forked
child with a private mount namespace enters the scratch root and makes the calls, so no mount outlives
it; they check the messages a failing step gives (the same the plan's interpreter gave before it was
compiled), the notes of optional groups, and the fallbacks.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import pickle
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_lonely.sandbox import _syscalls as sc
from pytest_lonely.sandbox import mountplan, rootfs
from pytest_lonely.sandbox.rootfs import NEW, OLD, PROC_COVERS, Plan
from pytest_lonely.sandbox.spec import ContainerSpec

needs_root = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="needs Linux and root (mount namespaces)"
)

#: Each raw function and its name: the first element of any call made with it (ctypes functions are unhashable).
FUNCTIONS = [
    (sc.mount_call(0, 0, 0, 0, 0)[0], "mount"),
    (sc.umount2_call(0, 0)[0], "umount2"),
    (sc.pivot_root_call(0, 0)[0], "pivot_root"),
    (sc.mount_setattr_rdonly_call(0)[0], "mount_setattr_rdonly"),
    (sc.mkdir_call(0, 0)[0], "mkdir"),
    (sc.chmod_call(0, 0)[0], "chmod"),
    (sc.chdir_call(0)[0], "chdir"),
    (sc.symlink_call(0, 0)[0], "symlink"),
    (sc.create_call(0, 0)[0], "create"),
]
#: Which arguments of each are paths (addresses); the others are numbers (or None).
PATHS = {
    "mount": (0, 1, 2, 4),
    "umount2": (0,),
    "pivot_root": (1, 2),
    "mount_setattr_rdonly": (2,),
    "mkdir": (0,),
    "chmod": (0,),
    "chdir": (0,),
    "symlink": (0, 1),
    "create": (0,),
}
BIND_REC = sc.MS_BIND | sc.MS_REC
OVERLAY_DATA = "lowerdir={},upperdir=/.u{},workdir=/.w{},xino=on"


def calls(program: mountplan.Program) -> list[list[tuple[Any, ...]]]:
    """The program, block by block, as ``(name, *arguments)`` with paths as text."""
    blocks = []
    for functions, arguments, _ in program.blocks:
        block = []
        for function, args in zip(functions, arguments, strict=True):
            name = next(name for candidate, name in FUNCTIONS if candidate is function)
            shown = [
                ctypes.string_at(arg).decode() if i in PATHS[name] and arg is not None else arg
                for i, arg in enumerate(args)
            ]
            if name == "pivot_root":
                shown = shown[1:]  # the syscall number
            elif name == "mount_setattr_rdonly":
                shown = [shown[2]]  # dfd, flags and the attribute are always the same
            block.append((name, *shown))
        blocks.append(block)
    return blocks


# --- compiling ---------------------------------------------------------------------------------------------


def test_a_small_plan_becomes_one_call_per_step() -> None:
    plan: Plan = (
        ("mkdir", NEW, 0o755),
        ("mkdirs", NEW + "/a/b"),  # /newroot was just made: only what is below it is checked
        ("mount", "tmpfs", NEW + "/a", "tmpfs", sc.MS_NOSUID, "mode=0755"),
        ("mkdirs", NEW + "/a/b/c"),  # /newroot/a/b was hidden by that mount: checked again
        ("touch", NEW + "/f"),
        ("symlink", "pts/ptmx", NEW + "/ptmx"),
        ("bind", OLD + "/srv", NEW + "/srv"),
        ("mkdir", NEW + "/shm", 0o1777),  # the umask may take bits away: chmod after
    )
    assert calls(mountplan.compile(plan)) == [
        [
            ("mkdir", NEW, 0o755),
            ("mkdir", NEW + "/a", 0o755),
            ("mkdir", NEW + "/a/b", 0o755),
            ("mount", "tmpfs", NEW + "/a", "tmpfs", sc.MS_NOSUID, "mode=0755"),
            ("mkdir", NEW + "/a/b", 0o755),
            ("mkdir", NEW + "/a/b/c", 0o755),
            ("create", NEW + "/f", stat.S_IFREG | 0o644, 0),
            ("symlink", "pts/ptmx", NEW + "/ptmx"),
            ("mount", OLD + "/srv", NEW + "/srv", None, BIND_REC, None),
            ("mkdir", NEW + "/shm", 0o1777),
            ("chmod", NEW + "/shm", 0o1777),
        ]
    ]


def test_optional_groups_stay_blocks_and_what_they_make_is_checked_again() -> None:
    plan: Plan = (
        ("mkdir", NEW, 0o755),
        ("optional", "/x", (("mkdirs", NEW + "/x/y"), ("bind_ro", OLD + "/x", NEW + "/x/y"))),
        ("note", "a note of the plan's own"),
        ("mkdirs", NEW + "/x/z"),  # the group may have stopped before making /newroot/x
        ("optional", "/empty", ()),
    )
    program = mountplan.compile(plan)
    assert calls(program) == [
        [("mkdir", NEW, 0o755)],
        [
            ("mkdir", NEW + "/x", 0o755),
            ("mkdir", NEW + "/x/y", 0o755),
            ("mount", OLD + "/x", NEW + "/x/y", None, BIND_REC, None),
            ("mount_setattr_rdonly", NEW + "/x/y"),
        ],
        [("mkdir", NEW + "/x", 0o755), ("mkdir", NEW + "/x/z", 0o755)],
    ]
    assert program.notes == ("a note of the plan's own",)
    assert program.placed_notes == ((2, "a note of the plan's own"),)
    # Every call knows the operation it stands for, for its error message.
    assert [reading[1] for _, _, readings in program.blocks for reading in readings] == [0, 1, 1, 1, 1, 3, 3]


def test_a_cow_layer_makes_its_upper_directory_unless_the_plan_did() -> None:
    plan: Plan = (
        ("mkdir", NEW, 0o755),
        ("mkdirs", "/.u0/usr"),  # a mount point in the upper layer, before the overlay
        ("cow", OLD + "/root", NEW, 0, False),
        ("cow", OLD + "/usr", NEW + "/usr", 1, True),
    )
    (block,) = calls(mountplan.compile(plan))
    assert block == [
        ("mkdir", NEW, 0o755),
        ("mkdir", "/.u0", 0o755),
        ("mkdir", "/.u0/usr", 0o755),
        ("mkdir", "/.w0", 0o755),
        ("mount", "overlay", NEW, "overlay", sc.MS_NODEV, OVERLAY_DATA.format(OLD + "/root", 0, 0)),
        ("mkdir", "/.u1", 0o755),
        ("mkdir", "/.w1", 0o755),
        (
            "mount",
            "overlay",
            NEW + "/usr",
            "overlay",
            sc.MS_NODEV,
            OVERLAY_DATA.format(OLD + "/usr", 1, 1) + ",userxattr",
        ),
    ]


def test_a_plan_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError, match="not a step of a mount plan: \\('chown', '/x'\\)"):
        mountplan.compile((("chown", "/x"),))  # type: ignore[arg-type]


def test_the_fixed_programs() -> None:
    assert calls(mountplan.SCRATCH) == [
        [
            ("mount", None, "/", None, sc.MS_REC | sc.MS_PRIVATE, None),
            ("mount", "tmpfs", "/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755"),
            ("chdir", "/tmp"),
            ("mkdir", "oldroot", 0o755),
            ("pivot_root", ".", "oldroot"),
            ("chdir", "/"),
        ]
    ]
    no_exec = sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC
    proc = ("mount", "proc", NEW + "/proc", "proc", no_exec, None)
    assert calls(mountplan.proc_program(locked=False)) == [[proc]]
    locked = calls(mountplan.proc_program(locked=True))
    read_only = sc.MS_BIND | sc.MS_REMOUNT | sc.MS_RDONLY | no_exec
    hidden = NEW + rootfs.HIDDEN_PROC
    assert locked == [
        [proc],
        # Every cover the kernel might have, each a block of its own: one it lacks is skipped (ENOENT).
        *[
            [
                ("mount", f"{NEW}/proc/{name}", f"{NEW}/proc/{name}", None, BIND_REC, None),
                ("mount", None, f"{NEW}/proc/{name}", None, read_only, None),
            ]
            for name in PROC_COVERS
        ],
        [
            ("mount", "proc", hidden + "/proc", "proc", sc.MS_RDONLY | no_exec, None),
            ("mount", "tmpfs", hidden, "tmpfs", no_exec, "size=4k,nr_inodes=2,mode=0755"),
            ("mkdir", hidden + "/proc", 0o555),
            ("mount", None, hidden, None, sc.MS_REMOUNT | sc.MS_RDONLY | no_exec, None),
        ],
    ]
    assert calls(mountplan.SWITCH) == [[("chdir", NEW), ("pivot_root", ".", "."), ("umount2", ".", sc.MNT_DETACH)]]


def test_a_plan_is_compiled_once_and_the_spec_carries_it(tmp_path: Path) -> None:
    layout = rootfs.HostLayout.scan(tmp_path)
    key = rootfs.PlanKey(None, False, True)
    plan = rootfs.plan(layout, key)
    assert mountplan.compiled(plan) is mountplan.compiled(plan)
    assert mountplan.compiled(plan).plan is plan
    spec = ContainerSpec(
        id="c", hostname="h", rootless=False, network=True, plan_key=key, plan=plan, timeout=0, cwd="/"
    )
    assert spec.program is mountplan.compiled(plan)
    assert spec.with_tail(("d", "h2", 1.0, ())).program is spec.program  # in the child: nothing compiled
    other = tuple(plan)[:-1]
    changed = dataclasses.replace(spec, plan=other)
    assert changed.program.plan is other
    assert (
        ContainerSpec(
            id="c", hostname="h", rootless=False, network=True, plan_key=key, plan=(), timeout=0, cwd="/"
        ).program.blocks
        == ()
    )


def test_a_path_is_passed_by_address() -> None:
    data = os.fsencode("/newroot/caf\udce9")  # not UTF-8: the bytes as they are
    assert ctypes.string_at(sc.address(data)) == data


def test_a_file_is_made_by_os_where_libc_has_no_mknod(tmp_path: Path) -> None:
    """glibc before 2.33 exports no mknod; the fallback keeps libc's protocol (0, or -1 and errno)."""
    path = os.fsencode(tmp_path / "f")
    assert sc._mknod_by_os(sc.address(path), stat.S_IFREG | 0o644, 0) == 0
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert sc._mknod_by_os(sc.address(path), stat.S_IFREG | 0o644, 0) == -1
    assert sc.last_errno() == errno.EEXIST


# --- running -----------------------------------------------------------------------------------------------


def in_scratch(build: Callable[[], Any]) -> dict[str, Any]:
    """``build()`` in a forked child, in a private mount namespace, in the scratch root: what it returned or
    raised (and what that was raised from)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        result: dict[str, Any] = {}
        try:
            os.close(read)
            sc.unshare(sc.CLONE_NEWNS)
            mountplan.run(mountplan.SCRATCH)
            result["value"] = build()
        except BaseException as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            cause = exc.__cause__
            result["cause"] = None if cause is None else f"{type(cause).__name__}: {cause}"
        finally:
            os.write(write, pickle.dumps(result))
            os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 1 << 16):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    result = pickle.loads(data)
    assert isinstance(result, dict)
    return result


def run(plan: Plan, then: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    def build() -> Any:
        notes = mountplan.run(mountplan.compile(plan))
        return notes, then()

    return in_scratch(build)


@pytest.fixture
def lower(tmp_path: Path) -> Path:
    """A host directory to build from; the scratch root sees it below /oldroot."""
    root = tmp_path / "lower"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("hello\n")
    (root / "file").write_text("not a directory\n")
    (root / "link").symlink_to("/etc")
    return root


@needs_root
def test_a_failing_step_names_the_operation_and_the_path(lower: Path) -> None:
    """The last operation of each plan fails: the error names it, then why, as the plan's interpreter did."""
    base: Plan = (("mkdir", NEW, 0o755), ("cow", OLD + str(lower), NEW, 0, False))
    no_such = "No such file or directory"
    cases: list[tuple[Plan, str, str]] = [
        (
            (*base, ("mkdirs", NEW + "/link/x")),
            "RootfsError",
            "cannot create mount point '/link/x': '/link' is a symlink in the root",
        ),
        (
            (*base, ("mkdirs", NEW + "/file/x")),
            "RootfsError",
            "cannot create mount point '/file/x': '/file' is not a directory",
        ),
        (
            (*base, ("bind", OLD + "/nonexistent", NEW + "/etc")),
            "FileNotFoundError",
            f"[Errno 2] mount('/oldroot/nonexistent', '/newroot/etc', None, '0x5000', None): {no_such}",
        ),
        ((*base, ("mkdir", NEW + "/etc", 0o755)), "FileExistsError", "[Errno 17] File exists: '/newroot/etc'"),
        ((*base, ("touch", NEW + "/a/b")), "FileNotFoundError", f"[Errno 2] {no_such}: '/newroot/a/b'"),
        (
            (*base, ("symlink", "pts/ptmx", NEW + "/a/b")),
            "FileNotFoundError",
            f"[Errno 2] {no_such}: 'pts/ptmx' -> '/newroot/a/b'",
        ),
        (
            (*base, ("mount", "x", NEW + "/etc", "nosuchfs", 6, "a=b")),
            "OSError",
            "[Errno 19] mount('x', '/newroot/etc', 'nosuchfs', '0x6', 'a=b'): No such device",
        ),
        (  # no overlay, and no read-only bind instead either
            (("mkdir", NEW, 0o755), ("cow", OLD + "/nonexistent", NEW, 0, False)),
            "FileNotFoundError",
            f"[Errno 2] mount('/oldroot/nonexistent', '/newroot', None, '0x5000', None): {no_such}",
        ),
    ]
    for plan, kind, why in cases:
        op = plan[-1]
        message = f"building the container root failed at {op[0]} {op[1:]!r}: {why}"
        assert run(plan) == {"error": f"RootfsError: {message}", "cause": f"{kind}: {why}"}


@needs_root
def test_an_optional_group_that_fails_is_a_note_in_its_place(lower: Path) -> None:
    plan: Plan = (
        ("mkdir", NEW, 0o755),
        ("cow", OLD + str(lower), NEW, 0, False),
        ("note", "first"),
        (
            "optional",
            "/gone",
            (
                ("mkdirs", NEW + "/gone"),
                ("bind_ro", OLD + "/nonexistent", NEW + "/gone"),
                ("touch", NEW + "/gone/after"),
            ),
        ),
        ("optional", "/link/x", (("mkdirs", NEW + "/link/x"),)),
        ("note", "last"),
        ("touch", NEW + "/made"),  # the build goes on
    )
    result = run(plan, lambda: (os.listdir(NEW + "/gone"), os.path.exists(NEW + "/made")))
    assert "error" not in result, result
    notes, seen = result["value"]
    assert notes == [
        "first",
        "/gone is not available inside the container: [Errno 2] mount('/oldroot/nonexistent', '/newroot/gone', "
        "None, '0x5000', None): No such file or directory",
        "/link/x is not available inside the container: cannot create mount point '/link/x': '/link' is a symlink "
        "in the root",
        "last",
    ]
    assert seen == ([], True)  # nothing after the failed step of its group; the build went on


@needs_root
def test_what_exists_already_is_fine(lower: Path) -> None:
    """touch and symlink only make what is missing; mkdirs accepts real directories on the way."""
    plan: Plan = (
        ("mkdir", NEW, 0o755),
        ("cow", OLD + str(lower), NEW, 0, False),
        ("touch", NEW + "/file"),
        ("touch", NEW + "/etc"),
        ("symlink", "elsewhere", NEW + "/link"),
        ("mkdirs", NEW + "/etc/new/dir"),
    )
    result = run(plan, lambda: (os.readlink(NEW + "/link"), os.path.isdir(NEW + "/etc/new/dir")))
    assert result == {"value": ([], ("/etc", True))}


@needs_root
def test_a_layer_the_kernel_refuses_is_bound_read_only(lower: Path) -> None:
    """Overlayfs stacks two deep: a third layer fails (EINVAL, again without xino) and becomes a read-only bind."""
    plan: Plan = (
        ("mkdir", NEW, 0o755),
        ("mkdirs", "/one"),
        ("mkdirs", "/two"),
        ("cow", OLD + str(lower), "/one", 0, False),
        ("cow", "/one", "/two", 1, False),
        ("cow", "/two", NEW, 2, False),
    )

    def probe() -> Any:
        try:
            os.mkdir(NEW + "/new")
        except OSError as exc:
            written = errno.errorcode[exc.errno or 0]
        else:
            written = "written"
        with open(NEW + "/etc/motd") as f:
            return f.read(), written

    assert run(plan, probe) == {"value": ([], ("hello\n", "EROFS"))}


@needs_root
def test_a_fixed_program_raises_the_error_itself() -> None:
    result = in_scratch(lambda: mountplan.run(mountplan.SWITCH))  # no /newroot in a bare scratch root
    assert result == {"error": "FileNotFoundError: [Errno 2] No such file or directory: '/newroot'", "cause": None}


@needs_root
def test_proc_covers_the_kernel_lacks_are_skipped() -> None:
    def build() -> Any:
        os.mkdir(NEW)
        sc.mount("tmpfs", NEW, "tmpfs")
        os.mkdir(NEW + "/proc")
        os.makedirs(NEW + rootfs.HIDDEN_PROC + "/proc")
        sc.unshare(sc.CLONE_NEWPID)  # a proc of our own needs a PID namespace we are PID 1 of (the next child)
        pid = os.fork()
        if pid == 0:
            status = 1
            try:
                mountplan.run(mountplan.proc_program(locked=True))
                with open(NEW + "/proc/self/mountinfo") as f:  # the scratch root has no /proc
                    covers = [line.split() for line in f if line.split()[4].startswith(NEW + "/proc/")]
                covered = {fields[4].rsplit("/", 1)[1] for fields in covers}
                present = {name for name in PROC_COVERS if os.path.lexists(f"{NEW}/proc/{name}")}
                read_only = all("ro" in fields[5].split(",") for fields in covers)
                status = 0 if covered == present and read_only and "sys" in covered else 2
            finally:
                os._exit(status)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert in_scratch(build) == {"value": 0}
