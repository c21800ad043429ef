"""The solver's view of a model: OpGraph, layer detection, coarsening into blocks, boundary bytes."""

from __future__ import annotations

import dataclasses
import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx import GraphModule

import autopart
from autopart.cost_models import get_device
from autopart.cost_models.compute import is_lookup
from autopart.passes.annotate import node_cost
from autopart.planning.graph import (
    BlockGraph,
    OpGraph,
    OpNode,
    PartitionError,
    coarsen,
    detect_layers,
    group_blocks,
)
from autopart.solver import baselines
from autopart.solver.cost import stage_memory, stage_times_s
from tests.random_graphs import random_dags

H100 = get_device("h100")


@functools.cache
def zoo_graph(name: str) -> tuple[GraphModule, OpGraph]:
    loaded = autopart.load_model(name, device="meta", batch=8, seq=128)
    gm = autopart.annotate(
        autopart.trace(loaded.model, loaded.example_inputs, loaded.example_kwargs)
    )
    return gm, OpGraph.from_graph_module(gm, H100)


def chain(
    weights: list[float], nbytes: list[int], skips: tuple[tuple[int, int], ...] = ()
) -> OpGraph:
    """Nodes n0 -> n1 -> ... with the given compute and output bytes, plus skip edges (u, v)."""
    nodes = {}
    for i, (w, b) in enumerate(zip(weights, nbytes)):
        inputs = ([f"n{i - 1}"] if i else []) + [f"n{u}" for u, v in skips if v == i]
        nodes[f"n{i}"] = OpNode(f"n{i}", w / 3, 2 * w / 3, 0, b, tuple(inputs))
    return OpGraph(nodes, {})


def check_blocks(og: OpGraph, bg: BlockGraph, max_blocks: int) -> None:
    assert 1 <= len(bg.blocks) <= max_blocks
    flat = [n for b in bg.blocks for n in b.nodes]
    assert flat == list(og.order)  # contiguous, in order, every computing node exactly once
    assert all(b.compute_s > 0 for b in bg.blocks)  # no block of views / getitems alone
    nodes = og.nodes.values()
    assert sum(b.forward_s for b in bg.blocks) == pytest.approx(sum(n.forward_s for n in nodes))
    assert sum(b.backward_s for b in bg.blocks) == pytest.approx(sum(n.backward_s for n in nodes))
    assert sum(b.flops for b in bg.blocks) == sum(n.flops for n in nodes)
    assert sum(b.backward_flops for b in bg.blocks) == sum(n.backward_flops for n in nodes)
    assert sum(b.backward_weight_s for b in bg.blocks) == pytest.approx(
        sum(n.backward_weight_s for n in nodes)
    )
    for t in bg.tensors:
        assert t.consumers and min(t.consumers) > t.producer


def test_op_graph_of_gpt2() -> None:
    gm, og = zoo_graph("gpt2")
    ops = {n.name: n.op for n in gm.graph.nodes}
    assert all(ops[name] not in ("placeholder", "get_attr", "output") for name in og.order)
    assert list(og.order) == [n.name for n in gm.graph.nodes if n.name in og.nodes]
    assert og.nx.number_of_nodes() == len(og.order)
    for u, v, data in og.nx.edges(data=True):
        assert data["nbytes"] == og.nodes[u].output_bytes
        assert u in og.nodes[v].inputs
    lm_head = next(n for n in og.nodes.values() if n.module == "lm_head")
    assert lm_head.params == ("transformer.wte.weight",)  # tied to the embedding
    assert lm_head.is_output and lm_head.forward_s > 0 and lm_head.backward_s > 0
    assert {n.layer for n in og.nodes.values()} == {None} | {
        f"transformer.h.{i}" for i in range(12)
    }


def test_backward_splits_into_input_and_weight_gradients() -> None:
    _, og = zoo_graph("gpt2")
    nodes = list(og.nodes.values())
    for n in nodes:
        assert n.backward_input_s + n.backward_weight_s == pytest.approx(n.backward_s, abs=1e-15)
    matmuls = [n for n in nodes if n.module_type == "Linear" or n.module == "lm_head"]
    assert matmuls and all(0.3 < n.backward_weight_s / n.backward_s < 0.7 for n in matmuls)
    assert all(n.backward_weight_s == 0 for n in nodes if not n.params)
    bg = coarsen(og, max_blocks=16)
    total = sum(n.backward_weight_s for n in nodes)
    assert sum(b.backward_weight_s for b in bg.blocks) == pytest.approx(total)
    for b, q in zip(bg.blocks, bg.scaled(0.25).blocks):  # W keeps its share of the backward
        assert q.backward_weight_s * b.backward_s == pytest.approx(
            b.backward_weight_s * q.backward_s
        )
    with pytest.raises(autopart.AutopartError, match="backward_weight_s"):
        OpNode("bad", 1.0, 1.0, 0, 0, backward_weight_s=2.0)


def test_detect_layers() -> None:
    types = {"a": "", "a.0": "Blk", "a.1": "Blk", "b.0": "Conv2d", "b.1": "GroupNorm", "c.0": "X"}
    assert detect_layers(types) == {"a.0", "a.1"}  # b.*: different types; c.0: no sibling
    assert detect_layers({"h.0": "", "h.1": "Blk", "h.2": ""}) == {"h.0", "h.1", "h.2"}


@pytest.mark.parametrize(("name", "max_blocks"), [("gpt2", 64), ("gpt2", 20), ("llama-tiny", 16)])
def test_coarsen_zoo(name: str, max_blocks: int) -> None:
    _, og = zoo_graph(name)
    bg = coarsen(og, max_blocks=max_blocks)
    check_blocks(og, bg, max_blocks)
    assert len(bg.blocks) >= max_blocks - 2  # the budget is spent: blocks as fine as allowed
    layers = {b.layer for b in bg.blocks} - {None}
    if name == "llama-tiny":
        assert layers == {"model.layers.0", "model.layers.1"}


def test_coarsen_gpt2_blocks_and_tied_embedding() -> None:
    _, og = zoo_graph("gpt2")
    bg = coarsen(og, max_blocks=64)
    assert dict(bg.shared_params) == {"transformer.wte.weight": (0, len(bg.blocks) - 1)}
    wte_bytes = bg.param_bytes_by_name["transformer.wte.weight"]
    assert wte_bytes == 50257 * 768 * 4
    # param_bytes leaves the shared parameter out; params lists it.
    assert "transformer.wte.weight" in bg.blocks[0].params
    assert sum(b.param_bytes for b in bg.blocks) + wte_bytes == sum(bg.param_bytes_by_name.values())
    assert bg.blocks[-1].name == "lm_head"
    # every block boundary inside the 12 layers cuts at most the residual stream and one more tensor
    residual = 8 * 128 * 768 * 4
    assert max(bg.cut_bytes()) <= 5 * residual
    # the graph over block indices carries the tensors' bytes
    for t in bg.tensors:
        for c in t.consumers:
            assert bg.nx.edges[t.producer, c]["nbytes"] >= t.nbytes


def test_coarsen_with_stage_hint_keeps_the_best_node_split() -> None:
    _, og = zoo_graph("gpt2")
    fine = group_blocks(og, [[n] for n in og.order])
    for p in (3, 5):
        bg = coarsen(og, max_blocks=24, num_stages=p)
        check_blocks(og, bg, 24)
        best_nodes = max(stage_times_s(fine, baselines.chain_dp(fine, p, H100), p, H100))
        best_blocks = max(stage_times_s(bg, baselines.chain_dp(bg, p, H100), p, H100))
        assert best_blocks == pytest.approx(best_nodes, rel=1e-9)


def test_coarsen_small_graphs() -> None:
    og = chain([1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 1.0], [10] * 7)
    bg = coarsen(og, max_blocks=100)
    check_blocks(og, bg, 100)
    assert len(bg.blocks) == 4  # every weightless node joins a neighbour
    assert len(coarsen(og, max_blocks=1).blocks) == 1
    assert len(coarsen(chain([1.0] * 5, [1] * 5), max_blocks=5).blocks) == 5
    with pytest.raises(PartitionError, match="max_blocks"):
        coarsen(og, max_blocks=0)


def test_coarsen_prefers_cheap_cuts() -> None:
    # Equal compute; the cut after n3 carries 1 byte, every other 1000: with 2 blocks, cut there.
    og = chain([1.0] * 8, [1000, 1000, 1000, 1, 1000, 1000, 1000, 1000])
    bg = coarsen(og, max_blocks=2)
    assert [len(b.nodes) for b in bg.blocks] == [4, 4]
    og = chain([1.0] * 8, [1000, 1000, 1, 1000, 1000, 1000, 1000, 1000])
    assert [len(b.nodes) for b in coarsen(og, max_blocks=2).blocks] == [3, 5]


def test_boundary_bytes_counts_a_skip_at_every_boundary_it_passes() -> None:
    # n0 feeds n1 and (skipping two stages) n3; with one node per stage the skip crosses 0, 1, 2.
    og = chain([1.0] * 4, [100, 10, 1, 5], skips=((0, 3),))
    bg = group_blocks(og, [[n] for n in og.order])
    assert bg.boundary_bytes([0, 1, 2, 3], 4) == [100, 110, 101]
    assert bg.boundary_bytes([0, 0, 1, 1], 2) == [110]
    assert bg.boundary_bytes([0, 1, 1, 1], 2) == [100]
    assert bg.cut_bytes() == [0, 100, 110, 101, 0]
    times = stage_times_s(bg, [0, 1, 2, 3], 4, H100)
    p2p = autopart.cost_models.p2p_time_s
    assert times[1] == pytest.approx(1.0 + p2p(100, H100) + p2p(110, H100))


def test_validate_rejects_invalid_assignments() -> None:
    bg = group_blocks(chain([1.0] * 4, [8] * 4), [["n0"], ["n1"], ["n2"], ["n3"]])
    bg.validate([0, 0, 1, 1], 2)
    with pytest.raises(PartitionError, match="back"):
        bg.validate([0, 1, 0, 1], 2)
    with pytest.raises(PartitionError, match="no block"):
        bg.validate([0, 0, 2, 2], 3)
    with pytest.raises(PartitionError, match="one stage per block"):
        bg.validate([0, 1], 2)
    with pytest.raises(PartitionError, match="outside"):
        bg.validate([0, 1, 2, 5], 3)


def test_graph_outputs_travel_to_the_last_block() -> None:
    nodes = {
        "a": OpNode("a", 1.0, 1.0, 0, 64, is_output=True),
        "b": OpNode("b", 1.0, 1.0, 0, 8, ("a",)),
        "c": OpNode("c", 1.0, 1.0, 0, 4, ("b",), is_output=True),
    }
    bg = group_blocks(OpGraph(nodes, {}), [["a"], ["b"], ["c"]])
    assert {t.name: t.consumers for t in bg.tensors} == {"a": (1, 2), "b": (2,)}
    assert bg.boundary_bytes([0, 1, 2], 3) == [64, 72]


def test_cnn_long_skips_cross_every_stage_in_between() -> None:
    _, og = zoo_graph("cnn")
    bg = coarsen(og, max_blocks=64)
    check_blocks(og, bg, 64)
    assert {b.layer for b in bg.blocks} == {None}  # no repeated layers in this U-Net
    stage_of = baselines.chain_dp(bg, 4, H100)
    boundary = bg.boundary_bytes(stage_of, 4)
    long_skips = [t for t in bg.tensors if stage_of[t.consumers[-1]] - stage_of[t.producer] >= 2]
    assert long_skips  # the encoder's full-resolution features reach the last decoder stage
    for t in long_skips:
        for k in range(stage_of[t.producer], stage_of[t.consumers[-1]]):
            assert boundary[k] >= t.nbytes + min(x.nbytes for x in bg.tensors)


def test_activation_and_memory_accounting() -> None:
    gm, og = zoo_graph("gpt2")
    bg = coarsen(og, max_blocks=32)
    totals = gm.meta["autopart_totals"]
    acts = sum(b.activation_bytes for b in bg.blocks)
    assert acts == totals.activation_bytes  # a value several blocks save counted once
    assert bg.stage_activation_bytes([0] * len(bg.blocks), 1) == [acts]
    [one] = stage_memory(bg, [0] * len(bg.blocks), 1, in_flight=[2], optimizer="adamw")
    assert one.param_bytes == totals.param_bytes  # the tied weight once
    assert one.optimizer_bytes == 2 * one.param_bytes == 2 * one.grad_bytes
    assert one.activation_bytes == 2 * acts
    stage_of = baselines.equal_layers(bg, 2)
    two = stage_memory(bg, stage_of, 2, in_flight=[2, 1], optimizer="sgd")
    assert (
        sum(m.param_bytes for m in two)
        == totals.param_bytes + bg.param_bytes_by_name["transformer.wte.weight"]
    )
    assert all(m.optimizer_bytes == 0 for m in two)
    with pytest.raises(autopart.AutopartError, match="in_flight"):
        stage_memory(bg, stage_of, 2, in_flight=[1])


def test_a_value_several_blocks_save_counts_once_per_stage_that_saves_it() -> None:
    # n1's output is saved by n2 and by n3 (as a layer's normalised input is by its query, key
    # and value projections); n3 also saves its own input, n2's output
    nodes = {
        "n0": OpNode("n0", 1.0, 2.0, 0, 10),
        "n1": OpNode("n1", 1.0, 2.0, 0, 100, ("n0",)),
        "n2": OpNode("n2", 1.0, 2.0, 0, 7, ("n1",), saved_from=("n1",)),
        "n3": OpNode("n3", 1.0, 2.0, 0, 5, ("n1", "n2"), saved_from=("n1", "n2")),
    }
    bg = group_blocks(OpGraph(nodes, {}), [["n0", "n1"], ["n2"], ["n3"]])
    assert [b.activation_bytes for b in bg.blocks] == [0, 100, 7]  # n1 by its first saver
    assert [(t.name, t.producer, t.consumers) for t in bg.saved_across] == [("n1", 1, (2,))]
    assert bg.stage_activation_bytes([0, 0, 0], 1) == [107]
    assert bg.stage_activation_bytes([0, 0, 1], 2) == [100, 107]  # each stage keeps its own
    assert bg.stage_activation_bytes([0, 1, 1], 2) == [0, 107]
    again = bg.with_recompute([2])  # n3 recomputed keeps its inputs only
    assert again.stage_activation_bytes([0, 0, 1], 2) == [100, again.blocks[2].input_bytes]
    half = bg.scaled(0.5)
    assert half.saved_across[0].nbytes == 50
    assert half.stage_activation_bytes([0, 0, 1], 2) == [50, 54]
    merged = bg.by_layers()  # one unit (no layers): n1 counted once
    assert merged.saved_across == () and merged.stage_activation_bytes([0], 1) == [107]


def test_scaled_divides_per_sample_costs_and_keeps_the_fixed_part() -> None:
    _, og = zoo_graph("llama-tiny")
    bg = coarsen(og, max_blocks=16)
    half = bg.scaled(0.5)
    b, h = bg.blocks[3], half.blocks[3]
    assert 0 < b.fixed_forward_s < b.forward_s
    assert h.forward_s == pytest.approx(b.fixed_forward_s + (b.forward_s - b.fixed_forward_s) / 2)
    assert h.fixed_forward_s == b.fixed_forward_s
    assert [t.nbytes for t in half.tensors] == [round(t.nbytes / 2) for t in bg.tensors]
    assert half.param_bytes_by_name == bg.param_bytes_by_name
    assert half.op_graph is not None
    fixed = sum(n.fixed_forward_s + n.fixed_backward_s for n in og.nodes.values())
    assert sum(n.compute_s for n in half.op_graph.nodes.values()) == pytest.approx(
        fixed + (bg.total_compute_s - fixed) / 2
    )


def test_m_micro_batches_pay_the_fixed_part_m_times() -> None:
    # One node: 1 ms fixed (a launch, a weight read) + 3 ms that grows with the samples.
    node = OpNode("n", 4e-3, 8e-3, 10, 10, fixed_forward_s=1e-3, fixed_backward_s=2e-3)
    og = OpGraph({"n": node}, {})
    for m in (1, 2, 4, 8):
        per_micro_batch = og.scaled(1 / m).nodes["n"]
        assert m * per_micro_batch.forward_s == pytest.approx(m * 1e-3 + 3e-3)
        assert m * per_micro_batch.backward_s == pytest.approx(m * 2e-3 + 6e-3)
        block = coarsen(og, max_blocks=1).scaled(1 / m).blocks[0]
        assert m * block.compute_s == pytest.approx(m * 3e-3 + 9e-3)
    with pytest.raises(autopart.AutopartError, match="fixed part"):
        OpNode("bad", 1.0, 1.0, 0, 0, fixed_forward_s=2.0)


def test_fixed_part_is_launch_and_parameter_traffic() -> None:
    gm, og = zoo_graph("llama-tiny")
    spec = get_device("h100")
    for n in gm.graph.nodes:
        if n.name not in og.nodes or og.nodes[n.name].forward_s == 0:
            continue
        cost = node_cost(n)
        node = og.nodes[n.name]
        weights_s = cost.param_bytes / (spec.memory_bandwidth_bytes_per_s * spec.memory_efficiency)
        if not is_lookup(cost):
            assert node.fixed_forward_s == pytest.approx(
                min(spec.kernel_launch_s + weights_s, node.forward_s)
            )
        assert node.fixed_forward_s >= min(spec.kernel_launch_s, node.forward_s)
        if node.backward_s > 0 and cost.param_bytes:
            # weight reads, the weight gradient and its accumulation: 5 x the parameter bytes
            expected = spec.kernel_launch_s + (5 if not is_lookup(cost) else 4) * weights_s
            assert node.fixed_backward_s == pytest.approx(min(expected, node.backward_s))


@settings(max_examples=80, deadline=None)
@given(
    og=random_dags(max_nodes=12),
    positive=random_dags(max_nodes=10, positive=True),
    max_blocks=st.integers(1, 12),
    p=st.integers(2, 4),
)
def test_coarsen_random_graphs(og: OpGraph, positive: OpGraph, max_blocks: int, p: int) -> None:
    if sum(n.compute_s for n in og.nodes.values()) > 0:
        check_blocks(og, coarsen(og, max_blocks=max_blocks), max_blocks)
    # With a stage count, the best contiguous split of the nodes survives coarsening.
    slow = dataclasses.replace(H100, link_bandwidth_bytes_per_s=1e8)
    og = OpGraph(positive.nodes, positive.param_bytes_by_name, device=slow)
    p = min(p, len(og.order), max(max_blocks, 2))
    bg = coarsen(og, max_blocks=max(max_blocks, p), num_stages=p)
    check_blocks(og, bg, max(max_blocks, p))
    fine = group_blocks(og, [[n] for n in og.order])
    best_nodes = max(stage_times_s(fine, baselines.chain_dp(fine, p, slow), p, slow))
    best_blocks = max(stage_times_s(bg, baselines.chain_dp(bg, p, slow), p, slow))
    assert best_blocks == pytest.approx(best_nodes, rel=1e-9)
