"""The model zoo and MODEL string resolution (autopart.models.zoo, autopart.models.model_spec)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from autopart.errors import AutopartError, ModelSpecError
from autopart.models import model_spec
from autopart.models.model_spec import LoadedModel, list_models, load_model, parse_config_overrides
from autopart.models.zoo import ZOO

SMALL_ZOO = ["mlp", "cnn", "gpt2-tiny", "llama-tiny", "heavy-head"]
HF_SMALL = {
    "gpt2": {"n_layer": "2", "n_embd": "64", "n_head": "2", "vocab_size": "256"},
    "llama": {
        "num_hidden_layers": "2",
        "hidden_size": "64",
        "intermediate_size": "128",
        "num_attention_heads": "4",
        "num_key_value_heads": "2",
        "vocab_size": "256",
    },
    "bert": {
        "num_hidden_layers": "2",
        "hidden_size": "64",
        "intermediate_size": "128",
        "num_attention_heads": "4",
        "vocab_size": "256",
    },
}


def _load_small(spec: str, **kwargs: object) -> LoadedModel:
    kwargs.setdefault("batch", 2)
    kwargs.setdefault("seq", 16)
    kwargs.setdefault("device", "cpu")
    return load_model(spec, **kwargs)  # type: ignore[arg-type]


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- the zoo ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt2", 124_439_808),
        ("gpt2-medium", 354_823_168),
        ("gpt2-large", 774_030_080),
        ("gpt2-xl", 1_557_611_200),
        ("llama-7b", 6_738_415_616),
        ("llama-70b", 70_553_706_496),
    ],
)
def test_parameter_counts_match_the_published_models(name: str, expected: int) -> None:
    loaded = load_model(name, device="meta", batch=1)
    assert _n_params(loaded.model) == expected
    assert all(p.is_meta for p in loaded.model.parameters())
    assert all(x.is_meta for x in loaded.example_inputs)


def test_gpt2_lm_head_is_tied_to_the_token_embedding() -> None:
    model: Any = load_model("gpt2", device="meta").model
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [name for name, _ in model.named_parameters()]
    assert "transformer.h.0.attn.c_attn.weight" in names and "lm_head.weight" not in names


def test_llama_module_names_follow_hugging_face() -> None:
    names = dict(load_model("llama-70b", device="meta").model.named_parameters())
    assert tuple(names["model.layers.0.self_attn.k_proj.weight"].shape) == (
        1024,
        8192,
    )  # 8 kv heads
    for suffix in ("q_proj", "o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        assert any(n.startswith("model.layers.79.") and suffix in n for n in names)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(names)


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_small_models_run_export_and_trace_on_cpu(name: str) -> None:
    loaded = _load_small(name)
    out = loaded.model(*loaded.example_inputs)
    expected_shape = {
        "mlp": (2, 10),
        "cnn": (2, 10, 32, 32),
        "gpt2-tiny": (2, 16, 256),
        "llama-tiny": (2, 16, 256),
        "heavy-head": (2, 16, 65536),
    }[name]
    assert tuple(out.shape) == expected_shape
    exported = torch.export.export(loaded.model, loaded.example_inputs, strict=False)
    torch.testing.assert_close(exported.module()(*loaded.example_inputs), out)
    traced = torch.fx.symbolic_trace(loaded.model)
    torch.testing.assert_close(traced(*loaded.example_inputs), out)


def test_llama_70b_exports_on_the_meta_device() -> None:
    # One layer is enough to check meta export; the 80-layer timing lives in benchmarks/.
    from autopart.models.zoo.llama import Llama, LlamaConfig

    with torch.device("meta"):
        model = Llama(LlamaConfig(1, 8192, 64, 8, 28672, 128256, max_seq=8192, rope_theta=5e5))
    ids = torch.empty((1, 128), dtype=torch.long, device="meta")
    exported = torch.export.export(model, (ids,), strict=False)
    (out,) = next(n for n in exported.graph.nodes if n.op == "output").args[0]
    assert tuple(out.meta["val"].shape) == (1, 128, 128256)


@pytest.mark.parametrize("name", SMALL_ZOO)
def test_same_seed_gives_identical_weights_and_inputs(name: str) -> None:
    torch.manual_seed(123)
    rng_before = torch.random.get_rng_state()
    a, b, c = (_load_small(name, seed=seed) for seed in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building touched the global RNG"
    for (key, x), y in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(x, y), key
    assert all(torch.equal(x, y) for x, y in zip(a.example_inputs, b.example_inputs, strict=True))
    assert any(
        not torch.equal(x, y)
        for x, y in zip(a.model.state_dict().values(), c.model.state_dict().values(), strict=True)
    )


def _hf_twin(name: str) -> torch.nn.Module:
    """The Hugging Face model with the same config as a tiny zoo model, holding its weights."""
    transformers = pytest.importorskip("transformers")
    ours = _load_small(name).model
    if name == "gpt2-tiny":
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128
        )
        conv1d = ("c_attn.weight", "c_proj.weight", "c_fc.weight")  # HF stores these as (in, out)
        state = {k: v.t() if k.endswith(conv1d) else v for k, v in ours.state_dict().items()}
    else:
        cfg = transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=128,
            rms_norm_eps=1e-5,
        )
        state = ours.state_dict()
    cfg.use_cache = False
    theirs = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not unexpected and all(not k.endswith("weight") for k in missing), missing
    return theirs.eval()


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny"])
def test_zoo_transformers_compute_what_hugging_face_computes(name: str) -> None:
    loaded = _load_small(name)
    theirs = _hf_twin(name)
    torch.testing.assert_close(
        loaded.model(*loaded.example_inputs), theirs(*loaded.example_inputs).logits
    )


def test_seq_longer_than_the_context_is_rejected() -> None:
    with pytest.raises(ModelSpecError, match=r"context of 128 tokens but seq=129.*--seq 128"):
        load_model("gpt2-tiny", seq=129)


def test_list_models_is_sorted_and_describes_every_entry() -> None:
    listed = list_models()
    assert [name for name, _ in listed] == sorted(ZOO) == sorted(name for name, _ in listed)
    assert {"mlp", "cnn", "gpt2", "llama-70b", "heavy-head"} <= set(ZOO)
    assert all(description for _, description in listed)


# -- load_model: zoo names, devices, arguments --------------------------------------------------


def test_zoo_names_are_case_insensitive_and_defaults_apply() -> None:
    loaded = load_model(" GPT2-Tiny ", device="meta")
    assert (loaded.name, loaded.source, loaded.example_kwargs) == ("gpt2-tiny", "zoo", {})
    assert tuple(loaded.example_inputs[0].shape) == (8, 128)
    assert loaded.example_inputs[0].dtype == torch.long


def test_auto_device_builds_big_models_on_meta_and_small_ones_on_cpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert all(p.is_meta for p in load_model("llama-70b").model.parameters())
    assert not next(load_model("mlp", batch=2).model.parameters()).is_meta
    monkeypatch.setattr(model_spec, "_available_ram_bytes", lambda: 0)
    assert next(load_model("mlp", batch=2).model.parameters()).is_meta


def test_dtype_applies_to_weights_and_float_inputs() -> None:
    loaded = load_model("mlp", batch=2, device="cpu", dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.example_inputs[0].dtype == torch.bfloat16


@pytest.mark.parametrize(("arg", "value"), [("batch", 0), ("seq", -3)])
def test_non_positive_batch_or_seq_is_rejected(arg: str, value: int) -> None:
    with pytest.raises(ModelSpecError, match=rf"{arg} must be a positive integer, got {value}"):
        load_model("mlp", **{arg: value})  # type: ignore[arg-type]


def test_unknown_device_is_rejected() -> None:
    with pytest.raises(ModelSpecError, match=r"unknown device 'gpu0'.*'auto', 'meta' or 'cpu'"):
        load_model("mlp", device="gpu0")


def test_unknown_zoo_name_suggests_the_closest_and_lists_the_forms() -> None:
    with pytest.raises(ModelSpecError) as info:
        load_model("gtp2")
    message = str(info.value)
    assert "Did you mean 'gpt2'?" in message and "llama-70b" in message
    for form in ("hf:<model_type>", "path/to/file.py:factory", "package.module:factory"):
        assert form in message
    assert isinstance(info.value, AutopartError) and isinstance(info.value, ValueError)


def test_a_file_name_without_a_factory_says_how_to_name_one() -> None:
    with pytest.raises(ModelSpecError, match=r"name its factory function: model\.py:make_model"):
        load_model("model.py")


def test_config_overrides_on_a_zoo_model_are_rejected() -> None:
    with pytest.raises(
        ModelSpecError, match=r"apply only to hf:<model_type> models.*drop --config"
    ):
        load_model("gpt2", config={"n_layer": "2"})


# -- parse_config_overrides ---------------------------------------------------------------------


def test_parse_config_overrides() -> None:
    assert parse_config_overrides("n_layer=2, n_embd=64") == {"n_layer": "2", "n_embd": "64"}
    assert parse_config_overrides("name=a=b") == {"name": "a=b"}


@pytest.mark.parametrize("text", ["", "n_layer", "n_layer=", "=2", "n_layer=2,,n_head=2"])
def test_malformed_config_overrides_are_rejected(text: str) -> None:
    with pytest.raises(ModelSpecError, match=r"malformed config override .* key=value pairs"):
        parse_config_overrides(text)


def test_duplicate_config_keys_are_rejected() -> None:
    with pytest.raises(ModelSpecError, match=r"'n_layer' is given twice"):
        parse_config_overrides("n_layer=2,n_layer=3")


# -- hf:<model_type> ----------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(HF_SMALL))
def test_hf_models_build_run_and_export(model_type: str) -> None:
    pytest.importorskip("transformers")
    loaded = _load_small(f"hf:{model_type}", config=HF_SMALL[model_type])
    assert (loaded.name, loaded.source) == (f"hf:{model_type}", "hf")
    # what a user trains: causal LMs for decoders, a masked LM for an encoder
    expected_class = {
        "gpt2": "GPT2LMHeadModel",
        "llama": "LlamaForCausalLM",
        "bert": "BertForMaskedLM",
    }
    assert type(loaded.model).__name__ == expected_class[model_type]
    model: Any = loaded.model
    assert model.config.use_cache is False
    (ids,) = loaded.example_inputs
    assert tuple(ids.shape) == (2, 16) and int(ids.max()) < 256
    loaded.model.eval()
    out = loaded.model(*loaded.example_inputs)
    exported = torch.export.export(loaded.model, loaded.example_inputs, strict=False)
    torch.testing.assert_close(exported.module()(*loaded.example_inputs)["logits"], out["logits"])


def test_hf_config_values_are_parsed_and_weights_are_seeded() -> None:
    pytest.importorskip("transformers")
    config = {**HF_SMALL["gpt2"], "layer_norm_epsilon": "1e-4", "scale_attn_weights": "false"}
    a, b = (_load_small("hf:gpt2", config=config) for _ in range(2))
    model: Any = a.model
    cfg = model.config
    assert cfg.n_layer == 2 and cfg.layer_norm_epsilon == 1e-4 and cfg.scale_attn_weights is False
    for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values(), strict=True):
        assert torch.equal(x, y)


def test_hf_default_config_builds_on_meta_when_large() -> None:
    pytest.importorskip("transformers")
    loaded = load_model("hf:llama", device="meta", batch=1, seq=8)
    assert _n_params(loaded.model) == 6_738_415_616 and loaded.example_inputs[0].is_meta


def test_hf_seq_longer_than_the_context_is_rejected() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ModelSpecError, match=r"max_position_embeddings=1024 but seq=2048"):
        load_model("hf:gpt2", seq=2048, config=HF_SMALL["gpt2"])


def test_hf_unknown_model_type_suggests_the_closest() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(
        ModelSpecError, match=r"unknown transformers model_type 'lama'\. Did you mean llama"
    ):
        load_model("hf:lama")


def test_hf_unknown_config_key_is_named() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ModelSpecError, match=r"no key 'n_layr'\. Did you mean 'n_layer'\?"):
        load_model("hf:gpt2", config={"n_layr": "2"})


def test_hf_bad_config_value_is_reported_with_its_cause() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ModelSpecError, match=r"rejected the gpt2 config overrides") as info:
        load_model("hf:gpt2", config={"n_layer": "two"})
    assert info.value.__cause__ is not None


def test_hf_without_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ModelSpecError, match=r"pip install 'autopart\[hf\]'"):
        load_model("hf:gpt2")


# -- path/to/file.py:factory and package.module:factory -----------------------------------------


def _write(path: Path, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


FACTORIES = """
    import torch

    def make():
        '''A linear layer for tests.'''
        return torch.nn.Linear(4, 2), (torch.randn(3, 4),)

    def make_sized(batch=1, seq=5):
        return torch.nn.Linear(seq, 2), [torch.randn(batch, seq)], {}

    def make_meta():
        return torch.nn.Linear(4, 2), (torch.empty(3, 4),)

    def not_a_pair():
        return torch.nn.Linear(4, 2)

    def bare_tensor():
        return torch.nn.Linear(4, 2), torch.randn(3, 4)

    def not_a_module():
        return "model", (torch.randn(3, 4),)

    def bad_kwargs():
        return torch.nn.Linear(4, 2), (torch.randn(3, 4),), [1]

    def boom():
        raise RuntimeError("out of coffee")
"""


@pytest.fixture
def factory_file(tmp_path: Path) -> Path:
    return _write(tmp_path / "my_models.py", FACTORIES)


def test_file_factory(factory_file: Path) -> None:
    loaded = load_model(f"{factory_file}:make")
    assert (loaded.source, loaded.description) == ("factory", "A linear layer for tests.")
    assert isinstance(loaded.model, torch.nn.Linear) and isinstance(loaded.example_inputs, tuple)
    again = load_model(f"{factory_file}:make")
    assert torch.equal(loaded.model.state_dict()["weight"], again.model.state_dict()["weight"])


def test_file_factory_receives_batch_and_seq_when_it_accepts_them(factory_file: Path) -> None:
    loaded = load_model(f"{factory_file}:make_sized", batch=3, seq=7)
    assert tuple(loaded.example_inputs[0].shape) == (3, 7) and loaded.example_kwargs == {}
    with pytest.raises(ModelSpecError, match=r"does not take a 'batch' argument.*drop --batch"):
        load_model(f"{factory_file}:make", batch=3)


def test_file_factory_on_meta(factory_file: Path) -> None:
    loaded = load_model(f"{factory_file}:make_meta", device="meta")
    assert all(p.is_meta for p in loaded.model.parameters()) and loaded.example_inputs[0].is_meta


def test_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "autopart_test_pkg" / "__init__.py", "")
    _write(tmp_path / "autopart_test_pkg" / "models.py", FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("autopart_test_pkg.models:make")
    assert loaded.name == "autopart_test_pkg.models:make" and loaded.source == "factory"
    with pytest.raises(ModelSpecError, match=r"no module named 'autopart_test_pkg\.nope'"):
        load_model("autopart_test_pkg.nope:make")


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("not_a_pair", r"returned Linear; it must return \(model, example_inputs\)"),
        ("bare_tensor", r"returned Tensor as example_inputs; .* e\.g\. \(x,\)"),
        ("not_a_module", r"returned str as the model; .*torch\.nn\.Module"),
        ("bad_kwargs", r"returned list as example_kwargs; it must be a dict"),
        ("missing", r"has no function 'missing'; functions there: bad_kwargs, bare_tensor, boom"),
    ],
)
def test_bad_factories_are_explained(factory_file: Path, factory: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        load_model(f"{factory_file}:{factory}")


def test_an_exception_inside_the_factory_is_chained(factory_file: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"raised RuntimeError: out of coffee") as info:
        load_model(f"{factory_file}:boom")
    assert isinstance(info.value.__cause__, RuntimeError)


def test_missing_file_and_broken_file(tmp_path: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"no such file .*nowhere\.py.*check the path"):
        load_model(f"{tmp_path}/nowhere.py:make")
    broken = _write(tmp_path / "broken.py", "import torch\nraise ImportError('no gpu today')\n")
    with pytest.raises(ModelSpecError, match=r"importing .*broken\.py raised ImportError: no gpu"):
        load_model(f"{broken}:make")


def test_malformed_factory_spec() -> None:
    with pytest.raises(
        ModelSpecError, match=r"malformed model 'pkg\.mod:'.*package\.module:factory"
    ):
        load_model("pkg.mod:")


def test_hf_model_without_sdpa_falls_back_to_eager_attention() -> None:
    """BLOOM has no sdpa attention (its ALiBi lives in the eager one): a causal LM still."""
    pytest.importorskip("transformers")
    loaded = load_model(
        "hf:bloom",
        config={"n_layer": "1", "hidden_size": "32", "n_head": "2", "vocab_size": "64"},
        batch=2,
        seq=8,
        device="cpu",
    )
    assert type(loaded.model).__name__ == "BloomForCausalLM"
    assert loaded.model(*loaded.example_inputs).logits.shape == (2, 8, 64)


@pytest.mark.parametrize(
    ("model_type", "config", "cls"),
    [
        (
            "t5",
            "num_layers=1,d_model=32,d_ff=64,num_heads=2,d_kv=16,vocab_size=64",
            "T5ForConditionalGeneration",
        ),
        (
            "bart",
            "encoder_layers=1,decoder_layers=1,d_model=32,encoder_ffn_dim=64,decoder_ffn_dim=64,encoder_attention_heads=2,decoder_attention_heads=2,vocab_size=64",
            "BartForConditionalGeneration",
        ),
    ],
)
def test_hf_encoder_decoder_is_a_seq2seq_lm_reading_decoder_ids(
    model_type: str, config: str, cls: str
) -> None:
    pytest.importorskip("transformers")
    loaded = load_model(
        f"hf:{model_type}", config=parse_config_overrides(config), batch=2, seq=8, device="cpu"
    )
    assert type(loaded.model).__name__ == cls
    assert set(loaded.example_kwargs) == {"decoder_input_ids"}
    ids = loaded.example_kwargs["decoder_input_ids"]
    assert (
        ids.shape == (2, 8)
        and ids.dtype == torch.long
        and not torch.equal(ids, loaded.example_inputs[0])
    )
    out = loaded.model(*loaded.example_inputs, **loaded.example_kwargs)
    assert out.logits.shape == (2, 8, 64)
    meta = load_model(
        f"hf:{model_type}", config=parse_config_overrides(config), batch=2, seq=8, device="meta"
    )
    assert meta.example_kwargs["decoder_input_ids"].device.type == "meta"


def test_list_values_in_config_overrides() -> None:
    parsed = parse_config_overrides("hidden_sizes=[16,32],depths=[1, 1],layer_type=basic")
    assert parsed == {"hidden_sizes": "[16,32]", "depths": "[1, 1]", "layer_type": "basic"}
    assert model_spec._parse_value("[16,32]") == [16, 32]
    assert model_spec._parse_value("[]") == []


def test_hugging_face_heads_and_inputs_by_modality() -> None:
    # what a user trains from each config: a masked LM for an encoder, an image classifier for a
    # vision model fed random images of the config's size
    pytest.importorskip("transformers")
    from autopart.runtime.launch import training_batch

    small = "num_hidden_layers=1,hidden_size=32,intermediate_size=64,num_attention_heads=2"
    bert = load_model(
        "hf:bert", batch=2, seq=8, config=parse_config_overrides(f"{small},vocab_size=64")
    )
    assert type(bert.model).__name__ == "BertForMaskedLM"
    vit = load_model(
        "hf:vit",
        batch=2,
        config=parse_config_overrides(f"{small},image_size=16,patch_size=8"),
        device="cpu",
    )
    assert type(vit.model).__name__ == "ViTForImageClassification"
    (pixels,) = vit.example_inputs
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == torch.float32
    target, loss_fn = training_batch(vit)
    assert target.shape == (2,) and target.dtype == torch.long
    assert float(loss_fn(vit.model(pixels), target)) > 0
    resnet = load_model(
        "hf:resnet",
        batch=2,
        config=parse_config_overrides("embedding_size=8,hidden_sizes=[8,16],depths=[1,1]"),
        device="meta",
    )
    assert resnet.example_inputs[0].shape == (2, 3, 32, 32)  # no image_size in its config
    with pytest.raises(ModelSpecError, match=r"neither token ids .* nor images"):
        load_model("hf:encodec", device="meta")
