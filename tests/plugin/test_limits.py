"""cgroup limits per container, end to end: real inner pytest sessions on this machine's real cgroups.

Each outer test runs one inner session (several checks batched into it) in a
subprocess.  The inner tests report what they saw through junitxml
properties (``record_property``), which the outer test reads back; the outer
test also looks at the host's ``/sys/fs/cgroup`` itself, before and after, so
that nothing named ``lonely-*`` survives a session.

The rootless case runs pytest as uid 65534 in a venv that user can read (see
rootless_env.py): no cgroup is delegated to it, so a limit must be refused
with a sentence naming the cause and the fix.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.inner import RunLonely, parse_junit
from helpers.rootless_env import CLEAN_ENV, NOBODY, Env

MiB = 2**20
CGROUP_ROOT = Path("/sys/fs/cgroup")
JUNIT = ("--junitxml=report.xml", "-o", "junit_family=xunit1", "-rA")  # xunit1 keeps record_property
SESSION_DIR = re.compile(r"lonely-(\d+)(?:\.leaf)?\Z")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="cgroups are Linux")
root = pytest.mark.skipif(os.geteuid() != 0, reason="root mode: creating cgroups needs root here")


# --------------------------------------------------------------------------- plumbing


def enabled_controllers() -> set[str]:
    """Controllers the kernel has and enables (v1 and v2 alike list them in /proc/cgroups)."""
    try:
        with open("/proc/cgroups") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return set()
    return {parts[0] for parts in (line.split() for line in lines) if len(parts) == 4 and parts[3] == "1"}


def needs(*controllers: str) -> pytest.MarkDecorator:
    missing = sorted(set(controllers) - enabled_controllers())
    return pytest.mark.skipif(bool(missing), reason=f"this kernel has no {', '.join(missing)} cgroup controller")


def lonely_dirs() -> set[str]:
    """Every ``lonely-*`` directory anywhere under /sys/fs/cgroup (any hierarchy, any depth)."""
    found: set[str] = set()
    for dirpath, dirnames, _ in os.walk(CGROUP_ROOT, onerror=lambda _: None):
        for name in dirnames:
            if name.startswith("lonely-"):
                found.add(os.path.join(dirpath, name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture(autouse=True)
def no_cgroups_left() -> Iterator[None]:
    """Every test here leaves no ``lonely-*`` cgroup of a dead session (other helpers' live sessions may run)."""
    before = lonely_dirs()
    yield
    left = {
        path
        for path in lonely_dirs() - before
        if (m := SESSION_DIR.match(os.path.basename(path))) is None or not alive(int(m.group(1)))
    }
    assert not left, f"cgroups left behind: {sorted(left)}"


def own_cgroups(text: str) -> dict[str, str]:
    """``/proc/PID/cgroup`` -> ``{"memory": "/a/b", "cpu,cpuacct": "/", "": "/" (v2)}``."""
    out = {}
    for line in text.splitlines():
        _, names, path = line.split(":", 2)
        out[names] = path
    return out


# The inner pytest process's pid, recorded by every inner test through a fixture run in the PARENT.
PID_CONFTEST = """
import os

import pytest

SESSION_PID = os.getpid()


@pytest.fixture(autouse=True, scope="session")
def _session_pid():
    return SESSION_PID


@pytest.fixture(autouse=True)
def _record_session_pid(record_property, _session_pid):
    record_property("session_pid", str(_session_pid))
"""

# Inside a container: where am I in every hierarchy, and the directory of my cgroup in one of them.
CGROUP_HELPERS = """
import os

MiB = 2**20


def my_cgroups():
    out = {}
    with open("/proc/self/cgroup") as f:
        for line in f.read().splitlines():
            _, names, path = line.split(":", 2)
            out[names] = path
    return out


_mounted = {}


def hierarchy(controller):
    # Where the v1 hierarchy of the controller is visible in here: the container's /sys has no cgroup
    # mounts, so mount it ourselves (private mount namespace: gone with the container); None if refused.
    if controller not in _mounted:
        import ctypes
        import tempfile

        path = "/sys/fs/cgroup/" + controller
        if not os.path.isdir(path + "/"):
            path = tempfile.mkdtemp(prefix="cg-")
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.mount(b"cgroup", path.encode(), b"cgroup", 0, controller.encode()) != 0:
                path = None
        _mounted[controller] = path
    return _mounted[controller]


def cgroup_dir(controller):
    top = hierarchy(controller)
    return None if top is None else top + my_cgroups()[controller]


def read_cgroup(controller, name):
    where = cgroup_dir(controller)
    if where is None:
        return "unreadable"
    with open(where + "/" + name) as f:
        return f.read().strip()
"""


# --------------------------------------------------------------------------- enforcement


ENFORCE_TESTS = (
    CGROUP_HELPERS
    + '''
import errno
import json
import subprocess
import time

import pytest


@pytest.mark.isolated(memory="64M")
def test_oom():
    print("before-" + "oom-" + str(6 * 7), flush=True)
    hoard = []
    for _ in range(1024):  # 4 GiB: far beyond the limit; each chunk is written, so it is charged
        hoard.append(b"x" * (4 * MiB))
    pytest.fail("allocated 4 GiB under a 64 MiB limit")


@pytest.mark.isolated
def test_after_oom():
    assert sum(len(b"y" * MiB) for _ in range(10)) == 10 * MiB


def fork_until_refused(n):
    """Fork up to n children that wait on a pipe; return (how many forked, the error that stopped us)."""
    r, w = os.pipe()
    kids, error = [], None
    try:
        for _ in range(n):
            try:
                pid = os.fork()
            except OSError as exc:
                error = exc
                break
            if pid == 0:
                os.close(w)
                os.read(r, 1)
                os._exit(0)
            kids.append(pid)
    finally:
        os.close(w)
        os.close(r)
        for pid in kids:
            os.waitpid(pid, 0)
    return len(kids), error


@pytest.mark.isolated(pids=16)
def test_pids_refused(record_property):
    forked, error = fork_until_refused(64)
    record_property("forked", str(forked))
    assert isinstance(error, BlockingIOError), error
    assert error.errno == errno.EAGAIN
    assert 0 < forked < 16


@pytest.mark.isolated(pids=16)
def test_pids_own_count(record_property):
    forked, error = fork_until_refused(10)
    record_property("forked", str(forked))
    assert error is None and forked == 10


@pytest.mark.isolated(cpus=0.25)
def test_cpus(record_property):
    start, wall = os.times(), time.monotonic()
    while time.monotonic() - wall < 2.0:
        pass
    end = os.times()
    used = (end.user - start.user) + (end.system - start.system)
    record_property("cpu_seconds", f"{used:.3f}")
    record_property("wall_seconds", f"{time.monotonic() - wall:.3f}")
    assert used <= 0.6, used


@pytest.mark.isolated(memory="64M", pids=64, cpus=1)
def test_place(container, record_property):
    record_property("cgroups", json.dumps(my_cgroups()))
    record_property("container_id", container.id)
    assert container.limits.memory == 64 * MiB
    assert container.limits.pids == 64
    assert container.limits.cpus == 1.0
    record_property("kernel", json.dumps([
        read_cgroup("memory", "memory.limit_in_bytes"),
        read_cgroup("pids", "pids.max"),
        read_cgroup("cpu", "cpu.cfs_quota_us"),
        read_cgroup("cpu", "cpu.cfs_period_us"),
    ]))
'''
)


@root
@needs("memory", "pids", "cpu")
def test_limits_are_enforced_in_one_cgroup_below_pytests_own(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    pytester.makeconftest(PID_CONFTEST)
    pytester.makepyfile(test_enforce=ENFORCE_TESTS)
    result = run_lonely(*JUNIT)
    out = result.stdout.str()
    cases = parse_junit(pytester.path / "report.xml")
    assert set(cases) == {
        "test_oom",
        "test_after_oom",
        "test_pids_refused",
        "test_pids_own_count",
        "test_cpus",
        "test_place",
    }, out

    # OOM: named, the output printed before the kill kept, the session goes on.
    oom = cases["test_oom"]
    assert oom.outcome == "failed", out
    assert "container killed by the kernel's OOM killer: memory limit 64 MiB reached" in oom.message, oom.message
    assert re.search(r"Captured stdout call -+\nbefore-oom-42\n", out), out
    assert cases["test_after_oom"].outcome == "passed", cases["test_after_oom"]

    # pids: the 16th task is refused inside; the next container counts from zero.
    assert cases["test_pids_refused"].outcome == "passed", cases["test_pids_refused"]
    assert cases["test_pids_own_count"].outcome == "passed", cases["test_pids_own_count"]

    # cpus: a quarter of a CPU over a 2 s busy loop.
    cpu = cases["test_cpus"]
    assert cpu.outcome == "passed", cpu
    assert 0.05 < float(cpu.properties["cpu_seconds"]) <= 0.6, cpu.properties

    # Placement: every hierarchy that serves a limit holds the container in <outer's own>/lonely-<pid>/<one
    # cgroup of its own> (named by the container's id, or made ahead of time under an id of its own);
    # the others still show the outer pytest's own cgroup (the inner pytest was not moved).
    place = cases["test_place"]
    assert place.outcome == "passed", place
    with open("/proc/self/cgroup") as f:
        outer = own_cgroups(f.read())
    inner = json.loads(place.properties["cgroups"])
    assert set(inner) == set(outer)
    session = f"lonely-{place.properties['session_pid']}"
    moved = {names for names in inner if inner[names] != outer[names]}
    leaves = {os.path.basename(inner[names]) for names in moved}
    assert len(leaves) == 1, inner  # one cgroup, the same in every hierarchy
    for names in moved:
        assert inner[names] == os.path.join(outer[names], session, *leaves), (names, inner[names], outer[names])
        assert inner[names] not in ("/", ""), names
    served = {names for names in inner if set(names.split(",")) & {"memory", "pids", "cpu"}}
    assert served <= moved, (served, moved)
    kernel = json.loads(place.properties["kernel"])
    if kernel != ["unreadable"] * 4:  # a later boundary may forbid mounting cgroupfs inside
        assert kernel == [str(64 * MiB), "64", "100000", "100000"], kernel
    assert not any(session in path for path in lonely_dirs())


# --------------------------------------------------------------------------- cleanup


MANY_TESTS = (
    CGROUP_HELPERS
    + """
import errno
import json
import subprocess

import pytest


@pytest.mark.parametrize("n", range(200))
@pytest.mark.isolated(memory="64M", pids=64, cpus=1)
def test_limited(n):
    assert "lonely-" in my_cgroups()["memory"]


@pytest.mark.isolated(memory="64M", pids=64)
def test_makes_sub_cgroups(record_property):
    # Make a sub-cgroup below our own in two hierarchies and leave a process in it; the plugin must clean up.
    made, refused = [], []  # made: [controller, path relative to the hierarchy's root]
    for controller in ("memory", "pids"):
        where = cgroup_dir(controller)
        if where is None:
            refused.append(f"{controller}: cannot mount cgroupfs")
            continue
        try:
            os.mkdir(where + "/inner-sub")
        except OSError as exc:
            refused.append(f"{controller}: {exc.strerror}")
            continue
        made.append([controller, my_cgroups()[controller] + "/inner-sub"])
    if made:
        sleeper = subprocess.Popen(["sleep", "30"])
        for controller, _ in made:
            with open(cgroup_dir(controller) + "/inner-sub/cgroup.procs", "w") as f:
                f.write(str(sleeper.pid))  # a pid of this PID namespace: the writer's
    record_property("made", json.dumps(made))
    record_property("refused", json.dumps(refused))
"""
)


@root
@needs("memory", "pids", "cpu")
def test_no_cgroup_outlives_200_limited_tests_or_one_making_sub_cgroups(
    pytester: pytest.Pytester, run_lonely: RunLonely
) -> None:
    pytester.makeconftest(PID_CONFTEST)
    pytester.makepyfile(test_many=MANY_TESTS)
    result = run_lonely("-q", *JUNIT[:3])
    result.assert_outcomes(passed=201)
    cases = parse_junit(pytester.path / "report.xml")
    session = f"lonely-{cases['test_makes_sub_cgroups'].properties['session_pid']}"
    made = json.loads(cases["test_makes_sub_cgroups"].properties["made"])
    refused = json.loads(cases["test_makes_sub_cgroups"].properties["refused"])
    assert len(made) + len(refused) == 2, (made, refused)
    for controller, sub in made:
        host = str(CGROUP_ROOT / controller) + sub  # the same path on the host: no cgroup namespace
        assert session in host, host
        assert not os.path.exists(host), host
    assert not any(session in path for path in lonely_dirs())


# --------------------------------------------------------------------------- usage table


USAGE_TESTS = """
import pytest

MiB = 2**20


@pytest.mark.isolated
def test_uses_30():
    data = b"x" * (30 * MiB)
    assert len(data) == 30 * MiB


@pytest.mark.isolated
def test_uses_60():
    data = b"x" * (60 * MiB)
    assert len(data) == 60 * MiB


@pytest.mark.isolated
def test_uses_10():
    data = b"x" * (10 * MiB)
    assert len(data) == 10 * MiB


def test_not_isolated():
    pass
"""


def usage_table(out: str) -> tuple[str, list[list[str]]]:
    """(title line, rows split into peak, cpu, procs, nodeid) of the ``--lonely-usage`` section."""
    lines = out.splitlines()
    title = next(i for i, line in enumerate(lines) if "isolated tests by peak memory" in line)
    header = lines[title + 1]
    assert header.split() == ["peak", "MiB", "CPU", "s", "procs", "test"], header
    rows = []
    for line in lines[title + 2 :]:
        parts = line.split()
        if len(parts) != 4 or "::" not in parts[3]:
            break
        rows.append(parts)
    return lines[title], rows


@root
@needs("memory", "cpuacct")
def test_usage_table_orders_by_peak_memory_and_n_limits_the_rows(
    pytester: pytest.Pytester, run_lonely: RunLonely
) -> None:
    pytester.makepyfile(test_usage=USAGE_TESTS)

    result = run_lonely("--lonely-usage=2")
    result.assert_outcomes(passed=4)
    title, rows = usage_table(result.stdout.str())
    assert "top 2 isolated tests by peak memory" in title
    assert [row[3] for row in rows] == ["test_usage.py::test_uses_60", "test_usage.py::test_uses_30"], rows

    result = run_lonely("--lonely-usage=0")
    result.assert_outcomes(passed=4)
    out = result.stdout.str()
    title, rows = usage_table(out)
    assert "all isolated tests by peak memory" in title
    names = [row[3] for row in rows]
    assert names == [f"test_usage.py::test_uses_{n}" for n in (60, 30, 10)], out
    for (peak, cpu, procs, _), allocated in zip(rows, (60, 30, 10), strict=True):
        assert allocated <= float(peak) < allocated + 200, rows
        assert 0 < float(cpu) < 30, rows
        assert procs == "n/a" or int(procs) >= 1, rows
    assert not any(f"lonely-{os.getpid()}" in p for p in lonely_dirs())


# --------------------------------------------------------------------------- precedence


PRECEDENCE_TESTS = (
    CGROUP_HELPERS
    + """
import pytest


def kernel_limit():
    path = my_cgroups()["memory"]
    if "lonely-" not in path:
        return "no cgroup"
    value = read_cgroup("memory", "memory.limit_in_bytes")
    return value if value == "unreadable" else int(value)


def test_unmarked(container, record_property):
    record_property("limit", repr(container.limits.memory))
    record_property("kernel", repr(kernel_limit()))


@pytest.mark.isolated(memory=None)
def test_lifted(container, record_property):
    record_property("limit", repr(container.limits.memory))
    record_property("kernel", repr(kernel_limit()))


@pytest.mark.isolated(memory="128M")
def test_marker(container, record_property):
    record_property("limit", repr(container.limits.memory))
    record_property("kernel", repr(kernel_limit()))
"""
)


@root
@needs("memory")
def test_precedence_marker_over_command_line_over_ini(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    pytester.makeini("[pytest]\nlonely_memory = 32M\n")
    pytester.makepyfile(test_prec=PRECEDENCE_TESTS)

    def run(*args: str) -> dict[str, tuple[str, str]]:
        result = run_lonely(*JUNIT, *args)
        result.assert_outcomes(passed=3)
        cases = parse_junit(pytester.path / "report.xml")
        seen = {}
        for name, case in cases.items():
            limit, kernel = case.properties["limit"], case.properties["kernel"]
            if kernel == repr("unreadable"):  # a later boundary may forbid mounting cgroupfs inside
                kernel = limit
            seen[name] = (limit, kernel)
        return seen

    lifted = ("None", repr("no cgroup"))
    marker = (repr(128 * MiB), repr(128 * MiB))
    assert run() == {"test_unmarked": (repr(32 * MiB),) * 2, "test_lifted": lifted, "test_marker": marker}
    assert run("--lonely-memory", "64M") == {
        "test_unmarked": (repr(64 * MiB),) * 2,
        "test_lifted": lifted,
        "test_marker": marker,
    }
    assert run("--lonely-memory=none") == {"test_unmarked": lifted, "test_lifted": lifted, "test_marker": marker}


# --------------------------------------------------------------------------- bad values


BAD_MARKER_TESTS = """
import pytest


@pytest.mark.isolated(memory="lots")
def test_memory_lots():
    pass


@pytest.mark.isolated(pids=-3)
def test_pids_negative():
    pass


@pytest.mark.isolated(cpus=0)
def test_cpus_zero():
    pass


@pytest.mark.isolated(memory=0)
def test_memory_zero():
    pass


@pytest.mark.isolated(memory="64M", pids=64, cpus=1.5)
def test_fine(container):
    assert container.limits.cpus == 1.5
"""


def test_bad_marker_values_error_that_test_alone(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    pytester.makepyfile(test_bad=BAD_MARKER_TESTS)
    result = run_lonely(*JUNIT)
    cases = parse_junit(pytester.path / "report.xml")
    expected = {
        "test_memory_lots": ("memory='lots'", "must be a number of bytes or one with a K, M or G suffix"),
        "test_pids_negative": ("pids=-3", "must be a whole number of processes from 1 to"),
        "test_cpus_zero": ("cpus=0", "must be a number of CPUs from"),
        "test_memory_zero": ("memory=0", "0 and negative sizes are not limits"),
    }
    for name, (value, allowed) in expected.items():
        case = cases[name]
        assert case.outcome == "error", (name, case)
        keyword = value.split("=")[0]
        for part in (value, f"@pytest.mark.isolated({keyword}=...)", f"test_bad.py::{name}", allowed, "None"):
            assert part in case.message, (name, part, case.message)
    fine = cases["test_fine"]
    if os.geteuid() == 0 and {"memory", "pids", "cpu"} <= enabled_controllers():
        assert fine.outcome == "passed", (fine, result.stdout.str())
    else:  # rootless or missing controllers: refused for that reason, not for its values
        assert "cannot limit the container" in fine.message, fine


@pytest.mark.parametrize(
    "case",
    [
        (["--lonely-pids=-3"], None, "pids='-3' from --lonely-pids (command line)", "from 1 to"),
        (["--lonely-memory=lots"], None, "memory='lots' from --lonely-memory (command line)", "K, M or G"),
        (["--lonely-memory=0"], None, "memory='0' from --lonely-memory (command line)", "0 and negative"),
        (["--lonely-cpus=0"], None, "cpus='0' from --lonely-cpus (command line)", "number of CPUs from"),
        ([], "lonely_pids = -3", "pids='-3' from lonely_pids (ini)", "from 1 to"),
        ([], "lonely_memory = lots", "memory='lots' from lonely_memory (ini)", "K, M or G"),
        ([], "lonely_cpus = 0", "cpus='0' from lonely_cpus (ini)", "number of CPUs from"),
        (["--lonely-usage=-1"], None, "usage='-1' from --lonely-usage (command line)", "whole number"),
    ],
    ids=["cli-pids", "cli-memory", "cli-memory-0", "cli-cpus", "ini-pids", "ini-memory", "ini-cpus", "cli-usage"],
)
def test_bad_run_wide_values_are_usage_errors(
    pytester: pytest.Pytester, run_lonely: RunLonely, case: tuple[list[str], str | None, str, str]
) -> None:
    args, ini, named, allowed = case
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = run_lonely(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR, result.stderr.str()
    err = result.stderr.str()
    lift = [] if named.startswith("usage=") else ["or 'none' for no limit"]
    for part in (named, allowed, *lift):
        assert part in err, (part, err)


# --------------------------------------------------------------------------- rootless


ROOTLESS_TESTS = """
import pytest


@pytest.mark.isolated(memory="64M")
def test_wants_memory():
    pass


@pytest.mark.isolated(pids=64)
def test_wants_pids():
    pass


@pytest.mark.isolated
def test_wants_none(container):
    assert container.rootless
    assert not container.limits
"""


def test_rootless_refuses_limits_with_the_fix_and_runs_the_rest(nobody_env: Env) -> None:
    project = nobody_env.project("limits", {"test_rootless_limits.py": ROOTLESS_TESTS})
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(nobody_env.python)]
    cmd += ["-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", *JUNIT, "--lonely-usage=0"]
    done = subprocess.run(
        cmd,
        check=False,
        cwd=project,
        env={**CLEAN_ENV, "HOME": str(project)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = done.stdout
    cases = parse_junit(project / "report.xml")
    assert cases["test_wants_none"].outcome == "passed", out
    for name, asked in (("test_wants_memory", "memory=67108864"), ("test_wants_pids", "pids=64")):
        case = cases[name]
        assert case.outcome == "error", (name, out)
        for part in (
            asked,
            "cannot limit the container",
            "not delegated to this user",
            "uid 65534",
            "systemd-run --user --scope -p Delegate=yes",
        ):
            assert part in case.message, (name, part, case.message)
    assert "all isolated tests by peak memory" in out, out
    assert re.search(r"lonely: usage cannot be measured here: .*not delegated.*Delegate=yes", out), out


# --------------------------------------------------------------------------- the boundary holds the limits

SHUT_IN = """
import ctypes
import errno
import os
import tempfile

import pytest


def _tries(path, text):
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as exc:
        return exc.errno
    return 0


@pytest.mark.isolated(memory="64M", pids=32)
def test_cannot_raise_its_limits_or_leave(record_property):
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f.read().splitlines():
            _, names, path = line.split(":", 2)
            own[names] = path
    results = {}
    # Through the host's hierarchies as /sys shows them inside (a read-only view).
    for controller, name, value in (("memory", "memory.limit_in_bytes", "-1"), ("pids", "pids.max", "max")):
        base = "/sys/fs/cgroup/" + controller
        if os.path.isdir(base + own[controller]):
            results["sys-" + controller] = _tries(base + own[controller] + "/" + name, value)
            results["sys-leave-" + controller] = _tries(base + "/cgroup.procs", "0")
    # Through a fresh mount of the hierarchy: refused outright.
    where = tempfile.mkdtemp()
    libc = ctypes.CDLL(None, use_errno=True)
    results["mount"] = 0 if libc.mount(b"cgroup", where.encode(), b"cgroup", 0, b"memory") == 0 else ctypes.get_errno()
    record_property("results", repr(results))
    assert results["mount"] != 0, results
    assert all(code != 0 for code in results.values()), results
"""


@needs("memory", "pids")
def test_a_container_cannot_raise_its_limits_or_leave_its_cgroup(
    pytester: pytest.Pytester, run_lonely: RunLonely
) -> None:
    """With the boundary, root inside is not the host's root: the cgroup files are out of reach."""
    pytester.makepyfile(test_shut_in=SHUT_IN)
    result = run_lonely("-rA")
    result.assert_outcomes(passed=1)
