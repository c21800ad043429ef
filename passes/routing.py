"""Mixture-of-experts routing: what the cost model charges for sizes known only at run time.

A token-choice MoE layer sends each token to ``k`` of its ``E`` experts. Captured with
``torch.export``, the routing takes one of two forms, and neither bakes in how the tracing batch
routed:

- **per-expert index ops** (a plain PyTorch MoE: ``torch.where(indices == e)`` then
  ``tokens[token]``): the number of tokens an expert receives is an *unbacked* symbolic size
  (``u0``, ``u1``, ...), bound by the op that computes it (``node.meta["unbacked_bindings"]``);
- **grouped kernels** (Hugging Face's ``grouped_mm`` experts: ``aten._grouped_mm`` or the
  ``transformers::grouped_mm_fallback`` custom op): all ``T * k`` routed rows sorted by expert and
  multiplied in one opaque call whose per-expert offsets are a tensor. Its shapes are static and
  its FLOPs are exact for any routing (``2 * T * k * d_in * d_out``); :func:`grouped_mm_formulas`
  gives ``FlopCounterMode`` the formulas it lacks.

An unbacked size is charged at the *expected* routing: an expert receives ``T * k / E`` tokens on
average (``T * k`` choices spread over ``E`` experts), times ``imbalance`` (>= 1 charges every
expert as if it got that many times its fair share; the default, 1.0, is the mean), at most the
``T`` tokens there are. Summed over experts this is ``T * k`` at imbalance 1, which is also what
``FlopCounterMode`` counts on the eager model for *any* routing (every routed token visits one
expert), so predicted and counted expert FLOPs agree whenever ``T * k`` divides by ``E``.

:func:`expect_routing` finds each unbacked size, traces it back to the ``torch.topk`` whose choices
it counts, and records the expected value; :func:`expected_val` is a node's value with those sizes
filled in, which the annotation pass replays. A size that does not count top-k choices is an error:
autopart never guesses a shape.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sympy  # type: ignore[import-untyped]
import torch
from torch.fx import GraphModule, Node
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols, has_free_unbacked_symbols

from autopart.errors import AutopartError

__all__ = [
    "DEFAULT_IMBALANCE",
    "ExpertGroup",
    "ExpertRouting",
    "RoutingError",
    "check_imbalance",
    "costed_experts",
    "defines_sizes",
    "expect_routing",
    "expected_val",
    "expert_groups",
    "grouped_mm_formulas",
    "imbalance_of",
    "moe_layers",
    "routed",
    "routing_of",
]

DEFAULT_IMBALANCE = 1.0
"""Each expert is charged its mean share of the routed tokens (``T * k / E``)."""

_TOPK = torch.ops.aten.topk.default
_MAX_HOPS = 8  # from a routing count back to its top-k: eq / any / where / nonzero chains are short


class RoutingError(AutopartError):
    """A size known only at run time that autopart cannot cost."""


@dataclass(frozen=True, slots=True)
class ExpertRouting:
    """How a graph's data-dependent expert sizes were costed (``gm.meta["autopart_routing"]``)."""

    imbalance: float
    tokens_per_expert: dict[str, int]
    """Each unbacked size (``"u0"``) -> the tokens charged for it."""
    grouped_calls: int
    """Grouped expert matmuls (static shapes: every routed row, exact for any routing)."""

    def describe(self) -> str:
        """One line for a plan: how the experts were costed."""
        parts = []
        if self.tokens_per_expert:
            counts = sorted(set(self.tokens_per_expert.values()))
            parts.append(
                f"{len(self.tokens_per_expert)} per-expert token counts charged at the expected "
                f"routing T*k/E x imbalance {self.imbalance:g} = {', '.join(map(str, counts))} "
                "tokens"
            )
        if self.grouped_calls:
            parts.append(
                f"{self.grouped_calls} grouped expert matmuls charged for all T*k routed rows "
                "(exact for any routing)"
            )
        return "; ".join(parts) if parts else "no experts"

    @property
    def routes(self) -> bool:
        """Whether the graph has routed experts at all (a plan then says how it costed them)."""
        return bool(self.tokens_per_expert or self.grouped_calls)


def check_imbalance(value: object) -> float:
    """``value`` as an expert imbalance factor: a finite number >= 1. Below 1 every expert would
    be charged less than its mean share, so the experts together would get fewer than the
    ``T * k`` rows that every routing sends them: a plan too optimistic for any batch."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if number is None or not (math.isfinite(number) and number >= 1.0):
        raise RoutingError(
            f"the expert imbalance factor must be >= 1 and finite (1 charges each expert "
            f"its mean share T*k/E of the routed tokens, 2 twice that), got {value!r}; use "
            "--expert-imbalance 1 or more."
        )
    return float(number)


def defines_sizes(node: Node) -> bool:
    """Whether ``node`` computes a size known only at run time (``torch.where(mask)``, ...)."""
    return bool(node.meta.get("unbacked_bindings"))


def expect_routing(gm: GraphModule, imbalance: float = DEFAULT_IMBALANCE) -> ExpertRouting:
    """Record the expected value of every unbacked size of ``gm`` in ``gm.meta["autopart_sizes"]``
    and the summary in ``gm.meta["autopart_routing"]``; returns the summary."""
    imbalance = check_imbalance(imbalance)
    sizes: dict[sympy.Symbol, int] = {}
    for node in gm.graph.nodes:
        for symbol in node.meta.get("unbacked_bindings") or {}:
            sizes[symbol] = _expected_tokens(node, imbalance)
    formulas = grouped_mm_formulas()
    grouped = sum(1 for n in gm.graph.nodes if _packet(n) in formulas)
    gm.meta["autopart_sizes"] = sizes
    routing = ExpertRouting(imbalance, {str(s): v for s, v in sizes.items()}, grouped)
    gm.meta["autopart_routing"] = routing
    return routing


def routing_of(gm: GraphModule) -> ExpertRouting | None:
    """The routing summary :func:`expect_routing` recorded (None: never run on ``gm``)."""
    routing = gm.meta.get("autopart_routing")
    return routing if isinstance(routing, ExpertRouting) else None


def imbalance_of(gm: GraphModule) -> float:
    """The imbalance factor ``gm`` was annotated with (the default when it never was): a graph
    traced again from the same model (one micro-batch's) is annotated with the same."""
    routing = routing_of(gm)
    return routing.imbalance if routing is not None else DEFAULT_IMBALANCE


def costed_experts(gm: GraphModule, imbalance: float) -> str:
    """What a plan of ``gm`` says about its experts (:meth:`ExpertRouting.describe`; empty when
    the model routes none). Raises :class:`RoutingError` when ``gm``'s per-expert sizes were
    charged at another imbalance factor than the plan is asked for."""
    routing = routing_of(gm)
    if routing is None or not routing.routes:
        return ""
    if routing.tokens_per_expert and routing.imbalance != imbalance:
        raise RoutingError(
            f"the graph's experts were costed at imbalance {routing.imbalance:g}, but the plan "
            f"asks for {imbalance:g}; annotate the graph with "
            f"annotate(gm, expert_imbalance={imbalance:g}) before planning it."
        )
    return routing.describe()


def expected_val(node: Node) -> Any:
    """``node.meta["val"]`` with every unbacked size replaced by its expected value: a meta tensor
    (or int, bool, or a list of them) the annotation pass can replay."""
    val = node.meta.get("val")
    owner = node.graph.owning_module
    sizes = owner.meta.get("autopart_sizes") if owner is not None else None
    if not sizes:
        return val
    return _concrete(val, sizes)


def _concrete(val: Any, sizes: Mapping[sympy.Symbol, int]) -> Any:
    if isinstance(val, torch.Tensor):
        if not any(isinstance(d, torch.SymInt) for d in (*val.shape, *val.stride())):
            return val
        shape = [_int(d, sizes) for d in val.shape]
        stride = [_int(d, sizes) for d in val.stride()]
        return torch.empty_strided(shape, stride, dtype=val.dtype, device="meta")
    if isinstance(val, (torch.SymInt, torch.SymBool, torch.SymFloat)):
        value = sympy.sympify(val.node.expr.xreplace(sizes))
        return bool(value) if isinstance(val, torch.SymBool) else _number(value, val)
    if isinstance(val, (list, tuple)):
        return type(val)(_concrete(v, sizes) for v in val)
    return val


def _int(dim: int | torch.SymInt, sizes: Mapping[sympy.Symbol, int]) -> int:
    return int(_concrete(dim, sizes)) if isinstance(dim, torch.SymInt) else dim


def _number(expr: sympy.Expr, val: Any) -> int | float:
    if expr.free_symbols:
        raise RoutingError(
            f"the size {val} depends on {sorted(map(str, expr.free_symbols))}, which autopart has "
            "no expected value for; trace with static example shapes."
        )
    return float(expr) if isinstance(val, torch.SymFloat) else int(expr)


def moe_layers(gm: GraphModule) -> list[tuple[Node, ...]]:
    """Each MoE layer of ``gm`` as the run of nodes (graph order) of the smallest module holding
    its router's top-k and its experts (per-expert sizes, grouped matmuls): what one pipeline
    stage keeps whole, so no value sized by the routing crosses a stage boundary."""
    formulas = grouped_mm_formulas()
    members: dict[Node, list[Node]] = {}
    for node in gm.graph.nodes:
        if defines_sizes(node) or _packet(node) in formulas:
            topk = _routing_topk(node)
            if topk is not None:
                members.setdefault(topk, [topk]).append(node)
    order = list(gm.graph.nodes)
    layers = []
    for nodes in members.values():
        prefix = _common_module(nodes)
        inside = [i for i, n in enumerate(order) if prefix and _within(n, prefix)]
        span = inside or [order.index(n) for n in nodes]
        layers.append(tuple(order[min(span) : max(span) + 1]))
    return layers


def routed(node: Node) -> bool:
    """Whether ``node`` computes, carries or reads a size known only at run time (an expert's
    tokens)."""
    values = [node, *node.all_input_nodes]
    return defines_sizes(node) or any(has_free_unbacked_symbols(n.meta.get("val")) for n in values)


@dataclass(frozen=True, slots=True)
class ExpertGroup:
    """The per-expert nodes of one MoE layer: the experts' own modules, the ops that pick and
    scatter back each expert's tokens, and what feeds only them."""

    module: str
    """``model.layers.0.mlp.experts.*`` (the experts' module list), or the layer's module."""
    experts: int
    nodes: tuple[Node, ...]
    """In graph order."""


def expert_groups(gm: GraphModule) -> list[ExpertGroup]:
    """One :class:`ExpertGroup` per MoE layer that runs its experts one by one (a per-expert loop;
    a grouped matmul is one node already), in graph order. A node is one expert's when it lies in
    an expert module (``experts.3``), touches that expert's routed size, or feeds only that
    expert (the mask ``indices == 3``); the router and what all experts share are not."""
    groups = []
    for layer in moe_layers(gm):
        prefix = _common_module(list(layer))
        lists = {n: _expert_list(_module_path(n), prefix) for n in layer}
        owner = {n: _expert_of(n, lists[n]) for n in layer if lists[n] is not None or routed(n)}
        for node in reversed(layer):
            users = {owner.get(u) for u in node.users}
            if node not in owner and len(users) == 1 and None not in users:
                owner[node] = users.pop()
        if not owner:
            continue
        found = {found for n in layer if (found := lists[n]) is not None}
        experts = len(found) or len({o for o in owner.values()})
        module = f"{min(found)[0]}.*" if found else prefix
        groups.append(ExpertGroup(module, experts, tuple(n for n in layer if n in owner)))
    return groups


def _expert_of(node: Node, expert: tuple[str, int] | None) -> Any:
    """Which expert ``node`` works for: its expert module, else the routed sizes it touches."""
    if expert is not None:
        return expert
    values = [node.meta.get("val"), *(n.meta.get("val") for n in node.all_input_nodes)]
    return frozenset(str(s) for v in values for s in free_unbacked_symbols(v))


def _expert_list(path: str, prefix: str) -> tuple[str, int] | None:
    """``(module list, index)`` of an expert module under the layer ``prefix``
    (``model.layers.0.mlp.experts.3.up_proj`` -> ``("model.layers.0.mlp.experts", 3)``)."""
    if not prefix or not path.startswith(prefix + "."):
        return None
    parts = path[len(prefix) + 1 :].split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit():
            return ".".join([prefix, *parts[:i]]), int(part)
    return None


def _module_path(node: Node) -> str:
    ref = node.meta.get("autopart_module")
    return ref.path if ref is not None else ""


def _within(node: Node, prefix: str) -> bool:
    path = _module_path(node)
    return path == prefix or path.startswith(prefix + ".")


def _common_module(nodes: list[Node]) -> str:
    paths = [_module_path(n).split(".") for n in nodes]
    common = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    return ".".join(common)


def _expected_tokens(node: Node, imbalance: float) -> int:
    """Tokens charged for the size ``node`` binds: the mean share of the top-k it counts."""
    topk = _routing_topk(node)
    if topk is None:
        raise RoutingError(
            f"node {node.name!r} ({node.target}) computes a size known only at run time that "
            "does not count tokens routed by torch.topk, so autopart cannot cost what follows "
            "it. Keep shapes static there (e.g. torch.where(mask, x, 0) instead of x[mask]), "
            "or route with torch.topk."
        )
    dim: Any = topk.args[2] if len(topk.args) > 2 else -1
    choices = topk.meta["val"][1]  # the chosen indices: k along dim, one row per token
    k = choices.shape[dim]
    tokens = choices.numel() // k
    experts = topk.all_input_nodes[0].meta["val"].shape[dim]
    return min(tokens, math.ceil(tokens * k / int(experts) * imbalance))


def _routing_topk(node: Node) -> Node | None:
    """The ``torch.topk`` whose choices ``node`` counts (an ancestor within a few ops)."""
    frontier, seen = [node], {node}
    for _ in range(_MAX_HOPS):
        frontier = [n for f in frontier for n in f.all_input_nodes if n not in seen]
        seen.update(frontier)
        for n in frontier:
            if n.target is _TOPK:
                return n
            if n.op == "call_function" and n.target.__name__ == "getitem":  # type: ignore[union-attr]
                source = n.args[0]
                if isinstance(source, Node) and source.target is _TOPK and n.args[1] == 1:
                    return source
    return None


def _packet(node: Node) -> Any:
    return getattr(node.target, "_overloadpacket", None)


def _grouped_mm_flops(input_shape: torch.Size, weight_shape: torch.Size, *_: Any, **__: Any) -> int:
    """(S, d_in) rows against (E, d_in, d_out) experts: each row meets one expert."""
    rows, d_in = input_shape
    return 2 * rows * d_in * weight_shape[-1]


def _grouped_mm_backward_flops(
    input_shape: torch.Size, weight_shape: torch.Size, *_: Any, **__: Any
) -> int:
    return 2 * _grouped_mm_flops(input_shape, weight_shape)  # grad of the rows and of the experts


def grouped_mm_formulas() -> dict[Any, Any]:
    """``FlopCounterMode(custom_mapping=...)`` formulas for grouped expert matmuls, by op packet
    (transformers' op is there once transformers' MoE code has been imported)."""
    formulas: dict[Any, Any] = {torch.ops.aten._grouped_mm: _grouped_mm_flops}
    namespace = torch.ops.transformers
    if hasattr(namespace, "grouped_mm_fallback"):
        formulas[namespace.grouped_mm_fallback] = _grouped_mm_flops
        formulas[namespace.grouped_mm_fallback_backward] = _grouped_mm_backward_flops
    return formulas
