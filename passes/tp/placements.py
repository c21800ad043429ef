"""Placements of a tensor on the ranks of a TP group, and strategies of a node.

Placements (per tensor, over the ``d`` ranks of the TP group), as in DTensor:

- ``R``: every rank holds the whole tensor (replicate);
- ``S(k)``: dimension ``k`` is split into ``d`` contiguous pieces, rank ``r`` holds piece ``r``;
  ``S(k,groups=g)`` first views dimension ``k`` as ``(g, size / g)`` and splits the inner part (the
  layout of a fused QKV projection whose output is later cut into q, k and v: every rank holds its
  share of each of the three, so ``split`` gives it its heads of each);
- ``P``: every rank holds a partial sum; the tensor is the sum over ranks.

A :class:`Strategy` of a node says which placement each input must have, which placement the
output gets, which placement the *gradient* of each input has (``P`` where the backward produces
partial sums, e.g. the input of a column-parallel linear: Megatron's ``f`` operator), and whether
the work is split ``d`` ways. The rules that offer them are in :mod:`autopart.passes.tp.rules`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx import Node

__all__ = ["NodeStrategies", "P", "Placement", "R", "Strategy", "dual", "replicated", "shard"]


@dataclass(frozen=True, slots=True, order=True)
class Placement:
    """How one tensor lies on the TP ranks: ``R``, ``P`` or ``S(dim, groups)`` (module docstring)."""

    kind: str
    """``"R"``, ``"S"`` or ``"P"``."""
    dim: int = 0
    """The split dimension (non-negative), for ``S``."""
    groups: int = 1
    """For ``S``: the dimension is viewed as ``(groups, size / groups)`` and the inner part split."""

    def __post_init__(self) -> None:
        if self.kind not in ("R", "S", "P"):
            raise ValueError(f"Placement.kind must be 'R', 'S' or 'P', got {self.kind!r}")
        if self.kind != "S" and (self.dim != 0 or self.groups != 1):
            raise ValueError(f"Placement {self.kind} takes no dim or groups")
        if self.dim < 0 or self.groups < 1:
            raise ValueError(
                f"Placement S needs dim >= 0 and groups >= 1, got {self.dim}, {self.groups}"
            )

    @property
    def is_shard(self) -> bool:
        return self.kind == "S"

    def __str__(self) -> str:
        if self.kind != "S":
            return self.kind
        return f"S({self.dim})" if self.groups == 1 else f"S({self.dim},groups={self.groups})"

    @staticmethod
    def parse(text: str) -> Placement:
        """The placement printed as ``text`` (``"R"``, ``"P"``, ``"S(2)"``, ``"S(2,groups=3)"``)."""
        text = text.strip()
        if text in ("R", "P"):
            return Placement(text)
        if text.startswith("S(") and text.endswith(")"):
            dim, _, groups = text[2:-1].partition(",groups=")
            try:
                return Placement("S", int(dim), int(groups) if groups else 1)
            except ValueError:
                pass
        raise ValueError(f"not a placement: {text!r}; write R, P, S(k) or S(k,groups=g)")


R = Placement("R")
P = Placement("P")


def shard(dim: int, groups: int = 1) -> Placement:
    """``S(dim)`` (or ``S(dim,groups=g)``)."""
    return Placement("S", dim, groups)


def dual(p: Placement) -> Placement:
    """The placement of the gradient of a tensor placed ``p``: the gradient of a sum of partials is
    the same for every term, so ``P`` has replicated gradients."""
    return R if p.kind == "P" else p


@dataclass(frozen=True, slots=True)
class Strategy:
    """One way to run a node on the TP ranks."""

    label: str
    """``"replicate"``, ``"col"``, ``"row"`` (weight matmuls and embeddings), ``"shard"`` or
    ``"partial"`` (everything else)."""
    output: Placement
    inputs: tuple[Placement, ...]
    """Required placement of each input, in ``node.all_input_nodes`` order."""
    grads: tuple[Placement, ...]
    """Placement of the gradient this node's backward gives each input (``P``: partial sums)."""
    sharded: bool
    """Whether each rank does ``1 / degree`` of the node's work."""

    def __post_init__(self) -> None:
        if len(self.inputs) != len(self.grads):
            raise ValueError("Strategy.grads needs one placement per input")


@dataclass(frozen=True, slots=True)
class NodeStrategies:
    """The strategies of one node; ``strategies[0]`` is always the replicated one."""

    strategies: tuple[Strategy, ...]
    reasons: tuple[str, ...] = ()
    """Why sharded strategies were not offered: a size the TP degree does not divide."""


def replicated(node: Node) -> Strategy:
    n = len(node.all_input_nodes)
    return Strategy("replicate", R, (R,) * n, (R,) * n, sharded=False)
