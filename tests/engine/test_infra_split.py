"""The engine's infrastructure modules, pure parts: mountinfo, limits, cgroup hierarchies, the mount plan, diagnosis.

No root, no namespaces: these are the functions every caller shares, tested with made-up input.
"""

from __future__ import annotations

import ast
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_lonely.sandbox import _syscalls as sc
from pytest_lonely.sandbox import cgroupfs, limits, mountinfo, probe, rootfs
from pytest_lonely.sandbox.cgroupfs import Hierarchy

SANDBOX = Path(__file__).resolve().parents[2] / "pytest_lonely" / "sandbox"

# --------------------------------------------------------------------------- mountinfo: one recipe

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro\n"
    "23 22 0:5 / /mnt/with\\040space rw master:2 - tmpfs tmp\\134fs rw,size=1k\n"
    "24 22 0:6 /sub /srv/bind rw - ext4 /dev/sda1 rw\n"
    "25 22 0:7 / /no/optional/fields rw - proc proc rw\n"
    "this line is not mountinfo\n"
    "26 22 0:8 / /short rw - ext4\n"
)


def test_mountinfo_parses_fields_and_unescapes_paths() -> None:
    entries = mountinfo.parse(MOUNTINFO)
    assert [e.mount_point for e in entries] == ["/", "/mnt/with space", "/srv/bind", "/no/optional/fields"]
    assert entries[0] == mountinfo.Entry("/", "/", "rw,relatime", "ext4", "/dev/sda1", "rw,errors=remount-ro")
    assert entries[1].source == "tmp\\fs"
    assert entries[2].root == "/sub"
    assert entries[3].fstype == "proc"


def test_mountinfo_unescape() -> None:
    assert mountinfo.unescape("/a\\040b\\011c\\012d\\134e") == "/a b\tc\nd\\e"
    assert mountinfo.unescape("/plain") == "/plain"


def test_mountinfo_reads_this_process_and_odd_bytes(tmp_path: Path) -> None:
    assert any(e.mount_point == "/" for e in mountinfo.read())
    odd = tmp_path / "mountinfo"
    odd.write_bytes(b"30 1 0:9 / /caf\xe9 rw - tmpfs tmpfs rw\n")  # not UTF-8: kept, not fatal
    (entry,) = mountinfo.read(str(odd))
    assert entry.mount_point.encode("utf-8", "surrogateescape") == b"/caf\xe9"


def test_the_rootfs_mount_list_comes_from_mountinfo(tmp_path: Path) -> None:
    path = tmp_path / "mountinfo"
    path.write_text(MOUNTINFO + "27 22 0:9 / /srv/bind rw - xfs /dev/sdb rw\n")
    mounts = rootfs.read_mounts(str(path))
    assert [(m.mountpoint, m.fstype) for m in mounts] == [
        ("/", "ext4"),
        ("/mnt/with space", "tmpfs"),
        ("/no/optional/fields", "proc"),
        ("/srv/bind", "xfs"),  # the last mount on a mount point is the one visible
    ]


def _defined_functions(path: Path) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}


def test_mountinfo_unescaping_is_written_once() -> None:
    """One recipe, imported: no other engine module unescapes mountinfo on its own."""
    for path in SANDBOX.glob("*.py"):
        if path.name == "mountinfo.py":
            continue
        assert not {"_unescape", "unescape"} & _defined_functions(path), path.name
        assert "\\\\([0-7]{3})" not in path.read_text(), path.name


# --------------------------------------------------------------------------- limits: no I/O, no cgroups


def test_limits_module_is_pure() -> None:
    """Settings parse markers with it before any cgroup is looked at: it imports nothing of the engine."""
    tree = ast.parse((SANDBOX / "limits.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
        n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    assert imported <= {"__future__", "dataclasses", "math", "re", "typing"}


def test_limits_values() -> None:
    assert limits.parse_memory("1.5G") == 3 << 29
    assert limits.format_bytes(256 << 20) == "256 MiB"
    assert limits.Limits(pids=4).controllers() == {"pids"}
    assert not limits.Limits()
    assert limits.Usage().memory_peak is None


# --------------------------------------------------------------------------- cgroup hierarchies: choosing

V1_MEMORY = Hierarchy(1, frozenset({"memory"}), "/sys/fs/cgroup/memory", "/sys/fs/cgroup/memory/ci")
V1_CPU = Hierarchy(1, frozenset({"cpu", "cpuacct"}), "/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu,cpuacct/ci")
V2_EMPTY = Hierarchy(2, frozenset(), "/sys/fs/cgroup/unified", "/nonexistent/unified/ci")
V2_MEMORY = Hierarchy(2, frozenset({"memory", "pids"}), "/sys/fs/cgroup", "/nonexistent/ci")


def test_serving_prefers_v2() -> None:
    assert cgroupfs.serving([V1_MEMORY, V2_MEMORY], "memory") is V2_MEMORY
    assert cgroupfs.serving([V1_MEMORY, V2_EMPTY], "memory") is V1_MEMORY
    assert cgroupfs.serving([V1_MEMORY], "pids") is None


def test_needed_joins_v2_only_when_writable() -> None:
    hierarchies = [V1_MEMORY, V1_CPU, V2_EMPTY]
    assert cgroupfs.needed(hierarchies, limits.Limits(memory=1 << 20), usage=False) == [V1_MEMORY]
    assert cgroupfs.needed(hierarchies, limits.Limits(), usage=True) == [V1_CPU, V1_MEMORY]
    assert cgroupfs.needed(hierarchies, limits.Limits(), usage=False) == []


def test_describe_names_what_there_is() -> None:
    assert cgroupfs.describe([]) == "no cgroup hierarchy is mounted"
    assert cgroupfs.describe([V1_CPU, V2_EMPTY]) == (
        "cgroup v1 controllers cpu, cpuacct; cgroup v2 at /sys/fs/cgroup/unified offering none"
    )


def test_discover_skips_mounts_that_are_not_cgroups() -> None:
    found, notes = cgroupfs.discover_hierarchies(MOUNTINFO, "0::/\n")
    assert (found, notes) == ([], [])


# --------------------------------------------------------------------------- the mount plan

LAYOUT = rootfs.HostLayout(
    mounts=(rootfs.Mount("/", "ext4"), rootfs.Mount("/boot", "ext4"), rootfs.Mount("/proc", "proc")),
    top=(("bin", "symlink", "usr/bin"), ("boot", "dir", ""), ("etc", "dir", ""), ("usr", "dir", "")),
    needed=(),
    dev_nodes=("null",),
)
DEV = (
    ("mkdirs", "/newroot/dev"),
    ("mount", "tmpfs", "/newroot/dev", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV | sc.MS_NOEXEC, "mode=0755"),
)
TMP = (
    ("mkdirs", "/newroot/tmp"),
    ("mount", "tmpfs", "/newroot/tmp", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=1777"),
)


def test_the_host_view_plan() -> None:
    ops = rootfs.plan(LAYOUT, rootfs.PlanKey(None, rootless=False, network=True))
    assert ops[:5] == (
        ("mkdir", "/newroot", 0o755),
        ("cow", "/oldroot", "/newroot", 0, False),
        ("optional", "/boot", (("cow", "/oldroot/boot", "/newroot/boot", 1, False),)),  # /proc: a fresh one
        ("mkdirs", "/newroot/proc"),
        ("mkdirs", "/newroot/sys"),
    )
    assert ops[5] == ("bind_ro", "/oldroot/sys", "/newroot/sys")
    assert ops[6:8] == DEV
    assert ops[-2:] == TMP


def test_the_rootless_host_view_plan() -> None:
    ops = rootfs.plan(LAYOUT, rootfs.PlanKey(None, rootless=True, network=True))
    assert ops[:7] == (
        ("mkdir", "/newroot", 0o755),
        ("mount", "tmpfs", "/newroot", "tmpfs", sc.MS_NOSUID | sc.MS_NODEV, "mode=0755"),
        ("symlink", "usr/bin", "/newroot/bin"),
        ("mkdir", "/newroot/boot", 0o755),
        ("optional", "/boot", (("cow", "/oldroot/boot", "/newroot/boot", 0, True),)),
        ("mkdir", "/newroot/etc", 0o755),
        ("optional", "/etc", (("cow", "/oldroot/etc", "/newroot/etc", 1, True),)),
    )
    assert rootfs.HIDDEN_PROC not in str(ops)  # rootless: /proc itself is fully visible


@pytest.fixture
def project_outside_tmp() -> Iterator[str]:
    """A project directory outside /tmp, wherever this checkout is: one under /tmp is shown after the fresh /tmp."""
    path = tempfile.mkdtemp(prefix="lonely-project-", dir="/var/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_an_own_root_makes_mount_points_first_and_notes_what_cannot_be_shown(
    tmp_path: Path, project_outside_tmp: str
) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "srv").write_text("a file where a directory should be")
    project = project_outside_tmp
    layout = rootfs.HostLayout(
        mounts=(),
        top=(("bin", "symlink", "usr/bin"), ("usr", "dir", "")),
        needed=((str(project), True),),
        dev_nodes=(),
    )
    ops = rootfs.plan(layout, rootfs.PlanKey(str(root), rootless=True, network=True, writable=("/srv/base",)))
    assert ops[:8] == (
        ("mkdir", "/newroot", 0o755),
        ("mkdirs", "/.u0/usr"),  # mount points, in the root's upper layer
        ("mkdirs", f"/.u0{project}"),
        ("cow", f"/oldroot{root}", "/newroot", 0, True),  # then the mounts
        ("symlink", "usr/bin", "/newroot/bin"),
        ("optional", "/usr", (("bind_ro", "/oldroot/usr", "/newroot/usr"),)),
        (
            "optional",
            str(project),
            (("mkdirs", f"/newroot{project}"), ("cow", f"/oldroot{project}", f"/newroot{project}", 1, True)),
        ),
        ("note", f"/srv/base is not available inside the container: {root}/srv is not a directory"),
    )


def test_every_cow_layer_has_its_own_number(tmp_path: Path) -> None:
    layout = rootfs.HostLayout.scan(tmp_path)
    for key in (rootfs.PlanKey(None, False, True), rootfs.PlanKey(None, True, True)):
        numbers = [op[3] for op in _steps(rootfs.plan(layout, key)) if op[0] == "cow"]
        assert len(numbers) == len(set(numbers)) > 0


def _steps(ops: rootfs.Plan) -> list[rootfs.Op]:
    out: list[rootfs.Op] = []
    for op in ops:
        out.extend(op[2] if op[0] == "optional" else (op,))
    return out


# --------------------------------------------------------------------------- diagnosis: a table


def test_every_step_of_the_rehearsal_has_a_diagnosis() -> None:
    assert set(probe._BY_STEP) == set(probe.STEPS)


def test_an_unknown_step_still_gets_a_sentence() -> None:
    message = probe.diagnose("bogus", errno.EPERM, rootless=False, sysctls={}, in_container=False)
    assert message == f"bogus failed with EPERM ({os.strerror(errno.EPERM)})."


@pytest.mark.parametrize("step", [s for s in probe.STEPS if s != "platform"])
def test_each_diagnosis_names_the_step(step: str) -> None:
    message = probe.diagnose(step, errno.EPERM, rootless=True, sysctls={}, in_container=False)
    assert f"{step} failed with EPERM" in message
