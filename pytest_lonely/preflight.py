"""Everything decided about an isolated test before anything is forked.

The settings from the markers, whether containers can be made at all, the
root filesystem (a tarball is unpacked here, once), and from those the
engine's :class:`~pytest_lonely.sandbox.spec.ContainerSpec` and the public
:class:`~pytest_lonely.Container`.  Any problem becomes a sentence for a
setup error (or skip) of that test alone.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Final

import pytest

from . import _pytest_compat as compat
from .container import Container
from .sandbox import archive, cgroup
from .sandbox.spec import ContainerSpec
from .session import SESSION_KEY, Session
from .settings import MARKER, SettingError, Spec

#: Fixtures that hand out directories under the session's basetemp.
_TMP_FIXTURES: Final = ("tmp_path", "tmpdir", "tmp_path_factory", "tmpdir_factory")


@dataclasses.dataclass(frozen=True)
class Ready:
    """A test that can be launched."""

    spec: Spec
    container: Container
    engine_spec: ContainerSpec


@dataclasses.dataclass(frozen=True)
class Refused:
    """A test that cannot be launched, and why, phrased for its report."""

    message: str
    skip: bool = False


def spec_for(item: pytest.Item, defaults: Spec) -> Spec:
    """The closest marker wins, keyword by keyword."""
    spec = defaults
    for mark in reversed(list(item.iter_markers(MARKER))):
        spec = spec.with_marker(tuple(mark.args), mark.kwargs, item.nodeid, item.config.rootpath)
    return spec


def prepare(item: pytest.Item) -> Ready | Refused:
    state: Session = item.config.stash[SESSION_KEY]
    try:
        spec = spec_for(item, state.defaults)
    except SettingError as exc:
        return Refused(str(exc))
    if spec.privileged and state.rootless:
        return Refused(
            f"privileged=True from {spec.origin('privileged')}: rootless mode has no host root to give "
            "(pytest runs as an unprivileged user); drop privileged, or run pytest as root"
        )
    availability = state.availability()
    if not availability.ok:
        return Refused(f"isolation unavailable: {availability.reason}", skip=state.options.unavailable == "skip")
    try:
        root = None if spec.rootfs is None else state.rootfs_dir(spec.rootfs)
    except archive.ArchiveError as exc:
        return Refused(f"rootfs={str(spec.rootfs)!r} from {spec.origin('rootfs')}: {exc}")
    fixturenames = getattr(item, "fixturenames", ())
    key, plan = state.plan(root, spec.network, tmp=any(name in fixturenames for name in _TMP_FIXTURES))
    cid = os.urandom(6).hex()
    hostname = spec.hostname or cid
    limits = spec.limits
    if limits:
        why = cgroup.manager().why_not(limits)
        if why is not None:
            asked = ", ".join(
                f"{name}={getattr(spec, name)!r} from {spec.origin(name)}"
                for name in ("memory", "pids", "cpus")
                if getattr(spec, name) is not None
            )
            return Refused(f"{asked}: cannot limit the container: {why}")
    engine_spec = ContainerSpec(
        id=cid,
        hostname=hostname,
        rootless=state.rootless,
        network=spec.network,
        plan_key=key,
        plan=plan,
        timeout=spec.timeout,
        cwd=os.getcwd(),
        limits=limits,
        usage=state.measure_usage(),
        privileged=spec.privileged,
        keep_fds=compat.capture_fds(item.config),
    )
    container = Container(
        id=cid,
        hostname=hostname,
        host_pid=0,
        namespaces=engine_spec.namespaces,
        rootless=state.rootless,
        rootfs=spec.rootfs,
        timeout=spec.timeout,
        limits=limits,
    )
    _note_lost_results(item, state)
    return Ready(spec, container, engine_spec)


def _note_lost_results(item: pytest.Item, state: Session) -> None:
    """Plugins that keep per-session results in the test process lose an isolated test's results: say so."""
    pm = item.config.pluginmanager
    fixturenames = getattr(item, "fixturenames", ())
    if "benchmark" in fixturenames and (pm.has_plugin("benchmark") or pm.has_plugin("pytest_benchmark")):
        state.lost_results.setdefault("pytest-benchmark", []).append(item.nodeid)
    if item.config.getoption("hypothesis_show_statistics", False) and getattr(
        getattr(item, "obj", None), "is_hypothesis_test", False
    ):
        state.lost_results.setdefault("hypothesis (--hypothesis-show-statistics)", []).append(item.nodeid)
