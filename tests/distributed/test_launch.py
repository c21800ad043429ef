from __future__ import annotations

import json

import pytest

from autopart.cli.main import main
from autopart.errors import AutopartError
from autopart.runtime.launch import run_local
from tests.models import HF_CONFIGS


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
def test_run_local_spawns_every_rank_of_a_dp_mesh() -> None:
    # 4 ranks; each replica trains on half the batch, so the reference accumulates 2 x 2 chunks
    report = run_local("gpt2-tiny", mesh="dp=2,pp=2", steps=2, batch=8, seq=16, micro_batches=2)
    assert report.mesh == "dp=2,pp=2" and report.micro_batches == 2
    assert report.losses == pytest.approx(report.reference_losses, rel=1e-5)
    assert report.max_param_rel_diff <= 1e-5


@pytest.mark.distributed
def test_cli_run_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["run", "mlp", "--mesh", "pp=2", "--steps", "1", "--batch", "4", "--format", "json"])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert doc["matches"] is True and doc["max_loss_rel_diff"] <= 1e-5


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
