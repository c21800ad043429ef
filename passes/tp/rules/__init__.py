"""The sharding rules, one module per family of ops (as DTensor's
``torch/distributed/tensor/_ops/``), assembled here into one table, :data:`RULES`, from aten op
name to rule. A rule takes a :class:`~autopart.passes.tp.rules._common.RuleContext` (the node, the
TP degree, the candidate placements of its inputs) and returns the sharded strategies it proves,
recording why a split was refused when the degree does not divide a size; :func:`node_strategies`
adds the replicated strategy, which every node has. An op with no rule runs replicated. Each family
module ends with its own ``RULES`` dict; a new family is one more argument of :func:`_assemble`,
which refuses an op registered twice.

- :mod:`._matrix_ops`: linear / addmm (HF ``Conv1D``, weight stored transposed) / mm / matmul with a
  weight: ``col`` (weight split on its output features, input ``R``, output ``S(last)``, its bias
  split alike), ``row`` (weight split on its input features, input ``S(last)``, output ``P``, the
  bias added by one rank only); a column split may use groups when the output is cut into equal
  parts later (fused QKV). Embedding: ``row`` (vocabulary-parallel: each rank looks up its
  vocabulary range, output ``P``), ``col`` (the embedding dimension split, output ``S(last)``).
  mm / matmul / bmm of two activations: ``col`` / ``row`` as above, or a batch dimension (the heads
  of a hand-written attention) split in both operands. Grouped expert matmuls (``x[S, K]`` times
  stacked ``W[E, K, N]``): ``col`` / ``row`` per expert, never the rows.
  scaled_dot_product_attention: split on the
  heads (dimension 1), which needs the degree to divide the query and the key/value heads (GQA).
- :mod:`._pointwise_ops`: the output takes a split of an input (broadcast inputs stay ``R`` and get
  partial gradients); ``P`` passes through the linear ones (add/sub of partials, mul/div by a
  replicated factor, neg, casts, copies).
- :mod:`._view_ops`: view / reshape / flatten / unflatten / squeeze / unsqueeze: a split moves with
  its dimension when sizes divide (hidden -> (heads, head_dim) keeps the split on the heads only if
  the degree divides the heads); transpose / permute / expand / repeat_interleave / roll / slice /
  narrow / select / split / chunk move or keep it; ``P`` passes through all of them.
- :mod:`._tensor_ops`: getitem of a split / chunk, cat, index_add (an MoE layer's scatter-back).
- :mod:`._math_ops`: reductions, softmax, layer_norm, rms_norm: any split outside the reduced /
  normalised dimensions (a norm's weight and bias then get partial gradients); ``sum`` / ``mean``
  keep ``P``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.fx import Node

from autopart.passes.tp.placements import NodeStrategies, Placement, R, Strategy, replicated
from autopart.passes.tp.rules import (
    _math_ops,
    _matrix_ops,
    _pointwise_ops,
    _tensor_ops,
    _view_ops,
)
from autopart.passes.tp.rules._common import (
    Rule,
    RuleContext,
    node_arg,
    node_args,
    op_name,
    tensor_val,
)
from autopart.passes.tp.rules._matrix_ops import GROUPED_MATMULS, fused_groups
from autopart.passes.tp.rules._pointwise_ops import POINTWISE

__all__ = [
    "GROUPED_MATMULS",
    "POINTWISE",
    "RULES",
    "Rule",
    "RuleContext",
    "cache_key",
    "fused_groups",
    "node_arg",
    "node_args",
    "node_strategies",
    "op_name",
]


def _assemble(*families: Mapping[str, Rule]) -> dict[str, Rule]:
    table: dict[str, Rule] = {}
    for family in families:
        for op, rule in family.items():
            assert op not in table, f"two sharding rules for {op!r}"
            table[op] = rule
    return table


RULES: Mapping[str, Rule] = _assemble(
    _matrix_ops.RULES,
    _pointwise_ops.RULES,
    _view_ops.RULES,
    _tensor_ops.RULES,
    _math_ops.RULES,
)
"""Every aten op name with a sharding rule (everything else runs replicated), to its rule."""


def node_strategies(
    node: Node, degree: int, cands: Mapping[Node, list[Placement]]
) -> NodeStrategies:
    """The strategies of ``node`` on ``degree`` ranks, the replicated one first, when its inputs
    may be placed as ``cands`` says (an input not in ``cands``: ``R`` only)."""
    if node.op == "output":
        n = len(node.all_input_nodes)
        return NodeStrategies((Strategy("replicate", R, (R,) * n, (R,) * n, sharded=False),))
    base = replicated(node)
    if degree == 1 or node.op != "call_function":
        return NodeStrategies((base,))
    ctx = RuleContext(node, degree, cands)
    rule = RULES.get(op_name(node))
    found = rule(ctx) if rule is not None else []
    strategies = [base] + [s for s in dict.fromkeys(found) if s != base]
    return NodeStrategies(tuple(strategies), tuple(dict.fromkeys(ctx.reasons)))


def cache_key(node: Node, cands: Mapping[Node, list[Placement]]) -> Any:
    """What a node's strategies depend on: its op, its non-tensor arguments, its output's shape,
    and each input's position, shape, candidate placements and op (``None``: do not cache)."""
    if node.op != "call_function":
        return None
    inputs = node.all_input_nodes

    def spec(a: Any) -> Any:
        if isinstance(a, Node):
            return (
                "node",
                inputs.index(a),
                _val_spec(a.meta.get("val")),
                tuple(cands[a]),
                op_name(a),
            )
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(spec(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, spec(v)) for k, v in a.items()))
        return ("value", repr(a))

    out = tensor_val(node)
    fused = None
    if op_name(node) in ("linear", "addmm") and out is not None and out.ndim:
        fused = tuple(fused_groups(node, out.shape[-1]))
    return (
        node.target,
        spec(node_args(node)),
        spec(node.kwargs),
        _val_spec(node.meta.get("val")),
        fused,
    )


def _val_spec(val: Any) -> Any:
    if isinstance(val, torch.Tensor):
        return (tuple(val.shape), val.dtype)
    if isinstance(val, (list, tuple)):
        return tuple(_val_spec(v) for v in val)
    return repr(val)
