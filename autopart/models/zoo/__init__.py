"""Built-in models, written natively in plain PyTorch (no transformers needed).

Every entry has a name, a one-line description, and a builder
``(batch, seq, device, dtype, seed) -> (model, example_inputs, example_kwargs)``; the same seed gives
the same weights and inputs. Token models take ``input_ids`` of shape (batch, seq); the others
ignore ``seq``. On the meta device the model and its example inputs are meta tensors (instant, any
size). Resolve MODEL strings with :func:`autopart.models.model_spec.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from autopart.models.zoo._common import (
    DEFAULT_BATCH,
    DEFAULT_SEQ,
    Built,
    ZooBuilder,
    seeded_build,
    token_inputs,
)
from autopart.models.zoo.gpt2 import GPT2, GPT2Config, build_gpt2
from autopart.models.zoo.llama import Llama, LlamaConfig, build_llama
from autopart.models.zoo.moe import MoEConfig, MoELlama, build_moe
from autopart.models.zoo.vision import MLP, UNet, build_cnn, build_mlp

__all__ = [
    "DEFAULT_BATCH",
    "DEFAULT_SEQ",
    "GPT2",
    "MLP",
    "ZOO",
    "Built",
    "GPT2Config",
    "Llama",
    "LlamaConfig",
    "MoEConfig",
    "MoELlama",
    "UNet",
    "ZooBuilder",
    "ZooEntry",
    "list_models",
    "seeded_build",
    "token_inputs",
]


@dataclass(frozen=True, slots=True)
class ZooEntry:
    name: str
    description: str
    build: ZooBuilder
    context: int | None = None  # longest sequence a token model accepts; None: not a token model

    @property
    def default_seq(self) -> int:
        return DEFAULT_SEQ if self.context is None else min(DEFAULT_SEQ, self.context)


def _gpt2(name: str, description: str, cfg: GPT2Config) -> ZooEntry:
    return ZooEntry(name, description, partial(build_gpt2, name, cfg), cfg.n_positions)


def _llama(name: str, description: str, cfg: LlamaConfig) -> ZooEntry:
    return ZooEntry(name, description, partial(build_llama, name, cfg), cfg.max_seq)


def _moe(name: str, description: str, cfg: MoEConfig) -> ZooEntry:
    return ZooEntry(name, description, partial(build_moe, name, cfg), cfg.base.max_seq)


_LLAMA_7B = LlamaConfig(32, 4096, 32, 32, 11008, 32000, max_seq=4096)
_LLAMA_70B = LlamaConfig(80, 8192, 64, 8, 28672, 128256, max_seq=8192, rope_theta=500000.0)

_ENTRIES = [
    ZooEntry(
        "mlp", "deep MLP: 8 x (Linear 1024 + GELU), 10-class head; input (batch, 1024)", build_mlp
    ),
    ZooEntry(
        "cnn",
        "U-Net-like CNN: residual blocks, long concat skips, GroupNorm; (batch, 3, 32, 32) -> "
        "per-pixel logits (batch, 10, 32, 32)",
        build_cnn,
    ),
    _gpt2("gpt2", "GPT-2 small, 124M: 12 layers, hidden 768, 12 heads", GPT2Config(12, 768, 12)),
    _gpt2("gpt2-medium", "GPT-2 medium, 350M: 24 layers, hidden 1024", GPT2Config(24, 1024, 16)),
    _gpt2("gpt2-large", "GPT-2 large, 774M: 36 layers, hidden 1280", GPT2Config(36, 1280, 20)),
    _gpt2("gpt2-xl", "GPT-2 XL, 1.5B: 48 layers, hidden 1600, 25 heads", GPT2Config(48, 1600, 25)),
    _gpt2(
        "gpt2-tiny",
        "GPT-2 for tests: 2 layers, hidden 64, 4 heads, vocab 256, context 128",
        GPT2Config(2, 64, 4, vocab_size=256, n_positions=128),
    ),
    _llama("llama-7b", "Llama-2-7B shape: 32 layers, hidden 4096, 32 heads (MHA)", _LLAMA_7B),
    _llama("llama-70b", "Llama-3-70B shape: 80 layers, hidden 8192, 64 q / 8 kv heads", _LLAMA_70B),
    _llama(
        "llama-tiny",
        "Llama for tests: 2 layers, hidden 64, 4 q / 2 kv heads, vocab 256, context 128",
        LlamaConfig(2, 64, 4, 2, 128, 256, max_seq=128),
    ),
    _llama(
        "heavy-head",
        "Llama-style LM whose 65,536-way output head dominates: 4 layers, hidden 256, untied",
        LlamaConfig(4, 256, 4, 4, 1024, 65536, max_seq=1024),
    ),
    _moe(
        "moe-tiny",
        "mixture of experts for tests: llama-tiny whose MLPs route each token to 2 of 4 SwiGLU "
        "experts (torch.topk + index ops)",
        MoEConfig(LlamaConfig(2, 64, 4, 2, 64, 256, max_seq=128), experts=4, top_k=2),
    ),
]

ZOO: dict[str, ZooEntry] = {entry.name: entry for entry in sorted(_ENTRIES, key=lambda e: e.name)}
"""Every built-in model by name, sorted by name."""


def list_models() -> list[tuple[str, str]]:
    """``(name, description)`` of every built-in model, sorted by name."""
    return [(entry.name, entry.description) for entry in ZOO.values()]
