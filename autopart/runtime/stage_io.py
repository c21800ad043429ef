"""What the runtime and the code generator share between splitting a plan into stages and running or
writing them: the model's flat inputs (:class:`ProgramInputs`), the micro-batch graph the stages run
(:func:`micro_batch_graph`, and :func:`plan_that_runs`, which plans it when the whole batch's plan
does not apply to it), each stage's input and output metadata as a rank sends and receives it
(:func:`stage_io`), and where each entry of the model's ``state_dict()`` lives among the stages
(:class:`StateLayout`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import TreeSpec, tree_flatten

from autopart.errors import AutopartError
from autopart.planning.plans import Plan, TPSection

__all__ = [
    "ProgramInputs",
    "RuntimeSetupError",
    "StateLayout",
    "buffers_kept",
    "local_meta",
    "micro_batch_graph",
    "plan_made_for",
    "plan_that_runs",
    "same_nodes",
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
    from autopart.passes.tp.local import local_shape

    meta = metas[name]
    if tp is None or tp.degree == 1 or whole:
        return meta
    shape = local_shape(meta.shape, tp.placements[name], tp.degree)
    return torch.empty(shape, dtype=meta.dtype, device="meta").requires_grad_(meta.requires_grad)


@dataclass(frozen=True, slots=True)
class StateLayout:
    """Where each entry of ``model.state_dict()`` lives in the split program.

    A stage registers a tensor under one name (:func:`~autopart.passes.split_stages.canonical_targets`:
    ``lm_head.weight`` tied to the embedding is held as ``transformer.wte.weight``), holds the
    non-persistent buffers it reads too, and does not hold what no node reads (an unused buffer or
    parameter). ``sources`` maps every key of the model's state dict, in its order, to the stage
    tensor holding its value; a key no stage holds maps to itself and its value is in ``constants``
    (nothing changes it in training)."""

    sources: Mapping[str, str]
    constants: Mapping[str, Any]

    @classmethod
    def of(
        cls,
        model: torch.nn.Module,
        gm: torch.fx.GraphModule,
        stages: Sequence[torch.fx.GraphModule],
    ) -> StateLayout:
        """The layout of ``stages`` split from ``gm``, a trace of ``model`` (which shares its
        tensors: a key is matched to the stage name of the same tensor)."""
        from autopart.passes.split_stages import canonical_targets

        canonical = canonical_targets(gm)
        named = [
            *gm.named_parameters(remove_duplicate=False),
            *gm.named_buffers(remove_duplicate=False),
        ]
        by_tensor: dict[int, str] = {}
        for name, tensor in named:
            by_tensor.setdefault(id(tensor), canonical[name])
        held = {name for stage in stages for name in stage.state_dict()}
        sources: dict[str, str] = {}
        constants: dict[str, Any] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            source = by_tensor.get(id(value), canonical.get(key, key))
            if source in held:
                sources[key] = source
            else:
                sources[key] = key
                constants[key] = (
                    value.detach().clone() if isinstance(value, torch.Tensor) else value
                )
        return cls(sources, constants)

    def assemble(self, held: Mapping[str, Any], constants: Mapping[str, Any]) -> dict[str, Any]:
        """The model's state dict, in its order, from the stage tensors ``held`` (by stage name)
        and ``constants``, the current values of the keys no stage holds."""
        return {
            key: constants[key] if key in self.constants else held[source]
            for key, source in self.sources.items()
        }


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
    make: Callable[[torch.fx.GraphModule, int, int | None], Plan],
    micro_batches: int | None,
    model: torch.nn.Module,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: int,
    dp: int,
    *,
    profile: bool = False,
) -> tuple[Plan, torch.fx.GraphModule]:
    """The plan and the graph its stages run: ``make(graph, graph_batch, micro_batches)`` plans
    ``gm`` (the whole batch's graph, annotated), which picks the schedule and micro-batch count;
    the stages run the graph traced at one micro-batch's shapes (:func:`micro_batch_graph`). When
    that graph has other nodes (export specializes dimensions of size 1, so a micro-batch of one
    sample can drop no-op ops), or the TP plan's placements do not hold at its shapes, the
    micro-batch graph is planned itself at the same count, costed at the shapes it runs with.
    With ``profile`` (the plan is made on measured times) the micro-batch graph is always the one
    planned, so its ops are measured at the shapes they run with; at once when the count is
    given, else after the whole batch's plan has chosen it. The micro-batch graph's experts are
    costed at ``gm``'s imbalance factor."""
    from autopart.passes.annotate import annotate
    from autopart.passes.routing import imbalance_of

    plan: Plan | None = None
    if profile and micro_batches is not None:
        m = micro_batches  # measured at once at the shapes they run with
    else:
        plan = make(gm, batch, micro_batches)
        m = plan.micro_batches
    chunks = dp * m
    run_gm = micro_batch_graph(model, gm, args, kwargs, batch, chunks)
    keeps = (not profile or run_gm is gm) and same_nodes(gm, run_gm)
    if plan is not None and keeps and _tp_holds(run_gm, plan, strict=run_gm is gm):
        return plan, run_gm
    graph = run_gm if run_gm is gm else annotate(run_gm, expert_imbalance=imbalance_of(gm))
    plan = make(graph, batch // chunks, m)
    _tp_holds(run_gm, plan, strict=True)
    return plan, run_gm


def _tp_holds(run_gm: torch.fx.GraphModule, plan: Plan, *, strict: bool) -> bool:
    """Whether the plan's TP placements are ones the rules offer at ``run_gm``'s shapes (``strict``:
    raise, naming the node, when not: the plan was made for this graph)."""
    from autopart.errors import ShardError
    from autopart.passes.tp.check import check_tp_plan

    if plan.tp is None:
        return True
    try:
        check_tp_plan(run_gm, plan.tp)
    except ShardError:
        if strict:
            raise
        return False
    return True


def same_nodes(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    """Whether ``a`` and ``b`` have the same nodes (names, kinds and targets, in order), so that a
    plan of one applies to the other."""
    return [(n.name, n.op, str(n.target)) for n in a.graph.nodes] == [
        (n.name, n.op, str(n.target)) for n in b.graph.nodes
    ]


def plan_made_for(plan: Plan, gm: torch.fx.GraphModule) -> bool:
    """Whether ``plan`` places exactly the computing nodes of ``gm`` (it was made for ``gm``, or
    for a graph with the same nodes)."""
    computing = {n.name for n in gm.graph.nodes if n.op.startswith("call_")}
    return set(plan.stage_of) == computing


def micro_batch_graph(
    model: torch.nn.Module,
    gm: torch.fx.GraphModule,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    batch: int,
    chunks: int,
) -> torch.fx.GraphModule:
    """The graph the stages run: ``model`` traced at one of ``chunks`` equal parts of the batch
    (``gm``, the whole batch's graph, when ``chunks`` is 1), because export bakes static shapes
    (e.g. ``view(x, [batch, seq, 3 * hidden])``) into the graph."""
    from autopart.capture.tracing import trace

    if chunks == 1:
        return gm
    size = batch // chunks

    def slice_batch(a: Any) -> Any:
        return (
            a[:size] if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch else a
        )

    return trace(
        model, tuple(slice_batch(a) for a in args), {k: slice_batch(v) for k, v in kwargs.items()}
    )


def value_metas(gm: torch.fx.GraphModule, flat_inputs: list[Any]) -> dict[str, torch.Tensor]:
    """Every tensor value of ``gm`` run on ``flat_inputs``, as a meta tensor with the value's shape,
    dtype and ``requires_grad``. Runs under fake tensors (no compute, no memory), with autograd on so
    that ``requires_grad`` says which values carry gradients back across a stage boundary."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv, has_free_unbacked_symbols

    metas: dict[str, torch.Tensor] = {}

    class _Prop(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            # a size known only at run time (tokens routed to one expert) stays inside its stage
            if isinstance(out, torch.Tensor) and not has_free_unbacked_symbols(out.shape):
                metas[n.name] = torch.empty(out.shape, dtype=out.dtype, device="meta")
                metas[n.name].requires_grad_(out.requires_grad)
            return out

    # Fake mode still runs an op whose inputs are all real: BatchNorm's add_ on its real batch
    # counter would count this run.
    fake = FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())
    with buffers_kept(gm), fake, torch.enable_grad():
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
