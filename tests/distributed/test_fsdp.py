"""Sharded data parallelism (an ``fsdp`` mesh axis, torch's FSDP2): the runtime on spawned gloo
ranks against the unpartitioned model (the same losses, and every parameter after two optimizer
steps, rtol 1e-5) composed with pipelining and tensor parallelism, one spawn per mesh; and, in one
process, the memory and communication model, the mesh parsing and the errors."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

from autopart.cost_models.comm import all_gather_time_s, all_reduce_time_s, ring_latency_s
from autopart.cost_models.devices import get_device
from autopart.cost_models.memory import Optimizer, state_bytes_per_param_byte
from autopart.errors import AutopartError
from autopart.planning.mesh_plan import dp_sync_s, planning_setup
from autopart.planning.mesh_search import mesh_candidates
from autopart.planning.plans import PlanError, parse_mesh, replicas
from autopart.planning.request import PlanRequest
from tests._mesh_cases import (
    RECOMPUTE,
    Case,
    assert_trained_like,
    recompute_request,
    recomputed_blocks,
    reference,
    results,
)
from tests.distributed.test_runtime_tp import _setup, optimizer_for
from tests.models import FAST_LINK

STEPS = 2
MICRO_BATCHES = 2
"""Per replica: 2 micro-batches of 2 samples on each of the 2 replicas (batch 8)."""

MESHES = ("fsdp=2", "fsdp=2,pp=2", "fsdp=2,tp=2", "fsdp=2,pp=2,tp=2", "dp=2,fsdp=2")
# SGD for the language models, Adam for the MLP (see test_runtime_tp.optimizer_for)
MODELS = (("mlp", "adam"), ("hf:llama", "sgd"), ("hf:gpt2", "sgd"))
CASES: list[Case] = [
    (name, mesh, "1f1b" if "pp" in mesh else "gpipe", opt)
    for mesh in MESHES
    for name, opt in MODELS
    if mesh != "dp=2,fsdp=2" or name == "mlp"  # HSDP: DDP x FSDP on one small model
] + [
    ("hf:llama", "fsdp=2,pp=2", "1f1b" + RECOMPUTE, "sgd"),  # checkpointing inside FSDP2
    # zero-bubble schedules: weight gradients apart from the backward, reduced at the step's end
    ("mlp", "fsdp=2,pp=2", "zbv", "adam"),
    ("hf:llama", "fsdp=2,pp=2", "interleaved-zb", "sgd"),
    # each layer's unit resharded after its forward, gathered again by the next (GPipe only)
    ("hf:llama", "fsdp=2", "gpipe+reshard", "sgd"),
    ("hf:gpt2", "fsdp=2,pp=2", "gpipe+reshard", "sgd"),
    ("hf:llama", "fsdp=2,pp=2", "gpipe" + RECOMPUTE + "+reshard", "sgd"),
    ("mlp", "fsdp=2,pp=2,tp=2", "gpipe+reshard", "adam"),
]

RESHARD = "+reshard"
"""A case whose schedule ends with this plans with ``reshard_after_forward=True``."""


def _reshard(schedule: str) -> tuple[str, bool]:
    """(the case's schedule without :data:`RESHARD`, whether it reshards after forward)."""
    return schedule.removesuffix(RESHARD), schedule.endswith(RESHARD)


def _run_case(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    import autopart.runtime.program as runtime

    model, x, kw, target, loss_fn = _setup(name)
    schedule, reshard = _reshard(schedule)
    schedule, request = recompute_request(schedule, FAST_LINK)
    program = runtime.compile(
        model,
        mesh,
        example_inputs=x,
        example_kwargs=kw,
        loss_fn=loss_fn,
        request=request,
        schedule=schedule,
        micro_batches=MICRO_BATCHES,
        device=FAST_LINK,
        reshard_after_forward=reshard or None,
    )
    params = list(program.parameters())
    sharded = all(isinstance(p, DTensor) for p in params)
    local_numel = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params)
    optimizer = optimizer_for(params, opt)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        optimizer.step()
    return {
        "losses": losses,
        "state": program.full_state_dict(),
        "sharded": sharded,
        "local_numel": local_numel,
        "mesh": dict(program.plan.mesh),
        "dcp": sorted({type(v).__name__ for v in program.state_dict().values()}),
        "schedule": program.plan.schedule,
        "recomputed": recomputed_blocks(program),
        "outside_units": [name for stage in program.local_stages for name in _outside_units(stage)],
        "resharding": _resharding(program),
    }


def _resharding(program: Any) -> list[tuple[bool, bool]]:
    """Per FSDP2 module of this rank's stages: (whether it is the stage itself, whether it
    reshards after its forward: FSDP2 keeps a post-forward mesh only where it does)."""
    from torch.distributed.fsdp import FSDPModule

    found = []
    for stage in program.local_stages:
        for m in stage.module.modules():
            if isinstance(m, FSDPModule):
                group = m._get_fsdp_state()._fsdp_param_group
                reshards = group is not None and group.post_forward_mesh_info is not None
                found.append((m is stage.module, reshards))
    return found


def _outside_units(stage: Any) -> list[str]:
    """The parameters of a layer (a path with a number: ``model.layers.3.``) that no FSDP unit
    of the stage holds."""
    from torch.distributed.fsdp import FSDPModule

    from autopart.codegen.templates.run import fsdp_units

    units = [
        f"{name}."
        for name, m in stage.module.named_modules()
        if m in fsdp_units(stage.module) and isinstance(m, FSDPModule)
    ]
    return [
        name
        for name, _ in stage.module.named_parameters()
        if re.match(r".+?\.\d+\.", name) and not name.startswith(tuple(units))
    ]


@pytest.fixture(scope="module")
def fsdp_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_fsdp_program_matches_the_unpartitioned_model",
        CASES,
        _run_case,
        120.0,
    )


@pytest.mark.distributed
@pytest.mark.timeout(900)  # the first case of a mesh spawns every case of it
@pytest.mark.parametrize(("name", "mesh", "schedule", "opt"), CASES)
def test_fsdp_program_matches_the_unpartitioned_model(
    fsdp_results: Callable[[Case], dict[str, Any]], name: str, mesh: str, schedule: str, opt: str
) -> None:
    got = fsdp_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    schedule, reshard = _reshard(schedule)
    assert (got["recomputed"] > 0) == schedule.endswith(RECOMPUTE)
    # every layer reshards after forward where the plan says, the stage itself never (a root)
    units = [reshards for root, reshards in got["resharding"] if not root]
    assert units and all(r == reshard for r in units)
    assert not any(reshards for root, reshards in got["resharding"] if root)
    sizes = parse_mesh(mesh)
    assert got["mesh"]["fsdp"] == 2
    # every parameter is an FSDP shard: a rank holds at most half of the model (TP and the
    # pipeline take more off), give or take FSDP's padding of an odd first dimension
    model = _setup(name)[0]
    whole = sum(p.numel() for p in model.parameters())
    assert got["sharded"]
    assert got["local_numel"] <= whole // 2 + 64 * len(list(model.parameters()))
    assert got["schedule"] == recompute_request(schedule, FAST_LINK)[0]
    assert "DTensor" in got["dcp"]  # DCP takes FSDP's shards, over TP's too
    assert not got["outside_units"]  # every layer its own FSDP unit
    want = reference(_setup, optimizer_for, name, opt, replicas(sizes) * MICRO_BATCHES, STEPS)
    assert_trained_like(got, want)


# ---------------------------------------------------------------------------------------------
# one process: the model of memory and time, the mesh, the errors


def test_fsdp_divides_the_state_and_holds_the_stage_whole_for_a_step() -> None:
    adam = Optimizer.ADAMW.state_bytes_per_param_byte  # 4: parameter, gradient, two moments
    assert state_bytes_per_param_byte("adamw") == adam
    # 1/8 of the state, plus the whole parameter and gradient a step holds
    assert state_bytes_per_param_byte("adamw", fsdp=8) == pytest.approx(adam / 8 + 2)
    assert state_bytes_per_param_byte("adamw", fsdp=2) == pytest.approx(adam)  # break-even
    assert state_bytes_per_param_byte("sgd", fsdp=4) > state_bytes_per_param_byte("sgd")
    with pytest.raises(AutopartError, match="fsdp must be"):
        state_bytes_per_param_byte("adamw", fsdp=0)
    setup = planning_setup(PlanRequest(mesh="fsdp=8"), pp=1, dp=1, fsdp=8)
    assert setup.fsdp == 8 and setup.state_per_byte == pytest.approx(2.5)
    assert setup.with_fsdp(1).state_per_byte == adam and setup.with_fsdp(8) is setup


def test_fsdp_communication_is_an_all_gather_and_a_reduce_scatter() -> None:
    spec, nbytes = get_device("h100"), 1 << 30
    ddp = dp_sync_s(nbytes, dp=8, pp=1, tp=1, spec=spec)
    assert ddp == pytest.approx(all_reduce_time_s(nbytes, 8, spec))
    fsdp = dp_sync_s(nbytes, dp=1, fsdp=8, pp=1, tp=1, spec=spec)
    assert fsdp == pytest.approx(2 * all_gather_time_s(nbytes, 8, spec))  # = an all-reduce
    assert fsdp == pytest.approx(ddp)
    # HSDP: sharded in the node, the shard all-reduced across nodes
    hsdp = dp_sync_s(nbytes, dp=2, fsdp=8, pp=1, tp=1, spec=spec)
    across = all_reduce_time_s(nbytes // 8, 2, spec, inter_node=True)
    assert hsdp == pytest.approx(fsdp + across)


def test_the_fsdp_axis_parses_and_orders() -> None:
    assert parse_mesh("pp=2,fsdp=2,dp=2") == {"dp": 2, "fsdp": 2, "pp": 2}
    req = PlanRequest(mesh="fsdp=2,tp=2")
    assert req.axes == {"dp": 1, "fsdp": 2, "pp": 1, "tp": 2} and req.size == 4
    assert replicas({"dp": 2, "fsdp": 4, "pp": 2}) == 8
    with pytest.raises(PlanError, match="the axes are dp, fsdp, pp, tp"):
        parse_mesh("zero=2")
    meshes = mesh_candidates(8)
    assert {"dp": 1, "fsdp": 8, "pp": 1, "tp": 1} in meshes
    assert {"dp": 8, "pp": 1, "tp": 1} in meshes


def test_fsdp_that_does_not_divide_the_batch_is_a_clear_error() -> None:
    from autopart.planning.planner import plan

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with pytest.raises(AutopartError, match="replicas of dp=1,fsdp=3") as err:
        plan(model, (torch.randn(8, 4),), mesh="fsdp=3", device="cpu")
    assert "multiple of 3" in str(err.value)


def test_zero_bubble_runs_with_fsdp_and_not_with_ddp() -> None:
    setup = planning_setup(PlanRequest(mesh="fsdp=2,pp=2", schedule="zbv"), pp=2, dp=1, fsdp=2)
    assert setup.kinds == ("zbv",)
    setup = planning_setup(PlanRequest(mesh="fsdp=2,pp=2"), pp=2, dp=1, fsdp=2)
    assert "zbv" in setup.kinds and "1f1b" in setup.kinds
    with pytest.raises(AutopartError, match="shard the data over fsdp instead"):
        planning_setup(PlanRequest(mesh="dp=2,pp=2", schedule="zbv"), pp=2, dp=2)
    setup = planning_setup(PlanRequest(mesh="dp=2,fsdp=2,pp=2"), pp=2, dp=2, fsdp=2)
    assert "zbv" not in setup.kinds and "1f1b" in setup.kinds


def test_a_plan_with_fsdp_shards_the_state() -> None:
    from autopart.planning.planner import plan

    model = torch.nn.Sequential(*(torch.nn.Linear(256, 256) for _ in range(4)))
    x = (torch.randn(8, 256),)
    ddp = plan(model, x, mesh="dp=4", device="h100")
    fsdp = plan(model, x, mesh="fsdp=4", device="h100")
    assert fsdp.mesh == {"dp": 1, "fsdp": 4, "pp": 1}
    params = sum(p.numel() * 4 for p in model.parameters())
    held = [max(s.peak_memory_bytes for s in p.stages) for p in (ddp, fsdp)]
    # state: 4 bytes per parameter byte under DDP, 4/4 + 2 under FSDP; activations alike, but
    # FSDP's unsharded gradients appear as the backward reaches them, while it frees what the
    # forward saved: a saving of at most the activations more
    kept = fsdp.stages[0].activation_bytes * fsdp.micro_batches
    assert params * (4 - 3) - 1024 <= held[0] - held[1] <= params * (4 - 3) + kept


def _layered_blocks(layers: int, forward_s: float, layer_bytes: int, root_bytes: int) -> Any:
    """A chain: an embedding outside any layer, ``layers`` layers of two blocks each, a head."""
    from autopart.planning.blocks import Block, BlockGraph

    def block(i: int, layer: str | None, nbytes: int, fwd: float) -> Block:
        return Block(
            index=i,
            name=f"b{i}",
            nodes=(f"n{i}",),
            modules=(layer or "",),
            forward_s=fwd,
            backward_s=2 * fwd,
            flops=0,
            backward_flops=0,
            param_bytes=nbytes,
            params=(f"p{i}",),
            activation_bytes=0,
            layer=layer,
        )

    blocks = [block(0, None, root_bytes // 2, 1e-6)]
    for k in range(layers):
        for _ in range(2):
            blocks.append(block(len(blocks), f"layers.{k}", layer_bytes // 2, forward_s / 2))
    blocks.append(block(len(blocks), None, root_bytes // 2, 1e-6))
    return BlockGraph(tuple(blocks), (), {f"p{b.index}": b.param_bytes for b in blocks})


def test_fsdp_gathers_each_layer_behind_the_one_before_on_a_gpu() -> None:
    """Per-layer FSDP units under GPipe and 1F1B: on a GPU a layer's all-gather runs while the
    layer before computes (one gather at a time), at most its transfer (each gather still pays
    its start-up latency); what it cannot hide, and the gather of the first layer (nothing but
    the embedding before it) stay in the step. The multi-stage schedules gather a stage's units
    at once before its first action (torch's UNSHARD), the reduce-scatters come after the last
    backward, and a CPU host (gloo) has no streams: none of these hides anything."""
    from autopart.planning.mesh_plan import hidden_gathers_s

    spec, layer_bytes = get_device("h100"), 64 << 20
    transfer = all_gather_time_s(layer_bytes, 8, spec) - ring_latency_s(8, spec)
    slow = _layered_blocks(4, 10 * transfer, layer_bytes, 1 << 20)
    one = [0] * len(slow.blocks)
    (hidden,) = hidden_gathers_s(slow, one, 1, spec, fsdp=8, pp=1, tp=1, kind="1f1b")
    # the first layer hides behind the embedding only (1 us), the others wholly
    assert hidden == pytest.approx(3 * transfer + 1e-6)
    fast = _layered_blocks(4, transfer / 4, layer_bytes, 1 << 20)
    (hidden,) = hidden_gathers_s(fast, one, 1, spec, fsdp=8, pp=1, tp=1, kind="gpipe")
    assert hidden == pytest.approx(3 * transfer / 4 + 1e-6)  # behind each layer's whole forward
    # two stages, 16 GPUs (the gathers cross nodes): each stage gathers its first layer before
    # anything computes but the embedding, on the first
    split = [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]
    across = all_gather_time_s(layer_bytes, 8, spec, inter_node=True) - ring_latency_s(
        8, spec, inter_node=True
    )
    got = hidden_gathers_s(slow, split, 2, spec, fsdp=8, pp=2, tp=1, kind="1f1b")
    assert got == pytest.approx([across + 1e-6, across])
    for kind in ("interleaved", "zbv", "dualpipev", "interleaved-zb"):
        assert hidden_gathers_s(slow, split, 2, spec, fsdp=8, pp=2, tp=1, kind=kind) == [0.0, 0.0]
    assert hidden_gathers_s(slow, split, 2, spec, fsdp=1, pp=2, tp=1, kind="1f1b") == [0.0, 0.0]
    cpu = get_device("cpu")
    assert hidden_gathers_s(slow, split, 2, cpu, fsdp=8, pp=2, tp=1, kind="1f1b") == [0.0, 0.0]


def test_many_small_layers_never_hide_more_than_the_step_gathers() -> None:
    """24 small layers: each gather's start-up latency is paid, so what hides stays below the
    stage's gather that the step charges, and the plan's own timeline simulates."""
    from autopart.planning.mesh_plan import simulate_plan
    from autopart.planning.planner import plan

    class Small(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(
                torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256))
                for _ in range(24)
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return x

    model = Small()
    sharded = plan(model, (torch.randn(32768, 256),), mesh="fsdp=8", device="h100")
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    hidden = sum(s.hidden_gather_s for s in sharded.stages)
    assert 0 < hidden < all_gather_time_s(nbytes, 8, get_device("h100"))
    assert simulate_plan(sharded).step_time_s == pytest.approx(sharded.step_time_s)


def test_a_gpu_plan_with_fsdp_takes_the_hidden_gathers_off_its_step() -> None:
    from autopart.planning.mesh_plan import simulate_plan
    from autopart.planning.planner import plan

    class Layers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(2048, 2048) for _ in range(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            return x

    model, x = Layers(), (torch.randn(64, 2048),)
    sharded = plan(model, x, mesh="fsdp=8", device="h100", micro_batches=1)
    hidden = sum(s.hidden_gather_s for s in sharded.stages)
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    spec = get_device("h100")
    assert 0 < hidden < all_gather_time_s(nbytes, 8, spec)
    assert simulate_plan(sharded).step_time_s == pytest.approx(sharded.step_time_s)
    back = type(sharded).from_json(sharded.to_json())
    assert back.stages[0].hidden_gather_s == pytest.approx(hidden)
    on_cpu = plan(model, x, mesh="fsdp=8", device="cpu", micro_batches=1)
    assert all(s.hidden_gather_s == 0 for s in on_cpu.stages)


def test_fsdp_plans_at_most_three_stages_per_rank() -> None:
    """torch's multi-stage schedules keep three stages of a rank gathered under FSDP and gather
    the others again at every switch (``_add_unshard_reshard``): nine all-gathers a step for
    four stages per rank, in the order below; so fsdp meshes are planned at three at most, and
    asking for more is a clear error."""
    from collections import Counter

    from torch.distributed.pipelining.schedules import (
        _Action,
        _add_unshard_reshard,
        _ComputationType,
    )

    from autopart.planning.mesh_plan import FSDP_MOST_STAGES_PER_RANK
    from autopart.planning.schedule import build_schedule

    def gathers(v: int) -> Counter[int]:
        order = build_schedule("interleaved", 4, 8, v)[0]  # rank 0's actions
        kinds = {"F": _ComputationType.FORWARD, "B": _ComputationType.FULL_BACKWARD}
        actions = [_Action(a.stage, kinds[a.kind.value], a.micro_batch) for a in order]
        fsdp_aware = _add_unshard_reshard(actions, FSDP_MOST_STAGES_PER_RANK)
        return Counter(a.stage_index for a in fsdp_aware if a.computation_type.name == "UNSHARD")

    assert sum(gathers(3).values()) == 3  # each stage gathered once a step
    assert sum(gathers(4).values()) > 4  # gathered again
    setup = planning_setup(PlanRequest(mesh="fsdp=8,pp=2"), pp=2, dp=1, fsdp=8)
    assert setup.stage_counts("interleaved") == (2, 3)
    assert setup.with_fsdp(1).stage_counts("interleaved")[-1] > 3
    with pytest.raises(AutopartError, match="at most 3 stages per rank"):
        planning_setup(PlanRequest(mesh="fsdp=2,pp=2", stages_per_rank=4), pp=2, dp=1, fsdp=2)
