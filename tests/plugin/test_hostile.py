"""A container is untrusted input: hostile tests, run for real, change nothing outside their own reports.

Each test here runs an inner session whose isolated tests attack what lies
around their container: the report pipe, pytest's process group, the
session's other tests, the kernel objects containers could share, and the
machinery that ends containers.  Every case must end with the host
untouched, the victim alive, the attacker failed with a message that says
what it tried, the other tests' outcomes and output as without it, and
pytest's exit code right.  Each runs as root with containers from the
zygote and forked straight from pytest (``PYTEST_LONELY_PREBUILD=0``), and
as uid 65534 (rootless).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from helpers.modes import MODES, Inner
from helpers.terminal import in_a_terminal

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root runs the root modes and becomes uid 65534")

#: What a hostile test uses to speak on the container's report pipe, as a test could.
HOSTILE_CONFTEST = '''
import fcntl, json, os, stat, struct


def report_pipe():
    """The container's report pipe: the newest write-only pipe this process holds."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            st = os.fstat(fd)
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        except OSError:
            continue
        if fd > 2 and stat.S_ISFIFO(st.st_mode) and flags & os.O_ACCMODE == os.O_WRONLY:
            found.append(fd)
    assert found, "no report pipe"
    return max(found)


def frame(kind, payload):
    body = json.dumps([kind, payload]).encode()
    return struct.pack("<I", len(body)) + body


def say(kind, payload=None):
    os.write(report_pipe(), frame(kind, payload))


def linger():
    """Undo what a container promises from the inside: PDEATHSIG, the process group."""
    import ctypes
    ctypes.CDLL(None).prctl(1, 0)  # PR_SET_PDEATHSIG, 0
    with contextlib.suppress(OSError):
        os.setsid()

import contextlib
'''


@contextlib.contextmanager
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A host process in a process group of its own, which no test may kill; checked alive, then ended."""
    proc = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        yield proc
        assert proc.poll() is None, f"pytest killed the host process {proc.pid}"
    finally:
        proc.kill()
        proc.wait()


def in_pid_namespace(inode: int) -> list[int]:
    """Every process whose PID namespace is ``inode``."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/pid").st_ino == inode:
                    found.append(int(entry))
    return found


# --- 1. a PID from the wire reaches no kill() ------------------------------------------------------------------------


def test_a_pid_a_container_names_is_never_killed(inner: Inner) -> None:
    """0.1.0 SIGKILLed the host PID a HELLO frame named, on a timeout; a negative one, a whole process group."""
    with victim() as proc:
        inner.write(
            **{"conftest.py": HOSTILE_CONFTEST},
            test_forge=f"""
            import time, pytest
            from conftest import say

            @pytest.mark.isolated(timeout=2)
            @pytest.mark.parametrize("target", [{proc.pid}, -{proc.pid}])
            def test_names_a_victim(target):
                say("hello", {{"host_pid": target}})
                time.sleep(10)
            """,
        )
        result = inner.run()
    assert list(result.cases.values()) == [["failure"], ["failure"]], result.out
    assert result.out.count("unknown frame kind 'hello'") >= 2, result.out


# --- 2. nothing outlives pytest ---------------------------------------------------------------------------------------

LINGERING = """
import os, subprocess, time, pytest
from conftest import linger

@pytest.mark.isolated
def test_first():
    pass

@pytest.mark.isolated
def test_lingers(tmp_path_factory):
    linger()
    subprocess.Popen(["setsid", "sh", "-c", "sleep 987.{tag} & sleep 987.{tag}"])
    handshake = tmp_path_factory.getbasetemp() / "handshake"  # the basetemp is the container's window
    with open(f"{{handshake}}.tmp", "w") as f:
        f.write(str(os.stat("/proc/self/ns/pid").st_ino))
    os.rename(f"{{handshake}}.tmp", handshake)
    time.sleep(120)
"""


def test_no_container_outlives_a_killed_pytest(inner: Inner) -> None:
    """SIGKILL to pytest runs no code of its: a test that cleared PDEATHSIG and left its group still dies."""
    tag = f"{os.getpid()}{MODES.index(inner.mode)}"
    inner.write(**{"conftest.py": HOSTILE_CONFTEST}, test_linger=LINGERING.format(tag=tag))
    handshake = inner.project / "basetemp" / "handshake"
    with open(inner.project / "out.txt", "wb") as out:
        proc = subprocess.Popen(inner.argv(), cwd=inner.project, env=inner.env(), stdout=out, stderr=subprocess.STDOUT)
    inode = 0
    try:
        deadline = time.monotonic() + 60
        while not handshake.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handshake.exists(), (inner.project / "out.txt").read_text()
        inode = int(handshake.read_text())
        while len(in_pid_namespace(inode)) < 4 and time.monotonic() < deadline:  # PID 1, sh and its two sleeps
            time.sleep(0.02)
        assert len(in_pid_namespace(inode)) >= 4
        proc.kill()  # setpriv execs pytest: this is pytest itself
        proc.wait()
        killed = time.monotonic()
        while in_pid_namespace(inode) and time.monotonic() - killed < 30:  # a hang guard; the keeper needs ms
            time.sleep(0.02)
        survivors = in_pid_namespace(inode)
        assert not survivors, f"processes of the container outlived pytest: {survivors}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in in_pid_namespace(inode) if inode else ():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# --- 3. a container's work is over when it says so --------------------------------------------------------------------

DONE_EARLY = """
import os, sys, time, pytest
from conftest import linger, say

@pytest.mark.isolated
def test_warm_up():
    pass

@pytest.mark.isolated
def test_says_done_and_goes_on():
    linger()
    say("done")
    for _ in range(100):
        print("GARBAGE from a test that said it was done", flush=True)
        os.write(2, b"GARBAGE on stderr\\n")
        time.sleep(0.01)
    assert False

@pytest.mark.isolated
def test_victim():
    time.sleep(0.3)
    print("VICTIM-OUTPUT")
    assert False, "the victim fails, to show its output"
"""


def test_done_ends_the_container_and_no_other_test_hears_it(inner: Inner) -> None:
    """In 0.1.0 such a test rewrote the next test's captured output, and from the zygote it passed."""
    inner.write(**{"conftest.py": HOSTILE_CONFTEST}, test_done=DONE_EARLY)
    result = inner.run()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.out
    assert "GARBAGE" not in result.out
    assert "it said it was done after a passed setup but no call report" in result.out
    victim_section = result.out.split("_ test_victim _", 1)[1]
    captured = victim_section.split("Captured stdout call", 1)[1].split("\n", 2)[1]
    assert captured == "VICTIM-OUTPUT", victim_section
    assert result.cases == {
        "test_warm_up": ["passed"],
        "test_says_done_and_goes_on": ["failure"],
        "test_victim": ["failure"],
    }


DONE_EARLY_SHARED = """
import time, pytest
from conftest import say

pytestmark = pytest.mark.isolated(scope="module")

def test_says_done_early():
    say("done")
    time.sleep(0.2)  # pytest's own reports of this test follow the DONE on the pipe

def test_after():
    pass
"""


def test_a_refused_done_ends_a_shared_container_too(inner: Inner) -> None:
    """A group's next test never gets a container that was refused: its late frames would be that test's."""
    inner.write(**{"conftest.py": HOSTILE_CONFTEST}, test_done_shared=DONE_EARLY_SHARED)
    result = inner.run()
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.out
    assert "it said it was done after a passed setup but no call report" in result.out
    assert "while running" not in result.out
    assert result.cases == {"test_says_done_early": ["failure"], "test_after": ["passed"]}


# --- 4. reports: only the container's own, in pytest's order ----------------------------------------------------------

FORGERIES = """
import time, pytest
from conftest import say

REPORT = {
    "nodeid": "test_forge.py::test_victim", "location": ["test_forge.py", 0, "test_victim"], "keywords": {},
    "outcome": "passed", "longrepr": None, "when": "call", "user_properties": [], "sections": [],
    "duration": 0.1, "start": 0.0, "stop": 0.1, "$report_type": "TestReport",
}

@pytest.mark.isolated
def test_victim():
    assert False, "the victim's own failure"

@pytest.mark.isolated
def test_forges_the_victims_report():
    say("report", REPORT)

@pytest.mark.isolated
def test_reports_its_call_twice():
    say("report", dict(REPORT, nodeid="test_forge.py::test_reports_its_call_twice"))

@pytest.mark.isolated
def test_names_a_module_to_import():
    say("warning", {"message": "x", "module": "this", "qualname": "Warning", "filename": "f", "lineno": 1})

@pytest.mark.isolated
def test_sends_a_frame_only_pytest_sends():
    say("go", [[], []])

@pytest.mark.isolated
def test_exits_with_a_bogus_code():
    say("exit", ["bye", "not a number"])
    time.sleep(1)  # nothing more from it: the exit frame alone is what is judged

@pytest.mark.isolated
def test_after():
    pass
"""


def test_a_container_changes_only_its_own_reports(inner: Inner) -> None:
    inner.write(**{"conftest.py": HOSTILE_CONFTEST}, test_forge=FORGERIES)
    result = inner.run()
    out = result.out
    assert result.ret == pytest.ExitCode.TESTS_FAILED, out
    assert "Beautiful is better than ugly" not in out  # `this` was never imported
    assert result.cases["test_victim"] == ["failure"], result.cases
    assert result.cases["test_after"] == ["passed"], result.cases
    assert "a report for 'test_forge.py::test_victim' while running" in out
    assert "a call report twice" in out
    assert "a 'go' frame, which only goes the other way" in out
    assert "pytest.exit() with ['bye', 'not a number'], not [message, returncode]" in out
    for name in ("test_forges_the_victims_report", "test_sends_a_frame_only_pytest_sends"):
        assert result.cases[name] == ["failure"], (name, result.cases)
    # Its own lie is believed, as test code in-process may lie; the true report after it is refused.
    assert result.cases["test_reports_its_call_twice"] == ["error"], result.cases
    assert result.cases["test_names_a_module_to_import"] == ["passed"], result.cases


def test_pytest_exit_inside_ends_the_session_with_its_code(inner: Inner) -> None:
    inner.write(
        test_exit="""
        import pytest

        @pytest.mark.isolated
        def test_exits():
            pytest.exit("enough", returncode=7)

        def test_never():
            pass
        """
    )
    result = inner.run()
    assert result.ret == 7, result.out
    assert "enough" in result.out


# --- 5. signals stay in the container ---------------------------------------------------------------------------------

SIGNALS = """
import os, signal, time, pytest

@pytest.mark.isolated
@pytest.mark.parametrize("how", ["killpg-getpgrp", "kill-0", "killpg-0"])
def test_signals_its_own_group(how):
    # The group is led from outside the PID namespace (it has no number here).  Led from inside, its ID
    # would keep a PID of the namespace allocated, and PID 1 could never finish exiting (zap_pid_ns_processes).
    assert os.getpgrp() == 0
    got = []
    signal.signal(signal.SIGUSR1, lambda *args: got.append(args[0]))
    child = os.fork()
    if child == 0:
        signal.signal(signal.SIGUSR1, lambda *args: os._exit(42))
        time.sleep(30)
        os._exit(1)
    time.sleep(0.1)
    if how == "killpg-getpgrp":
        os.killpg(os.getpgrp(), signal.SIGUSR1)
    elif how == "kill-0":
        os.kill(0, signal.SIGUSR1)
    else:
        os.killpg(0, signal.SIGUSR1)
    time.sleep(0.05)
    assert got == [signal.SIGUSR1]
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 42  # its child was in the group too

def test_after():
    pass
"""


def test_a_signal_to_its_own_group_stays_in_the_container(inner: Inner) -> None:
    """In 0.1.0 ``os.killpg(os.getpgrp(), SIGUSR1)`` killed the whole session (exit 138, no summary)."""
    inner.write(test_signals=SIGNALS)
    result = inner.run()
    assert result.ret == pytest.ExitCode.OK, result.out
    assert list(result.cases.values()) == [["passed"]] * 4, result.cases


TERMINAL = """
import errno, fcntl, os, termios, pytest

def push():
    fd = os.open("/dev/tty", os.O_RDWR)  # the controlling terminal: pytest's, which is the user's shell's
    try:
        fcntl.ioctl(fd, termios.TIOCSTI, b"#")
        return "pushed"
    except OSError as exc:
        return errno.errorcode[exc.errno]
    finally:
        os.close(fd)

@pytest.mark.isolated
def test_pushes_keystrokes_into_the_terminal():
    print("INSIDE:", push())

def test_in_process():
    print("IN-PROCESS:", push())
"""


def test_no_keystrokes_pushed_into_pytests_terminal(inner: Inner) -> None:
    """``TIOCSTI`` on the controlling terminal needs no capability where ``dev.tty.legacy_tiocsti`` is 1.

    Root inside could type a command into the shell that started pytest, to run
    once pytest exits (bubblewrap's CVE-2017-5226).  The terminal is a
    pseudo-terminal of this test's: what is pushed into it is read by nobody.
    """
    inner.write(test_terminal=TERMINAL)
    status, out = in_a_terminal(inner.project, inner.argv("-s"), [], env=inner.env())
    assert status == pytest.ExitCode.OK, out
    assert "INSIDE: EPERM" in out, out
    with open("/proc/sys/dev/tty/legacy_tiocsti") as f:
        legacy = f.read().strip() == "1"
    # In-process, pytest's own process may (where the kernel allows it): what the container must not.
    assert ("IN-PROCESS: pushed" if legacy or inner.mode != "rootless" else "IN-PROCESS: EPERM") in out, out


# --- 6. descriptors: a stale object never writes into a pipe of ours -------------------------------------------------


def test_module_level_files_never_write_into_the_report_pipe(inner: Inner) -> None:
    """psutil's test package opens files at import; inside, their numbers were reused for our pipes."""
    inner.write(
        test_stale="""
        import os, pytest
        LOGS = [open(os.devnull, "w") for _ in range(30)]  # opened at import, in pytest's process

        @pytest.mark.isolated
        @pytest.mark.parametrize("i", range(4))
        def test_writes_to_module_level_files(i):
            for f in LOGS:
                try:
                    f.write(f"test {i} ran\\n")
                    f.flush()
                except OSError:
                    pass  # a closed descriptor is the documented case
        """
    )
    result = inner.run()
    assert result.ret == pytest.ExitCode.OK, result.out


# --- 7. shared kernel objects: no channel between two containers ------------------------------------------------------

KEYRING = """
import ctypes, os, pytest

libc = ctypes.CDLL(None, use_errno=True)
ADD_KEY, KEYCTL, KEYCTL_SEARCH, USER_KEYRING, ENOKEY = 248, 250, 10, -4, 126

@pytest.mark.isolated
def test_adds_a_key():
    key = libc.syscall(ADD_KEY, b"user", b"lonely-probe", b"secret", 6, ctypes.c_int(USER_KEYRING))
    assert key > 0, os.strerror(ctypes.get_errno())

@pytest.mark.isolated
def test_does_not_find_it():
    found = libc.syscall(KEYCTL, KEYCTL_SEARCH, ctypes.c_int(USER_KEYRING), b"user", b"lonely-probe", 0)
    assert found < 0 and ctypes.get_errno() == ENOKEY

@pytest.mark.isolated
def test_holds_no_writable_shared_memory_of_ours():
    with open("/proc/self/maps") as maps:
        shared = [line for line in maps if line.split()[1] == "rw-s"]
    assert shared == []
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="x86_64 syscall numbers")
def test_no_channel_between_two_containers(inner: Inner) -> None:
    """Every container of 0.1.0 shared one user namespace, so one test's user keyring was the next one's."""
    inner.write(test_keyring=KEYRING)
    result = inner.run()
    assert result.ret == pytest.ExitCode.OK, result.out


# --- 8. decoding: whatever bytes arrive ------------------------------------------------------------------------------

GARBAGE = """
import os, random, struct, time, pytest
from conftest import report_pipe

@pytest.mark.isolated
@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(seed):
    os.write(report_pipe(), random.Random(seed).randbytes(4000))
    time.sleep(0.2)

@pytest.mark.isolated
def test_a_frame_of_four_gigabytes():
    os.write(report_pipe(), struct.pack("<I", 0xFFFFFFF0) + b"[")
    time.sleep(0.2)

@pytest.mark.isolated
def test_nested_deeply():
    body = b"[" * 200000
    os.write(report_pipe(), struct.pack("<I", len(body)) + body)
    time.sleep(0.2)

@pytest.mark.isolated
def test_prints_60_megabytes_and_passes():
    chunk = "y" * 1023 + "\\n"
    for _ in range(60 * 1024):
        print(chunk, end="")

@pytest.mark.isolated
def test_after():
    pass
"""


def test_any_bytes_fail_only_their_test(inner: Inner) -> None:
    inner.write(**{"conftest.py": HOSTILE_CONFTEST}, test_garbage=GARBAGE)
    result = inner.run()
    assert result.cases["test_after"] == ["passed"], result.cases
    assert result.cases["test_prints_60_megabytes_and_passes"] == ["passed"], result.cases
    assert "characters of this section were cut" in result.out
    for name, kinds in result.cases.items():
        if name.startswith(("test_random_bytes", "test_a_frame", "test_nested")):
            assert kinds in (["failure"], ["error"]), (name, kinds)
    assert "a frame of 4294967280 bytes exceeds the limit" in result.out
    assert "INTERNALERROR" not in result.out


# --- 9. the decoder alone, fuzzed -------------------------------------------------------------------------------------


def test_the_decoder_takes_any_bytes() -> None:
    """Random frames, well framed or not: frames or a ProtocolError, never anything else."""
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies
    from pytest_lonely.sandbox import protocol

    @hypothesis.settings(max_examples=2000, deadline=None)
    @hypothesis.given(strategies.binary(max_size=512), strategies.integers(min_value=1, max_value=64))
    def feed_raw(data: bytes, step: int) -> None:
        reader = protocol.FrameReader()
        with contextlib.suppress(protocol.ProtocolError):
            for i in range(0, len(data), step):
                reader.feed(data[i : i + step])

    @hypothesis.settings(max_examples=2000, deadline=None)
    @hypothesis.given(strategies.binary(max_size=512) | strategies.text(max_size=200).map(str.encode))
    def feed_framed(body: bytes) -> None:
        with contextlib.suppress(protocol.ProtocolError):
            protocol.FrameReader().feed(protocol.pack(body))

    feed_raw()
    feed_framed()
