"""Capture a model as a ``torch.fx.GraphModule`` whose nodes carry shapes, dtypes and source modules.

``torch.export.export(strict=False)`` is tried first: it runs the model's own Python code with fake
tensors, so it handles Hugging Face models that ``torch.fx.symbolic_trace`` cannot take, and it works
on meta-device models without allocating memory. ``torch.fx.symbolic_trace`` followed by fake-tensor
shape propagation is the fallback for modules export rejects.

Every node of the result has ``node.meta["val"]`` (a fake tensor, or a structure of them) and
``node.meta["autopart_module"]`` (path and class of the innermost module that created it);
parameters are ``get_attr`` nodes named by the model's own parameter names. ``gm.meta["autopart_trace"]``
records how the graph was captured (a :class:`TraceInfo`).

A model with a long ``nn.ModuleList`` of identical layers (the 80 decoder layers of a Llama-70B) is
traced with only the first three layers in the list; the graph of layer 2 is then checked against
layer 1 and copied for the remaining layers (:mod:`autopart.capture._repeat`). The result is the graph the full
trace gives (for the built-in models node for node, names included) in a fraction of the time; when
the layers turn out to differ, the whole model is traced. ``repeat="off"`` always traces every layer.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from autopart.capture._repeat import RepeatedList, expand, find_repeated_list, truncated
from autopart.errors import TraceError

__all__ = ["ModuleRef", "TraceInfo", "trace"]

_TORCH_DIR = os.path.dirname(torch.__file__)
_AUTOPART_DIR = os.path.dirname(os.path.abspath(__file__))
_STDLIB_DIR = os.path.dirname(os.__file__)
# Graph nodes that only check metadata at run time; they cost nothing and clutter every table.
_DROPPED_TARGETS = (torch.ops.aten._assert_tensor_metadata.default,)
_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModuleRef:
    """The innermost module that created a node: its path in the model and its class name."""

    path: str
    type_name: str


@dataclass(frozen=True, slots=True)
class TraceInfo:
    method: str
    """``"export"`` or ``"fx"``."""
    model_type: str
    param_aliases: Mapping[str, str]
    """Every parameter name of the model (tied ones included) -> the name it has in the graph."""
    input_names: tuple[str, ...]
    export_error: str
    """Why export was not used, when the fx fallback was (empty otherwise)."""
    repeated: str = ""
    """Which layers were traced once and copied, e.g. ``"model.layers x80 (traced 3)"`` (empty: none)."""


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    example_kwargs: Mapping[str, Any] | None = None,
    *,
    method: str = "auto",
    repeat: str = "auto",
) -> torch.fx.GraphModule:
    """Capture ``model`` called as ``model(*example_inputs, **example_kwargs)`` as a GraphModule.

    ``method`` is ``"auto"`` (export, then fx), ``"export"`` or ``"fx"``. ``repeat="auto"`` traces
    only the first three of a long list of identical layers and copies the last of them for the rest
    when the traced layers prove identical (the whole model otherwise); ``"off"`` traces every layer.
    Raises :class:`TraceError` naming the failing op, module and source line when neither method can
    capture the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(
            f"trace() needs an nn.Module, got {type(model).__name__}; pass the model object itself."
        )
    if method not in ("auto", "export", "fx"):
        raise TraceError(f"unknown trace method {method!r}; use 'auto', 'export' or 'fx'.")
    if repeat not in ("auto", "off"):
        raise TraceError(f"unknown repeat mode {repeat!r}; use 'auto' or 'off'.")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})

    repeated = find_repeated_list(model) if repeat == "auto" else None

    export_exc: BaseException | None = None
    if method in ("auto", "export"):
        try:
            with _quiet_torch():
                gm, copied = _capture(_trace_export, model, args, kwargs, repeated)
            return _finish(gm, model, "export", "", copied)
        except Exception as exc:
            if method == "export" or _is_input_mismatch(exc):
                raise _trace_error(model, args, kwargs, exc, None) from exc
            export_exc = exc
    try:
        with _quiet_torch():
            gm, copied = _capture(_trace_fx, model, args, kwargs, repeated)
    except Exception as fx_exc:
        primary = export_exc if export_exc is not None else fx_exc
        secondary = fx_exc if export_exc is not None else None
        raise _trace_error(model, args, kwargs, primary, secondary) from primary
    return _finish(gm, model, "fx", _first_line(export_exc) if export_exc else "", copied)


def _capture(
    tracer: Callable[[torch.nn.Module, tuple, dict], torch.fx.GraphModule],
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    repeated: RepeatedList | None,
) -> tuple[torch.fx.GraphModule, str]:
    """Trace with ``tracer``: the first layers of ``repeated`` and copies of them when that works,
    else the whole model. Returns the graph and what was copied (TraceInfo.repeated)."""
    if repeated is not None:
        try:
            with truncated(model, repeated):
                gm = tracer(model, args, kwargs)
        except Exception as exc:  # e.g. a forward indexing self.layers[5]: the full trace decides
            _log.debug("tracing 3 layers of %s failed: %s", repeated.path, _first_line(exc))
        else:
            if expand(gm, model, repeated) is not None:
                return gm, repeated.describe()
    return tracer(model, args, kwargs), ""


# ---------------------------------------------------------------------------------------------
# torch.export path


def _trace_export(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    ep = torch.export.export(model, args, kwargs, strict=False)
    gm = ep.module(check_guards=False)
    assert isinstance(gm, torch.fx.GraphModule)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, type_name = list(stack.values())[-1]
            node.meta["autopart_module"] = ModuleRef(path, _short_type(type_name))
    return gm


def _short_type(type_name: Any) -> str:
    name = (
        type_name if isinstance(type_name, str) else getattr(type_name, "__name__", str(type_name))
    )
    return name.rsplit(".", 1)[-1]


# ---------------------------------------------------------------------------------------------
# torch.fx fallback


def _trace_fx(model: torch.nn.Module, args: tuple, kwargs: dict) -> torch.fx.GraphModule:
    gm = torch.fx.symbolic_trace(model)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = [p.target for p in placeholders]
    if kwargs and not set(kwargs) <= set(names):
        unknown = sorted(set(kwargs) - set(names))
        raise TypeError(f"forward() got unexpected keyword argument(s) {unknown}")
    flat = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
    # Parameters without defaults that got no value stay unfilled and fail in propagation below.
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in flat]
        FakeTensorProp(gm, mode).propagate(*fake)
    modules = dict(model.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            node.meta["autopart_module"] = ModuleRef(
                node.target, type(modules[node.target]).__name__
            )
        else:
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path, type_name = list(stack.values())[-1]
                node.meta["autopart_module"] = ModuleRef(path, _short_type(type_name))
    return gm


# ---------------------------------------------------------------------------------------------
# common finishing


def _finish(
    gm: torch.fx.GraphModule,
    model: torch.nn.Module,
    method: str,
    export_error: str,
    repeated: str,
) -> torch.fx.GraphModule:
    erased = False
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _DROPPED_TARGETS and not node.users:
            gm.graph.erase_node(node)
            erased = True
    for node in gm.graph.nodes:
        node.meta.setdefault("autopart_module", ModuleRef("", type(model).__name__))
    gm.graph.lint()
    if erased:  # the tracers return compiled modules; regenerating 3,000 lines of code takes 0.2 s
        gm.recompile()
    gm.meta["autopart_trace"] = TraceInfo(
        method=method,
        model_type=type(model).__name__,
        param_aliases=_param_aliases(model, gm),
        input_names=tuple(n.name for n in gm.graph.nodes if n.op == "placeholder"),
        export_error=export_error,
        repeated=repeated,
    )
    return gm


def _param_aliases(model: torch.nn.Module, gm: torch.fx.GraphModule) -> dict[str, str]:
    """Map every parameter name of the model, tied duplicates included, to its name in the graph."""
    in_graph = {id(p): name for name, p in gm.named_parameters()}
    graph_names = set(in_graph.values())
    canonical: dict[int, str] = {}
    for name, p in model.named_parameters():  # the first name of each tensor
        canonical.setdefault(id(p), name)
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        first = canonical[id(p)]
        aliases[name] = first if first in graph_names else in_graph.get(id(p), first)
    return aliases


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Silence torch's own logging of failed attempts; autopart reports failures itself."""
    loggers = [logging.getLogger("torch")] + [
        logging.getLogger(name)
        for name in list(logging.root.manager.loggerDict)
        if name.startswith("torch.")
    ]
    disabled = [lg.disabled for lg in loggers]
    for lg in loggers:
        lg.disabled = True
    try:
        with contextlib.redirect_stdout(_Null()), contextlib.redirect_stderr(_Null()):
            yield
    finally:
        for lg, was in zip(loggers, disabled):
            lg.disabled = was


class _Null:
    def write(self, _: str) -> int:
        return 0

    def flush(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------
# error reporting


def _first_line(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


def _is_input_mismatch(exc: BaseException) -> bool:
    """Errors no fallback can fix: the example inputs do not fit the model's signature."""
    return isinstance(exc, TypeError) and ("argument" in str(exc))


def _is_user_file(filename: str) -> bool:
    path = os.path.abspath(filename)
    return not (
        path.startswith(_TORCH_DIR)
        or path.startswith(_AUTOPART_DIR)
        or path.startswith(_STDLIB_DIR)
        or filename.startswith("<")
    )


def _trace_error(
    model: torch.nn.Module,
    args: tuple,
    kwargs: dict,
    exc: BaseException,
    fallback_exc: BaseException | None,
) -> TraceError:
    module_names = {id(m): name for name, m in model.named_modules()}
    frames = list(_walk_tb(exc))
    user = [f for f in frames if _is_user_file(f.f_code.co_filename)]
    where = ""
    if user:
        frame, lineno = user[-1], _lineno(exc, user[-1])
        line = _source_line(frame.f_code.co_filename, lineno)
        where = f"{frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}: `{line}`"
    module = ""
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        if isinstance(owner, torch.nn.Module) and id(owner) in module_names:
            name = module_names[id(owner)] or "<root>"
            module = f"{name} ({type(owner).__name__})"
            break
    op = _failing_op(frames)
    data_dependent = (
        "data-dependent" in str(exc)
        or type(exc).__name__
        in (
            "GuardOnDataDependentSymNode",
            "DataDependentOutputException",
        )
        or "symbolically traced variables cannot be used as inputs to control flow" in str(exc)
    )

    lines = [f"autopart could not trace {type(model).__name__}: {_first_line(exc)}"]
    if op:
        lines.append(f"  op:     {op}")
    if module:
        lines.append(f"  module: {module}")
    if where:
        lines.append(f"  source: {where}")
    lines.append(f"  inputs: {_describe_inputs(args, kwargs)}")
    if fallback_exc is not None:
        lines.append(f"  torch.fx.symbolic_trace fallback also failed: {_first_line(fallback_exc)}")
    if _is_input_mismatch(exc):
        lines.append(
            f"fix: pass example inputs that match {type(model).__name__}.forward{_signature(model)}: "
            "positional ones in example_inputs, named ones in example_kwargs."
        )
    elif data_dependent:
        lines.append(
            "fix: the model branches on tensor *values* in Python. Make the branch depend on shapes or "
            "configuration instead, or express it as a tensor op (torch.where, masking) or with torch.cond."
        )
    elif _looks_like_shape_error(exc):
        lines.append(
            "fix: the example inputs do not have the shapes or dtypes this model expects; pass inputs "
            "shaped like a real batch (see the shapes above)."
        )
    else:
        lines.append(
            "fix: rewrite the line above with traceable torch ops, or capture a submodule that excludes "
            "it; trace(..., method='fx') or method='export' forces one tracer."
        )
    return TraceError("\n".join(lines))


def _signature(model: torch.nn.Module) -> str:
    try:
        sig = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return "(...)"
    empty = inspect.Parameter.empty
    try:
        return str(
            sig.replace(
                parameters=[p.replace(annotation=empty) for p in sig.parameters.values()],
                return_annotation=empty,
            )
        )
    except (TypeError, ValueError):
        return "(...)"


def _walk_tb(exc: BaseException) -> Iterator[Any]:
    tb = exc.__traceback__
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def _lineno(exc: BaseException, frame: Any) -> int:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame is frame:
            return tb.tb_lineno
        tb = tb.tb_next
    return frame.f_lineno


def _source_line(filename: str, lineno: int) -> str:
    return linecache.getline(filename, lineno).strip()


def _failing_op(frames: list[Any]) -> str:
    for frame in reversed(frames):
        func = frame.f_locals.get("func")
        if isinstance(func, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            return str(func)
    for frame in reversed(frames):
        func = frame.f_locals.get("func")
        qual = str(getattr(func, "__qualname__", "")) if callable(func) else ""
        module = str(getattr(func, "__module__", ""))
        if qual.startswith(("Tensor.", "_TensorBase.", "TensorBase.")) or (
            qual and module in ("torch", "torch._C")
        ):
            return f"torch.{qual}"
    return ""


def _looks_like_shape_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(
        k in text
        for k in (
            "shape",
            "size",
            "dimension",
            "must have same",
            "cannot be multiplied",
            "expected input",
        )
    )


def _describe_inputs(args: tuple, kwargs: dict) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} on {x.device}"
        return type(x).__name__

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"
