"""Small models for tests: each one exercises one thing a tracer or a pass must get right."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from autopart.cost_models import get_device

FAST_LINK = dataclasses.replace(
    get_device("h100"), name="fast-link", link_bandwidth_bytes_per_s=1e18, link_latency_s=1e-15
)
"""An H100 whose links are nearly free: the TP ILP splits the tiny test models (on the ``cpu`` cost
model it replicates most of them, and a TP test whose plan replicates everything proves nothing)."""

LOCK = Path(__file__).parents[1] / "requirements" / "lock.txt"


def locked_version(package: str) -> str:
    """The version ``requirements/lock.txt`` pins ``package`` to (the golden files' versions)."""
    for line in LOCK.read_text().splitlines():
        name, _, version = line.partition("==")
        if name.strip().lower() == package:
            return version.strip()
    raise LookupError(f"{package} is not pinned in {LOCK}")


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


class TiedDeep(nn.Module):
    """Tied input/output embeddings with four layers between them: on four stages the two copies
    of the embedding live on the first and the last rank."""

    def __init__(self, vocab: int = 48, dim: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mid = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        for layer in self.mid:
            h = torch.tanh(layer(h))
        return self.head(h)


def tied_deep() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory (``tests.models:tied_deep``): tied embeddings, token ids in."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = TiedDeep()
    return model, (torch.randint(0, 48, (8, 6), generator=torch.Generator().manual_seed(0)),)


def keyword_inputs() -> tuple[nn.Module, tuple[torch.Tensor], dict[str, Any]]:
    """Factory (``tests.models:keyword_inputs``): one input by position, a tensor and a float by
    keyword."""
    model, (x, y) = two_in_two_out()
    return model, (x,), {"y": y, "scale": 2.0}


HF_CONFIGS = {
    # Dropout off: random masks would differ between the pipeline and the reference.
    "hf:gpt2": "n_layer=2,n_embd=64,n_head=4,vocab_size=512,n_positions=64,resid_pdrop=0,embd_pdrop=0,attn_pdrop=0",
    "hf:llama": "num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2,vocab_size=512",
    "hf:mistral": "num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4,num_key_value_heads=2,vocab_size=128,max_position_embeddings=64",
}


def gpt2_padded() -> tuple[nn.Module, tuple[torch.Tensor], dict[str, Any]]:
    """Factory (``tests.models:gpt2_padded``): Hugging Face GPT-2 with ``attention_mask=`` given
    by keyword, two sequences right-padded."""
    from autopart.models.model_spec import load_model, parse_config_overrides

    loaded = load_model(
        "hf:gpt2",
        batch=8,
        seq=16,
        config=parse_config_overrides(HF_CONFIGS["hf:gpt2"]),
        device="cpu",
        seed=0,
    )
    mask = torch.ones(8, 16, dtype=torch.long)
    mask[1, 10:] = 0
    mask[6, 4:] = 0
    return loaded.model, loaded.example_inputs, {"attention_mask": mask}


class LogitsAndAux(nn.Module):
    """Returns ``(logits, aux)``: a router's load-balancing loss (a 0-dim tensor) beside the
    logits, as mixture-of-experts models do. The aux loss is not linear in the batch (the square
    of a batch mean), so a pipeline's micro-batches see other values than the whole batch."""

    def __init__(self, dim: int = 16, experts: int = 4, classes: int = 8) -> None:
        super().__init__()
        self.experts = experts
        self.fc = nn.Linear(dim, 32)
        self.router = nn.Linear(32, experts)
        self.head = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.fc(x))
        share = self.router(h).softmax(-1).mean(0)  # each expert's share of this batch
        return self.head(h), self.experts * (share**2).sum()


def logits_and_aux() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory (``tests.models:logits_and_aux``): logits and a scalar auxiliary loss."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LogitsAndAux()
    return model, (torch.randn(8, 16, generator=torch.Generator().manual_seed(0)),)


def logits_and_aux_loss(output: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor) -> Any:
    """The task loss plus the auxiliary loss, as a mixture-of-experts model trains."""
    logits, aux = output
    return nn.functional.mse_loss(logits, target) + 0.1 * aux


class DictWithNone(nn.Module):
    """Returns a dict with a tensor per sample, a 0-dim mean and a ``None`` field."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        h = torch.tanh(self.a(x))
        return {"y": self.b(h), "h_mean": h.mean(), "cache": None}


def dict_with_none() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory (``tests.models:dict_with_none``): a dict output with a scalar and a None field."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = DictWithNone()
    return model, (torch.randn(8, 8, generator=torch.Generator().manual_seed(0)),)


def dict_with_none_loss(output: dict[str, Any], target: torch.Tensor) -> Any:
    assert output["cache"] is None
    return nn.functional.mse_loss(output["y"], target) + output["h_mean"] ** 2


LOSSES = {
    "tests.models:logits_and_aux": logits_and_aux_loss,
    "tests.models:dict_with_none": dict_with_none_loss,
}
"""Factories whose loss uses more than one output: name -> loss_fn(output, target)."""


def target_and_loss(loaded: Any, seed: int = 0) -> tuple[torch.Tensor, Any]:
    """A seeded random target and the loss for ``loaded`` (a LoadedModel): for a factory of
    :data:`LOSSES` its loss and a target shaped like its first output, else the ones
    ``autopart run`` trains with."""
    from autopart.runtime.launch import training_batch

    if loaded.name not in LOSSES:
        return training_batch(loaded, seed)
    with torch.no_grad():
        first = tree_leaves(loaded.model(*loaded.example_inputs, **loaded.example_kwargs))[0]
    target = torch.randn(first.shape, generator=torch.Generator().manual_seed(seed + 1))
    return target, LOSSES[loaded.name]


def _batch_of_four(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """A Hugging Face LM of ``HF_CONFIGS`` on 4 sequences of 16 tokens: on 4 micro-batches each
    micro-batch is one sequence, whose graph export traces without the batch's no-op expands."""
    from autopart.models.model_spec import load_model, parse_config_overrides

    config = parse_config_overrides(HF_CONFIGS[name])
    loaded = load_model(name, batch=4, seq=16, config=config, device="cpu", seed=0)
    return loaded.model, loaded.example_inputs, dict(loaded.example_kwargs)


def gpt2_batch4() -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """Factory (``tests.models:gpt2_batch4``): HF GPT-2 on a batch of 4 sequences."""
    return _batch_of_four("hf:gpt2")


def llama_batch4() -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """Factory (``tests.models:llama_batch4``): HF LLaMA (GQA) on a batch of 4 sequences."""
    return _batch_of_four("hf:llama")


def mistral_batch4() -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    """Factory (``tests.models:mistral_batch4``): HF Mistral (GQA) on a batch of 4 sequences."""
    return _batch_of_four("hf:mistral")


class ViTLogits(nn.Module):
    """A small ``transformers`` vision transformer classifier that returns its logits."""

    def __init__(self) -> None:
        from transformers import ViTConfig, ViTForImageClassification

        super().__init__()
        config = ViTConfig(
            num_hidden_layers=2,
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=2,
            image_size=16,
            patch_size=4,
            num_labels=10,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTForImageClassification(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.vit(pixel_values).logits


def vit() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory (``tests.models:vit``): on four pipeline ranks the cost model would leave three of
    them without parameters (it keeps nearly all of this tiny model on one stage)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ViTLogits()
    return model, (torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)


class Denoiser(nn.Module):
    """Computes its own loss: each sample's error reconstructing ``x`` from ``x + noise``."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.encode = nn.Linear(dim, 32)
        self.decode = nn.Linear(32, dim)

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        restored = self.decode(torch.relu(self.encode(x + noise)))
        return ((restored - x) ** 2).mean(dim=-1)


def denoiser() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Factory (``tests.models:denoiser``): a self-supervised objective, trained without a target."""
    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Denoiser()
    return model, (torch.randn(8, 16, generator=gen), 0.1 * torch.randn(8, 16, generator=gen))


class EvalBatchNormCNN(nn.Module):
    """Convolutions with BatchNorm (running statistics and ``num_batches_tracked`` buffers) and a
    persistent buffer that no operation reads."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.register_buffer("version", torch.tensor([1, 0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)))
        return self.head(h.mean(dim=(2, 3)))


def bn_cnn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory (``tests.models:bn_cnn``): a BatchNorm CNN in eval mode, with running statistics
    that differ from their initial values."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = EvalBatchNormCNN()
        for bn in (model.bn1, model.bn2):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.num_batches_tracked.fill_(7)
    return model.eval(), (torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


class BatchNormCNN(nn.Module):
    """A plain PyTorch CNN with BatchNorm2d in every block: in train mode each forward writes
    every BatchNorm's running statistics and its batch count in place. (No BatchNorm1d on the
    pooled features: over micro-batches of 2 samples it divides differences of two values by
    about sqrt(eps), which turns float32 noise into visible differences.)"""

    def __init__(self, channels: int = 8, classes: int = 5) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in (channels, channels, 2 * channels):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def batchnorm_cnn() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory (``tests.models:batchnorm_cnn``): three BatchNorm2d, images in."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = BatchNormCNN()
    return model, (torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0)),)


class InplaceResidual(nn.Module):
    """Residual blocks written with in-place ops, as real models write them: ``y += h``, an
    in-place activation, gate weights normalised in place (``div_``), halves written into a fresh
    tensor through views (``copy_`` into slices), and a running mean kept in a buffer (``mul_``,
    ``add_``)."""

    def __init__(self, dim: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.gate = nn.Linear(dim, 2)
        self.experts = nn.ModuleList(nn.Linear(dim, dim // 2) for _ in range(2))
        self.out = nn.Linear(dim, dim)
        self.register_buffer("feature_mean", torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            y = block(h)
            y += h  # the in-place residual of ResNet and Falcon
            h = y.relu_()
        weights = self.gate(h) ** 2
        weights /= weights.sum(-1, keepdim=True)  # routing weights normalised in place
        mixed = torch.zeros_like(h)
        half = h.shape[-1] // 2
        mixed[:, :half] = self.experts[0](h) * weights[:, :1]  # written through a view
        mixed[:, half:].copy_(self.experts[1](h) * weights[:, 1:])
        with torch.no_grad():
            self.feature_mean.mul_(0.9).add_(0.1 * h.mean(0))
        return self.out(mixed + h)


def inplace_residual() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory (``tests.models:inplace_residual``): in-place ops on activations and a buffer."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = InplaceResidual()
    return model, (torch.randn(8, 16, generator=torch.Generator().manual_seed(0)),)


def hf_resnet() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Factory (``tests.models:hf_resnet``): a small ``transformers`` ResNet image classifier with
    random weights (nothing downloaded): BatchNorm after every convolution, ``hidden += residual``
    in place."""
    import transformers

    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=5,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.ResNetForImageClassification(config)
    return model, (torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)),)
