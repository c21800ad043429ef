"""What one TP rank holds and runs: the local shape and the shard of a tensor under a placement,
and the call a rank makes for a node (:func:`local_call`), which the TP pass
(:func:`~autopart.passes.tp.shard.shard_tp`) writes into the stage and the rule tests run
directly."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import Node

from autopart.codegen.templates.collectives import shard, tp_vocab_embedding, unshard
from autopart.errors import ShardError
from autopart.passes.tp.placements import Placement
from autopart.passes.tp.rules import node_arg, op_name

__all__ = [
    "LocalCall",
    "bias_of_row_linear",
    "local_call",
    "local_shape",
    "shard_tensor",
    "unshard_tensor",
]


# ---------------------------------------------------------------------------------------------
# tensors and placements


def local_shape(shape: Sequence[int], placement: Placement | str, degree: int) -> list[int]:
    """The shape one rank holds of a tensor of global ``shape`` placed ``placement``."""
    p = Placement.parse(placement) if isinstance(placement, str) else placement
    out = list(shape)
    if p.is_shard:
        out[p.dim] //= degree
    return out


def shard_tensor(
    full: torch.Tensor, placement: Placement | str, rank: int, degree: int
) -> torch.Tensor:
    """Rank ``rank``'s piece of ``full`` under ``placement`` (a contiguous copy; ``R`` and ``P``:
    ``full`` itself)."""
    p = Placement.parse(placement) if isinstance(placement, str) else placement
    if not p.is_shard:
        return full
    return shard(full, p.dim, p.groups, degree, rank)


def unshard_tensor(pieces: Sequence[torch.Tensor], placement: Placement | str) -> torch.Tensor:
    """The whole tensor from every rank's piece (in rank order); undoes ``groups`` interleaving."""
    p = Placement.parse(placement) if isinstance(placement, str) else placement
    if p.kind == "P":
        return torch.stack(list(pieces)).sum(0)
    if p.kind == "R":
        return pieces[0]
    return unshard(pieces, p.dim, p.groups)


# ---------------------------------------------------------------------------------------------
# the call of one rank


@dataclass(frozen=True, slots=True)
class LocalCall:
    """What one TP rank runs for a node: ``target(*args, **kwargs)`` (a ``call.op`` node), then,
    for a row-parallel linear / addmm (``row_bias = (bias, add)``),
    ``tp_partial_bias(product, bias, add)``."""

    op: str
    target: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    row_bias: tuple[Any, bool] | None = None


def local_call(
    node: Node,
    args: Any,
    kwargs: dict[str, Any],
    out_p: Placement,
    read_as: Callable[[Any], Placement | None],
    degree: int,
    rank: int,
) -> LocalCall:
    """The call rank ``rank`` makes for ``node`` whose output is placed ``out_p``: ``args`` /
    ``kwargs`` are the node's arguments with its inputs already replaced by this rank's values (fx
    nodes of the rewritten graph, or tensors), ``read_as(u)`` the placement the plan reads input
    ``u`` (an fx node of the original graph) in. Shape arguments become local sizes (``view`` /
    ``reshape`` / ``expand`` / ``unflatten`` / ``split`` / ``narrow`` / ``repeat_interleave``),
    a vocabulary-parallel embedding becomes :func:`tp_vocab_embedding` of this rank's rows and a
    row-parallel linear adds its bias on rank 0 only. Pure: :func:`shard_tp` and the rule tests
    both call it."""
    op = op_name(node)
    val: Any = node.meta.get("val")
    kwargs = dict(kwargs)
    if op in ("view", "reshape", "_unsafe_view", "expand") and out_p.is_shard:
        args = (args[0], local_shape(val.shape, out_p, degree), *args[2:])
    elif op == "unflatten" and out_p.is_shard:
        dim = args[1] % (val.ndim - len(args[2]) + 1)  # a negative dim counts in the input
        sizes = local_shape(val.shape, out_p, degree)[dim : dim + len(args[2])]
        args = (args[0], args[1], sizes, *args[3:])
    elif op in ("split", "split_with_sizes", "narrow"):
        args = _local_split(node, args, read_as(node.args[0]), degree)
    elif op == "repeat_interleave" and kwargs.get("output_size") is not None and out_p.is_shard:
        dim = node_arg(node, 2, "dim") % val.ndim
        kwargs["output_size"] = local_shape(val.shape, out_p, degree)[dim]
    elif op == "embedding" and read_as(node.args[0]) == Placement("S", 0):
        return _vocab_embedding(node, args, kwargs, degree, rank)
    if out_p.kind == "P" and op in ("linear", "addmm") and bias_of_row_linear(node) is not None:
        return _row_linear(node, args, kwargs, rank)
    return LocalCall(node.op, node.target, tuple(args), kwargs)


def _local_split(node: Node, args: Any, p: Placement | None, degree: int) -> Any:
    """``split`` sizes / ``narrow`` length along the split dimension of the input: local."""
    src = node.args[0]
    sv = src.meta.get("val") if isinstance(src, Node) else None
    if p is None or not p.is_shard or not isinstance(sv, torch.Tensor):
        return args
    dim_slot, size_slot = (1, 3) if op_name(node) == "narrow" else (2, 1)
    if node_arg(node, dim_slot, "dim", 0) % sv.ndim != p.dim:
        return args
    size = args[size_slot]
    d = degree
    local = [s // d for s in size] if isinstance(size, (list, tuple)) else size // d
    return (*args[:size_slot], local, *args[size_slot + 1 :])


def _vocab_embedding(
    node: Node, args: Any, kwargs: dict[str, Any], degree: int, rank: int
) -> LocalCall:
    """``embedding(W, ids, padding_idx, scale_grad_by_freq, sparse)`` with ``W`` split on the
    vocabulary: this rank's rows, the others' ids looking up zeros."""
    options = [
        args[i] if len(args) > i else kwargs.get(name, default)
        for i, (name, default) in enumerate(
            [("padding_idx", -1), ("scale_grad_by_freq", False), ("sparse", False)], start=2
        )
    ]
    if options[1]:
        raise ShardError(
            f"embedding {node.name!r} scales gradients by frequency, which a vocabulary-parallel "
            "lookup cannot do; plan it replicated or column-parallel."
        )
    weight: Any = node.args[0]
    rows = weight.meta["val"].shape[0] // degree
    return LocalCall(
        "call_function", tp_vocab_embedding, (args[0], args[1], rank * rows, *options), {}
    )


def _row_linear(node: Node, args: Any, kwargs: dict[str, Any], rank: int) -> LocalCall:
    """``linear(x, W, b)`` / ``addmm(b, x, W)`` with a partial output: the product, then the bias
    on rank 0 only."""
    if op_name(node) == "linear":
        x, w, b = args[0], args[1], args[2] if len(args) > 2 else kwargs["bias"]
        return LocalCall("call_function", torch.ops.aten.linear.default, (x, w), {}, (b, rank == 0))
    b, x, w = args[0], args[1], args[2]
    return LocalCall("call_function", torch.ops.aten.mm.default, (x, w), {}, (b, rank == 0))


def bias_of_row_linear(node: Node) -> Node | None:
    """The bias node a ``linear`` / ``addmm`` adds (``None``: no bias, or another op)."""
    op = op_name(node)
    if op == "linear":
        bias = node_arg(node, 2, "bias")
    elif op == "addmm":
        bias = node.args[0]
    else:
        return None
    return bias if isinstance(bias, Node) else None
