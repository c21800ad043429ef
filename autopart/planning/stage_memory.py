"""What each pipeline stage holds besides its training state, as torch's pipelining runs it
(:func:`stage_memory`), and what of its training state it holds only from its first backward on
under FSDP2 (:func:`deferred_state`). :func:`~autopart.planning.mesh_plan.simulate_blocks` hands both to
the schedule simulation, which orders them in time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from autopart.planning.blocks import Block
from autopart.planning.graph import BlockGraph
from autopart.planning.schedule import Deferred

__all__ = [
    "StageMemory",
    "deferred_state",
    "reserved_bytes",
    "stage_memory",
    "unit_param_bytes",
    "working_floor_bytes",
]


@dataclass(frozen=True, slots=True)
class StageMemory:
    """Per stage, the bytes :func:`~autopart.planning.schedule.simulate` counts besides the
    training state (:func:`stage_memory`)."""

    kept: list[int]
    """Per micro-batch in flight, from its forward to the end of its backward."""
    working: list[int]
    """Held while a backward runs, on top of what is kept."""
    buffers: list[int]
    """Held all step."""


def reserved_bytes(scaled: BlockGraph, ranks: Sequence[int], in_flight: Sequence[int]) -> list[int]:
    """Per device, what :func:`stage_memory` adds there under any split of ``scaled`` (costs of
    one micro-batch) into the stages of ``ranks`` (``ranks[s]``: the device of stage ``s``) with
    ``in_flight[s]`` micro-batches in flight, besides what the stage ILP counts itself (the bytes
    each split sends, ``solve_stages(micro_batches=)``, and each block's working set): the loss
    the last stage keeps. The stage ILP holds it back, so each split it finds fits the
    simulation's accounting too."""
    return [in_flight[-1] * b for b in working_floor_bytes(scaled, ranks)]


def working_floor_bytes(scaled: BlockGraph, ranks: Sequence[int]) -> list[int]:
    """Per device, the least working set any split gives it (:func:`stage_memory`): the loss's
    backward on the last stage's device, for ``solve_stages(working_floor_bytes=)``."""
    out = [0] * (max(ranks) + 1)
    out[ranks[-1]] = _loss_bytes(scaled)
    return out


def _loss_bytes(scaled: BlockGraph) -> int:
    """Two output-sized tensors, charged as cross-entropy holds them: the model's outputs and
    their log-probabilities kept per micro-batch, and the two gradients of its backward."""
    return 2 * sum(b.graph_output_bytes for b in scaled.blocks)


def stage_memory(
    scaled: BlockGraph, stage_of: Sequence[int], num_stages: int, micro_batches: int
) -> StageMemory:
    """What each stage of ``scaled`` (costs of one micro-batch) holds as torch's pipelining runs
    it, besides parameters, gradients and optimizer state:

    - kept per micro-batch in flight: the values its nodes save for backward (each once per
      stage, :meth:`BlockGraph.stage_activation_bytes`), the outputs it sends on, which the
      pipeline keeps until the backward, and on the last stage the model's outputs and what the
      loss saves from them, charged as cross-entropy does (its log-probabilities, one
      output-sized tensor);
    - working: the most gradient bytes one node's backward holds (:func:`_working_bytes`: its
      output's and inputs' gradients, and its weights' new gradient) beyond what the backward
      has already freed of the micro-batch's kept values: by the time a block's backward runs,
      the blocks after it on the stage have run theirs and freed what they alone save (a value
      several blocks save is charged to its first saver, so never counted as freed early, nor
      is a received value, which is the stage's receive buffer, nor what a recomputed block
      keeps, its inputs, which other blocks may keep too); on
      the last stage at least the loss's backward (the gradients of its log-probabilities and
      of the outputs), which runs before any;
    - buffers: the receive buffers the pipeline allocates per micro-batch, for the activations
      coming in and the gradients coming back, kept from step to step."""
    kept = scaled.stage_activation_bytes(stage_of, num_stages)
    boundary = [0, *scaled.boundary_bytes(stage_of, num_stages), 0]  # into stage s: boundary[s]
    working = [0] * num_stages
    saves: list[set[str]] = [set() for _ in range(num_stages)]
    kept_values: list[set[str]] = [set() for _ in range(num_stages)]  # saved, not recomputed
    received = _received(scaled, stage_of, num_stages)
    for _, s, held in _backward_sweep(scaled, stage_of, num_stages, micro_batches, received):
        working[s] = max(working[s], held)
    for b, s in zip(scaled.blocks, stage_of):
        saves[s].update(b.saved_values)
        if not b.recomputed:
            kept_values[s].update(b.saved_values)
    for t in scaled.tensors:
        first, last = stage_of[t.producer], max(stage_of[c] for c in t.consumers)
        for s in range(first, last):  # sent on (a skip tensor by every stage it passes)
            kept[s] += 0 if t.name in saves[s] else t.nbytes  # unless saved
        # Received: torch hands the stage its receive buffer as the input, so a received value
        # the stage keeps (saved, or read by a block that recomputes and keeps its inputs) is
        # that buffer, counted with the buffers.
        for s in range(first + 1, last + 1):
            rerun = any(scaled.blocks[c].recomputed and stage_of[c] == s for c in t.consumers)
            kept[s] -= t.nbytes if t.name in kept_values[s] or rerun else 0
    last = num_stages - 1
    kept[last] += _loss_bytes(scaled)
    working[last] = max(working[last], _loss_bytes(scaled))
    buffers = [micro_batches * (boundary[s] + boundary[s + 1]) for s in range(num_stages)]
    return StageMemory(kept, working, buffers)


def _working_bytes(b: Block, micro_batches: int) -> int:
    """What one backward of ``b``'s nodes holds at once: the gradients of a node's output and
    inputs, and, where ``.grad`` already holds the step's earlier micro-batches (from the second
    on), the new gradient of its weights until autograd adds it in (``Block.param_grad_bytes``,
    counted with the largest activation gradients: an upper bound where they are two nodes')."""
    return b.backward_working_bytes + (b.param_grad_bytes if micro_batches > 1 else 0)


def _received(scaled: BlockGraph, stage_of: Sequence[int], num_stages: int) -> list[dict[str, int]]:
    """Per stage, the values it receives from earlier stages (its receive buffers), by name."""
    received = [dict[str, int]() for _ in range(num_stages)]
    for t in scaled.tensors:
        for s in range(stage_of[t.producer] + 1, max(stage_of[c] for c in t.consumers) + 1):
            received[s][t.name] = t.nbytes
    return received


def _backward_sweep(
    scaled: BlockGraph,
    stage_of: Sequence[int],
    num_stages: int,
    micro_batches: int,
    received: Sequence[Mapping[str, int]],
) -> list[tuple[Block, int, int]]:
    """Each block with its stage, last first (the order a stage's backward runs them), and what
    its backward holds beyond the micro-batch's kept values: its working set
    (:func:`_working_bytes`) less what the blocks after it on the stage have freed in theirs (what
    they alone save; not a received value, the stage's receive buffer, nor what a recomputed
    block keeps, its inputs, which other blocks may keep too)."""
    out = []
    freed = [0] * num_stages  # kept bytes the blocks after this one free in their backward
    for b, s in reversed(list(zip(scaled.blocks, stage_of))):
        out.append((b, s, _working_bytes(b, micro_batches) - freed[s]))
        if b.recomputed:  # keeps its inputs, which other blocks may read and keep too
            continue
        buffer = sum(received[s].get(v, 0) for v in b.saved_values)  # stays: a receive buffer
        freed[s] += max(0, b.activation_bytes - buffer)
    return out


def unit_param_bytes(
    scaled: BlockGraph, stage_of: Sequence[int], num_stages: int
) -> list[dict[str, int]]:
    """Per stage, the parameter bytes of each repeated layer on it, by the layer's module path
    (the parameters named under it): what the layer's FSDP2 unit holds
    (``passes/fsdp_units.py`` splits each layer of a stage into its own module at that path).
    Layers in the order the stage runs them."""
    params = scaled.stage_params(stage_of, num_stages)
    out: list[dict[str, int]] = [{} for _ in range(num_stages)]
    for b, s in zip(scaled.blocks, stage_of):
        if b.layer is not None and b.layer not in out[s]:
            prefix = b.layer + "."
            mine = [p for p in params[s] if p.startswith(prefix)]
            out[s][b.layer] = sum(scaled.param_bytes_by_name[p] for p in mine)
    return out


def _touched(b: Block, units: Mapping[str, int]) -> list[str]:
    """The layers among ``units`` whose parameters block ``b`` reads (a block of a coarse graph
    may hold the end of one layer and the start of the next), and its own layer."""
    return [
        layer
        for layer in units
        if layer == b.layer or any(p.startswith(f"{layer}.") for p in b.params)
    ]


def deferred_state(
    scaled: BlockGraph,
    stage_of: Sequence[int],
    num_stages: int,
    micro_batches: int,
    *,
    grad_per_byte: float,
    reshard: bool,
) -> Deferred:
    """What each stage of ``scaled`` (costs of one micro-batch) holds under FSDP2 only from its
    first backward on, as torch's pipelining runs it: its unsharded gradients, ``grad_per_byte``
    bytes per parameter byte (accumulated whole over the step's micro-batches until the reduction
    after its last backward, each allocated when the backward reaches its parameter) and, with
    ``reshard`` (each layer's unit resharded after its forward: GPipe, where every forward runs
    before the first backward), its layers' parameters, which that backward gathers again layer
    by layer and keeps (torch's pipelining turns resharding after backward off); the stage's own
    parameters, outside its layers, stay whole, as FSDP2 keeps a root's. Per stage:
    ``deferred``, all of that; ``forward``, with ``reshard``, its two largest layers' parameters
    (the one running and the next, which FSDP2 gathers ahead); ``first_backward``, what the first
    backward holds at most on top of the kept micro-batches: the gradients and layers it has
    reached, the next layer gathered ahead and the working set, less what it has freed."""
    units = unit_param_bytes(scaled, stage_of, num_stages) if reshard else [{}] * num_stages
    params = scaled.stage_params(stage_of, num_stages)
    sizes = scaled.param_bytes_by_name
    deferred = [
        round(grad_per_byte * sum(sizes[q] for q in params[s]) + sum(units[s].values()))
        for s in range(num_stages)
    ]
    forward = [sum(sorted(u.values())[-2:]) for u in units]
    first = [0] * num_stages
    grown = [0.0] * num_stages
    seen: list[set[str]] = [set() for _ in range(num_stages)]  # parameters reached
    done: list[set[str]] = [set() for _ in range(num_stages)]  # layers gathered
    received = _received(scaled, stage_of, num_stages)
    for b, s, held in _backward_sweep(scaled, stage_of, num_stages, micro_batches, received):
        new = [q for q in b.params if q not in seen[s]]
        seen[s].update(new)
        grown[s] += grad_per_byte * sum(sizes[q] for q in new)  # .grad as autograd reaches it
        for layer in _touched(b, units[s]):  # gathered as its backward reaches them
            if layer not in done[s]:
                done[s].add(layer)
                grown[s] += units[s][layer]
        pending = [nbytes for layer, nbytes in units[s].items() if layer not in done[s]]
        ahead = pending[-1] if pending else 0  # the backward's next layer, gathered ahead
        first[s] = max(first[s], round(grown[s]) + ahead + held)
    first[-1] = max(first[-1], _loss_bytes(scaled))  # the loss's backward runs before any block
    return Deferred(deferred, forward, first)
