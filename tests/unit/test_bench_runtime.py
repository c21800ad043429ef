from __future__ import annotations

import contextlib
import io
import json
from typing import Any

import pytest
import torch

from autopart.bench.runtime import (
    CASES,
    FULL_CASES,
    QUICK_CASES,
    ROW_KEYS,
    _describe,
    closed_form_efficiency,
    equal_layer_starts,
    format_runtime_markdown,
    imbalance_bound_efficiency,
)
from autopart.cli.main import main
from autopart.errors import AutopartError

# -- formulas ---------------------------------------------------------------------------------


def test_closed_form_is_m_over_m_plus_p_minus_1() -> None:
    assert closed_form_efficiency(8, 2) == pytest.approx(8 / 9)
    assert closed_form_efficiency(8, 4) == pytest.approx(8 / 11)
    assert closed_form_efficiency(1, 1) == 1.0


def test_imbalance_bound_is_the_closed_form_for_equal_stages_and_lower_otherwise() -> None:
    assert imbalance_bound_efficiency([0.4, 0.4, 0.4, 0.4], 8) == pytest.approx(8 / 11)
    # stages 1 and 3 units per micro-batch, m = 4: step = 3 * 3 + 4 = 13 units, work 16 over 2 ranks
    assert imbalance_bound_efficiency([4.0, 12.0], 4) == pytest.approx(16 / (2 * 13))
    assert imbalance_bound_efficiency([4.0, 12.0], 4) < closed_form_efficiency(4, 2)


def test_equal_layer_starts() -> None:
    assert equal_layer_starts(8, 2) == [4]
    assert equal_layer_starts(8, 4) == [2, 4, 6]
    assert equal_layer_starts(10, 4) == [3, 6, 8]  # the first stages take the extra layers
    with pytest.raises(AutopartError, match="at most 2 ranks"):
        equal_layer_starts(2, 4)


def test_describe_names_what_a_stage_holds() -> None:
    names = [
        "model.embed_tokens.weight",
        *(f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)),
    ]
    assert _describe(names, "model.layers") == "embed_tokens, layers 0-2"
    assert _describe(["model.layers.3.x.weight", "lm_head.weight"], "model.layers") == (
        "layers 3, lm_head"
    )


# -- the hand-written stages compute the model --------------------------------------------------


@pytest.mark.parametrize(
    ("name", "ranks"),
    [
        ("llama-tiny", 2),
        ("mlp-small", 2),
        ("mlp-small", 4),
        ("llama-8l-v256", 2),
        ("llama-8l-v256", 4),
        ("llama-8l-v32k", 2),
    ],
)
def test_hand_stages_chained_are_the_model(name: str, ranks: int) -> None:
    case = CASES[name]
    model, inputs = case.build(4, 8, 0)
    layers = len(model.get_submodule(case.layers))  # type: ignore[arg-type]
    bounds = [0, *equal_layer_starts(layers, ranks), layers]
    stages = [
        case.hand_stage(model, range(bounds[r], bounds[r + 1]), r == 0, r == ranks - 1)
        for r in range(ranks)
    ]
    out = inputs[0]
    for stage in stages:
        out = stage(out)
    torch.testing.assert_close(out, model(*inputs))
    # equal layers per stage; every parameter on exactly one stage
    per_stage = [bounds[r + 1] - bounds[r] for r in range(ranks)]
    assert max(per_stage) - min(per_stage) <= 1
    held = [id(p) for s in stages for p in s.parameters()]
    assert sorted(held) == sorted(id(p) for p in model.parameters())


def test_the_balanced_heavy_head_case_has_a_head_as_heavy_as_its_layers() -> None:
    """``llama-8l-v32k`` is the case where a split can beat equal layers by up to ~1.5x: its head
    does about the arithmetic of all its layers (so equal layers put ~3/4 of the work last)."""
    from autopart.capture.tracing import trace
    from autopart.passes.annotate import annotate, node_cost

    case = CASES["llama-8l-v32k"]
    assert case.kind == "heavy head" and case.name in FULL_CASES
    model, inputs = case.build(2, 8, 0)
    gm = annotate(trace(model, inputs))
    costs = [node_cost(n) for n in gm.graph.nodes]
    head = sum(c.flops + c.backward_flops for c in costs if c.module == "lm_head")
    layers = sum(c.flops + c.backward_flops for c in costs if c.module.startswith("model.layers."))
    assert 0.9 < head / layers < 1.1


# -- end to end on 2 ranks, through the CLI -------------------------------------------------------


@pytest.fixture(scope="module")
def quick_rows() -> list[dict[str, Any]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", "--suite", "runtime", "--quick", "--format", "json"])
    assert code == 0
    rows: list[dict[str, Any]] = json.loads(out.getvalue())
    return rows


@pytest.mark.distributed  # quick_rows spawns 2 ranks
def test_quick_suite_rows_are_sane(quick_rows: list[dict[str, Any]]) -> None:
    assert [r["case"] for r in quick_rows] == list(QUICK_CASES)
    for row in quick_rows:
        assert tuple(row) == ROW_KEYS
        assert row["ranks"] == 2 and row["schedule"] == "1f1b"
        assert row["autopart_step_s"] > 0 and row["hand_step_s"] > 0
        assert row["ratio"] == pytest.approx(row["hand_step_s"] / row["autopart_step_s"])
        assert row["paired_ratio"] > 0
        for key in ("autopart_efficiency", "hand_efficiency", "autopart_bound", "hand_bound"):
            assert 0 < row[key] <= 1.2, (key, row[key])
        assert row["closed_form_efficiency"] == pytest.approx(
            closed_form_efficiency(row["micro_batches"], 2)
        )
        assert len(row["autopart_busy_s"]) == len(row["hand_busy_s"]) == 2
        assert all(b > 0 for b in row["autopart_busy_s"] + row["hand_busy_s"])
        # a thread's CPU time in a function is at most the wall time spent in it
        for label in ("autopart", "hand"):
            for cpu_s, busy_s in zip(row[f"{label}_cpu_s"], row[f"{label}_busy_s"], strict=True):
                assert 0 < cpu_s <= busy_s * 1.01 + 1e-3
        assert row["cpu_ratio"] > 0
        # both programs compute the same loss from the same weights and data
        assert row["autopart_loss"] == pytest.approx(row["hand_loss"], rel=1e-5)


@pytest.mark.distributed  # quick_rows spawns 2 ranks
def test_the_hand_split_has_equal_layers_per_stage(quick_rows: list[dict[str, Any]]) -> None:
    for row in quick_rows:
        per_stage = row["hand_layers_per_stage"]
        assert len(per_stage) == 2 and per_stage[0] == per_stage[1] > 0
        assert "embed_tokens" in row["hand_split"][0] or row["case"].startswith("mlp")
        assert "head" in row["hand_split"][-1]


@pytest.mark.distributed  # quick_rows spawns 2 ranks
def test_markdown_has_a_row_per_case(quick_rows: list[dict[str, Any]]) -> None:
    text = format_runtime_markdown(quick_rows)
    for row in quick_rows:
        assert f"| {row['case']} | 2 |" in text
