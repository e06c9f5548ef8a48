"""What the adapter sends over the engine's pipe: symmetric encode/decode pairs.

Each kind of payload is encoded in the child and decoded in the parent by a
pair of functions side by side here, so the two ends cannot drift apart.  The
frame kinds themselves belong to :mod:`pytest_lonely.sandbox.protocol`.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

from . import _pytest_compat as compat
from .container import Container, ImageInfo
from .sandbox.limits import Limits

# --- reports ---------------------------------------------------------------------------------------


_FAILED_SUBTESTS = "_lonely_failed_subtests"


def encode_report(config: pytest.Config, report: pytest.TestReport) -> Any:
    """pytest's own serialisation, so plugin report types (subtests) cross as their plugin wants."""
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    failed = compat.failed_subtests(config, report)
    if failed and isinstance(data, dict):
        data[_FAILED_SUBTESTS] = failed
    return data


def decode_report(config: pytest.Config, data: Any) -> pytest.TestReport:
    failed = data.pop(_FAILED_SUBTESTS, 0) if isinstance(data, dict) else 0
    report: pytest.TestReport = config.hook.pytest_report_from_serializable(config=config, data=data)
    compat.restore_subtest_context(report, data)
    if failed:
        compat.set_failed_subtests(config, report, failed)
    return report


# --- warnings --------------------------------------------------------------------------------------


def encode_warning(w: warnings.WarningMessage) -> dict[str, Any]:
    category = w.category
    return {
        "message": str(w.message),
        "module": category.__module__,
        "qualname": category.__qualname__,
        "filename": str(w.filename),
        "lineno": int(w.lineno or 0),
    }


def decode_warning(payload: dict[str, Any]) -> warnings.WarningMessage:
    """The same category where it can be imported in the parent, else a UserWarning with the text."""
    category: type[Warning] = UserWarning
    try:
        found = getattr(importlib.import_module(payload["module"]), payload["qualname"])
        if isinstance(found, type) and issubclass(found, Warning):
            category = found
    except Exception:
        pass
    try:
        message: Warning = category(payload["message"])
    except Exception:
        message = UserWarning(payload["message"])
    return warnings.WarningMessage(message, category, payload["filename"], payload["lineno"])


# --- coverage --------------------------------------------------------------------------------------


def encode_coverage() -> tuple[str, dict[str, list[Any]]] | None:
    """The lines measured in the child, which ``os._exit`` would otherwise lose."""
    coverage = sys.modules.get("coverage")
    cov = coverage.Coverage.current() if coverage is not None else None
    if cov is None:
        return None
    cov.stop()
    data = cov.get_data()
    files = data.measured_files()
    if data.has_arcs():
        return ("arcs", {f: list(data.arcs(f) or ()) for f in files})
    return ("lines", {f: list(data.lines(f) or ()) for f in files})


def decode_coverage(payload: tuple[str, dict[str, list[Any]]]) -> None:
    """Merge into the parent's running coverage."""
    coverage = sys.modules.get("coverage")
    cov = coverage.Coverage.current() if coverage is not None else None
    if cov is None:
        return
    kind, measured = payload
    data = cov.get_data()
    if kind == "arcs":
        data.add_arcs({f: [tuple(a) for a in arcs] for f, arcs in measured.items()})
    else:
        data.add_lines(measured)


# --- the container description a zygote's container is handed ----------------------------------


def encode_container(container: Container) -> tuple[Any, ...]:
    """Plain data for GO: a container built ahead of time learns its description only then."""
    image = None if container.image is None else (container.image.reference, container.image.digest)
    limits = container.limits
    return (
        container.id,
        container.hostname,
        tuple(sorted(container.namespaces)),
        container.rootless,
        None if container.rootfs is None else str(container.rootfs),
        container.timeout,
        (limits.memory, limits.pids, limits.cpus),
        image,
    )


def decode_container(data: tuple[Any, ...]) -> Container:
    cid, hostname, names, rootless, root, timeout, (memory, pids, cpus), image = data
    return Container(
        id=cid,
        hostname=hostname,
        host_pid=0,
        namespaces=frozenset(names),
        rootless=rootless,
        rootfs=None if root is None else Path(root),
        timeout=timeout,
        limits=Limits(memory=memory, pids=pids, cpus=cpus),
        image=None if image is None else ImageInfo(reference=image[0], digest=image[1]),
    )
