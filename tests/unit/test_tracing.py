from __future__ import annotations

import pytest
import torch

import autopart
from autopart.capture.tracing import TraceInfo, trace
from autopart.errors import TraceError
from tests.models import Branchy, Tied, TwoInTwoOut, TwoLayer


def _compute_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]


@pytest.mark.parametrize("method", ["export", "fx"])
def test_trace_keeps_shapes_modules_and_parameter_names(method: str) -> None:
    model = TwoLayer()
    gm = trace(model, (torch.randn(3, 16),), method=method)
    info = gm.meta["autopart_trace"]
    assert isinstance(info, TraceInfo) and info.method == method
    assert {n for n, _ in gm.named_parameters()} == {n for n, _ in model.named_parameters()}
    for node in gm.graph.nodes:
        if node.op != "output":
            assert isinstance(node.meta["val"], torch.Tensor), node.name
    modules = {n.meta["autopart_module"].path for n in _compute_nodes(gm)}
    assert {"fc1", "fc2"} <= modules
    out = gm(torch.ones(3, 16))
    out = out[0] if isinstance(out, (tuple, list)) else out
    torch.testing.assert_close(out, model(torch.ones(3, 16)))


def test_trace_takes_several_inputs_outputs_and_keyword_inputs() -> None:
    model = TwoInTwoOut()
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    gm = trace(model, (x, y), {"scale": 3.0})
    assert gm.meta["autopart_trace"].input_names[:2] == ("x", "y")
    got = gm(x, y, scale=3.0)  # keyword inputs keep their names (the value is baked in)
    want = model(x, y, scale=3.0)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_tied_parameters_are_recorded_as_aliases() -> None:
    model = Tied()
    gm = trace(model, (torch.randint(0, 32, (2, 5)),))
    aliases = gm.meta["autopart_trace"].param_aliases
    assert aliases["head.weight"] == aliases["embed.weight"] == "embed.weight"
    assert sum(p.numel() for _, p in gm.named_parameters()) == sum(
        p.numel() for p in model.parameters()
    )


def test_meta_device_model_traces_without_allocating() -> None:
    with torch.device("meta"):
        model = torch.nn.Sequential(
            *[torch.nn.Linear(8192, 8192) for _ in range(8)]
        )  # 2 GiB if real
    gm = trace(model, (torch.empty(4, 8192, device="meta"),))
    assert all(p.is_meta for p in gm.parameters())
    assert gm.meta["autopart_trace"].method == "export"


def test_falls_back_to_fx_when_export_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(*args: object, **kwargs: object) -> None:
        raise RuntimeError("export cannot take this module")

    monkeypatch.setattr(torch.export, "export", broken_export)
    gm = trace(TwoLayer(), (torch.randn(3, 16),))
    info = gm.meta["autopart_trace"]
    assert info.method == "fx"
    assert "export cannot take this module" in info.export_error


def test_data_dependent_control_flow_names_op_module_and_line() -> None:
    with pytest.raises(TraceError) as err:
        trace(Branchy(), (torch.randn(2, 16),))
    msg = str(err.value)
    assert "Branchy" in msg
    assert "if y.sum() > 0:" in msg  # the source line
    assert "tests/models.py" in msg
    assert "__bool__" in msg  # the op: bool() of a tensor
    assert "torch.where" in msg and "torch.cond" in msg  # what to do
    assert "fallback also failed" in msg


def test_wrong_input_shape_names_op_module_and_fix() -> None:
    with pytest.raises(TraceError) as err:
        trace(TwoLayer(), (torch.randn(3, 5),))
    msg = str(err.value)
    assert "aten.mm" in msg or "aten.linear" in msg or "aten.addmm" in msg
    assert "fc1 (Linear)" in msg
    assert "Tensor(3, 5)" in msg
    assert "shapes" in msg


def test_wrong_number_of_inputs_shows_signature() -> None:
    with pytest.raises(TraceError) as err:
        trace(TwoLayer(), (torch.randn(3, 16), torch.randn(3)))
    assert "TwoLayer.forward(x)" in str(err.value)


def test_trace_rejects_non_modules_and_unknown_methods() -> None:
    with pytest.raises(TraceError, match=r"nn\.Module"):
        trace(lambda x: x, (torch.randn(2),))  # type: ignore[arg-type]
    with pytest.raises(TraceError, match="unknown trace method"):
        trace(TwoLayer(), (torch.randn(3, 16),), method="jit")


def test_trace_is_public_and_errors_are_value_errors() -> None:
    assert autopart.trace is trace
    assert issubclass(TraceError, ValueError)
