"""Cost models: device table, roofline, alpha-beta collectives, memory, units. Hand-built costs only."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from autopart.cost_models import (
    DEVICES,
    ComputeModel,
    DeviceSpec,
    MemoryBreakdown,
    NodeCost,
    Optimizer,
    activation_bytes,
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    get_device,
    memory_of,
    node_costs,
    node_time_s,
    p2p_time_s,
    param_table,
    reduce_scatter_time_s,
)
from autopart.cost_models.compute import (
    backward_bytes,
    backward_weight_bytes,
    backward_weight_fraction,
    forward_bytes,
    is_lookup,
)
from autopart.errors import AutopartError, UnknownDeviceError
from autopart.units import format_bytes, format_flops, format_seconds, parse_bytes

H100 = DEVICES["h100"]


def _cost(**overrides: Any) -> NodeCost:
    fields: dict[str, Any] = {
        "flops": 0,
        "backward_flops": 0,
        "bytes_read": 0,
        "bytes_written": 0,
        "output_bytes": 0,
        "param_bytes": 0,
        "params": (),
        "buffer_bytes": 0,
        "saved_from": (),
        "private_saved_bytes": 0,
        "requires_grad": False,
        "is_view": False,
        "dtype": "float32",
        "module": "",
        "module_type": "",
    }
    fields.update(overrides)
    return NodeCost(**fields)


# ---------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize(
    ("name", "canonical"),
    [
        ("h100", "h100"),
        ("H100", "h100"),
        ("h100-sxm", "h100"),
        ("H100_SXM5", "h100"),
        (" h200-sxm ", "h200"),
        ("a100-80gb", "a100"),
        ("A100-SXM4", "a100"),
        ("cpu", "cpu"),
    ],
)
def test_get_device_names_and_aliases(name: str, canonical: str) -> None:
    assert get_device(name) is DEVICES[canonical]


def test_get_device_passes_a_spec_through() -> None:
    custom = dataclasses.replace(H100, name="my-gpu")
    assert get_device(custom) is custom


def test_unknown_device_names_closest_match_and_known_list() -> None:
    with pytest.raises(UnknownDeviceError) as info:
        get_device("h10")
    message = str(info.value)
    assert "unknown device 'h10'" in message
    assert "did you mean 'h100'?" in message
    assert "Known devices: a100, cpu, h100, h200" in message
    assert "DeviceSpec(" in message
    assert isinstance(info.value, ValueError)


def test_unknown_device_alias_suggests_canonical_name() -> None:
    with pytest.raises(UnknownDeviceError, match="did you mean 'a100'"):
        get_device("a100-sxm5")


def test_datasheet_peaks() -> None:
    assert H100.peak_flops_per_s("bfloat16") == 989.4e12
    assert H100.peak_flops_per_s("float32") == 66.9e12
    assert H100.peak_flops_per_s("float32", allow_tf32=True) == 494.7e12
    assert H100.peak_flops_per_s("float8_e4m3fn") == 1979e12
    assert H100.memory_bandwidth_bytes_per_s == 3.35e12
    assert H100.link_bandwidth_bytes_per_s == 450e9
    h200, a100, cpu = DEVICES["h200"], DEVICES["a100"], DEVICES["cpu"]
    assert h200.peak_bf16_flops_per_s == H100.peak_bf16_flops_per_s
    assert h200.memory_bandwidth_bytes_per_s == 4.8e12
    assert h200.memory_bytes > H100.memory_bytes
    assert a100.peak_flops_per_s("torch.bfloat16") == 312e12
    assert a100.peak_flops_per_s("float8_e5m2") == 312e12  # no FP8 units: FP16 rate
    assert a100.peak_flops_per_s("float32", allow_tf32=True) == 156e12
    assert cpu.peak_flops_per_s("float32") == pytest.approx(2 * 2.45e9 * 32)
    assert cpu.peak_flops_per_s("float32", allow_tf32=True) == cpu.peak_fp32_flops_per_s
    assert H100.peak_flops_per_s("int64") == H100.peak_fp32_flops_per_s


def test_every_device_cites_sources() -> None:
    for spec in DEVICES.values():
        assert spec.sources, spec.name
        assert spec.description


def test_device_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        DEVICES["tpu"] = H100


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory_bytes", 0),
        ("memory_bandwidth_bytes_per_s", -1.0),
        ("link_latency_s", 0.0),
        ("peak_tf32_flops_per_s", 0.0),
        ("compute_efficiency", 1.5),
        ("memory_efficiency", 0.0),
    ],
)
def test_device_spec_validates_fields(field: str, value: float) -> None:
    with pytest.raises(AutopartError, match=field):
        dataclasses.replace(H100, **{field: value})


def test_device_spec_optional_peaks_may_be_none() -> None:
    spec = dataclasses.replace(H100, peak_tf32_flops_per_s=None, peak_fp8_flops_per_s=None)
    assert spec.peak_flops_per_s("float32", allow_tf32=True) == spec.peak_fp32_flops_per_s
    assert spec.peak_flops_per_s("float8_e4m3fn") == spec.peak_fp16_flops_per_s
    assert isinstance(spec, DeviceSpec)


# ---------------------------------------------------------------------------------------- compute

N = 4096
MATMUL = _cost(  # bf16 [N, N] @ [N, N]
    flops=2 * N**3,
    backward_flops=4 * N**3,
    bytes_read=2 * N * N * 2,
    bytes_written=N * N * 2,
    output_bytes=N * N * 2,
    requires_grad=True,
    dtype="bfloat16",
)
ADD = _cost(  # bf16 elementwise add of two 2^26-element tensors
    flops=2**26,
    bytes_read=2 * 2**26 * 2,
    bytes_written=2**26 * 2,
    output_bytes=2**26 * 2,
    dtype="bfloat16",
)


def test_matmul_is_compute_bound_on_h100() -> None:
    # 2 * 4096^3 = 137.4 GFLOP at 989.4 TFLOP/s * 0.75 = 185.2 us; its 100.7 MB take 33.4 us
    # at 3.35 TB/s * 0.9; plus 5 us launch.
    assert node_time_s(MATMUL, H100) == pytest.approx(190.2e-6, rel=1e-3)


def test_elementwise_is_memory_bound_on_h100() -> None:
    # 402.7 MB at 3.35 TB/s * 0.9 = 133.55 us (its 67 MFLOP take 0.09 us); plus 5 us launch.
    assert node_time_s(ADD, H100) == pytest.approx(138.55e-6, rel=1e-3)


def test_backward_uses_backward_flops_and_twice_the_bytes() -> None:
    assert node_time_s(MATMUL, H100, backward=True) == pytest.approx(375.4e-6, rel=1e-3)
    add_grad = dataclasses.replace(ADD, requires_grad=True)
    assert node_time_s(add_grad, H100, backward=True) == pytest.approx(272.1e-6, rel=1e-3)
    assert node_time_s(ADD, H100, backward=True) == 0.0  # no autograd, no backward


CPU = DEVICES["cpu"]
CPU_BYTES_PER_S = 20e9 * 0.9  # memory_bandwidth_bytes_per_s * memory_efficiency
_TABLE_BYTES = 32000 * 256 * 4  # fp32 embedding table, vocab 32,000 x hidden 256
_ROWS_BYTES = 128 * 256 * 4  # the rows 128 tokens look up
EMBEDDING = _cost(
    bytes_read=_TABLE_BYTES + 128 * 8,  # the table (a parameter) and int64 indices
    bytes_written=_ROWS_BYTES,
    output_bytes=_ROWS_BYTES,
    param_bytes=_TABLE_BYTES,
    params=("embed.weight",),
    requires_grad=True,
)


def test_backward_adds_each_weight_gradient_into_its_accumulator() -> None:
    # x * w with a trainable w shaped like x (fp32, 2^20 elements): memory-bound, 3 tensors.
    # Backward: 2 x the forward's 12 MiB, plus grad += new (read 2, write 1) over w's 4 MiB.
    size = 4 * 2**20
    scale = _cost(
        bytes_read=2 * size,
        bytes_written=size,
        output_bytes=size,
        param_bytes=size,
        params=("w",),
        requires_grad=True,
    )
    assert node_time_s(scale, CPU, backward=True) == pytest.approx(
        (2 * 3 * size + 3 * size) / CPU_BYTES_PER_S + 4e-6
    )
    no_param = dataclasses.replace(scale, param_bytes=0, params=())
    assert node_time_s(no_param, CPU, backward=True) == pytest.approx(
        2 * 3 * size / CPU_BYTES_PER_S + 4e-6
    )


def test_lookup_reads_its_rows_and_its_backward_writes_a_dense_table_gradient() -> None:
    assert is_lookup(EMBEDDING)
    # forward: indices, the 128 rows read, the 128 rows written; not the 32 MiB table
    assert forward_bytes(EMBEDDING) == 128 * 8 + 2 * _ROWS_BYTES
    assert node_time_s(EMBEDDING, CPU) == pytest.approx(
        (128 * 8 + 2 * _ROWS_BYTES) / CPU_BYTES_PER_S + 4e-6
    )
    # backward: zero the dense table-sized gradient, read the output gradient and add it into the
    # rows (3 x rows), then accumulate the table gradient (3 x table)
    assert backward_bytes(EMBEDDING) == _TABLE_BYTES + 3 * _ROWS_BYTES + 3 * _TABLE_BYTES
    assert node_time_s(EMBEDDING, CPU, backward=True) == pytest.approx(
        (4 * _TABLE_BYTES + 3 * _ROWS_BYTES) / CPU_BYTES_PER_S + 4e-6
    )
    # the backward costs the table, whatever the tokens: 80x the forward here
    assert node_time_s(EMBEDDING, CPU, backward=True) > 50 * node_time_s(EMBEDDING, CPU)


def test_backward_weight_share_follows_the_roofline_of_each_part() -> None:
    # a linear with a trainable weight: half the backward FLOPs are dW, plus the accumulation
    linear = dataclasses.replace(
        MATMUL, backward_weight_flops=2 * N**3, param_bytes=N * N * 2, params=("w",)
    )
    fraction = backward_weight_fraction(linear, H100)
    assert fraction == pytest.approx(0.5)  # both halves compute-bound, at equal FLOPs
    weight = backward_weight_bytes(linear)
    assert weight == 3 * N * N * 2 + (backward_bytes(linear) - 3 * N * N * 2) // 2
    # a lookup's backward is all weight gradient; a node without parameters has none
    assert backward_weight_fraction(EMBEDDING, CPU) == 1.0
    assert backward_weight_fraction(dataclasses.replace(ADD, requires_grad=True), H100) == 0.0
    model = ComputeModel(H100, measured_backward_s={"lin": 1e-3})
    assert model.backward_weight_s("lin", linear) == pytest.approx(1e-3 * fraction)
    assert model.backward_weight_s("add", ADD) == 0.0


def test_elementwise_ops_on_parameters_are_not_lookups() -> None:
    # a norm's scale (hidden 256) over 128 tokens returns more than its parameter
    norm_scale = _cost(
        bytes_read=_ROWS_BYTES + 1024,
        bytes_written=_ROWS_BYTES,
        output_bytes=_ROWS_BYTES,
        param_bytes=1024,
        params=("norm.weight",),
        requires_grad=True,
    )
    assert not is_lookup(norm_scale)
    assert not is_lookup(dataclasses.replace(MATMUL, param_bytes=N * N * 2))  # does arithmetic
    assert forward_bytes(norm_scale) == norm_scale.bytes


def test_a_tensor_parallel_share_of_a_lookup_moves_at_most_its_bytes() -> None:
    # solver.tp_costs divides bytes read and written by the degree, not param or output bytes
    share = dataclasses.replace(
        EMBEDDING,
        bytes_read=EMBEDDING.bytes_read // 4,
        bytes_written=EMBEDDING.bytes_written // 4,
    )
    assert 0 < forward_bytes(share) <= share.bytes


def test_views_and_zero_work_nodes_take_no_time() -> None:
    assert node_time_s(dataclasses.replace(ADD, is_view=True), H100) == 0.0
    assert node_time_s(_cost(output_bytes=1024), H100) == 0.0  # a placeholder


def test_float32_matmul_uses_tf32_only_when_allowed() -> None:
    fp32 = dataclasses.replace(MATMUL, dtype="float32")
    slow = node_time_s(fp32, H100)
    fast = node_time_s(fp32, H100, allow_tf32=True)
    assert slow == pytest.approx(2 * N**3 / (66.9e12 * 0.75) + 5e-6)
    assert fast == pytest.approx(2 * N**3 / (494.7e12 * 0.75) + 5e-6)


def test_compute_model_prefers_measurements() -> None:
    model = ComputeModel(H100, measured_forward_s={"mm": 1e-3}, measured_backward_s={"mm": 2e-3})
    assert model.forward_s("mm", MATMUL) == 1e-3
    assert model.backward_s("mm", MATMUL) == 2e-3
    assert model.forward_s("other", MATMUL) == node_time_s(MATMUL, H100)
    assert model.backward_s("other", MATMUL) == node_time_s(MATMUL, H100, backward=True)


def test_compute_model_efficiency_overrides_and_copies_measurements() -> None:
    measured = {"mm": 1e-3}
    model = ComputeModel(H100, measured_forward_s=measured, compute_efficiency=1.0)
    measured["mm"] = 5.0
    assert model.forward_s("mm", MATMUL) == 1e-3
    assert model.forward_s("x", MATMUL) == pytest.approx(2 * N**3 / 989.4e12 + 5e-6)


def test_compute_model_validates() -> None:
    with pytest.raises(AutopartError, match="compute_efficiency"):
        ComputeModel(H100, compute_efficiency=1.5)
    with pytest.raises(AutopartError, match="measured_forward_s"):
        ComputeModel(H100, measured_forward_s={"mm": -1.0})


# ------------------------------------------------------------------------------------------- comm

GB = 10**9


def test_p2p_alpha_beta() -> None:
    # NVLink: 3 us + 1 GB / (450 GB/s * 0.8)
    assert p2p_time_s(GB, H100) == pytest.approx(3e-6 + 1 / 360)
    # InfiniBand NDR: 10 us + 1 GB / (50 GB/s * 0.9)
    assert p2p_time_s(GB, H100, inter_node=True) == pytest.approx(10e-6 + 1 / 45)
    assert p2p_time_s(0, H100) == 0.0


def test_ring_collectives_by_hand() -> None:
    # 8 ranks on NVLink: all-reduce 2*7 steps of 3 us and 2*7/8 of 1 GB at 360 GB/s
    assert all_reduce_time_s(GB, 8, H100) == pytest.approx(42e-6 + 1.75 / 360)
    assert all_gather_time_s(GB, 8, H100) == pytest.approx(21e-6 + 0.875 / 360)
    assert reduce_scatter_time_s(GB, 8, H100) == pytest.approx(21e-6 + 0.875 / 360)
    assert all_to_all_time_s(GB, 8, H100) == pytest.approx(21e-6 + 0.875 / 360)
    # 2 ranks across nodes: 2 steps of 10 us and 1 GB at 45 GB/s
    assert all_reduce_time_s(GB, 2, H100, inter_node=True) == pytest.approx(20e-6 + 1 / 45)


@pytest.mark.parametrize("world", [2, 4, 8, 64])
def test_all_reduce_is_reduce_scatter_plus_all_gather(world: int) -> None:
    for device in DEVICES.values():
        both = reduce_scatter_time_s(GB, world, device) + all_gather_time_s(GB, world, device)
        assert all_reduce_time_s(GB, world, device) == pytest.approx(both)


def test_one_rank_or_no_bytes_costs_nothing() -> None:
    for collective in (all_reduce_time_s, all_gather_time_s, reduce_scatter_time_s):
        assert collective(GB, 1, H100) == 0.0
        assert collective(0, 8, H100) == 0.0


def test_comm_validates_inputs() -> None:
    with pytest.raises(AutopartError, match="negative"):
        all_reduce_time_s(-1, 2, H100)
    with pytest.raises(AutopartError, match="world=0"):
        all_gather_time_s(GB, 0, H100)
    with pytest.raises(AutopartError, match="negative"):
        p2p_time_s(-5, H100)


# ----------------------------------------------------------------------------------------- memory


def test_optimizer_states() -> None:
    assert [o.states_per_param for o in Optimizer] == [0, 1, 2, 2]
    assert Optimizer("adamw") is Optimizer.ADAMW
    assert str(Optimizer.SGD_MOMENTUM) == "sgd_momentum"


def test_tied_parameters_counted_once() -> None:
    costs = {
        "embed": _cost(params=("wte.weight",), param_bytes=1000),
        "lm_head": _cost(params=("wte.weight", "head.bias"), param_bytes=1040),
    }
    sizes = {"wte.weight": 1000, "head.bias": 40}
    mem = memory_of(costs, sizes, optimizer="sgd")
    assert (mem.param_bytes, mem.grad_bytes, mem.optimizer_bytes) == (1040, 1040, 0)


@pytest.mark.parametrize(
    ("optimizer", "optimizer_bytes"),
    [(Optimizer.SGD, 0), ("sgd_momentum", 4000), ("Adam", 8000), (Optimizer.ADAMW, 8000)],
)
def test_optimizer_state_bytes(optimizer: Optimizer | str, optimizer_bytes: int) -> None:
    costs = [_cost(params=("w",), param_bytes=4000)]
    mem = memory_of(costs, {"w": (1000, 4000, "float32")}, optimizer=optimizer)
    assert mem.optimizer_bytes == optimizer_bytes
    assert mem.total_bytes == 4000 + 4000 + optimizer_bytes


def test_mixed_precision_adam_is_16_bytes_per_parameter() -> None:
    numel = 1000
    costs = [_cost(params=("w",), param_bytes=2 * numel, dtype="bfloat16")]
    for size in ((numel, 2 * numel, "bfloat16"), 2 * numel):  # full table entry, or bytes only
        mem = memory_of(costs, {"w": size}, optimizer="adam", mixed_precision=True)
        assert (mem.param_bytes, mem.grad_bytes) == (2 * numel, 2 * numel)
        assert mem.optimizer_bytes == 12 * numel  # fp32 master + exp_avg + exp_avg_sq
        assert mem.total_bytes == 16 * numel


def test_mixed_precision_needs_no_master_copy_of_fp32_parameters() -> None:
    costs = [_cost(params=("w",), param_bytes=4000)]
    mem = memory_of(costs, {"w": (1000, 4000, "float32")}, optimizer="adam", mixed_precision=True)
    assert mem.optimizer_bytes == 8000


def test_frozen_parameters_have_no_gradient_or_state() -> None:
    costs = [_cost(params=("a", "b"), param_bytes=300)]
    mem = memory_of(costs, {"a": 100, "b": 200}, optimizer="adam", frozen_params={"b"})
    assert (mem.param_bytes, mem.grad_bytes, mem.optimizer_bytes) == (300, 100, 200)


def test_activations_saved_by_two_consumers_counted_once() -> None:
    costs = {
        "x": _cost(output_bytes=100),
        "h": _cost(output_bytes=50, saved_from=("x",), private_saved_bytes=7),
        "y": _cost(output_bytes=50, saved_from=("x", "h")),
    }
    assert activation_bytes(costs) == 100 + 50 + 7
    assert activation_bytes(costs, micro_batches_in_flight=3) == 3 * 157
    mem = memory_of(costs, {}, micro_batches_in_flight=3)
    assert mem.activation_bytes == 3 * 157
    assert mem.total_bytes == 3 * 157


def test_saved_inputs_from_outside_the_group_need_their_costs() -> None:
    everything = {"x": _cost(output_bytes=100), "y": _cost(saved_from=("x",))}
    stage = {"y": everything["y"]}
    with pytest.raises(AutopartError, match="costs_by_name"):
        activation_bytes(stage)
    assert activation_bytes(stage, costs_by_name=everything) == 100
    bare = [everything["y"], everything["y"]]  # unnamed costs work the same way
    assert activation_bytes(bare, costs_by_name=everything) == 100


def test_memory_errors_say_how_to_fix() -> None:
    with pytest.raises(AutopartError, match="param_table"):
        memory_of([_cost(params=("w",), param_bytes=4)])
    with pytest.raises(AutopartError, match="choose one of sgd, sgd_momentum, adam, adamw"):
        memory_of([], {}, optimizer="lamb")
    with pytest.raises(AutopartError, match="micro_batches_in_flight"):
        activation_bytes([], micro_batches_in_flight=-1)
    with pytest.raises(AutopartError, match="cannot be negative"):
        MemoryBreakdown(param_bytes=-1, grad_bytes=0, optimizer_bytes=0, activation_bytes=0)


class _TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def _annotated_tiny_mlp() -> torch.fx.GraphModule:
    """A traced two-op graph with hand-written costs, as the annotation pass would leave it."""
    gm = torch.fx.symbolic_trace(_TinyMLP())
    x, fc, relu, output = gm.graph.nodes
    x.meta["autopart"] = _cost(output_bytes=64)
    fc.meta["autopart"] = _cost(
        flops=256,
        output_bytes=64,
        params=("fc.weight", "fc.bias"),
        param_bytes=80,
        saved_from=("x",),
        requires_grad=True,
    )
    relu.meta["autopart"] = _cost(output_bytes=64, saved_from=("relu",), requires_grad=True)
    output.meta["autopart"] = _cost()
    gm.meta["autopart_params"] = {"fc.weight": (16, 64, "float32"), "fc.bias": (4, 16, "float32")}
    return gm


def test_memory_of_fx_nodes_reads_the_graph() -> None:
    gm = _annotated_tiny_mlp()
    _, fc, relu, _ = gm.graph.nodes
    mem = memory_of([fc, relu], optimizer="adam")  # x lies outside: found in the graph
    assert mem == MemoryBreakdown(
        param_bytes=80, grad_bytes=80, optimizer_bytes=160, activation_bytes=64 + 64
    )
    assert param_table(gm) == gm.meta["autopart_params"]
    assert list(node_costs(gm.graph.nodes)) == ["x", "fc", "relu", "output"]


def test_unannotated_nodes_are_rejected() -> None:
    gm = torch.fx.symbolic_trace(_TinyMLP())
    with pytest.raises(AutopartError, match="annotate"):
        memory_of(list(gm.graph.nodes))
    with pytest.raises(AutopartError, match="annotate"):
        param_table(gm)


# ------------------------------------------------------------------------------------------ units


@pytest.mark.parametrize(
    ("text", "nbytes"),
    [
        ("1024", 1024),
        ("512B", 512),
        ("1KB", 1000),
        ("1 KiB", 1024),
        ("80GiB", 80 * 2**30),
        ("80 GB", 80 * 10**9),
        ("1.5GiB", 3 * 2**29),
        ("2tib", 2 * 2**40),
        ("3 MB", 3 * 10**6),
        (".5 MiB", 2**19),
        (4096, 4096),
    ],
)
def test_parse_bytes(text: str | int, nbytes: int) -> None:
    assert parse_bytes(text) == nbytes


@pytest.mark.parametrize("text", ["", "GiB", "80 GX", "80G", "-5", "1.2.3 GB", "eighty", -1])
def test_parse_bytes_rejects_with_accepted_forms(text: str | int) -> None:
    with pytest.raises(AutopartError, match="KiB/MiB/GiB/TiB"):
        parse_bytes(text)


@pytest.mark.parametrize("nbytes", [0, 512, 1024, 3 * 2**29, 80 * 2**30, 3 * 2**40])
def test_format_bytes_round_trips(nbytes: int) -> None:
    assert parse_bytes(format_bytes(nbytes)) == nbytes


def test_formatting() -> None:
    assert format_bytes(3 * 2**29) == "1.50 GiB"
    assert format_bytes(512) == "512 B"
    assert format_flops(3.2e9) == "3.2 GFLOP"
    assert format_flops(999.9e9) == "1 TFLOP"
    assert format_flops(12) == "12 FLOP"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(4.5e-6) == "4.5 µs"
    assert format_seconds(2.0) == "2 s"
    assert format_seconds(0) == "0 s"
    assert format_seconds(3600) == "3600 s"
