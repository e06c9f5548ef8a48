"""The engine alone (no pytest session): containers forked from a zygote run in turn and leave nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pytest_lonely.sandbox import launcher, protocol, rootfs
from pytest_lonely.sandbox.spec import ContainerSpec, Inside
from pytest_lonely.sandbox.zygote import Warm


@pytest.mark.skipif(os.geteuid() != 0, reason="the engine is driven in root mode here")
def test_engine_runs_warm_containers_and_leaves_nothing(tmp_path: Path) -> None:
    """The second run with a key starts a zygote; its containers run the order given to them, in turn."""
    layout = rootfs.HostLayout.scan(tmp_path)
    key = rootfs.PlanKey(None, False, True)
    plan = rootfs.plan(layout, key)
    engine = launcher.Engine(rootless=False)
    seen: list[object] = []

    def factory(order: object) -> object:
        def body(inside: Inside) -> None:
            inside.send(protocol.Kind.WARNING, {"order": order, "pid": os.getpid()})

        return body

    try:
        for i in range(4):
            spec = ContainerSpec(
                id=f"c{i}", hostname=f"h{i}", rootless=False, network=True, plan_key=key, plan=plan, timeout=0,
                cwd="/",
            )  # fmt: skip
            outcome = engine.run(
                spec,
                factory(("direct", i)),  # type: ignore[arg-type]
                lambda kind, payload: seen.append(payload),
                warm=Warm(key="k", order=("warm", i), factory=factory),  # type: ignore[arg-type]
            )
            assert outcome.kind == "done", outcome
        assert [p["order"] for p in seen] == [("direct", 0), ("warm", 1), ("warm", 2), ("warm", 3)]  # type: ignore[index]
        assert all(p["pid"] == 1 for p in seen)  # type: ignore[index]
        assert engine.unreaped
    finally:
        engine.close()
    assert not engine.unreaped
