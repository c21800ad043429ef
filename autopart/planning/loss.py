"""The loss's time, which the planner does not see: the runtime applies the loss to the last
stage's outputs, on the last stage's device, once per micro-batch, forward and backward. It is
charged as torch's cross-entropy over the last dimension of each floating graph output of two
dimensions or more (the language models' case, where it is large: on a 65,536-word head its
backward costs about what the head's matmul does; a mean-squared error costs less, an
over-estimate then), as the memory model charges it (``stage_memory.stage_memory``).

The cross-entropy is traced and annotated like any graph (one ``aten.cross_entropy_loss`` node
reading the logits as a parameter, so that its backward is costed) and timed by the same models:
the roofline, or under ``--profile`` measured on this machine (cached by signature as every op
is). Its seconds are added to the output node's forward and backward, so the stage ILP, the
simulator and the plan's stage times all see them on the last stage.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch.fx import GraphModule

from autopart.cost_models.compute import ComputeModel
from autopart.cost_models.devices import DeviceSpec

__all__ = ["loss_times_s"]


class _CrossEntropy(torch.nn.Module):
    """Cross-entropy over the last dimension of ``logits`` (a parameter: its backward counts)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"))

    def forward(self, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.logits.flatten(0, -2), target.flatten())


@functools.lru_cache(maxsize=64)
def _cross_entropy_graph(shape: tuple[int, ...], dtype: torch.dtype) -> GraphModule:
    """The annotated graph of :class:`_CrossEntropy` on logits of ``shape`` (memoized)."""
    from autopart.capture.tracing import trace
    from autopart.passes.annotate import annotate

    target = torch.zeros(shape[:-1], dtype=torch.long, device="meta")
    return annotate(trace(_CrossEntropy(shape, dtype), (target,)))


def loss_times_s(
    gm: GraphModule, spec: DeviceSpec, *, profile: bool = False
) -> tuple[dict[str, tuple[float, float]], float]:
    """Per graph output of ``gm`` with a class dimension, the forward and backward seconds of the
    cross-entropy on it (module docstring), on the cost model or measured (``profile``); and the
    seconds measuring took."""
    from autopart.passes.annotate import node_cost

    times: dict[str, tuple[float, float]] = {}
    spent = 0.0
    for node in _outputs(gm).values():
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or not val.is_floating_point() or val.dim() < 2:
            continue
        loss = _cross_entropy_graph(tuple(val.shape), val.dtype)
        compute = ComputeModel(spec)
        if profile:
            from autopart.cost_models.profiling import profiled_compute

            compute, seconds = profiled_compute(loss, spec, whole_run=False)  # one op
            spent += seconds
        costs = {n.name: node_cost(n) for n in loss.graph.nodes if n.op == "call_function"}
        times[node.name] = (
            sum(compute.forward_s(n, c) for n, c in costs.items()),
            sum(compute.backward_s(n, c) for n, c in costs.items()),
        )
    return times, spent


def _outputs(gm: GraphModule) -> Mapping[str, torch.fx.Node]:
    """The computing nodes whose values the graph returns, once each."""
    found: dict[str, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            for a in n.all_input_nodes:
                if a.op not in ("placeholder", "get_attr"):
                    found.setdefault(a.name, a)
    return found
