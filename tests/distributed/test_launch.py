from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from autopart.cli.main import main
from autopart.errors import AutopartError
from autopart.runtime.launch import run_local
from tests.models import HF_CONFIGS


@pytest.fixture(autouse=True, scope="module")
def _comm_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One communication cache for this file's runs (measured once per group size), not the
    user's."""
    before = os.environ.get("AUTOPART_CACHE_DIR")
    os.environ["AUTOPART_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if before is None:
        del os.environ["AUTOPART_CACHE_DIR"]
    else:
        os.environ["AUTOPART_CACHE_DIR"] = before


@pytest.mark.distributed
def test_run_local_trains_and_matches_one_process() -> None:
    report = run_local("gpt2-tiny", mesh="pp=2", steps=2, batch=8, seq=16, schedule="1f1b")
    assert report.schedule == "1f1b" and len(report.losses) == 2
    assert report.losses == pytest.approx(report.reference_losses, rel=1e-5)
    assert report.max_param_rel_diff <= 1e-5
    assert report.step_time_s > 0 and report.samples_per_s > 0
    assert len(report.stage_forward_s) == len(report.predicted_stage_forward_s) == 2
    assert all(t > 0 for t in report.stage_forward_s)


@pytest.mark.distributed
def test_run_local_profiles_on_rank_zero_and_recomputes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # rank 0 profiles and plans, the others receive the plan: every rank runs the same stages;
    # the planning options reach the ranks (every layer recomputed, under torch's checkpoint)
    monkeypatch.setenv("AUTOPART_CACHE_DIR", str(tmp_path))
    report = run_local(
        "mlp", mesh="pp=2", steps=2, batch=4, comm="table", profile=True, recompute="full"
    )
    assert report.recomputed
    assert report.profile_s is not None and report.profile_s > 0
    assert (tmp_path / "profile.json").exists()
    assert report.losses == pytest.approx(report.reference_losses, rel=1e-5)
    assert report.max_param_rel_diff <= 1e-5


@pytest.mark.distributed
def test_run_local_spawns_every_rank_of_a_dp_mesh() -> None:
    # 4 ranks; each replica trains on half the batch, so the reference accumulates 2 x 2 chunks
    report = run_local("gpt2-tiny", mesh="dp=2,pp=2", steps=2, batch=8, seq=16, micro_batches=2)
    assert report.mesh == "dp=2,pp=2" and report.micro_batches == 2
    assert report.losses == pytest.approx(report.reference_losses, rel=1e-5)
    assert report.max_param_rel_diff <= 1e-5


@pytest.mark.distributed
def test_cli_run_reports_predicted_and_measured(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    svg = tmp_path / "step.svg"
    # two micro-batches: from the second on, torch adds each weight gradient to .grad through a
    # temporary the size of the weight, which the plan's memory model counts
    # (docs/decisions.md, "Measured memory")
    argv = ["run", "mlp", "--mesh", "pp=2", "--steps", "2", "--batch", "8", "--micro-batches", "2"]
    argv += ["--schedule", "gpipe", "--svg", str(svg), "--format", "json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["matches"] is True and doc["max_loss_rel_diff"] <= 1e-5
    assert doc["comm"] == "measured"
    cache = json.loads((Path(os.environ["AUTOPART_CACHE_DIR"]) / "comm.json").read_text())
    fitted = cache["gloo:world2:cpu"]["pipeline_action_s"]  # planned on (at least 1 ns)
    assert doc["pipeline_action_s"] == pytest.approx(fitted, abs=1e-9)
    # memory is counted, not timed: the CPU count (parameters, gradients, activations of the
    # first step) lands within 10% of the plan's simulated peak on every stage
    measured, predicted = doc["stage_peak_memory_bytes"], doc["predicted_stage_peak_memory_bytes"]
    assert len(measured) == len(predicted) == 2
    assert all(abs(a - b) <= 0.1 * b for a, b in zip(measured, predicted))
    # the measured timeline has each stage's forward and backward, in the planned order
    for timeline in (doc["measured_timeline"], doc["predicted_timeline"]):
        actions = [(d, a) for d, a, _, _ in timeline["events"]]
        assert actions == [
            (0, "0F0"), (0, "0F1"), (0, "0B0"), (0, "0B1"),
            (1, "1F0"), (1, "1F1"), (1, "1B0"), (1, "1B1"),
        ]  # fmt: skip
        assert timeline["step_time_s"] > 0 and 0 <= timeline["bubble_fraction"] < 1
    text = svg.read_text()
    assert "mlp on pp=2: gpipe, m=2 predicted" in text and "m=2 measured" in text


@pytest.mark.distributed
def test_cli_run_trains_fsdp_under_bf16_mixed(capsys: pytest.CaptureFixture[str]) -> None:
    # FSDP2 over two ranks and its mixed-precision policy: float32 masters, bfloat16 compute,
    # checked against float32 at bfloat16's resolution; the rank's memory is counted through the
    # DTensor shards FSDP2 holds
    argv = ["run", "gpt2-tiny", "--mesh", "fsdp=2", "--dtype", "bfloat16-mixed", "--steps", "2"]
    argv += ["--batch", "8", "--seq", "16", "--comm", "table", "--format", "json"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["precision"] == "bf16-mixed" and doc["matches"] is True
    assert 0 < doc["max_loss_rel_diff"] <= 2**-7 and 0 < doc["max_param_rel_diff"] <= 2**-5
    assert all(b > 0 for b in doc["stage_peak_memory_bytes"])


@pytest.mark.distributed
def test_resharding_after_forward_lowers_the_measured_peak_as_the_plan_predicts() -> None:
    # one FSDP2 stage on two ranks, one micro-batch: resharding each layer after its forward
    # leaves the backward's start holding one layer whole instead of all four; the measured
    # peak (CPU count of the first step) drops by the predicted bytes, within 10%
    config = {
        "hidden_size": "256",
        "intermediate_size": "1024",
        "num_hidden_layers": "4",
        "num_attention_heads": "4",
        "num_key_value_heads": "4",
        "vocab_size": "512",
    }
    runs = [
        run_local(
            "hf:llama",
            mesh="fsdp=2",
            schedule="gpipe",
            micro_batches=1,
            steps=1,
            batch=8,
            seq=256,
            config=config,
            comm="table",
            reshard_after_forward=reshard,
        )
        for reshard in (False, True)
    ]
    for report in runs:
        assert report.losses == pytest.approx(report.reference_losses, rel=1e-5)
        assert report.max_param_rel_diff <= 1e-5
        measured = report.stage_peak_memory_bytes[0]
        predicted = report.predicted_stage_peak_memory_bytes[0]
        assert abs(measured - predicted) <= 0.1 * predicted
    kept, resharded = runs
    drop = kept.stage_peak_memory_bytes[0] - resharded.stage_peak_memory_bytes[0]
    want = (
        kept.predicted_stage_peak_memory_bytes[0] - resharded.predicted_stage_peak_memory_bytes[0]
    )
    layer = (4 * 256 * 256 + 3 * 256 * 1024) * 4  # one layer's float32 parameters, whole
    # the backward's start holds the last layer and the one gathered ahead, not all four
    assert want >= 2 * layer
    assert abs(drop - want) <= 0.1 * want


@pytest.mark.distributed
def test_failing_rank_stops_the_run_with_a_clear_error() -> None:
    # 5 samples do not split into 2 micro-batches: every rank fails while compiling.
    with pytest.raises(AutopartError, match="rank"):
        run_local("mlp", mesh="pp=2", steps=1, batch=5, micro_batches=2, timeout_s=120)


@pytest.mark.distributed
@pytest.mark.parametrize("spec", sorted(HF_CONFIGS))
def test_hugging_face_models_train_through_the_pipeline(spec: str) -> None:
    from autopart.models.model_spec import parse_config_overrides

    # Export bakes the batch size into view shapes and specializes size-1 dimensions: the runtime
    # traces the micro-batch's shapes and picks a micro-batch count whose graph matches the plan's.
    report = run_local(
        spec, mesh="pp=2", steps=2, batch=8, seq=16, config=parse_config_overrides(HF_CONFIGS[spec])
    )
    assert report.losses == pytest.approx(report.reference_losses, rel=1e-5)
    assert report.max_param_rel_diff <= 1e-5
