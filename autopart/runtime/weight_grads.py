"""Which stages torch's split backward (zero-bubble schedules) would leave without some weight
gradients, so that they compute them with their input gradients instead.

A zero-bubble schedule runs a stage's backward in two passes: ``I`` computes the input gradients,
``W`` later the weight gradients. torch's ``stage_backward_input`` finds what ``W`` needs
(``get_param_groups``) where a parameter's value meets, on its way to the outputs, a value computed
from an input that needs a gradient. A parameter whose path meets none (an embedding on a stage whose
inputs are only masks and token ids) is in no group, and its gradient is silently never computed.
torch's first stage is exempt: its ``W`` runs the whole backward. For the others,
``PipelineStage(dw_builder=...)`` makes ``I`` the whole backward and ``W`` empty
(``no_weight_pass`` in the emitted ``run.py``), which is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["stages_keeping_weight_grads", "weight_grads_split_off"]


def weight_grads_split_off(stage: torch.fx.GraphModule, inputs_need_grad: Sequence[bool]) -> bool:
    """Whether every trainable parameter of ``stage`` reaches, on its way to the outputs, a value
    computed from one of its inputs flagged in ``inputs_need_grad`` (one flag per placeholder)."""
    nodes = list(stage.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    tainted = {p for p, needs in zip(placeholders, inputs_need_grad) if needs}
    for n in nodes:
        if n.op not in ("placeholder", "get_attr") and any(a in tainted for a in n.all_input_nodes):
            tainted.add(n)
    reach: set[torch.fx.Node] = set()
    for n in reversed(nodes):
        if n in tainted or any(u in reach for u in n.users):
            reach.add(n)
    trainable = {name for name, p in stage.named_parameters() if p.requires_grad}
    return all(
        n in reach and _inside_split_off(stage, n, tainted) for n in nodes if _uses(n, trainable)
    )


def _inside_split_off(
    stage: torch.fx.GraphModule, node: torch.fx.Node, tainted: set[torch.fx.Node]
) -> bool:
    """For a call of a submodule that is a graph itself (a layer's FSDP unit), whether its own
    parameters are split off given which of its inputs are computed from a stage input."""
    if node.op != "call_module":
        return True
    sub = stage.get_submodule(str(node.target))
    if not isinstance(sub, torch.fx.GraphModule):
        return True
    return weight_grads_split_off(sub, [a in tainted for a in node.args])


def _uses(node: torch.fx.Node, trainable: set[str]) -> bool:
    """Whether ``node`` is a trainable parameter, or calls a submodule that holds one."""
    if node.op == "get_attr":
        return node.target in trainable
    prefix = f"{node.target}."
    return node.op == "call_module" and any(name.startswith(prefix) for name in trainable)


def stages_keeping_weight_grads(
    stages: Mapping[int, torch.fx.GraphModule], inputs_need_grad: Mapping[int, Sequence[bool]]
) -> list[int]:
    """The stages (by index, the first excepted) whose weight gradients must be computed with
    their input gradients under a zero-bubble schedule."""
    return sorted(
        k
        for k, stage in stages.items()
        if k > 0 and not weight_grads_split_off(stage, inputs_need_grad[k])
    )
