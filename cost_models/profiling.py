"""Profiling mode: measure node times on the device this process runs on, cache them, calibrate.

The roofline model predicts; this module measures. Each computing node of an annotated graph is run
on real tensors of its shapes (random floats, zero indices, so embedding and gather stay in range)
on the local device (CUDA when present, else CPU), forward and, when it takes part in autograd,
backward; the median of ``repeats`` timed runs after ``warmup`` runs is kept. Results are cached on
disk keyed by the device, the torch version and the node's op signature
(``autopart.passes.annotate.op_signature``), so a second run, or the 79 repeated layers of a
Llama-70B, cost nothing. Nodes whose tensors would take more than ``max_bytes`` are skipped and
keep their prediction.

:func:`calibrate` fits the roofline's ``compute_efficiency``, ``memory_efficiency`` and
``kernel_launch_s`` to the measurements, so nodes that were not measured get calibrated predictions
too. :class:`autopart.cost_models.compute.ComputeModel` takes the measured times as overrides.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.fx import GraphModule, Node
from torch.utils._pytree import tree_flatten

from autopart.cost_models.compute import ComputeModel, forward_bytes
from autopart.cost_models.devices import DeviceSpec
from autopart.cost_models.in_situ import GraphRun, graph_run_s, random_value
from autopart.cost_models.node_cost import NodeCost
from autopart.errors import AutopartError

__all__ = [
    "Measurement",
    "ProfileCache",
    "calibrate",
    "in_situ",
    "local_device_key",
    "profile_graph",
    "profile_key",
    "profiled_compute",
    "profiling_device",
]

_COMPUTE_OPS = ("call_function", "call_method", "call_module")


@dataclass(frozen=True, slots=True)
class Measurement:
    forward_s: float
    backward_s: float
    """0.0 when the node does not take part in autograd."""
    backward_weight_s: float | None = None
    """The part of ``backward_s`` that computes the node's weight gradients, timed alone (what
    ``W`` of a zero-bubble schedule runs); ``None`` where it was not measured (a node without
    weights, a cache entry from before)."""
    backward_working_bytes: int | None = None
    """The most bytes the node's backward holds at once, measured
    (:func:`~autopart.cost_models.peak_memory.measure_peak`): its output's gradient and what the
    backward allocates at its peak (its inputs' gradients and its kernels' temporaries, e.g.
    oneDNN's reordered copies of a convolution's tensors on a CPU), less its new weight
    gradients (counted apart); ``None`` where it has no backward."""


class ProfileCache:
    """Measurements on disk: ``{device_key: {signature_hash: [forward_s, backward_s,
    backward_weight_s or null, backward_working_bytes or null]}}``; an entry from before the
    memory was measured (fewer fields) is measured again."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        default = Path(os.environ.get("AUTOPART_CACHE_DIR", Path.home() / ".cache" / "autopart"))
        self.path = Path(path) if path is not None else default / "profile.json"
        self._data: dict[str, dict[str, list[float | None]]] = {}
        if self.path.exists():
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._data = {}  # a corrupt cache is re-measured, never trusted

    def get(self, device_key: str, signature: str) -> Measurement | None:
        hit = self._data.get(device_key, {}).get(_hash(signature))
        if not hit or len(hit) < 4:
            return None
        forward, backward, weight, working = hit[:4]
        if forward is None or backward is None:
            return None  # not a measurement: measured again
        return Measurement(forward, backward, weight, None if working is None else int(working))

    def put(self, device_key: str, signature: str, m: Measurement) -> None:
        entry = [m.forward_s, m.backward_s, m.backward_weight_s, m.backward_working_bytes]
        self._data.setdefault(device_key, {})[_hash(signature)] = entry

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._data, sort_keys=True))
        tmp.replace(self.path)  # atomic: a killed run never leaves half a file


def local_device_key(device: torch.device) -> str:
    """Identifies the hardware and software a measurement is valid for."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()}x{torch.get_num_threads()}threads"
    return f"{device.type}:{name}:torch{torch.__version__}"


def profile_graph(
    gm: GraphModule,
    *,
    device: torch.device | str | None = None,
    repeats: int = 5,
    warmup: int = 2,
    max_bytes: int = 1 << 30,
    cache: ProfileCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Measurement]:
    """Measure every computing node of an annotated ``gm`` on ``device`` (default: CUDA if
    available, else CPU). Returns ``{node_name: Measurement}`` for the nodes measured."""
    from autopart.passes.annotate import node_cost

    dev = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    cache = cache if cache is not None else ProfileCache()
    key = local_device_key(dev)
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op in _COMPUTE_OPS]
    result: dict[str, Measurement] = {}
    for i, node in enumerate(nodes):
        cost = node_cost(node)
        if cost.is_view or _footprint(node, cost) > max_bytes:
            continue
        signature = profile_key(node)
        m = cache.get(key, signature)
        if m is None:
            m = _measure(node, gm, modules, dev, repeats=repeats, warmup=warmup)
            if m is None:
                continue
            cache.put(key, signature, m)
        result[node.name] = m
        if progress is not None:
            progress(i + 1, len(nodes))
    cache.save()
    return result


def profile_key(node: Node) -> str:
    """What a measurement of ``node`` is cached under (with the device's
    :func:`local_device_key`): its op signature (op, shapes, strides, dtypes of its arguments)
    and which of its inputs take part in autograd, which decides what its backward computes."""
    from autopart.passes.annotate import node_cost, op_signature

    grads = tuple(node_cost(a).requires_grad for a in node.all_input_nodes)
    return f"{op_signature(node)}|grad={grads}"


def profiling_device(spec: DeviceSpec) -> torch.device:
    """Where measurements for a plan on ``spec`` are taken: the CPU for the ``cpu`` model, else
    this machine's GPU (an error without one: CPU times would be read as a GPU's)."""
    if spec.name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise AutopartError(
            f"profiling measures on this machine, which has no CUDA device, but the plan is for "
            f"{spec.name!r}; plan with --device cpu (device='cpu') to profile the CPU, or drop "
            "--profile to plan on the cost model."
        )
    return torch.device("cuda")


def profiled_compute(
    gm: GraphModule,
    spec: DeviceSpec,
    *,
    cache: ProfileCache | None = None,
    max_bytes: int = 1 << 30,
    progress: Callable[[int, int], None] | None = None,
    whole_run: bool = True,
) -> tuple[ComputeModel, float]:
    """The compute model of an annotated ``gm`` on measured times: every computing node measured
    on :func:`profiling_device` (each op signature once, cached), scaled to the whole graph's
    measured run (:func:`in_situ`; not without ``whole_run``, for a graph of one op), ``spec``
    calibrated to the measurements for the nodes that are not (too large, or not runnable alone)
    and for each node's fixed part; with the seconds profiling took."""
    from autopart.passes.annotate import node_cost

    start = time.perf_counter()
    dev = profiling_device(spec)
    measured = profile_graph(gm, device=dev, cache=cache, max_bytes=max_bytes, progress=progress)
    costs = {n.name: node_cost(n) for n in gm.graph.nodes if n.op in _COMPUTE_OPS}
    whole = graph_run_s(gm, dev, max_bytes=max_bytes) if whole_run else None
    if whole is not None:
        measured = in_situ(measured, whole, _compute_model(spec, costs, measured), costs)
    return _compute_model(spec, costs, measured), time.perf_counter() - start


def in_situ(
    measured: Mapping[str, Measurement],
    whole: GraphRun,
    model: ComputeModel,
    costs: Mapping[str, NodeCost],
) -> dict[str, Measurement]:
    """``measured`` scaled so that the graph's ops add up to the whole graph's measured run
    (:mod:`autopart.cost_models.in_situ`): forward by the run's forward over the sum of every op's
    forward (``model``'s, measured or calibrated), backward likewise."""
    forward = sum(model.forward_s(n, c) for n, c in costs.items())
    backward = sum(model.backward_s(n, c) for n, c in costs.items())
    f = whole.forward_s / forward if forward > 0 else 1.0
    b = whole.backward_s / backward if backward > 0 else 1.0
    return {
        n: dataclasses.replace(
            m,
            forward_s=m.forward_s * f,
            backward_s=m.backward_s * b,
            backward_weight_s=None if m.backward_weight_s is None else m.backward_weight_s * b,
        )
        for n, m in measured.items()
    }


def _compute_model(
    spec: DeviceSpec, costs: Mapping[str, NodeCost], measured: Mapping[str, Measurement]
) -> ComputeModel:
    return ComputeModel(
        calibrate(spec, costs, measured),
        measured_forward_s={n: m.forward_s for n, m in measured.items()},
        measured_backward_s={n: m.backward_s for n, m in measured.items()},
        measured_backward_weight_s={
            n: m.backward_weight_s for n, m in measured.items() if m.backward_weight_s is not None
        },
        measured_backward_working_bytes={
            n: m.backward_working_bytes
            for n, m in measured.items()
            if m.backward_working_bytes is not None
        },
    )


def calibrate(
    spec: DeviceSpec,
    costs: Mapping[str, NodeCost],
    measured: Mapping[str, Measurement],
) -> DeviceSpec:
    """``spec`` with efficiencies and launch overhead fitted to measured forward times.

    Compute-bound nodes (FLOPs > 0) give the compute efficiency, FLOP-free nodes that move bytes give
    the memory efficiency, and the fastest tenth of all measurements the fixed per-kernel overhead;
    each is a median, so a few noisy measurements do not move it. A node's bytes are the roofline's
    own (:func:`~autopart.cost_models.compute.forward_bytes`: an embedding moves its rows, not its
    table), so the fitted efficiency is the one the roofline then applies.
    """
    times = {n: m.forward_s for n, m in measured.items() if n in costs and m.forward_s > 0}
    if not times:
        return spec
    launch_s = statistics.median(sorted(times.values())[: max(1, len(times) // 10)])
    compute, memory = [], []
    for name, t in times.items():
        c = costs[name]
        work_s = max(t - launch_s, t * 0.1)
        if c.flops > 0:
            compute.append(c.flops / (spec.peak_flops_per_s(c.dtype) * work_s))
        elif forward_bytes(c) > 0:
            memory.append(forward_bytes(c) / (spec.memory_bandwidth_bytes_per_s * work_s))
    changes: dict[str, Any] = {"kernel_launch_s": launch_s}
    if compute:
        changes["compute_efficiency"] = min(1.0, statistics.median(compute))
    if memory:
        changes["memory_efficiency"] = min(1.0, statistics.median(memory))
    return dataclasses.replace(spec, **changes)


# ---------------------------------------------------------------------------------------------


def _hash(signature: str) -> str:
    return hashlib.sha1(signature.encode()).hexdigest()


def _footprint(node: Node, cost: NodeCost) -> int:
    return cost.bytes_read + cost.bytes_written + cost.param_bytes


def _to_device(value: Any, dev: torch.device) -> Any:
    """Device arguments (``.to("cuda")``, ``arange(device=...)``) point at the profiled device."""
    if isinstance(value, torch.device):
        return dev
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, dev) for v in value)
    if isinstance(value, dict):
        return {k: _to_device(v, dev) for k, v in value.items()}
    return value


def _measure(
    node: Node,
    gm: GraphModule,
    modules: Mapping[str, torch.nn.Module],
    dev: torch.device,
    *,
    repeats: int,
    warmup: int,
) -> Measurement | None:
    from autopart.passes.annotate import node_cost

    gen = torch.Generator().manual_seed(0)
    values: dict[Node, Any] = {}
    for n in dict.fromkeys(node.all_input_nodes):
        val = n.meta.get("val")
        if n.op == "get_attr" and not isinstance(val, torch.Tensor):
            obj: Any = gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part)
            values[n] = obj
        else:
            grad = node_cost(n).requires_grad or n.op == "get_attr"
            values[n] = random_value(val, dev, requires_grad=grad, generator=gen)
    args = _to_device(torch.fx.node.map_arg(node.args, lambda n: values[n]), dev)
    kwargs = _to_device(torch.fx.node.map_arg(node.kwargs, lambda n: values[n]), dev)
    if node.op == "call_function":
        fn: Callable[..., Any] = node.target  # type: ignore[assignment]
    elif node.op == "call_method":
        fn = lambda self, *a, **k: getattr(self, str(node.target))(*a, **k)  # noqa: E731
    else:
        module = modules[str(node.target)]
        if not _is_materialized(module):
            return None  # a meta-device submodule: nothing real to run
        on_dev = all(p.device == dev for p in module.parameters())
        fn = module if on_dev else copy.deepcopy(module).to(dev)  # never move the user's module
    grad_inputs = [v for v in values.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    weights = [  # the parameters it reads (a call_module's own are not timed apart)
        v
        for n, v in values.items()
        if n.op == "get_attr" and isinstance(v, torch.Tensor) and v.requires_grad
    ]

    def forward() -> Any:
        return fn(*args, **kwargs)

    try:
        fwd = _time(forward, dev, repeats, warmup)
        out = forward()
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        bwd, weight, working = 0.0, None, None
        if outs and grad_inputs:
            grads = [torch.ones_like(t) for t in outs]

            def graph() -> list[torch.Tensor]:
                flat = tree_flatten(forward())[0]
                return [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]

            def backward(o: list[torch.Tensor]) -> None:
                torch.autograd.grad(o, grad_inputs, grads, allow_unused=True)

            # The backward alone, each run on a fresh forward made outside the timed region (the
            # difference of two noisy medians, forward+backward minus forward, can come out <= 0).
            bwd = _time(backward, dev, repeats, warmup, setup=graph)
            if weights:  # the weight gradients alone: what W runs

                def weight_backward(o: list[torch.Tensor]) -> None:
                    torch.autograd.grad(o, weights, grads, allow_unused=True)

                weight = min(bwd, _time(weight_backward, dev, repeats, warmup, setup=graph))
            working = _backward_working_bytes(graph, backward, grads, weights, dev)
    except (RuntimeError, TypeError, NotImplementedError):
        return None  # ops that need real data (e.g. data-dependent shapes) keep their prediction
    return Measurement(fwd, bwd, weight, working)


def _backward_working_bytes(
    graph: Callable[[], list[torch.Tensor]],
    backward: Callable[[list[torch.Tensor]], None],
    grads: Sequence[torch.Tensor],
    weights: Sequence[torch.Tensor],
    dev: torch.device,
) -> int:
    """:attr:`Measurement.backward_working_bytes` of one ``backward`` on a fresh ``graph()``."""
    from autopart.cost_models.peak_memory import measure_peak, quiet_stderr

    outs = graph()
    # torch's CPU allocator warns when the backward frees what it allocated before the profiler
    # started (the saved tensors): expected here, and not the user's to read
    with quiet_stderr(), measure_peak(dev) as peak:
        backward(outs)
    allocated = peak.peak_bytes - peak.start_bytes
    new_weight_grads = sum(w.numel() * w.element_size() for w in weights)
    given = sum(g.numel() * g.element_size() for g in grads)
    return given + max(0, allocated - new_weight_grads)


def _is_materialized(module: torch.nn.Module) -> bool:
    return all(not p.is_meta for p in module.parameters())


def _time(
    fn: Callable[..., Any],
    dev: torch.device,
    repeats: int,
    warmup: int,
    setup: Callable[[], Any] | None = None,
) -> float:
    """Median seconds of ``fn()``, or of ``fn(setup())`` with ``setup`` run outside the timing."""
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def once() -> float:
        arg = () if setup is None else (setup(),)
        sync()
        start = time.perf_counter()
        fn(*arg)
        sync()
        return time.perf_counter() - start

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))
