"""bf16 mixed precision in one process: what the policy means (casts, the masters kept), how the
planner costs it (bfloat16 compute, float32 state), the plan file, and the errors. The runtime
against one process under the same policy is tests/distributed/test_mixed_precision.py."""

from __future__ import annotations

import collections
import copy
import json
from pathlib import Path

import pytest
import torch

import autopart
from autopart.cli.main import main
from autopart.cost_models.memory import Optimizer, state_bytes_per_param_byte
from autopart.errors import AutopartError
from autopart.models.model_spec import load_model
from autopart.planning.plans import Plan, PlanError
from autopart.planning.request import PlanRequest
from autopart.precision import Precision, cast_floating, check_master_dtypes, computing_in
from tests.models import HF_CONFIGS

BF16 = torch.bfloat16


def test_mixed_state_is_float32_master_gradient_and_optimizer_state_plus_the_bf16_copies() -> None:
    # per bfloat16 parameter byte: float32 master, gradient and Adam's two moments (2 bytes
    # each), sharded; whole during a step: the bf16 parameter and gradient and the float32
    # gradient the micro-batches accumulate into
    adam = Optimizer.ADAMW.state_bytes_per_param_byte
    assert state_bytes_per_param_byte("adamw", mixed_precision=True) == 2 * adam + 4
    assert state_bytes_per_param_byte("adamw", fsdp=8, mixed_precision=True) == 2 * adam / 8 + 4
    # per parameter (2 bf16 bytes) against float32 FSDP (4 bytes): the same state when sharded
    per_param_mixed = 2 * state_bytes_per_param_byte("adamw", fsdp=8, mixed_precision=True)
    assert per_param_mixed == pytest.approx(4 * state_bytes_per_param_byte("adamw", fsdp=8))


def test_precision_is_checked_and_carried_by_the_plan_file() -> None:
    with pytest.raises(AutopartError, match="unknown precision 'fp8'; use model, bf16-mixed"):
        PlanRequest(precision="fp8")
    loaded = load_model("mlp", device="meta", batch=8)
    plan = autopart.plan(
        loaded.model, loaded.example_inputs, mesh="pp=2", device="h100", precision="bf16-mixed"
    )
    assert plan.precision == "bf16-mixed"
    raw = json.loads(plan.to_json())
    assert raw["precision"] == "bf16-mixed"
    assert Plan.from_json(plan.to_json()) == plan
    model_plan = autopart.plan(loaded.model, loaded.example_inputs, mesh="pp=2", device="h100")
    assert "precision" not in json.loads(model_plan.to_json())  # unchanged files without it
    with pytest.raises(PlanError, match="precision 'fp8' is not one of"):
        Plan.from_dict({**raw, "precision": "fp8"})


def test_the_planner_costs_bf16_compute_and_float32_state() -> None:
    """The same float32 model planned both ways: mixed precision halves the parameter bytes the
    planner sees (and the activations), while the state it holds per parameter is the float32
    masters' plus the bfloat16 copies."""
    loaded = load_model("llama-tiny", device="meta", batch=8)
    common = {"mesh": "pp=2", "device": "h100", "micro_batches": 2, "schedule": "1f1b"}
    fp32 = autopart.plan(loaded.model, loaded.example_inputs, **common)
    mixed = autopart.plan(loaded.model, loaded.example_inputs, precision="bf16-mixed", **common)

    def total(plan: Plan, field: str) -> int:
        return sum(getattr(s, field) for s in plan.stages)

    assert total(mixed, "param_bytes") == total(fp32, "param_bytes") // 2
    # about half: the tiny model also saves integer token ids and the split differs
    assert total(mixed, "activation_bytes") < 0.65 * total(fp32, "activation_bytes")
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())  # restored


def test_computing_in_casts_the_same_parameters_and_gives_their_values_back() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    with computing_in(BF16, model):
        assert list(model.parameters()) == params
        assert {p.dtype for p in model.parameters()} == {BF16}
        assert model[1].running_mean.dtype == torch.float32  # buffers keep their dtype
    for p, v in zip(model.parameters(), values, strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, v)
    with pytest.raises(RuntimeError), computing_in(BF16, model):
        raise RuntimeError("traced badly")
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # back after an error too


def test_cast_floating_casts_floating_tensors_in_any_container_and_keeps_its_kind() -> None:
    pair = collections.namedtuple("pair", "x ids")
    ids = torch.arange(3)
    out = cast_floating({"a": [torch.ones(2), ids], "b": pair(torch.zeros(1), ids)}, BF16)
    assert out["a"][0].dtype == BF16 and out["a"][1] is ids
    assert isinstance(out["b"], pair) and out["b"].x.dtype == BF16
    x = torch.ones(2)
    assert cast_floating(x, None) is x


def test_mixed_precision_needs_float32_masters() -> None:
    model = torch.nn.Linear(2, 2).to(BF16)
    with pytest.raises(AutopartError, match="keeps float32 master parameters, but the model has"):
        check_master_dtypes(model, Precision.BF16_MIXED)
    check_master_dtypes(model, Precision.MODEL)  # pure bf16 training is fine
    with pytest.raises(AutopartError, match="build the model in float32"):
        autopart.plan(model, (torch.ones(4, 2, dtype=BF16),), mesh="pp=1", precision="bf16-mixed")


def test_the_traced_graph_computes_as_the_eager_model_under_the_policy() -> None:
    """The graph the program runs, traced with bfloat16 parameters, against the eager model with
    bfloat16 parameters: the same loss, and gradients within bfloat16's rounding (LLaMA's traced
    attention takes another mask path than eager, which rounds differently)."""
    from autopart.capture.tracing import trace
    from autopart.models.model_spec import parse_config_overrides

    config = parse_config_overrides(HF_CONFIGS["hf:llama"])
    loaded = load_model("hf:llama", device="cpu", batch=4, seq=16, config=config, seed=0)
    model = copy.deepcopy(loaded.model)
    ids = loaded.example_inputs[0]
    with computing_in(BF16, model):
        graph = trace(model, (ids,), {})
        grads = []
        for run in (model, graph):
            run.zero_grad()
            logits = getattr(run(ids), "logits", None)
            logits = run(ids)["logits"] if logits is None else logits
            torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), ids.flatten()
            ).backward()
            grads.append({n: p.grad.float() for n, p in run.named_parameters()})
    eager, traced = grads
    assert eager.keys() == traced.keys()
    for n, g in eager.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(traced[n], g, rtol=0, atol=2**-6 * scale, msg=n)


def test_cli_plans_bfloat16_mixed(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "mlp", "--mesh", "pp=2", "--dtype", "bfloat16-mixed", "--format", "json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "bf16-mixed"


def test_a_precision_the_device_cannot_run_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from autopart.precision import check_runs_on

    # a GPU without bfloat16 (a V100), as torch reports it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-32GB")
    with pytest.raises(AutopartError, match=r"this GPU \(Tesla V100-SXM2-32GB\) does not support"):
        check_runs_on(Precision.BF16_MIXED, torch.device("cuda", 0))
    check_runs_on(Precision.MODEL, torch.device("cuda", 0))  # float32 runs anywhere
    check_runs_on(Precision.BF16_MIXED, torch.device("cpu"))


def test_cli_emits_bfloat16_mixed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "program"
    argv = ["emit", "mlp", "--mesh", "fsdp=2", "--dtype", "bfloat16-mixed", "--out", str(out)]
    assert main([*argv, "--format", "json"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == "bf16-mixed"
    assert config["mesh"] == {"dp": 1, "fsdp": 2, "pp": 1, "tp": 1}
    assert json.loads((out / "plan.json").read_text())["precision"] == "bf16-mixed"
