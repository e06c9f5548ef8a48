"""This checkout, the tools the suite uses from the host, and the host state every test must leave as found."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FIXTURE_ROOTFS = REPO / "fixtures" / "rootfs"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "ls", "ps", "cat", "hostname", "id", "sleep", "echo", "mount", "true", "env")


def mount_table() -> list[str]:
    """This process's mount table without what changes by itself (mount IDs, peer groups)."""
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[4:]) for line in f)


def children(pid: int | None = None) -> set[int]:
    """The child processes of ``pid`` (default: this one); /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN."""
    parent = str(os.getpid() if pid is None else pid)
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if data[data.rindex(b")") + 2 :].split()[1].decode() == parent:
                kids.add(int(entry))
    return kids
