"""Per-process state of pytest-lonely, kept in ``config.stash``.

Everything here is computed lazily and at most once per pytest process (one
per xdist worker): the availability probe, the engine with its long-lived
fds, the host layout and the mount plan for each distinct configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Final

import pytest

from . import _pytest_compat as compat
from .sandbox import archive, cgroup, image, probe, rootfs
from .sandbox.cache import FileMemo
from .sandbox.engine import Engine
from .sandbox.limits import Limits, Usage
from .settings import Rootfs, RunOptions, SettingError, Spec


@dataclasses.dataclass(frozen=True)
class Root:
    """A root filesystem ready to mount: its directory, and what an image adds."""

    path: Path
    #: The image's ``Env``, set inside over the inherited environment.
    env: tuple[tuple[str, str], ...] = ()
    image: image.Image | None = None


@dataclasses.dataclass
class Session:
    """Per-process state, kept in ``config.stash``."""

    config: pytest.Config
    defaults: Spec
    options: RunOptions
    rootless: bool = dataclasses.field(default_factory=lambda: os.geteuid() != 0)
    #: Why the plugin cannot work with this pytest at all (then every isolated test fails with it).
    disabled: str | None = compat.UNSUPPORTED
    #: Tests whose results a plugin keeps in-process and that the container could not hand back, by plugin.
    lost_results: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: What each isolated test used, for ``--lonely-usage``.
    usage: dict[str, Usage] = dataclasses.field(default_factory=dict)
    _availability: probe.Availability | None = None
    _engine: Engine | None = None
    _cgroups: cgroup.Manager | None = None
    _layout: rootfs.HostLayout | None = None
    _plans: dict[rootfs.PlanKey, rootfs.Plan] = dataclasses.field(default_factory=dict)
    _roots: dict[Rootfs, Root] = dataclasses.field(default_factory=dict)
    #: What the engine already read from image and tarball files, while they are unchanged.
    _images: FileMemo[image.Image] = dataclasses.field(default_factory=FileMemo)
    _tarball_keys: FileMemo[str] = dataclasses.field(default_factory=FileMemo)
    #: Bumped whenever the parent sets up or finishes a fixture or runs a test itself: a zygote forked
    #: before that is no faithful copy of the parent any more.
    generation: int = 0
    #: The container shared by the tests of a class, module, package or the session, while it serves them.
    group: Any = None
    _item_index: dict[int, int] | None = None

    def item_index(self, item: pytest.Item) -> int | None:
        """Where ``item`` is in the session's items, which a zygote's copy of the parent has too."""
        if self._item_index is None:
            self._item_index = {id(it): i for i, it in enumerate(item.session.items)}
        return self._item_index.get(id(item))

    def availability(self) -> probe.Availability:
        if self._availability is None:
            if self.disabled is not None:
                self._availability = probe.Availability(False, self.rootless, self.disabled)
            else:
                self._availability = probe.probe(self.rootless)
        return self._availability

    def engine(self) -> Engine:
        """The engine, built as :func:`engine_tuning` says."""
        if self._engine is None:
            prefork, hugepages = engine_tuning()
            self._engine = Engine(self.rootless, self.cgroups(), prefork=prefork, hugepages=hugepages)
        return self._engine

    def cgroups(self) -> cgroup.Manager:
        """This process's cgroup hierarchies, found on first use; the session's cgroups go at :meth:`close`."""
        if self._cgroups is None:
            self._cgroups = cgroup.Manager.discover()
        return self._cgroups

    def plan(self, rootfs_dir: Path | None, network: bool, tmp: bool) -> tuple[rootfs.PlanKey, rootfs.Plan]:
        """The mount plan; with ``tmp``, the session's basetemp is bound writable (see :meth:`basetemp`)."""
        writable = self.basetemp() if tmp else ()
        key = rootfs.PlanKey(None if rootfs_dir is None else str(rootfs_dir), self.rootless, network, writable)
        ops = self._plans.get(key)
        if ops is None:
            if self._layout is None:
                self._layout = rootfs.HostLayout.scan(self.config.rootpath)
            ops = self._plans[key] = rootfs.plan(self._layout, key)
        return key, ops

    def basetemp(self) -> tuple[str, ...]:
        """The session's basetemp, made on the host: the one window through which a container writes there.

        ``tmp_path`` then is a real directory under it, kept or removed by
        pytest's retention rules as in-process.  Made only once a test asks
        for a temporary directory, as pytest does.
        """
        factory = compat.tmp_path_factory(self.config)
        if factory is None:
            return ()
        return (os.path.realpath(factory.getbasetemp()),)

    def root(self, configured: Rootfs) -> Root:
        """The directory to use as root: the directory itself, or where its tarball or image was unpacked.

        Raises :class:`~pytest_lonely.sandbox.archive.ArchiveError` or
        :class:`~pytest_lonely.sandbox.image.ImageError`.
        """
        found = self._roots.get(configured)
        if found is None:
            if configured.image is not None:
                opened = image.open_image(str(configured), cache_dir(), memo=self._images)
                found = Root(opened.root, opened.env, opened)
                if opened.unpack_seconds and self.config.get_verbosity() > 0:
                    self._say(f"lonely: unpacked image {configured} in {opened.unpack_seconds:.2f} s")
            elif configured.path.is_dir():
                found = Root(configured.path)
            else:
                unpacked, _ = archive.unpack(configured.path, cache_dir(), memo=self._tarball_keys)
                found = Root(unpacked)
            self._roots[configured] = found
        return found

    def _say(self, line: str) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(line)

    def measure_usage(self) -> bool:
        """Whether containers get a cgroup just to measure them: ``--lonely-usage`` where that can be done."""
        return self.options.usage is not None and self.usage_unavailable() is None

    def usage_unavailable(self) -> str | None:
        if self.options.usage is None:
            return None
        return self.cgroups().why_not(Limits(), usage=True)

    def reap(self) -> None:
        """Stop the zygote and wait for every container, so no test ever sees a child of ours."""
        if self._engine is not None and self._engine.unreaped:
            self._engine.quiesce()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
        if self._cgroups is not None:
            with contextlib.suppress(cgroup.CgroupError, OSError):  # nothing of ours stays behind
                self._cgroups.cleanup()


SESSION_KEY: Final = pytest.StashKey[Session]()

#: The engine's tuning variables, for troubleshooting and benchmarks: name -> {value: meaning}.
_TUNING: Final = {
    "PYTEST_LONELY_PREBUILD": {"1": True, "0": False},
    "PYTEST_LONELY_HUGEPAGES": {"1": True, "0": False},
}


def engine_tuning() -> tuple[bool, bool]:
    """(containers may come from a zygote, pytest's heap goes on huge pages) from the environment.

    ``PYTEST_LONELY_PREBUILD`` and ``PYTEST_LONELY_HUGEPAGES``: ``1`` (the
    default) or ``0``.  Raises :class:`~pytest_lonely.settings.SettingError`.
    """
    chosen = []
    for name, values in _TUNING.items():
        value = os.environ.get(name, "1")
        if value not in values:
            raise SettingError(f"{name}={value!r} from the environment: use 1 (default) or 0")
        chosen.append(values[value])
    return chosen[0], chosen[1]


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
