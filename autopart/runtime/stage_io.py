"""What the runtime and the code generator share between splitting a plan into stages and running or
writing them: the model's flat inputs (:class:`ProgramInputs`), the micro-batch graph the stages run
(:func:`micro_batch_graph`, and :func:`runnable_graph`, which also checks a TP plan on it), and
each stage's input and output metadata as a rank sends and receives it (:func:`stage_io`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten

from autopart.errors import AutopartError
from autopart.planning.plans import Plan, TPSection

__all__ = [
    "ProgramInputs",
    "RuntimeSetupError",
    "buffers_kept",
    "local_meta",
    "micro_batch_graph",
    "plan_that_runs",
    "runnable_graph",
    "stage_io",
    "value_metas",
]


class RuntimeSetupError(AutopartError):
    """The distributed set-up does not match what was asked for."""


def stage_io(
    metas: Mapping[str, torch.Tensor], tp: TPSection | None, info: Any
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Meta tensors of one micro-batch's tensor inputs and outputs of the stage ``info`` describes,
    as this rank sends and receives them. With TP a stage sends and receives its local tensors
    (shards, partial sums); only the last stage's outputs, the model's, are whole. Non-tensor inputs
    (bound into the first stage) are left out."""
    return (
        tuple(local_meta(metas, tp, n) for n in info.input_names if n in metas),
        tuple(local_meta(metas, tp, n, whole=info.is_last) for n in info.output_names),
    )


def local_meta(
    metas: Mapping[str, torch.Tensor], tp: TPSection | None, name: str, *, whole: bool = False
) -> torch.Tensor:
    """The meta tensor of value ``name`` as this rank holds it (its TP shard unless ``whole``)."""
    from autopart.passes.shard_tp import local_shape

    meta = metas[name]
    if tp is None or tp.degree == 1 or whole:
        return meta
    shape = local_shape(meta.shape, tp.placements[name], tp.degree)
    return torch.empty(shape, dtype=meta.dtype, device="meta").requires_grad_(meta.requires_grad)


class ProgramInputs:
    """How the model's positional and keyword inputs flatten into the first stage's inputs (the
    traced graph's placeholders, in order), fixed by the example inputs given to compile."""

    def __init__(self, spec: TreeSpec, flat: list[Any], keys: tuple[str, ...]) -> None:
        self.spec = spec
        self.flat = flat
        self.keys = keys
        self.constants = {i: v for i, v in enumerate(flat) if not isinstance(v, torch.Tensor)}
        """Non-tensor inputs (e.g. ``scale=2.0``): the trace specialised the graph to their values,
        so they are bound into the first stage and every call must pass the same."""

    @classmethod
    def of(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ProgramInputs:
        flat, spec = tree_flatten((args, kwargs))
        return cls(spec, flat, tuple(kwargs))

    @property
    def batch(self) -> int:
        from autopart.planning.mesh_plan import batch_size

        return batch_size(self.flat)

    def check_graph(self, gm: torch.fx.GraphModule) -> None:
        placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(self.flat):
            raise RuntimeSetupError(
                f"the traced graph takes {len(placeholders)} inputs ({', '.join(placeholders)}) but the "
                f"example inputs flatten to {len(self.flat)}; pass tensors, or flat tuples/dicts of them."
            )

    def micro_batch(self, batch: int, micro_batches: int) -> list[Any]:
        """The flat inputs of one micro-batch (the first)."""
        size = batch // micro_batches
        return [
            a[:size] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a
            for a in self.flat
        ]

    def flatten(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Any]:
        if set(kwargs) != set(self.keys):
            raise RuntimeSetupError(
                f"the program was compiled with keyword inputs {sorted(self.keys)} but got {sorted(kwargs)}; "
                "pass the same keywords to every call."
            )
        flat, spec = tree_flatten((tuple(args), {k: kwargs[k] for k in self.keys}))
        if spec != self.spec:
            raise RuntimeSetupError(
                f"the inputs have structure {spec} but the program was compiled for {self.spec}; "
                "pass inputs shaped like compile's example_inputs / example_kwargs."
            )
        for i, value in self.constants.items():
            if flat[i] != value:
                raise RuntimeSetupError(
                    f"input {i} is {flat[i]!r} but the program was compiled with {value!r}; a "
                    "non-tensor input is part of the traced graph, so compile again to change it."
                )
        return flat


def plan_that_runs(
    make: Callable[[int | None], Plan],
    micro_batches: int | None,
    model: torch.nn.Module,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: int,
    dp: int,
) -> tuple[Plan, torch.fx.GraphModule | None]:
    """``make(micro_batches)`` and the graph its stages run (:func:`runnable_graph`; ``None``: no
    plan runs). Export specializes dimensions of size 1, so a micro-batch of one sample can trace
    to another graph, or to shapes where a TP placement no longer holds; when ``micro_batches`` is
    not fixed, fewer, larger micro-batches are tried (one micro-batch runs the planned graph)."""
    plan = make(micro_batches)
    run_gm = runnable_graph(model, gm, args, kwargs, batch, dp, plan)
    fewer = [m for m in range(plan.micro_batches - 1, 0, -1) if (batch // dp) % m == 0]
    while run_gm is None and micro_batches is None and fewer:
        try:
            plan = make(fewer.pop(0))
        except AutopartError:
            continue
        run_gm = runnable_graph(model, gm, args, kwargs, batch, dp, plan)
    return plan, run_gm


def runnable_graph(
    model: torch.nn.Module,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: int,
    dp: int,
    plan: Plan,
) -> torch.fx.GraphModule | None:
    """The micro-batch graph that ``plan`` runs on, if ``plan`` applies to it: the same nodes as
    the planned graph, and (with TP) placements the rules offer at its shapes; else ``None``."""
    from autopart.passes.shard_tp import ShardError
    from autopart.passes.tp_check import check_tp_plan

    run_gm = micro_batch_graph(model, gm, args, kwargs, batch, dp * plan.micro_batches)
    if run_gm is None or plan.tp is None:
        return run_gm
    try:
        check_tp_plan(run_gm, plan.tp)
    except ShardError:
        if run_gm is gm:
            raise
        return None
    return run_gm


def micro_batch_graph(
    model: torch.nn.Module,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: int,
    micro_batches: int,
) -> torch.fx.GraphModule | None:
    """The graph the stages run: traced with one micro-batch's shapes, because export bakes static
    shapes (e.g. ``view(x, [batch, seq, 3 * hidden])``) into the graph. The plan was made on the
    full batch's graph, so both must have the same nodes for its stage assignment to carry over."""
    from autopart.capture.tracing import trace

    if micro_batches == 1:
        return gm
    size = batch // micro_batches

    def slice_batch(a: Any) -> Any:
        return (
            a[:size] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a
        )

    run = trace(
        model, tuple(slice_batch(a) for a in args), {k: slice_batch(v) for k, v in kwargs.items()}
    )
    want = [(n.name, n.op, str(n.target)) for n in gm.graph.nodes]
    got = [(n.name, n.op, str(n.target)) for n in run.graph.nodes]
    return run if want == got else None


def value_metas(gm: torch.fx.GraphModule, flat_inputs: list[Any]) -> dict[str, torch.Tensor]:
    """Every tensor value of ``gm`` run on ``flat_inputs``, as a meta tensor with the value's shape,
    dtype and ``requires_grad``. Runs under fake tensors (no compute, no memory), with autograd on so
    that ``requires_grad`` says which values carry gradients back across a stage boundary."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    metas: dict[str, torch.Tensor] = {}

    class _Prop(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                metas[n.name] = torch.empty(out.shape, dtype=out.dtype, device="meta")
                metas[n.name].requires_grad_(out.requires_grad)
            return out

    # Fake mode still runs an op whose inputs are all real: BatchNorm's add_ on its real batch
    # counter would count this run.
    with buffers_kept(gm), FakeTensorMode(allow_non_fake_inputs=True), torch.enable_grad():
        _Prop(gm).run(*flat_inputs)
    return metas


@contextlib.contextmanager
def buffers_kept(module: torch.nn.Module) -> Iterator[None]:
    """Put back every buffer of ``module`` (running statistics, batch counts) that what runs
    inside changed: a run that only measures must not count as a training step."""
    saved = {name: b.detach().clone() for name, b in module.named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module.named_buffers():
                b.copy_(saved[name])
