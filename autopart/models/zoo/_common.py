"""Helpers shared by the zoo builders: seeded construction, token inputs, GPT-style init."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeAlias

import torch
from torch import nn

from autopart.errors import ModelSpecError

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SEQ",
    "Built",
    "ZooBuilder",
    "init_normal",
    "seeded_build",
    "token_inputs",
]

DEFAULT_BATCH = 8
DEFAULT_SEQ = 128

Built: TypeAlias = tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]
"""What a builder returns: ``(model, example_inputs, example_kwargs)``."""

ZooBuilder: TypeAlias = Callable[[int, int, torch.device, torch.dtype, int], Built]
"""``(batch, seq, device, dtype, seed) -> Built``."""


@contextmanager
def seeded_build(device: torch.device | None, seed: int) -> Iterator[None]:
    """Construct modules on ``device`` (None: leave the default) from a private RNG stream.

    The global CPU RNG is forked, so building a model never perturbs the caller's random state.
    """
    with torch.random.fork_rng(devices=[]), device or nullcontext():
        torch.manual_seed(seed)
        yield


def init_normal(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2/Llama initialisation: N(0, std) weights for Linear and Embedding, zero biases."""
    if next(model.parameters()).is_meta:
        return  # meta tensors hold no values, and normal_ on meta is slow (Python refs)
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


def token_inputs(
    name: str, batch: int, seq: int, vocab_size: int, context: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, ...]:
    """``(input_ids,)`` of shape ``(batch, seq)``, uniform in the vocabulary, seeded."""
    if seq > context:
        raise ModelSpecError(
            f"{name} has a context of {context} tokens but seq={seq} was asked for; "
            f"pass a sequence length of at most {context} (--seq {context})."
        )
    if device.type == "meta":
        return (torch.empty((batch, seq), dtype=torch.long, device=device),)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, seq), generator=generator, dtype=torch.long)
    return (ids.to(device),)
