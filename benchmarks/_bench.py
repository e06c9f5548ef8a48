"""What overhead.py, large_suite.py, scaling.py and phases.py share: one measured pytest process, CPU counters, venvs.

Why a wrapper process per run: ``getrusage(RUSAGE_CHILDREN)`` of a process
started fresh for the run covers exactly one pytest and everything it (or its
children) waited for: the containers' CPU, their exit and namespace teardown
in the task, the zygote.  The wrapper is also a child subreaper, so that the
keeper (double-forked by pytest-lonely, not pytest's child) is reaped there and
counted too, and it reports any descendant still alive 30 s after pytest
ended.

Why kernel threads and ``/proc/stat`` as well: the kernel defers part of a
container's teardown to its own threads (RCU callbacks, kworkers: freeing
IPC and network namespaces, delayed ``mntput``), which no rusage of ours
counts.  The kernel threads' CPU (``/proc/PID/stat`` of every thread with
``PF_KTHREAD``) and the whole machine's busy time (``/proc/stat``
user+nice+system+irq+softirq) are read before and after every run, so that
no cost is moved off the books.  Both include other people's work on a
shared machine: they are noisier than rusage, and only their difference
between two runs of different sizes means anything.

Why a cgroup (large_suite.py, scaling.py): those scripts time the run loop
from a conftest inside pytest, where rusage of the reaped children is
incomplete (the zygote is reaped at the end of the session); the CPU of every
process in a cgroup made for the run, read at the loop's start and end, is
not.

Only the standard library is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parent.parent
#: pytest-forked 1.7.5 fails every test on pytest 9.2 (it ``marshal``s reports that now carry a ``NodeId``), so
#: both tools are compared on pytest 8.3.5, each in a venv of its own.
PINNED_PYTEST: Final = "8.3.5"
FORKED_VERSION: Final = "1.7.5"
USER_HZ: Final = os.sysconf("SC_CLK_TCK")
PF_KTHREAD: Final = 0x00200000
#: Seconds the wrapper waits for pytest's orphans (the keeper) after pytest exited.
ORPHAN_WAIT: Final = 30.0

WRAPPER: Final = """\
import ctypes, json, os, resource, subprocess, sys, time
procs = os.environ.pop("BENCH_CGROUP_PROCS", "")
if procs:
    with open(procs, "w") as f:
        f.write(str(os.getpid()))
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: pytest's orphans come here
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
output = proc.communicate()[0]
wall = time.perf_counter() - start
orphans, lingering, deadline = 0, 0, time.monotonic() + float(os.environ.get("BENCH_ORPHAN_WAIT", "30"))
while True:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid:
        orphans += 1
    elif time.monotonic() > deadline:
        me = str(os.getpid())
        for entry in os.scandir("/proc"):
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    lingering += f.read().rsplit(b")", 1)[1].split()[1] == me.encode()
            except (OSError, IndexError):
                pass
        break
    else:
        time.sleep(0.005)
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "rc": proc.returncode, "maxrss_kb": ru.ru_maxrss, "minflt": ru.ru_minflt,
                  "cpu": ru.ru_utime + ru.ru_stime, "utime": ru.ru_utime, "stime": ru.ru_stime,
                  "orphans": orphans, "lingering": lingering, "output": output[-4000:]}))
"""


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for pytest: no inherited pytest options or switches, no auto-loaded plugins.

    Auto-loading is off so that every run loads exactly the plugins its
    command line names: otherwise whatever else is installed (xdist, cov,
    timeout, rerunfailures...) would add its own per-test hooks.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "PYTHON", "BENCH_"))}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    env["COLUMNS"] = "300"  # so that the short test summary is not cut at 80 columns
    env.update(extra)
    return env


# --- counting CPU ------------------------------------------------------------------------------


def machine_busy() -> float:
    """Seconds of CPU the whole machine spent busy since boot: user+nice+system+irq+softirq (10 ms ticks)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / USER_HZ


def kthread_cpu() -> float:
    """CPU seconds of every kernel thread alive now, since it started (10 ms ticks; exited kworkers are lost)."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2 :].split()
        if int(fields[6]) & PF_KTHREAD:
            total += int(fields[11]) + int(fields[12])
    return total / USER_HZ


class CpuCgroup:
    """A cgroup made for one run, to read the CPU of every process in it (cgroup v1 cpuacct, or v2)."""

    def __init__(self, path: Path, usage_file: Path) -> None:
        self.path = path
        #: Read by the generated conftests: ``cpuacct.usage`` (ns) or v2 ``cpu.stat`` (``usage_usec``).
        self.usage_file = usage_file

    @classmethod
    @contextlib.contextmanager
    def made(cls, name: str) -> Iterator[CpuCgroup | None]:
        """The cgroup, removed afterwards; None where none can be made (not root, no cpuacct): then no CPU column."""
        v1 = Path("/sys/fs/cgroup/cpuacct")
        v2 = Path("/sys/fs/cgroup")
        if (v1 / "cpuacct.usage").exists():
            path, usage = v1 / name, "cpuacct.usage"
        elif (v2 / "cgroup.controllers").exists():
            path, usage = v2 / name, "cpu.stat"
        else:
            yield None
            return
        try:
            path.mkdir()
        except OSError:
            yield None
            return
        try:
            yield cls(path, path / usage)
        finally:
            deadline = time.monotonic() + 10
            while True:
                try:
                    path.rmdir()
                    break
                except OSError:  # EBUSY while the last process of the run is still exiting
                    if time.monotonic() > deadline:
                        print(f"warning: could not remove {path}", file=sys.stderr)
                        break
                    time.sleep(0.05)

    @property
    def procs(self) -> str:
        return str(self.path / "cgroup.procs")


#: The conftest side of :class:`CpuCgroup`: seconds of CPU of the run's cgroup, or None without one.
CONFTEST_CGROUP_CPU: Final = """
def _cgroup_cpu():
    path = os.environ.get("BENCH_CGROUP_USAGE")
    if not path:
        return None
    with open(path) as f:
        text = f.read()
    if path.endswith("cpu.stat"):
        return int(text.split("usage_usec", 1)[1].split()[0]) / 1e6
    return int(text) / 1e9


def _machine_busy():
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return sum(int(x) for x in (fields[1], fields[2], fields[3], fields[6], fields[7])) / os.sysconf("SC_CLK_TCK")
"""


def run_measured(
    command: Sequence[str],
    cwd: Path,
    env: dict[str, str],
    timeout: float,
    cgroup: CpuCgroup | None = None,
) -> dict[str, Any]:
    """One pytest process under a fresh wrapper: wall, exit code, rusage, output tail, kthread and machine CPU."""
    if cgroup is not None:
        env = {**env, "BENCH_CGROUP_PROCS": cgroup.procs, "BENCH_CGROUP_USAGE": str(cgroup.usage_file)}
    kthreads, busy = kthread_cpu(), machine_busy()
    done = subprocess.run(
        [sys.executable, "-c", WRAPPER, *command],
        cwd=cwd,
        env={**env, "BENCH_ORPHAN_WAIT": str(ORPHAN_WAIT)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    busy, kthreads = machine_busy() - busy, kthread_cpu() - kthreads
    if done.returncode:
        raise RuntimeError(f"benchmark wrapper failed: {done.stderr.strip()[-500:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    result["kthreads"] = kthreads
    result["machine"] = busy
    return result


# --- interpreters ------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where the pinned venvs live between runs (``$XDG_CACHE_HOME`` or ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pytest-lonely-bench"


def sources_digest(repo: Path = REPO) -> str:
    """What the pytest-lonely venv is built from: a venv per state of the package's sources."""
    digest = hashlib.sha256()
    for path in [*sorted((repo / "pytest_lonely").rglob("*.py")), repo / "pyproject.toml"]:
        digest.update(path.relative_to(repo).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def ensure_venv(where: Path, packages: Sequence[str]) -> tuple[str | None, str | None]:
    """A venv at ``where`` with ``packages`` pip-installed, made the first time and reused after.

    Returns ``(python, None)`` or ``(None, why not)``.  A venv whose install
    did not finish (no marker) is made anew.
    """
    python = where / "bin" / "python"
    marker = where / "bench-complete"
    wanted = "\n".join(packages) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return str(python), None
    print(f"creating {where} ({' '.join(packages)})", file=sys.stderr, flush=True)
    shutil.rmtree(where, ignore_errors=True)
    where.parent.mkdir(parents=True, exist_ok=True)
    made = subprocess.run([sys.executable, "-m", "venv", str(where)], capture_output=True, text=True, check=False)
    if made.returncode:
        return None, f"`{sys.executable} -m venv {where}` failed: {made.stderr.strip()[-200:]}"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
        capture_output=True,
        text=True,
        check=False,
    )
    if installed.returncode:
        shutil.rmtree(where, ignore_errors=True)
        tail = (installed.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"pip could not install {' '.join(packages)} into {where}: {tail}"
    marker.write_text(wanted)
    return str(python), None


def forked_venv(cache: Path) -> tuple[str | None, str | None]:
    """pytest 8.3.5 and pytest-forked 1.7.5, nothing else."""
    where = cache / f"forked-{FORKED_VERSION}-pytest-{PINNED_PYTEST}-only"
    return ensure_venv(where, [f"pytest=={PINNED_PYTEST}", f"pytest-forked=={FORKED_VERSION}"])


def lonely_venv(cache: Path, repo: Path = REPO) -> tuple[str | None, str | None]:
    """pytest 8.3.5 and pytest-lonely as this checkout's sources are now (a copy, not an editable install).

    One venv per state of the sources, so that two checkouts measured at the
    same time never rebuild each other's interpreter under a run.  pip
    installs the package (its metadata, entry point and dependencies); then
    the source tree is copied over it, so that what runs is every module of
    the checkout even where the wheel leaves some out (see :func:`wheel_gaps`).
    """
    where = cache / f"lonely-pytest-{PINNED_PYTEST}-{sources_digest(repo)}"
    fresh = not (where / "bench-complete").exists()
    python, why = ensure_venv(where, [f"pytest=={PINNED_PYTEST}", str(repo)])
    if python is None or not fresh:
        return python, why
    site = Path(run_python(python, "import sysconfig; print(sysconfig.get_path('purelib'))"))
    installed = site / "pytest_lonely"
    gaps = [
        str(p.relative_to(repo))
        for p in sources(repo)
        if not (installed / p.relative_to(repo / "pytest_lonely")).exists()
    ]
    (where / "bench-wheel-gaps").write_text("".join(f"{gap}\n" for gap in gaps))
    shutil.copytree(repo / "pytest_lonely", installed, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return python, None


def wheel_gaps(python: str) -> list[str]:
    """Source files the wheel built from this checkout left out (copied in by :func:`lonely_venv`)."""
    marker = Path(python).parent.parent / "bench-wheel-gaps"
    return marker.read_text().split() if marker.exists() else []


def sources(repo: Path = REPO) -> list[Path]:
    return sorted(p for p in (repo / "pytest_lonely").rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def run_python(python: str, code: str, *args: str) -> str:
    """``python -I -c code args`` from a neutral directory: never this checkout's sources by accident."""
    done = subprocess.run([python, "-I", "-c", code, *args], capture_output=True, text=True, check=False, cwd="/")
    return done.stdout.strip()


def package_knows(python: str, needle: str) -> bool:
    """Whether the pytest-lonely that ``python`` imports mentions ``needle`` in its sources (a switch exists)."""
    probe = (
        "import pathlib, sys, pytest_lonely; "
        "root = pathlib.Path(pytest_lonely.__file__).parent; "
        "print(any(sys.argv[1] in p.read_text() for p in root.rglob('*.py')))"
    )
    return run_python(python, probe, needle) == "True"


def version_of(python: str, dist: str) -> str:
    return (
        run_python(python, "import importlib.metadata, sys; print(importlib.metadata.version(sys.argv[1]))", dist)
        or "?"
    )


# --- reporting ---------------------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine_line(load_before: str, pytest_versions: str | None = None) -> str:
    """What the numbers depend on, for the header."""
    if pytest_versions is None:
        try:
            pytest_versions = importlib.metadata.version("pytest")
        except importlib.metadata.PackageNotFoundError:
            pytest_versions = "?"
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    thp_mode = thp.read_text().split("[", 1)[-1].split("]", 1)[0] if thp.exists() else "?"
    return (
        f"machine: nproc {len(os.sched_getaffinity(0))}, kernel {platform.release()}, THP {thp_mode}, "
        f"python {platform.python_version()} ({sys.executable}), pytest {pytest_versions}, "
        f"load average {load_before} before / {loadavg()} after"
    )


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def quartiles(values: Sequence[float]) -> tuple[float, float] | None:
    """The interquartile range (inclusive method); the one value twice for one round."""
    if not values:
        return None
    if len(values) == 1:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def fmt(value: float | None, spec: str) -> str:
    """A table cell: a missing number shows as a dash rather than breaking the row."""
    return "—" if value is None else format(value, spec)


def verdict(value: float | None, limit: float) -> str:
    if value is None:
        return "not measured"
    return "met" if value <= limit else "NOT met"
