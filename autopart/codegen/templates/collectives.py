"""Tensor-parallel collectives and shard helpers, on torch alone.

autopart's TP pass (``autopart.passes.tp.shard``) calls these functions from the stage graphs it
rewrites, and ``autopart.emit`` copies this file next to the stages it writes (as
``collectives.py``), so a generated program runs the same code with no autopart installed. It must
therefore import nothing but torch and the standard library.

A tensor split along dimension ``dim`` in ``groups`` interleaved groups (``S(dim,groups=g)``: a
fused QKV weight is 3 groups, each split ``degree`` ways) is seen as ``dim`` of shape
``(groups, degree, m)``; rank ``r`` holds ``[:, r, :]`` flattened.

Collectives are ``torch.autograd.Function``s over torch's functional collectives
(``torch.ops._c10d_functional``) on the ``tp`` process group given by name, with Megatron-LM's
autograd semantics; the table of what each does forward and backward is in the docstring of
``autopart.passes.tp.shard``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "shard",
    "tp_all_gather",
    "tp_all_reduce",
    "tp_copy",
    "tp_partial_bias",
    "tp_reduce_scatter",
    "tp_slice",
    "tp_vocab_embedding",
    "unshard",
]


def shard(full: torch.Tensor, dim: int, groups: int, degree: int, rank: int) -> torch.Tensor:
    """Rank ``rank``'s piece of ``full`` split along ``dim`` in ``groups`` groups (a contiguous
    copy)."""
    return _local_piece(full, dim, groups, degree, rank).contiguous()


def unshard(pieces: Sequence[torch.Tensor], dim: int, groups: int) -> torch.Tensor:
    """The whole tensor from every rank's piece (in rank order); undoes :func:`shard`."""
    return _join_pieces(torch.stack(list(pieces)), dim, groups)


def _local_piece(x: torch.Tensor, dim: int, groups: int, degree: int, rank: int) -> torch.Tensor:
    """``dim`` viewed as ``(groups, degree, m)``: rank ``rank``'s ``(groups, m)``, flattened."""
    return x.unflatten(dim, (groups, degree, -1)).select(dim + 1, rank).flatten(dim, dim + 1)


def _join_pieces(stacked: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """``stacked[r]`` is rank r's piece: the whole tensor, ``dim`` laid out as (groups, ranks, m)."""
    grouped = stacked.unflatten(dim + 1, (groups, -1))  # [d, ..., g, m, ...]
    return grouped.movedim(0, dim + 1).flatten(dim, dim + 2)  # [..., g, d, m, ...] -> [..., g*d*m]


_c10d = torch.ops._c10d_functional


def _all_reduce(x: torch.Tensor, group_name: str) -> torch.Tensor:
    return _c10d.wait_tensor(_c10d.all_reduce(x.contiguous(), "sum", group_name))


def _all_gather(
    x: torch.Tensor, dim: int, groups: int, degree: int, group_name: str
) -> torch.Tensor:
    gathered = _c10d.wait_tensor(_c10d.all_gather_into_tensor(x.contiguous(), degree, group_name))
    return _join_pieces(gathered.view(degree, *x.shape), dim, groups)


def _reduce_scatter(
    x: torch.Tensor, dim: int, groups: int, degree: int, group_name: str
) -> torch.Tensor:
    # rank r's piece first along a new leading dimension, then flattened into dimension 0
    pieces = x.unflatten(dim, (groups, degree, -1)).movedim(dim + 1, 0).flatten(dim + 1, dim + 2)
    local = pieces.shape[1:]
    flat = pieces.reshape(degree * local[0], *local[1:])
    return _c10d.wait_tensor(_c10d.reduce_scatter_tensor(flat, "sum", degree, group_name))


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group_name: str, partial_grad: bool) -> torch.Tensor:
        ctx.group_name, ctx.partial_grad = group_name, partial_grad
        return _all_reduce(x, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return (_all_reduce(grad, ctx.group_name) if ctx.partial_grad else grad), None, None


class _Copy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group_name: str) -> torch.Tensor:
        ctx.group_name = group_name
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        return _all_reduce(grad, ctx.group_name), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        dim: int,
        groups: int,
        degree: int,
        rank: int,
        group_name: str,
        partial_grad: bool,
    ) -> torch.Tensor:
        ctx.args = (dim, groups, degree, rank, group_name, partial_grad)
        return _all_gather(x, dim, groups, degree, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        dim, groups, degree, rank, group_name, partial_grad = ctx.args
        if partial_grad:
            out = _reduce_scatter(grad, dim, groups, degree, group_name)
        else:
            out = _local_piece(grad, dim, groups, degree, rank).contiguous()
        return out, None, None, None, None, None, None


class _Slice(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dim: int, groups: int, degree: int, rank: int, group_name: str
    ) -> torch.Tensor:
        ctx.args = (dim, groups, degree, group_name)
        return _local_piece(x, dim, groups, degree, rank).contiguous()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        dim, groups, degree, group_name = ctx.args
        return _all_gather(grad, dim, groups, degree, group_name), None, None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, dim: int, groups: int, degree: int, group_name: str
    ) -> torch.Tensor:
        ctx.args = (dim, groups, degree, group_name)
        return _reduce_scatter(x, dim, groups, degree, group_name)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        dim, groups, degree, group_name = ctx.args
        return _all_gather(grad, dim, groups, degree, group_name), None, None, None, None


class _PartialBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, bias: torch.Tensor, add: bool) -> torch.Tensor:
        ctx.bias_shape = bias.shape
        return y + bias if add else y.view_as(y)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        # The gradient of a partial sum is the same whole gradient on every rank, so every rank
        # computes the bias's whole gradient although only rank 0 added it.
        bias_grad = grad.sum_to_size(ctx.bias_shape) if ctx.needs_input_grad[1] else None
        return grad, bias_grad, None


def tp_all_reduce(x: torch.Tensor, group_name: str, partial_grad: bool = False) -> torch.Tensor:
    """``P -> R``: the sum over the group; the backward passes the gradient through (all-reduces
    it when ``partial_grad``: the reader's gradient is partial)."""
    return _AllReduce.apply(x, group_name, partial_grad)


def tp_copy(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """Megatron's ``f``: identity; the backward all-reduces the readers' partial gradients."""
    return _Copy.apply(x, group_name)


def tp_all_gather(
    x: torch.Tensor,
    dim: int,
    groups: int,
    degree: int,
    rank: int,
    group_name: str,
    partial_grad: bool = False,
) -> torch.Tensor:
    """``S(dim,groups) -> R``; the backward keeps this rank's slice of the gradient
    (reduce-scatters it when ``partial_grad``)."""
    return _AllGather.apply(x, dim, groups, degree, rank, group_name, partial_grad)


def tp_slice(
    x: torch.Tensor, dim: int, groups: int, degree: int, rank: int, group_name: str
) -> torch.Tensor:
    """``R -> S(dim,groups)``: this rank's slice; the backward all-gathers the gradient."""
    return _Slice.apply(x, dim, groups, degree, rank, group_name)


def tp_reduce_scatter(
    x: torch.Tensor, dim: int, groups: int, degree: int, group_name: str
) -> torch.Tensor:
    """``P -> S(dim,groups)``; the backward all-gathers the gradient."""
    return _ReduceScatter.apply(x, dim, groups, degree, group_name)


def tp_partial_bias(y: torch.Tensor, bias: torch.Tensor, add: bool) -> torch.Tensor:
    """A row-parallel linear's bias: added to the partial sum by one rank (``add``), its whole
    gradient on every rank."""
    return _PartialBias.apply(y, bias, add)


def tp_vocab_embedding(
    weight: torch.Tensor,
    ids: torch.Tensor,
    start: int,
    padding_idx: int = -1,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> torch.Tensor:
    """Vocabulary-parallel ``embedding``: this rank holds rows ``start : start + len(weight)``; ids
    outside the range look up zeros (a partial sum over the ranks)."""
    rows = weight.shape[0]
    local = ids - start
    inside = (local >= 0) & (local < rows)
    pad = padding_idx - start if 0 <= padding_idx - start < rows else -1
    looked = torch.ops.aten.embedding.default(
        weight, local.clamp(0, rows - 1), pad, scale_grad_by_freq, sparse
    )
    return looked * inside.unsqueeze(-1).to(looked.dtype)
