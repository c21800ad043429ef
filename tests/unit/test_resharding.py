"""Resharding each layer's FSDP2 unit after its forward (``reshard_after_forward``): what the
memory model counts (:func:`autopart.planning.stage_memory.deferred_state` in the schedule
simulation), checked against a hand count and, on random layered graphs, against the model
without it; the plan that records it and the errors where it cannot help."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from autopart.cost_models.devices import get_device
from autopart.errors import AutopartError
from autopart.models.model_spec import load_model
from autopart.planning.blocks import Block, BlockGraph, CrossTensor
from autopart.planning.mesh_plan import simulate_blocks, simulate_plan
from autopart.planning.plans import Plan, PlanError
from autopart.planning.request import PlanRequest
from autopart.planning.schedule import Deferred, build_schedule, simulate
from autopart.planning.stage_memory import deferred_state, unit_param_bytes

MIB = 1 << 20


@pytest.mark.parametrize(
    ("act", "deferred", "forward", "first", "working", "want"),
    [
        # the forwards' activations and two gathered layers are the most
        (100, 60, 30, 10, 5, 2 * 100 + 30),
        # the first backward's gathered layers and gradients on top of both micro-batches
        (100, 60, 30, 50, 5, 2 * 100 + 50),
        # from the end of the first backward the stage is whole, beside one micro-batch
        (10, 300, 30, 20, 5, 10 + 300 + 5),
    ],
)
def test_the_simulation_holds_resharded_layers_from_the_first_backward_on(
    act: int, deferred: int, forward: int, first: int, working: int, want: int
) -> None:
    """GPipe on one device, two micro-batches: F F B B. The units' whole parameters and
    gradients (``deferred``) are held from the end of the first B, a forward holds ``forward``
    more, the first B ``first`` in place of its working set."""
    static = 1000
    tl = simulate(
        build_schedule("gpipe", 1, 2),
        [1.0],
        [2.0],
        activation_bytes=[act],
        static_bytes=[static],
        working_bytes=[working],
        deferred=Deferred([deferred], [forward], [first]),
    )
    assert tl.peak_memory_bytes == (static + want,)
    whole = simulate(
        build_schedule("gpipe", 1, 2),
        [1.0],
        [2.0],
        activation_bytes=[act],
        static_bytes=[static + deferred],
        working_bytes=[working],
    )
    assert whole.peak_memory_bytes == (static + deferred + 2 * act + working,)


def _layered(layer_params: list[int], acts: list[int], root: int) -> BlockGraph:
    """An embedding-like block outside any layer, then one block per layer (``layers.k``, its
    parameter ``layers.k.w`` of ``layer_params[k]`` bytes, saving ``acts[k]`` bytes), each block
    reading the previous one's output."""

    def block(i: int, layer: str | None, param: str, nbytes: int, act: int) -> Block:
        return Block(
            index=i,
            name=f"b{i}",
            nodes=(f"n{i}",),
            modules=(layer or "embed",),
            forward_s=1e-3,
            backward_s=2e-3,
            flops=0,
            backward_flops=0,
            param_bytes=nbytes,
            params=(param,),
            activation_bytes=act,
            layer=layer,
            backward_working_bytes=act // 2,
            saved_values=(f"v{i}",) if act else (),
        )

    blocks = [block(0, None, "embed.w", root, 0)]
    for k, (nbytes, act) in enumerate(zip(layer_params, acts)):
        blocks.append(block(k + 1, f"layers.{k}", f"layers.{k}.w", nbytes, act))
    edges = tuple(CrossTensor(f"t{i}", i, (i + 1,), 64 * 1024) for i in range(len(blocks) - 1))
    sizes = {b.params[0]: b.param_bytes for b in blocks}
    return BlockGraph(tuple(blocks), edges, sizes)


def _reference_peak(
    params: list[int], acts: list[int], root: int, m: int, grad: float, reshard: bool
) -> float:
    """What one GPipe stage of a ``_layered`` chain holds at most under FSDP2, block by block, on
    top of its static state (every parameter's shard and, unless it reshards, every layer's
    whole parameter): the activations each micro-batch keeps; resharding, each layer gathered by
    its forward with the next gathered ahead, and freed after it; in the first backward each
    layer's unsharded gradient (``grad`` bytes per byte) as it is reached, and, resharding, its
    parameter gathered again (the one before it ahead) and kept; each block freeing what it saved;
    the later backwards with all of it held."""
    total_act, n = sum(acts), len(params)
    peak = 0.0
    for i in range(m):  # forwards
        for k in range(n):
            gathered = params[k] + (params[k + 1] if k + 1 < n else 0) if reshard else 0
            peak = max(peak, i * total_act + sum(acts[: k + 1]) + gathered)
    every = grad * (sum(params) + root) + (sum(params) if reshard else 0)
    for i in range(m):  # backwards, the first one reaching each parameter
        for k in reversed(range(n + 1)):  # block 0: the root, outside the layers
            kept = (m - i) * total_act - sum(acts[k:])
            if i == 0:
                reached = grad * (sum(params[max(k - 1, 0) :]) + (root if k == 0 else 0))
                if reshard:
                    reached += sum(params[max(k - 1, 0) :]) + (params[k - 2] if k >= 2 else 0)
            else:
                reached = every
            working = acts[k - 1] // 2 if k else 0
            peak = max(peak, kept + reached + working)
    return peak


@settings(max_examples=80, deadline=None)
@given(
    layers=st.lists(st.tuples(st.integers(1, 64), st.integers(0, 64)), min_size=1, max_size=8),
    root=st.integers(0, 64),
    m=st.integers(1, 4),
    mixed=st.booleans(),
    reshard=st.booleans(),
)
def test_fsdp_state_is_counted_as_a_block_by_block_count_holds_it(
    layers: list[tuple[int, int]], root: int, m: int, mixed: bool, reshard: bool
) -> None:
    """One GPipe stage of a layered chain under FSDP2: the modelled peak is the peak of a
    block-by-block count of what the stage holds (:func:`_reference_peak`); resharding, it may
    exceed it only by what the model charges a forward (its two largest layers gathered, beside
    every micro-batch's activations), and it is never above the peak without resharding."""
    params = [a * MIB for a, _ in layers]
    acts = [b * MIB for _, b in layers]
    bg = _layered(params, acts, root * MIB)
    stage_of = [0] * len(bg.blocks)
    spec = get_device("h100")
    grad = 3.0 if mixed else 1.0  # unsharded: the parameter, and its gradient(s)
    state = 2.0 / 2 + 1 + grad  # a parameter and gradient sharded over 2, held whole in the step
    got = {
        r: simulate_blocks(
            bg, stage_of, 1, 1, spec, "gpipe", m, state, grad_per_byte=grad, reshard=r
        ).peak_memory_bytes[0]
        for r in (False, True)
    }
    units = unit_param_bytes(bg.scaled(1.0 / m), stage_of, 1)
    assert units == [{f"layers.{k}": nbytes for k, nbytes in enumerate(params)}]
    deferred = grad * (sum(params) + root * MIB) + (sum(params) if reshard else 0)
    static = state * (sum(params) + root * MIB) - deferred
    per_mb = [a // m for a in acts]  # the graph's costs are for the whole batch
    want = static + _reference_peak(params, per_mb, root * MIB, m, grad, reshard)
    slack = 4 * len(bg.blocks)  # scaling to a micro-batch rounds each size to a byte
    if reshard:
        forward = static + m * sum(per_mb) + sum(sorted(params)[-2:])
        assert want - slack <= got[True] <= max(want, forward) + slack
    else:
        assert got[False] == pytest.approx(want, abs=slack)
    assert got[True] <= got[False] + slack


def test_resharding_gathers_the_next_layer_ahead_in_the_first_backward() -> None:
    """Two layers on one stage, the first backward: the last layer is gathered (with its
    gradient) and the one before gathered ahead, then both are whole."""
    bg = _layered([10 * MIB, 20 * MIB], [0, 100 * MIB], 0)
    got = deferred_state(bg, [0, 0, 0], 1, 1, grad_per_byte=1.0, reshard=True)
    assert got.deferred == [2 * 30 * MIB]
    assert got.forward == [30 * MIB]
    # layers.1 whole with its gradient, layers.0 gathered ahead, layers.1's working set (half
    # of what it saved); then both whole, once layers.1 has freed its 100 MiB
    assert got.first_backward == [2 * 20 * MIB + 10 * MIB + 50 * MIB]
    kept = deferred_state(bg, [0, 0, 0], 1, 1, grad_per_byte=1.0, reshard=False)
    assert kept.deferred == [30 * MIB] and kept.forward == [0]
    assert kept.first_backward == [20 * MIB + 50 * MIB]


def _plan(reshard: bool, device: str = "cpu") -> Plan:
    from autopart.planning.planner import plan

    loaded = load_model("llama-tiny", device="cpu")

    return plan(
        loaded.model,
        loaded.example_inputs,
        example_kwargs=dict(loaded.example_kwargs),
        mesh="fsdp=2,pp=2",
        schedule="gpipe",
        micro_batches=4,
        device=device,
        reshard_after_forward=reshard,
    )


def test_a_plan_that_reshards_records_it_and_holds_less() -> None:
    kept, resharded = _plan(False), _plan(True)
    assert resharded.reshard_after_forward and not kept.reshard_after_forward
    assert resharded.stage_of == kept.stage_of  # the stage ILP counts the stage whole
    named = dict(load_model("llama-tiny", device="cpu").model.named_parameters())
    layers = sum(p.numel() * p.element_size() for n, p in named.items() if ".layers." in n)
    assert sum(s.resharded_param_bytes for s in resharded.stages) == layers
    for a, b in zip(kept.stages, resharded.stages):  # the unsharded gradients in both
        assert b.deferred_bytes - a.deferred_bytes == b.resharded_param_bytes
    for a, b in zip(kept.stages, resharded.stages):
        assert b.peak_memory_bytes <= a.peak_memory_bytes
        assert a.peak_memory_bytes - b.peak_memory_bytes <= b.resharded_param_bytes
    assert resharded.step_time_s > kept.step_time_s  # a gather per micro-batch more
    back = Plan.from_json(resharded.to_json())
    assert back == resharded
    assert '"reshard_after_forward"' not in kept.to_json()
    replay = simulate_plan(resharded)
    assert replay.peak_memory_bytes == tuple(s.peak_memory_bytes for s in resharded.stages)
    assert replay.step_time_s == pytest.approx(resharded.step_time_s)


def test_resharding_where_it_cannot_help_is_a_clear_error() -> None:
    with pytest.raises(AutopartError, match=r"GPipe only.*--schedule gpipe"):
        PlanRequest(mesh="fsdp=2,pp=2", reshard_after_forward=True)
    with pytest.raises(AutopartError, match=r"needs an fsdp axis.*add fsdp=N"):
        PlanRequest(mesh="dp=2,pp=2", schedule="gpipe", reshard_after_forward=True)
    plan = _plan(True)
    raw = plan.to_dict()
    with pytest.raises(PlanError, match="GPipe only"):
        Plan.from_dict({**raw, "schedule": "1f1b"})
    with pytest.raises(PlanError, match="true or false"):
        Plan.from_dict({**raw, "reshard_after_forward": "yes"})


def test_the_cli_says_what_resharding_needs(capsys: pytest.CaptureFixture[str]) -> None:
    from autopart.cli.main import main

    code = main(["plan", "mlp", "--mesh", "fsdp=2,pp=2", "--reshard-after-forward"])
    assert code != 0
    err = capsys.readouterr().err
    assert "--schedule gpipe" in err and "Traceback" not in err


def test_a_model_without_layers_reshards_nothing() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    from autopart.planning.planner import plan

    got = plan(
        model,
        (torch.randn(8, 8),),
        mesh="fsdp=2",
        schedule="gpipe",
        device="cpu",
        reshard_after_forward=True,
    )
    assert got.reshard_after_forward
    assert all(s.resharded_param_bytes == 0 for s in got.stages)
