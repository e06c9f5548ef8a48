"""Inner sessions in three modes: as root with containers from the zygote or forked from pytest, and as uid 65534.

A test that must hold in every mode takes the ``inner`` fixture (plugin/conftest.py), which is
parametrized over :data:`MODES`; it writes its files with :meth:`Inner.write` and runs them with
:meth:`Inner.run`, whose output goes to files (so a container's report pipe is the only pipe it holds).
"""

from __future__ import annotations

import dataclasses
import subprocess
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

from helpers.rootless_env import CLEAN_ENV, NOBODY, chown_tree

#: zygote and direct: as root, containers from the zygote or forked from pytest; rootless: pytest as uid 65534.
MODES = ("zygote", "direct", "rootless")
PREBUILD = {"zygote": "1", "direct": "0", "rootless": "1"}


@dataclasses.dataclass
class Inner:
    """Inner sessions in one mode, in a project directory the mode's user owns."""

    mode: str
    project: Path
    python: Path

    def write(self, **files: str) -> None:
        for name, text in files.items():
            (self.project / (name if name.endswith(".py") else f"{name}.py")).write_text(textwrap.dedent(text))
        if self.mode == "rootless":
            chown_tree(self.project, NOBODY, NOBODY)

    def argv(self, *args: str) -> list[str]:
        argv = [str(self.python), "-m", "pytest", "-p", "lonely", "-p", "no:cacheprovider", "-p", "no:randomly"]
        argv += ["-rA", "--junitxml=junit.xml", f"--basetemp={self.project / 'basetemp'}", *args]
        if self.mode == "rootless":
            argv = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]
        return argv

    def env(self) -> dict[str, str]:
        return {**CLEAN_ENV, "HOME": str(self.project), "PYTEST_LONELY_PREBUILD": PREBUILD[self.mode]}

    def run(self, *args: str, timeout: float = 240) -> Result:
        """Output to files: the container's report pipe is then the only pipe it holds."""
        with open(self.project / "out.txt", "wb") as out:
            proc = subprocess.run(
                self.argv(*args), cwd=self.project, env=self.env(), stdout=out, stderr=subprocess.STDOUT,
                timeout=timeout, check=False,
            )  # fmt: skip
        junit = self.project / "junit.xml"
        return Result(proc.returncode, (self.project / "out.txt").read_text(errors="replace"), cases(junit))


@dataclasses.dataclass
class Result:
    ret: int
    out: str
    cases: dict[str, list[str]]


def cases(path: Path) -> dict[str, list[str]]:
    """Each test case's outcome elements, in the order junitxml wrote them (a test twice shows twice)."""
    found: dict[str, list[str]] = {}
    if not path.exists():
        return found
    for case in ET.parse(path).iter("testcase"):
        kinds = [child.tag for child in case if child.tag in ("failure", "error", "skipped")] or ["passed"]
        found.setdefault(case.get("name", ""), []).extend(kinds)
    return found
