"""PlanRequest: the planning keywords as one checked value, shared by every entry point."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import autopart
from autopart.errors import AutopartError
from autopart.planning.mesh_plan import micro_batch_options, planning_setup
from autopart.planning.request import PlanRequest


def test_a_mapping_mesh_is_normalised_and_the_request_is_frozen() -> None:
    req = PlanRequest(mesh={"dp": 2, "pp": 2})  # type: ignore[arg-type]
    assert (
        req.mesh == "dp=2,pp=2"
        and req.axes == {"dp": 2, "fsdp": 1, "pp": 2, "tp": 1}
        and req.size == 4
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.mesh = "pp=4"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"mesh": "pp=two"}, "bad mesh spec"),
        ({"mesh": "pp=2,xp=2"}, "unknown mesh axis"),
        ({"schedule": "zigzag"}, "unknown schedule 'zigzag'"),
        ({"micro_batches": 0}, "micro_batches must be a whole number >= 1"),
        ({"devices": -1, "mesh": "auto"}, "devices must be a whole number >= 1"),
        ({"time_limit_s": 0}, "time_limit_s must be > 0"),
        ({"mesh": "pp=2,tp=2", "devices": 8}, "uses 4 devices, not the 8"),
    ],
)
def test_a_bad_option_is_an_error_that_names_it(options: dict[str, object], match: str) -> None:
    with pytest.raises(AutopartError, match=match):
        PlanRequest(**options)  # type: ignore[arg-type]


def test_overrides_replace_fields_and_unknown_ones_are_named() -> None:
    base = PlanRequest(mesh="pp=4", device="a100")
    assert PlanRequest.of(base, {"mesh": "pp=2"}) == PlanRequest(mesh="pp=2", device="a100")
    assert PlanRequest.of(None, {}) == PlanRequest()
    with pytest.raises(AutopartError, match=r"unknown planning option.*mesh_size.*the options are"):
        base.with_options(mesh_size=4)
    with pytest.raises(AutopartError, match="no fixed axes"):
        _ = PlanRequest(mesh="auto").axes


def test_plan_takes_a_request_or_keywords_alike() -> None:
    model = torch.nn.Sequential(*(torch.nn.Linear(16, 16) for _ in range(4)))
    x = torch.randn(8, 16)
    by_keywords = autopart.plan(model, (x,), mesh="pp=2", device="h100", schedule="gpipe")
    request = PlanRequest(mesh="pp=2", device="h100", schedule="gpipe")
    by_request = autopart.plan(model, (x,), request)
    a, b = by_keywords.to_dict(), by_request.to_dict()
    a["solver"].pop("time_s"), b["solver"].pop("time_s")
    assert a == b and by_request.model == "Sequential"
    with pytest.raises(AutopartError, match="unknown planning option"):
        autopart.plan(model, (x,), stages=2)


def test_errors_carry_a_short_reason_beside_the_message() -> None:
    setup = planning_setup(PlanRequest(mesh="dp=3"))
    with pytest.raises(AutopartError) as err:
        micro_batch_options(8, 3, 1, None, setup.kinds)
    assert err.value.reason == "the batch of 8 does not split over dp=3"
    assert "use a batch that is a multiple of 3" in str(err.value)
    assert AutopartError("plain").reason == "plain"
