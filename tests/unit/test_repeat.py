"""Repeated-layer tracing: 3 of L identical layers are traced and the last is copied for the rest.

The reference for every check is the same model traced in full (``repeat="off"``) and run eagerly.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import autopart.capture.tracing
from autopart.capture import _repeat
from autopart.capture.tracing import trace
from autopart.errors import TraceError
from autopart.models.zoo import GPT2, GPT2Config, Llama, LlamaConfig
from autopart.passes.annotate import annotate

DIM = 16


def _llama(layers: int = 8) -> nn.Module:
    return Llama(LlamaConfig(layers, 64, 4, 2, 128, 256, max_seq=128)).eval()


def _gpt2(layers: int = 7) -> nn.Module:
    return GPT2(GPT2Config(layers, 64, 4, vocab_size=256, n_positions=128)).eval()


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 16))


def _out(result: Any) -> torch.Tensor:
    return result[0] if isinstance(result, (tuple, list)) else result


def _nodes(gm: torch.fx.GraphModule) -> list[tuple[str, str, str]]:
    return [(n.name, n.op, str(n.target)) for n in gm.graph.nodes]


class Block(nn.Module):
    gain: torch.Tensor

    def __init__(self, index: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, DIM)
        self.register_buffer("gain", torch.full((DIM,), 0.5), persistent=False)
        self.index = index  # a layer counter (like Hugging Face's layer_idx) is allowed to differ

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(self.norm(x))) * self.gain


class Stack(nn.Module):
    """Glue between the layers: a module outside the list runs before each layer, and the parent
    adds a skip connection after it."""

    def __init__(self, block: type[nn.Module] = Block, layers: int = 8) -> None:
        super().__init__()
        self.inp = nn.Linear(DIM, DIM)
        self.layers = nn.ModuleList(block(i) for i in range(layers))
        self.shared = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(self.shared(h)) + 0.5 * h
        return self.head(h)


class OddLayersDouble(Block):
    """Odd layers double their output, keyed on the layer counter: only the graph shows it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * 2 if self.index % 2 else y


class ScaledByIndex(Block):
    """The same ops in every layer, but a constant that depends on the layer counter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * (1.0 + self.index % 2)


class DoubleFlagBlock(Block):
    """A flag set per layer that changes forward but not ``extra_repr``."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.doubles = index % 2 == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return y * 2 if self.doubles else y


class AlternatingLoop(Stack):
    """The parent's loop treats odd layers differently."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i % 2:
                h = h * 2
        return self.head(h)


class AlternatingInputs(Stack):
    """Every layer adds one of two tensors computed before the loop, odd layers the other one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        extra = (torch.sin(x), torch.cos(x))
        for i, layer in enumerate(self.layers):
            h = layer(h + extra[i % 2])
        return self.head(h)


class AllLayerOutputs(Stack):
    """Returns every layer's output, so the graph after the loop reads layers 0 and 1 too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [self.inp(x)]
        for layer in self.layers:
            outs.append(layer(outs[-1]))
        return torch.stack(outs)


class ScaledByDepth(Stack):
    """Reads the list's length and takes it by a slice, as Hugging Face models do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) / len(self.layers)
        for layer in self.layers[: len(self.layers)]:
            h = layer(h)
        return self.head(h)


class FirstLayersOnly(Stack):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers[:4]:
            h = layer(h)
        return self.head(h)


class LastLayerAgain(Stack):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.layers[-1](h))


class LoopVariableAfterTheLoop(Stack):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        assert isinstance(layer, Block)
        return self.head(h + layer.fc.bias)  # the last layer's, in the full model


def _check_same_as_full(
    model: nn.Module, args: tuple, method: str = "auto", *, repeated: bool
) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule]:
    """Trace ``model`` both ways; outputs equal each other and eager, and node counts are equal."""
    gm = trace(model, args, method=method)
    full = trace(model, args, method=method, repeat="off")
    assert bool(gm.meta["autopart_trace"].repeated) is repeated
    assert full.meta["autopart_trace"].repeated == ""
    with torch.no_grad():
        want = model(*args)
        torch.testing.assert_close(_out(gm(*args)), want)
        torch.testing.assert_close(_out(full(*args)), want)
    assert len(gm.graph.nodes) == len(full.graph.nodes)
    return gm, full


@pytest.mark.parametrize("method", ["export", "fx"])
@pytest.mark.parametrize(
    ("build", "path", "layers"), [(_llama, "model.layers", 8), (_gpt2, "transformer.h", 7)]
)
def test_repeated_trace_is_the_full_trace(build: Any, path: str, layers: int, method: str) -> None:
    model = build(layers)
    gm, full = _check_same_as_full(model, (_ids(),), method, repeated=True)
    info = gm.meta["autopart_trace"]
    assert info.repeated == f"{path} x{layers} (traced 3)"
    assert info.method == method
    # The same graph, node for node: names, ops, targets, modules, generated code.
    assert _nodes(gm) == _nodes(full)
    assert [n.meta["autopart_module"] for n in gm.graph.nodes] == [
        n.meta["autopart_module"] for n in full.graph.nodes
    ]
    assert gm.code == full.code
    # The model's own parameters under the model's own names, tied ones as before.
    params = dict(gm.named_parameters())
    assert list(params) == [n for n, _ in model.named_parameters()]
    assert all(params[n] is p for n, p in model.named_parameters())
    assert info.param_aliases == full.meta["autopart_trace"].param_aliases
    assert [n for n, _ in gm.named_buffers()] == [n for n, _ in full.named_buffers()]
    # The same costs.
    assert annotate(gm).meta["autopart_totals"] == annotate(full).meta["autopart_totals"]


def test_repeated_trace_is_deterministic() -> None:
    model = _llama(6)
    first, second = trace(model, (_ids(),)), trace(model, (_ids(),))
    assert first.meta["autopart_trace"].repeated == "model.layers x6 (traced 3)"
    assert _nodes(first) == _nodes(second)
    assert first.code == second.code


@pytest.mark.parametrize("method", ["export", "fx"])
def test_glue_between_layers_and_layer_buffers_are_copied(method: str) -> None:
    model = Stack()
    gm, full = _check_same_as_full(model, (torch.randn(3, DIM),), method, repeated=True)
    assert _nodes(gm) == _nodes(full)
    assert gm.state_dict().keys() == full.state_dict().keys()  # non-persistent buffers stay so
    assert dict(gm.named_buffers()).keys() == dict(full.named_buffers()).keys()


@pytest.mark.parametrize("block", [OddLayersDouble, ScaledByIndex, DoubleFlagBlock])
def test_layers_that_behave_differently_are_traced_in_full(block: type[nn.Module]) -> None:
    model = Stack(block)
    found = _repeat.find_repeated_list(model)
    if block is not DoubleFlagBlock:
        # The modules look alike (the counter may differ), so the graph check is what notices.
        assert found == _repeat.RepeatedList("layers", 8)
    else:
        assert found is None  # a plain attribute differs between the layers
    _check_same_as_full(model, (torch.randn(3, DIM),), repeated=False)


@pytest.mark.parametrize("model_type", [AlternatingLoop, AlternatingInputs, AllLayerOutputs])
def test_loops_that_treat_layers_differently_are_traced_in_full(model_type: type[Stack]) -> None:
    model = model_type()
    assert _repeat.find_repeated_list(model) is not None
    _check_same_as_full(model, (torch.randn(3, DIM),), repeated=False)


def test_length_and_full_slices_of_the_list_are_those_of_the_whole_list() -> None:
    model = ScaledByDepth()
    gm, full = _check_same_as_full(model, (torch.randn(3, DIM),), repeated=True)
    assert _nodes(gm) == _nodes(full)


@pytest.mark.parametrize("model_type", [FirstLayersOnly, LastLayerAgain, LoopVariableAfterTheLoop])
@pytest.mark.parametrize("method", ["export", "fx"])
def test_layers_picked_by_index_are_traced_in_full(model_type: type[Stack], method: str) -> None:
    model = model_type()
    _check_same_as_full(model, (torch.randn(3, DIM),), method, repeated=False)
    assert len(model.layers) == 8 and type(model.layers) is nn.ModuleList


def test_the_list_is_restored_when_the_short_trace_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Stack()
    children = list(model.layers)
    seen: list[int] = []
    real = autopart.capture.tracing._trace_export

    def failing_on_short(m: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        seen.append(len(list(m.layers)))  # type: ignore[arg-type]
        if seen[-1] < 8:
            raise RuntimeError("only the truncated model fails")
        return real(m, args, kwargs)

    monkeypatch.setattr(autopart.capture.tracing, "_trace_export", failing_on_short)
    x = torch.randn(3, DIM)
    gm = trace(model, (x,))
    assert seen == [3, 8]  # the short trace, then the full one
    assert list(model.layers) == children
    assert gm.meta["autopart_trace"].repeated == ""
    torch.testing.assert_close(_out(gm(x)), model(x))


def test_the_list_is_restored_when_every_trace_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Stack()
    children = list(model.layers)

    def broken(m: nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(autopart.capture.tracing, "_trace_export", broken)
    monkeypatch.setattr(autopart.capture.tracing, "_trace_fx", broken)
    with pytest.raises(TraceError, match="cannot trace this"):
        trace(model, (torch.randn(3, DIM),))
    assert list(model.layers) == children
    assert [name for name, _ in model.layers.named_children()] == [str(i) for i in range(8)]


def test_only_long_lists_of_interchangeable_unshared_layers_are_repeated() -> None:
    assert _repeat.find_repeated_list(Stack(layers=5)) is None  # too short to pay off
    tied = Stack()
    tied.layers = nn.ModuleList([Block(0)] * 8)  # one module eight times
    assert _repeat.find_repeated_list(tied) is None
    shared = Stack()
    blocks = [b for b in shared.layers if isinstance(b, Block)]
    for block in blocks:
        block.fc.weight = blocks[0].fc.weight  # one weight in every layer
    assert _repeat.find_repeated_list(shared) is None
    resized = Stack()
    resized.layers[7].fc = nn.Linear(DIM, DIM, bias=False)
    assert _repeat.find_repeated_list(resized) is None
    hooked = Stack()
    hooked.layers[5].register_forward_hook(lambda m, i, o: o * 2)
    assert _repeat.find_repeated_list(hooked) is None

    class TwoLists(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.short = Stack(layers=6)
            self.long = Stack(layers=9)

    assert _repeat.find_repeated_list(TwoLists()) == _repeat.RepeatedList("long.layers", 9)


def test_repeat_off_traces_every_layer_and_bad_modes_are_rejected() -> None:
    model = _llama(6)
    gm = trace(model, (_ids(),), repeat="off")
    assert gm.meta["autopart_trace"].repeated == ""
    with pytest.raises(TraceError, match="unknown repeat mode"):
        trace(model, (_ids(),), repeat="on")
