"""The training loss, written by autopart.emit.

The last pipeline stage returns the model's outputs flattened into a tuple; ``model_output``
rebuilds the model's own output from them, and ``pipeline_loss`` (what run.py gives the schedule)
calls the loss on it for every micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch


# copied from autopart.runtime.launch.training_batch.<locals>.tokens
def tokens(output: Any, tgt: torch.Tensor) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), tgt.flatten())


class CausalLMOutputWithCrossAttentions(dict):
    """Stands in for transformers.modeling_outputs.CausalLMOutputWithCrossAttentions,
    so the program needs only torch: its fields by name, attribute or position."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)


def model_output(flat: tuple[Any, ...]) -> Any:
    """The model's output, rebuilt from the last stage's flat outputs."""
    return CausalLMOutputWithCrossAttentions(logits=flat[0])


def pipeline_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """The loss of one micro-batch: the schedule passes the last stage's output."""
    flat = tuple(output) if isinstance(output, (tuple, list)) else (output,)
    return tokens(model_output(flat), target)
