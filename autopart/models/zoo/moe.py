"""A mixture-of-experts language model written in plain PyTorch: the Llama decoder of
:mod:`autopart.models.zoo.llama` whose every MLP is a token-choice top-k mixture of SwiGLU experts.

The routing is written the way a researcher writes it by hand, with ``torch.topk`` and index ops:
for each expert, ``torch.where(indices == e)`` picks the tokens routed to it (a data-dependent
count, which ``torch.export`` keeps as an unbacked symbolic size), the expert runs on those rows
and ``index_add`` scatters its weighted output back. Nothing in the graph depends on how the
tracing batch routed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopart.models.zoo._common import Built, init_normal, seeded_build, token_inputs
from autopart.models.zoo.llama import Llama, LlamaConfig

__all__ = ["MoEConfig", "MoELlama", "SparseMoE", "build_moe"]


@dataclass(frozen=True, slots=True)
class MoEConfig:
    base: LlamaConfig  # ``base.intermediate`` is each expert's SwiGLU width
    experts: int
    top_k: int


class _Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Token-choice top-k routing over ``experts`` SwiGLU experts (Shazeer et al. 2017)."""

    def __init__(self, hidden: int, intermediate: int, experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(_Expert(hidden, intermediate) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        probs = self.router(tokens).softmax(-1)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)  # how many: known only when it runs
            out = out.index_add(0, token, expert(tokens[token]) * weights[token, slot, None])
        return out.reshape(x.shape)


class MoELlama(Llama):
    """``input_ids`` (batch, seq) int64 -> logits (batch, seq, vocab); every MLP a :class:`SparseMoE`."""

    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__(cfg.base)
        base = cfg.base
        for layer in self.model.layers:
            layer.mlp = SparseMoE(base.hidden, base.intermediate, cfg.experts, cfg.top_k)
        init_normal(self)


def build_moe(
    name: str,
    cfg: MoEConfig,
    batch: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> Built:
    ids = token_inputs(name, batch, seq, cfg.base.vocab_size, cfg.base.max_seq, device, seed)
    with seeded_build(device, seed):
        model = MoELlama(cfg).to(dtype)
    return model, ids, {}
