"""Compute time of one node: the roofline model, replaced by measurements where profiling has them.

Roofline (Williams, Waterman & Patterson, "Roofline: an insightful visual performance model for
multicore architectures", CACM 52(4), 2009): a kernel is limited either by arithmetic or by memory
traffic, so its time is the larger of the two, each at an achievable fraction of the peak::

    t = max(flops / (peak_flops_per_s[dtype] * compute_efficiency),
            bytes / (memory_bandwidth_bytes_per_s * memory_efficiency)) + kernel_launch_s

Views and nodes that do no work (placeholders, ``get_attr``, ``output``) take no time.

Backward: ``NodeCost.backward_flops`` for the arithmetic, and twice the forward bytes for the
traffic, for nodes whose output requires grad (else the node has no backward: 0). Why twice: the
backward of an elementwise op reads the output gradient and the saved input(s) and writes the input
gradient (about the forward traffic); an op with parameters also computes the weight gradient, which
reads the saved input and the output gradient again and writes a tensor the size of the weight. For
``y = x @ W`` that is ``dx = dy @ W.T`` plus ``dW = x.T @ dy``: two GEMMs with the forward's operand
sizes, matching the usual 2x backward FLOPs (Kaplan et al. 2020, "Scaling laws for neural language
models", section 2.1: ~6N FLOPs per token for training vs 2N forward).

Zero-bubble pipeline schedules run the two halves apart: ``B`` (input gradients) as soon as the
next stage's gradient arrives, ``W`` (weight gradients) later, to fill the bubble. The share of a
node's backward that is ``W`` (:func:`backward_weight_fraction`) is the roofline time of its own
FLOPs (``NodeCost.backward_weight_flops``, measured by replay) and bytes
(:func:`backward_weight_bytes`) over that of both halves; a backward time, measured or predicted,
splits in that ratio, so ``B + W`` is always the backward time the planner used before.

Two costs of training that the 2x rule misses, both proportional to the parameters rather than to
the tokens (so they weigh most on small micro-batches and on large tables):

- **Gradient accumulation.** A pipeline runs the backward once per micro-batch, and autograd's
  ``AccumulateGrad`` adds each new weight gradient into ``param.grad`` (``grad += new``): it reads
  both and writes the sum, ``3 x param_bytes`` per backward (:data:`_GRAD_ACCUMULATION_BYTES_FACTOR`;
  the first micro-batch of a step stores its gradient instead, so this slightly overcounts it).
  Parameters are taken as trainable, the memory model's convention for a node's parameters.
- **Lookups** (``embedding``, a gather from a parameter; :func:`is_lookup`). The forward reads only
  the rows it returns, not the table its ``bytes_read`` names. The backward
  (``embedding_dense_backward``) allocates a zero gradient of the whole table, reads the output
  gradient and adds it into the looked-up rows: ``param_bytes`` written plus 3 x the output's bytes,
  whatever the number of tokens. Measured on the development CPU (one thread, vocab 32,000 x
  hidden 256, 128 tokens per micro-batch, gradients accumulated over 8): 5.7 ms of CPU time per
  micro-batch for forward and backward, of which the forward took 0.03 ms. The rules before
  charged the forward a read of the whole table and the backward twice that.

**The fixed part** (:func:`fixed_time_s`): what a node costs whatever the micro-batch size. The
FLOPs and the activation traffic grow with the tokens; the kernel launch (PyTorch's dispatch on
CPU), reading the weights, writing their gradient, accumulating it into ``param.grad`` and a
lookup's table-sized gradient do not. The planner costs one micro-batch as ``fixed + (time -
fixed) x size / traced size`` (:meth:`autopart.planning.graph.OpGraph.scaled`), which is exact at
the traced size and at zero tokens (a roofline is the max of two lines, so in between it is an
upper bound), so a step of ``m`` micro-batches pays the fixed part ``m`` times, as it runs.

**The update** (:func:`update_time_s`): after the last backward, every device steps its optimizer
over the parameters it updates, and torch's pipeline schedules first divide the accumulated
gradients by the micro-batch count (``scale_grads``). Both stream memory and nothing else: the
step reads each parameter and its gradient and writes the parameter (3 bytes per parameter byte),
reads and writes each optimizer state (2 per state), and the scaling reads and writes the gradient
(2). Measured on the development CPU (one thread, 8 x 4 MiB float32 parameters): SGD 4.0 ms and
the scaling 1.9 ms, against 5.3 and 3.6 ms predicted at the cpu model's 18 GB/s; AdamW 22.7 ms
against 12.4 (its per-element arithmetic binds on one core; on GPUs it streams).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from autopart.cost_models.devices import DeviceSpec
from autopart.cost_models.node_cost import NodeCost
from autopart.errors import AutopartError

__all__ = [
    "ComputeModel",
    "backward_bytes",
    "backward_weight_bytes",
    "backward_weight_fraction",
    "fixed_bytes",
    "fixed_time_s",
    "forward_bytes",
    "is_lookup",
    "node_time_s",
    "update_time_s",
]

_BACKWARD_BYTES_FACTOR = 2
"""Backward memory traffic per forward byte (see the module docstring)."""

_GRAD_ACCUMULATION_BYTES_FACTOR = 3
"""Bytes moved per parameter byte when a backward adds its weight gradient into ``param.grad``:
read the accumulated gradient, read the new one, write the sum."""

_SCATTER_BYTES_FACTOR = 3
"""Bytes moved per output byte by a lookup's backward: read the output gradient, then read and
write the rows of the dense gradient it is added into."""


def is_lookup(cost: NodeCost) -> bool:
    """Whether the node gathers rows of a parameter (``embedding``, indexing a weight): it does no
    arithmetic and returns less than the parameter it reads. Elementwise ops on a parameter (a norm's
    scale, a bias add) return at least the parameter's size, so they are not lookups."""
    return cost.flops == 0 and not cost.is_view and cost.output_bytes < cost.param_bytes


def forward_bytes(cost: NodeCost) -> int:
    """Memory traffic of the node's forward: its ``bytes`` (inputs read, outputs written), except
    that a lookup reads only the rows it returns (as many bytes as its output), not its table.

    Never more than ``bytes``: a tensor-parallel share of a node (``solver.tp_costs``) divides the
    bytes read and written but keeps the whole node's ``param_bytes`` and ``output_bytes``."""
    if is_lookup(cost):
        other_reads = max(cost.bytes_read - cost.param_bytes, 0)  # the indices
        return min(cost.bytes, other_reads + cost.output_bytes + cost.bytes_written)
    return cost.bytes


def backward_bytes(cost: NodeCost) -> int:
    """Memory traffic of the node's backward (0 without one): twice the forward bytes, or for a
    lookup the dense table-sized gradient and the scatter into it, plus the accumulation of every
    parameter's gradient (see the module docstring)."""
    if cost.is_view or not cost.requires_grad:
        return 0
    if is_lookup(cost):
        gradient = cost.param_bytes + _SCATTER_BYTES_FACTOR * cost.output_bytes
    else:
        gradient = _BACKWARD_BYTES_FACTOR * cost.bytes
    return gradient + _GRAD_ACCUMULATION_BYTES_FACTOR * cost.param_bytes


def backward_weight_bytes(cost: NodeCost) -> int:
    """The part of :func:`backward_bytes` that computing the parameter gradients moves: the
    accumulation into ``param.grad``, a lookup's whole table-sized gradient, and of the rest (the
    gradient kernels' reads and writes) the weight gradient's share of the backward FLOPs, or half
    when a node with parameters does no counted arithmetic (a norm's scale: its weight gradient
    reads the saved input and the output gradient again, as its input gradient does)."""
    total = backward_bytes(cost)
    if total == 0 or (cost.param_bytes == 0 and cost.backward_weight_flops == 0):
        return 0
    if is_lookup(cost):
        return total  # the gradient of the indices is not computed: all of it is the table's
    accumulation = _GRAD_ACCUMULATION_BYTES_FACTOR * cost.param_bytes
    share = cost.backward_weight_flops / cost.backward_flops if cost.backward_flops else 0.5
    return accumulation + round((total - accumulation) * share)


def backward_weight_fraction(
    cost: NodeCost, device: DeviceSpec, *, allow_tf32: bool = False, **efficiency: float | None
) -> float:
    """The share of the node's backward time that computes parameter gradients (``W`` of a
    zero-bubble schedule; the rest, ``B``, computes input gradients): the roofline time of its
    FLOPs (``backward_weight_flops``) and bytes (:func:`backward_weight_bytes`) over that of both
    parts, so that a measured backward splits in the same ratio. 0 for a node without parameters.
    ``efficiency``: ``compute_efficiency`` / ``memory_efficiency`` overrides, as for
    :func:`node_time_s`."""
    if cost.is_view or not cost.requires_grad:
        return 0.0
    weight_bytes = backward_weight_bytes(cost)
    weight_s = _roofline_s(
        cost, device, cost.backward_weight_flops, weight_bytes, allow_tf32, **efficiency
    )
    input_s = _roofline_s(
        cost,
        device,
        cost.backward_input_flops,
        backward_bytes(cost) - weight_bytes,
        allow_tf32,
        **efficiency,
    )
    return weight_s / (weight_s + input_s) if weight_s > 0 else 0.0


def _roofline_s(
    cost: NodeCost,
    device: DeviceSpec,
    flops: int,
    nbytes: int,
    allow_tf32: bool,
    compute_efficiency: float | None = None,
    memory_efficiency: float | None = None,
) -> float:
    """Seconds of ``flops`` and ``nbytes`` at the device's achievable peaks (no launch cost)."""
    compute_eff = device.compute_efficiency if compute_efficiency is None else compute_efficiency
    memory_eff = device.memory_efficiency if memory_efficiency is None else memory_efficiency
    peak = device.peak_flops_per_s(cost.dtype, allow_tf32=allow_tf32)
    return max(
        flops / (peak * compute_eff),
        nbytes / (device.memory_bandwidth_bytes_per_s * memory_eff),
    )


def node_time_s(
    cost: NodeCost,
    device: DeviceSpec,
    *,
    backward: bool = False,
    allow_tf32: bool = False,
    compute_efficiency: float | None = None,
    memory_efficiency: float | None = None,
) -> float:
    """Predicted seconds of one node's forward (or, with ``backward=True``, backward) on ``device``.

    ``compute_efficiency`` and ``memory_efficiency`` override the device's factors when given.
    """
    if cost.is_view:
        return 0.0
    if backward:
        if not cost.requires_grad:
            return 0.0
        flops, nbytes = cost.backward_flops, backward_bytes(cost)
    else:
        flops, nbytes = cost.flops, forward_bytes(cost)
    if flops == 0 and nbytes == 0:
        return 0.0
    efficiency = {"compute_efficiency": compute_efficiency, "memory_efficiency": memory_efficiency}
    return (
        _roofline_s(cost, device, flops, nbytes, allow_tf32, **efficiency) + device.kernel_launch_s
    )


def fixed_bytes(cost: NodeCost, *, backward: bool = False) -> int:
    """The part of the node's forward (or backward) traffic that does not grow with the tokens:
    reading the weights (a lookup reads only its rows: none), and in backward reading them again
    for the input gradient, writing their gradient (a lookup: its whole table) and accumulating it
    (see the module docstring). Never more than the traffic it is part of."""
    if cost.is_view or (backward and not cost.requires_grad):
        return 0
    if not backward:
        return 0 if is_lookup(cost) else min(cost.param_bytes, forward_bytes(cost))
    weight_reads = 0 if is_lookup(cost) else _BACKWARD_BYTES_FACTOR * cost.param_bytes
    gradient = cost.param_bytes + weight_reads if is_lookup(cost) else weight_reads
    return min(gradient + _GRAD_ACCUMULATION_BYTES_FACTOR * cost.param_bytes, backward_bytes(cost))


def fixed_time_s(
    cost: NodeCost,
    device: DeviceSpec,
    *,
    backward: bool = False,
    memory_efficiency: float | None = None,
) -> float:
    """Seconds of the node's forward (or backward) that a micro-batch of any size pays: the
    kernel launch plus :func:`fixed_bytes` at the achievable bandwidth (the roofline's limit as
    the tokens go to zero). 0 for a node without that pass."""
    if node_time_s(cost, device, backward=backward) == 0.0:
        return 0.0
    efficiency = device.memory_efficiency if memory_efficiency is None else memory_efficiency
    nbytes = fixed_bytes(cost, backward=backward)
    return device.kernel_launch_s + nbytes / (device.memory_bandwidth_bytes_per_s * efficiency)


def update_time_s(
    master_bytes: float, device: DeviceSpec, *, states_per_param: int, micro_batches: int
) -> float:
    """Seconds of one device's optimizer step over the ``master_bytes`` of parameters it updates
    (its shard under FSDP, float32 masters under mixed precision) with ``states_per_param``
    optimizer states each, after the pipeline scaled the gradients of ``micro_batches``
    micro-batches (none to scale at one): the bytes it streams at the achievable bandwidth
    (module docstring)."""
    passes = 3 + 2 * states_per_param + (2 if micro_batches > 1 else 0)
    bandwidth = device.memory_bandwidth_bytes_per_s * device.memory_efficiency
    return master_bytes * passes / bandwidth


@dataclass(frozen=True, slots=True)
class ComputeModel:
    """Node times on one device: measured where profiling measured them, predicted elsewhere.

    ``measured_forward_s`` / ``measured_backward_s`` map node names to seconds (from
    ``autopart.cost_models.profiling``); a measurement always wins over the roofline prediction.
    """

    device: DeviceSpec
    measured_forward_s: Mapping[str, float] = field(default_factory=dict)
    measured_backward_s: Mapping[str, float] = field(default_factory=dict)
    measured_backward_weight_s: Mapping[str, float] = field(default_factory=dict)
    """The weight-gradient part of ``measured_backward_s``, where profiling timed it alone."""
    measured_backward_working_bytes: Mapping[str, int] = field(default_factory=dict)
    """The bytes a node's backward holds at once, where profiling measured them
    (``Measurement.backward_working_bytes``)."""
    compute_efficiency: float | None = None
    """Overrides ``device.compute_efficiency`` when set."""
    memory_efficiency: float | None = None
    """Overrides ``device.memory_efficiency`` when set."""
    allow_tf32: bool = False
    """Whether float32 matmuls run on TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``)."""

    def __post_init__(self) -> None:
        for name in ("compute_efficiency", "memory_efficiency"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise AutopartError(
                    f"ComputeModel.{name} must be a fraction in (0, 1], got {value!r}; "
                    "leave it None to use the device's own factor"
                )
        for name in ("measured_forward_s", "measured_backward_s", "measured_backward_weight_s"):
            times = dict(getattr(self, name))
            bad = {n: t for n, t in times.items() if not t >= 0}
            if bad:
                raise AutopartError(
                    f"ComputeModel.{name} has negative or NaN times {bad}; drop these "
                    "measurements (they will be predicted) or measure again"
                )
            # a private read-only copy: the caller's dict may change, this model must not
            object.__setattr__(self, name, MappingProxyType(times))
        working = dict(self.measured_backward_working_bytes)
        if any(not b >= 0 for b in working.values()):
            raise AutopartError(
                "ComputeModel.measured_backward_working_bytes has negative sizes; measure again"
            )
        object.__setattr__(self, "measured_backward_working_bytes", MappingProxyType(working))

    def forward_s(self, node_name: str, cost: NodeCost) -> float:
        """Seconds of ``node_name``'s forward: the measurement if any, else the roofline."""
        if node_name in self.measured_forward_s:
            return self.measured_forward_s[node_name]
        return self._predict(cost, backward=False)

    def backward_s(self, node_name: str, cost: NodeCost) -> float:
        """Seconds of ``node_name``'s backward: the measurement if any, else the roofline."""
        if node_name in self.measured_backward_s:
            return self.measured_backward_s[node_name]
        return self._predict(cost, backward=True)

    def fixed_s(self, node_name: str, cost: NodeCost, *, backward: bool = False) -> float:
        """The part of :meth:`forward_s` (or :meth:`backward_s`) that does not shrink with the
        micro-batch (:func:`fixed_time_s`), never more than that time: for a measured node, the
        model's fixed part (calibrated: ``kernel_launch_s`` and the efficiencies are fitted to
        the measurements) capped at the measurement."""
        whole = self.backward_s(node_name, cost) if backward else self.forward_s(node_name, cost)
        fixed = fixed_time_s(
            cost, self.device, backward=backward, memory_efficiency=self.memory_efficiency
        )
        return min(fixed, whole)

    def backward_working_bytes(self, node_name: str) -> int | None:
        """The bytes ``node_name``'s backward holds at once, where profiling measured them; None
        where the memory model counts them (its output's and inputs' gradients)."""
        return self.measured_backward_working_bytes.get(node_name)

    def backward_weight_s(self, node_name: str, cost: NodeCost) -> float:
        """The part of :meth:`backward_s` that computes parameter gradients (zero-bubble schedules
        run it apart, as ``W``): as profiling timed it alone (never more than the backward), else
        the backward time in the roofline's weight-gradient ratio
        (:func:`backward_weight_fraction`)."""
        if node_name in self.measured_backward_weight_s:
            return min(self.measured_backward_weight_s[node_name], self.backward_s(node_name, cost))
        fraction = backward_weight_fraction(
            cost,
            self.device,
            allow_tf32=self.allow_tf32,
            compute_efficiency=self.compute_efficiency,
            memory_efficiency=self.memory_efficiency,
        )
        return self.backward_s(node_name, cost) * fraction if fraction else 0.0

    def _predict(self, cost: NodeCost, *, backward: bool) -> float:
        return node_time_s(
            cost,
            self.device,
            backward=backward,
            allow_tf32=self.allow_tf32,
            compute_efficiency=self.compute_efficiency,
            memory_efficiency=self.memory_efficiency,
        )
