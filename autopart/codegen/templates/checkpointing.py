"""Selective activation checkpointing, on torch alone: a block runs under
``torch.utils.checkpoint.checkpoint`` with a policy that keeps the outputs of its weight matmuls
and fused attention (``MUST_SAVE``) and recomputes every other op in the backward
(``PREFER_RECOMPUTE``): torch's selective activation checkpointing, the policy torchtitan's
op-level selective recompute uses. The attention scores of unfused attention (batched matmuls),
softmax, norms and activation functions are rebuilt; no weight matmul runs twice.

autopart's recompute pass (``autopart.passes.recompute``) calls :func:`checkpoint_saving_matmuls`
from the stage graphs it rewrites, and ``autopart.emit`` copies this file next to the stages it
writes (as ``checkpointing.py``), so a generated program runs the same code with no autopart
installed. It must therefore import nothing but torch and the standard library.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

__all__ = ["SAVED_OPS", "checkpoint_saving_matmuls"]

SAVED_OPS = frozenset(
    getattr(torch.ops.aten, name)
    for name in (
        "mm",
        "addmm",
        "convolution",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
)
"""The aten ops whose outputs a selectively checkpointed block keeps: a linear layer's matmul
(``mm``/``addmm``; a batched matmul of two activations is not among them), convolutions and fused
attention kernels."""


def _policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    packet = getattr(func, "overloadpacket", func)
    return CheckpointPolicy.MUST_SAVE if packet in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_saving_matmuls(function: Any, *args: Any) -> Any:
    """``function(*args)``, keeping only its :data:`SAVED_OPS` outputs and its inputs for the
    backward, which recomputes the rest (with the same random numbers)."""
    return checkpoint(
        function,
        *args,
        use_reentrant=False,
        context_fn=functools.partial(create_selective_checkpoint_contexts, _policy),
    )
