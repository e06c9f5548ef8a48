"""Shared fixtures: real pytest sessions in subprocesses, and a guard that the host is left as found."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import stat
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURE_ROOTFS = REPO / "fixtures" / "rootfs"
BUSYBOX = shutil.which("busybox") or "/bin/busybox"
BUSYBOX_APPLETS = ("sh", "ls", "ps", "cat", "hostname", "id", "sleep", "echo", "mount", "true", "env")


def requires_plugin(dist: str, module: str, *, builtin: bool = False) -> pytest.MarkDecorator:
    """Skip a test whose inner sessions need the pytest plugin ``dist`` (importable as ``module``).

    The inner sessions run this interpreter, so what is importable here is what
    they have.  The reason names the distribution, so that ``python -m pytest``
    without the ``test`` extras says what to install instead of failing on an
    unknown option.  ``builtin`` is true where this pytest already ships the
    feature (pytest 9's ``subtests``), and then nothing is needed.
    """
    missing = not builtin and importlib.util.find_spec(module) is None
    return pytest.mark.skipif(missing, reason=f"needs the pytest plugin {dist} (pip install {dist})")


_SLEEP_TAG = re.compile(r"(?<![\d.])(987\.\d+|654\.321)(?!\d)")


def unique_sleeps(text: str) -> str:
    """Make the marker arguments of test daemons (``sleep 987.321``) unique to this pytest process.

    Tests look for their daemons with ``pgrep -f``; two suites running at once (tox -p) must not see
    each other's.  Apply it once to every string that starts or looks for such a daemon.
    """
    return _SLEEP_TAG.sub(lambda m: f"{m.group(1)}{os.getpid()}", text)


def _mount_table() -> list[str]:
    # Mount IDs and peer groups change; the mount points and sources must not.
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[4:]) for line in f)


def _children() -> set[int]:
    me = str(os.getpid())
    kids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    data = f.read()
            except OSError:
                continue
            if data[data.rindex(b")") + 2 :].split()[1].decode() == me:
                kids.add(int(entry))
    return kids


@pytest.fixture(autouse=True, scope="session")
def host_left_as_found() -> Iterator[None]:
    """Every test in this suite must leave the mount table and the process tree as it found them."""
    before = _mount_table()
    yield
    after = _mount_table()
    assert after == before, f"mounts leaked into the host: {sorted(set(after) - set(before))}"
    assert not _children(), f"child processes left behind: {_children()}"


@pytest.fixture
def run_lonely(pytester: pytest.Pytester):  # type: ignore[no-untyped-def]
    """Run pytest with the plugin in a subprocess (anything that forks must not run in-process)."""

    def run(*args: str, timeout: float = 120) -> pytest.RunResult:
        return pytester.runpytest_subprocess("-p", "lonely", "-p", "no:cacheprovider", *args, timeout=timeout)

    return run


@pytest.fixture(scope="session")
def busybox_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete root (it has usr/): Debian's static BusyBox and nothing of the host."""
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed (apt-get install busybox-static)")
    root = tmp_path_factory.mktemp("busybox-root")
    for d in ("bin", "usr/bin", "etc", "proc", "dev", "tmp", "sys", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    (root / "bin" / "busybox").chmod(0o755 | stat.S_IXOTH)
    for applet in BUSYBOX_APPLETS:
        (root / "bin" / applet).symlink_to("/bin/busybox")
    (root / "etc" / "os-release").write_text('NAME="BusyBox"\nID=busybox\n')
    return root


# --- junitxml of inner sessions ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    outcome: str  # passed, failed, error or skipped
    message: str
    properties: dict[str, str]


def parse_junit(path: Path) -> dict[str, Case]:
    """Every test case of an inner session's junitxml report; none if the session wrote no report."""
    cases: dict[str, Case] = {}
    if not path.exists():
        return cases
    for case in ET.parse(path).iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("skipped", "error", "failure"):
            element = case.find(kind)
            if element is not None:
                outcome = "failed" if kind == "failure" else kind
                message = (element.get("message") or "") + "\n" + (element.text or "")
        properties = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        cases[case.get("name", "")] = Case(outcome, message, properties)
    return cases
