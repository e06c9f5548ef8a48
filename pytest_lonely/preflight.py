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
from .container import Container, ImageInfo
from .sandbox import archive, image
from .sandbox.spec import ContainerSpec
from .session import SESSION_KEY, Root, Session
from .settings import MARKER, SettingError, Spec

#: Asking for it isolates a test.
CONTAINER_FIXTURE: Final = "container"
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


def is_isolated(item: pytest.Item) -> bool:
    """Marked, asking for the ``container`` fixture, or everything under ``--lonely-all``."""
    state = item.config.stash[SESSION_KEY]
    return (
        state.options.all
        or item.get_closest_marker(MARKER) is not None
        or CONTAINER_FIXTURE in getattr(item, "fixturenames", ())
    )


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
    if state.disabled is not None:
        return Refused(f"lonely: disabled: {state.disabled}", skip=state.options.unavailable == "skip")
    if spec.privileged and state.rootless:
        return Refused(
            f"privileged=True from {spec.origin('privileged')}: rootless mode has no host root to give "
            "(pytest runs as an unprivileged user); drop privileged, or run pytest as root"
        )
    availability = state.availability()
    if not availability.ok:
        return Refused(f"isolation unavailable: {availability.reason}", skip=state.options.unavailable == "skip")
    try:
        root = None if spec.rootfs is None else state.root(spec.rootfs)
    except (archive.ArchiveError, image.ImageError) as exc:
        return Refused(f"rootfs={str(spec.rootfs)!r} from {spec.origin('rootfs')}: {exc}")
    fixturenames = getattr(item, "fixturenames", ())
    # A container shared by several tests binds the basetemp whatever its first test asks for.
    tmp = spec.scope != "function" or any(name in fixturenames for name in _TMP_FIXTURES)
    key, plan = state.plan(None if root is None else root.path, spec.network, tmp=tmp)
    cid = os.urandom(6).hex()
    while cid.isdigit():  # the default hostname: glibc's gethostbyname() reads a name of digits as an address
        cid = os.urandom(6).hex()
    hostname = spec.hostname or cid
    limits = spec.limits
    if limits:
        why = state.cgroups().why_not(limits)
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
        env=() if root is None else root.env,
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
        rootfs=None if spec.rootfs is None else spec.rootfs.path,
        timeout=spec.timeout,
        limits=limits,
        image=_image_info(root),
    )
    _note_lost_results(item, state)
    return Ready(spec, container, engine_spec)


def _image_info(root: Root | None) -> ImageInfo | None:
    opened = None if root is None else root.image
    if opened is None:
        return None
    return ImageInfo(reference=opened.reference, digest=opened.manifest_digest or opened.config_digest)


def _note_lost_results(item: pytest.Item, state: Session) -> None:
    """Plugins that keep per-session results in the test process lose an isolated test's results: say so."""
    pm = item.config.pluginmanager
    fixturenames = getattr(item, "fixturenames", ())
    benchmarking = pm.has_plugin("benchmark") or pm.has_plugin("pytest_benchmark")
    skipped = item.config.getoption("benchmark_disable", False) or item.config.getoption("benchmark_skip", False)
    if "benchmark" in fixturenames and benchmarking and not skipped:
        state.lost_results.setdefault("pytest-benchmark", []).append(item.nodeid)


def note_lost_example(item: pytest.Item, failed: bool, state: Session) -> None:
    """hypothesis saves a failing example in its database under the rootdir, which is copy-on-write inside."""
    if failed and getattr(getattr(item, "obj", None), "is_hypothesis_test", False):
        state.lost_results.setdefault("hypothesis (its example database)", []).append(item.nodeid)
