"""How ``program(x)`` joins the model's outputs over micro-batches and data-parallel replicas.

Training never joins outputs: ``torch.distributed.pipelining`` calls ``loss_fn(output, target)`` on
each micro-batch's whole output (every leaf of its pytree: logits, a 0-dim auxiliary loss, ...) and
the step's loss is the mean of those losses. Inference returns one output for the whole batch, built
from the micro-batches' outputs leaf by leaf with torch's ``merge_chunks`` (the schedule's
``output_merge_spec``), by what the trace says each leaf is:

- a tensor with a batch dimension (the one dimension whose size differs between the graph traced at
  the whole batch and the graph traced at one micro-batch) is concatenated along it;
- a floating tensor without one (a 0-dim mean, an auxiliary loss) is the mean of its micro-batch
  values;
- any other tensor must be equal on every micro-batch (an error says so otherwise).

Leaves the trace made constants (a ``None`` field) are not sent or joined: they are put back in
place from the trace (:func:`autopart.passes.split_stages.rebuild_output`). The replicas of a ``dp`` mesh are joined by the same rule after their micro-batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.distributed.pipelining.microbatch import TensorChunkSpec, _CustomReducer, merge_chunks

from autopart.errors import AutopartError

__all__ = ["OutputMerge", "OutputMergeError"]

_MEAN = "mean"
_SAME = "same"
_SEVERAL = "several"


class OutputMergeError(AutopartError):
    """The outputs of the micro-batches cannot be joined into the whole batch's output."""


@dataclass(frozen=True, slots=True)
class OutputMerge:
    """For each of the model's flat outputs: the dimension that holds the batch, or ``"mean"``,
    ``"same"`` (see the module docstring), or ``"several"`` (the batch in more than one dimension,
    e.g. a batch x batch similarity matrix: no join of micro-batches gives the whole batch's)."""

    leaves: tuple[int | str, ...]

    @classmethod
    def of(cls, whole: torch.fx.GraphModule, micro: torch.fx.GraphModule) -> OutputMerge:
        """From the model traced at the whole batch and at one micro-batch (the same graph when
        the batch is one micro-batch)."""
        # the last stage returns the tensor outputs only (constants such as None stay behind)
        pairs = zip(_tensor_outputs(whole), _tensor_outputs(micro), strict=True)
        return cls(tuple(_leaf(w.meta.get("val"), m.meta.get("val")) for w, m in pairs))

    def spec(self, chunks: int) -> tuple[Any, ...]:
        """torch's ``output_merge_spec`` for joining ``chunks`` equal parts of the batch."""
        return tuple(_spec(leaf, i, chunks) for i, leaf in enumerate(self.leaves))

    def merge(self, parts: list[Any]) -> Any:
        """``parts`` (each a flat tuple of outputs, in batch order) joined into one."""
        return merge_chunks(parts, self.spec(len(parts)))


def _tensor_outputs(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    from autopart.passes.split_stages import model_outputs

    return [v for v in model_outputs(gm)[0] if isinstance(v, torch.fx.Node)]


def _leaf(whole: Any, micro: Any) -> int | str:
    if not isinstance(whole, torch.Tensor):
        return _SAME
    dims = [d for d in range(whole.dim()) if whole.shape[d] != micro.shape[d]]
    if len(dims) > 1:
        return _SEVERAL
    if dims:
        return dims[0]
    return _MEAN if whole.dtype.is_floating_point or whole.dtype.is_complex else _SAME


def _spec(leaf: int | str, index: int, chunks: int) -> Any:
    if isinstance(leaf, int):
        return TensorChunkSpec(leaf)
    if leaf == _MEAN:
        return _CustomReducer(None, lambda acc, x: x / chunks if acc is None else acc + x / chunks)
    if leaf == _SAME:
        return _CustomReducer(None, lambda acc, x: x if acc is None else _same(acc, x, index))
    return _CustomReducer(None, lambda acc, x: x if acc is None else _several(index))


def _same(first: Any, other: Any, index: int) -> Any:
    equal = torch.equal(first, other) if isinstance(first, torch.Tensor) else bool(first == other)
    if not equal:
        raise OutputMergeError(
            f"output {index} of the model has no batch dimension and is not a float, and its "
            f"micro-batches give different values ({first!r} and {other!r}), so they do not join "
            "into one value for the whole batch; compile with micro_batches=1 to run inference on "
            "the whole batch at once."
        )
    return first


def _several(index: int) -> Any:
    raise OutputMergeError(
        f"output {index} of the model has the batch in more than one dimension (e.g. a batch x "
        "batch matrix), so the micro-batches' outputs do not join into the whole batch's; compile "
        "with micro_batches=1 to run inference on the whole batch at once."
    )
