from __future__ import annotations

import json
import subprocess
import sys

import pytest

from autopart.cli.main import main


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_json_contract(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "inspect", "gpt2-tiny", "--batch", "2", "--seq", "16", "--format", "json"
    )
    assert code == 0
    doc = json.loads(out)
    assert doc["model"] == "gpt2-tiny"
    totals = doc["totals"]
    for key in ("params", "flops", "param_bytes", "backward_flops", "activation_bytes", "nodes"):
        assert isinstance(totals[key], int), key
    assert totals["params"] == 124_672  # tied lm_head counted once
    assert totals["flops"] == sum(n["flops"] for n in doc["nodes"])
    node = next(n for n in doc["nodes"] if n["target"] == "aten.linear.default")
    for key in (
        "name",
        "op",
        "target",
        "module",
        "shape",
        "dtype",
        "flops",
        "bytes",
        "param_bytes",
    ):
        assert key in node, key
    assert (
        node["flops"] > 0
        and node["param_bytes"] > 0
        and node["module"].startswith("transformer.h.")
    )


def test_inspect_table_by_node_and_by_module(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "inspect", "mlp", "--batch", "2")
    assert code == 0
    assert "aten.linear.default" in out and "total" in out and "parameters" in out
    code, out, _ = _run(
        capsys,
        "inspect",
        "gpt2-tiny",
        "--seq",
        "8",
        "--by",
        "module",
        "--depth",
        "3",
        "--device",
        "h100",
    )
    assert code == 0
    assert "transformer.h.1" in out and "time on h100" in out
    assert "transformer.h.1.attn" not in out  # grouped at depth 3


def test_inspect_limit_keeps_totals(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "inspect", "gpt2-tiny", "--seq", "8", "--limit", "3")
    assert code == 0
    assert "more rows" in out and "total" in out


def test_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "inspect", "gtp2")
    assert code == 2
    assert "gpt2" in err and "hf:" in err  # closest match and the other accepted forms


def test_unknown_device_fails_before_tracing(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "inspect", "mlp", "--device", "h10")
    assert code == 2
    assert "did you mean 'h100'" in err


def test_bad_config_override_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "inspect", "hf:gpt2", "--config", "n_layer")
    assert code == 2
    assert "key=value" in err


def test_console_script_runs() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "autopart.cli.main",
            "inspect",
            "mlp",
            "--batch",
            "2",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["totals"]["params"] > 0


def test_bench_solver_table_and_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import autopart.bench.solver as bench

    def small_suite(*, quick: bool = False, progress: object = None) -> list[dict[str, object]]:
        og = bench.synthetic_op_graph("branch", 100, seed=0, device="h100")
        return [bench.solve_case(og, 4, "h100", 5.0, case="branch-100", kind="branch")]

    monkeypatch.setattr(bench, "solver_suite", small_suite)
    assert main(["bench", "--suite", "solver"]) == 0
    out = capsys.readouterr().out
    assert "branch-100" in out and "vs equal layers" in out
    assert main(["bench", "--suite", "solver", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["gap"] >= 0 and rows[0]["bottleneck_s"] <= rows[0]["equal_layers_s"]
