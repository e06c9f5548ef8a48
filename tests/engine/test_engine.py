"""The engine alone (no pytest session): containers forked from a zygote run in turn and leave nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_lonely.sandbox import cgroup, protocol, rootfs
from pytest_lonely.sandbox import engine as engine_mod
from pytest_lonely.sandbox.spec import ContainerSpec, Inside, Work


@pytest.mark.skipif(os.geteuid() != 0, reason="the engine is driven in root mode here")
def test_engine_runs_warm_containers_and_leaves_nothing(tmp_path: Path) -> None:
    """The second run with a key starts a zygote; its containers run the order given to them, in turn."""
    layout = rootfs.HostLayout.scan(tmp_path)
    key = rootfs.PlanKey(None, False, True)
    plan = rootfs.plan(layout, key)
    engine = engine_mod.Engine(rootless=False, cgroups=cgroup.Manager.discover())
    seen: list[object] = []

    def factory(order: object) -> object:
        def body(inside: Inside) -> None:
            inside.send(protocol.Kind.WARNING, {"order": order, "pid": os.getpid(), "ppid": os.getppid()})

        return body

    try:
        for i in range(4):
            spec = ContainerSpec(
                id=f"c{i}", hostname=f"h{i}", rootless=False, network=True, plan_key=key, plan=plan, timeout=0,
                cwd="/",
            )  # fmt: skip
            outcome = engine.run(
                spec,
                Work(factory=factory, key="k"),  # type: ignore[arg-type]
                ["order", i],
                lambda kind, payload: seen.append(payload),
            )
            assert outcome.kind == "done", outcome
        # The first container is forked from here, the next ones from the zygote made for the second.
        assert [p["order"] for p in seen] == [["order", i] for i in range(4)]  # type: ignore[index]
        assert all(p["pid"] == 1 and p["ppid"] == 0 for p in seen)  # type: ignore[index]
        assert engine.zygotes.zygote is not None
        assert engine.unreaped
    finally:
        engine.close()
    assert not engine.unreaped
