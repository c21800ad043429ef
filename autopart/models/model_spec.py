"""Resolve a MODEL string to a model and its example inputs.

Accepted forms:

- a zoo name (case-insensitive), e.g. ``gpt2``, ``llama-70b``, ``mlp`` (see :mod:`autopart.models.zoo`);
- ``hf:<model_type>``, e.g. ``hf:llama``: a transformers model built from its default config plus
  ``config`` overrides, with random weights (nothing is ever downloaded);
- ``path/to/file.py:factory`` or ``package.module:factory``: ``factory()`` returns
  ``(model, example_inputs)`` or ``(model, example_inputs, example_kwargs)``.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from autopart.errors import ModelSpecError
from autopart.models._factory import load_factory
from autopart.models.zoo import DEFAULT_BATCH, DEFAULT_SEQ, ZOO, list_models, seeded_build

_DEFAULT_IMAGE_SIZE = 32
"""Image side for vision configs that do not fix one (ResNets take any size)."""

__all__ = ["LoadedModel", "list_models", "load_model", "parse_config_overrides"]

_FORMS = (
    "hf:<model_type> (a transformers model from its default config, e.g. hf:gpt2, hf:llama, "
    "hf:bert), path/to/file.py:factory, or package.module:factory"
)
# Parameters + gradients in the model dtype, plus Adam's two fp32 moments.
_ADAM_STATE_BYTES_PER_PARAM = 8


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A resolved MODEL string: the model, how to call it, and where it came from."""

    name: str
    model: nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any]
    source: Literal["zoo", "hf", "factory"]
    description: str


def parse_config_overrides(text: str) -> dict[str, str]:
    """Parse ``"n_layer=2,n_embd=64"`` into ``{"n_layer": "2", "n_embd": "64"}``; a list value is
    written in brackets (``"hidden_sizes=[16,32]"``)."""
    overrides: dict[str, str] = {}
    for item in (part.strip() for part in _split_top_level(text)):
        key, sep, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key or not value:
            raise ModelSpecError(
                f"malformed config override {item!r} in {text!r}: write comma-separated "
                "key=value pairs, e.g. --config n_layer=2,n_embd=64"
            )
        if key in overrides:
            raise ModelSpecError(f"config key {key!r} is given twice in {text!r}; keep one of them")
        overrides[key] = value
    return overrides


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def load_model(
    spec: str,
    *,
    batch: int | None = None,
    seq: int | None = None,
    config: Mapping[str, str] | None = None,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> LoadedModel:
    """Build the model that ``spec`` names, with seeded weights and example inputs.

    ``device="auto"`` builds on the meta device when training the model (parameters, gradients and
    Adam state) would need more than half of the available RAM, and on the CPU otherwise; ``"meta"``
    and ``"cpu"`` force it. ``config`` overrides apply to ``hf:`` models only. ``batch`` defaults to
    8 and ``seq`` to 128 (or the model's context length if shorter); a factory receives them only if
    its signature has ``batch`` / ``seq`` parameters.
    """
    for arg, value in (("batch", batch), ("seq", seq)):
        if value is not None and value <= 0:
            raise ModelSpecError(
                f"{arg} must be a positive integer, got {value}; pass e.g. --{arg} 8"
            )
    spec = spec.strip()
    if config and not spec.lower().startswith("hf:"):
        raise ModelSpecError(
            f"config overrides {dict(config)} apply only to hf:<model_type> models, not to {spec!r}; "
            "drop --config, or pick a smaller model from the zoo"
        )
    if spec.lower().startswith("hf:"):
        return _load_hf(spec[3:].strip(), batch, seq, config or {}, device, dtype, seed)
    if ":" in spec:
        on = _resolve_device(device)
        model, inputs, kwargs, description = load_factory(spec, batch, seq, on, seed)
        return LoadedModel(spec, model, inputs, kwargs, "factory", description)
    return _load_zoo(spec, batch, seq, device, dtype, seed)


# -- zoo ----------------------------------------------------------------------------------------


def _load_zoo(
    spec: str, batch: int | None, seq: int | None, device: str, dtype: torch.dtype, seed: int
) -> LoadedModel:
    entry = ZOO.get(spec.lower())
    if entry is None:
        raise ModelSpecError(_unknown_zoo_message(spec))
    batch, seq = batch or DEFAULT_BATCH, seq or entry.default_seq

    def build(on: torch.device) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
        return entry.build(batch, seq, on, dtype, seed)

    model, inputs, kwargs = _build_on(_resolve_device(device), build)
    return LoadedModel(entry.name, model, inputs, kwargs, "zoo", entry.description)


def _unknown_zoo_message(spec: str) -> str:
    hint = ""
    if spec.endswith(".py"):
        hint = f" To load a model from a file, name its factory function: {spec}:make_model."
    else:
        close = difflib.get_close_matches(spec.lower(), list(ZOO), n=1)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    return (
        f"unknown model {spec!r}.{hint} Built-in models: {', '.join(ZOO)}. "
        f"Other accepted forms: {_FORMS}."
    )


# -- device choice ------------------------------------------------------------------------------


def _resolve_device(device: str) -> torch.device | None:
    """``None`` means auto: decide from the model's size."""
    if device == "auto":
        return None
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ModelSpecError(f"unknown device {device!r}; use 'auto', 'meta' or 'cpu'") from e


def _build_on(device: torch.device | None, build: Callable[[torch.device], Any]) -> Any:
    """Build on ``device``; on auto, build on meta (instant), then on the CPU if training fits."""
    if device is not None:
        return build(device)
    built = build(torch.device("meta"))
    if _training_bytes(built[0]) > _available_ram_bytes() // 2:
        return built
    return build(torch.device("cpu"))


def _training_bytes(model: nn.Module) -> int:
    return sum(
        p.numel() * (2 * p.element_size() + _ADAM_STATE_BYTES_PER_PARAM) for p in model.parameters()
    )


def _available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo, else free pages from sysconf; 0 if neither is known."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


# -- hf:<model_type> ----------------------------------------------------------------------------


def _load_hf(
    model_type: str,
    batch: int | None,
    seq: int | None,
    config: Mapping[str, str],
    device: str,
    dtype: torch.dtype,
    seed: int,
) -> LoadedModel:
    try:
        import transformers
    except ImportError as e:
        raise ModelSpecError(
            f"hf:{model_type} needs the transformers package, which is not installed; "
            "run pip install 'autopart[hf]'"
        ) from e
    cfg = _hf_config(transformers, model_type, config)
    if isinstance(getattr(cfg, "vocab_size", None), int):
        build = _hf_token_inputs(transformers, model_type, cfg, batch, seq, dtype, seed)
    elif isinstance(getattr(cfg, "num_channels", None), int):
        build = _hf_image_inputs(transformers, cfg, batch, dtype, seed)
    else:
        raise ModelSpecError(
            f"hf:{model_type} takes neither token ids (no vocab_size) nor images (no "
            "num_channels); autopart builds example inputs for those two only here: write a "
            "path/to/file.py:factory instead"
        )
    model, inputs, kwargs = _build_on(_resolve_device(device), build)
    description = (
        f"transformers {type(model).__name__} from the {model_type} config, random weights"
    )
    return LoadedModel(f"hf:{model_type}", model, inputs, kwargs, "hf", description)


_Build = Callable[[torch.device], tuple[nn.Module, tuple[Any, ...], dict[str, Any]]]


def _hf_token_inputs(
    transformers: Any,
    model_type: str,
    cfg: Any,
    batch: int | None,
    seq: int | None,
    dtype: torch.dtype,
    seed: int,
) -> _Build:
    """A builder of a token model and a random batch of ``batch x seq`` token ids (and decoder
    ids, by keyword, for an encoder-decoder)."""
    vocab_size = cfg.vocab_size
    context = getattr(cfg, "max_position_embeddings", None) or DEFAULT_SEQ
    batch, seq = batch or DEFAULT_BATCH, seq or min(DEFAULT_SEQ, context)
    if seq > context:
        raise ModelSpecError(
            f"hf:{model_type} has max_position_embeddings={context} but seq={seq} was asked for; "
            f"pass --seq {context} or less, or raise it with --config max_position_embeddings=..."
        )

    def build(on: torch.device) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
        with seeded_build(on, seed):
            model = _hf_model(transformers, cfg).to(dtype)
        # an encoder-decoder (t5, bart) also reads the decoder's token ids, by keyword
        decoder = getattr(model.config, "is_encoder_decoder", False)
        if on.type == "meta":
            ids = torch.empty((batch, seq), dtype=torch.long, device=on)
            return model, (ids,), ({"decoder_input_ids": ids} if decoder else {})
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab_size, (batch, seq), generator=gen)
        kwargs = {"decoder_input_ids": torch.randint(0, vocab_size, (batch, seq), generator=gen)}
        return model, (ids.to(on),), ({k: v.to(on) for k, v in kwargs.items()} if decoder else {})

    return build


def _hf_image_inputs(
    transformers: Any, cfg: Any, batch: int | None, dtype: torch.dtype, seed: int
) -> _Build:
    """A builder of an image model and a random batch of ``num_channels x image_size^2`` images
    (``image_size`` from the config; 32 where it has none, as ResNets)."""
    batch = batch or DEFAULT_BATCH
    size = getattr(cfg, "image_size", None) or _DEFAULT_IMAGE_SIZE
    shape = (batch, cfg.num_channels, size, size)

    def build(on: torch.device) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any]]:
        with seeded_build(on, seed):
            model = _hf_model(transformers, cfg).to(dtype)
        if on.type == "meta":
            return model, (torch.empty(shape, dtype=dtype, device=on),), {}
        gen = torch.Generator().manual_seed(seed)
        return model, (torch.randn(shape, generator=gen).to(dtype).to(on),), {}

    return build


def _hf_config(transformers: Any, model_type: str, config: Mapping[str, str]) -> Any:
    known = list(transformers.CONFIG_MAPPING.keys())
    if model_type not in transformers.CONFIG_MAPPING:
        close = difflib.get_close_matches(model_type, known, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelSpecError(
            f"unknown transformers model_type {model_type!r}.{hint} Examples of valid types: "
            f"bert, gpt2, llama, mistral, qwen2, t5 ({len(known)} in all, see "
            "transformers.CONFIG_MAPPING); write it as hf:<model_type>"
        )
    default = transformers.AutoConfig.for_model(model_type)
    valid = {k for k in default.to_dict() if not k.startswith("_")}
    valid |= set(getattr(default, "attribute_map", {}))
    valid |= {"num_labels"}  # a property of every config (it sizes id2label), not a dict key
    for key in config:
        if key not in valid:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ModelSpecError(
                f"{model_type} configs have no key {key!r}.{hint} Valid keys: {', '.join(sorted(valid))}"
            )
    overrides = {key: _parse_value(value) for key, value in config.items()}
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **overrides)
    except Exception as e:
        raise ModelSpecError(
            f"transformers rejected the {model_type} config overrides {dict(config)}: {e}; "
            "fix the --config values"
        ) from e
    cfg.use_cache = False  # a KV-cache object in the outputs breaks torch.export
    return cfg


def _hf_model(transformers: Any, cfg: Any) -> nn.Module:
    """The model a user trains from this config: a sequence-to-sequence LM for an encoder-decoder
    (t5, bart), a masked LM for an encoder (bert), a causal LM for a decoder (gpt2, llama), an
    image classifier for a vision model (vit, resnet); else the bare model."""
    from transformers.models.auto import modeling_auto

    config_class = type(cfg)
    masked = config_class in modeling_auto.MODEL_FOR_MASKED_LM_MAPPING
    seq2seq = getattr(cfg, "is_encoder_decoder", False) and (
        config_class in modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING
    )
    heads = (
        (seq2seq, transformers.AutoModelForSeq2SeqLM),
        (masked and not seq2seq, transformers.AutoModelForMaskedLM),
        (
            config_class in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING and not (masked or seq2seq),
            transformers.AutoModelForCausalLM,
        ),
        (
            config_class in modeling_auto.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING,
            transformers.AutoModelForImageClassification,
        ),
    )
    auto_classes = [auto for applies, auto in heads if applies]
    auto_classes.append(transformers.AutoModel)
    errors = []
    for auto_class in auto_classes:
        # sdpa where the architecture has it; eager for those that do not (BLOOM, whose ALiBi bias
        # transformers applies only in its eager attention)
        for kwargs in ({"attn_implementation": "sdpa"}, {}, {"attn_implementation": "eager"}):
            try:
                return auto_class.from_config(cfg, **kwargs)
            except (ValueError, ImportError) as e:
                errors.append(e)
    raise ModelSpecError(
        f"transformers cannot build a model for {cfg.model_type!r} from its config: {errors[-1]}; "
        "pick another model_type or write a path/to/file.py:factory"
    ) from errors[-1]


def _parse_value(text: str) -> Any:
    """``"2"`` -> 2, ``"0.1"`` -> 0.1, ``"true"`` -> True, ``"none"`` -> None, ``"[16,32]"`` ->
    ``[16, 32]``, else the string."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_parse_value(part.strip()) for part in _split_top_level(inner)] if inner else []
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text
