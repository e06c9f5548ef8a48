"""Every setting of pytest-lonely, described once, merged from marker > command line > ini.

Each setting is one field of :class:`Spec` (per test: marker, command line,
ini) or of :class:`RunOptions` (per run: command line, ini), declared with
:func:`setting`.  The command-line options, the ini keys, the marker's
``--markers`` text, the validation and the wording of errors all come from
that one declaration, so adding a marker keyword is one field plus the code
that uses it.  Nothing here touches the system: the parent builds a
:class:`Spec` before forking.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, Literal

from .sandbox import image
from .sandbox.limits import Limits, parse_cpus, parse_memory, parse_pids

MARKER: Final = "isolated"

TARBALL_SUFFIXES: Final = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


class SettingError(ValueError):
    """A setting has a value we cannot use; the message names value, source and what is allowed."""


SourceKind = Literal["marker", "command line", "ini"]


@dataclasses.dataclass(frozen=True)
class Source:
    """Where a value came from, phrased for an error message."""

    kind: SourceKind
    label: str  # e.g. "@pytest.mark.isolated(timeout=...) on test_x.py::test" or "--lonely-timeout"
    base: Path  # relative paths resolve against this directory

    def describe(self) -> str:
        return f"{self.label} ({self.kind})"


Parse = Callable[[object, Source], Any]


@dataclasses.dataclass(frozen=True)
class Setting:
    """How one field is spelled in each place, parsed, and explained."""

    parse: Parse
    help: str
    cli: str | None = None
    ini: str | None = None
    metavar: str | None = None
    #: A command-line flag without a value (``store_true``), a bool ini key.
    flag: bool = False
    #: How the marker keyword is shown in ``--markers``; None: not a marker keyword.
    marker: str | None = None


def setting(default: Any, **how: Any) -> Any:
    """A dataclass field whose metadata carries its :class:`Setting`."""
    return dataclasses.field(default=default, metadata={"setting": Setting(**how)})


def settings_of(cls: type) -> Iterator[tuple[str, Setting]]:
    """The fields of ``cls`` that are settings (``Spec.origins`` is bookkeeping, not one)."""
    for f in dataclasses.fields(cls):
        how = f.metadata.get("setting")
        if how is not None:
            yield f.name, how


# --- parsers: each raises SettingError with the "what is allowed" part of the message -------------


def _hostname(value: object, source: Source) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise SettingError(f"must be a string, got {type(value).__name__}")
    encoded = value.encode("utf-8", "surrogateescape")
    if not 1 <= len(encoded) <= 64:
        raise SettingError("must be 1 to 64 bytes long")
    if not all(_HOSTNAME_LABEL.match(label) for label in value.split(".")):
        raise SettingError("allowed are dot-separated labels of letters, digits and inner hyphens (RFC 1123)")
    return value


def _timeout(value: object, source: Source) -> float:
    if isinstance(value, bool):
        raise SettingError("must be a number of seconds, got a bool")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise SettingError("must be a number of seconds (0 means no timeout)") from None
    if not isinstance(value, (int, float)):
        raise SettingError(f"must be a number of seconds, got {type(value).__name__}")
    if math.isnan(value) or math.isinf(value) or value < 0:
        raise SettingError("must be a finite number of seconds >= 0 (0 means no timeout)")
    return float(value)


def _network(value: object, source: Source) -> bool:
    if source.kind == "marker":
        if isinstance(value, bool):
            return value
        raise SettingError("allowed are True (share the host network) or False (private network with only lo)")
    text = str(value).strip().lower()
    if text in ("host", "none"):
        return text == "host"
    raise SettingError("allowed are 'host' (share the host network) or 'none' (private network with only lo)")


@dataclasses.dataclass(frozen=True)
class Rootfs:
    """A root filesystem as configured: a directory, a tarball of one, or an image (with its tag, if given)."""

    path: Path
    #: The tag after ``PATH:``, for a layout or archive that holds several images.
    tag: str | None = None
    #: ``oci-layout``, ``oci-archive``, ``docker-archive`` or ``docker-dir``; None for a root tree or its tarball.
    image: str | None = None

    def __str__(self) -> str:
        return f"{self.path}:{self.tag}" if self.tag else str(self.path)


@functools.lru_cache(maxsize=64)
def _detect(path: Path, size: int, mtime_ns: int) -> str | None:
    """What kind of image ``path`` is, from its content; cached, since markers are read for every test."""
    return image.detect(path)


def _rootfs(value: object, source: Source) -> Rootfs | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, Path)):
        raise SettingError(f"must be a path to a directory, a tarball or an image, got {type(value).__name__}")
    try:
        found, tag = image.split_reference(str(value), base=source.base)
    except image.ImageError:
        whole = (source.base / Path(value).expanduser()).resolve()
        raise SettingError(f"resolved to {str(whole)!r}, which does not exist") from None
    path = found.resolve()
    try:
        st = path.stat()
        kind = _detect(path, st.st_size, st.st_mtime_ns)
    except OSError as exc:
        raise SettingError(f"resolved to {str(path)!r}, which cannot be read: {exc.strerror}") from None
    if kind is not None:
        return Rootfs(path, tag, kind)
    if tag is not None:
        raise SettingError(
            f"{str(path)!r} is neither an OCI image layout nor a 'docker save' archive, so it has no tag {tag!r}"
        )
    if path.is_dir():
        return Rootfs(path)
    if not path.is_file() or not path.name.endswith(TARBALL_SUFFIXES):
        raise SettingError(
            f"resolved to {str(path)!r}, which is neither a directory, an image (OCI layout, 'docker save' "
            f"archive) nor a tarball ({', '.join(TARBALL_SUFFIXES)})"
        )
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise SettingError(f"resolved to {str(path)!r}, which cannot be read: {exc.strerror}") from None
    return Rootfs(path)


def _limit(parse: Callable[[Any], Any]) -> Parse:
    """A cgroup limit: ``None`` (marker) or ``none`` (command line, ini) means no limit, which lifts one set wider."""

    def parse_limit(value: object, source: Source) -> Any:
        if value is None and source.kind == "marker":
            return None
        if isinstance(value, str) and value.strip().lower() == "none" and source.kind != "marker":
            return None
        try:
            return parse(value)
        except ValueError as exc:
            lift = "None" if source.kind == "marker" else "'none'"
            raise SettingError(f"{exc}; or {lift} for no limit") from None

    return parse_limit


def _usage(value: object, source: Source) -> int | None:
    text = str(value).strip()
    if not text.isdigit():
        raise SettingError("must be a whole number of tests to show, 0 for all")
    return int(text)


def _flag(value: object, source: Source) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise SettingError("allowed are true or false")


#: What one container may serve, narrowest first: pytest's fixture scopes.
SCOPES: Final = ("function", "class", "module", "package", "session")


def _scope(value: object, source: Source) -> str:
    if source.kind == "marker" and not isinstance(value, str):
        raise SettingError(f"must be a string, got {type(value).__name__}; allowed are {', '.join(SCOPES)}")
    text = str(value).strip().lower()
    if text not in SCOPES:
        raise SettingError(f"allowed are {', '.join(SCOPES)}")
    return text


def _choice(*allowed: str) -> Parse:
    def parse(value: object, source: Source) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise SettingError(f"allowed are {', '.join(allowed[:-1])} or {allowed[-1]}")
        return text

    return parse


# --- the settings ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """The settings of one container.  ``rootfs`` is resolved; a tarball is unpacked later by the parent."""

    hostname: str | None = setting(
        None, parse=_hostname, marker="hostname=None", help="UTS hostname inside (default: the container id)"
    )
    rootfs: Rootfs | None = setting(
        None,
        parse=_rootfs,
        cli="--lonely-rootfs",
        ini="lonely_rootfs",
        metavar="PATH",
        marker="rootfs=None",
        help="root filesystem: a directory, a tarball, an OCI image layout or a 'docker save' archive, "
        "optionally PATH:TAG (default: a copy-on-write view of the host)",
    )
    timeout: float = setting(
        0.0,
        parse=_timeout,
        cli="--lonely-timeout",
        ini="lonely_timeout",
        metavar="SECONDS",
        marker="timeout=None",
        help="seconds before the whole container is killed; 0 means never (default: 0)",
    )
    network: bool = setting(
        True,
        parse=_network,
        cli="--lonely-network",
        ini="lonely_network",
        metavar="host|none",
        marker="network=None",
        help="host: share the host's network (default); none: own network namespace with only lo",
    )
    memory: int | None = setting(
        None,
        parse=_limit(parse_memory),
        cli="--lonely-memory",
        ini="lonely_memory",
        metavar="SIZE",
        marker="memory=None",
        help="memory limit of the whole container (bytes, or with K, M or G: binary units), swap included; "
        "none for no limit (default: none)",
    )
    pids: int | None = setting(
        None,
        parse=_limit(parse_pids),
        cli="--lonely-pids",
        ini="lonely_pids",
        metavar="N",
        marker="pids=None",
        help="most processes (and threads) the container may have at once; none for no limit (default: none)",
    )
    cpus: float | None = setting(
        None,
        parse=_limit(parse_cpus),
        cli="--lonely-cpus",
        ini="lonely_cpus",
        metavar="CPUS",
        marker="cpus=None",
        help="CPU time per wall-clock second, in CPUs (1.5: one and a half); none for no limit (default: none)",
    )
    privileged: bool = setting(
        False,
        parse=_flag,
        cli="--lonely-privileged",
        ini="lonely_privileged",
        flag=True,
        marker="privileged=False",
        help="root mode only: run as host root with every capability, no user namespace, mounts not locked: "
        "the test can change the host's kernel settings, devices, network and clock; only file writes stay "
        "in the overlay (default: false)",
    )
    scope: str = setting(
        "function",
        parse=_scope,
        cli="--lonely-scope",
        ini="lonely_scope",
        metavar="|".join(SCOPES),
        marker='scope="function"',
        help="how many tests share one container: consecutive isolated tests of the same class, module, "
        "package or the session, with the same container keywords, run one after another in one container, "
        "where the fixtures of that scope live too (default: function, a container per test)",
    )
    #: Where each non-default value came from, for errors found later (a corrupt tarball).
    origins: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def origin(self, name: str) -> str:
        return self.origins.get(name, "the default")

    @property
    def limits(self) -> Limits:
        return Limits(memory=self.memory, pids=self.pids, cpus=self.cpus)

    def container_keywords(self) -> tuple[Any, ...]:
        """What must be equal for two tests to share a container (the timeout is each test's own)."""
        return (self.rootfs, self.hostname, self.network, self.memory, self.pids, self.cpus, self.privileged)

    def with_marker(self, args: tuple[object, ...], kwargs: Mapping[str, object], where: str, rootdir: Path) -> Spec:
        """Apply one ``isolated`` marker on top of these settings."""
        keywords = MARKER_KEYWORDS
        if args:
            raise SettingError(
                f"@pytest.mark.{MARKER}{args!r} on {where}: positional arguments are not accepted; "
                f"use keywords: {', '.join(keywords)}"
            )
        unknown = sorted(set(kwargs) - set(keywords))
        if unknown:
            name = unknown[0]
            raise SettingError(
                f"@pytest.mark.{MARKER}({name}={kwargs[name]!r}) on {where}: unknown keyword {name!r}; "
                f"allowed are: {', '.join(keywords)}"
            )
        changes: dict[str, Any] = {}
        origins = dict(self.origins)
        for name, how in spec_settings():
            if name in kwargs:
                source = Source("marker", f"@pytest.mark.{MARKER}({name}=...) on {where}", rootdir)
                changes[name] = _apply(name, how, kwargs[name], source)
                origins[name] = source.describe()
        return dataclasses.replace(self, **changes, origins=origins) if changes else self


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Settings of the whole run, not of one container: command line > ini."""

    all: bool = setting(False, parse=_flag, cli="--lonely-all", ini="lonely_all", flag=True, help="isolate every test")
    unavailable: str = setting(
        "fail",
        parse=_choice("fail", "skip"),
        cli="--lonely-unavailable",
        ini="lonely_unavailable",
        metavar="fail|skip",
        help="what isolated tests do where containers cannot be made (default: fail)",
    )
    keep: str = setting(
        "none",
        parse=_choice("none", "failed", "all"),
        cli="--lonely-keep",
        ini="lonely_keep",
        metavar="none|failed|all",
        help="copy what the chosen isolated tests added or changed in their root, with a list of what they "
        "deleted, into a directory under the session's basetemp, and name it in the report (default: none)",
    )
    usage: int | None = setting(
        None,
        parse=_usage,
        cli="--lonely-usage",
        ini="lonely_usage",
        metavar="N",
        help="at the end, show the N isolated tests with the highest peak memory, with their CPU time and "
        "most processes (0: all)",
    )


def spec_settings() -> Iterator[tuple[str, Setting]]:
    return settings_of(Spec)


MARKER_KEYWORDS: Final = tuple(name for name, how in spec_settings() if how.marker)


def all_settings() -> Iterator[tuple[str, Setting]]:
    """Every setting with a command-line option or an ini key, in the order the help shows them."""
    yield from spec_settings()
    yield from settings_of(RunOptions)


def marker_help() -> str:
    """The ``--markers`` line for ``isolated``, made from the same declarations."""
    signature = ", ".join(how.marker for _, how in spec_settings() if how.marker)
    return (
        f"{MARKER}({signature}): run this test in its own container (PID, mount, UTS and IPC namespaces, "
        "throwaway root filesystem). See pytest-lonely."
    )


def option_dest(cli: str) -> str:
    return cli.lstrip("-").replace("-", "_")


def _apply(name: str, how: Setting, value: object, source: Source) -> Any:
    try:
        return how.parse(value, source)
    except SettingError as exc:
        raise SettingError(f"{name}={value!r} from {source.describe()}: {exc}") from None


def _given(value: object) -> bool:
    return value is not None and value != "" and value is not False


def from_config(
    getoption: Callable[[str], object], getini: Callable[[str], object], rootdir: Path, inidir: Path
) -> tuple[Spec, RunOptions]:
    """Build the run-wide defaults: the command line wins over the ini.

    Raises :class:`SettingError` naming the option or ini key, which the
    plugin turns into a usage error.
    """
    results: list[Any] = []
    for cls in (Spec, RunOptions):
        changes: dict[str, Any] = {}
        origins: dict[str, str] = {}
        for name, how in settings_of(cls):
            source = value = None
            cli = getoption(option_dest(how.cli)) if how.cli else None
            ini = getini(how.ini) if how.ini else None
            if _given(cli) and how.cli:
                source, value = Source("command line", how.cli, rootdir), cli
            elif _given(ini) and how.ini:
                source, value = Source("ini", how.ini, inidir), ini
            if source is not None:
                changes[name] = _apply(name, how, value, source)
                origins[name] = source.describe()
        if cls is Spec:
            changes["origins"] = origins
        results.append(cls(**changes))
    return results[0], results[1]
