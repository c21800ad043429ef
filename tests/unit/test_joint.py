"""Tensor parallelism in plans and the joint dp x pp x tp mesh search: the ``tp`` section of a plan
(Megatron's sharding found on GPT-2 blocks, placements for every node, JSON round trip), the
TP-adjusted costs the stages are planned on, ``--mesh auto --devices N`` (a fitting mesh, every
alternative reported, a clear error when nothing fits), forced replication, determinism, and a
Llama-70B-shaped model on 64 devices."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import torch

import autopart
from autopart.bench.tp import TP_ROW_KEYS, format_tp_rows_markdown, tp_suite
from autopart.cli.main import main
from autopart.cost_models import get_device
from autopart.errors import AutopartError
from autopart.models.model_spec import load_model
from autopart.planning import mesh_search
from autopart.planning.graph import OpGraph
from autopart.planning.mesh_plan import simulate_plan
from autopart.planning.mesh_search import InfeasibleMeshError, mesh_candidates, search_mesh
from autopart.planning.planner import plan_graph
from autopart.planning.plans import Plan
from autopart.solver.tp_costs import tp_costs
from autopart.solver.tp_ilp import megatron_sharding, solve_tp
from tests.models import FAST_LINK

_GRAPHS: dict[tuple[str, int, int | None], object] = {}


def _graph(name: str, batch: int = 8, seq: int | None = None) -> torch.fx.GraphModule:
    key = (name, batch, seq)
    if key not in _GRAPHS:
        loaded = load_model(name, device="meta", batch=batch, seq=seq)
        _GRAPHS[key] = autopart.annotate(
            autopart.trace(loaded.model, loaded.example_inputs, loaded.example_kwargs)
        )
    gm = _GRAPHS[key]
    assert isinstance(gm, torch.fx.GraphModule)
    return gm


def _without_times(plan: Plan) -> dict[str, object]:
    doc = plan.to_dict()
    doc["solver"].pop("time_s")
    return doc


# ---------------------------------------------------------------------------------------------
# explicit meshes with tp


def test_dp_pp_tp_plan_has_megatron_tp_section() -> None:
    gm = _graph("gpt2")
    plan = plan_graph(gm, batch=8, mesh="dp=2,pp=2,tp=2", device="h100", name="gpt2")
    assert plan.mesh == {"dp": 2, "pp": 2, "tp": 2} and list(plan.mesh) == ["dp", "pp", "tp"]
    tp = plan.tp
    assert tp is not None and tp.degree == 2
    expected = megatron_sharding(gm)
    assert expected and {n: tp.sharding[n] for n in expected} == expected
    assert tp.forward_all_reduces_per_block == 2
    # Only the token embedding may fall back: GPT-2's odd vocabulary (50,257) cannot be split by
    # rows on 2 ranks, and a lookup reads too few bytes for a column split to pay for its gather.
    assert set(tp.fallbacks) <= {"embedding"}
    assert all("vocabulary (50257) not divisible" in why for why in tp.fallbacks.values())
    assert tp.comm_bytes_per_step > 0
    # the runtime reads a placement for every node of the graph it was given
    assert set(tp.placements) == {n.name for n in gm.graph.nodes}
    assert set(plan.stage_of) <= set(tp.placements)
    assert all(isinstance(v, dict) for v in tp.input_placements.values())
    # one rank holds about half of its stage's parameters
    pipeline = plan_graph(gm, batch=8, mesh="dp=2,pp=2", device="h100")
    sharded = sum(s.param_bytes for s in plan.stages)
    whole = sum(s.param_bytes for s in pipeline.stages)
    # The blocks' weights are halved; the 50,257 x 768 token table stays whole on both stages that
    # hold it (embedding and tied head: 2 x 154 MB of the 652 MB), so a rank holds 0.74x.
    table = 2 * 50257 * 768 * 4
    assert sharded == pytest.approx(table + (whole - table) / 2, rel=0.01)
    doc = json.loads(plan.to_json())
    assert doc["mesh"] == {"dp": 2, "pp": 2, "tp": 2}
    for key in ("degree", "sharding", "forward_all_reduces_per_block", "comm_bytes_per_step"):
        assert key in doc["tp"], key
    assert Plan.from_json(plan.to_json()) == plan


def test_tp_one_and_pipeline_only_meshes_have_no_tp_section() -> None:
    gm = _graph("gpt2-tiny")
    plan = plan_graph(gm, batch=8, mesh={"dp": 1, "pp": 2, "tp": 1}, device="h100")
    assert plan.tp is None and plan.mesh == {"pp": 2}


def test_tp_adjusted_costs_add_up_to_the_tp_plan() -> None:
    gm = _graph("gpt2")
    og = OpGraph.from_graph_module(gm, get_device("h100"))
    tp = solve_tp(gm, 4)
    costs = tp_costs(og, gm, tp)
    total = sum(n.compute_s for n in costs.op_graph.nodes.values())
    assert total == pytest.approx(tp.compute_s + tp.comm_s, rel=1e-9)
    assert sum(costs.comm_bytes_by_node.values()) == tp.comm_bytes_per_step
    assert set(costs.sharded) < set(og.nodes)
    params = costs.op_graph.param_bytes_by_name
    assert sum(params.values()) < 0.6 * sum(og.param_bytes_by_name.values())


def test_degree_not_dividing_the_heads_falls_back_and_still_plans() -> None:
    gm = _graph("gpt2")  # 12 heads: tp=8 cannot split the attention
    plan = plan_graph(gm, batch=8, mesh="pp=2,tp=8", device=FAST_LINK)
    assert plan.tp is not None and plan.tp.fallbacks
    assert any("not divisible by the TP degree 8" in why for why in plan.tp.fallbacks.values())
    assert "col" in plan.tp.sharding.values()  # the MLPs still split
    assert all(plan.tp.placements[n] == "R" for n in plan.tp.fallbacks if "attention" in n)


def test_pipeline_across_nodes_is_simulated_as_planned() -> None:
    gm = _graph("gpt2")
    plan = plan_graph(gm, batch=8, mesh="pp=4,tp=4", device="h100")  # 16 GPUs: two nodes
    assert simulate_plan(plan).step_time_s == pytest.approx(plan.step_time_s, rel=1e-9)
    near = plan_graph(gm, batch=8, mesh="pp=2,tp=4", device="h100")  # one node: NVLink
    assert plan.tp is not None and near.tp is not None


def test_same_inputs_same_tp_plan() -> None:
    gm = _graph("gpt2")
    a = plan_graph(gm, batch=8, mesh="dp=2,pp=2,tp=2", device="h100")
    b = plan_graph(gm, batch=8, mesh="dp=2,pp=2,tp=2", device="h100")
    assert _without_times(a) == _without_times(b)


def test_devices_must_match_an_explicit_mesh() -> None:
    gm = _graph("gpt2-tiny")
    with pytest.raises(AutopartError, match="uses 4 devices, not the 8"):
        plan_graph(gm, batch=8, mesh="pp=2,tp=2", devices=8)
    with pytest.raises(AutopartError, match="--devices"):
        plan_graph(gm, batch=8, mesh="auto")


# ---------------------------------------------------------------------------------------------
# the joint search


def test_mesh_candidates_keep_tp_in_a_node() -> None:
    meshes = mesh_candidates(64)
    assert {m["tp"] for m in meshes} == {1, 2, 4, 8}
    assert all(math.prod(m.values()) == 64 for m in meshes)
    assert {m.get("fsdp", 1) for m in meshes} == {1, 2, 4, 8, 16, 32, 64}
    assert len(meshes) == len({tuple(m.values()) for m in meshes})
    assert {m["tp"] for m in mesh_candidates(2)} == {1, 2}
    assert mesh_candidates(1) == [{"dp": 1, "pp": 1, "tp": 1}]


def test_auto_picks_the_fastest_fitting_mesh_and_reports_the_others() -> None:
    gm = _graph("gpt2")
    # GPT-2 small with Adam needs ~2 GiB of state: 1 GiB per device rules out dp-only meshes
    search = search_mesh(gm, batch=8, devices=8, device="h100", memory="1GiB")
    plan = search.plan
    assert math.prod(plan.mesh.values()) == 8  # dp x fsdp x pp x tp
    assert max(s.peak_memory_bytes for s in plan.stages) <= 1 << 30
    assert len(search.candidates) == len(mesh_candidates(8))
    assert search.candidates[0].status == "chosen"
    chosen = {"dp": 1, "pp": 1, "tp": 1} | dict(plan.mesh)
    assert search.candidates[0].mesh == chosen
    assert search.reason.startswith(f"chose {search.candidates[0].label} because")
    by_status = {c.label: c for c in search.candidates}
    assert by_status["dp=8,pp=1,tp=1"].status == "over memory"
    assert "needs at least" in by_status["dp=8,pp=1,tp=1"].note
    for c in search.candidates:
        if c.step_time_s is not None:  # planned in full: never faster than the chosen plan
            assert c.step_time_s >= plan.step_time_s
        if c.status == "bounded":
            assert c.step_bound_s is not None and c.step_bound_s >= plan.step_time_s * 0.5
    # the explicit mesh it chose gives the same plan
    again = plan_graph(gm, batch=8, mesh=plan.mesh, device="h100", memory="1GiB")
    assert again.step_time_s == pytest.approx(plan.step_time_s)


def test_auto_search_is_deterministic() -> None:
    gm = _graph("gpt2-tiny")
    a = search_mesh(gm, batch=8, devices=8, device="h100")
    b = search_mesh(gm, batch=8, devices=8, device="h100")
    assert [c.to_dict() for c in a.candidates] == [c.to_dict() for c in b.candidates]
    assert _without_times(a.plan) == _without_times(b.plan) and a.reason == b.reason


def test_no_mesh_fits_names_the_least_memory() -> None:
    gm = _graph("gpt2-tiny")
    with pytest.raises(InfeasibleMeshError, match="needs at least") as err:
        search_mesh(gm, batch=8, devices=4, device="h100", memory="64KiB")
    assert err.value.minimum_bytes > 64 << 10
    assert "--memory" in str(err.value) and "--devices" in str(err.value)


def test_cli_auto_mesh_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt2-tiny", "--mesh", "auto", "--devices", "8"]) == 0
    text = capsys.readouterr().out
    assert "chose dp=" in text and "meshes of 8 devices" in text and "estimate" in text
    assert main(["plan", "gpt2-tiny", "--mesh", "auto", "--devices", "8", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    search = doc["mesh_search"]
    assert search["devices"] == 8 and search["reason"].startswith("chose")
    assert search["chosen"] == doc["mesh"]
    assert {c["status"] for c in search["candidates"]} >= {"chosen", "skipped"}
    for key in ("mesh", "status", "step_time_s", "estimate_s", "memory_bytes", "note"):
        assert key in search["candidates"][0], key
    assert main(["plan", "gpt2-tiny", "--mesh", "auto"]) == 2
    assert "--devices" in capsys.readouterr().err


def test_cli_plan_prints_the_tp_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt2", "--mesh", "pp=2,tp=2"]) == 0
    text = capsys.readouterr().out
    assert "mesh pp=2,tp=2" in text or "mesh dp=1,pp=2,tp=2" in text
    assert "tensor parallel over 2 ranks" in text and "forward all-reduces per block" in text
    assert main(["plan", "gpt2", "--mesh", "pp=2,tp=2", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["tp"]["degree"] == 2 and doc["tp"]["sharding"]


# ---------------------------------------------------------------------------------------------
# Llama-70B on 64 devices


@pytest.mark.slow
def test_llama_70b_on_64_devices() -> None:
    start = time.perf_counter()
    loaded = load_model("llama-70b", device="meta", batch=8, seq=2048, dtype=torch.bfloat16)
    gm = autopart.annotate(
        autopart.trace(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    )
    plan = plan_graph(
        gm, batch=8, mesh="pp=8,tp=8", device="h100", memory="80GiB", stages_per_rank=1
    )
    explicit_s = time.perf_counter() - start
    assert plan.tp is not None and plan.tp.forward_all_reduces_per_block == 2
    assert max(s.peak_memory_bytes for s in plan.stages) <= 80 << 30
    assert plan.gap <= 0.05
    start = time.perf_counter()
    search = search_mesh(gm, batch=8, devices=64, device="h100", memory="80GiB")
    auto_s = time.perf_counter() - start
    assert max(s.peak_memory_bytes for s in search.plan.stages) <= 80 << 30
    assert search.plan.step_time_s <= plan.step_time_s * (1 + 1e-9)
    print(
        f"\nllama-70b pp=8 x tp=8: {explicit_s:.1f} s (trace included), gap {plan.gap:.2%}, "
        f"step {plan.step_time_s * 1e3:.0f} ms; auto on 64 devices: {auto_s:.1f} s, {search.reason}"
    )


# ---------------------------------------------------------------------------------------------
# the TP benchmark


def test_tp_bench_row_against_megatron() -> None:
    (row,) = tp_suite(cases=[("gpt2", 8, 128, 2)], degrees=(2,))
    assert tuple(row) == TP_ROW_KEYS
    assert row["case"] == "gpt2" and row["tp"] == 2 and row["pp"] == 2
    assert row["solve_s"] > 0 and row["status"] in ("OPTIMAL", "FEASIBLE")
    assert row["tp_step_s"] <= row["megatron_tp_step_s"] * (1 + 1e-9)  # never worse than Megatron
    assert row["megatron_all_reduces_per_block"] == 2 and row["megatron_comm_bytes"] > 0
    assert row["plan_step_s"] > 0 and row["plan_peak_bytes"] > 0
    text = format_tp_rows_markdown([row, {**row, "plan_step_s": None, "plan_gap": math.nan}])
    assert text.count("\n") == 4 and "| gpt2 | 2 | 2 |" in text and "| — |" in text


def test_no_mesh_fits_never_names_a_need_below_the_limit() -> None:
    # A mesh whose stage solver ran out of time has only its (small) memory bound: the error once
    # named it as the "least demanding", needing less than the limit it missed.
    from autopart.planning.mesh_plan import planning_setup
    from autopart.planning.mesh_search import _infeasible, _Mesh
    from autopart.planning.request import PlanRequest

    setup = planning_setup(PlanRequest(device="h100", memory="80GiB"))
    timed_out = _Mesh(32, 64, 8, status="no fit", memory_bound=8 << 30, unsettled=True)
    proven = _Mesh(128, 16, 8, status="no fit", memory_bound=31 << 30, minimum_bytes=142 << 30)
    over = _Mesh(512, 8, 4, status="over memory", memory_bound=181 << 30)
    err = _infeasible([timed_out, proven, over], 16384, setup)
    assert err.minimum_bytes == 142 << 30
    assert "dp=128,pp=16,tp=8, needs at least 142.00 GiB" in str(err)
    assert "dp=32,pp=64,tp=8) found no plan within the solver's time limit" in str(err)
    assert "--time-limit" in str(err) and "--devices" in str(err)
    only = _infeasible([timed_out], 16384, setup)
    assert only.minimum_bytes > 80 << 30 and "--time-limit" in str(only)


def test_meshes_planned_side_by_side_plan_as_they_do_one_after_the_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the best estimates are planned in full on a thread each (CP-SAT releases the GIL while it
    # solves); every solve is single-threaded and limited in deterministic time, so the search
    # ends where it ends planning one mesh after the other
    gm = _graph("gpt2")
    threads: dict[str, set[str]] = {}
    plan_full = mesh_search._Search.plan_full

    def spy(self: object, c: object) -> None:
        threads.setdefault(threading.current_thread().name, set()).add(str(c.mesh))  # type: ignore[attr-defined]
        plan_full(self, c)  # type: ignore[arg-type]

    monkeypatch.setattr(mesh_search._Search, "plan_full", spy)
    found = {}
    for cores in (1, 3):
        monkeypatch.setattr(mesh_search, "_cores", lambda cores=cores: cores)
        threads.clear()
        found[cores] = search_mesh(gm, batch=8, devices=8, device="h100", memory="1GiB")
        planned = sum(len(meshes) for meshes in threads.values())
        assert planned >= 2  # several meshes planned in full
        assert len(threads) == (1 if cores == 1 else planned)
    one, side = found[1], found[3]
    assert [c.to_dict() for c in one.candidates] == [c.to_dict() for c in side.candidates]
    assert _without_times(one.plan) == _without_times(side.plan) and one.reason == side.reason
