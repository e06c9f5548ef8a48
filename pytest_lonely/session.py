"""Per-process state of pytest-lonely, kept in ``config.stash``.

Everything here is computed lazily and at most once per pytest process (one
per xdist worker): the availability probe, the launcher with its long-lived
fds, the host layout and the mount plan for each distinct configuration.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Final

import pytest

from .sandbox import archive, probe, rootfs
from .launcher import Launcher
from .sandbox.pool import NamespacePool
from .spec import Spec


@dataclasses.dataclass
class Session:
    """Per-process state, kept in ``config.stash``."""

    config: pytest.Config
    defaults: Spec
    isolate_all: bool
    unavailable: str
    rootless: bool = dataclasses.field(default_factory=lambda: os.geteuid() != 0)
    _availability: probe.Availability | None = None
    _launcher: Launcher | None = None
    _pool: NamespacePool | None = None
    _layout: rootfs.HostLayout | None = None
    _plans: dict[rootfs.PlanKey, tuple[rootfs.Op, ...]] = dataclasses.field(default_factory=dict)
    _unpacked: dict[Path, Path] = dataclasses.field(default_factory=dict)

    def availability(self) -> probe.Availability:
        if self._availability is None:
            self._availability = probe.probe(self.rootless)
        return self._availability

    def launcher(self) -> Launcher:
        if self._launcher is None:
            self._launcher = Launcher(self.rootless)
        return self._launcher

    def pool(self) -> NamespacePool | None:
        """Namespaces built ahead of time on a thread (root mode; ``PYTEST_LONELY_PREBUILD=0`` turns it off)."""
        if self._pool is None:
            if self.rootless or os.environ.get("PYTEST_LONELY_PREBUILD", "1") == "0":
                return None
            self._pool = NamespacePool()
        return self._pool if self._pool.broken is None else None

    def plan(self, rootfs_dir: Path | None, network: bool) -> tuple[rootfs.PlanKey, tuple[rootfs.Op, ...]]:
        key = rootfs.PlanKey(None if rootfs_dir is None else str(rootfs_dir), self.rootless, network)
        ops = self._plans.get(key)
        if ops is None:
            if self._layout is None:
                self._layout = rootfs.HostLayout.scan(self.config.rootpath)
            ops = self._plans[key] = rootfs.plan(self._layout, key)
        return key, ops

    def rootfs_dir(self, path: Path) -> Path:
        """The directory to use as root: ``path`` itself, or where its tarball was unpacked."""
        if path.is_dir():
            return path
        unpacked = self._unpacked.get(path)
        if unpacked is None:
            unpacked, _ = archive.unpack(path, cache_dir())
            self._unpacked[path] = unpacked
        return unpacked

    def reap(self) -> None:
        if self._launcher is not None:
            self._launcher.reap(block=True)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
        if self._launcher is not None:
            self._launcher.close()
            self._launcher = None


SESSION_KEY: Final = pytest.StashKey[Session]()


def cache_dir() -> Path:
    """Where unpacked tarballs live; shared by xdist workers and later runs."""
    configured = os.environ.get("PYTEST_LONELY_CACHE_DIR")
    if configured:
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    home = Path(xdg) if xdg else Path.home() / ".cache"
    if os.access(home.parent if not home.exists() else home, os.W_OK):
        return home / "pytest-lonely"
    return Path(tempfile.gettempdir()) / f"pytest-lonely-{os.getuid()}"
