"""Memory of a set of nodes (a pipeline stage, a grouped block): parameters, gradients, optimizer
state, buffers and the activations kept for backward. All sizes are integer bytes.

- Parameters are counted once per name, so a tied weight used by two nodes is counted once.
- Gradients: one per trainable parameter, in the parameter's dtype (what autograd allocates).
- Optimizer state: ``Optimizer.states_per_param`` tensors shaped like each trainable parameter, in
  its dtype. With ``mixed_precision=True`` the states are fp32 and an fp32 master copy is kept for
  every 16-bit parameter. That is the accounting of Rajbhandari et al., "ZeRO: Memory optimizations
  toward training trillion parameter models", SC 2020, section 3.1: mixed-precision Adam holds
  2 + 2 bytes of fp16 parameter and gradient plus 12 bytes of fp32 parameter, momentum and
  variance, **16 bytes per parameter**.
- Activations for one micro-batch: the outputs of the nodes named in ``NodeCost.saved_from``, each
  once however many consumers save it, plus every node's ``private_saved_bytes``; times the
  micro-batches the schedule keeps in flight (1F1B keeps up to ``p - s`` on stage ``s``, GPipe all
  ``m``). The annotation pass already resolves views to the tensor they alias and leaves parameters
  out of ``saved_from``, so deduplicating by name counts each storage once.
- Sharded data parallelism (``fsdp`` ranks, torch's FSDP2, one unit per pipeline stage):
  each rank keeps ``1 / fsdp`` of the parameters, gradients and optimizer state, and during a
  step the stage's whole parameters (all-gathered for its forward, kept by torch's pipelining
  until the step's gradient reduction: ``set_reshard_after_backward(False)``) and its whole
  gradients (accumulated unsharded over the micro-batches, reduce-scattered once at the end:
  ``set_requires_gradient_sync(False)``). Both are counted over the whole step, an upper bound
  (:func:`state_bytes_per_param_byte`).
- Buffers: the sum of ``NodeCost.buffer_bytes``; a buffer read by several nodes is counted for each,
  so this is an upper bound.

Nodes are given as fx ``Node`` objects carrying ``node.meta["autopart"]``, as a mapping from node
name to ``NodeCost`` (what the solver holds for a grouped block), or as bare ``NodeCost`` values.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

from torch.fx import Graph, GraphModule, Node

from autopart._compat import StrEnum
from autopart.cost_models.node_cost import NodeCost
from autopart.errors import AutopartError

__all__ = [
    "MIXED_UNSHARDED_BYTES_PER_PARAM_BYTE",
    "UNSHARDED_BYTES_PER_PARAM_BYTE",
    "MemoryBreakdown",
    "NodeSet",
    "Optimizer",
    "ParamSize",
    "activation_bytes",
    "as_optimizer",
    "memory_of",
    "node_costs",
    "param_table",
    "state_bytes_per_param_byte",
    "unsharded_bytes_per_param_byte",
]

ParamSize: TypeAlias = int | tuple[int, int, str]
"""A parameter's size: its bytes, or ``(numel, nbytes, dtype)`` as in ``gm.meta["autopart_params"]``."""

NodeSet: TypeAlias = Mapping[str, NodeCost] | Iterable[Node] | Iterable[NodeCost]
"""Nodes to account: fx nodes, costs by node name, or bare costs."""

_FP32_BYTES = 4
_HALF_BYTES = 2
"""Assumed parameter itemsize under mixed precision when only byte counts are known."""


class Optimizer(StrEnum):
    """The optimizer whose state is counted (``--optimizer`` on the command line)."""

    SGD = "sgd"
    SGD_MOMENTUM = "sgd_momentum"
    ADAM = "adam"
    ADAMW = "adamw"

    @property
    def states_per_param(self) -> int:
        """Tensors the optimizer keeps per parameter: momentum (SGD), exp_avg and exp_avg_sq (Adam)."""
        return _STATES_PER_PARAM[self]

    @property
    def state_bytes_per_param_byte(self) -> int:
        """Training state per byte of parameter, in the parameter's dtype: the parameter, its
        gradient and the optimizer's states. The planner's one factor from parameter bytes to the
        memory they pin (the stage ILP, the memory bounds, the simulator, the TP ILP)."""
        return 2 + self.states_per_param


UNSHARDED_BYTES_PER_PARAM_BYTE = 2
"""What an FSDP rank holds whole during a step, per parameter byte: the unsharded parameter and
its unsharded accumulated gradient (module docstring)."""

MIXED_UNSHARDED_BYTES_PER_PARAM_BYTE = 4
"""The same under bf16 mixed precision, per bfloat16 parameter byte: the bfloat16 parameter and
gradient, and the float32 gradient the micro-batches accumulate into (2 bytes per byte)."""


def unsharded_bytes_per_param_byte(*, mixed_precision: bool = False) -> int:
    """What an FSDP rank holds whole during a step per parameter byte (:data:`UNSHARDED_BYTES_
    PER_PARAM_BYTE`, :data:`MIXED_UNSHARDED_BYTES_PER_PARAM_BYTE` under mixed precision)."""
    if mixed_precision:
        return MIXED_UNSHARDED_BYTES_PER_PARAM_BYTE
    return UNSHARDED_BYTES_PER_PARAM_BYTE


def state_bytes_per_param_byte(
    optimizer: Optimizer | str, *, fsdp: int = 1, mixed_precision: bool = False
) -> float:
    """Training state one device holds per parameter byte of its stages: the optimizer's
    :attr:`~Optimizer.state_bytes_per_param_byte`, divided by ``fsdp`` where FSDP shards it over
    ``fsdp`` ranks, plus the unsharded parameter and gradient a step holds
    (:data:`UNSHARDED_BYTES_PER_PARAM_BYTE`). Sharding saves memory only where the optimizer's
    state outweighs that: Adam (4 bytes per byte) from ``fsdp=3``, plain SGD never.

    ``mixed_precision`` (:class:`autopart.precision.Precision` ``bf16-mixed``): the parameter bytes
    are bfloat16 ones and FSDP2 runs on every mesh (``fsdp=1``: nothing sharded), holding the
    float32 master, gradient and optimizer state (twice the bytes, sharded) and
    :data:`MIXED_UNSHARDED_BYTES_PER_PARAM_BYTE` whole."""
    if not isinstance(fsdp, int) or fsdp < 1:
        raise AutopartError(f"fsdp must be a whole number >= 1, got {fsdp!r}")
    full = as_optimizer(optimizer).state_bytes_per_param_byte
    if mixed_precision:
        whole = unsharded_bytes_per_param_byte(mixed_precision=True)
        return _FP32_BYTES / _HALF_BYTES * full / fsdp + whole
    return float(full) if fsdp == 1 else full / fsdp + unsharded_bytes_per_param_byte()


_STATES_PER_PARAM = {
    Optimizer.SGD: 0,
    Optimizer.SGD_MOMENTUM: 1,
    Optimizer.ADAM: 2,
    Optimizer.ADAMW: 2,
}


@dataclass(frozen=True, slots=True)
class MemoryBreakdown:
    """Bytes one device holds for a set of nodes during training."""

    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    """Optimizer states, plus fp32 master weights under mixed precision."""
    activation_bytes: int
    """Saved for backward, for all micro-batches in flight."""
    buffer_bytes: int = 0

    def __post_init__(self) -> None:
        for name in self.__slots__:
            if getattr(self, name) < 0:
                raise AutopartError(f"MemoryBreakdown.{name} cannot be negative")

    @property
    def total_bytes(self) -> int:
        return (
            self.param_bytes
            + self.grad_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + self.buffer_bytes
        )


def node_costs(nodes: Iterable[Node]) -> dict[str, NodeCost]:
    """``{node.name: node.meta["autopart"]}`` in the given order."""
    return {n.name: _cost_of(n) for n in nodes}


def param_table(gm: GraphModule) -> dict[str, tuple[int, int, str]]:
    """The parameter sizes the annotation pass recorded: ``{name: (numel, nbytes, dtype)}``."""
    table = gm.meta.get("autopart_params")
    if table is None:
        raise AutopartError(
            "the graph has no parameter table (gm.meta['autopart_params']); run "
            "autopart.passes.annotate.annotate(gm) before asking for memory"
        )
    return {name: (int(v[0]), int(v[1]), str(v[2])) for name, v in table.items()}


def activation_bytes(
    nodes: NodeSet,
    *,
    micro_batches_in_flight: int = 1,
    costs_by_name: Mapping[str, NodeCost] | None = None,
) -> int:
    """Bytes kept for backward by ``nodes``, for ``micro_batches_in_flight`` micro-batches.

    A saved tensor produced outside ``nodes`` (a stage's input) is looked up in ``costs_by_name``,
    then among the given nodes, then, for fx nodes, in their graph.
    """
    _check_in_flight(micro_batches_in_flight)
    return _activation_bytes(_Group.of(nodes), costs_by_name) * micro_batches_in_flight


def memory_of(
    nodes: NodeSet,
    param_bytes_by_name: Mapping[str, ParamSize] | None = None,
    *,
    optimizer: Optimizer | str = Optimizer.ADAMW,
    mixed_precision: bool = False,
    micro_batches_in_flight: int = 1,
    frozen_params: Collection[str] = (),
    costs_by_name: Mapping[str, NodeCost] | None = None,
) -> MemoryBreakdown:
    """Training memory of ``nodes`` on one device.

    ``param_bytes_by_name`` sizes the parameters the nodes name (bytes, or ``(numel, nbytes,
    dtype)``); for fx nodes it defaults to their graph module's ``gm.meta["autopart_params"]``.
    Parameters in ``frozen_params`` get no gradient and no optimizer state. With plain byte counts,
    ``mixed_precision`` assumes 16-bit parameters.
    """
    opt = as_optimizer(optimizer)
    _check_in_flight(micro_batches_in_flight)
    group = _Group.of(nodes)
    table = param_bytes_by_name if param_bytes_by_name is not None else group.param_table()
    params: dict[str, tuple[int, int]] = {}
    for consumer, cost in group.costs:
        for name in cost.params:
            if name not in params:
                params[name] = _numel_and_bytes(name, consumer, table)
    param_bytes = grad_bytes = optimizer_bytes = 0
    for name, (numel, nbytes) in params.items():
        param_bytes += nbytes
        if name in frozen_params:
            continue
        grad_bytes += nbytes
        if mixed_precision:
            master = _FP32_BYTES * numel if nbytes < _FP32_BYTES * numel else 0
            optimizer_bytes += master + opt.states_per_param * _FP32_BYTES * numel
        else:
            optimizer_bytes += opt.states_per_param * nbytes
    return MemoryBreakdown(
        param_bytes=param_bytes,
        grad_bytes=grad_bytes,
        optimizer_bytes=optimizer_bytes,
        activation_bytes=_activation_bytes(group, costs_by_name) * micro_batches_in_flight,
        buffer_bytes=sum(c.buffer_bytes for _, c in group.costs),
    )


@dataclass(frozen=True, slots=True)
class _Group:
    """The given nodes, normalized: (name or None, cost) pairs and the fx graphs they live in."""

    costs: list[tuple[str | None, NodeCost]]
    graphs: list[Graph]

    @staticmethod
    def of(nodes: NodeSet) -> _Group:
        if isinstance(nodes, Mapping):
            return _Group(list(nodes.items()), [])
        costs: list[tuple[str | None, NodeCost]] = []
        graphs: dict[int, Graph] = {}
        for item in nodes:
            if isinstance(item, Node):
                costs.append((item.name, _cost_of(item)))
                graphs.setdefault(id(item.graph), item.graph)
            elif isinstance(item, NodeCost):
                costs.append((None, item))
            else:
                raise AutopartError(
                    f"cannot account for {type(item).__name__} {item!r}: pass torch.fx Nodes, "
                    "NodeCost values, or a mapping from node name to NodeCost"
                )
        return _Group(costs, list(graphs.values()))

    def param_table(self) -> Mapping[str, ParamSize]:
        for graph in self.graphs:
            module = graph.owning_module
            if isinstance(module, GraphModule) and "autopart_params" in module.meta:
                return param_table(module)
        return {}

    def output_bytes_lookup(
        self, costs_by_name: Mapping[str, NodeCost] | None
    ) -> Callable[[str, str | None], int]:
        own = {name: c for name, c in self.costs if name is not None}
        graph_index: dict[str, Node] = {}

        def output_bytes(name: str, consumer: str | None) -> int:
            if costs_by_name is not None and name in costs_by_name:
                return costs_by_name[name].output_bytes
            if name in own:
                return own[name].output_bytes
            if not graph_index:
                graph_index.update((n.name, n) for g in self.graphs for n in g.nodes)
            if name in graph_index:
                return _cost_of(graph_index[name]).output_bytes
            by = f"node {consumer!r}" if consumer is not None else "a node"
            raise AutopartError(
                f"{by} saves the output of {name!r} for backward, but {name!r} has no known cost: "
                "pass costs_by_name= with the cost of every node of the graph "
                "(e.g. node_costs(gm.graph.nodes))"
            )

        return output_bytes


def _activation_bytes(group: _Group, costs_by_name: Mapping[str, NodeCost] | None) -> int:
    """Saved bytes of one micro-batch: each saved output once, plus the private saves."""
    output_bytes = group.output_bytes_lookup(costs_by_name)
    saved: dict[str, int] = {}
    for consumer, cost in group.costs:
        for name in cost.saved_from:
            if name not in saved:
                saved[name] = output_bytes(name, consumer)
    return sum(saved.values()) + sum(c.private_saved_bytes for _, c in group.costs)


def _check_in_flight(micro_batches_in_flight: int) -> None:
    if micro_batches_in_flight < 0:
        raise AutopartError(
            f"micro_batches_in_flight must be >= 0, got {micro_batches_in_flight}; pass how many "
            "micro-batches' activations the schedule keeps alive at once"
        )


def _cost_of(node: Node) -> NodeCost:
    cost = node.meta.get("autopart")
    if not isinstance(cost, NodeCost):
        raise AutopartError(
            f"node {node.name!r} has no cost (node.meta['autopart']); run "
            "autopart.passes.annotate.annotate(gm) on the graph first"
        )
    return cost


def _numel_and_bytes(
    name: str, consumer: str | None, table: Mapping[str, ParamSize]
) -> tuple[int, int]:
    if name not in table:
        by = f"node {consumer!r}" if consumer is not None else "a node"
        raise AutopartError(
            f"parameter {name!r} (used by {by}) has no size: pass param_bytes_by_name covering "
            "model.named_parameters(), e.g. param_table(gm) after the annotation pass"
        )
    size = table[name]
    if isinstance(size, int):
        return size // _HALF_BYTES, size  # numel matters only under mixed precision: 16-bit
    return int(size[0]), int(size[1])


def as_optimizer(value: Optimizer | str) -> Optimizer:
    """An :class:`Optimizer` from its name (case and ``-``/``_`` insensitive), with a clear error."""
    if isinstance(value, Optimizer):
        return value
    try:
        return Optimizer(value.strip().lower().replace("-", "_"))
    except ValueError:
        choices = ", ".join(o.value for o in Optimizer)
        raise AutopartError(f"unknown optimizer {value!r}: choose one of {choices}") from None
