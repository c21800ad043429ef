"""A numerical self-check of tensor parallelism: ``autopart.compile(..., verify=True)``.

Every placement rule is property-tested, but a model can combine ops in ways no test drew. So before
training, each rank runs each of its tensor-parallel stages once on the first micro-batch of the
example batch and compares it with the unsharded stage, which every rank still holds:

1. the stage's outputs, the gradients of its inputs and of every parameter (random output
   gradients, the same on every rank), each gathered over the ``tp`` group to the whole tensor;
2. only if one of them differs, the forward node by node: the first node whose gathered value
   differs from the unsharded model's is named in the error.

Cost, once per :func:`autopart.compile`: one forward of the unsharded model on one micro-batch (the
stages' real inputs), one forward and backward of each local stage sharded and unsharded, and one
collective per stage output, input gradient and parameter. The node-by-node walk (one collective
per node) runs only when something differs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeGuard

import torch
import torch.distributed as dist
from torch.fx import GraphModule, Interpreter, Node

from autopart.errors import AutopartError
from autopart.passes.mutations import mutation_groups
from autopart.passes.split_stages import stage_info
from autopart.passes.tp.local import shard_tensor, unshard_tensor
from autopart.passes.tp.placements import Placement, dual
from autopart.passes.tp.shard import TP_META_KEY
from autopart.runtime.stage_io import buffers_kept

__all__ = [
    "HALF_RELATIVE_TOLERANCE",
    "RELATIVE_TOLERANCE",
    "TPVerificationError",
    "draws_random_numbers",
    "record_values",
    "verify_tp_stage",
]

RELATIVE_TOLERANCE = 1e-4
"""Largest difference accepted, relative to the largest magnitude of the unsharded tensor: float32
sums in another order differ by ~1e-6; a misplaced shard differs by O(1)."""

HALF_RELATIVE_TOLERANCE = 2**-4
"""The same for a stage that computes in bfloat16 (bf16-mixed precision): each TP rank rounds its
partial sum to 8 bits of mantissa before the all-reduce, a few units of 2**-8 of the magnitude
once a stage's ops have compounded them (in its float32 values too: an RMSNorm's upcast); a
misplaced shard still differs by O(1)."""


class TPVerificationError(AutopartError):
    """A tensor-parallel stage computes something else than the unsharded stage."""

    def __init__(self, message: str, *, stage: int, node: str) -> None:
        super().__init__(message)
        self.stage = stage
        self.node = node
        """The first node (or parameter / input, for a gradient) that differs."""


def record_values(gm: GraphModule, flat_inputs: Sequence[Any]) -> dict[str, Any]:
    """Every node's value when ``gm`` runs on ``flat_inputs``, by node name (no gradients).
    Buffers written in place (BatchNorm's running statistics, which the stages share with ``gm``)
    are put back afterwards."""
    values: dict[str, Any] = {}
    # values that a later in-place op overwrites are kept as they were when computed
    overwritten = {n for group in mutation_groups(gm) for n in group}

    class _Recorder(Interpreter):
        def run_node(self, n: Node) -> Any:
            values[n.name] = result = super().run_node(n)
            if n in overwritten and isinstance(result, torch.Tensor):
                values[n.name] = result.clone()
            return result

    with torch.no_grad(), buffers_kept(gm):
        _Recorder(gm).run(*flat_inputs)
    return values


def verify_tp_stage(
    full: GraphModule,
    sharded: GraphModule,
    values: Mapping[str, Any],
    group: dist.ProcessGroup,
    device: torch.device,
    *,
    tolerance: float = RELATIVE_TOLERANCE,
) -> None:
    """Check ``sharded`` (this rank's TP rewrite of ``full``) against ``full`` on the inputs that
    ``values`` (:func:`record_values` of the whole model) holds; raise :class:`TPVerificationError`
    naming the first node that differs by more than ``tolerance`` of the largest magnitude
    (module docstring; :data:`HALF_RELATIVE_TOLERANCE` for a stage computing in bfloat16)."""
    check = _Check(full, sharded, values, group, device, tolerance)
    with buffers_kept(full), buffers_kept(sharded):
        bad = check.stage()
        if _anywhere(bad is not None, group):
            node = check.first_bad_node() or bad or "?"
            raise check.error(node)


def draws_random_numbers(gm: GraphModule) -> bool:
    """Whether ``gm`` samples (dropout with p > 0 in training, rand...): its sharded and unsharded
    runs then differ."""
    return any(_samples(n) for n in gm.graph.nodes if n.op == "call_function")


def _samples(node: Node) -> bool:
    name = str(node.target)
    if "dropout" in name:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", True)
        return bool(train) and bool(p != 0)
    return any(w in name for w in _RANDOM_OPS)


_RANDOM_OPS = ("rand", "bernoulli", "multinomial", "normal", "uniform", "exponential")


class _Check:
    def __init__(
        self,
        full: GraphModule,
        sharded: GraphModule,
        values: Mapping[str, Any],
        group: dist.ProcessGroup,
        device: torch.device,
        tolerance: float,
    ) -> None:
        self.full, self.sharded, self.values = full, sharded, values
        self.group, self.device, self.tolerance = group, device, tolerance
        self.rank, self.degree = dist.get_rank(group), dist.get_world_size(group)
        self.index = stage_info(full).index
        self.worst: tuple[str, float] = ("", 0.0)

    # -- the stage as a whole ------------------------------------------------------------------

    def stage(self) -> str | None:
        """The first output, input gradient or parameter gradient that differs (``None``: all
        agree)."""
        placeholders = [n for n in self.sharded.graph.nodes if n.op == "placeholder"]
        full_in = [_leaf(self.values[n.name]) for n in placeholders]
        local_in = [
            _leaf(self._local(x, _placed(n)).to(self.device)) if isinstance(x, torch.Tensor) else x
            for n, x in zip(placeholders, full_in)
        ]
        full_out = _flat(self.full(*full_in))
        local_out = _flat(self.sharded(*local_in))
        out_p = self._output_placements()
        grads = _random_like(full_out)
        bad = self._compare_all(
            (f"output {i}", o, full_out[i].detach(), p)
            for i, (o, p) in enumerate(zip(local_out, out_p))
        )
        _backward(full_out, grads)
        local_grads = [
            None if g is None else self._local(g, dual(p)).to(self.device)
            for g, p in zip(grads, out_p)
        ]
        _backward(local_out, local_grads)
        bad = bad or self._compare_all(self._gradients(placeholders, full_in, local_in))
        for module in (self.full, self.sharded):
            module.zero_grad(set_to_none=True)
        return bad

    def _gradients(
        self, placeholders: list[Node], full_in: list[Any], local_in: list[Any]
    ) -> Iterator[tuple[str, Any, Any, Placement]]:
        for n, f, loc in zip(placeholders, full_in, local_in):
            if isinstance(f, torch.Tensor) and f.grad is not None:
                yield f"the gradient of input {n.name!r}", loc.grad, f.grad, dual(_placed(n))
        stored = self.sharded.meta[TP_META_KEY].param_placements
        for name, p in self.sharded.named_parameters():
            f = self.full.get_parameter(name)
            if f.grad is not None:
                where = Placement.parse(stored.get(name, "R"))
                yield f"the gradient of parameter {name!r}", p.grad, f.grad, where

    def _output_placements(self) -> list[Placement]:
        if stage_info(self.full).is_last:
            return [Placement("R")] * len(_flat_args(self.sharded))
        return [_placed(a) for a in _flat_args(self.sharded)]

    # -- node by node --------------------------------------------------------------------------

    def first_bad_node(self) -> str | None:
        """The first node of the sharded forward whose gathered value differs."""
        placeholders = [n for n in self.sharded.graph.nodes if n.op == "placeholder"]
        local_in = [
            self._local(self.values[n.name], _placed(n)).to(self.device)
            if isinstance(self.values[n.name], torch.Tensor)
            else self.values[n.name]
            for n in placeholders
        ]
        local = record_values(self.sharded, local_in)
        for n in self.sharded.graph.nodes:
            expected = self.values.get(n.name)
            if n.op in ("placeholder", "output") or TP_META_KEY not in n.meta:
                continue
            if not _comparable(expected) or not _comparable(local.get(n.name)):
                continue
            where = Placement.parse(n.meta[TP_META_KEY])
            bad = self._differs(f"node {n.name!r}", local[n.name], expected, where)
            if _anywhere(bad, self.group):
                return n.name
        return None

    # -- comparing -----------------------------------------------------------------------------

    def _compare_all(self, items: Any) -> str | None:
        first = None
        for what, local, expected, where in items:
            if not _comparable(expected) or not isinstance(local, torch.Tensor):
                continue
            if self._differs(what, local, expected, where) and first is None:
                first = what
        return first

    def _differs(
        self, what: str, local: torch.Tensor, expected: torch.Tensor, p: Placement
    ) -> bool:
        """Gather ``local`` (placed ``p``) to the whole tensor and compare with ``expected``."""
        whole = self._gather(local.detach(), p).cpu()
        expected = expected.detach().cpu()
        if whole.shape != expected.shape:
            self.worst = (what, float("inf"))
            return True
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        diff = float((whole.double() - expected.double()).abs().max()) if whole.numel() else 0.0
        relative = diff / max(scale, 1e-12)
        if diff > self.tolerance * scale + 1e-6:
            if relative > self.worst[1]:
                self.worst = (what, relative)
            return True
        return False

    def _gather(self, local: torch.Tensor, p: Placement) -> torch.Tensor:
        if p.kind == "R":
            return local
        if p.kind == "P":
            total = local.clone()
            dist.all_reduce(total, group=self.group)
            return total
        pieces = [torch.empty_like(local) for _ in range(self.degree)]
        dist.all_gather(pieces, local.contiguous(), group=self.group)
        return unshard_tensor(pieces, p)

    def _local(self, full: torch.Tensor, p: Placement) -> torch.Tensor:
        """This rank's piece of ``full``: its shard, or (``P``) the whole on rank 0, zeros elsewhere."""
        if p.kind == "P":
            return full.detach().clone() if self.rank == 0 else torch.zeros_like(full)
        return shard_tensor(full.detach(), p, self.rank, self.degree).clone()

    def error(self, node: str) -> TPVerificationError:
        what, relative = self.worst
        return TPVerificationError(
            f"tensor parallelism is wrong on stage {self.index}: node {node!r} differs from the "
            f"unsharded model on the first micro-batch (largest difference: {what}, {relative:.2e} "
            "relative). This is a bug in autopart's sharding rules, not in your model: compile "
            "without tp in the mesh to train correctly now, and report this error with the model.",
            stage=self.index,
            node=node,
        )


def _anywhere(flag: bool, group: dist.ProcessGroup) -> bool:
    """Whether ``flag`` holds on any rank of ``group`` (so every rank takes the same path)."""
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def _placed(node: Any) -> Placement:
    text = node.meta.get(TP_META_KEY, "R") if isinstance(node, Node) else "R"
    return Placement.parse(text)


def _flat_args(gm: GraphModule) -> list[Any]:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    args = out.args[0]
    return list(args) if isinstance(args, (tuple, list)) else [args]


def _flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _leaf(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach().clone()
        if x.is_floating_point():
            x.requires_grad_(True)
    return x


def _comparable(x: Any) -> TypeGuard[torch.Tensor]:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _random_like(outs: list[Any]) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(0)  # the same gradients on every rank
    return [
        torch.randn(o.shape, generator=gen, dtype=o.dtype)
        if isinstance(o, torch.Tensor) and o.requires_grad
        else None
        for o in outs
    ]


def _backward(outs: list[Any], grads: list[Any]) -> None:
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None and o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [g.to(o.device) for o, g in pairs])
