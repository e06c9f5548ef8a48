"""What a test changed: ``container.changes()``, the "filesystem changes" section, ``--lonely-keep``.

Every mode gives the same answer: as root from the zygote and forked from
pytest, and as uid 65534; the host view, a ``rootfs=`` directory, and a
container shared by a module (where each test sees only its own changes).
"""

from __future__ import annotations

import os
import re
import stat
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers.host import FIXTURE_ROOTFS
from helpers.modes import Inner

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="root runs the root modes and becomes uid 65534")

INSTALLER = """
import os, pytest

ROOTFS = {rootfs!r}

def install():
    os.makedirs("/opt/app/bin", exist_ok=True)
    with open("/opt/app/bin/run", "w") as f:
        f.write("#!/bin/sh\\n")
    os.chmod("/opt/app/bin/run", 0o750)
    with open("/etc/app.conf", "w") as f:
        f.write("x = 1\\n")
    os.symlink("/etc/app.conf", "/etc/app.link")
    os.makedirs("/etc/__pycache__", exist_ok=True)
    open("/etc/__pycache__/app.cpython-311.pyc", "wb").close()

EXPECTED = [
    ("C", "/etc"), ("A", "/etc/app.conf"), ("A", "/etc/app.link"),
    ("C", "/opt"), ("A", "/opt/app"), ("A", "/opt/app/bin"), ("A", "/opt/app/bin/run"),
]

@pytest.mark.isolated
def test_host_view(container):
    assert container.changes() == []  # the engine's /etc/hosts is not the test's
    install()
    assert container.changes() == EXPECTED

@pytest.mark.isolated(rootfs=ROOTFS)
def test_rootfs_directory(container):
    install()
    assert container.changes() == EXPECTED

@pytest.mark.isolated
def test_deletes_and_fails():
    install()
    os.unlink("/etc/app.link")
    os.remove("/etc/os-release")
    assert False, "fails, to show its changes"

@pytest.mark.isolated
def test_crashes():
    install()
    os._exit(9)

@pytest.mark.isolated(scope="module")
def test_shared_first(container):
    install()

@pytest.mark.isolated(scope="module")
def test_shared_second(container):
    with open("/etc/second.conf", "w") as f:
        f.write("2")
    assert container.changes() == [("C", "/etc"), ("A", "/etc/second.conf")]  # the first test's are not its own

@pytest.mark.isolated
def test_passes_and_changes():
    install()

def test_in_process():
    with pytest.raises(Exception, match="only inside an isolated test"):
        from pytest_lonely import Container
        Container("x", "x", 0, frozenset(), False, None).changes()
"""


def _section(out: str, test: str) -> str:
    block = out.split(f"_ {test} _", 1)[1]
    return block.split("filesystem changes", 1)[1].split("\n_", 1)[0]


def test_what_a_test_changed_in_every_mode(inner: Inner) -> None:
    rootfs = FIXTURE_ROOTFS if inner.mode != "rootless" else inner.project / "rootfs"
    if inner.mode == "rootless":  # a copy uid 65534 may read
        import shutil

        shutil.copytree(FIXTURE_ROOTFS, rootfs, symlinks=True)
    inner.write(test_changes=INSTALLER.format(rootfs=str(rootfs)))
    result = inner.run("--lonely-keep=failed")
    out = result.out
    assert result.cases == {
        "test_host_view": ["passed"],
        "test_rootfs_directory": ["passed"],
        "test_deletes_and_fails": ["failure"],
        "test_crashes": ["failure"],
        "test_shared_first": ["passed"],
        "test_shared_second": ["passed"],
        "test_passes_and_changes": ["passed"],
        "test_in_process": ["passed"],
    }, out
    # The section on a failure: in the terminal's FAILURES block and in junitxml's failure text.
    failing = _section(out, "test_deletes_and_fails")
    for line in ("C /etc", "A /etc/app.conf", "D /etc/os-release", "A /opt/app/bin/run", "__pycache__ entr"):
        assert line in failing, failing
    assert "/etc/app.link" not in failing  # made and removed by the test: no change
    crashed = _section(out, "test_crashes")
    assert "A /etc/app.conf" in crashed, crashed  # read from the layer after the container died
    assert "status 9" in out
    failures = {
        case.get("name"): (case.find("failure").text or "")  # type: ignore[union-attr]
        for case in ET.parse(inner.project / "junit.xml").iter("testcase")
        if case.find("failure") is not None
    }
    assert "A /etc/app.conf" in failures["test_deletes_and_fails"]
    assert "A /etc/app.conf" in failures["test_crashes"]
    # --lonely-keep=failed: the evidence is under the basetemp, named in the report; passing tests keep none.
    kept = re.findall(r"kept in (\S+): ", out)
    assert len(kept) == 2, out
    failed, crashed_dir = (Path(k) for k in kept)
    assert failed.is_relative_to(inner.project / "basetemp")
    run = failed / "fs" / "opt" / "app" / "bin" / "run"
    assert run.read_text() == "#!/bin/sh\n"
    assert stat.S_IMODE(run.stat().st_mode) == 0o750
    assert "/etc/os-release" in (failed / "DELETED").read_text()
    assert os.readlink(crashed_dir / "fs" / "etc" / "app.link") == "/etc/app.conf"  # a symlink, not followed
    assert not list((inner.project / "basetemp" / "lonely-keep").glob("*passes*"))


def test_keep_all_names_the_directory_of_a_passing_test(inner: Inner) -> None:
    inner.write(
        test_keep="""
        import pytest

        @pytest.mark.isolated
        def test_writes():
            with open("/etc/kept.conf", "w") as f:
                f.write("kept")
        """
    )
    result = inner.run("--lonely-keep=all")
    assert result.cases == {"test_writes": ["passed"]}, result.out
    kept = re.findall(r"kept in (\S+): ", result.out)  # -rA shows the passing test's section
    assert len(kept) == 1, result.out
    assert (Path(kept[0]) / "fs" / "etc" / "kept.conf").read_text() == "kept"


def test_a_long_listing_is_cut_and_counted(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import os, pytest

        @pytest.mark.isolated
        def test_many():
            os.makedirs("/opt/many")
            for i in range(100):
                open(f"/opt/many/f{i:03}", "w").close()
            assert False
        """
    )
    result = pytester.runpytest_subprocess("-p", "lonely", "-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    listed = re.findall(r"^A /opt/many/f\d{3}$", out, re.MULTILINE)
    assert 30 <= len(listed) < 100, out
    assert re.search(r"^\.\.\. and \d+ more$", out, re.MULTILINE), out


@pytest.mark.parametrize(("args", "ini"), [(("--lonely-keep=sometimes",), ""), ((), "lonely_keep = sometimes")])
def test_a_bad_keep_value_is_a_usage_error(pytester: pytest.Pytester, args: tuple[str, ...], ini: str) -> None:
    pytester.makepyfile("def test_x(): pass")
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = pytester.runpytest_subprocess("-p", "lonely", "-p", "no:cacheprovider", *args, timeout=60)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*keep='sometimes' from *: allowed are none, failed or all*"])
