"""Checkpoints of a :class:`~autopart.runtime.program.ParallelProgram`, in the model's own terms.

Three forms of the same state, all keyed by the model's ``state_dict()`` names (tied aliases and
persistent buffers included, non-persistent buffers left out; :class:`StateLayout` says which
stage tensor holds each key):

- **whole** (``program.full_state_dict()``): every tensor whole, gathered to every rank; what
  ``model.load_state_dict(..., strict=True)`` takes. ``program.load_state_dict(whole)`` goes back:
  each rank copies its stages' tensors, its TP shard of the split ones.
- **sharded** (``program.state_dict()``): this rank's tensors only, for
  ``torch.distributed.checkpoint`` (DCP). A tensor split ``S(k)`` over the ``tp`` ranks is a
  ``DTensor`` (``Shard(k)`` on the tp mesh) over this rank's shard, so each rank writes its own
  shard and DCP records where it sits in the whole tensor; a replicated tensor is the stage's own
  tensor, written once (DCP keeps one copy of what several ranks save under one key). The values
  alias the stages' tensors, so ``dcp.load`` fills the program in place. The exception is a
  tensor split in groups (a fused QKV weight, ``S(k,groups=g)``): each rank holds g pieces of it,
  which no single ``DTensor`` placement describes, so it is gathered over the tp group and saved
  whole (``program.load_state_dict`` then cuts this rank's pieces).
- With torch's FSDP2 holding the stages (an ``fsdp`` axis, or bf16-mixed precision), a
  parameter is FSDP's ``DTensor`` (``Shard(0)`` over the fsdp mesh of what this tp rank holds):
  one that TP does not split is saved as it is (its whole is the model's tensor), loaded in
  place, and a whole tensor is cut to this rank's shard. One that TP splits is first gathered
  over the fsdp mesh (``full_tensor``: this tp rank's shard) and then saved as TP saves it; a
  loaded one is cut to this rank's TP shard and then to its FSDP piece.
- **optimizer** (``program.optimizer_state_dict(opt)``): torch's
  ``get_optimizer_state_dict`` with ``flatten_optimizer_state_dict=True`` (keys
  ``state.<param>.<name>`` and ``param_groups.<param>.<name>``, one set per parameter, so pipeline
  ranks holding different parameters never write the same key), the state of a TP-split parameter
  placed like the parameter.

Because keys and global shapes are the model's, a checkpoint written on one mesh loads on any
other mesh of the same model: DCP reads each rank's pieces out of the saved shards.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from autopart.errors import AutopartError
from autopart.passes.split_stages import set_attr_at
from autopart.passes.tp.local import shard_tensor, unshard_tensor
from autopart.passes.tp.placements import Placement
from autopart.passes.tp.shard import TP_META_KEY
from autopart.runtime.stage_io import StateLayout

__all__ = ["CheckpointError", "ShardedState"]

_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


class CheckpointError(AutopartError):
    """A state dict does not fit the program it is loaded into."""


class ShardedState:
    """This rank's view of the model's state: its stages' tensors under the model's names."""

    def __init__(
        self, stages: Iterable[torch.fx.GraphModule], layout: StateLayout, tp: DeviceMesh | None
    ) -> None:
        self._stages = list(stages)
        self._layout = layout
        self._tp = tp
        self._degree = tp.size() if tp is not None else 1
        self._tp_rank = tp.get_local_rank() if tp is not None else 0
        self.constants: dict[str, Any] = dict(layout.constants)
        """The current values of the keys no stage holds (``load_state_dict`` replaces them)."""

    @property
    def layout(self) -> StateLayout:
        """The layout, with the current values of the keys no stage holds."""
        return StateLayout(self._layout.sources, dict(self.constants))

    # -- the model's state ---------------------------------------------------------------------

    def whole(self, gathered: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The model's state dict from every stage's whole tensors (by stage name)."""
        return self._layout.assemble(gathered, self.constants)

    def state_dict(self) -> dict[str, Any]:
        """This rank's entries of the model's state dict, for DCP (see the module docstring).
        Collective over the tp group when a tensor is split in groups."""
        held = self._held()
        out: dict[str, Any] = {}
        placed: dict[str, Any] = {}  # one DTensor per stage tensor, shared by its aliases
        for key, source in self._layout.sources.items():
            if key in self._layout.constants:
                out[key] = self.constants[key]
            elif source in held:
                if source not in placed:
                    copies, placement = held[source]
                    placed[source] = self._global(copies[0], placement)
                out[key] = placed[source]
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], *, strict: bool = True) -> None:
        """Copy ``state_dict`` (whole tensors, or :meth:`state_dict`'s form) into this rank's
        stages: each key this rank holds, its TP shard where the tensor is split."""
        held = self._held()
        needed = {
            key: source
            for key, source in self._layout.sources.items()
            if key in self._layout.constants or source in held
        }
        unexpected = [k for k in state_dict if k not in self._layout.sources]
        missing = [k for k in needed if k not in state_dict]
        if strict and (unexpected or missing):
            raise CheckpointError(
                f"the state dict does not fit this model: {len(missing)} key(s) missing "
                f"({_few(missing)}) and {len(unexpected)} unexpected ({_few(unexpected)}). Pass "
                "the model's state_dict(), a program's full_state_dict() or state_dict() (after "
                "dcp.load), or strict=False to load only the keys that match."
            )
        done: set[str] = set()
        with torch.no_grad():
            for key, source in needed.items():
                if key not in state_dict or source in done:
                    continue
                value = state_dict[key]
                if key in self._layout.constants:
                    self.constants[key] = _detached(value)
                    continue
                done.add(source)
                copies, placement = held[source]
                local = self._local(key, value, copies[0], placement)
                for copy in copies:  # a tied weight has a copy on each stage that reads it
                    copy.copy_(local)

    # -- the optimizer's state -----------------------------------------------------------------

    def optimizer_state_dict(
        self, optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter]
    ) -> dict[str, Any]:
        """``optimizer``'s state for DCP, keyed by the parameters' model names (``params``: the
        ones the optimizer was built from). Creates the state of an optimizer that has not
        stepped yet (torch's helper runs one step with zero gradients and learning rate 0)."""
        flat: dict[str, Any] = dict(
            get_optimizer_state_dict(_holder(params), optimizer, options=_OPTIM_OPTIONS)
        )
        held = self._held()
        return {
            key: self._state_global(key, value, held[name][0][0], held[name][1])
            if (name := _state_param(key, held)) is not None and _is_shaped(value)
            else value
            for key, value in flat.items()
        }

    def load_optimizer_state_dict(
        self,
        optimizer: torch.optim.Optimizer,
        params: Mapping[str, nn.Parameter],
        state_dict: Mapping[str, Any],
    ) -> None:
        """Load :meth:`optimizer_state_dict`'s form (after ``dcp.load``) into ``optimizer``."""
        held = self._held()
        local: dict[str, Any] = {
            key: self._local(key, value, held[name][0][0], held[name][1])
            if (name := _state_param(key, held)) is not None and _is_shaped(value)
            else value
            for key, value in state_dict.items()
        }
        set_optimizer_state_dict(_holder(params), optimizer, local, options=_OPTIM_OPTIONS)

    # -- placements ----------------------------------------------------------------------------

    def _held(self) -> dict[str, tuple[list[torch.Tensor], str]]:
        """Every parameter and buffer of this rank's stages by stage name: its copies (one per
        stage that reads it) and its TP placement (``"R"``: whole). Looked up on each call, so
        a buffer a stage replaces is never missed."""
        held: dict[str, tuple[list[torch.Tensor], str]] = {}
        for stage in self._stages:
            info = stage.meta.get(TP_META_KEY)
            stored = info.param_placements if info is not None else {}
            for name, tensor in stage.state_dict(keep_vars=True).items():
                held.setdefault(name, ([], stored.get(name, "R")))[0].append(tensor)
        return held

    def _state_global(
        self, key: str, value: torch.Tensor, param: torch.Tensor, placement: str
    ) -> Any:
        """Optimizer state ``value`` of a parameter placed ``placement``, as DCP saves it."""
        if Placement.parse(placement).is_shard and value.shape != param.shape:
            raise CheckpointError(
                f"optimizer state {key!r} has shape {tuple(value.shape)}, not its parameter's "
                f"{tuple(param.shape)}: the state of a tensor-parallel parameter is saved placed "
                "like the parameter, and this one is not elementwise, so which part of the whole "
                "it is cannot be told. Use an optimizer whose state is shaped like its parameters "
                "(SGD, Adam, AdamW, ...) or a mesh without tp."
            )
        return self._global(value, placement)

    def _global(self, tensor: torch.Tensor, placement: str) -> Any:
        """``tensor`` (this rank's piece) as DCP saves it: a DTensor over the tp mesh for a
        ``S(k)`` shard, the whole tensor for a grouped shard, else the tensor itself (an FSDP
        shard of a TP shard gathered over the fsdp mesh first)."""
        p = Placement.parse(placement)
        local = tensor.detach()
        if not p.is_shard or self._tp is None:
            return local
        if isinstance(local, DTensor):  # FSDP2's piece of this tp rank's shard
            local = local.full_tensor()
        if p.groups == 1:
            shape = _global_shape(local.shape, p, self._degree)
            stride = torch.empty(shape, device="meta").stride()
            return DTensor.from_local(
                local, self._tp, [Shard(p.dim)], run_check=False, shape=shape, stride=stride
            )
        pieces = [torch.empty_like(local) for _ in range(self._degree)]
        dist.all_gather(pieces, local.contiguous(), group=self._tp.get_group())
        return unshard_tensor(pieces, p)

    def _local(self, key: str, value: Any, like: torch.Tensor, placement: str) -> torch.Tensor:
        """This rank's piece of ``value`` (a DTensor of :meth:`_global`'s form, or the whole
        tensor), shaped like its copy ``like``."""
        p = Placement.parse(placement)
        if isinstance(like, DTensor) and not (p.is_shard and self._tp is not None):
            return _fsdp_local(key, value, like)  # FSDP2's shard of a whole tensor
        piece = self._tp_piece(key, value, like.shape, p)
        if isinstance(like, DTensor):  # FSDP2's piece of this tp rank's shard
            piece = piece.to(device=like.device, dtype=like.dtype)
            return distribute_tensor(piece, like.device_mesh, like.placements, src_data_rank=None)
        return piece

    def _tp_piece(self, key: str, value: Any, shape: torch.Size, p: Placement) -> torch.Tensor:
        """This tp rank's piece of ``value`` (a DTensor of :meth:`_global`'s form, or the whole
        tensor), of the shape ``shape`` this rank holds."""
        whole = _global_shape(shape, p, self._degree)
        if isinstance(value, DTensor):
            local = value.to_local()
        elif not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{key!r} is a {type(value).__name__}, not a tensor.")
        elif p.is_shard and value.shape == whole and self._degree > 1:
            local = shard_tensor(value, p, self._tp_rank, self._degree)
        else:
            local = value
        if local.shape != shape:
            raise CheckpointError(
                f"{key!r} has shape {tuple(value.shape)} but the model's tensor has shape "
                f"{tuple(whole)}: the checkpoint is of another model (or another config of it)."
            )
        return local


def _fsdp_local(key: str, value: Any, like: DTensor) -> DTensor:
    """``value`` (FSDP's DTensor as :meth:`ShardedState.state_dict` gives it, or the whole
    tensor) placed like the FSDP shard ``like``; each rank cuts its own shard of a whole tensor."""
    if not isinstance(value, torch.Tensor):
        raise CheckpointError(f"{key!r} is a {type(value).__name__}, not a tensor.")
    if value.shape != like.shape:
        raise CheckpointError(
            f"{key!r} has shape {tuple(value.shape)} but the model's tensor has shape "
            f"{tuple(like.shape)}: the checkpoint is of another model (or another config of it)."
        )
    if isinstance(value, DTensor):
        return value
    whole = value.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def _holder(params: Mapping[str, nn.Parameter]) -> nn.Module:
    """A module whose ``named_parameters()`` are ``params`` under their model names, for torch's
    state-dict helpers, which name optimizer state by a module's parameter names."""
    root = nn.Module()
    for name, param in params.items():
        set_attr_at(root, name, param)
    return root


def _state_param(key: str, held: Mapping[str, Any]) -> str | None:
    """The parameter a flattened ``state.<param>.<name>`` optimizer key belongs to."""
    if not key.startswith("state."):
        return None
    name = key[len("state.") :]
    while "." in name:
        name = name.rsplit(".", 1)[0]
        if name in held:
            return name
    return None


def _is_shaped(value: Any) -> bool:
    """Optimizer state placed like its parameter: a tensor with dimensions (``step`` is 0-d)."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _global_shape(shape: torch.Size, p: Placement, degree: int) -> torch.Size:
    if not p.is_shard:
        return torch.Size(shape)
    out = list(shape)
    out[p.dim] *= degree
    return torch.Size(out)


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _few(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
