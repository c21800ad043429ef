from __future__ import annotations

import json

import pytest

from autopart.planning.plans import (
    BaselineResult,
    Plan,
    PlanError,
    SolverInfo,
    StagePlan,
    parse_mesh,
)


def _plan(**overrides: object) -> Plan:
    stages = tuple(
        StagePlan(
            index=i,
            device=i,
            modules=(f"h.{i}",),
            node_count=10,
            forward_s=1e-3,
            backward_s=2e-3,
            predicted_s=3.1e-3,
            param_bytes=1 << 20,
            peak_memory_bytes=8 << 20,
            activation_bytes=1 << 18,
        )
        for i in range(2)
    )
    fields: dict[str, object] = dict(
        model="toy",
        mesh={"pp": 2},
        device="h100",
        memory_limit_bytes=80 << 30,
        schedule="1f1b",
        micro_batches=4,
        stages_per_device=1,
        stages=stages,
        stage_of={"linear": 0, "linear_1": 1},
        bottleneck_s=3.1e-3,
        lower_bound_s=3.0e-3,
        gap=3.1e-3 / 3.0e-3 - 1,
        step_time_s=15.5e-3,
        bubble_fraction=0.2,
        solver=SolverInfo(status="OPTIMAL", time_s=0.1, blocks=12, objective_bound_s=3.0e-3),
        baselines={"equal_layers": BaselineResult(4e-3, 20e-3)},
        boundary_bytes=(4096,),
    )
    fields.update(overrides)
    return Plan(**fields)  # type: ignore[arg-type]


def test_json_round_trip_is_exact() -> None:
    plan = _plan()
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


def test_plan_is_frozen() -> None:
    plan = _plan()
    with pytest.raises(AttributeError):
        plan.gap = 0.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(gap=0.5), "gap"),
        (lambda d: d["stage_of"].update(linear=7), "stage_of"),
        (lambda d: d.update(schedule="zigzag"), "schedule"),
        (lambda d: d.update(lower_bound_s=1.0), "lower bound"),
        (lambda d: d.update(micro_batches=0), "micro_batches"),
        (lambda d: d.pop("stages"), "malformed"),
        (lambda d: d.update(format_version=99), "format_version"),
        (lambda d: d["stages"][0].update(forward_s=-1.0), "forward_s"),
        (lambda d: d.update(mesh={"pq": 2}), "mesh axis"),
    ],
)
def test_tampered_plan_files_are_rejected(mutate: object, message: str) -> None:
    raw = json.loads(_plan().to_json())
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(PlanError, match=message):
        Plan.from_json(json.dumps(raw))


def test_not_json_is_rejected() -> None:
    with pytest.raises(PlanError, match="not valid JSON"):
        Plan.from_json("{oops")


def test_parse_mesh() -> None:
    assert parse_mesh("pp=4") == {"pp": 4}
    assert parse_mesh("tp=2, pp=2,dp=2") == {"dp": 2, "pp": 2, "tp": 2}
    for bad in ("pp", "pp=0", "pp=2,pp=2", "xx=2", "pp=two", ""):
        with pytest.raises(PlanError):
            parse_mesh(bad)
