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


def model_output(flat: tuple[Any, ...]) -> Any:
    """The model's output, rebuilt from the last stage's flat outputs."""
    return flat[0]


def pipeline_loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    """The loss of one micro-batch: the schedule passes the last stage's output."""
    flat = tuple(output) if isinstance(output, (tuple, list)) else (output,)
    return tokens(model_output(flat), target)
