"""The options several commands share, each declared once, and the planning options as a
:class:`~autopart.planning.request.PlanRequest`."""

from __future__ import annotations

import argparse

from autopart.passes.routing import DEFAULT_IMBALANCE
from autopart.planning.request import AUTO, RECOMPUTE, PlanRequest
from autopart.planning.schedule import ScheduleKind

__all__ = [
    "add_device",
    "add_format",
    "add_model",
    "add_pipeline",
    "add_tracing",
    "plan_request",
]

# argparse's name of each planning option -> the PlanRequest field it sets
_REQUEST_FIELDS = {
    "mesh": "mesh",
    "devices": "devices",
    "device": "device",
    "memory": "memory",
    "micro_batches": "micro_batches",
    "schedule": "schedule",
    "stages_per_rank": "stages_per_rank",
    "optimizer": "optimizer",
    "time_limit": "time_limit_s",
    "profile": "profile",
    "expert_imbalance": "expert_imbalance",
    "recompute": "recompute",
    "reshard_after_forward": "reshard_after_forward",
}


def add_model(p: argparse.ArgumentParser) -> None:
    """MODEL and the options that build and cost it: --batch, --seq, --config,
    --expert-imbalance."""
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a zoo name (gpt2, llama-7b, mlp, ...; `autopart models` lists them), hf:<model_type>, path/to/file.py:factory or package.module:factory",
    )
    p.add_argument("--batch", type=int, default=None, help="batch size of the example inputs")
    p.add_argument(
        "--seq", type=int, default=None, help="sequence length of token models' example inputs"
    )
    p.add_argument(
        "--config", default=None, help="config overrides for hf: models, e.g. n_layer=2,n_embd=128"
    )
    p.add_argument(
        "--expert-imbalance",
        type=float,
        default=DEFAULT_IMBALANCE,
        metavar="F",
        help="mixture-of-experts models: charge each expert F times its mean share T*k/E of the "
        "routed tokens (at most every token), F >= 1 (default 1: the mean; 1.5 leaves headroom "
        "for skewed routing)",
    )


def add_tracing(p: argparse.ArgumentParser) -> None:
    """How :func:`autopart.cli.loading.load_and_trace` builds and traces MODEL."""
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="training precision of built-in and hf: models: float32 (default), bfloat16 or "
        "float16 (every parameter, gradient, optimizer state and activation in that dtype), or "
        "bfloat16-mixed (float32 master parameters, gradients and optimizer state, bfloat16 "
        "compute and activations: FSDP2's MixedPrecisionPolicy on every mesh)",
    )
    p.add_argument(
        "--no-repeat",
        action="store_true",
        help="trace every repeated layer instead of tracing three and replicating them",
    )
    p.add_argument(
        "--trace-method",
        choices=["auto", "export", "fx"],
        default="auto",
        help="tracer to use (default: export, then fx)",
    )


def add_pipeline(p: argparse.ArgumentParser, *, search: bool = False) -> None:
    """--mesh (``search``: also ``auto``), --micro-batches, --schedule, --stages-per-rank,
    --recompute and --profile."""
    mesh_help = "mesh spec, e.g. pp=4 or dp=2,pp=2,tp=2 (default pp=2)"
    if search:
        mesh_help += (
            ", or auto: search the dp x pp x tp meshes of --devices devices (tp up to 8, within a "
            "node) and keep the fastest that fits memory"
        )
    p.add_argument("--mesh", default="pp=2", help=mesh_help)
    p.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches per step (default: chosen by simulation)",
    )
    p.add_argument(
        "--schedule",
        choices=[AUTO, *ScheduleKind],
        default=AUTO,
        help="pipeline schedule (default auto: simulate each and keep the fastest that fits memory)",
    )
    p.add_argument(
        "--stages-per-rank",
        type=int,
        default=None,
        help="pipeline stages on each rank (default: compare 1 to 4 where the schedule allows; "
        "gpipe and 1f1b run 1, zbv and dualpipev 2)",
    )
    p.add_argument(
        "--recompute",
        choices=RECOMPUTE,
        default=AUTO,
        help="activation recomputation (torch.utils.checkpoint per layer): auto (default) lets "
        "the stage solver recompute layers, whole or selectively, only where no split fits "
        "memory otherwise; none keeps every activation; full recomputes every layer that keeps "
        "less by it; selective recomputes each layer's ops that read no weight (attention "
        "scores, softmax, norms, activations) and keeps the matmuls' activations",
    )
    p.add_argument(
        "--reshard-after-forward",
        action="store_true",
        help="with an fsdp axis and --schedule gpipe: each layer's FSDP2 unit reshards after its "
        "forward and is gathered again by the next, so the forwards hold one layer whole instead "
        "of the stage (a gather per micro-batch more)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="plan on measured times: run each distinct op forward and backward on this machine "
        "(--device cpu: the CPU, else CUDA), cached by signature, dtype and device under "
        "$AUTOPART_CACHE_DIR (default ~/.cache/autopart)",
    )


def add_device(p: argparse.ArgumentParser, *, default: str, why: str = "") -> None:
    """--device, the device whose cost model the plan is made for."""
    p.add_argument(
        "--device",
        default=default,
        help=f"device to plan for: h100, h200, a100, cpu (default {default}{why})",
    )


def add_format(p: argparse.ArgumentParser) -> None:
    """--format: readable tables, or one JSON document on stdout."""
    p.add_argument("--format", choices=["table", "json"], default="table")


DTYPES = {
    "float32": ("float32", "model"),
    "bfloat16": ("bfloat16", "model"),
    "float16": ("float16", "model"),
    "bfloat16-mixed": ("float32", "bf16-mixed"),
}
"""``--dtype``: the dtype the model is built in, and the request's precision."""


def plan_request(args: argparse.Namespace) -> PlanRequest:
    """The planning options a command declares, as a request (checked: a bad one raises before
    anything is traced). Options it does not declare keep the request's defaults."""
    given = {field: getattr(args, dest) for dest, field in _REQUEST_FIELDS.items() if dest in args}
    if "dtype" in args:
        given["precision"] = DTYPES[args.dtype][1]
    return PlanRequest(**given)
