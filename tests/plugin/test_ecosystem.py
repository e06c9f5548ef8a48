"""pytest-lonely composed with the rest of the ecosystem (issue 6).

xdist, pytest-cov, pytest-timeout, pytest-rerunfailures, --pdb, our own
hooks, the private network, --lonely-all, and refusing rival plugins.  Every
inner session is a real pytest subprocess over real namespaces.  Writes made
inside a container never reach the host, so what an inner test knows leaves
it through ordinary channels: reports, junitxml properties, -s output, or a
file written by the PARENT (conftest hooks and broader-scoped fixtures run
there).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.host import FIXTURE_ROOTFS
from helpers.inner import RunLonely, requires_plugin, unique_sleeps
from helpers.terminal import in_a_terminal

needs_xdist = requires_plugin("pytest-xdist", "xdist")
needs_cov = requires_plugin("pytest-cov", "pytest_cov")
needs_timeout = requires_plugin("pytest-timeout", "pytest_timeout")
needs_reruns = requires_plugin("pytest-rerunfailures", "pytest_rerunfailures")


HEX12 = r"[0-9a-f]{12}"


def junit_outcomes(path: Path) -> set[tuple[str, str]]:
    """(nodeid-ish, outcome) for every testcase; a case with both failure and error keeps both."""
    found = set()
    for case in ET.parse(path).getroot().iter("testcase"):
        kinds = sorted({child.tag for child in case} & {"failure", "error", "skipped"})
        found.add((f"{case.get('classname')}::{case.get('name')}", "+".join(kinds) or "passed"))
    return found


def junit_properties(path: Path, name: str) -> dict[str, str]:
    """testcase name -> value of one record_property."""
    found = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        for prop in case.iter("property"):
            if prop.get("name") == name:
                found[str(case.get("name"))] = str(prop.get("value"))
    return found


def pack_fixture_rootfs(dest: Path) -> Path:
    with tarfile.open(dest, "w") as tar:
        tar.add(FIXTURE_ROOTFS, arcname=".")
    return dest


def no_process_matching(pattern: str, within: float = 5.0) -> bool:
    """True once no process's command line matches; polls briefly because SIGKILL delivery is asynchronous."""
    deadline = time.monotonic() + within
    while True:
        if subprocess.run(["pgrep", "-f", pattern], check=False, capture_output=True).returncode == 1:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------------
# 1. pytest-xdist
# --------------------------------------------------------------------------------------------------

# Runs in each pytest process (controller and xdist workers alike), never in a container: it logs every
# call of archive.unpack with whether that call did the extraction, to a host file named by the env.
XDIST_CONFTEST = """
import os

import pytest_lonely.sandbox.archive as archive

_real_unpack = archive.unpack


def _logged_unpack(tarball, cache_root, **kwargs):
    dest, extracted = _real_unpack(tarball, cache_root, **kwargs)
    with open(os.environ["LONELY_UNPACK_LOG"], "a") as log:
        log.write(f"{os.environ.get('PYTEST_XDIST_WORKER', 'serial')} {int(extracted)}\\n")
    return dest, extracted


archive.unpack = _logged_unpack
"""

XDIST_IDENTITY = """
import os
import socket

import pytest


@pytest.mark.isolated
def test_pid1(container):
    assert os.getpid() == 1
    assert socket.gethostname() == container.hostname == container.id


@pytest.mark.isolated(hostname="xdist-box")
def test_hostname():
    assert socket.gethostname() == "xdist-box"


@pytest.mark.isolated
def test_fails_on_purpose():
    assert os.getpid() == 0


@pytest.mark.isolated
def test_skips_inside():
    pytest.skip("skipped inside the container")


@pytest.mark.isolated
@pytest.mark.skipif(True, reason="skipped by marker")
def test_skipped_by_marker():
    raise AssertionError("never runs")


def test_plain():
    assert os.getpid() != 1


def test_plain_container_fixture(container):
    assert os.getpid() == 1
"""

# Every other item uses the tarball, so each worker's first batch of --dist load contains some.
XDIST_TARBALL = """
import os

import pytest

TAR = pytest.mark.isolated(rootfs="rootfs.tar")


PARAMS = [pytest.param(n, marks=TAR, id=f"tar{n}") if n % 2 == 0 else pytest.param(n, id=f"odd{n}") for n in range(16)]


@pytest.mark.parametrize("n", PARAMS)
def test_spread(n, record_property):
    record_property("worker", os.environ.get("PYTEST_XDIST_WORKER", "serial"))
    if n % 2 == 0:
        assert os.getpid() == 1
        with open("/etc/os-release") as f:
            assert "ID=lonely" in f.read()
    else:
        assert os.getpid() != 1
"""


@needs_xdist
def test_xdist_same_outcomes_as_serial_and_tarball_unpacked_once(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """-n 2 must report exactly what a serial run reports, and the workers must share one unpacked tarball."""
    pack_fixture_rootfs(pytester.path / "rootfs.tar")
    pytester.makeconftest(XDIST_CONFTEST)
    pytester.makepyfile(test_identity=XDIST_IDENTITY, test_tarball=XDIST_TARBALL)

    runs = {}
    for name, extra in (("serial", ()), ("xdist", ("-n", "2", "--dist", "load"))):
        cache = tmp_path / f"cache-{name}"
        log = tmp_path / f"unpack-{name}.log"
        monkeypatch.setenv("PYTEST_LONELY_CACHE_DIR", str(cache))
        monkeypatch.setenv("LONELY_UNPACK_LOG", str(log))
        xml = tmp_path / f"junit-{name}.xml"
        result = run_lonely(*extra, f"--junitxml={xml}", "-o", "junit_family=xunit1", "-rA", timeout=90)
        result.assert_outcomes(passed=20, failed=1, skipped=2)
        result.stdout.no_fnmatch_line("*INTERNALERROR*")
        runs[name] = (result, cache, log, xml)

    serial, xdist = junit_outcomes(runs["serial"][3]), junit_outcomes(runs["xdist"][3])
    assert xdist == serial
    assert ("test_identity::test_fails_on_purpose", "failure") in serial
    assert ("test_identity::test_skips_inside", "skipped") in serial

    # Both workers ran tarball tests ...
    workers = junit_properties(runs["xdist"][3], "worker")
    tar_workers = {w for test, w in workers.items() if "[tar" in test}
    assert tar_workers == {"gw0", "gw1"}, workers
    # ... each asked for the tree once, and exactly one of them extracted it.
    calls = sorted(line.split() for line in runs["xdist"][2].read_text().splitlines())
    assert [w for w, _ in calls] == ["gw0", "gw1"], calls
    assert sum(int(did) for _, did in calls) == 1, calls
    # The cache holds one complete tree and no half-built temp directory.
    cache = runs["xdist"][1]
    trees = [p for p in cache.iterdir() if p.is_dir()]
    assert len(trees) == 1, sorted(p.name for p in cache.iterdir())
    assert not trees[0].name.startswith("."), trees
    assert not [p.name for p in cache.iterdir() if ".tmp" in p.name], sorted(p.name for p in cache.iterdir())
    assert "ID=lonely" in (trees[0] / "etc" / "os-release").read_text()


@needs_xdist
def test_xdist_n_auto(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    pytester.makepyfile(
        """
        import os

        import pytest


        @pytest.mark.isolated
        @pytest.mark.parametrize("n", range(4))
        def test_isolated(n):
            assert os.getpid() == 1


        @pytest.mark.parametrize("n", range(4))
        def test_plain(n):
            assert os.getpid() != 1
        """
    )
    result = run_lonely("-n", "auto", timeout=90)
    assert result.ret == 0, result.stdout.str()
    result.assert_outcomes(passed=8)


# --------------------------------------------------------------------------------------------------
# 2. pytest-cov
# --------------------------------------------------------------------------------------------------

COV_PACKAGE = """
def classify(n):
    if n < 0:
        return "negative"
    if n == 0:
        return "zero"
    return "positive"


def clamp(n, high):
    if n > high:
        n = high
    return n


def never_called(x):
    y = x * 2
    return y
"""

COV_TESTS = """
import os

import pkg.calc as calc


def test_where():
    assert (os.getpid() == 1) == (os.environ["EXPECT_ISOLATED"] == "1")


def test_classify():
    assert calc.classify(-3) == "negative"
    assert calc.classify(4) == "positive"


def test_clamp():
    assert calc.clamp(9, 5) == 5
"""


def coverage_rows(result: pytest.RunResult) -> list[str]:
    """The pkg/... and TOTAL rows of a term-missing report, whitespace-normalised."""
    rows = [" ".join(line.split()) for line in result.stdout.lines if line.startswith(("pkg", "TOTAL"))]
    assert rows, result.stdout.str()
    return rows


def total_percent(rows: list[str]) -> int:
    match = re.search(r"(\d+)%", next(r for r in rows if r.startswith("TOTAL")))
    assert match, rows
    return int(match.group(1))


@needs_cov
def test_coverage_same_with_and_without_isolation(
    pytester: pytest.Pytester, run_lonely: RunLonely, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lines run inside containers must reach pytest-cov: serial, with --cov-branch, and under xdist."""
    pytester.mkpydir("pkg")
    (pytester.path / "pkg" / "calc.py").write_text(COV_PACKAGE.lstrip("\n"))
    pytester.makepyfile(test_cov=COV_TESTS)
    cov = ("--cov=pkg", "--cov-report=term-missing")

    def run(*args: str, isolated: bool) -> list[str]:
        monkeypatch.setenv("EXPECT_ISOLATED", "1" if isolated else "0")
        result = run_lonely(*cov, *args, *(("--lonely-all",) if isolated else ()), timeout=90)
        result.assert_outcomes(passed=3)
        if isolated:
            result.stdout.fnmatch_lines(["lonely: *isolating all tests*"])
        return coverage_rows(result)

    plain = run(isolated=False)
    isolated = run(isolated=True)
    assert isolated == plain
    assert total_percent(isolated) >= total_percent(plain)
    # The functions only the containers ran are covered: just the untaken return and the unused function miss.
    calc_row = next(r for r in isolated if r.startswith("pkg/calc.py"))
    assert calc_row.endswith("% 5, 16-17"), calc_row

    plain_branch = run("--cov-branch", isolated=False)
    isolated_branch = run("--cov-branch", isolated=True)
    assert isolated_branch == plain_branch
    assert total_percent(isolated_branch) >= total_percent(plain_branch)
    calc_branch = next(r for r in isolated_branch if r.startswith("pkg/calc.py"))
    assert calc_branch.endswith("% 5, 10->12, 16-17"), calc_branch

    xdist = run("-n", "2", isolated=True)
    assert xdist == plain


# --------------------------------------------------------------------------------------------------
# 3. Our hooks
# --------------------------------------------------------------------------------------------------

HOOKS_CONFTEST = """
import os
import subprocess

import pytest

SESSION_PID = os.getpid()


def pytest_lonely_setup_container(container, item):
    assert os.getpid() == 1, f"setup hook ran as pid {os.getpid()}"
    if item.name == "test_hook_raises":
        raise RuntimeError(f"the hook refuses container {container.id}")
    with open("/etc/from-hook", "w") as f:
        f.write(container.id)
    subprocess.Popen(["sleep", "654.321"])


def pytest_lonely_container_finished(item, container, exitstatus):
    try:
        os.kill(container.host_pid, 0)
        pid_state = "alive"
    except ProcessLookupError:
        pid_state = "gone"
    in_parent = os.getpid() == SESSION_PID and os.getpid() != 1
    print(
        f"\\nFINISHED {item.name} {container.id} {exitstatus} {pid_state} "
        f"host_pid={container.host_pid} in_parent={in_parent}",
        flush=True,
    )


@pytest.fixture
def seen_in_setup():
    with open("/etc/from-hook") as f:
        return f.read()
"""

HOOKS_SETUP_TESTS = """
import os
import time

import pytest


def commands():
    # pid, state and command line of every process in this container's PID namespace
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\\0", b" ").decode()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            found.append(f"{pid} {state} {cmdline}")
    return found


def test_sees_hook(container, seen_in_setup):
    print(f"\\nSAW test_sees_hook {container.id}", flush=True)
    assert seen_in_setup == container.id
    # Popen (vfork) returns while the child may still be inside execve, its cmdline momentarily empty.
    deadline = time.monotonic() + 10
    while not any("sleep 654.321" in c for c in commands()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert any("sleep 654.321" in c for c in commands()), commands()


@pytest.mark.isolated(hostname="second")
def test_sees_hook_again(container):
    with open("/etc/from-hook") as f:
        assert f.read() == container.id


def test_plain_not_isolated():
    assert os.getpid() != 1
    assert not os.path.exists("/etc/from-hook")
"""

HOOKS_ERROR_TESTS = """
import pytest


@pytest.mark.isolated
def test_hook_raises():
    raise AssertionError("the test must not run when the hook failed")


@pytest.mark.isolated
def test_after_passes():
    pass
"""

HOOKS_FINISHED_TESTS = """
import ctypes
import os
import time

import pytest


def test_normal(container):
    print(f"\\nSAW test_normal {container.id}", flush=True)


@pytest.mark.isolated(timeout=1)
def test_killed(container):
    print(f"\\nSAW test_killed {container.id}", flush=True)
    time.sleep(30)


def test_segfault(container):
    print(f"\\nSAW test_segfault {container.id}", flush=True)
    ctypes.string_at(0)


def test_exit7(container):
    print(f"\\nSAW test_exit7 {container.id}", flush=True)
    os._exit(7)


def test_plain():
    pass
"""

FINISHED_LINE = re.compile(
    rf"^FINISHED (\w+) ({HEX12}) (-?\d+|None) (\w+) host_pid=(\d+) in_parent=(\w+)$", re.MULTILINE
)


def test_setup_container_hook(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """The hook runs as PID 1 before the test's own setup; its file and process stay in the container."""
    assert not os.path.exists("/etc/from-hook"), "a previous run leaked /etc/from-hook onto the host"
    pytester.makeconftest(unique_sleeps(HOOKS_CONFTEST))
    pytester.makepyfile(test_hooks=HOOKS_SETUP_TESTS)
    result = run_lonely("-s", "-rA", timeout=60)
    result.assert_outcomes(passed=3)
    # The hook's own asserts (pid 1) would have turned into setup errors.
    assert len(FINISHED_LINE.findall(result.stdout.str())) == 2
    assert not os.path.exists("/etc/from-hook")
    assert no_process_matching(unique_sleeps("sleep 654.321")), "the hook's background process outlived its container"


def test_setup_container_hook_error_is_a_setup_error(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """An exception in the hook is that test's setup ERROR, nothing more; the other tests are unaffected."""
    pytester.makeconftest(unique_sleeps(HOOKS_CONFTEST))
    pytester.makepyfile(test_hooks=HOOKS_ERROR_TESTS)
    result = run_lonely("-s", "-rA", timeout=60)
    result.stdout.fnmatch_lines(
        ["*ERROR at setup of test_hook_raises*", "E   *RuntimeError: the hook refuses container *"]
    )
    result.stdout.no_fnmatch_line("*the test must not run*")
    result.stdout.no_fnmatch_line("*INTERNALERROR*")
    finished = FINISHED_LINE.findall(result.stdout.str())
    hook_error_id = re.search(rf"the hook refuses container ({HEX12})", result.stdout.str())
    assert hook_error_id
    assert [(f[0], f[1]) for f in finished] == [
        ("test_hook_raises", hook_error_id.group(1)),
        ("test_after_passes", finished[1][1]),
    ]
    result.assert_outcomes(passed=1, errors=1)


def test_container_finished_hook(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """Called in the parent after the container is reaped, once per isolated test, with its exit status."""
    pytester.makeconftest(unique_sleeps(HOOKS_CONFTEST))
    pytester.makepyfile(test_hooks=HOOKS_FINISHED_TESTS)
    result = run_lonely("-s", "-rA", timeout=60)
    out = result.stdout.str()
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.no_fnmatch_line("*INTERNALERROR*")

    seen = dict(re.findall(rf"^SAW (\w+) ({HEX12})$", out, re.MULTILINE))
    finished = FINISHED_LINE.findall(out)
    assert [f[0] for f in finished] == ["test_normal", "test_killed", "test_segfault", "test_exit7"], out
    assert set(seen) == {f[0] for f in finished}
    for name, cid, _, pid_state, host_pid, in_parent in finished:
        assert in_parent == "True", name
        assert seen[name] == cid, name
        assert int(host_pid) > 1, name
        assert pid_state == "gone", f"{name}: host pid {host_pid} still existed when the hook ran"
    statuses = {name: status for name, _, status, *_ in finished}
    assert statuses == {"test_normal": "0", "test_killed": "-9", "test_segfault": "-11", "test_exit7": "7"}


# --------------------------------------------------------------------------------------------------
# 4 + 5. Private network, --lonely-all
# --------------------------------------------------------------------------------------------------

NET_CONFTEST = """
import os
import socketserver
import threading

import pytest


class Hello(socketserver.StreamRequestHandler):
    def handle(self):
        self.wfile.write(f"hello from {os.getpid()}".encode())


@pytest.fixture(scope="session")
def parent_server():
    server = socketserver.TCPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], os.getpid()
    server.shutdown()
    server.server_close()
"""

NET_TESTS = """
import errno
import os
import socket

import pytest

HOST_PORT = int(os.environ["LONELY_HOST_PORT"])


def interfaces():
    return sorted(name for _, name in socket.if_nameindex())


def loopback_roundtrip():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"ping")
                assert client.recv(4) == b"ping"


@pytest.mark.isolated(network=False)
def test_only_lo_and_it_is_up(container):
    assert "net" in container.namespaces
    assert interfaces() == ["lo"]
    loopback_roundtrip()


@pytest.mark.isolated(network=False)
@pytest.mark.parametrize("n", [1, 2])
def test_bind_port_the_host_holds(n):
    with socket.create_server(("127.0.0.1", HOST_PORT)) as server:
        with socket.create_connection(("127.0.0.1", HOST_PORT), timeout=5):
            conn, _ = server.accept()
            conn.close()


@pytest.mark.isolated(network=False)
def test_no_route_out():
    with socket.socket() as s:
        s.settimeout(5)
        with pytest.raises(OSError) as excinfo:
            s.connect(("10.255.255.1", 9))
    assert excinfo.value.errno == errno.ENETUNREACH, excinfo.value


@pytest.mark.isolated
def test_default_shares_host_network(container, parent_server):
    port, parent_pid = parent_server
    assert "net" not in container.namespaces
    assert os.getpid() == 1
    assert interfaces() == sorted(os.environ["LONELY_HOST_IFACES"].split(","))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        assert client.recv(100) == f"hello from {parent_pid}".encode()
    with pytest.raises(OSError) as excinfo:
        socket.create_server(("127.0.0.1", HOST_PORT))
    assert excinfo.value.errno == errno.EADDRINUSE
"""

# Under --lonely-all plus network none from the CLI or the ini.
NET_DEFAULT_TESTS = """
import os
import socket

import pytest


def interfaces():
    return sorted(name for _, name in socket.if_nameindex())


def test_unmarked(container):
    assert os.getpid() == 1
    assert "net" in container.namespaces
    assert interfaces() == ["lo"]


def test_unmarked_without_fixture():
    assert os.getpid() == 1
    assert interfaces() == ["lo"]


@pytest.mark.isolated(network=True)
def test_marker_overrides(container):
    assert "net" not in container.namespaces
    assert interfaces() == sorted(os.environ["LONELY_HOST_IFACES"].split(","))
"""


@pytest.fixture
def host_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Hold a listening socket on the host's 127.0.0.1 for the whole test, and tell the inner tests about it."""
    holder = socket.create_server(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    monkeypatch.setenv("LONELY_HOST_PORT", str(port))
    monkeypatch.setenv("LONELY_HOST_IFACES", ",".join(name for _, name in socket.if_nameindex()))
    yield port
    holder.close()


def test_private_network(pytester: pytest.Pytester, run_lonely: RunLonely, host_port: int) -> None:
    """network=False: only lo, up, ports independent of the host's, no route out; default: the host's network."""
    assert len(socket.if_nameindex()) > 1, "the host has only lo: cannot tell the namespaces apart"
    pytester.makeconftest(NET_CONFTEST)
    pytester.makepyfile(test_net=NET_TESTS)
    result = run_lonely("-rA", timeout=60)
    result.assert_outcomes(passed=5)
    # The host's socket is still there and still ours.
    with pytest.raises(OSError, match="Address already in use"):
        socket.create_server(("127.0.0.1", host_port))


@pytest.mark.parametrize("where", ["cli", "ini"])
def test_network_none_and_lonely_all(
    pytester: pytest.Pytester, run_lonely: RunLonely, host_port: int, where: str
) -> None:
    """--lonely-network=none / lonely_network=none with --lonely-all / lonely_all: every test isolated, no network."""
    pytester.makepyfile(test_defaults=NET_DEFAULT_TESTS)
    if where == "cli":
        result = run_lonely("--lonely-network=none", "--lonely-all", "-rA", timeout=60)
    else:
        pytester.makeini("[pytest]\nlonely_network = none\nlonely_all = true\n")
        result = run_lonely("-rA", timeout=60)
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["lonely: *mode, namespaces *pid,mnt,uts,ipc,net, *, isolating all tests"])


# --------------------------------------------------------------------------------------------------
# 6. pytest-timeout
# --------------------------------------------------------------------------------------------------


@needs_timeout
def test_pytest_timeout_signal_method(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """pytest-timeout's alarm fires in the parent: a plain failure, and the container's daemon dies with it."""
    pytester.makepyfile(
        unique_sleeps(
            """
        import os
        import subprocess
        import time

        import pytest


        @pytest.mark.isolated
        def test_hangs():
            subprocess.Popen(["setsid", "sleep", "987.4321"])
            time.sleep(30)


        @pytest.mark.isolated
        def test_next_isolated():
            assert os.getpid() == 1


        def test_next_plain():
            assert os.getpid() != 1
        """
        )
    )
    try:
        result = run_lonely("--timeout", "1", "--timeout-method", "signal", "-rA", timeout=60)
        result.assert_outcomes(passed=2, failed=1)
        # pytest-timeout's own message, not ours ("Timeout: the test timed out after ...").
        result.stdout.fnmatch_lines(["Timeout (>1.0s) from pytest-timeout."])
        result.stdout.fnmatch_lines(["FAILED *::test_hangs - Failed: Timeout (>1*"])
        result.stdout.no_fnmatch_line("*INTERNALERROR*")
        assert no_process_matching(unique_sleeps("987.4321")), "the daemon started in the container outlived it"
    finally:  # only if the assertion above failed: kill the leaked daemon by its pid
        leaked = subprocess.run(
            ["pgrep", "-f", unique_sleeps("^sleep 987.4321$")], check=False, capture_output=True, text=True
        )
        for pid in leaked.stdout.split():
            os.kill(int(pid), 9)


# --------------------------------------------------------------------------------------------------
# 7. pytest-rerunfailures
# --------------------------------------------------------------------------------------------------

RERUN_CONFTEST = """
import pytest

FINISHED = []


@pytest.fixture(scope="session")
def attempts():
    return FINISHED


def pytest_lonely_container_finished(item, container, exitstatus):
    FINISHED.append((item.name, container.id))
    print(f"\\nFINISHED {item.name} {container.id} {exitstatus}", flush=True)
"""

RERUN_TESTS = """
import pytest


@pytest.mark.isolated
def test_flaky(attempts, container):
    print(f"\\nATTEMPT test_flaky {container.id}", flush=True)
    assert len([a for a in attempts if a[0] == "test_flaky"]) >= 2


@pytest.mark.isolated
def test_always_fails(container):
    print(f"\\nATTEMPT test_always_fails {container.id}", flush=True)
    assert False
"""


@needs_reruns
def test_reruns_each_in_a_fresh_container(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """--reruns: each attempt gets a new container; state only passes through the parent (a session fixture)."""
    pytester.makeconftest(RERUN_CONFTEST)
    pytester.makepyfile(test_rerun=RERUN_TESTS)
    result = run_lonely("-s", "--reruns", "2", "-rA", timeout=60)
    assert result.parseoutcomes() == {"passed": 1, "failed": 1, "rerun": 4}, result.stdout.str()
    out = result.stdout.str()
    for name in ("test_flaky", "test_always_fails"):
        attempts = re.findall(rf"^ATTEMPT {name} ({HEX12})$", out, re.MULTILINE)
        finished = re.findall(rf"^FINISHED {name} ({HEX12}) 0$", out, re.MULTILINE)
        assert len(attempts) == 3, out
        assert len(set(attempts)) == 3, f"{name}: attempts shared a container: {attempts}"
        assert finished == attempts


# --------------------------------------------------------------------------------------------------
# 8. Rival plugins
# --------------------------------------------------------------------------------------------------

RIVAL_TEST = """
def test_nothing():
    pass
"""


def test_refuses_a_plugin_named_isolated(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """Simulated pytest-isolated: a local module named `isolated`, loaded with -p (the name is what matters)."""
    pytester.makepyfile(isolated="def pytest_configure(config):\n    pass\n", test_rival=RIVAL_TEST)
    result = run_lonely("-p", "isolated", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-lonely and pytest-isolated are both loaded*-p no:isolated or -p no:lonely*"])


def test_refuses_isolated_registered_in_conftest_configure(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """Our check runs trylast in pytest_configure, so even a registration from a conftest's configure is caught."""
    pytester.makeconftest(
        """
        def pytest_configure(config):
            config.pluginmanager.register(object(), "isolated")
        """
    )
    pytester.makepyfile(test_rival=RIVAL_TEST)
    result = run_lonely(timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-lonely and pytest-isolated are both loaded*"])


def test_refuses_forked(pytester: pytest.Pytester, run_lonely: RunLonely) -> None:
    """The real pytest-forked (installed): loaded is fine, --forked is refused."""
    pytest.importorskip("pytest_forked")
    pytester.makepyfile(test_rival=RIVAL_TEST)
    result = run_lonely("-p", "pytest_forked", "--forked", timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--forked (pytest-forked) and pytest-lonely both run tests in a child process*"])
    ok = run_lonely("-p", "pytest_forked", timeout=60)
    ok.assert_outcomes(passed=1)


# --------------------------------------------------------------------------------------------------
# 9. --pdb
# --------------------------------------------------------------------------------------------------


def test_pdb_inside_the_container(pytester: pytest.Pytester) -> None:
    """--pdb -s on an isolated failure: the debugger runs in the container (pid 1) and reads our stdin."""
    pytester.makepyfile(
        """
        import os

        import pytest


        @pytest.mark.isolated
        def test_fails():
            assert os.getpid() == 0
        """
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", "-s", "--pdb"],
        check=False,
        cwd=pytester.path,
        input="p 6*7\np 'pid', os.getpid()\ncontinue\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert re.search(r"^\(Pdb\) 42$", out, re.MULTILINE), out
    assert re.search(r"^\(Pdb\) \('pid', 1\)$", out, re.MULTILINE), out
    assert re.search(r"=+ 1 failed in ", out), out


def test_pdb_reads_the_real_terminal_inside_the_container(pytester: pytest.Pytester) -> None:
    """With a terminal: the container is a process group of its own, so pytest lends it the terminal.

    Without that, reading from the terminal in a background process group stops
    the reader (SIGTTIN) and the debugger would hang.
    """
    pytester.makepyfile(
        """
        import os
        import pytest

        @pytest.mark.isolated
        def test_fails():
            assert os.getpid() == 0
        """
    )
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "lonely",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:randomly",
        "-s",
        "--pdb",
    ]
    status, out = in_a_terminal(
        pytester.path, argv, [(b"(Pdb) ", b"p 6*7\n"), (b"(Pdb) ", b"p os.getpid()\n"), (b"(Pdb) ", b"c\n")]
    )
    assert status == 1, out
    assert "42" in out, out
    assert re.search(r"[(<]Pdb\) p os.getpid\(\)\r?\n1\r?\n", out), out
    assert re.search(r"=+ 1 failed in ", out), out


def test_ctrl_c_in_the_terminal_interrupts_the_test_inside(pytester: pytest.Pytester) -> None:
    """Ctrl-C reaches pytest's process group; pytest hands it on, and the test's own traceback is shown."""
    pytester.makepyfile(
        """
        import time
        import pytest

        @pytest.mark.isolated
        def test_waits():
            print("WAITING", flush=True)
            time.sleep(60)

        def test_never_runs():
            pass
        """
    )
    argv = [sys.executable, "-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", "-p", "no:randomly", "-s"]
    status, out = in_a_terminal(pytester.path, argv, [(b"WAITING", b"\x03")])
    assert status == pytest.ExitCode.INTERRUPTED, out
    assert "interrupted in its container" in out, out
    # The test's own line: the sleep, or the print just before it when Ctrl-C came that fast.
    assert "time.sleep(60)" in out or 'print("WAITING", flush=True)' in out, out
    assert "KeyboardInterrupt" in out, out
