"""The settings of one container, merged from marker > command line > ini.

Every knob is declared once in :data:`FIELDS`; parsing, validation, precedence
and the wording of errors all come from that table, so adding a marker keyword
is one line.  Nothing here touches the system: the parent builds a
:class:`Spec` before forking and the child only reads it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Final

TARBALL_SUFFIXES: Final = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class SpecError(ValueError):
    """A setting has a value we cannot use; the message names value, source and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a value came from, phrased for an error message."""

    kind: str  # "marker", "command line" or "ini"
    label: str  # e.g. "@pytest.mark.isolated(timeout=...)" or "--lonely-timeout"
    base: Path  # relative paths resolve against this directory

    def describe(self) -> str:
        return f"{self.label} ({self.kind})"


def _parse_hostname(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SpecError(f"must be a string, got {type(value).__name__}")
    encoded = value.encode("utf-8", "surrogateescape")
    if not 1 <= len(encoded) <= 64:
        raise SpecError("must be 1 to 64 bytes long")
    if not all(_HOSTNAME_LABEL.match(label) for label in value.split(".")):
        raise SpecError("allowed are dot-separated labels of letters, digits and inner hyphens (RFC 1123)")
    return value


def _parse_timeout(value: object) -> float:
    if isinstance(value, bool):
        raise SpecError("must be a number of seconds, got a bool")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SpecError("must be a number of seconds (0 means no timeout)") from None
    if not isinstance(value, (int, float)):
        raise SpecError(f"must be a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise SpecError("must be a finite number of seconds >= 0 (0 means no timeout)")
    return float(value)


_TRUE = {"1", "true", "yes", "on", "host"}
_FALSE = {"0", "false", "no", "off", "none"}


def _parse_network(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise SpecError(
        "allowed are True (share the host network, also 'host') or False (private loopback only, also 'none')"
    )


def _parse_rootfs(value: object, source: Source) -> Path | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, Path)):
        raise SpecError(f"must be a path to a directory or a tarball, got {type(value).__name__}")
    path = (source.base / Path(value).expanduser()).resolve()
    if not path.exists():
        raise SpecError(f"resolved to {str(path)!r}, which does not exist")
    if path.is_dir():
        return path
    if not path.is_file() or not path.name.endswith(TARBALL_SUFFIXES):
        raise SpecError(
            f"resolved to {str(path)!r}, which is neither a directory nor a tarball ({', '.join(TARBALL_SUFFIXES)})"
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SpecError(f"resolved to {str(path)!r}, which cannot be read: {exc.strerror}") from None
    return path


@dataclasses.dataclass(frozen=True)
class Field:
    """One setting: its marker keyword, its command-line option, its ini key and how to parse it."""

    name: str
    parse: Callable[[object, Source], Any]
    cli: str | None
    ini: str | None
    default: Any
    help: str


FIELDS: Final[tuple[Field, ...]] = (
    Field(
        "hostname", lambda v, s: _parse_hostname(v), None, None, None, "UTS hostname inside (default: the container id)"
    ),
    Field(
        "rootfs",
        _parse_rootfs,
        "--lonely-rootfs",
        "lonely_rootfs",
        None,
        "root filesystem: a directory or tarball (default: copy-on-write view of the host)",
    ),
    Field(
        "timeout",
        lambda v, s: _parse_timeout(v),
        "--lonely-timeout",
        "lonely_timeout",
        0.0,
        "seconds before the whole container is killed; 0 means none",
    ),
    Field(
        "network",
        lambda v, s: _parse_network(v),
        "--lonely-network",
        "lonely_network",
        True,
        "share the host network (host) or get a private loopback-only one (none)",
    ),
)
FIELD_NAMES: Final = tuple(f.name for f in FIELDS)


@dataclasses.dataclass(frozen=True)
class Spec:
    """The settings of one container.  ``rootfs`` is resolved; a tarball is unpacked later by the parent."""

    hostname: str | None = None
    rootfs: Path | None = None
    timeout: float = 0.0
    network: bool = True
    #: Where each non-default value came from, for errors found later (a corrupt tarball).
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def origin(self, name: str) -> str:
        return self.origins.get(name, "the default")

    def with_marker(self, args: tuple[object, ...], kwargs: Mapping[str, object], where: str, rootdir: Path) -> Spec:
        """Apply one ``isolated`` marker on top of these settings."""
        if args:
            raise SpecError(
                f"@pytest.mark.isolated{args!r} on {where}: positional arguments are not accepted; "
                f"use keywords: {', '.join(FIELD_NAMES)}"
            )
        unknown = sorted(set(kwargs) - set(FIELD_NAMES))
        if unknown:
            name = unknown[0]
            raise SpecError(
                f"@pytest.mark.isolated({name}={kwargs[name]!r}) on {where}: unknown keyword {name!r}; "
                f"allowed are: {', '.join(FIELD_NAMES)}"
            )
        changes: dict[str, Any] = {}
        origins = dict(self.origins)
        for field in FIELDS:
            if field.name in kwargs:
                source = Source("marker", f"@pytest.mark.isolated({field.name}=...) on {where}", rootdir)
                changes[field.name] = _apply(field, kwargs[field.name], source)
                origins[field.name] = source.describe()
        return dataclasses.replace(self, **changes, origins=origins) if changes else self


def _apply(field: Field, value: object, source: Source) -> Any:
    try:
        return field.parse(value, source)
    except SpecError as exc:
        raise SpecError(f"{field.name}={value!r} from {source.describe()}: {exc}") from None


def defaults_from(
    cli_values: Mapping[str, object | None],
    ini_values: Mapping[str, object | None],
    rootdir: Path,
    inidir: Path,
) -> Spec:
    """Build the session-wide defaults: the command line wins over the ini.

    ``cli_values`` and ``ini_values`` are keyed by field name; ``None`` or an
    empty string means "not given here".  Raises :class:`SpecError` naming the
    option or ini key, which the plugin turns into a usage error.
    """
    changes: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for field in FIELDS:
        cli = cli_values.get(field.name)
        ini = ini_values.get(field.name)
        source = None
        if cli is not None and cli != "" and field.cli:
            source, value = Source("command line", field.cli, rootdir), cli
        elif ini is not None and ini != "" and field.ini:
            source, value = Source("ini", field.ini, inidir), ini
        if source is not None:
            changes[field.name] = _apply(field, value, source)
            origins[field.name] = source.describe()
    return Spec(**changes, origins=origins)
