"""Running a command with a pseudo-terminal as its controlling terminal, as a user at a shell would."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import time
from pathlib import Path


def in_a_terminal(
    cwd: Path,
    argv: list[str],
    steps: list[tuple[bytes, bytes]],
    timeout: float = 60,
    env: dict[str, str] | None = None,
) -> tuple[int, str]:
    """Run ``argv`` in a new pseudo-terminal: wait for each prompt, then type its reply; the exit code and output.

    The terminal is the command's controlling terminal, and stays ours: whatever
    is typed into it (or pushed into it) is read by nobody else.
    """
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child execs at once
        os.chdir(cwd)
        if env is None:
            os.execv(argv[0], argv)
        os.execvpe(argv[0], argv, env)
    seen = b""
    deadline = time.monotonic() + timeout
    pending = list(steps)
    try:
        while time.monotonic() < deadline:
            if pending and pending[0][0] in seen:
                prompt, reply = pending.pop(0)
                seen = seen.replace(prompt, b"<" + prompt[1:], 1)  # each prompt answers one step
                os.write(fd, reply)
            if not select.select([fd], [], [], 0.1)[0]:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's other side closed, the command is done
                break
            if not chunk:
                break
            seen += chunk
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")
