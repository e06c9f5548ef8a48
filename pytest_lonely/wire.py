"""What the adapter sends over the engine's pipe: symmetric encode/decode pairs.

Each kind of payload is encoded in the child and decoded in the parent by a
pair of functions side by side here, so the two ends cannot drift apart.  The
frame kinds themselves belong to :mod:`pytest_lonely.sandbox.protocol`.

The decoding side reads what a possibly hostile test wrote: every decoder
checks the shape of what it is given and raises
:class:`~pytest_lonely.sandbox.protocol.ProtocolError` naming what is wrong,
and none of them imports, evaluates or acts on a name it was sent.
"""

from __future__ import annotations

import builtins
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import pytest

from . import _pytest_compat as compat
from .container import Container, ImageInfo
from .sandbox.limits import Limits
from .sandbox.protocol import ProtocolError

# --- reports ---------------------------------------------------------------------------------------


_FAILED_SUBTESTS: Final = "_lonely_failed_subtests"
#: Captured output a report may carry across, in bytes of UTF-8: a passing test that printed 300 MB keeps
#: the end of it, with a note, rather than failing or exhausting the parent's memory.
SECTION_BUDGET: Final = 48 << 20
#: Phases a test report may name, in pytest's order.
PHASES: Final = ("setup", "call", "teardown")


_TUPLE: Final = "__lonely_tuple__"
_JSON_SCALARS: Final = (str, int, float, bool, type(None))


def crosses(value: object) -> bool:
    """Whether a ``record_property`` value arrives in the parent as it was (JSON, or a tuple of JSON)."""
    if type(value) in _JSON_SCALARS:
        return True
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return all(crosses(v) and type(v) is not tuple for v in value)
    if isinstance(value, dict) and type(value) is dict:
        return all(type(k) is str and crosses(v) and type(v) is not tuple for k, v in value.items())
    return False


def encode_report(config: pytest.Config, report: pytest.TestReport) -> Any:
    """pytest's own serialisation, so plugin report types (subtests) cross as their plugin wants."""
    data = config.hook.pytest_report_to_serializable(config=config, report=report)
    failed = compat.failed_subtests(config, report)
    if isinstance(data, dict):
        if failed:
            data[_FAILED_SUBTESTS] = failed
        properties = data.get("user_properties")
        if isinstance(properties, list):
            data["user_properties"] = [
                (name, {_TUPLE: list(value)} if type(value) is tuple else value) for name, value in properties
            ]
        _fit_sections(data)
    return data


def _fit_sections(data: dict[str, Any]) -> None:
    """Cut the captured output of a report down to :data:`SECTION_BUDGET`, keeping each section's end."""
    sections = data.get("sections")
    if not isinstance(sections, list):
        return
    texts = [content for _, content in sections if isinstance(content, str)]
    if sum(map(len, texts)) * 4 <= SECTION_BUDGET:  # the common case: no need to measure in bytes
        return
    if sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) <= SECTION_BUDGET:
        return
    keep_each = SECTION_BUDGET // 4 // max(1, len(sections))  # in characters: at most 4 bytes each
    fitted = []
    for title, content in sections:
        if isinstance(content, str) and len(content) > keep_each:
            cut = len(content) - keep_each
            note = (
                f"[pytest-lonely: the first {cut} characters of this section were cut; a report crosses "
                f"from the container with at most {SECTION_BUDGET >> 20} MiB of captured output]\n"
            )
            fitted.append((title, note + content[cut:]))
        else:
            fitted.append((title, content))
    data["sections"] = fitted


def shrink_longrepr(data: Any, limit: int) -> Any:
    """A report whose failure text alone is over the frame limit keeps that text's head and tail."""
    if isinstance(data, dict) and "longrepr" in data and data["longrepr"] is not None:
        text = str(data["longrepr"])
        if len(text) > limit:
            text = f"{text[: limit // 2]}\n[pytest-lonely: {len(text) - limit} characters cut]\n{text[-limit // 2 :]}"
        data = {**data, "longrepr": text}
    return data


def decode_report(config: pytest.Config, data: Any) -> pytest.TestReport:
    """A report from the container; what pytest cannot read back is refused, naming why."""
    if not isinstance(data, dict):
        raise ProtocolError(f"a report must be a mapping, got {type(data).__name__}")
    failed = data.pop(_FAILED_SUBTESTS, 0)
    _restore_tuples(data)
    try:
        report = config.hook.pytest_report_from_serializable(config=config, data=data)
    except Exception as exc:
        raise ProtocolError(f"a report pytest cannot read back ({type(exc).__name__}: {exc})") from None
    if not isinstance(report, pytest.TestReport):
        raise ProtocolError(f"a report of type {type(report).__name__}, not a test report")
    compat.restore_subtest_context(report, data)
    if isinstance(failed, int) and failed > 0:
        compat.set_failed_subtests(config, report, failed)
    return report


def _restore_tuples(data: dict[str, Any]) -> None:
    """JSON has no tuples; pytest and its readers insist on some (a skip's ``longrepr``, ``location``)."""
    for key in ("location", "longrepr"):
        value = data.get(key)
        if type(value) is list:
            data[key] = tuple(value)
    sections = data.get("sections")
    if type(sections) is list:
        data["sections"] = [tuple(v) if type(v) is list else v for v in sections]
    properties = data.get("user_properties")
    if type(properties) is list:
        data["user_properties"] = [_property(v) for v in properties]


def _property(entry: Any) -> Any:
    if type(entry) is list and len(entry) == 2:
        name, value = entry
        if type(value) is dict and list(value) == [_TUPLE] and type(value[_TUPLE]) is list:
            value = tuple(value[_TUPLE])
        return (name, value)
    return entry


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


def decode_warning(payload: Any) -> warnings.WarningMessage:
    """The same category where the parent already has that class, else a UserWarning with the text.

    The category is looked up among classes that exist already: builtins, and
    the namespaces of modules in ``sys.modules``, read with ``vars()`` (a
    module's ``__getattr__`` may import).  A name is never imported.
    """
    if not isinstance(payload, dict):
        raise ProtocolError(f"a warning must be a mapping, got {type(payload).__name__}")
    message, module, qualname = (payload.get(k) for k in ("message", "module", "qualname"))
    filename, lineno = payload.get("filename"), payload.get("lineno")
    if not all(isinstance(v, str) for v in (message, module, qualname, filename)) or type(lineno) is not int:
        raise ProtocolError("a warning needs str message, module, qualname and filename and an int lineno")
    category = _known_warning_class(str(module), str(qualname))
    try:
        instance: Warning = category(message)
    except Exception:
        category, instance = UserWarning, UserWarning(message)
    return warnings.WarningMessage(instance, category, str(filename), lineno)


def _known_warning_class(module: str, qualname: str) -> type[Warning]:
    namespace: Any = vars(builtins) if module == "builtins" else None
    found = sys.modules.get(module)
    if namespace is None and found is not None:
        namespace = vars(found)
    value: Any = None
    for part in qualname.split("."):
        if not isinstance(namespace, Mapping):
            return UserWarning
        value = namespace.get(part)
        namespace = vars(value) if isinstance(value, type) else None
    if isinstance(value, type) and issubclass(value, Warning):
        return value
    return UserWarning


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


def decode_coverage(payload: Any) -> None:
    """Merge into the parent's running coverage, after checking that it is what coverage.py made."""
    if not (isinstance(payload, list) and len(payload) == 2 and payload[0] in ("lines", "arcs")):
        raise ProtocolError("coverage data must be ['lines' or 'arcs', {filename: [...]}]")
    kind, measured = payload
    if not isinstance(measured, dict) or not all(
        isinstance(f, str) and isinstance(v, list) for f, v in measured.items()
    ):
        raise ProtocolError("coverage data must map file names to lists")
    if kind == "arcs":
        if not all(
            type(a) is list and len(a) == 2 and all(type(n) is int for n in a) for v in measured.values() for a in v
        ):
            raise ProtocolError("coverage arcs must be pairs of line numbers")
        merged: dict[str, list[Any]] = {f: [tuple(a) for a in arcs] for f, arcs in measured.items()}
    else:
        if not all(type(n) is int for v in measured.values() for n in v):
            raise ProtocolError("coverage lines must be line numbers")
        merged = measured
    coverage = sys.modules.get("coverage")
    cov = coverage.Coverage.current() if coverage is not None else None
    if cov is None:
        return
    data = cov.get_data()
    if kind == "arcs":
        data.add_arcs(merged)
    else:
        data.add_lines(merged)


# --- the container description a container is handed with its order ----------------------------


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


def decode_container(data: Any) -> Container:
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
