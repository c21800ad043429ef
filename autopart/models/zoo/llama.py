"""Llama (Touvron et al. 2023; Llama 3 2024): RMSNorm, rotary position embeddings, SwiGLU, and
grouped-query attention, written natively. Module names follow Hugging Face's ``LlamaForCausalLM``.

The forward is kept lean on purpose (32 ATen nodes per layer with GQA): the 80-layer 70B model is
traced on the meta device during planning, and every node costs tracing time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from autopart.models.zoo._common import Built, init_normal, seeded_build, token_inputs

__all__ = ["Llama", "LlamaConfig", "build_llama"]


@dataclass(frozen=True, slots=True)
class LlamaConfig:
    n_layer: int
    hidden: int
    n_head: int
    n_kv_head: int  # < n_head: grouped-query attention
    intermediate: int  # SwiGLU width
    vocab_size: int
    max_seq: int  # context length, in tokens
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5


def _rope_tables(max_seq: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape (max_seq, head_dim), on the current default device.

    The rotate-half sign is folded into sin (first half negated), so applying RoPE is
    ``x * cos + roll(x, head_dim / 2) * sin``, which equals Hugging Face's
    ``x * cos + rotate_half(x) * sin`` (rotate_half(x) = cat(-x2, x1), with an unsigned sin).
    """
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv_freq)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rolling the last dim by half gives cat(x2, x1) in one graph node instead of four.
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class _Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        head_dim = cfg.hidden // cfg.n_head
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.q_proj = nn.Linear(cfg.hidden, cfg.n_head * head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden, cfg.n_kv_head * head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden, cfg.n_kv_head * head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * head_dim, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # (batch, seq, heads * head_dim) -> (batch, heads, seq, head_dim)
        q = self.q_proj(x).unflatten(-1, (self.n_head, -1)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.n_kv_head, -1)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.n_kv_head, -1)).transpose(1, 2)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if self.n_kv_head != self.n_head:  # a static property of the config, not of the data
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).flatten(2))


class _MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.up_proj = nn.Linear(cfg.hidden, cfg.intermediate, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate, cfg.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = _RMSNorm(cfg.hidden, cfg.norm_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden, cfg.norm_eps)
        self.mlp = _MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class _LlamaModel(nn.Module):
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden)
        self.layers = nn.ModuleList(_DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = _RMSNorm(cfg.hidden, cfg.norm_eps)
        cos, sin = _rope_tables(cfg.max_seq, cfg.hidden // cfg.n_head, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq = input_ids.shape[1]  # narrow, not [:seq]: a slice of an fx Proxy cannot be traced
        cos, sin = self.rope_cos.narrow(0, 0, seq), self.rope_sin.narrow(0, 0, seq)
        x = self.embed_tokens(input_ids)
        # float32 tables, bfloat16 activations under mixed precision (a no-op otherwise)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


class Llama(nn.Module):
    """Llama language model: ``input_ids`` (batch, seq) int64 -> logits (batch, seq, vocab)."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        assert cfg.hidden % cfg.n_head == 0 and cfg.n_head % cfg.n_kv_head == 0, cfg
        self.config = cfg
        self.model = _LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden, cfg.vocab_size, bias=False)  # untied
        init_normal(self)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model(input_ids))


def build_llama(
    name: str,
    cfg: LlamaConfig,
    batch: int,
    seq: int,
    device: torch.device,
    dtype: torch.dtype,
    seed: int,
) -> Built:
    ids = token_inputs(name, batch, seq, cfg.vocab_size, cfg.max_seq, device, seed)
    with seeded_build(device, seed):
        model = Llama(cfg).to(dtype)
    return model, ids, {}
