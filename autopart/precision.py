"""Training precision: what a plan's ``precision`` means, for the planner and the runtime alike.

- ``model``: every tensor in the model's own dtype (float32, or a model built in bfloat16: "pure"
  16-bit training, state included).
- ``bf16-mixed``: torch FSDP2's ``MixedPrecisionPolicy(param_dtype=bfloat16,
  reduce_dtype=float32)`` on every mesh. float32 master parameters, gradients and optimizer
  state; each step computes with a bfloat16 copy of the parameters (floating-point inputs are
  cast to bfloat16 too, buffers keep their dtype), and the bfloat16 gradients are accumulated
  over micro-batches and reduced across replicas in float32. The loss sees float32 outputs.
  A mesh without an ``fsdp`` axis runs it through ``fully_shard`` over a one-rank axis (nothing
  is sharded): one numeric policy whatever the mesh (docs/decisions.md, "Mixed precision").

The planner traces and costs the model as it computes (:func:`computing_in`): its parameters
in bfloat16 while the graph is captured, so activations, FLOP rates and the parameter bytes the
planner sees are bfloat16; the memory model adds the float32 state
(:func:`autopart.cost_models.memory.state_bytes_per_param_byte`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch

from autopart._compat import StrEnum
from autopart.errors import AutopartError

__all__ = [
    "Precision",
    "as_precision",
    "cast_floating",
    "check_master_dtypes",
    "check_runs_on",
    "computing_in",
    "traced_as_computed",
]


class Precision(StrEnum):
    """The precision a plan trains in (``--dtype bfloat16-mixed`` on the command line)."""

    MODEL = "model"
    BF16_MIXED = "bf16-mixed"

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The dtype parameters and floating-point inputs are cast to for compute (``None``: as
        they are)."""
        return torch.bfloat16 if self is Precision.BF16_MIXED else None

    @property
    def is_mixed(self) -> bool:
        return self is Precision.BF16_MIXED


def as_precision(value: Precision | str) -> Precision:
    """``value`` as a :class:`Precision`; an unknown name is an error that lists the known ones."""
    try:
        return Precision(value)
    except ValueError:
        known = ", ".join(p.value for p in Precision)
        raise AutopartError(f"unknown precision {value!r}; use {known}.") from None


def check_master_dtypes(model: torch.nn.Module, precision: Precision) -> None:
    """Mixed precision keeps float32 masters: a model whose trainable parameters are in another
    dtype is an error that says how to build it."""
    if not precision.is_mixed:
        return
    other = sorted(
        {str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad}
        - {"float32"}
    )
    if other:
        raise AutopartError(
            f"{precision.value} keeps float32 master parameters, but the model has {', '.join(other)} "
            "ones; build the model in float32 (--dtype bfloat16-mixed does), or train it in its own "
            "dtype (precision 'model', --dtype bfloat16)."
        )


def check_runs_on(precision: Precision, device: torch.device) -> None:
    """A precision the device cannot compute in is an error that says what works: bfloat16 on a
    GPU without it (before Ampere: V100, T4)."""
    if not precision.is_mixed or device.type != "cuda" or torch.cuda.is_bf16_supported():
        return
    name = torch.cuda.get_device_name(device)
    raise AutopartError(
        f"{precision.value} computes in bfloat16, which this GPU ({name}) does not support; "
        "train in float32 (precision 'model'), or on an Ampere or newer GPU."
    )


def cast_floating(value: Any, dtype: torch.dtype | None) -> Any:
    """``value`` with every floating-point tensor in it (tuples, lists, dicts) cast to ``dtype``;
    everything else as it is (``dtype`` ``None``: ``value`` itself)."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        items = [cast_floating(v, dtype) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):  # a copy of the same kind (a Hugging Face ModelOutput too)
        out = copy.copy(value)
        for k, v in value.items():
            out[k] = cast_floating(v, dtype)
        return out
    return value


@contextlib.contextmanager
def traced_as_computed(
    dtype: torch.dtype | None, model: torch.nn.Module, args: Any, kwargs: Any
) -> Iterator[tuple[Any, Any]]:
    """Within the block, ``model`` computes in ``dtype`` (:func:`computing_in`); yields ``args``
    and ``kwargs`` cast to it (:func:`cast_floating`): what tracing and planning a model as it
    computes needs."""
    with computing_in(dtype, model):
        yield cast_floating(args, dtype), cast_floating(kwargs, dtype)


@contextlib.contextmanager
def computing_in(dtype: torch.dtype | None, *modules: torch.nn.Module) -> Iterator[None]:
    """Within the block, the floating-point parameters of ``modules`` hold ``dtype`` copies of
    their values (the same ``Parameter`` objects, so a graph traced meanwhile refers to them);
    their own values come back on exit. For tracing and costing a model as mixed precision
    computes it, never for training (gradients would take the copies' dtype)."""
    if dtype is None:
        yield
        return
    saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    for module in modules:
        for p in module.parameters():
            if p.is_floating_point() and id(p) not in saved:
                saved[id(p)] = (p, p.data)
    try:
        for p, data in saved.values():
            p.data = data.to(dtype)
        yield
    finally:
        for p, data in saved.values():
            p.data = data
