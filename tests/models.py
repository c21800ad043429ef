"""Small models for tests: each one exercises one thing a tracer or a pass must get right."""

from __future__ import annotations

import torch
from torch import nn


class TwoLayer(nn.Module):
    def __init__(self, d_in: int = 16, d_hidden: int = 32, d_out: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class Branchy(nn.Module):
    """Branches on a tensor's *value*: no tracer can capture this as one static graph."""

    def __init__(self) -> None:
        super().__init__()
        self.block = TwoLayer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if y.sum() > 0:  # the line the error must point at
            return y * 2
        return y


class TwoInTwoOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, *, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.a(x) + self.b(y)
        return h * scale, torch.tanh(h)


class Tied(nn.Module):
    def __init__(self, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mid = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.embed(ids))))


def two_in_two_out() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Factory (``tests.models:two_in_two_out``): two inputs, a tuple of two outputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TwoInTwoOut()
    return model, (torch.randn(8, 8, generator=gen), torch.randn(8, 8, generator=gen))
