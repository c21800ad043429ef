"""Train the pipeline-parallel program in this folder (written by autopart.emit; needs only torch).

    torchrun --nproc-per-node N run.py [--steps S] [--lr LR] [--losses-out losses.json]

N is "world_size" in config.json. Every rank builds the stages config.json gives it (stage_K.py,
class StageK) on its device (a GPU per rank with NCCL when CUDA is available, else the CPU with
gloo), copies their parameters from weights.pt, wraps them in torch.distributed.pipelining's
PipelineStage and runs the plan's schedule (GPipe, 1F1B or interleaved 1F1B) over the batch in
data.pt, split into the plan's micro-batches, for S steps of SGD. Rank 0 prints the mean loss of
every step.

A parameter that several stages read (tied input and output embeddings) has a copy on each of them;
before every optimizer step the copies' gradients are summed (on the rank, then across the ranks
that hold a copy), so all copies take the same step and stay equal.

Files: config.json (read here), plan.json (the full plan, for reference), stage_K.py, loss.py
(the loss for the last stage), weights.pt (parameters and buffers under the model's own names),
data.pt ({"inputs": [...], "target": tensor}: one global batch).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
)

HERE = Path(__file__).resolve().parent
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


def main(argv: Sequence[str] | None = None) -> None:
    config = json.loads((HERE / "config.json").read_text())
    args = parse_args(argv, config)
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != config["world_size"]:
        sys.exit(
            f"run.py: this program has {config['world_size']} pipeline ranks but WORLD_SIZE is "
            f"{world or 'not set'}; launch it with "
            f"torchrun --nproc-per-node {config['world_size']} run.py"
        )
    device = init_distributed(args.device)
    try:
        train(config, args, device)
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
        help="write the trained parameters and buffers here (torch.save, the model's own names; "
        "load with model.load_state_dict(..., strict=False): non-persistent buffers are included)",
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


def train(config: dict[str, Any], args: argparse.Namespace, device: torch.device) -> None:
    rank = dist.get_rank()
    stage_ranks: list[int] = config["stage_ranks"]
    num_stages = len(stage_ranks)
    mine = [k for k, r in enumerate(stage_ranks) if r == rank]
    stages = build_stages(mine, device)
    pipeline = [PipelineStage(stages[k], k, num_stages, device) for k in mine]
    loss_fn = load_module("loss").pipeline_loss
    kind = SCHEDULES[config["schedule"]]
    many = config["stages_per_rank"] > 1
    schedule = kind(pipeline if many else pipeline[0], config["micro_batches"], loss_fn=loss_fn)
    tied = tied_groups(config, rank)
    inputs, target = load_data(args.data, config, device)
    params = [p for k in mine for p in stages[k].parameters()]
    optimizer = torch.optim.SGD(params, lr=args.lr) if params else None
    first, last = 0 in mine, num_stages - 1 in mine
    history = []
    for step in range(args.steps):
        if optimizer is not None:
            optimizer.zero_grad()
        losses: list[torch.Tensor] = []
        if last:
            schedule.step(*(inputs if first else ()), target=target, losses=losses)
        else:
            schedule.step(*(inputs if first else ()))
        sync_tied_grads(stages, tied)
        if optimizer is not None:
            optimizer.step()
        mean = torch.zeros(1, dtype=torch.float64, device=device)
        if last:
            mean[0] = torch.stack([loss.detach().double() for loss in losses]).mean()
        dist.broadcast(mean, src=stage_ranks[-1])
        history.append(float(mean[0]))
        if rank == 0:
            print(f"step {step + 1}/{args.steps}  loss {history[-1]:.6f}", flush=True)
    if args.losses_out is not None and rank == 0:
        args.losses_out.write_text(json.dumps(history) + "\n")
    if args.save_weights is not None:
        save_weights(stages, args.save_weights)


def build_stages(mine: list[int], device: torch.device) -> dict[int, torch.nn.Module]:
    """This rank's stages on ``device``, with the weights the model had when it was emitted."""
    # mmap: only the tensors these stages need are read from disk.
    weights = torch.load(HERE / "weights.pt", map_location="cpu", weights_only=True, mmap=True)
    stages = {}
    for k in mine:
        stage = getattr(load_module(f"stage_{k}"), f"Stage{k}")(device)
        stage.load_state_dict({name: weights[name] for name in stage.state_dict()})
        # Tensors cross ranks through contiguous buffers (gloo and NCCL require it): outputs that
        # are strided views are copied, and so are the gradients sent back to the previous stage.
        stage.register_forward_hook(contiguous_outputs)
        stage.register_forward_pre_hook(contiguous_input_grads)
        stages[k] = stage
    return stages


def load_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_data(
    path: Path, config: dict[str, Any], device: torch.device
) -> tuple[tuple[Any, ...], torch.Tensor]:
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
    moved = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
    return moved, target.to(device)


def tied_groups(config: dict[str, Any], rank: int) -> list[tuple[str, Any]]:
    """(name, process group of the ranks holding a copy, or None for one rank) for the tied
    parameters this rank holds. Every rank creates the groups in the same order, as new_group
    requires."""
    groups: dict[tuple[int, ...], Any] = {}
    mine = []
    for name, holders in sorted(config["tied_parameters"].items()):
        ranks = tuple(sorted({config["stage_ranks"][s] for s in holders}))
        if len(ranks) > 1 and ranks not in groups:
            groups[ranks] = dist.new_group(list(ranks))
        if rank in ranks:
            mine.append((name, groups.get(ranks)))
    return mine


def sync_tied_grads(stages: dict[int, torch.nn.Module], tied: list[tuple[str, Any]]) -> None:
    for name, group in tied:
        copies = [
            stage.get_parameter(name)
            for stage in stages.values()
            if name in dict(stage.named_parameters())
        ]
        grad = torch.zeros_like(copies[0])
        for p in copies:
            if p.grad is not None:
                grad += p.grad
        if group is not None:
            dist.all_reduce(grad, group=group)
        for p in copies:
            p.grad = grad.clone()


def save_weights(stages: dict[int, torch.nn.Module], path: Path) -> None:
    """Gather every stage's parameters and buffers to rank 0 and save them under the model's names."""
    mine: dict[str, torch.Tensor] = {}
    for stage in stages.values():
        for name, t in stage.state_dict().items():
            mine.setdefault(name, t.detach().cpu())
    parts: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if parts is not None:
        state: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, t in part.items():
                state.setdefault(name, t)
        torch.save(dict(sorted(state.items())), path)


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
    if isinstance(output, tuple):
        return tuple(t.contiguous() if isinstance(t, torch.Tensor) else t for t in output)
    return output.contiguous() if isinstance(output, torch.Tensor) else output


if __name__ == "__main__":
    main()
