"""What the TP ILP reads from a graph besides costs: its repeated layers (to share decisions),
Megatron-LM's hand-written assignment of their matmuls (found by module names), and explanations
of the nodes a TP degree leaves unsplit."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch.fx import GraphModule, Node

from autopart.passes.tp.placements import Strategy
from autopart.passes.tp.rules import op_name
from autopart.passes.tp.strategies import weight_matmuls
from autopart.planning.graph import detect_layers

__all__ = ["Layers", "fallbacks", "layer_of_nodes", "megatron_sharding"]

# fmt: off
_COL_NAMES = frozenset({
    # attention input projections (separate or fused), MLP up / gate projections
    "q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query", "key", "value", "qkv",
    "query_key_value", "Wqkv", "in_proj", "gate_proj", "up_proj", "gate_up_proj", "c_fc", "fc1",
    "w1", "w3", "dense_h_to_4h", "wi", "wi_0", "wi_1", "lin1",
})
_ROW_NAMES = frozenset({
    # attention output projections, MLP down projections
    "o_proj", "out_proj", "c_proj", "dense", "fc2", "w2", "down_proj", "dense_4h_to_h", "wo",
    "lin2", "proj",
})
# fmt: on


def megatron_sharding(gm: GraphModule) -> dict[str, str]:
    """Megatron's assignment of the weight matmuls inside repeated layers: the attention's input
    projections (q, k, v or a fused qkv) and the MLP's up / gate projections column-parallel, the
    attention output and MLP down projections row-parallel, found by module names (GPT-2, Llama,
    BERT, NeoX, T5 naming); in layers whose names say nothing, matmuls alternate col, row in graph
    order (Megatron's MLP pairing). Matmuls outside repeated layers are not listed."""
    layer_of = layer_of_nodes(gm)
    by_name = {n.name: n for n in gm.graph.nodes}
    found: dict[str, str] = {}
    unnamed: list[str] = []
    for name in weight_matmuls(gm):
        node = by_name[name]
        if layer_of.get(node) is None:
            continue
        ref = node.meta.get("autopart_module")
        leaf = str(getattr(ref, "path", "")).rsplit(".", 1)[-1]
        if leaf in _COL_NAMES:
            found[name] = "col"
        elif leaf in _ROW_NAMES:
            found[name] = "row"
        else:
            unnamed.append(name)
    for i, name in enumerate(unnamed):
        found[name] = "col" if i % 2 == 0 else "row"
    return {n: found[n] for n in weight_matmuls(gm) if n in found}


def layer_of_nodes(gm: GraphModule) -> dict[Node, str]:
    """The repeated layer (``model.layers.3``) of every node inside one; parameters by their path."""
    module_types: dict[str, str] = {}
    for n in gm.graph.nodes:
        ref = n.meta.get("autopart_module")
        if ref is not None:
            module_types.setdefault(ref.path, ref.type_name)
    for path in list(module_types):
        parts = path.split(".")
        for i in range(1, len(parts)):
            module_types.setdefault(".".join(parts[:i]), "")
    layers = detect_layers(module_types)
    out: dict[Node, str] = {}
    for n in gm.graph.nodes:
        ref = n.meta.get("autopart_module")
        path = str(n.target).rsplit(".", 1)[0] if n.op == "get_attr" else getattr(ref, "path", "")
        parts = path.split(".") if path else []
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in layers:
                out[n] = prefix
                break
    return out


@dataclass(frozen=True, slots=True)
class Layers:
    """The repeated layers of a graph: each layer's nodes in graph order, by list (``model.layers``)
    and index, and a signature of what each layer computes."""

    layer_of: dict[Node, str]
    lists: dict[str, list[list[Node]]]
    signatures: dict[str, int]

    @staticmethod
    def of(gm: GraphModule) -> Layers:
        layer_of = layer_of_nodes(gm)
        members: dict[str, list[Node]] = {}
        for n in gm.graph.nodes:
            if n in layer_of:
                members.setdefault(layer_of[n], []).append(n)
        by_list: dict[str, list[str]] = {}
        for path in members:
            by_list.setdefault(path.rpartition(".")[0], []).append(path)
        lists = {
            prefix: [members[p] for p in sorted(paths, key=lambda p: int(p.rpartition(".")[2]))]
            for prefix, paths in by_list.items()
        }
        ids: dict[tuple[Any, ...], int] = {}  # equal signatures, equal small ids
        signatures = {
            path: ids.setdefault(_layer_signature(nodes, path), len(ids))
            for path, nodes in members.items()
        }
        return Layers(layer_of, lists, signatures)

    def has_middle(self) -> bool:
        """Whether some list has layers between its first and last (grouping pays)."""
        return any(len(layers) >= 4 for layers in self.lists.values())

    def decision_keys(self, period: int) -> dict[Node, Any]:
        """A shared key for the nodes at the same position of identical layers (all but the first
        and last layer of each list; identical: same ops, arguments and shapes); with
        ``period=2`` even and odd layers get separate keys."""
        keys: dict[Node, Any] = {}
        for prefix, layers in self.lists.items():
            for i, nodes in enumerate(layers[1:-1], start=1):
                sig = self.signatures[self.layer_of[nodes[0]]]
                for pos, n in enumerate(nodes):
                    keys[n] = (prefix, sig, (i - 1) % period, pos)
        return keys


def _shape_key(val: Any) -> tuple[Any, ...]:
    # a size known only at run time (u0: tokens routed to an expert) by name: SymInts never hash
    return tuple(str(d) for d in getattr(val, "shape", ()))


def _layer_signature(nodes: list[Node], path: str) -> tuple[Any, ...]:
    """What a layer computes, with its own nodes by position (so layer 5 and layer 6 read alike)
    and outside inputs by shape."""
    pos = {n: i for i, n in enumerate(nodes)}

    def ref(a: Any) -> Any:
        if isinstance(a, Node):
            if a in pos:
                return ("in", pos[a])
            val = a.meta.get("val")
            return ("out", _shape_key(val), str(getattr(val, "dtype", "")))
        if isinstance(a, (list, tuple)):
            return tuple(ref(x) for x in a)
        if isinstance(a, dict):
            return tuple((k, ref(v)) for k, v in a.items())
        return repr(a)

    items = []
    for n in nodes:
        val = n.meta.get("val")
        target = str(n.target)[len(path) :] if n.op == "get_attr" else str(n.target)
        shape = _shape_key(val)
        items.append((n.op, target, shape, ref(n.args), ref(n.kwargs)))
    return tuple(items)


def fallbacks(
    gm: GraphModule, chosen: Mapping[Node, Strategy], reasons_of: Mapping[str, tuple[str, ...]]
) -> dict[str, str]:
    """Nodes left unsplit while a size the degree does not divide blocks their split: replicated
    weight matmuls and attention, with the reasons found in themselves or on the path their split
    would take (the ops of the same module around them, up to the neighbouring matmuls and norms);
    and reshapes that cannot keep a split (hidden -> heads)."""
    matmuls = weight_matmuls(gm)
    out: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or chosen[node].output.is_shard:
            continue
        op = op_name(node)
        if node.name in matmuls or op == "scaled_dot_product_attention":
            if chosen[node].label != "replicate":
                continue
            around = _path_nodes(node, matmuls)
        elif op in _RESHAPE_OPS:
            around = []
        else:
            continue
        reasons = [f"{node.name}: {r}" for r in reasons_of.get(node.name, ())]
        for neighbour in around:
            reasons += [f"{neighbour.name}: {r}" for r in reasons_of.get(neighbour.name, ())]
        if reasons:
            out[node.name] = "not split: " + "; ".join(dict.fromkeys(reasons))
    return out


_RESHAPE_OPS = frozenset({"view", "reshape", "_unsafe_view", "unflatten", "flatten"})
_STOP_OPS = frozenset({"layer_norm", "rms_norm", "native_layer_norm", "mean", "embedding"})


def _path_nodes(node: Node, matmuls: Mapping[str, str], depth: int = 10) -> list[Node]:
    """The computing nodes around ``node`` that its split would pass through: users and inputs
    inside the module that holds ``node`` (its parent module), up to other weight matmuls and
    normalisations, which are not entered."""
    ref = node.meta.get("autopart_module")
    path = str(getattr(ref, "path", ""))
    scope = path.rpartition(".")[0] if node.name in matmuls else path
    found: list[Node] = []
    for step in ("users", "inputs"):
        frontier, seen = [node], {node}
        for _ in range(depth):
            nxt = []
            for n in frontier:
                for w in list(n.users) if step == "users" else n.all_input_nodes:
                    if w in seen or w.op != "call_function" or w.name in matmuls:
                        continue
                    seen.add(w)
                    w_path = str(getattr(w.meta.get("autopart_module"), "path", ""))
                    if scope and not (w_path == scope or w_path.startswith(scope + ".")):
                        continue
                    if op_name(w) in _STOP_OPS:
                        continue
                    found.append(w)
                    nxt.append(w)
            frontier = nxt
    return found
