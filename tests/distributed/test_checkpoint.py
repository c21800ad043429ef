"""Checkpoints of compiled programs on spawned gloo ranks, and training without a target.

- A dp=2 x pp=2 x tp=2 HF LLaMA trains 2 steps (SGD with momentum), is saved with
  ``torch.distributed.checkpoint``, trains 2 more; new processes on the same mesh load the
  checkpoint and train the same 2 steps bit for bit; new processes on pp=2 alone load it and
  continue like one process trained 4 steps (rtol 1e-5: weights and momentum carry across meshes).
- ``full_state_dict()`` is the model's ``state_dict()`` (tied GPT-2 and T5, a BatchNorm CNN):
  the same keys in the same order and values, loadable strictly into the model;
  ``load_state_dict`` of a whole state dict goes back, on pp=2 and as TP shards on tp=2.
- ``step()`` without a target: the loss the model computes itself.

Spawns: 8 ranks twice (save, resume) and 2 ranks once for everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.tensor import DTensor

from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.runtime.launch import training_batch
from tests._mesh_cases import Case, reference, run_spawn
from tests.models import FAST_LINK, HF_CONFIGS

STEPS = 2
SAVED_ON = "dp=2,pp=2,tp=2"
LLAMA = HF_CONFIGS["hf:llama"].replace("num_hidden_layers=2", "num_hidden_layers=1")
"""One layer (the pipeline cuts inside it): 8 ranks on 2 cores trace it twice each."""
ROUND_TRIP = {
    "hf:gpt2": HF_CONFIGS["hf:gpt2"],  # lm_head.weight tied to the embedding
    "hf:t5": "num_layers=1,num_decoder_layers=1,d_model=32,d_kv=8,d_ff=64,num_heads=4,"
    "vocab_size=64,dropout_rate=0",  # encoder and decoder embed_tokens tied to shared.weight
    "tests.models:bn_cnn": None,  # BatchNorm running statistics, an unread buffer
}


def _load(name: str, config: str | None) -> Any:
    overrides = parse_config_overrides(config) if config else None
    if ":" in name and not name.startswith("hf:"):
        return load_model(name, device="cpu", seed=0)
    return load_model(name, device="cpu", batch=4, seq=8, config=overrides, seed=0)


def _llama(_name: str = "") -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any, Any]:
    loaded = load_model(
        "hf:llama",
        device="cpu",
        batch=8,
        seq=16,
        config=parse_config_overrides(LLAMA),
        seed=0,
    )
    target, loss_fn = training_batch(loaded, 0)
    return loaded.model.train(), loaded.example_inputs, dict(loaded.example_kwargs), target, loss_fn


def _denoiser(_name: str = "") -> tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any, Any]:
    loaded = load_model("tests.models:denoiser", device="cpu", seed=0)
    return loaded.model.train(), loaded.example_inputs, {}, None, _mean


def _mean(per_sample: torch.Tensor) -> torch.Tensor:
    return per_sample.mean()


def _sgd(params: Any, _kind: str = "") -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def _micro_batches(mesh: str) -> int:
    return 2 if "dp=2" in mesh else 4  # micro-batches of 2 samples either way


def _other(state: dict[str, Any]) -> dict[str, Any]:
    """Another state dict of the same model: every value moved."""
    return {k: v + 0.5 if v.is_floating_point() else v + 1 for k, v in state.items()}


# -- what the ranks run ------------------------------------------------------------------------


def _run_case(kind: str, mesh: str, name: str, path: str) -> dict[str, Any]:
    cases: dict[str, Callable[[str, str, str], dict[str, Any]]] = {
        "save": _save,
        "resume": _resume,
        "round-trip": _round_trip,
        "tp-round-trip": _tp_round_trip,
        "no-target": _no_target,
        "sharded-resume": _sharded_resume,
    }
    return cases[kind](mesh, name, path)


def _compile(setup: Any, mesh: str, **kwargs: Any) -> Any:
    import autopart.runtime.program as runtime

    model, x, kw, _, loss_fn = setup()
    return runtime.compile(
        model, mesh, example_inputs=x, example_kwargs=kw, loss_fn=loss_fn, **kwargs
    )


def _train(program: Any, optimizer: torch.optim.Optimizer, setup: Any) -> list[float]:
    _, x, kw, target, _ = setup()
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        optimizer.step()
    return losses


def _save(mesh: str, _name: str, path: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    program = _compile(
        _llama, mesh, micro_batches=_micro_batches(mesh), schedule="1f1b", device=FAST_LINK
    )
    optimizer = _sgd(program.parameters())
    losses = _train(program, optimizer, _llama)
    state = {"model": program.state_dict(), "optim": program.optimizer_state_dict(optimizer)}
    dcp.save(state, checkpoint_id=path)
    saved = program.full_state_dict()
    losses += _train(program, optimizer, _llama)
    final = program.full_state_dict()
    program.load_state_dict(saved)  # whole tensors into the sharded program: each rank its shards
    reloaded = program.full_state_dict()
    assert program.plan.tp is not None
    return {
        "losses": losses,
        "saved": saved,
        "state": final,
        "reloaded": reloaded,
        "sharding": dict(program.plan.tp.sharding),
    }


def _resume(mesh: str, _name: str, path: str) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    program = _compile(
        _llama, mesh, micro_batches=_micro_batches(mesh), schedule="1f1b", device=FAST_LINK
    )
    optimizer = _sgd(program.parameters())
    state = {"model": program.state_dict(), "optim": program.optimizer_state_dict(optimizer)}
    dcp.load(state, checkpoint_id=path)
    program.load_state_dict(state["model"])
    program.load_optimizer_state_dict(optimizer, state["optim"])
    loaded = program.full_state_dict()
    losses = _train(program, optimizer, _llama)
    return {"loaded": loaded, "losses": losses, "state": program.full_state_dict()}


def _round_trip(mesh: str, name: str, _path: str) -> dict[str, Any]:
    loaded = _load(name, ROUND_TRIP[name])

    def setup() -> tuple[Any, ...]:
        return loaded.model, loaded.example_inputs, dict(loaded.example_kwargs), None, None

    program = _compile(setup, mesh, micro_batches=1)  # one micro-batch: no second trace
    whole = program.full_state_dict()
    other = _other(loaded.model.state_dict())
    program.load_state_dict(other)
    return {"whole": whole, "other": other, "back": program.full_state_dict()}


def _tp_round_trip(mesh: str, name: str, path: str) -> dict[str, Any]:
    """GPT-2 on tp=2: a whole state dict loads as shards; DCP saves S(k) shards as DTensors and
    the grouped fused QKV whole, and loads them back."""
    import torch.distributed.checkpoint as dcp

    loaded = _load(name, HF_CONFIGS[name])

    def setup() -> tuple[Any, ...]:
        return loaded.model, loaded.example_inputs, dict(loaded.example_kwargs), None, None

    program = _compile(setup, mesh, micro_batches=1, device=FAST_LINK)
    whole = program.full_state_dict()
    sharded = program.state_dict()
    kinds = {k: type(v).__name__ for k, v in sharded.items()}
    dcp.save(sharded, checkpoint_id=path)
    other = _other(loaded.model.state_dict())
    program.load_state_dict(other)
    changed = program.full_state_dict()
    again = program.state_dict()
    dcp.load(again, checkpoint_id=path)
    program.load_state_dict(again)
    assert program.plan.tp is not None
    return {
        "whole": whole,
        "other": other,
        "changed": changed,
        "back": program.full_state_dict(),
        "kinds": kinds,
        "placements": dict(program.plan.tp.placements),
    }


def _sharded_resume(mesh: str, name: str, path: str) -> dict[str, Any]:
    """FSDP2's shards through DCP (an fsdp axis, or bf16-mixed precision on any mesh): train 2
    steps, save, train 2 more; a fresh program loads the checkpoint and trains the same 2 steps;
    a whole state dict loads as shards."""
    import torch.distributed.checkpoint as dcp

    precision = "bf16-mixed" if "+bf16-mixed" in name else None

    def fresh() -> tuple[Any, torch.optim.Optimizer]:
        schedule = "1f1b" if "pp=" in mesh else "gpipe"
        program = _compile(
            _llama,
            mesh,
            micro_batches=_micro_batches(mesh),
            schedule=schedule,
            device=FAST_LINK,
            precision=precision,
        )
        return program, _sgd(program.parameters())

    program, optimizer = fresh()
    _train(program, optimizer, _llama)
    sharded = program.state_dict()
    dcp.save(
        {"model": sharded, "optim": program.optimizer_state_dict(optimizer)}, checkpoint_id=path
    )
    saved = program.full_state_dict()
    losses = _train(program, optimizer, _llama)
    again, again_optimizer = fresh()
    state = {"model": again.state_dict(), "optim": again.optimizer_state_dict(again_optimizer)}
    dcp.load(state, checkpoint_id=path)
    again.load_state_dict(state["model"])
    again.load_optimizer_state_dict(again_optimizer, state["optim"])
    loaded = again.full_state_dict()
    resumed = _train(again, again_optimizer, _llama)
    resumed_state = again.full_state_dict()
    again.load_state_dict(saved)  # whole tensors into FSDP's shards
    return {
        "saved": saved,
        "losses": losses,
        "state": program.full_state_dict(),
        "loaded": loaded,
        "resumed": resumed,
        "resumed_state": resumed_state,
        "reloaded": again.full_state_dict(),
        "kinds": sorted({type(v).__name__ for v in sharded.values()}),
        "meshes": sorted(
            {
                "x".join(v.device_mesh.mesh_dim_names or ())
                for v in sharded.values()
                if isinstance(v, DTensor)
            }
        ),
    }


def _no_target(mesh: str, _name: str, _path: str) -> dict[str, Any]:
    program = _compile(_denoiser, mesh, micro_batches=4, schedule="gpipe")
    optimizer = _sgd(program.parameters())
    _, x, _, _, _ = _denoiser()
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        losses.append(program.step(*x))  # no target: the loss is loss_fn(output)
        optimizer.step()
    state = program.full_state_dict()
    import autopart.runtime.program as runtime

    model, _, _, _, _ = _denoiser()
    needs_target = runtime.compile(
        model, mesh, example_inputs=x, loss_fn=torch.nn.functional.mse_loss, micro_batches=1
    )
    try:
        needs_target.step(*x)
        refused = "no error"
    except runtime.RuntimeSetupError as exc:  # on every rank: none is left waiting
        refused = str(exc)
    return {"losses": losses, "state": state, "refused": refused}


# -- spawns --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("checkpoint")


@pytest.fixture(scope="module")
def saved(checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """8 ranks: train 2 steps, save, train 2 more (the uninterrupted run)."""
    case: Case = ("save", SAVED_ON, "hf:llama", str(checkpoint_dir / "llama"))
    (got,) = run_spawn(8, [case], _run_case, tmp_path_factory.mktemp("save"), 240.0)
    assert "error" not in got, got["error"]
    return got


@pytest.fixture(scope="module")
def resumed_same_mesh(
    saved: dict[str, Any], checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """New processes on the same 8 ranks: load the checkpoint, train 2 steps."""
    case: Case = ("resume", SAVED_ON, "hf:llama", str(checkpoint_dir / "llama"))
    (got,) = run_spawn(8, [case], _run_case, tmp_path_factory.mktemp("resume"), 240.0)
    return got


TEST_OF_KIND = {
    "round-trip": "test_full_state_dict_is_the_models_state_dict",
    "tp-round-trip": "test_tp_shards_round_trip_through_dcp",
    "no-target": "test_step_without_a_target",
    "resume": "test_resume_on_another_mesh_continues_from_the_same_weights",
    "sharded-resume": "test_fsdp_shards_save_and_resume_through_dcp",
}
"""The test that reads each kind of 2-rank case (a case runs when its test is selected)."""

TWO_RANKS: list[Case] = [
    *[("round-trip", "pp=2", name, "") for name in ROUND_TRIP],
    ("tp-round-trip", "tp=2", "hf:gpt2", "gpt2-tp"),
    ("no-target", "pp=2", "tests.models:denoiser", ""),
    ("resume", "pp=2", "hf:llama", "llama"),  # needs the 8-rank checkpoint
    ("sharded-resume", "fsdp=2", "hf:llama", "llama-fsdp"),
    ("sharded-resume", "pp=2", "hf:llama+bf16-mixed", "llama-mixed"),  # FSDP2 on a 1-rank axis
    ("sharded-resume", "tp=2", "hf:llama+bf16-mixed+tp", "llama-mixed-tp"),  # FSDP2 over TP shards
]


@pytest.fixture(scope="module")
def two_ranks(
    request: pytest.FixtureRequest, checkpoint_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str, str], dict[str, Any]]:
    """Every selected 2-rank case, in one spawn on first use."""
    wanted = {
        item.originalname for item in request.session.items if isinstance(item, pytest.Function)
    }
    todo = [c for c in TWO_RANKS if TEST_OF_KIND[c[0]] in wanted]
    if any(c[0] == "resume" for c in todo):
        request.getfixturevalue("saved")  # the checkpoint it resumes from
    cases = [(k, m, n, str(checkpoint_dir / p) if p else "") for k, m, n, p in todo]
    got = run_spawn(2, cases, _run_case, tmp_path_factory.mktemp("two"), 90.0, keep_going=True)
    results = {(c[0], c[2]): r for c, r in zip(todo, got)}

    def get(kind: str, name: str) -> dict[str, Any]:
        result = results[kind, name]
        assert "error" not in result, result["error"]
        return result

    return get


# -- tests ---------------------------------------------------------------------------------------


def _assert_equal(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for k, t in got.items():
        assert torch.equal(t, want[k]), k


def _assert_close(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert list(got) == list(want)
    for n, t in got.items():
        torch.testing.assert_close(t, want[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_resume_on_the_same_mesh_is_bit_exact(
    saved: dict[str, Any], resumed_same_mesh: dict[str, Any]
) -> None:
    assert {"col", "row"} <= set(saved["sharding"].values())  # TP really splits the model
    # the uninterrupted run trains like one process (4 micro-batches of 2 per step)
    want = reference(_llama, _sgd, "", "", 4, 2 * STEPS)
    assert saved["losses"] == pytest.approx(want.losses, rel=1e-5)
    _assert_close(saved["state"], want.state)
    _assert_equal(saved["reloaded"], saved["saved"])  # load_state_dict(whole) on the 8 ranks
    got = resumed_same_mesh
    assert "error" not in got, got["error"]
    _assert_equal(got["loaded"], saved["saved"])
    assert got["losses"] == saved["losses"][STEPS:]  # bit for bit
    _assert_equal(got["state"], saved["state"])


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_resume_on_another_mesh_continues_from_the_same_weights(
    saved: dict[str, Any], two_ranks: Callable[[str, str], dict[str, Any]]
) -> None:
    got = two_ranks("resume", "hf:llama")
    _assert_equal(got["loaded"], saved["saved"])  # DCP re-cut the TP shards into whole tensors
    # and the momentum carried over: the next two steps are those of one process's 4 steps
    want = reference(_llama, _sgd, "", "", 4, 2 * STEPS)
    assert got["losses"] == pytest.approx(want.losses[STEPS:], rel=1e-5)
    _assert_close(got["state"], want.state)


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_full_state_dict_is_the_models_state_dict(
    two_ranks: Callable[[str, str], dict[str, Any]], name: str
) -> None:
    got = two_ranks("round-trip", name)
    model = _load(name, ROUND_TRIP[name]).model
    _assert_equal(got["whole"], model.state_dict())  # aliases and persistent buffers, in order
    model.load_state_dict(got["whole"])  # strict
    _assert_equal(got["back"], got["other"])  # program.load_state_dict(whole state dict)


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_tp_shards_round_trip_through_dcp(two_ranks: Callable[[str, str], dict[str, Any]]) -> None:
    got = two_ranks("tp-round-trip", "hf:gpt2")
    model = _load("hf:gpt2", HF_CONFIGS["hf:gpt2"]).model
    _assert_equal(got["whole"], model.state_dict())
    _assert_equal(got["changed"], got["other"])  # whole tensors loaded as this rank's shards
    _assert_equal(got["back"], got["whole"])  # and the DCP checkpoint loaded back
    # a plain split is a DTensor, the fused QKV (split in 3 groups) is saved whole
    assert got["placements"]["transformer_h_0_mlp_c_fc_weight"] == "S(1)"
    assert got["kinds"]["transformer.h.0.mlp.c_fc.weight"] == "DTensor"
    assert got["placements"]["transformer_h_0_attn_c_attn_weight"] == "S(1,groups=3)"
    assert got["kinds"]["transformer.h.0.attn.c_attn.weight"] == "Tensor"


@pytest.mark.distributed
@pytest.mark.timeout(600)
def test_step_without_a_target(two_ranks: Callable[[str, str], dict[str, Any]]) -> None:
    got = two_ranks("no-target", "tests.models:denoiser")
    want = reference(_denoiser, _sgd, "", "", 4, STEPS)
    assert got["losses"] == pytest.approx(want.losses, rel=1e-5)
    _assert_close(got["state"], want.state)
    # a loss that needs a target, called without one: the cause and the fix, on every rank
    assert "got no target" in got["refused"] and "mse_loss takes other arguments" in got["refused"]
    assert "pass target=" in got["refused"]


def test_a_state_dict_of_another_model_is_a_clear_error() -> None:
    from autopart.runtime.checkpoint import CheckpointError, ShardedState
    from autopart.runtime.stage_io import StateLayout

    layout = StateLayout({"a.weight": "a.weight", "b": "b"}, {"b": torch.ones(1)})
    state = ShardedState([], layout, None)
    with pytest.raises(CheckpointError, match=r"1 key\(s\) missing \('b'\).*1 unexpected"):
        state.load_state_dict({"c": torch.ones(1)})


@pytest.mark.distributed
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("mesh", "name"),
    [("fsdp=2", "hf:llama"), ("pp=2", "hf:llama+bf16-mixed"), ("tp=2", "hf:llama+bf16-mixed+tp")],
)
def test_fsdp_shards_save_and_resume_through_dcp(
    two_ranks: Callable[[str, str], dict[str, Any]], mesh: str, name: str
) -> None:
    got = two_ranks("sharded-resume", name)
    assert "DTensor" in got["kinds"]  # FSDP's shards, saved as they are
    # under tp, TP's shards are saved over the tp mesh (gathered from FSDP's pieces first)
    assert ("tp" in got["meshes"]) == mesh.startswith("tp"), got["meshes"]
    _assert_equal(got["loaded"], got["saved"])
    assert got["resumed"] == got["losses"]  # bit for bit, momentum included
    _assert_equal(got["resumed_state"], got["state"])
    _assert_equal(got["reloaded"], got["saved"])  # a whole state dict, cut into the shards
