"""The model-family matrix on pp=2 with micro-batches of one sample, and each program's checkpoint
round trip: on spawned gloo ranks, for 16 ``transformers`` families (decoder LMs, encoder-decoders,
a masked-LM encoder, a vision transformer, a ResNet with BatchNorm, a state-space model) and plain
PyTorch models, the compiled program's loss, every parameter and every buffer after two optimizer
steps equal the unpartitioned model's when it runs the same micro-batches in the same order (rtol
1e-5, float32). Each case then checks the checkpoint round trip: ``full_state_dict()`` has the
model's ``state_dict()`` keys in its order, loads strictly into a fresh model, and
``program.load_state_dict`` of it gives back the same state. Tensor parallelism of the same
families is in ``test_families_tp.py`` (plus BERT and ViT here), LLaMA's in ``test_runtime_tp.py``,
Falcon's in ``test_runtime_inplace.py``. All models are small configs with random weights; nothing
is downloaded. One spawn per mesh runs every case (see :mod:`tests._mesh_cases`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.runtime.launch import training_batch
from tests._mesh_cases import Case, assert_trained_like, reference, results
from tests.distributed.test_families_tp import FAMILIES
from tests.models import FAST_LINK, locked_version

transformers = pytest.importorskip("transformers")

STEPS = 2
BATCH = 4
"""Samples per step (the factories of tests.models bring their own): the pp=2 cases run a step as
micro-batches of one sample."""
_SMALL = "num_hidden_layers=2,hidden_size=64,intermediate_size=128,num_attention_heads=4"
MORE_FAMILIES = {
    # rotary embeddings, GQA, SwiGLU: the reference decoder
    "llama": ("hf:llama", f"{_SMALL},num_key_value_heads=2,vocab_size=128"),
    # attention and MLP in parallel, mlp_output += attention_output in place
    "falcon": (
        "hf:falcon",
        "num_hidden_layers=2,hidden_size=64,num_attention_heads=4,vocab_size=128",
    ),
    # an encoder with a masked-LM head tied to the embedding
    "bert": (
        "hf:bert",
        f"{_SMALL},vocab_size=128,max_position_embeddings=64,hidden_dropout_prob=0,"
        "attention_probs_dropout_prob=0",
    ),
    # a vision transformer: patches, a class token, a classifier head
    "vit": ("hf:vit", f"{_SMALL},image_size=16,patch_size=8,num_labels=5"),
    # convolutions with BatchNorm (running statistics) and in-place residual adds
    "resnet": (
        "hf:resnet",
        "embedding_size=8,hidden_sizes=[8,16],depths=[1,1],layer_type=basic,num_labels=5",
    ),
    # a state-space model: selective scan, no attention
    "mamba": ("hf:mamba", "num_hidden_layers=2,hidden_size=32,state_size=8,vocab_size=128"),
}
PLAIN = ("mlp", "cnn", "tests.models:batchnorm_cnn", "tests.models:inplace_residual")
"""Plain PyTorch models: an MLP, the zoo's CNN, BatchNorm, in-place ops."""
ALL = {**FAMILIES, **MORE_FAMILIES}
ATTENTION_TP = {"bert": (12, 5), "vit": (12, 1)}
"""Families whose tensor parallelism is tested here: (col, row) weight matmuls and embeddings at
the locked transformers."""


def _setup(
    name: str, seed: int = 0
) -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any, Any]:
    if name in ALL:
        spec, config = ALL[name]
        loaded = load_model(
            spec,
            device="cpu",
            batch=BATCH,
            seq=16,
            config=parse_config_overrides(config),
            seed=seed,
        )
    elif ":" in name:  # a factory: its own batch
        loaded = load_model(name, device="cpu", seed=seed)
    else:
        loaded = load_model(name, device="cpu", batch=BATCH, seed=seed)
    loaded.model.train()
    target, loss_fn = training_batch(loaded, seed)
    return loaded.model, tuple(loaded.example_inputs), dict(loaded.example_kwargs), target, loss_fn


def _run_case(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    import autopart.runtime.program as runtime

    model, x, kw, target, loss_fn = _setup(name)
    tp, batch = "tp" in mesh, int(x[0].shape[0])
    program = runtime.compile(
        model,
        mesh,
        example_inputs=x,
        example_kwargs=kw,
        loss_fn=loss_fn,
        schedule=schedule,
        micro_batches=2 if tp else batch,  # pp=2: micro-batches of one sample
        device=FAST_LINK,
        verify=tp,
    )
    optimizer = torch.optim.SGD(list(program.parameters()), lr=0.1)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        optimizer.step()
    state = program.full_state_dict()
    fresh = _setup(name, seed=1)[0]
    fresh.load_state_dict(state, strict=True)  # the model's own keys: a strict load
    program.load_state_dict({k: torch.zeros_like(v) for k, v in state.items()})
    zeroed = program.full_state_dict()
    program.load_state_dict(state)
    again = program.full_state_dict()
    return {
        "losses": losses,
        "state": state,
        "micro_batches": program.plan.micro_batches,
        "batch": batch,
        "zeroed": all(not v.any() for v in zeroed.values()),
        "round_trip": list(again) == list(state)
        and all(torch.equal(again[k], v) for k, v in state.items()),
        "sharding": dict(program.plan.tp.sharding) if program.plan.tp is not None else {},
    }


CASES: list[Case] = [
    *((name, "pp=2", "1f1b" if i % 2 else "gpipe", "sgd") for i, name in enumerate([*ALL, *PLAIN])),
    *((name, "tp=2", "gpipe", "sgd") for name in ATTENTION_TP),
]


@pytest.fixture(scope="module")
def matrix_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_family_trains_and_round_trips",
        CASES,
        _run_case,
        90.0,
        keep_going=True,  # one family's failure must not hide the others'
    )


@pytest.mark.distributed
@pytest.mark.timeout(1500)  # one spawn per mesh runs every case on the first of its cases
@pytest.mark.parametrize(("name", "mesh", "schedule", "opt"), CASES)
def test_family_trains_and_round_trips(
    matrix_results: Callable[[Case], dict[str, Any]], name: str, mesh: str, schedule: str, opt: str
) -> None:
    got = matrix_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    tp = "tp" in mesh
    assert got["micro_batches"] == (2 if tp else got["batch"])
    want = reference(
        _setup,
        lambda params, _: torch.optim.SGD(params, lr=0.1),
        name,
        opt,
        got["micro_batches"],
        STEPS,
    )
    assert_trained_like(got, want)
    assert got["zeroed"] and got["round_trip"]
    if tp:
        counts = Counter(got["sharding"].values())
        if transformers.__version__ == locked_version("transformers"):
            assert (counts["col"], counts["row"]) == ATTENTION_TP[name], dict(counts)
        else:
            assert counts["col"] >= 1 and counts["row"] >= 1, dict(counts)
