"""Which code makes an isolated test's page faults: every user page fault of a run, by process and by writer.

A container is a fresh copy-on-write fork of a 36 MB pytest: every page it
writes first is copied (about 4 µs each on a 2-core VM), and every page of a
shared library it executes is mapped in again.  ``perf record -e
exceptions:page_fault_user`` over a whole run of trivial isolated tests gives
each fault's address, error code and the user instruction that made it;
this script counts them per test for each process role (see cpu_phases.py,
whose generated conftest names the plugin's processes) and by the C function
that faulted (``_PyType_Lookup``: the type attribute cache, ``_Py_INCREF``
inlined in ``_PyEval_EvalFrameDefault``: reference counts, ``_PyObject_Malloc``:
pymalloc pools, ...).  Error code bit 0 set means the page was present (a
copy-on-write fault when bit 1, write, is set too); bit 0 clear means the
page was not mapped in this process yet.

Per test = (faults in the N-test run - faults in the N0-test run) / (N - N0).
Root only.  Only the standard library is used.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_phases as cp

_EVENT: Final = re.compile(r"^\s*(.*?)\s+(\d+)/(\d+)\s+.*?address=(0x[0-9a-f]+)\s+ip=(\S+)\s+error_code=(0x[0-9a-f]+)")


def kind_of(code: int) -> str:
    if code & 1:
        return "CoW (write to a shared page)" if code & 2 else "protection, read"
    if code & 0x10:
        return "not mapped: instruction fetch"
    return "not mapped: write" if code & 2 else "not mapped: read"


def record(variant: cp.Variant, python: str, project: Path, n: int, tmp: Path) -> dict[str, collections.Counter[str]]:
    """Faults of one run by role: counters keyed 'kind|function'."""
    data = tmp / "faults.data"
    command = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *variant.args, f"test_n{n}.py"]
    env = cp.clean_env(variant.env)
    env["BENCH_PHASES_OUT"] = str(tmp / "phases.json")
    wrapper = [sys.executable, "-c", cp.WRAPPER, *command]
    done = subprocess.run(
        ["perf", "record", "-q", "-a", "-g", "--user-callchains", "-e", "exceptions:page_fault_user", "-o", str(data),
         "--", *wrapper],
        cwd=project, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "--show-task-events", "-F", "comm,pid,tid,ip,sym,dso,trace"],
        capture_output=True,
        text=True,
        check=True,
    )
    parent: dict[int, int] = {}
    last_comm: dict[int, str] = {}
    by_pid: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    pending: tuple[int, str, str] | None = None  # pid, comm, kind of the event whose first frame is next

    for line in script.stdout.splitlines():
        if "PERF_RECORD_" in line:
            if m := cp._FORK.search(line):
                child, _, ppid, _ = (int(x) for x in m.groups())
                if child != ppid:
                    parent[child] = ppid
            elif (m := cp._COMM.search(line)) and m.group(2) == m.group(3):
                last_comm[int(m.group(2))] = m.group(1)
            continue
        if m := _EVENT.match(line):
            if pending is not None:
                by_pid[pending[0]][f"{pending[1]}|{pending[2]}|[no frame]"] += 1
            pending = (int(m.group(2)), m.group(1), kind_of(int(m.group(6), 16)))
            continue
        if pending is not None and line.startswith(("\t", " ")) and line.strip():
            fields = line.split()
            func = fields[1] if len(fields) > 1 else "[unknown]"
            dso = fields[-1].strip("()").rsplit("/", 1)[-1] if len(fields) > 2 else ""
            if func == "[unknown]" and dso:
                func = f"[{dso}]"
            by_pid[pending[0]][f"{pending[1]}|{pending[2]}|{func}"] += 1
            pending = None
    data.unlink(missing_ok=True)
    roles = cp.assign_roles(int(result["pid"]), parent, last_comm)
    out: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for pid, counts in by_pid.items():
        role = roles.get(pid)
        if role is None:
            continue
        for key, value in counts.items():
            comm, rest = key.split("|", 1)
            if role == "test child":
                out[role][rest] += value
                out[f"test child, phase {cp.ct_phase(comm)}"][rest] += value
            else:
                out[role][rest] += value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--variants", nargs="+", default=["lonely", "forked"], choices=list(cp.VARIANTS))
    parser.add_argument("--tests", type=int, default=300)
    parser.add_argument("--n0", type=int, default=20)
    parser.add_argument("--top", type=int, default=25, help="functions shown per role")
    args = parser.parse_args(argv)
    py = cp.pythons(cp.cache_dir())
    per_test: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="lonely-faults-") as tmp_name:
        tmp = Path(tmp_name)
        project = tmp / "profile"
        cp.write_project(project, (args.tests, args.n0), conftest=True)
        for name in args.variants:
            variant = cp.VARIANTS[name]
            record(variant, py[variant.python], project, args.n0, tmp)  # warm-up
            big = record(variant, py[variant.python], project, args.tests, tmp)
            small = record(variant, py[variant.python], project, args.n0, tmp)
            per_test[name] = {
                role: {
                    key: (big[role][key] - small.get(role, collections.Counter())[key]) / (args.tests - args.n0)
                    for key in big[role]
                }
                for role in big
            }
    print(f"command: `{' '.join([sys.executable, *sys.argv])}`")
    print(f"faults per test = (faults({args.tests} tests) - faults({args.n0} tests)) / {args.tests - args.n0}")
    for name, roles in per_test.items():
        print()
        print(f"### {cp.VARIANTS[name].title}")
        print()
        print("| role | all faults | CoW | not mapped: read | not mapped: write | instruction fetch |")
        print("|---|---:|---:|---:|---:|---:|")
        for role, counts in sorted(roles.items(), key=lambda kv: -sum(kv[1].values())):
            by_kind: dict[str, float] = collections.defaultdict(float)
            for key, value in counts.items():
                by_kind[key.split("|", 1)[0]] += value
            print(
                f"| {role} | {sum(counts.values()):.0f} | {by_kind['CoW (write to a shared page)']:.0f} "
                f"| {by_kind['not mapped: read']:.0f} | {by_kind['not mapped: write']:.0f} "
                f"| {by_kind['not mapped: instruction fetch']:.0f} |"
            )
        for role, counts in sorted(roles.items(), key=lambda kv: -sum(kv[1].values())):
            if sum(counts.values()) < 5:
                continue
            print()
            print(f"{role}, by faulting function (per test):")
            print()
            print("| fault | function | per test |")
            print("|---|---|---:|")
            for key, value in sorted(counts.items(), key=lambda kv: -kv[1])[: args.top]:
                kind, func = key.split("|", 1)
                print(f"| {kind} | {func} | {value:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
