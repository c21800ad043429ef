"""Per-layer FSDP units (``passes/fsdp_units.py``): each layer of a stage moved into its own
module at the layer's path computes what the stage computed (outputs, input and parameter
gradients, bit for bit), and every parameter keeps its name and its object; with recomputed blocks
taken into their layers. A Hypothesis property over random stacks of layers, stage splits and
recomputation, and the models of the zoo."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from autopart import annotate, trace
from autopart.codegen.templates.run import fsdp_units
from autopart.passes.fsdp_units import layer_units, model_layers, split_layer_units
from autopart.passes.recompute import checkpoint_blocks
from autopart.passes.split_stages import split_stages
from autopart.planning.planner import plan_graph
from autopart.planning.request import PlanRequest


class _Block(nn.Module):
    def __init__(self, width: int, residual: bool, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width, bias=False)
        self.register_buffer("scale", torch.full((width,), 0.5))
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.down(torch.nn.functional.gelu(self.up(self.norm(x)))) * self.scale
        return x + y if self.residual else y


class _Stack(nn.Module):
    def __init__(self, depth: int, width: int, residual: bool, norm: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList(_Block(width, residual, norm) for _ in range(depth))
        self.head = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _stages(model: nn.Module, x: tuple[Any, ...], pp: int, recompute: str) -> tuple[Any, list[Any]]:
    gm = annotate(trace(model, x))
    request = PlanRequest(
        mesh=f"pp={pp}", device="h100", schedule="gpipe", micro_batches=2, optimizer="sgd"
    )
    plan = plan_graph(gm, request.with_options(recompute=recompute), batch=x[0].shape[0])
    stages = split_stages(gm, plan)
    for k, stage in enumerate(stages):
        mine = [r for r in plan.recompute if r.stage == k]
        checkpoint_blocks(stage, [r.nodes for r in mine], selective=[r.selective for r in mine])
    return gm, stages


def _inputs(stage: torch.fx.GraphModule, seed: int) -> list[torch.Tensor]:
    """Random values of the stage's inputs (float ones needing gradients)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in stage.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta["val"]
        if val.is_floating_point():
            out.append(torch.randn(val.shape, generator=g, dtype=val.dtype).requires_grad_())
        else:
            out.append(torch.randint(0, 8, val.shape, generator=g, dtype=val.dtype))
    return out


def _run(stage: torch.fx.GraphModule, seed: int) -> tuple[list[torch.Tensor], ...]:
    torch.manual_seed(seed)  # the same dropout masks, if any
    inputs = _inputs(stage, seed)
    out = stage(*inputs)
    flat = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if o.is_floating_point()]
    sum(o.float().pow(2).sum() for o in flat).backward()
    grads = [p.grad.clone() for p in stage.parameters() if p.grad is not None]
    input_grads = [t.grad.clone() for t in inputs if t.grad is not None]
    stage.zero_grad()
    return [o.detach() for o in flat], grads, input_grads


def _check_units(gm: torch.fx.GraphModule, stages: list[Any], seed: int) -> int:
    """Every stage rewritten into layer units computes the same, bit for bit; the number of
    units made."""
    layers = model_layers(gm)
    made = 0
    for stage in stages:
        twin = copy.deepcopy(stage)
        params = dict(twin.named_parameters())
        paths = split_layer_units(twin, layers)
        made += len(paths)
        assert list(layer_units(twin)) == list(paths)
        assert {id(twin.get_submodule(p)) for p in paths} == {id(u) for u in fsdp_units(twin)}
        # the same names, the same objects, the same order
        assert list(dict(twin.named_parameters()).items()) == list(params.items())
        assert dict(twin.named_buffers()).keys() == dict(stage.named_buffers()).keys()
        for path in paths:  # a unit owns its layer's parameters: none is passed to it
            assert all(not n.startswith(f"{path}.") for n in _read_by_get_attr(twin))
        want, got = _run(stage, seed), _run(twin, seed)
        for a, b in zip(want, got, strict=True):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                assert torch.equal(x, y)
    return made


def _read_by_get_attr(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    depth=st.integers(2, 5),
    width=st.sampled_from([8, 16]),
    residual=st.booleans(),
    norm=st.booleans(),
    pp=st.integers(1, 3),
    recompute=st.sampled_from(["none", "full"]),
    seed=st.integers(0, 2**16),
)
def test_layer_units_compute_what_the_stage_computed(
    depth: int, width: int, residual: bool, norm: bool, pp: int, recompute: str, seed: int
) -> None:
    torch.manual_seed(seed)
    model = _Stack(depth, width, residual, norm)
    x = (torch.randn(4, 8),)
    gm, stages = _stages(model, x, pp, recompute)
    made = _check_units(gm, stages, seed)
    # every layer is a unit on the stage that holds all of it
    assert made >= depth


@pytest.mark.parametrize(
    ("name", "recompute"),
    [
        ("llama-tiny", "none"),
        ("llama-tiny", "full"),
        ("gpt2-tiny", "selective"),
        ("moe-tiny", "none"),
    ],
)
def test_layer_units_of_the_zoo_compute_what_the_stage_computed(name: str, recompute: str) -> None:
    from autopart.models.model_spec import load_model

    loaded = load_model(name, batch=4, device="cpu", seed=0)
    gm, stages = _stages(loaded.model, tuple(loaded.example_inputs), 2, recompute)
    assert _check_units(gm, stages, 0) >= 2


class _PreNorm(nn.Module):
    """An fx trace keeps ``norm`` a leaf module call at the layer's edge."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.w = nn.Parameter(torch.randn(width, width) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.linear(self.norm(x), self.w)


def test_a_layer_whose_module_the_stage_calls_stays_in_the_stage() -> None:
    """A layer's module called as a leaf (an fx trace's ``call_module``) outside the layer's
    nodes would read parameters its unit holds sharded: the layer is left out, and nothing the
    stage calls lies inside a unit."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_PreNorm(8) for _ in range(4))
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    torch.manual_seed(0)
    x = (torch.randn(4, 8),)
    gm = annotate(trace(Model(), x, method="fx"))
    assert any(n.op == "call_module" and ".norm" in str(n.target) for n in gm.graph.nodes)
    request = PlanRequest(
        mesh="pp=2", device="h100", schedule="gpipe", micro_batches=2, optimizer="sgd"
    )
    stages = split_stages(gm, plan_graph(gm, request, batch=4))
    for stage in stages:
        twin = copy.deepcopy(stage)
        paths = split_layer_units(twin, model_layers(gm))
        called = [str(n.target) for n in twin.graph.nodes if n.op == "call_module"]
        assert not [c for c in called for p in paths if c.startswith(f"{p}.")]
        for a, b in zip(_run(stage, 0), _run(twin, 0), strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_a_layer_whose_output_is_written_in_place_outside_it_stays_in_the_stage() -> None:
    """``h = layer(h); h += bias`` outside the layer: the write in place would replace the
    autograd node FSDP2 hooks the unit's backward on (the layer would run its backward
    ungathered), so the layer is not made a unit; the other layers are, and the stage computes
    what it computed."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(_Block(8, residual=True, norm=False) for _ in range(3))
            self.bias = nn.Parameter(torch.zeros(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for k, layer in enumerate(self.layers):
                x = layer(x)
                if k == 1:
                    x += self.bias
            return x

    torch.manual_seed(0)
    x = (torch.randn(4, 8),)
    gm = annotate(trace(Model(), x))
    assert any(str(n.target).startswith("aten.add_") for n in gm.graph.nodes)
    twin = copy.deepcopy(gm)
    paths = split_layer_units(twin, model_layers(gm))
    assert paths == ("layers.0", "layers.2")
    for a, b in zip(_run(gm, 0), _run(twin, 0), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
