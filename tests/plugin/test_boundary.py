"""The container is a boundary the kernel enforces: an isolated test cannot reach the host, as root or rootless.

Each test below runs a real inner pytest session in a subprocess (as root,
or as uid 65534 for rootless), whose isolated test tries one way out of the
container with the probes of ``boundary_probes.py``.  Two things must hold:

* inside, the attempt fails (the inner test asserts it, and logs every
  attempt with its errno in a junit property);
* outside, nothing changed: the outer test reads the host's value FIRST,
  compares it afterwards, and restores it from the host side in ``finally``
  whatever happened, so the suite leaves the machine as found even while
  a hole is open.

In root mode every probe runs twice in the same inner session: the first
test's container is forked straight from pytest, the second one's from the
zygote, which built it ahead of time (``sandbox/zygote.py``).

Then the other side: what a test must still be able to do inside (uid 0,
sethostname, writes into the overlay, chown, low ports and ``ip`` in its own
network namespace, tmpfs, nested PID namespaces, daemons and signals), and
the escape hatch ``privileged=True`` (marker, ``--lonely-privileged``, ini
``lonely_privileged``), which gives host root back and is an error rootless.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.host import FIXTURE_ROOTFS
from helpers.inner import Case, parse_junit
from helpers.rootless_env import (
    CLEAN_ENV,
    NOBODY,
    XDIST_GROUP,
    Env,
    chown_tree,
    world_tempdir,
)

pytestmark = pytest.mark.skipif(
    sys.platform != "linux" or os.geteuid() != 0, reason="needs Linux and root (root mode, and to become uid 65534)"
)

HERE = Path(__file__).resolve().parent
PROBES = HERE / "boundary_probes.py"
INNER_ARGS = (
    *("-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", "-p", "no:randomly", "-rA"),
    *("--junitxml=report.xml", "-o", "junit_family=xunit1"),
)
#: A name at the host's / that the skeleton rootfs does not show: not in the skeleton, and not the first
#: component of anything the plan must bring in (the interpreter, sys.path, this checkout).
_SHOWN = {
    Path(p).parts[1] for p in (sys.prefix, sys.base_prefix, str(HERE), *sys.path) if p.startswith("/") and p != "/"
}
HOST_ONLY = next(
    (
        n
        for n in ("lost+found", "boot", "media", "srv", "work")
        if os.path.isdir("/" + n) and n not in _SHOWN and not (FIXTURE_ROOTFS / n).exists()
    ),
    "lost+found",
)
WHICHES = ("from_pytest", "from_zygote")

SYSCTL = "/proc/sys/kernel/printk_ratelimit"
CORE_PATTERN = "/proc/sys/kernel/core_pattern"
KNOB_CANDIDATES = ("/sys/kernel/mm/ksm/pages_to_scan", "/sys/kernel/mm/transparent_hugepage/khugepaged/pages_to_scan")
PROBE_ADDRESSES = {"from_pytest": "127.0.0.77", "from_zygote": "127.0.0.78"}
CGROUP_ROOTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/pids", "/sys/fs/cgroup")


# --------------------------------------------------------------------------- plumbing


@dataclasses.dataclass(frozen=True)
class InnerRun:
    returncode: int
    output: str
    cases: dict[str, Case]

    def explain(self) -> str:
        parts = [
            f"--- {name}: {case.outcome}\n{case.properties.get('log') or case.message}"
            for name, case in self.cases.items()
        ]
        return "\n".join(parts) + f"\n--- inner session output (rc {self.returncode}):\n{self.output[-3000:]}"

    def assert_passed(self, *names: str) -> None:
        names = names or tuple(self.cases) or ("<any test>",)
        for name in names:
            case = self.cases.get(name)
            assert case is not None, f"inner test {name} did not run\n{self.explain()}"
            assert case.outcome == "passed", f"inner test {name}: {case.outcome}\n{case.message}\n{self.explain()}"


INNER_HEADER = """\
import os
import socket

import pytest

import boundary_probes as bp

C = {constants!r}
STDIO = {stdio!r}


def check(record_property, probe):
    record_property("log", probe.report())
    assert not probe.breaches, "the container let this through:\\n" + probe.report()

"""

TWICE = """
@pytest.mark.isolated({mark})
def test_{which}(record_property, tmp_path):
    WHICH = "{which}"  # noqa: F841  (names that must differ between the two copies are C[...][WHICH])
{body}
"""


@dataclasses.dataclass
class Box:
    """Runs inner sessions in one mode: ``root`` (pytest as root) or ``rootless`` (pytest as uid 65534)."""

    mode: str
    base: Path
    python: Path
    skeleton: Path
    _count: int = 0

    @property
    def rootless(self) -> bool:
        return self.mode == "rootless"

    def host_dir(self, prefix: str) -> Path:
        """A fresh directory under /tmp belonging to the user the inner pytest runs as."""
        path = world_tempdir(prefix)
        if self.rootless:
            os.chown(path, NOBODY, NOBODY)
        return path

    def run(
        self,
        body: str,
        *,
        mark: str = "",
        constants: dict[str, object] | None = None,
        args: tuple[str, ...] = (),
        pythonpath: Path | None = None,
        ini: str = "",
        twice: bool = True,
        extra: str = "",
    ) -> InnerRun:
        """One inner session whose isolated test runs ``body`` (root mode: twice, from pytest, then from the zygote)."""
        self._count += 1
        project = self.base / f"p{self._count}"
        project.mkdir()
        shutil.copy(PROBES, project / "boundary_probes.py")
        log = project / "inner.log"
        log.touch()
        if self.rootless:
            os.chown(log, NOBODY, NOBODY)
        st = os.stat(log)  # the inner session's stdout and stderr: inherited fds to it are stdio
        source = INNER_HEADER.format(constants=constants or {}, stdio=[(st.st_dev, st.st_ino)])
        indented = textwrap.indent(textwrap.dedent(body).strip("\n"), "    ")
        for which in ("from_pytest", "from_zygote") if twice and not self.rootless else ("from_pytest",):
            source += TWICE.format(mark=mark, which=which, body=indented)
        (project / "test_inner.py").write_text(source + textwrap.dedent(extra))
        if ini:
            (project / "pytest.ini").write_text("[pytest]\n" + textwrap.dedent(ini))
        env = {**CLEAN_ENV, "HOME": str(project)}
        if pythonpath is not None:
            env["PYTHONPATH"] = str(pythonpath)
        argv = [str(self.python), *INNER_ARGS, *args]
        if self.rootless:
            chown_tree(project, NOBODY, NOBODY)
            argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
        with open(log, "wb") as out:
            proc = subprocess.run(
                argv,
                check=False,
                cwd=project,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=180,
            )
        return InnerRun(proc.returncode, log.read_text(errors="replace"), parse_junit(project / "report.xml"))


@pytest.fixture(params=["root", pytest.param("rootless", marks=XDIST_GROUP)])
def box(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Box]:
    if request.param == "root":
        yield Box("root", tmp_path, Path(sys.executable), FIXTURE_ROOTFS)
        return
    nobody_env: Env = request.getfixturevalue("nobody_env")
    runs = world_tempdir("lonely-boundary-runs-")
    try:
        yield Box("rootless", runs, nobody_env.python, nobody_env.skeleton)
    finally:
        shutil.rmtree(runs)


@pytest.fixture
def root_box(tmp_path: Path) -> Box:
    return Box("root", tmp_path, Path(sys.executable), FIXTURE_ROOTFS)


@pytest.fixture
def rootless_box(nobody_env: Env) -> Iterator[Box]:
    runs = world_tempdir("lonely-boundary-runs-")
    try:
        yield Box("rootless", runs, nobody_env.python, nobody_env.skeleton)
    finally:
        shutil.rmtree(runs)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def restoring(path: str, before: str) -> None:
    """From the host side: put the value back if anything changed it."""
    if read(path) != before:
        write(path, before)
    assert read(path) == before, f"could not restore {path} to {before!r}"


def lo_has(address: str) -> bool:
    out = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", "lo"], capture_output=True, text=True, check=True)
    return f" {address}/" in out.stdout


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# --------------------------------------------------------------------------- the boundary: rows of the table


def test_non_namespaced_sysctl_write_is_refused(box: Box) -> None:
    before = read(SYSCTL)
    try:
        run = box.run(
            "check(record_property, bp.sysctl_write(C['path'], C['value']))",
            constants={"path": SYSCTL, "value": str(int(before) + 1)},
        )
        assert read(SYSCTL) == before, f"the host's {SYSCTL} changed from {before.strip()}\n{run.explain()}"
        run.assert_passed()
    finally:
        restoring(SYSCTL, before)


def test_core_pattern_does_not_open_for_writing(box: Box) -> None:
    before = read(CORE_PATTERN)
    try:
        run = box.run("check(record_property, bp.sysctl_open_for_writing(C['path']))", constants={"path": CORE_PATTERN})
        run.assert_passed()
    finally:
        assert read(CORE_PATTERN) == before  # only opened, never written: nothing to restore


def _knob() -> str:
    for knob in KNOB_CANDIDATES:
        if os.path.exists(knob) and os.access(knob, os.W_OK):
            return knob
    pytest.skip(f"none of the harmless /sys knobs is writable here: {KNOB_CANDIDATES}")


def test_sys_stays_read_only_and_knobs_unchanged(box: Box) -> None:
    knob = _knob()
    before = read(knob)
    try:
        run = box.run(
            "check(record_property, bp.sys_knob(C['knob'], C['value']))",
            constants={"knob": knob, "value": str(int(before) + 1)},
        )
        assert read(knob) == before, f"the host's {knob} changed from {before.strip()}\n{run.explain()}"
        run.assert_passed()
    finally:
        restoring(knob, before)


def test_read_only_bind_stays_read_only(box: Box) -> None:
    """A directory on sys.path under /tmp (like a venv there) is bound read-only; remounting it must fail."""
    ro = box.host_dir("lonely-boundary-ro-")
    names = {which: unique(f"written-through-{which}") for which in WHICHES}
    try:
        run = box.run(
            "check(record_property, bp.ro_bind(C['dir'], C['names'][WHICH]))",
            constants={"dir": str(ro), "names": names},
            pythonpath=ro,
        )
        appeared = sorted(os.listdir(ro))
        assert not appeared, f"files appeared in the host directory {ro}: {appeared}\n{run.explain()}"
        run.assert_passed()
    finally:
        shutil.rmtree(ro)


def test_forged_file_handle_does_not_open_the_host_root(box: Box) -> None:
    """open_by_handle_at with inode 2 through a bind of the host's file system (the skeleton borrows /usr)."""
    ro = box.host_dir("lonely-boundary-handle-")
    try:
        run = box.run(
            """
            assert not os.path.exists("/" + C["hidden"]), "the chosen rootfs should hide it"
            check(record_property, bp.open_by_forged_handle(C["dirs"], C["hidden"]))
            """,
            mark=f"rootfs={str(box.skeleton)!r}",
            constants={"dirs": [str(ro), "/usr", "."], "hidden": HOST_ONLY},
            pythonpath=ro,
        )
        run.assert_passed()
    finally:
        shutil.rmtree(ro)


def test_no_socket_of_ours_takes_orders_from_the_container(root_box: Box) -> None:
    """Every socket the container holds is asked, as 0.1's root helper once was, to create a host file.

    The zygote's and the keeper's sockets are held by ``/dev/null`` before any
    test code runs: nothing of ours that acts as root listens inside.
    """
    target_dir = root_box.host_dir("lonely-boundary-helper-")
    targets = {which: str(target_dir / unique(f"created-by-helper-{which}")) for which in WHICHES}
    try:
        run = root_box.run(
            "check(record_property, bp.inherited_sockets(C['targets'][WHICH]))",
            constants={"targets": targets},
        )
        appeared = sorted(os.listdir(target_dir))
        assert not appeared, f"a socket of ours created {appeared} in {target_dir} on the host\n{run.explain()}"
        run.assert_passed()
    finally:
        shutil.rmtree(target_dir)


def test_host_network_config_is_out_of_reach(box: Box) -> None:
    """With the default network=True the container shares the host's lo: it must not change it."""
    addresses = PROBE_ADDRESSES.values()
    if any(lo_has(a) for a in addresses):
        pytest.skip(f"one of {list(addresses)} is already on the host's lo; not touching it")
    try:
        run = box.run(
            "check(record_property, bp.host_lo_address(C['addrs'][WHICH]))", constants={"addrs": PROBE_ADDRESSES}
        )
        appeared = [a for a in addresses if lo_has(a)]
        assert not appeared, f"{appeared} appeared on the host's lo\n{run.explain()}"
        run.assert_passed()
    finally:
        for address in addresses:
            if lo_has(address):
                subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=True)


def test_no_cgroup_appears_at_a_host_hierarchy_root(box: Box) -> None:
    names = {which: unique(f"lonely-boundary-cg-{which}") for which in WHICHES}
    try:
        run = box.run("check(record_property, bp.cgroup_mkdir(C['names'][WHICH]))", constants={"names": names})
        made = [os.path.join(r, n) for r in CGROUP_ROOTS for n in names.values() if os.path.isdir(os.path.join(r, n))]
        assert not made, f"cgroups appeared on the host: {made}\n{run.explain()}"
        run.assert_passed()
    finally:
        for root in CGROUP_ROOTS:
            for name in names.values():
                if os.path.isdir(os.path.join(root, name)):
                    os.rmdir(os.path.join(root, name))


def test_clock_capability_is_refused(box: Box) -> None:
    """adjtimex(ADJ_TICK) with an out-of-range tick: EPERM when refused, EINVAL when CAP_SYS_TIME held."""
    run = box.run("check(record_property, bp.adjtimex_tick())")
    run.assert_passed()


def test_no_device_nodes_to_the_kernel_log(box: Box) -> None:
    """mknod c 1 11 (/dev/kmsg) where a test can write: /dev, /tmp, the overlay's /root and /var/tmp, tmp_path."""
    run = box.run(
        "check(record_property, bp.mknod_kmsg(['/dev', '/tmp', '/root', '/var/tmp', str(tmp_path)]))",
    )
    run.assert_passed()


def test_inherits_only_stdio_report_pipe_and_diag_memfd(box: Box) -> None:
    """No socket (the pool's), no namespace fd (the launcher's host PID namespace), no directory, no host file."""
    run = box.run("check(record_property, bp.inherited_fds(STDIO))")
    run.assert_passed()


# --------------------------------------------------------------------------- what must keep working inside


def test_uid_0_and_sethostname(box: Box) -> None:
    run = box.run(
        """
        assert (os.getuid(), os.geteuid(), os.getgid()) == (0, 0, 0)
        socket.sethostname("changed-inside")
        assert socket.gethostname() == "changed-inside"
        """
    )
    run.assert_passed()
    assert socket.gethostname() != "changed-inside"


def test_writes_to_etc_var_root_stay_in_the_overlay(root_box: Box) -> None:
    """Root mode, host view: /etc/passwd, /var and /root are writable inside, and nothing reaches the host."""
    name = unique("lonely-boundary-overlay")
    passwd = read("/etc/passwd")
    paths = [f"/var/{name}", f"/root/{name}", f"/etc/{name}"]
    try:
        run = root_box.run(
            """
            with open("/etc/passwd", "a") as f:
                f.write("lonelyprobe:x:4242:4242::/nonexistent:/bin/false\\n")
            for path in C["paths"]:
                with open(path, "w") as f:
                    f.write("inside")
            assert "lonelyprobe" in open("/etc/passwd").read()
            """,
            constants={"paths": paths},
        )
        run.assert_passed()
        assert read("/etc/passwd") == passwd, "/etc/passwd changed on the host"
        assert not [p for p in paths if os.path.lexists(p)], "files written inside appeared on the host"
    finally:
        for path in paths:
            if os.path.lexists(path):
                os.unlink(path)
        if read("/etc/passwd") != passwd:
            write("/etc/passwd", passwd)


def test_chown_to_any_uid(root_box: Box) -> None:
    """Root inside maps to every host uid: chown to 4242 (rootless maps only uid 0, so root mode only)."""
    run = root_box.run(
        """
        path = tmp_path / "owned"
        path.write_text("x")
        os.chown(path, 4242, 4343)
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (4242, 4343)
        os.chown("/etc/hostname" if os.path.exists("/etc/hostname") else "/etc/passwd", 4242, 4242)
        """
    )
    run.assert_passed()


def test_port_80_in_a_private_network(box: Box) -> None:
    run = box.run("bp.bind_low_port(80)", mark="network=False")
    run.assert_passed()


def test_ip_and_iptables_in_a_private_network(box: Box) -> None:
    run = box.run(
        """
        bp.run("ip", "addr", "add", "10.77.0.1/24", "dev", "lo")
        assert "10.77.0.1/24" in bp.run("ip", "-o", "addr", "show", "dev", "lo")
        bp.run("ip", "link", "set", "dev", "lo", "mtu", "9000")
        if bp.shutil_which("iptables"):
            bp.run("iptables", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT")
            assert "-A INPUT -i lo -j ACCEPT" in bp.run("iptables", "-S")
        """,
        mark="network=False",
    )
    run.assert_passed()
    assert not lo_has("10.77.0.1")


def test_tmpfs_mount_inside(box: Box) -> None:
    run = box.run("bp.mount_tmpfs()")
    run.assert_passed()


def test_nested_pid_namespace_with_its_own_proc(box: Box) -> None:
    if not shutil.which("unshare"):
        pytest.skip("util-linux unshare is missing")
    run = box.run('assert bp.nested_pid_namespace_proc() == "1"')
    run.assert_passed()


def test_daemons_setsid_and_signals(box: Box) -> None:
    run = box.run(
        """
        import signal
        import subprocess
        import time

        daemon = subprocess.Popen(["sleep", "600"], start_new_session=True)
        try:
            assert os.getsid(daemon.pid) == daemon.pid
            os.kill(daemon.pid, signal.SIGSTOP)
            os.kill(daemon.pid, signal.SIGCONT)
            got = []
            signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
            child = subprocess.Popen(["sh", "-c", "kill -USR1 1"])
            child.wait(timeout=10)
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)
            assert got, "PID 1 did not get SIGUSR1 from its own child"
        finally:
            os.kill(daemon.pid, signal.SIGTERM)
            assert daemon.wait(timeout=10) == -signal.SIGTERM
        """
    )
    run.assert_passed()


# --------------------------------------------------------------------------- the escape hatch: privileged=True


PRIVILEGED_BODY = """
probe = bp.adjtimex_tick()
record_property("log", probe.report())
assert probe.breaches, "privileged=True should hold CAP_SYS_TIME (host root):\\n" + probe.report()
with open(C["etc"], "w") as f:
    f.write("inside")
"""


def _privileged(root_box: Box, **how: object) -> None:
    etc = f"/etc/{unique('lonely-boundary-privileged')}"
    try:
        run = root_box.run(PRIVILEGED_BODY, constants={"etc": etc}, **how)  # type: ignore[arg-type]
        assert "Unknown config option" not in run.output, run.output
        run.assert_passed()
        assert not os.path.lexists(etc), "privileged=True must still catch file writes in the overlay"
    finally:
        if os.path.lexists(etc):
            os.unlink(etc)


def test_privileged_marker_gives_host_root_back(root_box: Box) -> None:
    _privileged(root_box, mark="privileged=True")


def test_privileged_command_line_option(root_box: Box) -> None:
    _privileged(root_box, args=("--lonely-privileged",))


def test_privileged_ini_option(root_box: Box) -> None:
    _privileged(root_box, ini="lonely_privileged = true\n")


def test_privileged_binds_a_low_port_on_the_host_network(root_box: Box) -> None:
    """In the host's network namespace a port below net.ipv4.ip_unprivileged_port_start needs privileged=True.

    The host's network namespace belongs to the initial user namespace, so
    root in the container's user namespace lacks CAP_NET_BIND_SERVICE there.
    """
    start = int(read("/proc/sys/net/ipv4/ip_unprivileged_port_start"))
    port = next((p for p in (80, 81, 82, 83) if p < start and _free(p)), None)
    if port is None:
        pytest.skip(f"no free port below ip_unprivileged_port_start={start}")
    run = root_box.run(
        """
        try:
            bp.bind_low_port(C["port"])
        except PermissionError:
            pass
        else:
            raise AssertionError("an unprivileged container bound a low port in the host's network namespace")
        """,
        constants={"port": port},
        twice=False,
        extra=f"""

        @pytest.mark.isolated(privileged=True)
        def test_privileged():
            bp.bind_low_port({port})
        """,
    )
    run.assert_passed("test_from_pytest", "test_privileged")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_privileged_is_an_error_rootless(rootless_box: Box) -> None:
    run = rootless_box.run(
        "pass",
        mark="privileged=True",
        extra="""

        @pytest.mark.isolated
        def test_unprivileged_still_runs():
            pass
        """,
    )
    case = run.cases.get("test_from_pytest")
    assert case is not None, run.explain()
    assert case.outcome in ("error", "failed"), run.explain()
    assert "privileged" in case.message, case.message
    assert "rootless" in case.message, case.message
    run.assert_passed("test_unprivileged_still_runs")


def test_probe_helpers_are_importable_standalone() -> None:
    """boundary_probes.py is copied into inner projects: it must import with nothing of the suite around."""
    out = subprocess.run(
        [sys.executable, "-c", "import boundary_probes"], cwd=HERE, capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
