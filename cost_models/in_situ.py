"""The whole graph, run where it will run: what op-by-op profiling misses.

:func:`autopart.cost_models.profiling.profile_graph` times each op alone, over and over, so its
weights and inputs stay in the caches and its dispatch is warm. In a training step they are not: on
the 2-core CPU of the tests, an MLP's 4 MiB weights come from memory in the step (their 8 layers
fill the 32 MiB cache) and from the cache when timed alone, 1.6x apart; views, which profiling
skips, cost their dispatch. :func:`graph_run_s` runs the whole graph, forward and backward, on real
tensors on the profiling device and returns the median seconds of each, so the profiled times can be
scaled to what the graph costs in one piece (:func:`autopart.cost_models.profiling.profiled_compute`).

Only graphs whose parameters and activations fit ``max_bytes`` are run; a larger one (a 70B-shaped
model) keeps its op-by-op times. The user's module is never touched: the run takes a copy, with
random values where the graph is on the meta device, and the gradients land on the copy.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule
from torch.utils._pytree import tree_flatten

__all__ = ["GraphRun", "graph_run_s", "random_value"]


@dataclass(frozen=True, slots=True)
class GraphRun:
    """Median seconds of the whole graph's forward and of its backward."""

    forward_s: float
    backward_s: float


def graph_run_s(
    gm: GraphModule,
    device: torch.device,
    *,
    max_bytes: int,
    repeats: int = 5,
    warmup: int = 2,
) -> GraphRun | None:
    """The annotated ``gm`` run forward and backward on ``device``, timed; ``None`` when its
    parameters and activations would take more than ``max_bytes``, or it cannot run on random
    values (an op that needs real data)."""
    from autopart.passes.annotate import node_cost

    nodes = list(gm.graph.nodes)
    held = sum(p.numel() * p.element_size() for p in gm.parameters())
    if held + sum(node_cost(n).output_bytes for n in nodes) > max_bytes:
        return None
    try:
        runnable = _runnable_copy(gm, device)
        args = [random_value(n.meta.get("val"), device) for n in nodes if n.op == "placeholder"]
        return _timed(lambda: runnable(*args), runnable, device, repeats, warmup)
    except (RuntimeError, TypeError, NotImplementedError, ValueError):
        return None


def _runnable_copy(gm: GraphModule, device: torch.device) -> GraphModule:
    """A copy of ``gm`` on ``device`` whose tensors are real: the user's values where they are
    real, random ones where the graph holds meta tensors."""
    with warnings.catch_warnings():
        # torch's copy of a GraphModule trips torch's own LeafSpec deprecation (2.13): nothing
        # a user can act on, printed on every --profile run
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
        run = copy.deepcopy(gm)
    with torch.no_grad():
        for module in run.modules():
            for name, t in [
                *module.named_parameters(recurse=False),
                *module.named_buffers(recurse=False),
            ]:
                real = random_value(t, device) if t.is_meta else t.detach().to(device)
                setattr(module, name, _like(t, real))
        for node in run.graph.nodes:
            if node.op != "get_attr":
                continue
            *path, leaf = str(node.target).split(".")
            owner = run.get_submodule(".".join(path))
            value = getattr(owner, leaf)
            registered = dict(owner.named_parameters(recurse=False)) | dict(
                owner.named_buffers(recurse=False)
            )
            if isinstance(value, torch.Tensor) and leaf not in registered:  # a constant
                setattr(
                    owner, leaf, random_value(value, device) if value.is_meta else value.to(device)
                )
    return run


def _like(original: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    if isinstance(original, torch.nn.Parameter):
        return torch.nn.Parameter(real, requires_grad=original.requires_grad)
    return real


def random_value(
    val: Any,
    device: torch.device,
    *,
    requires_grad: bool = False,
    generator: torch.Generator | None = None,
) -> Any:
    """A real value of ``val``'s shapes and dtypes on ``device`` (also inside lists and tuples):
    normal floats (needing gradients with ``requires_grad``), zero integers (indices stay in
    range); other values as they are. Profiling runs each op, and the whole graph, on these."""
    if isinstance(val, torch.Tensor):
        if val.is_floating_point():
            t = torch.randn(tuple(val.shape), dtype=val.dtype, generator=generator).to(device)
            return t.requires_grad_(requires_grad)
        return torch.zeros(tuple(val.shape), dtype=val.dtype, device=device)
    if isinstance(val, (list, tuple)):
        return type(val)(
            random_value(v, device, requires_grad=requires_grad, generator=generator) for v in val
        )
    return val


def _timed(
    forward: Callable[[], Any],
    module: torch.nn.Module,
    device: torch.device,
    repeats: int,
    warmup: int,
) -> GraphRun:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    forward_s, backward_s = [], []
    for _ in range(warmup + repeats):
        module.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        outs = [t for t in tree_flatten(forward())[0] if isinstance(t, torch.Tensor)]
        sync()
        middle = time.perf_counter()
        grads = [t for t in outs if t.requires_grad]
        if grads:
            torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
        sync()
        forward_s.append(middle - start)
        backward_s.append(time.perf_counter() - middle)
    return GraphRun(statistics.median(forward_s[warmup:]), statistics.median(backward_s[warmup:]))
