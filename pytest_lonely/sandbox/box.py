"""One started container as the parent holds it: hand it work, read its frames, end it.

Everything the parent believes about a container comes from what it made or
was handed by a process of its own (the PID from ``fork``, a pidfd, pipes,
the container's own output files), never from what the container wrote: the
report stream is read, validated and passed on, but no value in it ever
reaches ``kill``, ``waitpid``, a path or an import.  Once the container's
work is over, whatever is left of it is killed, so that nothing it does
afterwards can reach another test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import select
import signal
import time
from collections.abc import Callable
from typing import Any, Final, Literal

from . import cgroup, changes, process, protocol
from .fork import PIPE_SIZE
from .limits import Usage
from .zygote import Zygote

#: Seconds between the child's traceback dump at the timeout and the parent's SIGKILL.
TIMEOUT_GRACE: Final = 0.5
#: Ctrl-C is forwarded to the container (its own process group does not get the terminal's); after this
#: many with the container still running, it is killed and the parent is interrupted anyway.
INTERRUPTS_BEFORE_KILL: Final = 3
#: Seconds a finished container may take to exit by itself when its exit status is wanted.
EXIT_WAIT: Final = 2.0

#: How a container's work ended.  "aborted" is set by the caller when it was itself interrupted while
#: waiting (pytest-timeout's alarm); "refused": the container broke the protocol (payload says how).
OutcomeKind = Literal["done", "exit", "interrupt", "error", "crashed", "timeout", "aborted", "refused"]
_TERMINAL_KINDS: Final[dict[protocol.Kind, OutcomeKind]] = {
    protocol.Kind.DONE: "done",
    protocol.Kind.EXIT: "exit",
    protocol.Kind.INTERRUPT: "interrupt",
    protocol.Kind.ERROR: "error",
}

#: Receives each non-terminal frame as it arrives; raises :class:`~.protocol.ProtocolError` to refuse it.
OnFrame = Callable[[protocol.Kind, Any], None]


@dataclasses.dataclass
class Outcome:
    """How a container's work ended, as far as the parent could see."""

    kind: OutcomeKind
    #: PID 1 as the host sees it, as the kernel or a process of ours told it; 0 if never known.
    host_pid: int = 0
    #: ``os.waitstatus_to_exitcode`` of the process we forked (negative: killed by that signal); None if not known.
    exitstatus: int | None = None
    #: EXIT: [msg, returncode]; INTERRUPT: where; ERROR and refused: a message; crashed: what broke the stream.
    payload: Any = None
    #: What faulthandler wrote inside (fatal signal or timeout traceback).
    diag: str = ""
    #: What the container's processes printed since the last report, when it did not end normally.
    stdout: str = ""
    stderr: str = ""
    elapsed: float = 0.0
    #: The kernel's OOM killer acted in the container's cgroup.
    oom_killed: bool = False
    #: What the container used, when the spec asked for it.
    usage: Usage | None = None

    @property
    def ended(self) -> bool:
        """Whether the container is gone (or must go): only after "done" may it be handed more work."""
        return self.kind != "done"


class Box:
    """A container that is built and waits for work, or runs it."""

    def __init__(
        self,
        *,
        child: int,
        pid1: process.Handle | None,
        pgid: int = 0,
        go_fd: int,
        read_fd: int,
        outputs: tuple[int, int, int],
        group: cgroup.Cgroup | None = None,
        owner: Zygote | None = None,
        failure: str | None = None,
        layers: tuple[int, ...] = (),
    ) -> None:
        #: The process we (or the zygote) forked: PID 1, or the middle process rootless.
        self.child = child
        self.pid1 = pid1
        #: The process group of the container's processes, made by its forker (not named by the container).
        self.pgid = pgid
        self.go_fd = go_fd
        self.read_fd = read_fd
        self.outputs = outputs
        self.group = group
        #: The zygote that forked it and reaps it; None: our own child.
        self.owner = owner
        #: Why it cannot run anything, found before it was handed work.
        self.failure = failure
        self.usage = False
        self.memory_limited = False
        self._reader = protocol.FrameReader()
        #: Descriptors of its copy-on-write layers, which outlive it: what a test changed (changes.py).
        self.layers = layers
        self._plan: tuple[changes.Layer, ...] = ()
        self._hostname: str | None = None
        #: When the current order was handed over: a shared container's test changed only what came after.
        self.since: int | None = None
        self.shared = False

    @property
    def host_pid(self) -> int:
        return self.pid1.pid if self.pid1 is not None else 0

    def run(self, tail: Any, order: Any, timeout: float, on_frame: OnFrame, terminal: int = -1) -> Outcome:
        """Hand over one order and read the frames of its work to the end of it.

        ``terminal``: the controlling terminal's fd, to hand to the container's
        process group while it works (a debugger inside reads it), when the
        caller is that terminal's foreground process group.
        """
        outcome = Outcome("crashed", host_pid=self.host_pid)
        if self.failure is not None:
            self.kill()
            outcome.kind, outcome.payload = "error", self.failure
            return outcome
        handed = terminal >= 0 and self.pgid > 0 and _hand_terminal(terminal, self.pgid)
        if self.shared and self.layers:
            try:
                self.since = changes.mark(self.layers[0])
            except OSError:
                self.since = changes.clock_ns()
        try:
            protocol.write_all(self.go_fd, protocol.encode(protocol.Kind.GO, [tail, order]))
        except OSError:
            pass  # it died while it waited: what it said, if anything, is in the stream
        start = time.monotonic()
        deadline = start + timeout + TIMEOUT_GRACE if timeout else None
        try:
            self._read(outcome, on_frame, deadline)
        except BaseException:
            self.kill()
            raise
        finally:
            outcome.elapsed = time.monotonic() - start
            if handed:
                _hand_terminal(terminal, os.getpgrp())
        if outcome.kind != "done":
            self.kill()
        if self.group is not None:
            # Read while PID 1 still lives, or is at least not reaped: the cgroup goes with it.
            if self.usage:
                outcome.usage = self.group.usage()
            outcome.oom_killed = self.memory_limited and self.group.oom_killed()
        if outcome.kind in ("crashed", "timeout", "refused"):
            outcome.stdout, outcome.stderr, outcome.diag = (self._read_output(fd) for fd in self.outputs)
            if outcome.kind == "crashed" and timeout and outcome.diag.startswith("Timeout ("):
                outcome.kind = "timeout"
        return outcome

    def kill(self) -> None:
        """SIGKILL PID 1 (its namespace dies with it) through its pidfd: never a PID someone else may hold now."""
        if self.pid1 is not None:
            self.pid1.kill()

    def wait_exit(self, timeout: float) -> None:
        """Let it exit by itself (EOF on GO ends it), for an exit status that is its own; then kill."""
        self._close_go()
        if self.pid1 is not None and not self.pid1.exited(timeout):
            self.kill()

    def describe(self, plan: tuple[changes.Layer, ...], hostname: str) -> None:
        """What its layers are (from the plan it was built from), and the hostname the engine wrote down."""
        self._plan = plan
        self._hostname = hostname

    def changed(self, *, limit: int | None = changes.LIMIT) -> changes.Changes | None:
        """What the work in hand changed in the container's root, as ``docker diff`` lists it; None: unknown.

        Read from the layers' descriptors, so it works while the container
        runs and after it died.  In a shared container, since its current
        order was handed over.
        """
        if not self.layers:
            return None
        top = self.layers[1] if len(self.layers) > 1 else None
        return changes.diff(
            self.layers[0], self._plan, top_fd=top, hostname=self._hostname, since=self.since, limit=limit
        )

    def keep(self, dest: str) -> changes.Kept | None:
        """Copy what the work in hand added and changed into ``dest`` (see :func:`changes.keep`); None: unknown."""
        found = self.changed(limit=None)
        if found is None:
            return None
        top = self.layers[1] if len(self.layers) > 1 else None
        return changes.keep(self.layers[0], self._plan, found, dest, top_fd=top)

    def close(self) -> None:
        """Drop every descriptor of ours; the process itself is the engine's to reap."""
        self._close_go()
        for fd in (self.read_fd, *self.outputs, *self.layers):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.read_fd = -1
        self.outputs = (-1, -1, -1)
        self.layers = ()
        if self.pid1 is not None:
            self.pid1.close()

    def _close_go(self) -> None:
        if self.go_fd >= 0:
            os.close(self.go_fd)
            self.go_fd = -1

    def interrupt(self) -> None:
        """Ctrl-C reaches pytest's process group, not the container's: hand it on, as the terminal would."""
        if self.pid1 is not None:
            self.pid1.signal(signal.SIGINT)

    def _read(self, outcome: Outcome, on_frame: OnFrame, deadline: float | None) -> None:
        poller = select.poll()
        poller.register(self.read_fd, select.POLLIN)
        interrupts = 0
        while True:
            try:
                if deadline is not None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        outcome.kind = "timeout"
                        return
                    if not poller.poll(remaining * 1000):
                        continue
                data = os.read(self.read_fd, PIPE_SIZE)
            except KeyboardInterrupt:
                interrupts += 1
                if interrupts >= INTERRUPTS_BEFORE_KILL:
                    raise
                self.interrupt()
                continue
            except OSError as exc:  # pragma: no cover - a pipe read does not fail short of EINTR
                if exc.errno == errno.EINTR:
                    continue
                raise
            if not data:
                if self._reader.pending:
                    outcome.payload = f"the container died in the middle of a {self._reader.pending}-byte message"
                return
            reader = self._reader
            try:
                frames = reader.feed(data)
                for index, (kind, payload) in enumerate(frames):
                    terminal = _TERMINAL_KINDS.get(kind)
                    if kind in protocol.QUESTIONS:
                        self._answer(kind)
                        continue
                    if terminal is None:
                        on_frame(kind, payload)
                        continue
                    late = index + 1 < len(frames) or reader.pending or reader.error
                    if kind is not protocol.Kind.ERROR and late:
                        raise protocol.ProtocolError(f"more frames after a {kind.value!r} frame")
                    outcome.kind, outcome.payload = terminal, payload
                    return
                if reader.error is not None:
                    raise reader.error
            except protocol.ProtocolError as exc:
                outcome.kind, outcome.payload = "refused", str(exc)
                return

    def _answer(self, kind: protocol.Kind) -> None:
        """A question the test asked about its own container: answered from what we hold, never from it."""
        found = self.changed(limit=None)
        if found is None:
            answer: Any = {"error": "this container's layers cannot be read"}
        else:
            answer = {"changes": found.pairs(), "complete": found.complete, "problems": list(found.problems)}
        with contextlib.suppress(OSError):  # it died while it asked
            protocol.write_all(self.go_fd, protocol.encode(kind, answer))

    @staticmethod
    def _read_output(fd: int, limit: int = 1 << 20) -> str:
        """The tail of what is in one of the container's own output files (a crash's last words)."""
        try:
            size = os.fstat(fd).st_size
            data = os.pread(fd, min(size, limit), max(0, size - limit)) if size else b""
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def status(self, engine_wait: Callable[[int], int | None]) -> int | None:
        """The exit status of the process we forked: from the zygote that reaps it, or by waiting ourselves."""
        if not self.child:
            return None
        if self.owner is not None:
            return self.owner.exit_code(self.child)
        return engine_wait(self.child)


def _hand_terminal(fd: int, group: int) -> bool:
    """Make ``group`` the terminal's foreground process group; SIGTTOU is held off while a background group asks."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        os.tcsetpgrp(fd, group)
    except OSError:
        return False
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return True


def wait_child(pid: int) -> int | None:
    """``waitstatus_to_exitcode`` of our own child, waiting for it; None if it is not ours (any more)."""
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status)
