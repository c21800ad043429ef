"""``path/to/file.py:factory`` and ``package.module:factory`` MODEL strings (see
:func:`autopart.models.model_spec.load_model`)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopart.errors import ModelSpecError
from autopart.models.zoo import seeded_build

__all__ = ["load_factory"]


def load_factory(
    spec: str, batch: int | None, seq: int | None, device: torch.device | None, seed: int
) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any], str]:
    """Import and call the factory that ``spec`` names; return its model, example inputs, example
    kwargs, and a one-line description (the first line of its docstring).

    The call is seeded with ``seed``; on the meta device it runs under ``torch.device("meta")``, so
    tensors it creates without an explicit device are meta tensors."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr.isidentifier():
        raise ModelSpecError(
            f"malformed model {spec!r}: write path/to/file.py:factory or package.module:factory, "
            "where factory is a function name"
        )
    module = _import_target(target)
    factory = getattr(module, attr, None)
    if not callable(factory):
        public = sorted(
            name
            for name, value in vars(module).items()
            if inspect.isfunction(value) and value.__module__ == module.__name__
        )
        raise ModelSpecError(
            f"{target} has no function {attr!r}; functions there: {', '.join(public) or 'none'}. "
            f"Define def {attr}(): return model, example_inputs"
        )
    kwargs = _factory_kwargs(spec, factory, batch=batch, seq=seq)
    try:
        with seeded_build(device if device is not None and device.type == "meta" else None, seed):
            result = factory(**kwargs)
    except Exception as e:
        raise ModelSpecError(
            f"{spec} raised {type(e).__name__}: {e}; fix the factory (traceback above)"
        ) from e
    model, inputs, example_kwargs = _check_factory_result(spec, result)
    doc = inspect.getdoc(factory)
    description = doc.splitlines()[0] if doc else f"{attr}() from {target}"
    return model, inputs, example_kwargs, description


def _import_target(target: str) -> Any:
    if target.endswith(".py") or "/" in target or os.sep in target:
        return _import_file(target)
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        if e.name is not None and target.startswith(e.name):
            raise ModelSpecError(
                f"no module named {target!r}; check the spelling, install its package, or pass a "
                "file path instead (path/to/file.py:factory)"
            ) from e
        raise ModelSpecError(f"importing {target} failed: {e}; install what it imports") from e
    except Exception as e:
        raise ModelSpecError(f"importing {target} raised {type(e).__name__}: {e}; fix it") from e


def _import_file(target: str) -> Any:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise ModelSpecError(f"no such file {target!r} (resolved to {path}); check the path")
    # A stable name per path, so two files called model.py do not clash.
    name = f"_autopart_factory_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickle look a class's module up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ModelSpecError(f"importing {target} raised {type(e).__name__}: {e}; fix it") from e
    return module


def _factory_kwargs(spec: str, factory: Callable[..., Any], **given: int | None) -> dict[str, int]:
    params = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {}
    for name, value in given.items():
        if value is None:
            continue
        if name not in params and not takes_any:
            raise ModelSpecError(
                f"{spec} does not take a {name!r} argument but --{name} {value} was given; "
                f"add a {name} parameter to the factory or drop --{name}"
            )
        kwargs[name] = value
    return kwargs


def _check_factory_result(
    spec: str, result: Any
) -> tuple[nn.Module, tuple[torch.Tensor, ...], dict[str, Any]]:
    usage = "return (model, example_inputs) or (model, example_inputs, example_kwargs)"
    if not isinstance(result, tuple | list) or len(result) not in (2, 3):
        raise ModelSpecError(f"{spec} returned {type(result).__name__}; it must {usage}")
    model, inputs, kwargs = (*result, {}) if len(result) == 2 else result
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"{spec} returned {type(model).__name__} as the model; it must {usage}, "
            "where model is a torch.nn.Module"
        )
    if not isinstance(inputs, tuple | list) or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ModelSpecError(
            f"{spec} returned {type(inputs).__name__} as example_inputs; it must be a tuple of "
            "tensors, e.g. (x,) for a single input"
        )
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise ModelSpecError(
            f"{spec} returned {type(kwargs).__name__} as example_kwargs; it must be a dict from "
            "argument names to values"
        )
    return model, tuple(inputs), kwargs
