from __future__ import annotations

import resource

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from autopart.capture.tracing import trace
from autopart.cost_models.node_cost import NodeCost
from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.passes.annotate import annotate, node_cost
from tests.models import Tied, TwoLayer

# Small configs of real Hugging Face architectures (random weights, built from configs).
HF_SMALL = {
    "hf:gpt2": {
        "n_layer": "2",
        "n_embd": "64",
        "n_head": "4",
        "vocab_size": "512",
        "n_positions": "64",
    },
    "hf:llama": {
        "num_hidden_layers": "2",
        "hidden_size": "64",
        "intermediate_size": "160",
        "num_attention_heads": "4",
        "num_key_value_heads": "2",
        "vocab_size": "512",
    },
    "hf:bert": {
        "num_hidden_layers": "2",
        "hidden_size": "64",
        "intermediate_size": "128",
        "num_attention_heads": "4",
        "vocab_size": "512",
    },
}


def _eager_flops(model: torch.nn.Module, args: tuple, kwargs: dict) -> int:
    # On CPU, FlopCounterMode sees fused SDPA as a kernel it has no formula for and counts 0; the math
    # backend runs the same attention as explicit matmuls, which it counts. autopart counts attention.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args, **kwargs)
    return counter.get_total_flops()


def _annotated(spec: str, **kw: object) -> tuple[object, torch.fx.GraphModule]:
    loaded = load_model(spec, device="cpu", **kw)  # type: ignore[arg-type]
    loaded.model.eval()
    gm = annotate(trace(loaded.model, loaded.example_inputs, loaded.example_kwargs))
    return loaded, gm


@pytest.mark.parametrize(
    ("spec", "kw"),
    [
        ("hf:gpt2", {"config": HF_SMALL["hf:gpt2"], "batch": 2, "seq": 32}),
        ("hf:llama", {"config": HF_SMALL["hf:llama"], "batch": 2, "seq": 32}),
        ("hf:bert", {"config": HF_SMALL["hf:bert"], "batch": 2, "seq": 32}),
        ("mlp", {"batch": 4}),
        ("cnn", {"batch": 2}),
        ("gpt2-tiny", {"batch": 2, "seq": 32}),
        ("llama-tiny", {"batch": 2, "seq": 32}),
    ],
)
def test_forward_flops_match_flop_counter_and_params_are_exact(spec: str, kw: dict) -> None:
    loaded, gm = _annotated(spec, **kw)
    totals = gm.meta["autopart_totals"]
    eager = _eager_flops(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    assert eager > 0
    assert abs(totals.flops - eager) <= 0.01 * eager, (totals.flops, eager)
    assert totals.params == sum(p.numel() for p in loaded.model.parameters())
    assert totals.backward_flops > totals.flops  # weights and activations both get gradients


def test_every_node_is_annotated_and_views_move_nothing() -> None:
    _, gm = _annotated("gpt2-tiny", batch=2, seq=16)
    for node in gm.graph.nodes:
        cost = node_cost(node)
        assert isinstance(cost, NodeCost)
        if cost.is_view:
            assert cost.bytes == 0 and cost.flops == 0
    linear = [n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default]
    assert linear and all(node_cost(n).params for n in linear)
    assert all(node_cost(n).module for n in linear)


def test_linear_costs_by_hand() -> None:
    gm = annotate(trace(TwoLayer(16, 32, 4), (torch.randn(8, 16),)))
    fc1 = next(n for n in gm.graph.nodes if node_cost(n).params == ("fc1.weight", "fc1.bias"))
    cost = node_cost(fc1)
    assert cost.flops == 2 * 8 * 16 * 32
    # backward: grad of the weight only (the input needs no grad) = one matmul of the same size
    assert cost.backward_flops == 2 * 8 * 16 * 32
    assert cost.param_bytes == (32 * 16 + 32) * 4
    assert cost.bytes_read == (8 * 16 + 32 * 16 + 32) * 4
    assert cost.bytes_written == cost.output_bytes == 8 * 32 * 4
    assert cost.module == "fc1" and cost.module_type == "Linear"
    relu = next(iter(fc1.users))
    assert node_cost(relu).saved_from == ("relu",)  # relu keeps its own output for backward
    fc2 = next(iter(relu.users))
    assert node_cost(fc2).saved_from == ("relu",)  # fc2 saves its input: the same tensor
    assert gm.meta["autopart_totals"].activation_bytes == 8 * 32 * 4 + 8 * 16 * 4  # relu out + x


def test_backward_splits_into_input_and_weight_gradients() -> None:
    gm = annotate(trace(TwoLayer(16, 32, 4), (torch.randn(8, 16),)))
    by_params = {node_cost(n).params: node_cost(n) for n in gm.graph.nodes}
    fc1, fc2 = by_params["fc1.weight", "fc1.bias"], by_params["fc2.weight", "fc2.bias"]
    # fc1's input needs no gradient: all of its backward is dW = X^T dY
    assert fc1.backward_weight_flops == fc1.backward_flops == 2 * 8 * 16 * 32
    assert fc1.backward_input_flops == 0
    # fc2: dX = dY W^T and dW = X^T dY, one matmul each of the forward's size
    assert fc2.backward_weight_flops == fc2.backward_input_flops == 2 * 8 * 32 * 4
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    assert node_cost(relu).backward_weight_flops == 0  # no parameters: all input gradient


class _TransposedWeight(torch.nn.Module):
    """A matmul with a parameter seen through a view: its gradient is still a weight gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(16))
        self.w = torch.nn.Parameter(torch.randn(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale) @ self.w.t()


def test_a_view_of_a_parameter_counts_as_a_weight() -> None:
    gm = annotate(trace(_TransposedWeight(), (torch.randn(8, 16),)))
    mm = next(n for n in gm.graph.nodes if node_cost(n).flops > 8 * 16)
    cost = node_cost(mm)
    assert cost.backward_weight_flops == cost.backward_input_flops == 2 * 8 * 16 * 32


def test_tied_parameters_counted_once() -> None:
    model = Tied()
    gm = annotate(trace(model, (torch.randint(0, 32, (2, 5)),)))
    users = [n for n in gm.graph.nodes if "embed.weight" in node_cost(n).params]
    assert len(users) == 2  # embedding and head both use it
    assert gm.meta["autopart_totals"].params == sum(p.numel() for p in model.parameters())


def test_fx_fallback_annotates_the_same_costs_as_export() -> None:
    model, x = TwoLayer(), torch.randn(4, 16)
    a = annotate(trace(model, (x,), method="export")).meta["autopart_totals"]
    b = annotate(trace(model, (x,), method="fx")).meta["autopart_totals"]
    assert (a.flops, a.backward_flops, a.params, a.activation_bytes) == (
        b.flops,
        b.backward_flops,
        b.params,
        b.activation_bytes,
    )


def test_tracing_twice_gives_identical_names_and_annotations() -> None:
    def snapshot() -> list[tuple[str, str, NodeCost]]:
        _, gm = _annotated("llama-tiny", batch=2, seq=16)
        return [(n.name, str(n.target), node_cost(n)) for n in gm.graph.nodes]

    assert snapshot() == snapshot()


def test_meta_model_annotates_without_allocating() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loaded = load_model("gpt2-large", device="meta", batch=1, seq=64)  # 3 GiB of float32 if real
    gm = annotate(trace(loaded.model, loaded.example_inputs, loaded.example_kwargs))
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert gm.meta["autopart_totals"].params == 774_030_080
    assert grown_kib < 1024 * 1024  # far below the 3 GiB the weights would take


@pytest.mark.slow
def test_llama_70b_traces_and_annotates_on_meta() -> None:
    loaded = load_model("llama-70b", device="meta", batch=1, seq=128)
    gm = annotate(trace(loaded.model, loaded.example_inputs, loaded.example_kwargs))
    totals = gm.meta["autopart_totals"]
    assert totals.params == 70_553_706_496
    # Forward FLOPs of the matmuls: 2 * tokens * (non-embedding params), plus attention.
    tokens, layers, hidden = 128, 80, 8192
    matmul = 2 * tokens * (totals.params - 128256 * hidden)
    attention = layers * 2 * 2 * tokens * tokens * hidden
    assert totals.flops == pytest.approx(matmul + attention, rel=1e-3)


# -- in-place ops: replayed on non-leaf values, costed like their out-of-place twins ------------


class _Residual(torch.nn.Module):
    """``y += h`` (ResNet, Falcon), an in-place ReLU and routing weights normalised in place, or
    the same written out of place."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.block = torch.nn.Linear(16, 16)
        self.gate = torch.nn.Linear(16, 4)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.block(h)
        weights = torch.topk(self.gate(h), 2).values
        if self.inplace:
            y += h
            y = y.relu_()
            weights /= weights.sum(-1, keepdim=True)
        else:
            y = (y + h).relu()
            weights = weights / weights.sum(-1, keepdim=True)
        return y[:, :2] * weights


class _CopyInto(torch.nn.Module):
    """Values written with ``copy_``: into a fresh tensor (expert outputs) and into a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.expert = torch.nn.Linear(16, 16)
        self.register_buffer("last_mean", torch.zeros(16))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(h)
        out.copy_(self.expert(h))
        self.last_mean.copy_(h.detach().mean(0))
        return out * 2


def test_in_place_ops_on_values_that_need_grad_are_costed_like_their_twins() -> None:
    x = torch.randn(8, 16)
    inplace = annotate(trace(_Residual(inplace=True), (x,)))
    twin = annotate(trace(_Residual(inplace=False), (x,)))
    got, want = inplace.meta["autopart_totals"], twin.meta["autopart_totals"]
    assert (got.flops, got.backward_flops, got.params) == (
        want.flops,
        want.backward_flops,
        want.params,
    )
    assert got.backward_flops > 0
    for name, twin_name in (("add_", "add"), ("relu_", "relu"), ("div_", "div")):
        node = next(n for n in inplace.graph.nodes if n.name == name)
        twin_node = next(n for n in twin.graph.nodes if n.name == twin_name)
        cost, twin_cost = node_cost(node), node_cost(twin_node)
        assert not cost.is_view and cost.requires_grad
        assert (cost.bytes_read, cost.bytes_written) == (
            twin_cost.bytes_read,
            twin_cost.bytes_written,
        )
    # the relu writes the linear's storage: what backward keeps is that one tensor
    relu = next(n for n in inplace.graph.nodes if n.name == "relu_")
    assert node_cost(relu).saved_from == ("linear",)


def test_copy_into_a_fresh_tensor_and_into_a_buffer_is_annotated() -> None:
    gm = annotate(trace(_CopyInto(), (torch.randn(8, 16),)))
    copies = [n for n in gm.graph.nodes if n.target == torch.ops.aten.copy_.default]
    assert len(copies) == 2
    into_fresh, into_buffer = copies
    assert node_cost(into_fresh).requires_grad and not node_cost(into_fresh).is_view
    assert node_cost(into_fresh).bytes_written == 8 * 16 * 4
    assert node_cost(into_buffer).bytes_written == 16 * 4
    linear = next(n for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    assert node_cost(linear).backward_flops == 2 * 8 * 16 * 16  # the weight's gradient


def test_mixture_of_experts_with_in_place_routing_annotates() -> None:
    """HF Mixtral normalises its top-k routing weights in place (``div_``) and fills a fresh
    tensor with ``index_put_``: the annotation pass used to stop at the ``div_``."""
    pytest.importorskip("transformers")
    config = (
        "num_hidden_layers=2,hidden_size=64,intermediate_size=64,num_attention_heads=4,"
        "num_key_value_heads=2,vocab_size=128,num_local_experts=4,num_experts_per_tok=2"
    )
    loaded = load_model(
        "hf:mixtral", device="cpu", batch=2, seq=8, config=parse_config_overrides(config)
    )
    loaded.model.train()
    gm = annotate(trace(loaded.model, loaded.example_inputs, loaded.example_kwargs))
    targets = [str(n.target) for n in gm.graph.nodes]
    assert targets.count("aten.div_.Tensor") == targets.count("aten.index_put_.default") == 2
    for node in gm.graph.nodes:
        if str(node.target) == "aten.div_.Tensor":  # weights that carry gradients, written
            assert node_cost(node).requires_grad and not node_cost(node).is_view


class _Attention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_fused_attention_saves_what_torchs_kernel_saves() -> None:
    """What the annotation records for scaled_dot_product_attention is what torch's fused CPU
    kernel keeps for backward: query, key, value, output and log-sum-exp (by storage bytes)."""
    x = torch.randn(2, 16, 32)
    gm = annotate(trace(_Attention(), (x,)))
    [sdpa] = [n for n in gm.graph.nodes if "scaled_dot_product" in str(n.target)]
    cost = node_cost(sdpa)
    values = {n.name: node_cost(n).output_bytes for n in gm.graph.nodes}
    recorded = sum(values[v] for v in cost.saved_from) + cost.private_saved_bytes

    model = _Attention()
    qkv = model.qkv(x)
    q, k, v = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in qkv.chunk(3, -1))
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.grad_fn is not None and "Flash" in type(out.grad_fn).__name__
    # q, k and v are views of the projection's output: saved by storage, that output once
    assert cost.saved_from == ("linear", sdpa.name)
    assert recorded == sum(saved.values())
