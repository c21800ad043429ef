"""The mesh search's memory lower bound (autopart.solver.pipeline_memory): it rejects meshes
before any stage solve, never one that fits, and the error names every mesh's proven need."""

from __future__ import annotations

import time

import pytest
import torch

import autopart
import autopart.planning.mesh_search as mesh_search
from autopart.models.model_spec import load_model
from autopart.planning.graph import OpGraph, coarsen
from autopart.planning.mesh_plan import in_flight_per_stage, planning_setup
from autopart.planning.mesh_search import InfeasibleMeshError, search_mesh
from autopart.planning.request import PlanRequest
from autopart.solver.pipeline_memory import NodeMemory, pipeline_memory_bound
from autopart.solver.stage_ilp import InfeasibleMemoryError, solve_stages

_CONFIG = {
    "num_hidden_layers": "8",
    "hidden_size": "256",
    "intermediate_size": "512",
    "num_attention_heads": "8",
    "num_key_value_heads": "2",
    "vocab_size": "1024",
    "max_position_embeddings": "256",
}
_GM: list[torch.fx.GraphModule] = []


def _llama() -> torch.fx.GraphModule:
    if not _GM:
        loaded = load_model(
            "hf:llama", batch=16, seq=256, config=_CONFIG, device="meta", dtype=torch.bfloat16
        )
        _GM.append(
            autopart.annotate(
                autopart.trace(loaded.model, loaded.example_inputs, loaded.example_kwargs)
            )
        )
    return _GM[0]


def test_no_mesh_fits_ends_quickly_naming_each_mesh_bound() -> None:
    gm = _llama()
    start = time.perf_counter()
    # keeping every activation: recomputing layers, dp=1,pp=2,tp=8 fits 4 MiB on this small model
    with pytest.raises(InfeasibleMeshError) as err:
        search_mesh(gm, batch=16, devices=16, device="h100", memory="4MiB", recompute="none")
    assert time.perf_counter() - start < 15
    text = str(err.value)
    assert "Per mesh (memory per device):" in text
    for label in ("dp=1,pp=8,tp=2", "dp=2,pp=4,tp=2", "dp=16,pp=1,tp=1"):
        assert f"{label} >= " in text, label
    assert "--memory" in text and "--devices" in text and "recompute" in text
    assert "Traceback" not in text and err.value.minimum_bytes > 4 << 20


def test_bound_never_rejects_a_mesh_that_fits_and_keeps_the_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gm = _llama()
    request = PlanRequest(mesh="auto", devices=8, device="h100", memory="300MiB")
    with_bound = search_mesh(gm, request, batch=16)
    monkeypatch.setattr(mesh_search, "_split_bound", lambda *a, **k: None)
    without = search_mesh(gm, request, batch=16)
    a, b = with_bound.plan.to_dict(), without.plan.to_dict()
    a["solver"].pop("time_s"), b["solver"].pop("time_s")
    assert a == b
    chosen = with_bound.candidates[0]
    assert chosen.status == "chosen" and chosen.memory_bytes is not None


@pytest.mark.parametrize("p", [2, 4])
def test_bound_is_below_the_stage_ilp_minimum(p: int) -> None:
    # The stage ILP's proven minimum over the same graph is never below the bound.
    gm = _llama()
    setup = planning_setup(PlanRequest(device="h100", memory="1MiB"))
    og = OpGraph.from_graph_module(gm, setup.spec)
    owned = NodeMemory.of(og, setup.state_per_byte)
    for kind, m in (("1f1b", 8), ("gpipe", 4)):
        bound, _, _ = pipeline_memory_bound(owned, batch=16, dp=1, pp=p, options={kind: [m]})
        bg = coarsen(og, max_blocks=24 * p, num_stages=p).scaled(1.0 / m)
        with pytest.raises(InfeasibleMemoryError) as err:
            solve_stages(
                bg,
                p,
                setup.spec,
                in_flight=in_flight_per_stage(kind, p, m, 1),
                state_bytes_per_param_byte=setup.state_per_byte,
                memory_limit_bytes=1 << 20,
                time_limit_s=5,
            )
        fits = err.value.need.fits_bytes  # a split's peak in the ILP's (rounded-up) accounting
        assert fits is not None and 0 < bound <= fits, (kind, bound, fits)
