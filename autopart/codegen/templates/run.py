"""Train the parallel program in this folder (written by autopart.emit; needs only torch).

    torchrun --nproc-per-node N run.py [--steps S] [--lr LR] [--losses-out losses.json]

N is "world_size" in config.json: the product of its "mesh" sizes dp x fsdp x pp x tp. The ranks
form a DeviceMesh of dims (dp, fsdp, pp, tp) (fsdp where the config has it), tp innermost, the
layout autopart's runtime uses. Every rank builds
the pipeline stages config.json gives its pp coordinate (stage_K.py, class StageK) on its device (a
GPU per rank with NCCL when CUDA is available, else the CPU with gloo), copies their parameters from
weights.pt (its own shard of each tensor a stage lists in SHARDED, with tensor parallelism), wraps
them in torch.distributed.pipelining's PipelineStage over the mesh's pp group and runs the plan's
schedule (GPipe, 1F1B, interleaved 1F1B, interleaved zero bubble, ZBV or DualPipeV) for S steps
of SGD. Each data-parallel replica (dp x fsdp of them) trains on its share of the batch in data.pt,
split into the plan's micro-batches; with dp > 1 each stage runs under torch's
DistributedDataParallel over the dp group, or, where the mesh has an fsdp dim, under torch's FSDP2
(fully_shard over fsdp, HSDP over (dp, fsdp)). With "precision": "bf16-mixed" FSDP2's
MixedPrecisionPolicy computes in bfloat16 over float32 master weights (the floating-point inputs
are cast to bfloat16, the loss sees float32 outputs). With "reshard_after_forward": true each
layer's FSDP2 unit is freed after each forward and gathered again by the next. Rank 0 prints the
mean loss of every step.

A parameter that several stages read (tied input and output embeddings) has a copy on each of them;
before every optimizer step the copies' gradients are summed (on the rank, then across the ranks of
the same (dp, tp) coordinate that hold a copy), so all copies take the same step and stay equal.

Files: config.json (read here), plan.json (the full plan, for reference), stage_K.py, loss.py
(the loss for the last stage), collectives.py (tensor parallelism only: the collectives the stages
call), weights.pt (whole parameters and buffers under the model's own names), data.pt
({"inputs": [...], "target": tensor}: one global batch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

HERE = Path(__file__).resolve().parent
SCHEDULES = {
    "gpipe": ScheduleGPipe,
    "1f1b": Schedule1F1B,
    "interleaved": ScheduleInterleaved1F1B,
    "interleaved-zb": ScheduleInterleavedZeroBubble,
    "zbv": ScheduleZBVZeroBubble,
    "dualpipev": ScheduleDualPipeV,
}
SPLIT_BACKWARD = ("interleaved-zb", "zbv", "dualpipev")
"""The schedules that run a backward as input gradients, then weight gradients."""


def main(argv: Sequence[str] | None = None) -> None:
    config = json.loads((HERE / "config.json").read_text())
    args = parse_args(argv, config)
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != config["world_size"]:
        sizes = " x ".join(f"{k}={v}" for k, v in config["mesh"].items())
        sys.exit(
            f"run.py: this program has {config['world_size']} ranks ({sizes}) but WORLD_SIZE is "
            f"{world or 'not set'}; launch it with "
            f"torchrun --nproc-per-node {config['world_size']} run.py"
        )
    device = init_distributed(args.device)
    try:
        train(config, args, device)
        dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def parse_args(argv: Sequence[str] | None, config: dict[str, Any]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--steps", type=int, default=config["steps"])
    parser.add_argument("--lr", type=float, default=config["lr"], help="SGD learning rate")
    parser.add_argument("--data", type=Path, default=HERE / "data.pt", help="batch and target")
    parser.add_argument("--losses-out", type=Path, help="write every step's loss here (JSON)")
    parser.add_argument(
        "--save-weights",
        type=Path,
        help="write the trained model's state dict here (torch.save: the keys of the model's "
        "state_dict() in its order, tied aliases and persistent buffers included, whole tensors; "
        "load with model.load_state_dict(torch.load(path)))",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser.parse_args(argv)


def init_distributed(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


class Place:
    """This rank's coordinates in the (dp, fsdp, pp, tp) mesh and the process groups it talks
    over. ``sharded``: the config's mesh has an fsdp dim, so FSDP2 holds the stages."""

    def __init__(self, config: dict[str, Any], device: torch.device) -> None:
        sizes = config["mesh"]
        self.sharded = "fsdp" in sizes
        dims = ("dp", "fsdp", "pp", "tp") if self.sharded else ("dp", "pp", "tp")
        self.mesh = init_device_mesh(
            device.type, tuple(sizes[d] for d in dims), mesh_dim_names=dims
        )
        self.dp, self.fsdp, self.tp = sizes["dp"], sizes.get("fsdp", 1), sizes["tp"]
        self.replicas = self.dp * self.fsdp  # the data-parallel replicas, dp-major
        self.dp_rank = self.mesh["dp"].get_local_rank()
        fsdp_rank = self.mesh["fsdp"].get_local_rank() if self.sharded else 0
        self.replica = self.dp_rank * self.fsdp + fsdp_rank
        self.pp_rank = self.mesh["pp"].get_local_rank()
        self.tp_rank = self.mesh["tp"].get_local_rank()
        self.pp_group = self.mesh["pp"].get_group()
        self.dp_group = self.mesh["dp"].get_group() if self.dp > 1 else None
        self.tp_group_name = self.mesh["tp"].get_group().group_name if self.tp > 1 else ""


def train(config: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    place = Place(config, device)
    stage_ranks: list[int] = config["stage_ranks"]
    num_stages = len(stage_ranks)
    mine = [k for k, r in enumerate(stage_ranks) if r == place.pp_rank]
    stages, sharded = build_stages(mine, device, place, config["schedule"])
    inputs, target = load_data(args.data, config, device, place)
    mixed = config.get("precision") == "bf16-mixed"
    if mixed:  # the model's floating-point inputs in the compute dtype
        inputs = tuple(to_dtype(x, torch.bfloat16) for x in inputs)
    constants = {i: x for i, x in enumerate(inputs) if not isinstance(x, torch.Tensor)}
    pipeline = []
    weights_with_inputs = set(config.get("weight_grads_with_input_grads", []))
    for k in mine:
        module: torch.nn.Module = stages[k]
        if k == 0 and constants:  # PipelineStage passes tensors only
            module = BindConstants(module, constants, len(inputs))
        if place.sharded:
            reshard = bool(config.get("reshard_after_forward", False))
            module = fully_shard_stage(module, place.mesh, mixed, reshard)
        elif place.dp_group is not None and any(p.requires_grad for p in module.parameters()):
            ids = [device.index] if device.type == "cuda" else None
            module = DistributedDataParallel(module, device_ids=ids, process_group=place.dp_group)
        io = config["stage_io"][k]
        pipeline.append(
            PipelineStage(
                module,
                k,
                num_stages,
                device,
                input_args=examples(io["inputs"], device),
                output_args=examples(io["outputs"], device),
                group=place.pp_group,
                dw_builder=no_weight_pass if k in weights_with_inputs else None,
            )
        )
    loss_fn = load_module("loss").pipeline_loss
    if mixed:
        loss_fn = float32_loss(loss_fn)
    kind = SCHEDULES[config["schedule"]]
    many = issubclass(kind, PipelineScheduleMulti)  # takes its stages as a list, even one
    schedule = kind(pipeline if many else pipeline[0], config["micro_batches"], loss_fn=loss_fn)
    tied = tied_groups(config, place)
    params = [p for k in mine for p in stages[k].parameters()]
    optimizer = torch.optim.SGD(params, lr=args.lr) if params else None
    first, last = 0 in mine, num_stages - 1 in mine
    tensors = tuple(x for x in inputs if isinstance(x, torch.Tensor))
    history = []
    for step in range(args.steps):
        if optimizer is not None:
            optimizer.zero_grad()
        losses: list[torch.Tensor] = []
        # The loss is computed per micro-batch on its whole output (return_outputs=False: the
        # outputs are not joined, which a 0-dim output such as an auxiliary loss could not be).
        if last:
            schedule.step(
                *(tensors if first else ()), target=target, losses=losses, return_outputs=False
            )
        else:
            schedule.step(*(tensors if first else ()), return_outputs=False)
        sync_tied_grads(list(stages.values()), tied)
        if optimizer is not None:
            optimizer.step()
        # The mean over replicas of each replica's mean loss: the last stage's first TP rank of
        # every replica contributes it (its TP ranks all hold the same loss), every other rank 0.
        mean = torch.zeros(1, dtype=torch.float64, device=device)
        if last and place.tp_rank == 0:
            mean[0] = torch.stack([loss.detach().double() for loss in losses]).mean()
        dist.all_reduce(mean)
        history.append(float(mean[0]) / place.replicas)
        if dist.get_rank() == 0:
            print(f"step {step + 1}/{args.steps}  loss {history[-1]:.6f}", flush=True)
    if args.losses_out is not None and dist.get_rank() == 0:
        args.losses_out.write_text(json.dumps(history) + "\n")
    if args.save_weights is not None:
        save_weights(stages, sharded, place, config["state_dict"], args.save_weights)


def build_stages(
    mine: list[int], device: torch.device, place: Place, schedule: str
) -> tuple[dict[int, torch.nn.Module], dict[str, tuple[int, int]]]:
    """This rank's stages on ``device``, with the weights the model had when it was emitted (this
    rank's shard of the tensors a stage lists in SHARDED), and those SHARDED entries (a tensor
    several stages hold is split the same way on each); their outputs sent as ``schedule``
    needs them."""
    # mmap: only the tensors these stages need are read from disk.
    weights = torch.load(HERE / "weights.pt", map_location="cpu", weights_only=True, mmap=True)
    stages = {}
    split: dict[str, tuple[int, int]] = {}
    for k in mine:
        module = load_module(f"stage_{k}")
        cls = getattr(module, f"Stage{k}")
        if place.tp > 1:
            stage = cls(device, tp_rank=place.tp_rank, tp_group=place.tp_group_name)
        else:
            stage = cls(device)
        sharded = getattr(module, "SHARDED", {})
        split.update(sharded)
        state = {}
        for name in stage.state_dict():
            if name in sharded:
                dim, groups = sharded[name]
                state[name] = shard_of(weights[name], dim, groups, place.tp, place.tp_rank)
            else:
                state[name] = weights[name]
        stage.load_state_dict(state)
        # Tensors cross ranks through contiguous buffers (gloo and NCCL require it): outputs that
        # are strided views are copied (every output, where the schedule splits the backward), and
        # so are the gradients sent back to the previous stage.
        copy_all = schedule in SPLIT_BACKWARD
        stage.register_forward_hook(copied_outputs if copy_all else contiguous_outputs)
        stage.register_forward_pre_hook(contiguous_input_grads)
        stages[k] = stage
    return stages, split


def shard_of(full: torch.Tensor, dim: int, groups: int, degree: int, rank: int) -> torch.Tensor:
    from collectives import shard  # next to this file; written with tensor parallelism only

    return shard(full, dim, groups, degree, rank)


def load_module(name: str) -> ModuleType:
    if str(HERE) not in sys.path:  # the stages import collectives.py from this folder
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def examples(described: list[dict[str, Any]], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty tensors shaped like one micro-batch's stage inputs or outputs (config "stage_io"), so
    PipelineStage knows what it sends and receives without running the stage to find out."""
    return tuple(
        torch.empty(
            d["shape"], dtype=getattr(torch, d["dtype"].split(".")[-1]), device=device
        ).requires_grad_(d["requires_grad"])
        for d in described
    )


def load_data(
    path: Path, config: dict[str, Any], device: torch.device, place: Place
) -> tuple[tuple[Any, ...], torch.Tensor]:
    """This data-parallel replica's rows of the batch in ``path``, on ``device``."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    inputs, target = tuple(data["inputs"]), data["target"]
    want = [*config["inputs"], config["target"]]
    got = [*inputs, target]
    for i, (w, x) in enumerate(zip(want, got)):
        shape = list(x.shape) if isinstance(x, torch.Tensor) else None
        if len(want) != len(got) or ("shape" in w and shape != w["shape"]):
            what = "the target" if i == len(want) - 1 else f"input {i}"
            sys.exit(
                f"run.py: {path} has {len(got) - 1} inputs and a target shaped "
                f"{[list(t.shape) if isinstance(t, torch.Tensor) else t for t in got]}, but the "
                f"stages were generated for {[w.get('shape', w.get('value')) for w in want]} "
                f"(first mismatch: {what}); the batch size and shapes are baked into the stage "
                "code, so emit the program again for other shapes."
            )
    batch = target.shape[0]
    size = batch // place.replicas

    def share(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if x.dim() > 0 and x.shape[0] == batch:
            x = x[place.replica * size : (place.replica + 1) * size]
        return x.to(device)

    return tuple(share(x) for x in inputs), share(target)


def tied_groups(config: dict[str, Any], place: Place) -> list[tuple[str, Any]]:
    """:func:`tied_process_groups` of the tied parameters in ``config``."""
    stage_ranks = config["stage_ranks"]
    holders = {
        name: [stage_ranks[s] for s in stages] for name, stages in config["tied_parameters"].items()
    }
    return tied_process_groups(holders, pipeline_rows(place.mesh), dist.get_rank())


def pipeline_rows(mesh: DeviceMesh) -> list[list[int]]:
    """Global ranks of every pipeline: one row of pp ranks per coordinate of the other dims, in
    the mesh's order (dp-major, tp-minor)."""
    names = list(mesh.mesh_dim_names or ())
    pp = names.index("pp")
    ranks = mesh.mesh.permute([i for i in range(len(names)) if i != pp] + [pp])
    return ranks.reshape(-1, ranks.shape[-1]).tolist()


FSDP_UNIT = "fsdp_unit"
"""The attribute (True) marking a module inside a stage as one of its FSDP units (a layer)."""


def fully_shard_stage(
    stage: torch.nn.Module, mesh: DeviceMesh, mixed: bool, reshard: bool = False
) -> torch.nn.Module:
    """``stage`` under torch's FSDP2 over the mesh's fsdp dim (HSDP over (dp, fsdp) with a dp dim
    of more than one rank): each of its layers marked :data:`FSDP_UNIT` one unit, as torchtitan
    shards each transformer block, then the stage (what no layer holds). Each unit is gathered by
    its own forward and kept for the step (torch's pipelining keeps it whole from the first
    backward to the gradient reduction); ``reshard``: each layer's unit is freed after each
    forward and gathered again by the next (the stage's own parameters stay, as FSDP2 keeps a
    root's). ``mixed``: FSDP2's MixedPrecisionPolicy, bfloat16
    compute and float32 gradient reduction; a stage's inputs keep their dtype (a float32 tensor
    crossing a stage boundary stays float32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not any(p.requires_grad for p in stage.parameters()):
        return stage
    names = mesh.mesh_dim_names or ()
    shard_mesh = mesh["dp", "fsdp"] if "dp" in names and mesh["dp"].size() > 1 else mesh["fsdp"]
    policy = MixedPrecisionPolicy()
    if mixed:
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    for unit in fsdp_units(stage):
        if any(p.requires_grad for p in unit.parameters()):
            fully_shard(unit, mesh=shard_mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(stage, mesh=shard_mesh, reshard_after_forward=False, mp_policy=policy)
    return stage


def fsdp_units(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules inside ``module`` marked :data:`FSDP_UNIT`, outermost first."""
    return [m for m in module.modules() if m is not module and getattr(m, FSDP_UNIT, False)]


def to_dtype(x: Any, dtype: torch.dtype) -> Any:
    """``x`` in ``dtype`` if it is a floating-point tensor, else itself."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def float32_loss(loss_fn: Any) -> Any:
    """``loss_fn`` on the last stage's outputs in float32 (under mixed precision they are bfloat16)."""

    def loss(output: Any, target: torch.Tensor) -> torch.Tensor:
        flat = tuple(output) if isinstance(output, (tuple, list)) else (output,)
        return loss_fn(tuple(to_dtype(x, torch.float32) for x in flat), target)

    return loss


def tied_process_groups(
    holders: Mapping[str, Sequence[int]], rows: Sequence[Sequence[int]], me: int
) -> list[tuple[str, Any]]:
    """``(name, group)`` for each tied parameter this rank holds a copy of. ``holders`` names the
    pipeline ranks whose stages read each tied parameter; ``rows`` lists the global ranks of every
    pipeline (one row of pp ranks per (dp, tp) coordinate), the same on every rank. ``group`` is
    the process group of this pipeline's holders, or None where this rank holds every copy. Every
    rank creates every group in the same order, as new_group requires."""
    pp_rank = next(row.index(me) for row in rows if me in row)
    groups: dict[tuple[int, ...], Any] = {}
    mine = []
    for name in sorted(holders):
        ranks = tuple(sorted(set(holders[name])))
        if len(ranks) > 1 and ranks not in groups:
            for row in rows:
                group = dist.new_group([row[r] for r in ranks])
                if me in row:
                    groups[ranks] = group
        if pp_rank in ranks:
            mine.append((name, groups.get(ranks)))
    return mine


def sync_tied_grads(stages: Sequence[torch.nn.Module], tied: list[tuple[str, Any]]) -> None:
    """Give every copy of each tied parameter the sum of the copies' gradients: over this rank's
    stages (a copy two stages share is counted once), then over ``group``'s ranks."""
    for name, group in tied:
        found = (dict(stage.named_parameters()).get(name) for stage in stages)
        copies = list({id(p): p for p in found if p is not None}.values())
        grad = torch.zeros_like(copies[0])
        for p in copies:
            if p.grad is not None:
                grad += p.grad
        if group is not None:
            # an FSDP shard (a DTensor): the tied copies hold the same shard on this group's ranks
            dist.all_reduce(grad.to_local() if isinstance(grad, DTensor) else grad, group=group)
        for p in copies:
            p.grad = grad.clone()


def save_weights(
    stages: dict[int, torch.nn.Module],
    sharded: dict[str, tuple[int, int]],
    place: Place,
    keys: dict[str, str],
    path: Path,
) -> None:
    """Gather every stage's parameters and buffers to rank 0, join TP shards (``sharded``, from
    :func:`build_stages`) back into whole tensors, and save the model's state dict: each of its
    ``keys`` (config "state_dict") from the stage tensor named beside it, or from weights.pt
    where no stage holds it (a buffer nothing reads)."""
    mine: dict[str, tuple[Any, int, torch.Tensor]] = {}
    for stage in stages.values():
        for name, t in stage.state_dict().items():
            if isinstance(t, DTensor):  # an FSDP shard: joined over the fsdp group, every rank
                t = t.full_tensor()
            mine.setdefault(name, (sharded.get(name), place.tp_rank, t.detach().cpu()))
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if parts is None:
        return
    pieces: dict[str, dict[int, torch.Tensor]] = {}
    split: dict[str, Any] = {}
    for part in parts:
        for name, (how, tp_rank, t) in part.items():
            split.setdefault(name, how)
            pieces.setdefault(name, {}).setdefault(tp_rank, t)
    state = {}
    for name, by_rank in pieces.items():
        if split[name] is None:
            state[name] = by_rank[0]
        else:
            from collectives import unshard

            state[name] = unshard([by_rank[r] for r in sorted(by_rank)], *split[name])
    weights = torch.load(HERE / "weights.pt", map_location="cpu", weights_only=True, mmap=True)
    model_state = {key: state[src] if src in state else weights[src] for key, src in keys.items()}
    torch.save(model_state, path)


def no_weight_pass() -> Any:
    """``PipelineStage``'s ``dw_builder`` for a stage of a zero-bubble schedule whose weight
    gradients torch's split backward would miss (config.json's "weight_grads_with_input_grads"):
    its backward computes them with the input gradients, and its W pass has nothing left to do."""
    return lambda: None


# BindConstants and the contiguous hooks below are also autopart's runtime's (autopart.runtime.program
# imports them), so a compiled program and an emitted one run the same code around their stages.


class BindConstants(torch.nn.Module):
    """The first stage with the model's non-tensor inputs (e.g. ``scale=2.0``) bound: the trace
    fixed their values, and PipelineStage passes tensors only."""

    def __init__(self, stage: torch.nn.Module, constants: dict[int, Any], arity: int) -> None:
        super().__init__()
        self.stage = stage
        self.constants = constants
        self.arity = arity

    def forward(self, *tensors: Any) -> Any:
        it = iter(tensors)
        args = [self.constants[i] if i in self.constants else next(it) for i in range(self.arity)]
        return self.stage(*args)


class ContiguousGrad(torch.autograd.Function):
    """Identity forward; its backward hands a contiguous gradient to the previous stage."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_input_grads(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        ContiguousGrad.apply(a) if isinstance(a, torch.Tensor) and a.requires_grad else a
        for a in args
    )


def contiguous_outputs(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    """Stage outputs as contiguous tensors of their own: a view is copied, as zero-bubble
    schedules detach a stage's outputs in place once its input gradients are computed, which a
    view does not allow."""
    if isinstance(output, tuple):
        return tuple(_own(t) for t in output)
    return _own(output)


def _own(t: Any) -> Any:
    if not isinstance(t, torch.Tensor):
        return t
    return t.clone(memory_format=torch.contiguous_format) if t._base is not None else t.contiguous()


def copied_outputs(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
    """Stage outputs always copied, for the schedules that split the backward (interleaved zero
    bubble, ZBV, DualPipeV): once a stage's input gradients are computed, torch detaches its
    outputs in place, and an output autograd also saved for the weight gradients (a ReLU's result,
    an input passed on unchanged) could then not be used by them. The copy is what is sent."""
    if isinstance(output, tuple):
        return tuple(_copy(t) for t in output)
    return _copy(output)


def _copy(t: Any) -> Any:
    return t.clone(memory_format=torch.contiguous_format) if isinstance(t, torch.Tensor) else t


def end_rank() -> None:
    """End a rank that finished its work (its group destroyed): flush and leave without the
    interpreter's finalization. After a ``torch.distributed.pipelining`` run that finalization
    aborts the process now and then (SIGABRT, "terminate called without an active exception",
    more often on a loaded host), which would turn a finished run into a failed one. Only for the
    success path: a rank that raises must leave its traceback to the launcher."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    end_rank()
