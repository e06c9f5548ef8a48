"""Images as root filesystems, end to end: real images made by umoci and skopeo, real isolated tests."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import images
from helpers.inner import RunLonely

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="these sessions run as root")


INSIDE = """
import os, pytest

def check(container, ref):
    assert os.getpid() == 1
    assert os.path.exists("/bin/busybox")
    assert not os.path.exists("/etc/gone"), "layer two's whiteout must remove it"
    assert open("/etc/new").read() == "added in layer two\\n"
    assert os.environ["FOO"] == "bar"
    assert container.image is not None and container.image.reference.endswith(ref)
    assert container.image.digest.startswith("sha256:")
    assert os.getuid() == 0  # the image's User is ignored

@pytest.mark.isolated(rootfs={layout!r})
def test_layout(container):
    check(container, {layout_ref!r})

@pytest.mark.isolated(rootfs={docker!r})
def test_docker_save(container):
    check(container, {docker_ref!r})

@pytest.mark.isolated(rootfs={tagged!r})
def test_tag_in_a_layout_tar(container):
    check(container, {tagged_ref!r})
"""


def _write(pytester: pytest.Pytester, built: images.Images) -> None:
    pytester.makepyfile(
        test_inside=INSIDE.format(
            layout=str(built.single),
            layout_ref=str(built.single),
            docker=str(built.docker),
            docker_ref=str(built.docker),
            tagged=f"{built.oci_tar}:v3",
            tagged_ref=f"{built.oci_tar}:v3",
        )
    )


def test_each_image_form_is_a_root(
    pytester: pytest.Pytester,
    run_lonely: RunLonely,
    built: images.Images,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """OCI layout, docker save archive, a tag in a tar of a multi-image layout: whiteouts, Env, container.image."""
    monkeypatch.setenv("PYTEST_LONELY_CACHE_DIR", str(tmp_path / "cache"))
    _write(pytester, built)
    result = run_lonely("-v")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["*lonely: unpacked image *"])


def test_xdist_workers_share_the_layer_cache(
    pytester: pytest.Pytester,
    run_lonely: RunLonely,
    built: images.Images,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYTEST_LONELY_CACHE_DIR", str(cache))
    _write(pytester, built)
    result = run_lonely("-n", "2")
    result.assert_outcomes(passed=3)
    layers = list((cache / "layers" / "sha256").iterdir())
    # Three forms of the same image: each layer once, whatever the form and the worker.
    assert len([p for p in layers if not p.name.startswith(".")]) == len({p.name for p in layers})
    assert len([p for p in layers if (p / "fs").is_dir()]) == 3


def test_the_run_wide_image_is_in_the_header(
    pytester: pytest.Pytester,
    run_lonely: RunLonely,
    built: images.Images,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PYTEST_LONELY_CACHE_DIR", str(tmp_path / "cache"))
    pytester.makepyfile("import os\ndef test_x():\n    assert os.environ['FOO'] == 'bar'\n")
    result = run_lonely("--lonely-all", f"--lonely-rootfs={built.single}")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"lonely: root mode*rootfs image {built.single} (sha256:*"])


def test_a_bad_image_fails_that_test_only(
    pytester: pytest.Pytester,
    run_lonely: RunLonely,
    built: images.Images,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("PYTEST_LONELY_CACHE_DIR", str(tmp_path / "cache"))
    broken = tmp_path / "broken"
    shutil.copytree(built.single, broken)
    (broken / "index.json").write_text("{not json")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(built.docker.read_bytes()[:20000])
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.isolated(rootfs={str(broken)!r})
        def test_broken_index(): pass

        @pytest.mark.isolated(rootfs={str(built.multi) + ":nope"!r})
        def test_unknown_tag(): pass

        @pytest.mark.isolated(rootfs={str(built.multi)!r})
        def test_missing_tag(): pass

        @pytest.mark.isolated(rootfs={str(truncated)!r})
        def test_truncated(): pass

        def test_the_rest_runs(): pass
        """
    )
    result = run_lonely("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=4)
    out = result.stdout.str()
    assert "INTERNALERROR" not in out
    assert "index.json" in out
    assert "nope" in out
    assert "v3" in out  # the tags that exist are listed
    assert str(truncated) in out


def test_a_bad_run_wide_image_is_a_usage_error(
    pytester: pytest.Pytester,
    run_lonely: RunLonely,
    built: images.Images,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PYTEST_LONELY_CACHE_DIR", str(tmp_path / "cache"))
    pytester.makepyfile("def test_x(): pass\n")
    result = run_lonely(f"--lonely-rootfs={built.multi}:nope")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--lonely-rootfs*nope*"])
