"""Tests of the isolation probe: every diagnosis on made-up inputs, and the real thing on this machine.

The real failure paths are produced without touching the host: a user
namespace whose own ``user.max_user_namespaces`` is 0, a private mount
namespace with a masked ``/proc/keys``, and a seccomp filter in a subprocess.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import host

from pytest_lonely.sandbox import probe as probe_mod
from pytest_lonely.sandbox.probe import STEPS, Availability, detect_container, diagnose, probe, read_sysctls

linux = pytest.mark.skipif(sys.platform != "linux", reason="namespaces need Linux")
root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root")
ROOT = Path(__file__).resolve().parents[2]

APPARMOR_ON = {"kernel.apparmor_restrict_unprivileged_userns": "1", "user.max_user_namespaces": "63000"}
CLONE_OFF = {"kernel.unprivileged_userns_clone": "0", "user.max_user_namespaces": "63000"}
NO_USERNS = {"user.max_user_namespaces": "0"}
PLAIN = {"user.max_user_namespaces": "63000"}

SECCOMP_FLAGS = ("--privileged", "--security-opt seccomp=unconfined", "--security-opt apparmor=unconfined")

# (id, step, errno, rootless, sysctls, in_container, phrases the message must contain)
CASES = [
    ("userns-disabled", "unshare-user", errno.ENOSPC, True, NO_USERNS, False,
     ["unshare-user", "ENOSPC", "user.max_user_namespaces is 0", "sysctl -w user.max_user_namespaces=15000"]),
    ("userns-limit-reached", "unshare-user", errno.ENOSPC, True, PLAIN, False,
     ["unshare-user", "ENOSPC", "limit", "63000", "sysctl -w user.max_user_namespaces=15000"]),
    ("userns-limit-no-sysctl", "unshare-user", errno.ENOSPC, True, {}, True,
     ["ENOSPC", "user.max_user_namespaces", "sysctl -w user.max_user_namespaces=15000"]),
    ("userns-clone-eperm", "unshare-user", errno.EPERM, True, CLONE_OFF, False,
     ["unshare-user", "EPERM", "kernel.unprivileged_userns_clone is 0",
      "sysctl -w kernel.unprivileged_userns_clone=1"]),
    ("userns-clone-einval", "unshare-user", errno.EINVAL, True, CLONE_OFF, True,
     ["EINVAL", "kernel.unprivileged_userns_clone", "sysctl -w kernel.unprivileged_userns_clone=1"]),
    ("userns-seccomp", "unshare-user", errno.EPERM, True, PLAIN, True,
     ["unshare-user", "EPERM", "seccomp", *SECCOMP_FLAGS, "as root"]),
    ("userns-eperm-host", "unshare-user", errno.EPERM, True, PLAIN, False,
     ["unshare-user", "EPERM", "RestrictNamespaces", "as root"]),
    ("userns-einval-no-kernel", "unshare-user", errno.EINVAL, True, PLAIN, False,
     ["unshare-user", "EINVAL", "CONFIG_USER_NS"]),
    ("userns-too-deep", "unshare-user", errno.EUSERS, True, PLAIN, False, ["unshare-user", "EUSERS", "32"]),
    ("apparmor-uid_map", "uid_map", errno.EPERM, True, APPARMOR_ON, False,
     ["uid_map", "EPERM", "AppArmor", "ubuntu-24.04", "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
      "AppArmor profile"]),
    ("apparmor-setgroups", "setgroups", errno.EACCES, True, APPARMOR_ON, False,
     ["setgroups", "EACCES", "kernel.apparmor_restrict_unprivileged_userns=0"]),
    ("apparmor-gid_map", "gid_map", errno.EPERM, True, APPARMOR_ON, True,
     ["gid_map", "EPERM", "kernel.apparmor_restrict_unprivileged_userns=0"]),
    ("idmap-generic", "uid_map", errno.EPERM, True, PLAIN, False, ["uid_map", "EPERM", "Operation not permitted"]),
    ("unshare-seccomp", "unshare", errno.EPERM, True, PLAIN, True, ["unshare", "EPERM", "seccomp", *SECCOMP_FLAGS]),
    ("unshare-seccomp-root", "unshare", errno.EPERM, False, PLAIN, True, ["EPERM", "seccomp", "--privileged"]),
    ("root-no-cap", "unshare", errno.EPERM, False, PLAIN, False, ["unshare", "EPERM", "CAP_SYS_ADMIN", "root"]),
    ("unshare-limit", "unshare", errno.ENOSPC, False, PLAIN, False, ["unshare", "ENOSPC", "user.max_pid_namespaces"]),
    ("unshare-einval", "unshare", errno.EINVAL, False, PLAIN, False, ["unshare", "EINVAL", "CONFIG_PID_NS"]),
    ("chroot", "make-private", errno.EINVAL, False, PLAIN, False, ["make-private", "EINVAL", "chroot"]),
    ("mount-apparmor-container", "make-private", errno.EPERM, False, PLAIN, True,
     ["make-private", "EPERM", "--privileged", "apparmor=unconfined"]),
    ("fork-eagain", "fork", errno.EAGAIN, True, PLAIN, False, ["fork", "EAGAIN", "pids.max", "ulimit -u"]),
    ("masked-proc-docker", "mount-proc", errno.EPERM, True, PLAIN, True,
     ["mount-proc", "EPERM", "/proc", "--privileged", "--security-opt systempaths=unconfined",
      "--security-opt unmask=ALL"]),
    ("masked-proc-root-container", "mount-proc", errno.EPERM, False, PLAIN, True,
     ["mount-proc", "EPERM", "systempaths=unconfined", "unmask=ALL"]),
    ("masked-proc-host", "mount-proc", errno.EPERM, True, PLAIN, False, ["mount-proc", "EPERM", "fully visible"]),
    ("generic", "mount-proc", errno.EBUSY, True, PLAIN, False, ["mount-proc failed with EBUSY (", "busy"]),
]  # fmt: skip


@pytest.mark.parametrize("case", [pytest.param(case[1:], id=case[0]) for case in CASES])
def test_diagnose_names_cause_and_fix(case: tuple[str, int, bool, dict[str, str], bool, list[str]]) -> None:
    step, err, rootless, sysctls, in_container, phrases = case
    message = diagnose(step, err, rootless=rootless, sysctls=sysctls, in_container=in_container)
    for phrase in phrases:
        assert phrase.lower() in message.lower(), f"{phrase!r} missing from {message!r}"


def test_diagnose_apparmor_needs_the_sysctl() -> None:
    """Without the Ubuntu sysctl an ID-map refusal must not be blamed on AppArmor's restriction."""
    message = diagnose("uid_map", errno.EPERM, rootless=True, sysctls=PLAIN, in_container=False)
    assert "apparmor_restrict_unprivileged_userns" not in message
    assert "uid_map failed with EPERM" in message


def test_diagnose_container_hints_only_in_containers() -> None:
    outside = diagnose("unshare-user", errno.EPERM, rootless=True, sysctls=PLAIN, in_container=False)
    assert "--privileged" not in outside


def test_diagnose_platform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    message = diagnose("platform", 0, rootless=True, sysctls={}, in_container=False)
    assert message.startswith("namespaces need Linux; this is Darwin")


@pytest.mark.parametrize("step", [s for s in STEPS if s != "platform"])
@pytest.mark.parametrize(
    "err",
    [errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSPC, errno.ENOMEM, errno.EAGAIN, errno.EBUSY, errno.EUSERS],
)
def test_every_message_names_step_and_errno(step: str, err: int) -> None:
    for rootless in (False, True):
        for in_container in (False, True):
            for sysctls in ({}, PLAIN, NO_USERNS, CLONE_OFF, APPARMOR_ON):
                message = diagnose(step, err, rootless=rootless, sysctls=sysctls, in_container=in_container)
                assert f"{step} failed with {errno.errorcode[err]} (" in message
                assert not message.lower().startswith("isolation unavailable")
                assert message.endswith(".")
                assert len(message) < 500, message
                assert "\n" not in message


def test_read_sysctls_matches_proc() -> None:
    values = read_sysctls()
    assert set(values) <= set(probe_mod.SYSCTLS)
    for name, path in probe_mod.SYSCTLS.items():
        if os.path.exists(path):
            assert values[name] == Path(path).read_text().strip()
        else:
            assert name not in values


def test_detect_container(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("container", "podman")
    assert detect_container() is True
    monkeypatch.delenv("container")
    expected = (
        os.path.exists("/.dockerenv")
        or os.path.exists("/run/.containerenv")
        or any(w in _read("/proc/1/cgroup") for w in ("docker", "podman", "libpod", "lxc", "kubepods"))
    )
    assert detect_container() is expected


def test_probe_off_linux_does_not_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_mod, "_IS_LINUX", False)
    monkeypatch.setattr(platform, "system", lambda: "Darwin")
    monkeypatch.setattr(os, "fork", lambda: pytest.fail("forked off Linux"))
    result = probe(rootless=True)
    assert result == Availability(False, True, result.reason)
    assert result.reason.startswith("namespaces need Linux; this is Darwin")


def test_module_imports_without_linux_only_attributes() -> None:
    """macOS has no os.ST_NODEV, which _syscalls needs: probe must import and answer anyway.

    The file is loaded on its own, so that this checks probe.py and not what the package's __init__ imports.
    """
    script = textwrap.dedent(
        f"""
        import importlib.util, os, platform, sys
        sys.platform = "darwin"
        platform.system = lambda: "Darwin"
        for name in ("ST_NODEV", "ST_NOEXEC", "ST_NOATIME", "ST_NODIRATIME", "ST_RELATIME", "pidfd_open", "unshare"):
            if hasattr(os, name):
                delattr(os, name)
        spec = importlib.util.spec_from_file_location("probe_on_macos", {str(Path(probe_mod.__file__))!r})
        probe = sys.modules["probe_on_macos"] = importlib.util.module_from_spec(spec)  # dataclasses looks it up
        spec.loader.exec_module(probe)
        assert not any(name.endswith("_syscalls") for name in sys.modules)
        print(probe.probe().reason)
        """
    )
    out = _run([sys.executable, "-c", script])
    assert out.startswith("namespaces need Linux; this is Darwin"), out


# --------------------------------------------------------------------------- the real probe


@linux
@root
def test_probe_as_root() -> None:
    assert probe() == Availability(ok=True, rootless=False)


@linux
@root
def test_probe_rootless_as_root() -> None:
    assert probe(rootless=True) == Availability(ok=True, rootless=True)


@linux
@root
def test_probe_as_unprivileged_user() -> None:
    """A real unprivileged user: Debian's python3 (readable by anyone) and a world-readable copy of the package.

    The test's own interpreter may live under a private home directory (pyenv, tox), which uid 65534 cannot run.
    """
    if not shutil.which("setpriv"):
        pytest.skip("setpriv not installed")
    if not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("/usr/bin/python3 is missing")
    base = tempfile.mkdtemp(prefix="lonely-probe-")
    try:
        os.chmod(base, 0o755)
        package = os.path.join(base, "pytest_lonely", "sandbox")
        os.makedirs(package)
        for init in (os.path.dirname(package), package):  # the probe needs only itself and _syscalls
            open(os.path.join(init, "__init__.py"), "w").close()
        for name in ("probe.py", "_syscalls.py", "namespaces.py", "process.py"):
            shutil.copy(ROOT / "pytest_lonely" / "sandbox" / name, package)
        for dirpath, _, files in os.walk(base):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", _PRINT_PROBE]
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env={"PYTHONPATH": base}, timeout=60, check=False, cwd="/"
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "True True \n"
    finally:
        shutil.rmtree(base)


@linux
@root
def test_probe_reports_enospc_from_max_user_namespaces() -> None:
    """A user namespace whose own limit is 0 refuses the nested one, as a host with the sysctl at 0 would."""
    if not shutil.which("unshare"):
        pytest.skip("util-linux unshare not installed")
    shell = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1"'
    script = _PRINT_PROBE.replace("probe()", "probe(rootless=True)")
    out = _run(["unshare", "--user", "--map-root-user", "sh", "-c", shell, sys.executable, script])
    ok, rootless, reason = out.split(" ", 2)
    assert (ok, rootless) == ("False", "True")
    assert "unshare-user failed with ENOSPC" in reason
    assert "user.max_user_namespaces is 0" in reason
    assert "sysctl -w user.max_user_namespaces=15000" in reason


@linux
@root
def test_root_mode_probe_reports_a_user_namespace_it_cannot_make() -> None:
    """Root mode locks mounts in a user namespace per container: a limit of 0 is found by the probe, not by each test.

    Run as root of a user namespace of our own (``unshare --map-root-user``),
    whose own ``user.max_user_namespaces`` is 0, so the host's stays as it is.
    """
    if not shutil.which("unshare"):
        pytest.skip("util-linux unshare not installed")
    shell = 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$0" -c "$1"'
    script = _PRINT_PROBE.replace("probe()", "probe(rootless=False)")
    out = _run(["unshare", "--user", "--map-root-user", "sh", "-c", shell, sys.executable, script])
    ok, rootless, reason = out.split(" ", 2)
    assert (ok, rootless) == ("False", "False")
    assert "lock-user failed with ENOSPC" in reason
    assert "sysctl -w user.max_user_namespaces=15000" in reason


@linux
@root
def test_root_mode_probe_reports_ids_it_cannot_map() -> None:
    """Root whose own user namespace maps one id (root in a rootless container) cannot map every id to itself."""
    if not shutil.which("unshare"):
        pytest.skip("util-linux unshare not installed")
    script = _PRINT_PROBE.replace("probe()", "probe(rootless=False)")
    out = _run(["unshare", "--user", "--map-root-user", sys.executable, "-c", script])
    ok, rootless, reason = out.split(" ", 2)
    assert (ok, rootless) == ("False", "False")
    assert "lock-map failed with EPERM" in reason
    assert "rootless mode" in reason


@linux
@root
def test_probe_reports_masked_proc() -> None:
    """Overmount one /proc file, as Docker does, in a private mount namespace: a user namespace may not mount proc."""
    if not shutil.which("unshare"):
        pytest.skip("util-linux unshare not installed")
    masked = next((p for p in ("/proc/keys", "/proc/timer_list", "/proc/kcore") if os.path.exists(p)), None)
    if masked is None:
        pytest.skip("no /proc file to mask")
    shell = f'mount --bind /dev/null {masked} && exec "$0" -c "$1"'
    script = _PRINT_PROBE.replace("probe()", "probe(rootless=True)")
    out = _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", shell, sys.executable, script])
    ok, rootless, reason = out.split(" ", 2)
    assert (ok, rootless) == ("False", "True")
    assert "mount-proc failed with EPERM" in reason
    assert ("unmask=ALL" in reason) is detect_container()


_SECCOMP_ARCH = {"x86_64": (0xC000003E, 272), "aarch64": (0xC00000B7, 97)}


@linux
@pytest.mark.skipif(platform.machine() not in _SECCOMP_ARCH, reason="unshare's syscall number unknown here")
@pytest.mark.parametrize(("rootless", "step"), [(True, "unshare-user"), (False, "unshare")])
def test_probe_reports_seccomp(rootless: bool, step: str) -> None:
    """A seccomp filter that answers EPERM to unshare(2), like Docker's default profile."""
    arch, nr = _SECCOMP_ARCH[platform.machine()]
    script = _SECCOMP_SCRIPT.format(arch=arch, nr=nr, rootless=rootless)
    ok, got_rootless, reason = _run([sys.executable, "-c", script]).split(" ", 2)
    assert (ok, got_rootless) == ("False", str(rootless))
    assert f"{step} failed with EPERM" in reason
    if detect_container():
        assert "seccomp" in reason
        assert "--privileged" in reason


# --------------------------------------------------------------------------- robustness


@linux
def test_probe_kills_a_hung_child(monkeypatch: pytest.MonkeyPatch) -> None:
    before = host.children()
    monkeypatch.setattr(probe_mod, "_TIMEOUT_S", 0.3)
    monkeypatch.setattr(probe_mod, "_child_main", lambda *args: time.sleep(60))
    start = time.monotonic()
    result = probe(rootless=True)
    assert time.monotonic() - start < 3
    assert not result.ok
    assert "did not finish within 0.3 s" in result.reason
    assert host.children() == before


@linux
@root
@pytest.mark.parametrize("subreaper", [False, True], ids=["plain", "subreaper"])
def test_probe_kills_a_hung_pid1(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, subreaper: bool) -> None:
    """PID 1 dies with the child; if pytest is a subreaper, the orphan is ours and must be reaped too."""
    from pytest_lonely.sandbox import _syscalls

    pid_file = tmp_path / "pid1"

    def hang(fd: int, lock: object) -> None:
        pid_file.write_text(os.readlink("/proc/self"))  # still the host's /proc: the host PID
        time.sleep(60)

    monkeypatch.setattr(probe_mod, "_TIMEOUT_S", 0.5)
    monkeypatch.setattr(probe_mod, "_pid1_main", hang)
    before = host.children()
    _syscalls.prctl(_syscalls.PR_SET_CHILD_SUBREAPER, int(subreaper))
    try:
        result = probe()
    finally:
        _syscalls.prctl(_syscalls.PR_SET_CHILD_SUBREAPER, 0)
    assert "did not finish" in result.reason
    pid1 = int(pid_file.read_text())
    assert pid1 > 1
    if subreaper:
        assert not os.path.exists(f"/proc/{pid1}")
    else:
        _wait_gone(pid1)
    assert host.children() == before


@linux
def test_probe_reports_child_exception(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(probe_mod, "_child_main", boom)
    result = probe(rootless=True)
    assert not result.ok
    assert "failed unexpectedly: RuntimeError: boom" in result.reason


@linux
def test_probe_reports_silent_death(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe_mod, "_child_main", lambda *args: os.kill(os.getpid(), signal.SIGKILL))
    result = probe(rootless=True)
    assert not result.ok
    assert "exited with signal 9 (SIGKILL) without a report" in result.reason


@linux
def test_probe_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fds() -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pipe", no_fds)
    result = probe(rootless=False)
    assert result.ok is False
    assert result.rootless is False
    assert "Too many open files" in result.reason


@linux
def test_interrupted_probe_leaves_no_child(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(probe_mod, "_child_main", lambda *args: time.sleep(60))
    monkeypatch.setattr(probe_mod, "_wait", interrupted)
    before, fds = host.children(), _fds()
    with pytest.raises(KeyboardInterrupt):
        probe(rootless=True)
    assert host.children() == before
    assert _fds() == fds


@linux
@root
def test_probe_leaves_nothing_behind() -> None:
    mounts, children, fds = Path("/proc/self/mountinfo").read_text(), host.children(), _fds()
    for rootless in (False, True, False, True):
        assert probe(rootless=rootless).ok
    assert Path("/proc/self/mountinfo").read_text() == mounts
    assert host.children() == children
    assert _fds() == fds


@linux
@root
def test_probe_is_cheap() -> None:
    probe()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        assert probe().ok
        times.append((time.perf_counter() - start) * 1000)
    median = statistics.median(times)
    print(f"probe(): median {median:.2f} ms over 20 runs")
    assert median < 100


# --------------------------------------------------------------------------- helpers

_PRINT_PROBE = "from pytest_lonely.sandbox.probe import probe; a = probe(); print(a.ok, a.rootless, a.reason)"

_SECCOMP_SCRIPT = """
import ctypes, errno
from pytest_lonely.sandbox.probe import probe

class Insn(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

class Prog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

LD, JEQ, RET = 0x20, 0x15, 0x06
insns = (Insn * 6)(
    Insn(LD, 0, 0, 4), Insn(JEQ, 0, 3, {arch}),            # foreign ABI: allow
    Insn(LD, 0, 0, 0), Insn(JEQ, 0, 1, {nr}),              # unshare(2)?
    Insn(RET, 0, 0, 0x00050000 | errno.EPERM),            # SECCOMP_RET_ERRNO
    Insn(RET, 0, 0, 0x7FFF0000),                          # SECCOMP_RET_ALLOW
)
prog = Prog(6, insns)
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0                    # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.byref(prog), 0, 0) == 0   # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
a = probe(rootless={rootless})
print(a.ok, a.rootless, a.reason)
"""


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _fds() -> set[str]:
    return {f"{fd}:{_readlink(f'/proc/self/fd/{fd}')}" for fd in os.listdir("/proc/self/fd")}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 3
    while os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid):
        assert time.monotonic() < deadline, f"PID {pid} survived the probe"
        time.sleep(0.01)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.fixture(autouse=True)
def _no_straychildren() -> Iterator[None]:
    before = host.children() if sys.platform == "linux" else set()
    yield
    if sys.platform == "linux":
        assert host.children() <= before, "the probe left a child process behind"
