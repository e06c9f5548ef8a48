"""The public description of one container, as the ``container`` fixture returns it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from .sandbox.limits import Limits
from .sandbox.protocol import Kind


class Changed(NamedTuple):
    """One path a test changed, as ``docker diff`` shows it: ``("A", "/etc/app.conf")``."""

    #: ``A`` added, ``C`` changed, ``D`` deleted.
    kind: str
    #: As the test sees it.
    path: str


class ChangesUnavailable(RuntimeError):
    """The parent could not read this container's layers, or the call was made outside a container."""


@dataclasses.dataclass(frozen=True)
class ImageInfo:
    """The image a container's root came from."""

    #: As configured, e.g. ``images/debian-oci.tar:bookworm``.
    reference: str
    #: ``sha256:...`` of the image's manifest (of its config for a ``docker save`` archive, which has no manifest).
    digest: str


@dataclasses.dataclass(frozen=True)
class Container:
    """What a test can learn about the sandbox it runs in.

    The same object, with the same ``id``, is passed to the
    ``pytest_lonely_*`` hooks in the parent, so a conftest can correlate what
    it saw inside with what it sees outside.
    """

    #: 12 lowercase hex characters, unique in this run.
    id: str
    #: The UTS hostname inside the container.
    hostname: str
    #: PID of the container's PID 1 as the host sees it (0 until the container has started).
    host_pid: int
    #: Namespaces the container has its own copy of, e.g. ``{"pid", "mnt", "uts", "ipc"}``.
    namespaces: frozenset[str]
    #: True when the container runs in a user namespace because pytest is not root.
    rootless: bool
    #: The configured root filesystem (a directory or the tarball it came from), or None for the host view.
    rootfs: Path | None
    #: Seconds before the whole container is killed; 0 means never.
    timeout: float = 0.0
    #: The cgroup limits that apply (memory in bytes, pids, cpus); ``None`` fields are unlimited.
    limits: Limits = Limits()
    #: The image the root filesystem came from, or None for a directory, a tarball or the host view.
    image: ImageInfo | None = None
    #: Inside: how to ask the parent about this container; None in the parent.
    _ask: Callable[[Kind, Any], Any] | None = dataclasses.field(default=None, compare=False, repr=False)

    def changes(self) -> list[Changed]:
        """What this test (and everything it started) added, changed or deleted in its root so far, sorted.

        The parent reads the container's copy-on-write layers and answers: the
        test has no door into them.  What the engine wrote before the test
        (``/etc/hosts``) is not the test's; ``/tmp``, ``/dev``, ``/proc``,
        ``/sys``, ``tmp_path`` and ``__pycache__`` are left out (see the README).
        """
        if self._ask is None:
            raise ChangesUnavailable("container.changes() works only inside an isolated test")
        answer = self._ask(Kind.CHANGES, None)
        if not isinstance(answer, dict) or "changes" not in answer:
            raise ChangesUnavailable(str(answer.get("error") if isinstance(answer, dict) else answer))
        if not answer.get("complete", True):
            raise ChangesUnavailable("; ".join(answer.get("problems", ())) or "the layers could not be read whole")
        return [Changed(str(kind), str(path)) for kind, path in answer["changes"]]
