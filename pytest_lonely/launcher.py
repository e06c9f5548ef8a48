"""The parent's side of one container: fork it, read its frames, reap it.

Kept apart from the pytest hooks so the process handling (PID namespaces,
deadlines, kills, zombies) reads as one piece and the plugin only deals with
reports.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import gc
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Final

from .sandbox import _syscalls as sc
from . import child
from .sandbox import protocol

#: Seconds between the child's traceback dump at the timeout and the parent's SIGKILL.
TIMEOUT_GRACE: Final = 0.5
_F_SETPIPE_SZ: Final = 1031
_PIPE_SIZE: Final = 1 << 20


@dataclasses.dataclass
class Outcome:
    """How a container ended, as far as the parent could see."""

    #: "done", "exit", "interrupt", "error", "crashed" or "timeout"; the runner adds "aborted"
    #: when the parent itself was interrupted while waiting (pytest-timeout's alarm).
    kind: str
    host_pid: int = 0
    #: ``os.waitstatus_to_exitcode`` of the process we forked (negative: killed by that signal); None if not reaped yet.
    exitstatus: int | None = None
    #: EXIT: (msg, returncode); ERROR: message.
    payload: Any = None
    #: What faulthandler wrote inside (fatal signal or timeout traceback).
    diag: str = ""
    elapsed: float = 0.0


def describe_status(status: int | None) -> str:
    if status is None:
        return "container ended without a status"
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = "unknown signal"
        return f"container exited with signal {-status} ({name})"
    return f"container exited with status {status}"


class Launcher:
    """Forks containers for one pytest process and keeps track of their PIDs until reaped."""

    def __init__(self, rootless: bool) -> None:
        self.rootless = rootless
        self._pidns_fd = -1 if rootless else os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        self._diag_fd = os.memfd_create("lonely-diag", os.MFD_CLOEXEC)
        self._unreaped: list[int] = []
        # gc.unfreeze() thaws everything: if the user froze objects before the first isolated test
        # (their own fork-friendliness), keep all frozen rather than undo their freeze.
        self._thaw = gc.get_freeze_count() == 0

    def close(self) -> None:
        self.reap(block=True)
        for fd in (self._pidns_fd, self._diag_fd):
            if fd >= 0:
                os.close(fd)
        self._pidns_fd = self._diag_fd = -1

    def reap(self, block: bool = False) -> None:
        """Collect finished containers; with ``block``, wait for all of them."""
        still: list[int] = []
        for pid in self._unreaped:
            try:
                done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
            except ChildProcessError:
                continue
            if not done:
                still.append(pid)
        self._unreaped = still

    def run(
        self,
        make_launch: Callable[[int, int], child.Launch],
        on_frame: Callable[[str, Any], None],
        timeout: float,
        need_status: bool,
        after_fork: Callable[[], None] | None = None,
    ) -> Outcome:
        """Run one container to its end, feeding report and warning frames to ``on_frame`` as they arrive."""
        self.reap()
        read_fd, write_fd = os.pipe()
        try:
            fcntl.fcntl(write_fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass
        os.ftruncate(self._diag_fd, 0)
        os.lseek(self._diag_fd, 0, os.SEEK_SET)
        launch = make_launch(write_fd, self._diag_fd)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = self._fork(launch, read_fd)
        os.close(write_fd)
        if after_fork is not None:
            after_fork()
        start = time.monotonic()
        outcome = Outcome("crashed", host_pid=0 if self.rootless else pid)
        try:
            self._read(read_fd, outcome, on_frame, start + timeout + TIMEOUT_GRACE if timeout else None)
        except BaseException:
            self._kill(pid, outcome.host_pid)
            os.waitpid(pid, 0)
            raise
        finally:
            os.close(read_fd)
        outcome.elapsed = time.monotonic() - start
        if outcome.kind == "timeout":
            self._kill(pid, outcome.host_pid)
        if outcome.kind in ("crashed", "timeout", "error") or need_status:
            _, status = os.waitpid(pid, 0)
            outcome.exitstatus = os.waitstatus_to_exitcode(status)
        else:
            # Namespace teardown happens as the child exits; nobody needs to wait for it.
            self._unreaped.append(pid)
        if outcome.kind in ("crashed", "timeout"):
            size = os.fstat(self._diag_fd).st_size
            outcome.diag = os.pread(self._diag_fd, size, 0).decode("utf-8", "replace") if size else ""
            if outcome.kind == "crashed" and timeout and outcome.diag.startswith("Timeout ("):
                outcome.kind = "timeout"
        return outcome

    def _fork(self, launch: child.Launch, read_fd: int) -> int:
        # Frozen objects stay out of the child's GC, which would otherwise write-fault on pages all
        # over the heap.  gc.freeze() and gc.unfreeze() are O(1); gc.get_freeze_count() walks the
        # whole frozen list, so it is asked once, in __init__ (70 instead of 17 ms per test with
        # 200 MB frozen).
        gc.freeze()
        try:
            if self._pidns_fd >= 0:
                # One fork instead of two: our next child becomes PID 1 of a new namespace.
                sc.unshare(sc.CLONE_NEWPID)
            try:
                pid = sc.fork()
            finally:
                if self._pidns_fd >= 0 and os.getpid() != 1:
                    sc.setns(self._pidns_fd, sc.CLONE_NEWPID)
            if pid == 0:
                os.close(read_fd)
                child.main(launch)
        finally:
            if self._thaw:
                gc.unfreeze()
        return pid

    def _read(self, fd: int, outcome: Outcome, on_frame: Callable[[str, Any], None], deadline: float | None) -> None:
        reader = protocol.FrameReader()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while True:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    outcome.kind = "timeout"
                    return
                if not poller.poll(remaining * 1000):
                    continue
            try:
                data = os.read(fd, _PIPE_SIZE)
            except OSError as exc:  # pragma: no cover - a pipe read does not fail short of EINTR
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not data:
                if reader.pending:
                    outcome.payload = f"the container died in the middle of a {reader.pending}-byte message"
                return
            try:
                frames = reader.feed(data)
            except protocol.ProtocolError as exc:
                outcome.payload = f"garbled message from the container: {exc}"
                return
            for kind, payload in frames:
                if kind == protocol.HELLO:
                    outcome.host_pid = int(payload["host_pid"])
                elif kind in (protocol.DONE, protocol.EXIT, protocol.INTERRUPT, protocol.ERROR):
                    outcome.kind = kind
                    outcome.payload = payload
                    return
                else:
                    on_frame(kind, payload)

    def _kill(self, pid: int, host_pid: int) -> None:
        # PID 1 ignores every signal it has no handler for; only SIGKILL is certain.
        for target in {pid, host_pid} - {0}:
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
