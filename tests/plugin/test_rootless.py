"""Rootless mode and the "isolation unavailable" paths, for real.

A. pytest runs as uid 65534 (``setpriv``), so the plugin must build every
   container inside a user namespace.  The interpreter is Debian's
   ``/usr/bin/python3`` in a venv that 65534 can read (see rootless_env.py):
   the suite's own venv may sit under a 0700 home.
B. Unavailable for real: as root we create a user namespace with an identity
   map of uids/gids 0..65534, set its own ``user.max_user_namespaces`` to 0,
   drop to uid 65534 inside it and run pytest there, so the plugin's
   ``unshare(CLONE_NEWUSER)`` genuinely fails with ENOSPC.  The host's sysctl
   is never touched.
C. Not Linux, simulated: only the probe's platform check is patched.

Nothing written inside a container reaches the host, so inner tests assert
what they see themselves; the outer tests read junitxml, the terminal and the
host's /proc while the inner session runs.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.host import mount_table
from helpers.inner import Case, RunLonely, parse_junit
from helpers.rootless_env import (
    CLEAN_ENV,
    NOBODY,
    SYSTEM_PYTHON,
    Env,
    cmdline,
    descendants,
    procs,
    started_in,
    status_field,
)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="needs Linux and root (to become uid 65534 and map IDs)"
)

INNER_ARGS = (
    *("-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", "-rA"),
    *("--junitxml=report.xml", "-o", "junit_family=xunit1"),  # xunit1 keeps record_property
)


# --------------------------------------------------------------------------- plumbing


def header(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("lonely:")]
    assert len(lines) == 1, output
    return lines[0]


def as_nobody(python: Path) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", str(python), *INNER_ARGS]


def nobody_entries_in_tmp() -> set[str]:
    found = set()
    for entry in os.scandir("/tmp"):
        try:
            if entry.stat(follow_symlinks=False).st_uid == NOBODY:
                found.add(entry.name)
        except OSError:
            continue
    return found


# --------------------------------------------------------------------------- A: rootless, for real

# Prepended to the inner test file: the values the outer test chose.
ROOTLESS_CONSTANTS = """
UNIQ = {uniq!r}
SKELETON = {skeleton!r}
BUSYBOX_ROOT = {busybox!r}
HELD_PORT = {port!r}
OVERFLOW = ({overflow_uid!r}, {overflow_gid!r})
"""

ROOTLESS_TESTS = """
import ctypes
import errno
import os
import signal
import socket
import subprocess
import time

import pytest


@pytest.mark.isolated
def test_host_sees_nobody(container, record_property):
    # The outer test finds this process on the host by the SIGUSR1 handler, reads its
    # /proc status, then sends SIGUSR1 (PID 1 only receives signals it handles).
    record_property("host_pid", container.host_pid)
    got = []
    signal.signal(signal.SIGUSR1, lambda *_: got.append(True))
    deadline = time.monotonic() + 30
    while not got and time.monotonic() < deadline:
        time.sleep(0.01)
    assert got, "the outer test never signalled"


@pytest.mark.isolated
def test_pid1_and_own_process_table():
    assert os.getpid() == 1
    assert os.getppid() == 0
    assert sorted(e for e in os.listdir("/proc") if e.isdigit()) == ["1"]
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert sorted(int(e) for e in os.listdir("/proc") if e.isdigit()) == [1, sleeper.pid]
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.isolated(hostname="rootless-box")
def test_marker_hostname():
    assert socket.gethostname() == "rootless-box"
    assert os.uname().nodename == "rootless-box"


def test_identity_and_default_hostname(container):
    assert socket.gethostname() == container.id == container.hostname
    assert (os.getuid(), os.getgid(), os.geteuid(), os.getegid()) == (0, 0, 0, 0)
    assert container.rootless is True
    assert container.namespaces == {"user", "pid", "mnt", "uts", "ipc"}
    with open("/proc/self/uid_map") as f:
        # Root of a second user namespace (it locks the container's own mounts), mapped to root of the
        # first one, which is mapped to the user; test_host_sees_nobody checks the host's view.
        assert f.read().split() == ["0", "0", "1"]


def test_copy_on_write_host_view(container):
    path = "/etc/lonely-rootless-" + UNIQ
    try:
        with open(path, "w") as f:
            f.write("inside")
    except OSError as exc:
        assert exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS), exc
    else:
        with open(path) as f:
            assert f.read() == "inside"
    # The project is the user's own: writable here, and the write stays in the layer.
    with open("inside-" + UNIQ, "w") as f:
        f.write("inside")


def test_foreign_files_show_the_overflow_ids(container):
    st = os.stat("/etc/passwd")
    assert (st.st_uid, st.st_gid) == OVERFLOW
    with pytest.raises(PermissionError):
        open("/etc/passwd", "a")
    mine = os.stat(".")  # owned by uid 65534 on the host, which is root in here
    assert (mine.st_uid, mine.st_gid) == (0, 0)


@pytest.mark.isolated(rootfs=SKELETON)
def test_skeleton_rootfs():
    with open("/etc/os-release") as f:
        assert "Lonely Linux" in f.read()


@pytest.mark.skipif(BUSYBOX_ROOT is None, reason="busybox-static is not installed")
@pytest.mark.isolated(rootfs=BUSYBOX_ROOT)
def test_busybox_rootfs():
    out = subprocess.run(["sh", "-c", "echo hi"], capture_output=True, timeout=10)
    assert out.stdout == b"hi\\n", out
    assert not os.path.exists("/etc/passwd")


@pytest.mark.skipif(BUSYBOX_ROOT is None, reason="busybox-static is not installed")
@pytest.mark.isolated(rootfs=BUSYBOX_ROOT)
def test_busybox_rootfs_keeps_the_stdlib_importable():
    # The root belongs to host root, as a root made by an administrator or checked out by CI would.
    # The interpreter's stdlib must still be there for imports that happen only now.
    import colorsys  # noqa: F401  (not imported by pytest or the plugin)


@pytest.mark.isolated(network=False)
def test_loopback_only_network(container):
    assert container.namespaces == {"user", "pid", "mnt", "uts", "ipc", "net"}
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    with socket.socket() as server:
        server.bind(("127.0.0.1", HELD_PORT))  # the outer test holds this port on the host
        server.listen()
        with socket.create_connection(("127.0.0.1", HELD_PORT), timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"x")
                assert client.recv(1) == b"x"


@pytest.mark.isolated(timeout=1)
def test_sleeps_past_its_timeout():
    time.sleep(60)


@pytest.mark.isolated
def test_segfaults():
    ctypes.string_at(0)


def test_plain_test_runs_as_the_user():
    assert (os.getuid(), os.getgid(), os.getpid() != 1) == (65534, 65534, True)
"""

EXPECTED_PASSES = (
    "test_host_sees_nobody",
    "test_pid1_and_own_process_table",
    "test_marker_hostname",
    "test_identity_and_default_hostname",
    "test_copy_on_write_host_view",
    "test_foreign_files_show_the_overflow_ids",
    "test_skeleton_rootfs",
    "test_busybox_rootfs",
    "test_busybox_rootfs_keeps_the_stdlib_importable",
    "test_loopback_only_network",
    "test_plain_test_runs_as_the_user",
)


@dataclasses.dataclass(frozen=True)
class RootlessRun:
    returncode: int
    output: str
    cases: dict[str, Case]
    uniq: str
    project: Path
    #: Host PID and /proc/PID/status of the waiting container's PID 1.
    pid1: int
    pid1_status: str
    #: The Uid line of every process below the inner pytest at that moment.
    tree_uids: dict[int, list[str]]
    #: Processes of uid 65534 started by the run (HOME=project) still alive after it.
    leftovers: dict[int, str]
    mounts_leaked: list[str]
    tmp_leftovers: set[str]


def _find_waiting_pid1(pytest_pid: int) -> tuple[int, str] | None:
    """The container process that handles SIGUSR1 and is PID 1 of its namespace, if it is up yet."""
    for pid in descendants(pytest_pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                text = f.read()
        except OSError:
            continue
        caught = int((status_field(text, "SigCgt") or ["0"])[0], 16)
        if caught & (1 << (signal.SIGUSR1 - 1)) and status_field(text, "NSpid")[-1:] == ["1"]:
            return pid, text
    return None


@pytest.fixture(scope="module")
def rootless_run(nobody_env: Env) -> RootlessRun:
    """One inner session as uid 65534 with every rootless check; the host is watched while it runs."""
    passwd = os.stat("/etc/passwd")
    assert (passwd.st_uid, passwd.st_gid) == (0, 0), "the overflow-ID check needs a root-owned /etc/passwd"
    uniq = secrets.token_hex(6)
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    with open("/proc/sys/kernel/overflowuid") as f, open("/proc/sys/kernel/overflowgid") as g:
        overflow = int(f.read()), int(g.read())
    constants = ROOTLESS_CONSTANTS.format(
        uniq=uniq,
        skeleton=str(nobody_env.skeleton),
        busybox=None if nobody_env.busybox_root is None else str(nobody_env.busybox_root),
        port=holder.getsockname()[1],
        overflow_uid=overflow[0],
        overflow_gid=overflow[1],
    )
    project = nobody_env.project("rootless", {"test_inner.py": constants + ROOTLESS_TESTS})
    mounts_before = mount_table()
    tmp_before = nobody_entries_in_tmp()
    log = nobody_env.base / "rootless.log"
    pid1, pid1_status, tree_uids = 0, "", {}
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                as_nobody(nobody_env.python),
                cwd=project,
                env={**CLEAN_ENV, "HOME": str(project)},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 60
            while proc.poll() is None and time.monotonic() < deadline:
                found = _find_waiting_pid1(proc.pid)
                if found is not None:
                    pid1, pid1_status = found
                    below = set(descendants(proc.pid))
                    tree_uids = {pid: status_field(text, "Uid") for pid, text in procs() if pid in below}
                    os.kill(pid1, signal.SIGUSR1)
                    break
                time.sleep(0.01)
            returncode = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        holder.close()
    # Whatever the run started has exited with it (namespace teardown is asynchronous: allow it a moment).
    leftovers: dict[int, str] = {}
    until = time.monotonic() + 10
    while time.monotonic() < until:
        leftovers = {
            pid: cmdline(pid)
            for pid, text in procs()
            if status_field(text, "Uid")[:1] == [str(NOBODY)] and started_in(pid, project)
        }
        if not leftovers:
            break
        time.sleep(0.05)
    after = mount_table()
    return RootlessRun(
        returncode=returncode,
        output=log.read_text(errors="replace"),
        cases=parse_junit(project / "report.xml") if (project / "report.xml").exists() else {},
        uniq=uniq,
        project=project,
        pid1=pid1,
        pid1_status=pid1_status,
        tree_uids=tree_uids,
        leftovers=leftovers,
        mounts_leaked=sorted(set(after) - set(mounts_before)),
        tmp_leftovers=nobody_entries_in_tmp() - tmp_before,
    )


def test_rootless_header(rootless_run: RootlessRun) -> None:
    line = header(rootless_run.output)
    assert "rootless mode" in line, line
    assert "user" in line.split("namespaces", 1)[1].split(",")[0], line


def test_rootless_session_completes(rootless_run: RootlessRun) -> None:
    assert "INTERNALERROR" not in rootless_run.output, rootless_run.output
    assert rootless_run.returncode == 1, rootless_run.output  # the timeout and segfault tests fail
    assert len(rootless_run.cases) == len(EXPECTED_PASSES) + 2, rootless_run.output


@pytest.mark.parametrize("name", EXPECTED_PASSES)
def test_rootless_inner_test_passes(rootless_run: RootlessRun, name: str, nobody_env: Env) -> None:
    if name.startswith("test_busybox_rootfs") and nobody_env.busybox_root is None:
        pytest.skip("busybox-static is not installed")
    case = rootless_run.cases.get(name)
    assert case is not None, rootless_run.output
    assert case.outcome == "passed", case.message


def test_rootless_timeout_kills_the_container(rootless_run: RootlessRun) -> None:
    case = rootless_run.cases["test_sleeps_past_its_timeout"]
    assert case.outcome == "failed", case.message
    assert "Timeout" in case.message


def test_rootless_segfault_reports_the_signal(rootless_run: RootlessRun) -> None:
    case = rootless_run.cases["test_segfaults"]
    assert case.outcome == "failed", case.message
    assert "signal 11 (SIGSEGV)" in case.message


def test_rootless_writes_never_reach_the_host(rootless_run: RootlessRun) -> None:
    assert not os.path.lexists(f"/etc/lonely-rootless-{rootless_run.uniq}")
    assert not (rootless_run.project / f"inside-{rootless_run.uniq}").exists()


def test_rootless_container_processes_belong_to_the_user(rootless_run: RootlessRun) -> None:
    """On the host, the container's PID 1 and the process that forked it run as uid 65534, not as root."""
    assert rootless_run.pid1, f"never saw the waiting container\n{rootless_run.output}"
    assert status_field(rootless_run.pid1_status, "Uid") == [str(NOBODY)] * 4
    assert status_field(rootless_run.pid1_status, "Gid") == [str(NOBODY)] * 4
    assert len(rootless_run.tree_uids) >= 2, rootless_run.tree_uids  # the forked middle process and PID 1
    assert all(uids == [str(NOBODY)] * 4 for uids in rootless_run.tree_uids.values()), rootless_run.tree_uids
    assert rootless_run.cases["test_host_sees_nobody"].properties.get("host_pid") == str(rootless_run.pid1)


def test_rootless_run_leaves_nothing_behind(rootless_run: RootlessRun) -> None:
    assert not rootless_run.leftovers
    assert not rootless_run.mounts_leaked
    assert not rootless_run.tmp_leftovers


# --------------------------------------------------------------------------- B: unavailable (ENOSPC), for real

# Run as root with /usr/bin/python3 (3.11 has no os.unshare).  The child enters a new user namespace,
# the parent (root on the host) writes identity maps for 0..65534, the child sets that namespace's
# own user.max_user_namespaces to 0, becomes uid/gid 65534 and execs the given command.
IDENTITY_USERNS_LAUNCHER = r"""
import ctypes
import os
import sys

CLONE_NEWUSER = 0x10000000
libc = ctypes.CDLL(None, use_errno=True)
up_r, up_w = os.pipe()
down_r, down_w = os.pipe()
pid = os.fork()
if pid == 0:
    try:
        os.close(up_r)
        os.close(down_w)
        if libc.unshare(CLONE_NEWUSER) != 0:
            err = ctypes.get_errno()
            raise OSError(err, "unshare(CLONE_NEWUSER): " + os.strerror(err))
        os.write(up_w, b"u")
        if os.read(down_r, 1) != b"m":
            raise RuntimeError("the parent could not write the ID maps")
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        os.execv(sys.argv[1], sys.argv[1:])
    except BaseException as exc:
        print("launcher:", repr(exc), file=sys.stderr, flush=True)
    os._exit(99)
os.close(up_w)
os.close(down_r)
if os.read(up_r, 1) != b"u":
    os.waitpid(pid, 0)
    sys.exit("launcher: the child could not create a user namespace")
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as f:
        f.write("0 0 65535\n")
os.write(down_w, b"m")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""

UNAVAILABLE_TESTS = """
import os

import pytest


@pytest.mark.isolated
def test_isolated():
    assert os.getpid() == 1


def test_plain():
    # The setting the plugin trips over, as seen from where pytest runs.
    with open("/proc/sys/user/max_user_namespaces") as f:
        assert f.read().strip() == "0"
    assert os.getuid() == 65534
"""

ENOSPC_PHRASES = (
    "unshare-user failed with ENOSPC",
    "user.max_user_namespaces is 0",
    "sudo sysctl -w user.max_user_namespaces=15000",
)


@pytest.mark.parametrize(
    ("mode", "args", "ini"),
    [
        ("fail", (), ""),
        ("skip", ("--lonely-unavailable=skip",), ""),
        ("skip", (), "[pytest]\nlonely_unavailable = skip\n"),
    ],
    ids=["default-fail", "cli-skip", "ini-skip"],
)
def test_enospc_user_namespaces(nobody_env: Env, mode: str, args: tuple[str, ...], ini: str) -> None:
    """A real ENOSPC from unshare(CLONE_NEWUSER): the header says why, isolated tests fail or skip with that reason."""
    files = {"test_unavailable.py": UNAVAILABLE_TESTS, "identity_userns.py": IDENTITY_USERNS_LAUNCHER}
    if ini:
        files["pytest.ini"] = ini
    project = nobody_env.project(f"enospc-{mode}-{'ini' if ini else 'cli'}", files)
    result = subprocess.run(
        [str(SYSTEM_PYTHON), str(project / "identity_userns.py"), str(nobody_env.python), *INNER_ARGS, *args],
        check=False,
        cwd=project,
        env={**CLEAN_ENV, "HOME": str(project)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert "INTERNALERROR" not in output, output
    line = header(output)
    assert f"isolation unavailable ({mode} isolated tests)" in line, line
    for phrase in ENOSPC_PHRASES:
        assert phrase in line, line
    cases = parse_junit(project / "report.xml")
    assert cases["test_plain"].outcome == "passed", cases["test_plain"].message
    isolated = cases["test_isolated"]
    assert isolated.outcome == ("skipped" if mode == "skip" else "error"), output
    assert "isolation unavailable" in isolated.message
    for phrase in ENOSPC_PHRASES:
        assert phrase in isolated.message, isolated.message
    assert result.returncode == (0 if mode == "skip" else 1), output


# --------------------------------------------------------------------------- C: not Linux (simulated)

NOT_LINUX_CONFTEST = """
import pytest_lonely.sandbox.probe

# Simulated: the probe's platform check says "not Linux"; everything else still runs on Linux.
pytest_lonely.sandbox.probe._IS_LINUX = False
"""

NOT_LINUX_TESTS = """
import pytest


@pytest.mark.isolated
def test_isolated():
    pass


def test_container(container):
    pass


def test_plain():
    pass
"""


@pytest.mark.parametrize("mode", ["fail", "skip"])
def test_not_linux(pytester: pytest.Pytester, run_lonely: RunLonely, mode: str) -> None:
    """Only ``probe._IS_LINUX`` is patched (in a conftest, before the session probes): the plugin loads,
    the header explains, isolated tests fail or skip with the "needs Linux" reason and plain tests run.
    The plugin's imports on a real non-Linux system are not exercised here."""
    pytester.makeconftest(NOT_LINUX_CONFTEST)
    pytester.makepyfile(NOT_LINUX_TESTS)
    result = run_lonely("-rA", f"--lonely-unavailable={mode}", timeout=60)
    output = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in output
    line = header(result.stdout.str())
    assert f"isolation unavailable ({mode} isolated tests): namespaces need Linux" in line, line
    if mode == "skip":
        result.assert_outcomes(passed=1, skipped=2)
        result.stdout.fnmatch_lines(["SKIPPED * isolation unavailable: namespaces need Linux*"])
    else:
        result.assert_outcomes(passed=1, errors=2)
        result.stdout.fnmatch_lines(
            ["*ERROR at setup of test_isolated*", "isolation unavailable: namespaces need Linux*"]
        )
    assert "-p no:lonely" in output
