"""``autopart.plan``: trace -> annotate -> OpGraph -> [TP ILP -> TP-adjusted costs] -> coarsen ->
stage ILP -> simulate -> Plan.

Costs are measured once for the example batch and scaled to one micro-batch (``batch / (dp m)``
samples): activations and boundary bytes are linear in the micro-batch size, parameters are not,
and each node's time is a fixed part that every micro-batch pays (launch, weight reads, gradient
accumulation) plus a part linear in the samples (:func:`autopart.planning.blocks.scaled_time_s`).
With ``profile`` the times are measured on this machine instead of predicted.
The schedule (GPipe or 1F1B) and the micro-batch count are chosen by simulating every
candidate on the solved stages and keeping the fastest one that fits memory.

Meshes: ``dp`` replicas each pipeline ``batch / dp`` samples and all-reduce their gradients after
the pipeline drains; ``tp`` ranks shard every stage as the TP ILP decides (solved once on the whole
graph; each node then carries its TP-adjusted time, bytes and parameter shard, see
:mod:`autopart.solver.tp_costs`). Links follow a layout of :data:`GPUS_PER_NODE` GPUs per node,
dp-major and tp-minor: TP collectives run on NVLink, pipeline sends and dp all-reduces on the
network once they leave a node. ``mesh="auto"`` searches the meshes (:mod:`autopart.planning.mesh_search`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from autopart.errors import AutopartError
from autopart.passes.routing import costed_experts
from autopart.planning.mesh_plan import (
    MEMORY_ERRORS,
    TPCostsOf,
    batch_size,
    micro_batch_options,
    op_graph_of,
    plan_mesh,
    planning_setup,
    solve_tp_costs,
)
from autopart.planning.plans import Plan
from autopart.planning.request import PlanRequest
from autopart.solver.tp_ilp import InfeasibleTPMemoryError

__all__ = ["plan", "plan_graph"]


def plan(
    model: torch.nn.Module,
    example_inputs: Any,
    request: PlanRequest | None = None,
    *,
    example_kwargs: Mapping[str, Any] | None = None,
    **options: Any,
) -> Plan:
    """Plan ``model`` (called as ``model(*example_inputs, **example_kwargs)``; the example batch is
    the global batch of one training step) for a ``dp x pp x tp`` mesh, or with ``mesh="auto"`` for
    the fastest mesh of ``devices`` devices that fits memory. ``options`` are
    :class:`~autopart.planning.request.PlanRequest` fields (``mesh="pp=4"``, ``device="h100"``,
    ...) and replace those of ``request``. No process group is needed, and a meta-device model is
    planned without allocating its weights."""
    from autopart.capture.tracing import trace
    from autopart.passes.annotate import annotate
    from autopart.precision import as_precision, check_master_dtypes, traced_as_computed

    req = PlanRequest.of(request, options)  # bad options fail before tracing
    if req.name is None:
        req = req.with_options(name=type(model).__name__)
    precision = as_precision(req.precision)
    check_master_dtypes(model, precision)
    dtype = precision.compute_dtype  # planned as it computes (autopart.precision)
    with traced_as_computed(dtype, model, example_inputs, example_kwargs) as (args, kwargs):
        gm = annotate(trace(model, args, kwargs), expert_imbalance=req.expert_imbalance)
        return plan_graph(gm, req, batch=batch_size(example_inputs))


def plan_graph(
    gm: torch.fx.GraphModule,
    request: PlanRequest | None = None,
    *,
    batch: int,
    progress: Callable[[str], None] | None = None,
    graph_batch: int | None = None,
    **options: Any,
) -> Plan:
    """Plan an already annotated graph, traced at the global ``batch`` (see :func:`plan`).

    ``gm`` was traced at ``graph_batch`` samples (default: the global ``batch``). Costs scale
    linearly from there to one micro-batch, so a graph traced at one micro-batch's shapes
    (``graph_batch = batch / (dp * micro_batches)``, the graph the pipeline runs) is costed at the
    shapes it runs with.

    With a ``tp`` axis above 1, the TP ILP shards every node over the TP ranks
    (:func:`autopart.solver.tp_ilp.solve_tp`, solved once on the whole graph) and the stages are
    planned on each node's TP-adjusted costs (:mod:`autopart.solver.tp_costs`); the plan's ``tp``
    section holds the placement of every node of ``gm``. ``mesh="auto"`` searches the meshes of
    ``devices`` devices and returns the fastest plan that fits memory
    (:func:`autopart.planning.mesh_search.search_mesh`, which also reports the alternatives).
    A mixture of experts must have been annotated with the request's ``expert_imbalance``; the
    plan's ``experts`` says how its experts were costed.
    """
    req = PlanRequest.of(request, options)
    experts = costed_experts(gm, req.expert_imbalance)  # a mismatched graph fails before solving
    if req.is_auto:
        from autopart.planning.mesh_search import search_mesh

        if graph_batch not in (None, batch):
            raise AutopartError(
                "mesh='auto' plans a graph traced at the global batch; trace the model at the "
                f"batch of {batch} (not {graph_batch}) or name the mesh."
            )
        return search_mesh(gm, req, batch=batch, progress=progress).plan
    axes = req.axes
    dp, fsdp, p, tp = axes["dp"], axes["fsdp"], axes["pp"], axes["tp"]
    setup = planning_setup(req, pp=p, dp=dp, fsdp=fsdp)
    mb_options = micro_batch_options(batch, dp, p, req.micro_batches, setup.kinds, fsdp=fsdp)
    say = progress or (lambda _msg: None)
    start = time.perf_counter()
    say("building the op graph")
    og, profile_s = op_graph_of(gm, setup, say)

    def plan_with(tp_costs: TPCostsOf | None) -> Plan:
        plan = plan_mesh(
            og,
            tp_costs,
            setup,
            batch=batch,
            dp=dp,
            pp=p,
            options=mb_options,
            progress=say,
            start_s=start,
            graph_batch=graph_batch,
            fsdp=fsdp,
        )
        return dataclasses.replace(plan, profile_s=profile_s, experts=experts)

    if tp == 1:
        return plan_with(None)
    # Collective latency is paid once per micro-batch: exact for the most micro-batches (the
    # micro-batches of the traced graph's batch: one for a graph traced at one micro-batch).
    m_tp = max(
        1,
        dp
        * fsdp
        * max(counts[0] for counts in mb_options.values())
        * (graph_batch or batch)
        // batch,
    )
    say(f"solving tensor parallelism over {tp} ranks")
    fastest = solve_tp_costs(gm, og, tp, setup, micro_batches=m_tp)
    try:
        return plan_with(fastest)
    except MEMORY_ERRORS as exc:
        # The fastest sharding does not fit: shard for memory, so that a rank holds at most pp
        # devices' worth of the whole graph, and plan again.
        say(f"solving tensor parallelism over {tp} ranks within {p} x the memory limit")
        try:
            lean = solve_tp_costs(gm, og, tp, setup, micro_batches=m_tp, memory=setup.limit * p)
        except InfeasibleTPMemoryError:
            raise exc from None
        if dict(lean.plan.placements) == dict(fastest.plan.placements):
            raise
        return plan_with(lean)
