"""The layout's promises, and the pure parts tested directly (no root, no pytester)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from pytest_lonely import reports, settings
from pytest_lonely.sandbox import namespaces, protocol, rootfs

PACKAGE = Path(__file__).resolve().parent.parent / "pytest_lonely"
README = PACKAGE.parent / "README.md"


def _imports(path: Path) -> set[str]:
    """Absolute imports, and relative ones that leave the engine (as ``pytest_lonely...``)."""
    package = path.parent.relative_to(PACKAGE.parent).parts  # ("pytest_lonely", "sandbox", "image")
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1]
            if base[:2] != ("pytest_lonely", "sandbox"):
                names.add(".".join([*base, *([node.module] if node.module else [])]))
    return names


@pytest.mark.parametrize(
    "module", sorted(str(p.relative_to(PACKAGE / "sandbox")) for p in (PACKAGE / "sandbox").rglob("*.py"))
)
def test_the_engine_never_imports_pytest(module: str) -> None:
    """The engine is its own layer: no pytest, no pluggy, nothing of the adapter above it."""
    imported = _imports(PACKAGE / "sandbox" / module)
    bad = {n for n in imported if n.split(".")[0] in ("pytest", "_pytest", "pluggy", "pytest_lonely")}
    assert not bad, f"sandbox/{module} imports {sorted(bad)}"


def test_only_the_fence_imports_private_pytest() -> None:
    offenders = [
        p.name
        for p in PACKAGE.rglob("*.py")
        if p.name != "_pytest_compat.py" and any(n.split(".")[0] == "_pytest" for n in _imports(p))
    ]
    assert not offenders


def test_the_readme_option_table_is_the_settings_table() -> None:
    """One description per setting: the README lists exactly the options and ini keys the plugin has."""
    rows = re.findall(r"^\| `(--lonely-[a-z-]+)[^`]*` \| `([a-z_]+)[^`]*` \|", README.read_text(), re.MULTILINE)
    declared = [(how.cli, how.ini) for _, how in settings.all_settings() if how.cli or how.ini]
    assert sorted(rows) == sorted(declared)


def test_the_marker_help_lists_every_keyword() -> None:
    text = settings.marker_help()
    for _, how in settings.spec_settings():
        if how.marker:
            assert how.marker in text
    assert README.read_text().count(f"`@pytest.mark.isolated({text.split('(', 1)[1].split(')')[0]})`") == 1


# --- settings ----------------------------------------------------------------------------------------


def _from(cli: dict[str, object], ini: dict[str, object]) -> tuple[settings.Spec, settings.RunOptions]:
    return settings.from_config(cli.get, ini.get, Path("/"), Path("/"))


def test_command_line_beats_ini_and_marker_beats_both() -> None:
    spec, _ = _from({"lonely_timeout": "5"}, {"lonely_timeout": "7", "lonely_memory": "32M"})
    assert spec.timeout == 5.0
    assert spec.memory == 32 * 2**20
    assert spec.origin("timeout") == "--lonely-timeout (command line)"
    marked = spec.with_marker((), {"timeout": 1, "memory": None}, "t.py::test", Path("/"))
    assert marked.timeout == 1.0
    assert marked.memory is None  # a marker lifts a limit set wider


@pytest.mark.parametrize(
    ("cli", "value", "words"),
    [
        ("lonely_network", "off", "'host'"),
        ("lonely_network", "banana", "'none'"),
        ("lonely_memory", "lots", "K, M or G"),
        ("lonely_memory", "0", "not limits"),
        ("lonely_pids", "-3", "whole number"),
        ("lonely_cpus", "0", "cpus"),
        ("lonely_unavailable", "maybe", "fail or skip"),
        ("lonely_usage", "x", "whole number"),
    ],
)
def test_bad_command_line_values_name_the_option(cli: str, value: str, words: str) -> None:
    with pytest.raises(settings.SettingError) as info:
        _from({cli: value}, {})
    message = str(info.value)
    assert f"--{cli.replace('_', '-')}" in message
    assert repr(value) in message
    assert words in message


@pytest.mark.parametrize(
    ("keyword", "value"), [("memory", "lots"), ("pids", -3), ("cpus", 0), ("network", "off"), ("timeout", -1)]
)
def test_bad_marker_values_name_keyword_value_and_test(keyword: str, value: object) -> None:
    with pytest.raises(settings.SettingError) as info:
        settings.Spec().with_marker((), {keyword: value}, "t.py::test_x", Path("/"))
    message = str(info.value)
    assert f"{keyword}={value!r}" in message
    assert "t.py::test_x" in message


def test_unknown_marker_keyword_lists_the_known_ones() -> None:
    with pytest.raises(settings.SettingError, match="allowed are: hostname, rootfs"):
        settings.Spec().with_marker((), {"hostnme": "x"}, "t.py::test_x", Path("/"))


# --- wire, namespaces, plan, reports ---------------------------------------------------------------


def test_frames_round_trip_and_unknown_kinds_are_refused() -> None:
    reader = protocol.FrameReader()
    data = protocol.encode(protocol.Kind.REPORT, {"a": (1, 2)}) + protocol.encode(protocol.Kind.DONE, None)
    assert reader.feed(data[:3]) == []
    # JSON carries tuples as lists: the decoding side restores the tuples it knows (wire.py).
    assert reader.feed(data[3:]) == [(protocol.Kind.REPORT, {"a": [1, 2]}), (protocol.Kind.DONE, None)]
    # At the first bad frame the frames before it still count, and the reader reads nothing more.
    reader = protocol.FrameReader()
    done = protocol.encode(protocol.Kind.DONE)
    assert reader.feed(done + protocol.pack(b'["bogus", null]') + done) == [(protocol.Kind.DONE, None)]
    assert "unknown frame kind 'bogus'" in str(reader.error)
    assert reader.feed(done) == []
    reader = protocol.FrameReader()
    assert reader.feed(protocol.encode(protocol.Kind.GO, None)) == []
    assert "'go' frame, which only goes the other way" in str(reader.error)


def test_unmarshallable_payloads_travel_as_repr() -> None:
    class Odd:
        def __repr__(self) -> str:
            return "<odd>"

    (frame,) = protocol.FrameReader().feed(protocol.encode(protocol.Kind.WARNING, {"x": [Odd()]}))
    assert frame == (protocol.Kind.WARNING, {"x": ["<odd>"]})


def test_namespaces_are_decided_in_one_place() -> None:
    assert namespaces.for_container(rootless=False, network=True) == {"pid", "mnt", "uts", "ipc"}
    assert namespaces.for_container(rootless=True, network=False) == {"user", "pid", "mnt", "uts", "ipc", "net"}
    assert namespaces.describe({"net", "pid", "user"}) == "user,pid,net"


def test_minimal_cover_keeps_outer_paths_and_their_copy_on_write() -> None:
    assert rootfs.minimal_cover([("/a/b", True), ("/a", False), ("/a-b", False)]) == [("/a", True), ("/a-b", False)]


def test_the_plan_binds_the_basetemp_writable_after_tmp() -> None:
    layout = rootfs.HostLayout(mounts=(), top=(("usr", "dir", ""),), needed=(), dev_nodes=("null",))
    ops = rootfs.plan(layout, rootfs.PlanKey(None, False, True, ("/tmp/pytest-of-root/pytest-3",)))
    tmp = ops.index(("mount", "tmpfs", "/newroot/tmp", "tmpfs", rootfs.sc.MS_NOSUID | rootfs.sc.MS_NODEV, "mode=1777"))
    assert ops.index(("bind", "/oldroot/tmp/pytest-of-root/pytest-3", "/newroot/tmp/pytest-of-root/pytest-3")) > tmp


def test_trim_traceback_stops_at_the_machinery() -> None:
    dump = (
        "Fatal Python error: Segmentation fault\n\nCurrent thread 0x1 (most recent call first):\n"
        '  File "/p/test_x.py", line 3 in test_crash\n'
        '  File "/v/site-packages/_pytest/python.py", line 1 in pytest_pyfunc_call\n'
        '  File "/v/site-packages/pluggy/_callers.py", line 2 in _multicall\n'
    )
    trimmed = reports.trim_traceback(dump)
    assert "test_crash" in trimmed
    assert "_pytest" not in trimmed
    assert "pluggy" not in trimmed
