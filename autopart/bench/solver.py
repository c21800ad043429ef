"""The solver benchmark: solve time and optimality gap of the stage ILP against the baselines, on the
model zoo and on synthetic operator graphs of 100 to 20,000 nodes.

Every case runs the planner's pipeline on an :class:`~autopart.planning.graph.OpGraph` (see
:func:`solve_case`): coarsen to at most ``max(64, 24 p)`` blocks keeping the node-level chain DP's
cuts, the block-level chain DP as the hint, the CP-SAT stage ILP under a time limit, then the
node-level lower bound (:func:`~autopart.solver.cost.lower_bound_s`) and the baselines, all scored by
:func:`~autopart.solver.cost.stage_times_s`. Memory is not constrained (the baselines and the bound
ignore it, so the comparison is like for like); times are per micro-batch.

Synthetic graphs (:func:`synthetic_op_graph`) are built like real models: a few embedding nodes,
repeated layers whose ``j``-th node copies the ``j``-th node of one random template (with +-10%
jitter on compute), a heavy output head, and rare (0.5%) nodes ten times heavier. Compute is log-uniform over 2 us - 200 us per node
(forward; backward twice that), tensors 1 - 64 MiB, and two in five nodes own a 1 - 64 MiB parameter.

- ``"chain"``: every node reads the one before it.
- ``"skip"``: a chain plus long U-Net skips: the last node of each layer in the first half feeds
  its mirror image ``n - 1 - i`` in the second half.
- ``"branch"``: each layer forks into 2 - 4 parallel branches of 2 - 6 nodes that a join node
  reads (inception or multi-head style); the branches are listed one after another, as fx does.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from autopart.cost_models.devices import DeviceSpec, get_device
from autopart.errors import AutopartError
from autopart.planning.graph import OpGraph, OpNode, coarsen
from autopart.solver import baselines
from autopart.solver.cost import lower_bound_s, stage_times_s
from autopart.solver.stage_ilp import StageSolution, solve_stages

__all__ = [
    "NO_SOLUTION",
    "ROW_KEYS",
    "SYNTHETIC_KINDS",
    "format_rows_markdown",
    "solve_case",
    "solver_suite",
    "synthetic_op_graph",
    "zoo_op_graph",
]

SyntheticKind = Literal["chain", "skip", "branch"]
SYNTHETIC_KINDS: tuple[SyntheticKind, ...] = ("chain", "skip", "branch")

ROW_KEYS: tuple[str, ...] = (
    "case",
    "kind",
    "nodes",
    "blocks",
    "stages",
    "solver_status",
    "solve_s",
    "coarsen_s",
    "ilp_s",
    "lower_bound_time_s",
    "bottleneck_s",
    "lower_bound_s",
    "gap",
    "ilp_bound_s",
    "equal_layers_s",
    "equal_params_s",
    "chain_dp_s",
    "speedup_vs_equal_layers",
    "speedup_vs_equal_params",
    "speedup_vs_chain_dp",
)
"""Keys of every row :func:`solve_case` and :func:`solver_suite` return, in this order.

- ``solver_status``: CP-SAT's ``"OPTIMAL"`` or ``"FEASIBLE"`` (time limit hit with a plan), or
  :data:`NO_SOLUTION`.
- Wall times, in seconds: ``solve_s`` = ``coarsen_s`` + the chain-DP hint + ``ilp_s`` (building and
  solving the CP-SAT model); ``lower_bound_time_s`` for computing ``lower_bound_s``.
- Plan times, in seconds per micro-batch: ``bottleneck_s`` (the ILP's plan), ``lower_bound_s``
  (over every valid partition of the *nodes*), ``ilp_bound_s`` (CP-SAT's proven bound for the
  *blocks*), and the baselines ``equal_layers_s``, ``equal_params_s``, ``chain_dp_s``.
- ``gap = bottleneck_s / lower_bound_s - 1``; ``speedup_vs_X = X_s / bottleneck_s``.
"""

NO_SOLUTION = "NO_SOLUTION"
"""``solver_status`` when CP-SAT found no plan within the time limit; the plan's times, gap and
speed-ups are then NaN (the lower bound and the baselines are still reported)."""

SYNTHETIC_NODES = (100, 1000, 5000, 20000)
SYNTHETIC_STAGES = (2, 4, 8, 16)
ZOO_MODELS = ("gpt2", "llama-7b", "heavy-head", "cnn", "mlp")
ZOO_STAGES = (2, 4, 8)
QUICK_NODES = (100, 1000)
QUICK_STAGES = (2, 8)
QUICK_ZOO = ("gpt2", "heavy-head", "cnn")

_MIB = 1 << 20
_FLOPS_PER_S = 400e12
"""Converts a synthetic node's forward time to FLOPs (about 40% of an H100's dense bf16 peak)."""
_EMBED_NODES = 2
_HEAD_NODES = 2

Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``: called before each case (``done`` cases finished) and once
at the end with ``done == total``."""


# ---------------------------------------------------------------------------------------------
# synthetic graphs


def synthetic_op_graph(
    kind: SyntheticKind, num_nodes: int, *, seed: int, device: str | DeviceSpec = "h100"
) -> OpGraph:
    """A random operator graph of ``num_nodes`` nodes shaped like ``kind`` (see the module
    docstring); the same ``seed`` gives the same graph."""
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic graph kind {kind!r}; use one of {SYNTHETIC_KINDS}")
    min_nodes = _EMBED_NODES + _HEAD_NODES + 2
    if num_nodes < min_nodes:
        raise ValueError(f"a synthetic graph needs at least {min_nodes} nodes, got {num_nodes}")
    rng = random.Random(f"{kind}:{num_nodes}:{seed}")
    layer_len = rng.randint(8, 16)
    inputs = _structure(kind, num_nodes, layer_len, rng)
    layer_of = _layers(kind, num_nodes, layer_len, inputs)
    return _with_costs(inputs, layer_of, rng, get_device(device))


def _structure(kind: SyntheticKind, n: int, layer_len: int, rng: random.Random) -> list[list[int]]:
    """``inputs[i]``: the earlier nodes node ``i`` reads (every node but the first reads one)."""
    inputs: list[list[int]] = [[] if i == 0 else [i - 1] for i in range(n)]
    body_start, body_end = _EMBED_NODES, n - _HEAD_NODES
    if kind == "skip":
        for i in range(body_start + layer_len - 1, n // 2 - 1, layer_len):
            mirror = n - 1 - i
            if mirror - i > 1:
                inputs[mirror].append(i)
    elif kind == "branch":
        i = body_start
        while i < body_end:
            branches = [rng.randint(2, 6) for _ in range(rng.randint(2, 4))]
            size = 1 + sum(branches) + 1  # fork, branches, join
            if i + size > body_end:
                break  # the rest of the body stays a chain
            fork, pos, ends = i, i + 1, []
            for length in branches:
                inputs[pos] = [fork]
                ends.append(pos + length - 1)
                pos += length
            inputs[pos] = ends  # the join reads the end of every branch
            i = pos + 1
    return inputs


def _layers(
    kind: SyntheticKind, n: int, layer_len: int, inputs: Sequence[Sequence[int]]
) -> list[int | None]:
    """The repeated layer of each node (``None`` for the embedding and the head): fork-join
    modules for ``"branch"`` (the chain after the last one is one more layer), runs of
    ``layer_len`` nodes otherwise."""
    layer_of: list[int | None] = [None] * n
    body = range(_EMBED_NODES, n - _HEAD_NODES)
    if kind == "branch":
        layer = 0
        for i in body:
            layer_of[i] = layer
            if len(inputs[i]) > 1:  # a join ends its layer
                layer += 1
    else:
        for i in body:
            layer_of[i] = (i - body.start) // layer_len
    return layer_of


def _with_costs(
    inputs: Sequence[Sequence[int]],
    layer_of: Sequence[int | None],
    rng: random.Random,
    device: DeviceSpec,
) -> OpGraph:
    n = len(inputs)
    template: dict[int, tuple[float, int, int]] = {}  # position in layer -> forward, out, param

    def fresh() -> tuple[float, int, int]:
        param = _log_uniform_bytes(rng, _MIB, 64 * _MIB) if rng.random() < 0.4 else 0
        return _log_uniform(rng, 2e-6, 2e-4), _log_uniform_bytes(rng, _MIB, 64 * _MIB), param

    nodes: dict[str, OpNode] = {}
    params: dict[str, int] = {}
    position = 0
    for i in range(n):
        layer = layer_of[i]
        position = position + 1 if i > 0 and layer == layer_of[i - 1] else 0
        if layer is None:
            forward_s, out_bytes, param_bytes = fresh()
            if i == 0:  # embedding table
                param_bytes = _log_uniform_bytes(rng, 64 * _MIB, 256 * _MIB)
            if i == n - 2:  # output head: the heaviest node
                forward_s *= 20
                param_bytes = _log_uniform_bytes(rng, 64 * _MIB, 256 * _MIB)
        else:
            forward_s, out_bytes, param_bytes = template.setdefault(position, fresh())
            forward_s *= rng.uniform(0.9, 1.1)
        if rng.random() < 0.005:
            forward_s *= 10  # a rare heavy node (a large matmul, an attention block)
        name = f"n{i}"
        node_params: tuple[str, ...] = ()
        if param_bytes:
            params[f"w{i}"] = param_bytes
            node_params = (f"w{i}",)
        reads = tuple(f"n{j}" for j in inputs[i])
        flops = round(forward_s * _FLOPS_PER_S)
        nodes[name] = OpNode(
            name=name,
            forward_s=forward_s,
            backward_s=2 * forward_s,
            flops=flops,
            backward_flops=2 * flops,
            output_bytes=out_bytes,
            inputs=reads,
            params=node_params,
            saved_from=reads if param_bytes else (),  # a matmul keeps its input for backward
            module=f"layers.{layer}.op{position}" if layer is not None else f"op{i}",
            module_type="Synthetic",
            layer=f"layers.{layer}" if layer is not None else None,
            is_output=i == n - 1,
        )
    return OpGraph(nodes, params, device=device)


def _log_uniform(rng: random.Random, lo: float, hi: float) -> float:
    return math.exp(rng.uniform(math.log(lo), math.log(hi)))


def _log_uniform_bytes(rng: random.Random, lo: int, hi: int) -> int:
    return round(_log_uniform(rng, lo, hi))


# ---------------------------------------------------------------------------------------------
# zoo graphs


def zoo_op_graph(name: str, device: str | DeviceSpec = "h100") -> OpGraph:
    """The op graph of zoo model ``name`` (default batch and sequence length, meta device), scaled
    to one sample per micro-batch."""
    from autopart.capture.tracing import trace
    from autopart.models.model_spec import load_model
    from autopart.passes.annotate import annotate

    loaded = load_model(name, device="meta")
    gm = annotate(trace(loaded.model, loaded.example_inputs, loaded.example_kwargs))
    args = loaded.example_inputs
    first = args[0] if isinstance(args, (tuple, list)) else args
    batch = int(first.shape[0])
    return OpGraph.from_graph_module(gm, get_device(device)).scaled(1.0 / batch)


# ---------------------------------------------------------------------------------------------
# one case


def solve_case(
    og: OpGraph,
    num_stages: int,
    device: str | DeviceSpec = "h100",
    time_limit_s: float = 10.0,
    *,
    case: str = "custom",
    kind: str = "custom",
    max_blocks: int | None = None,
) -> dict[str, Any]:
    """Solve one case as the planner does and score it against the baselines: a row with the keys
    :data:`ROW_KEYS`."""
    spec = get_device(device)
    start = time.perf_counter()
    bg = coarsen(og, max_blocks=max_blocks or max(64, 24 * num_stages), num_stages=num_stages)
    coarsened = time.perf_counter()
    hint = baselines.chain_dp(bg, num_stages, spec)
    hinted = time.perf_counter()
    try:
        sol: StageSolution | None = solve_stages(
            bg,
            num_stages,
            spec,
            in_flight=[num_stages - s for s in range(num_stages)],  # 1F1B; memory is not limited
            state_bytes_per_param_byte=4.0,
            memory_limit_bytes=None,
            hint=hint,
            time_limit_s=time_limit_s,
        )
    except AutopartError:  # without a memory limit: no plan within the time limit
        sol = None  # reported as such, never replaced by the hint
    solved = time.perf_counter()
    nan = float("nan")
    bottleneck = max(stage_times_s(bg, sol.stage_of, num_stages, spec)) if sol else nan
    bound = lower_bound_s(bg, num_stages, spec, og)
    bound_time_s = time.perf_counter() - solved
    base = baselines.run_baselines(bg, num_stages, spec)
    row: dict[str, Any] = {
        "case": case,
        "kind": kind,
        "nodes": len(og.order),
        "blocks": len(bg.blocks),
        "stages": num_stages,
        "solver_status": sol.status if sol else NO_SOLUTION,
        "solve_s": solved - start,
        "coarsen_s": coarsened - start,
        "ilp_s": solved - hinted,
        "lower_bound_time_s": bound_time_s,
        "bottleneck_s": bottleneck,
        "lower_bound_s": bound,
        "gap": bottleneck / bound - 1 if bound > 0 else 0.0,
        "ilp_bound_s": sol.objective_bound_s if sol else nan,
        "equal_layers_s": base["equal_layers"].bottleneck_s,
        "equal_params_s": base["equal_params"].bottleneck_s,
        "chain_dp_s": base["chain_dp"].bottleneck_s,
    }
    for name in ("equal_layers", "equal_params", "chain_dp"):
        row[f"speedup_vs_{name}"] = row[f"{name}_s"] / bottleneck if bottleneck != 0 else 1.0
    assert tuple(row) == ROW_KEYS
    return row


# ---------------------------------------------------------------------------------------------
# the suite


def solver_suite(
    *,
    quick: bool = False,
    progress: Progress | None = None,
    time_limit_s: float = 10.0,
    device: str | DeviceSpec = "h100",
    seed: int = 0,
    synthetic_nodes: Sequence[int] | None = None,
    synthetic_stages: Sequence[int] | None = None,
    zoo_models: Sequence[str] | None = None,
    zoo_stages: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Rows (see :data:`ROW_KEYS`) for the zoo models at 2, 4 and 8 stages, then every synthetic
    kind at 100 to 20,000 nodes and 2 to 16 stages (``quick``: fewer models, sizes and stage
    counts). Each grid can be overridden (an empty one skips that part)."""
    nodes = _pick(synthetic_nodes, QUICK_NODES if quick else SYNTHETIC_NODES)
    stages = _pick(synthetic_stages, QUICK_STAGES if quick else SYNTHETIC_STAGES)
    models = _pick(zoo_models, QUICK_ZOO if quick else ZOO_MODELS)
    model_stages = _pick(zoo_stages, ZOO_STAGES)
    cases: list[tuple[str, str, Callable[[], OpGraph], int]] = []
    for model in models:
        build = _zoo_builder(model, device)
        cases.extend((model, "zoo", build, p) for p in model_stages)
    for shape in SYNTHETIC_KINDS:
        for n in nodes:
            build = _synthetic_builder(shape, n, seed, device)
            cases.extend((f"{shape}-{n}", shape, build, p) for p in stages)
    say = progress or (lambda _done, _total, _label: None)
    graphs: dict[str, OpGraph] = {}
    rows = []
    for i, (case, kind, build, p) in enumerate(cases):
        say(i, len(cases), f"{case}, {p} stages")
        if case not in graphs:
            graphs.clear()  # one graph alive at a time: cases of a graph are consecutive
            graphs[case] = build()
        rows.append(solve_case(graphs[case], p, device, time_limit_s, case=case, kind=kind))
    say(len(cases), len(cases), "done")
    return rows


def _pick(given: Sequence[Any] | None, default: Sequence[Any]) -> Sequence[Any]:
    return default if given is None else given


def _zoo_builder(name: str, device: str | DeviceSpec) -> Callable[[], OpGraph]:
    return lambda: zoo_op_graph(name, device)


def _synthetic_builder(
    kind: SyntheticKind, n: int, seed: int, device: str | DeviceSpec
) -> Callable[[], OpGraph]:
    return lambda: synthetic_op_graph(kind, n, seed=seed, device=device)


# ---------------------------------------------------------------------------------------------
# output


_COLUMNS: tuple[tuple[str, str, str], ...] = (
    # header, key, format
    ("case", "case", "{}"),
    ("nodes", "nodes", "{:,}"),
    ("blocks", "blocks", "{}"),
    ("stages", "stages", "{}"),
    ("status", "solver_status", "{}"),
    ("solve s", "solve_s", "{:.2f}"),
    ("ILP s", "ilp_s", "{:.2f}"),
    ("bound s", "lower_bound_time_s", "{:.2f}"),
    ("bottleneck ms", "bottleneck_s", "ms"),
    ("lower bound ms", "lower_bound_s", "ms"),
    ("gap", "gap", "{:.2%}"),
    ("equal layers ms", "equal_layers_s", "ms"),
    ("equal params ms", "equal_params_s", "ms"),
    ("chain DP ms", "chain_dp_s", "ms"),
    ("vs layers", "speedup_vs_equal_layers", "{:.2f}x"),
    ("vs params", "speedup_vs_equal_params", "{:.2f}x"),
    ("vs chain DP", "speedup_vs_chain_dp", "{:.3f}x"),
)


def format_rows_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table of ``rows`` (plan times in milliseconds per micro-batch; a NaN or ``None``
    shows as a dash)."""
    lines = [
        "| " + " | ".join(h for h, _, _ in _COLUMNS) + " |",
        "|"
        + "|".join(
            "---" if f == "{}" and k in ("case", "solver_status") else "---:"
            for _, k, f in _COLUMNS
        )
        + "|",
    ]
    for row in rows:
        cells = []
        for _, key, fmt in _COLUMNS:
            value = row[key]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                cells.append("—")
            else:
                cells.append(f"{value * 1e3:.4g}" if fmt == "ms" else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
