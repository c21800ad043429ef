"""How ``program(x)`` joins the micro-batches' outputs (one process: the rule itself; the runtime
tests check it on spawned ranks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from autopart.capture.tracing import trace
from autopart.runtime.outputs import OutputMerge, OutputMergeError
from tests.models import dict_with_none, logits_and_aux


def _merge(model: nn.Module, x: torch.Tensor, chunks: int) -> OutputMerge:
    return OutputMerge.of(trace(model, (x,)), trace(model, (x[: len(x) // chunks],)))


def test_batch_dimensions_are_joined_and_scalars_averaged() -> None:
    model, (x,) = logits_and_aux()
    merge = _merge(model, x, 4)
    assert merge.leaves == (0, "mean")
    with torch.no_grad():
        parts = [model(c) for c in x.chunk(4)]
        logits, aux = merge.merge(parts)
        torch.testing.assert_close(logits, model(x)[0])
        torch.testing.assert_close(aux, torch.stack([p[1] for p in parts]).mean())


def test_none_is_no_output_of_the_pipeline() -> None:
    model, (x,) = dict_with_none()
    assert _merge(model, x, 2).leaves == (0, "mean")  # y and h_mean; the None stays in the trace


class _Stats(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.fc(x)
        # the batch on dim 1; a count of positive values; a batch x batch matrix
        return h.t(), (h > 0).sum(), h @ h.t()


def test_every_kind_of_leaf() -> None:
    model = _Stats()
    x = torch.randn(8, 4)
    merge = _merge(model, x, 2)
    assert merge.leaves == (1, "same", "several")
    with torch.no_grad():
        parts = [model(c) for c in x.chunk(2)]
    assert merge.spec(2)[0].split_dim == 1
    with pytest.raises(OutputMergeError, match=r"output 1 .* different values .* micro_batches=1"):
        merge.merge([(p[0], p[1], p[2]) for p in parts])
    same = [(p[0], parts[0][1], p[2]) for p in parts]
    with pytest.raises(OutputMergeError, match=r"output 2 .* more than one dimension"):
        merge.merge(same)
    one = merge.merge([parts[0]])  # one micro-batch: nothing to join
    assert all(torch.equal(a, b) for a, b in zip(one, parts[0], strict=True))
