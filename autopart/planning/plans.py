"""Plan values: what the solver decided, frozen, self-validating, and JSON in and out (no pickle).

A plan file is data a user may edit or a program may tamper with, so :meth:`Plan.from_json` checks
every field and raises :class:`PlanError` naming the bad one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from autopart._compat import StrEnum
from autopart.errors import AutopartError
from autopart.planning.schedule import SPLIT_BACKWARD, ScheduleKind
from autopart.precision import Precision

__all__ = [
    "PLAN_FORMAT_VERSION",
    "BaselineResult",
    "MeshAxis",
    "Plan",
    "PlanError",
    "RecomputedBlock",
    "ScheduleOption",
    "SolverInfo",
    "StagePlan",
    "TPSection",
    "format_mesh",
    "parse_mesh",
    "replica_label",
    "replicas",
]

PLAN_FORMAT_VERSION = 1


class PlanError(AutopartError):
    """A plan (or plan file) is malformed."""


class MeshAxis(StrEnum):
    DP = "dp"
    FSDP = "fsdp"
    """Data parallelism with parameters, gradients and optimizer state sharded (torch's FSDP2)."""
    PP = "pp"
    TP = "tp"


def parse_mesh(spec: str | Mapping[str, int]) -> dict[str, int]:
    """``"pp=4,tp=2"`` -> ``{"pp": 4, "tp": 2}`` (axes in dp, fsdp, pp, tp order)."""
    if isinstance(spec, Mapping):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            if not sep or not value.strip().isdigit():
                raise PlanError(
                    f"bad mesh spec {spec!r}: write axis=size pairs such as 'pp=4' or 'dp=2,pp=2,tp=2'."
                )
            items.append((key.strip(), int(value)))
    known = [a.value for a in MeshAxis]
    mesh: dict[str, int] = {}
    for key, size in items:
        if key not in known:
            raise PlanError(
                f"unknown mesh axis {key!r} in {spec!r}; the axes are {', '.join(known)}."
            )
        if key in mesh:
            raise PlanError(f"mesh axis {key!r} appears twice in {spec!r}.")
        if not isinstance(size, int) or size < 1:
            raise PlanError(f"mesh axis {key!r} must have a size >= 1, got {size!r}.")
        mesh[key] = size
    if not mesh:
        raise PlanError("empty mesh spec; write e.g. 'pp=4'.")
    return {a: mesh[a] for a in known if a in mesh}


def format_mesh(mesh: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def replica_label(dp: int, fsdp: int) -> str:
    """The data-parallel axes of a mesh as a spec (``"dp=2,fsdp=2"``), for messages."""
    return ",".join(f"{k}={v}" for k, v in (("dp", dp), ("fsdp", fsdp)) if v > 1 or k == "dp")


def replicas(mesh: Mapping[str, int]) -> int:
    """Data-parallel replicas of a mesh: ``dp x fsdp`` (each pipelines its share of the batch)."""
    return mesh.get("dp", 1) * mesh.get("fsdp", 1)


@dataclass(frozen=True, slots=True)
class StagePlan:
    index: int
    device: int
    """Pipeline rank that runs this stage (differs from index only for interleaved schedules)."""
    modules: tuple[str, ...]
    node_count: int
    forward_s: float
    backward_s: float
    predicted_s: float
    """Forward + backward time of one micro-batch, with receiving activations and gradients."""
    param_bytes: int
    peak_memory_bytes: int
    """Peak memory of the device that runs this stage under the plan's schedule."""
    activation_bytes: int = 0
    """Bytes kept per micro-batch in flight: what its nodes save for backward, the outputs the
    pipeline keeps until the backward and, on the last stage, what the loss saves
    (:func:`autopart.planning.stage_memory.stage_memory`)."""
    backward_weight_s: float = 0.0
    """The part of ``backward_s`` that computes parameter gradients (``W`` of a zero-bubble
    schedule). Written to JSON only when not 0."""
    recompute_s: float = 0.0
    """The part of ``backward_s`` that runs recomputed blocks' forwards again. Written to JSON
    only when not 0."""
    rematerialized_bytes: int = 0
    """The most one recomputed block of this stage rebuilds during its backward (held on top of
    the in-flight activations). Written to JSON only when not 0."""
    working_bytes: int = 0
    """Gradients its backward holds at once on top of what is kept (the loss's on the last
    stage). Written to JSON only when not 0."""
    buffer_bytes: int = 0
    """The pipeline's receive buffers for its activations and gradients, one per micro-batch,
    held all step. Written to JSON only when not 0."""
    hidden_gather_s: float = 0.0
    """Seconds of the stage's first-forward FSDP all-gathers that run behind its layers'
    computation (``mesh_plan.hidden_gathers_s``), taken off the step's gradient sync. Written
    to JSON only when not 0."""
    deferred_bytes: int = 0
    """Under FSDP2: the training state it holds only from the end of its first backward on (the
    unsharded gradients, and its layers' parameters where they reshard after forward;
    ``stage_memory.deferred_state``). Written to JSON only when not 0, as are the three below."""
    forward_gathered_bytes: int = 0
    """With ``Plan.reshard_after_forward``: the most a forward holds gathered (two layers)."""
    first_backward_bytes: int = 0
    """Under FSDP2: what its first backward holds at most on top of what is kept (the gradients
    and layers it has reached, the working set)."""
    resharded_param_bytes: int = 0
    """With ``Plan.reshard_after_forward``: its layers' parameter bytes, gathered again by each
    micro-batch."""

    def __post_init__(self) -> None:
        _check(self.index >= 0 and self.device >= 0, "stage index and device must be >= 0")
        _check(self.node_count >= 0, f"stage {self.index}: node_count must be >= 0")
        for name in ("forward_s", "backward_s", "predicted_s", "backward_weight_s", "recompute_s"):
            _check_nonneg(getattr(self, name), f"stages[{self.index}].{name}")
        _check(
            self.backward_weight_s <= self.backward_s * (1 + 1e-9),
            f"stages[{self.index}].backward_weight_s exceeds backward_s (it is a part of it)",
        )
        _check(
            self.param_bytes >= 0
            and self.peak_memory_bytes >= 0
            and self.rematerialized_bytes >= 0
            and self.working_bytes >= 0
            and self.buffer_bytes >= 0
            and min(self.deferred_bytes, self.forward_gathered_bytes) >= 0
            and min(self.first_backward_bytes, self.resharded_param_bytes) >= 0,
            f"stage {self.index}: byte counts must be >= 0",
        )


@dataclass(frozen=True, slots=True)
class RecomputedBlock:
    """A run of nodes whose forward runs again in the backward (``torch.utils.checkpoint``):
    the stage keeps only its inputs (``Plan.recompute``); or, ``selective``, its inputs and its
    weight matmuls' outputs (:mod:`autopart.planning.selective`)."""

    name: str
    """Its module path (a layer such as ``model.layers.3``, or ``first..last``)."""
    stage: int
    nodes: tuple[str, ...]
    """Its nodes, in topological order (names of ``Plan.stage_of``)."""
    recompute_s: float
    """Seconds its forward takes again, per micro-batch."""
    saved_bytes: int
    """Activation bytes per micro-batch it no longer keeps."""
    selective: bool = False
    """It recomputes only the ops that are not weight matmuls or fused attention (torch's
    selective activation checkpointing). Written to JSON only when set."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(str(n) for n in self.nodes))
        _check(bool(self.nodes), f"recompute block {self.name!r} has no nodes")
        _check(
            isinstance(self.selective, bool),
            f"recompute[{self.name!r}].selective must be true or false",
        )
        _check_nonneg(self.recompute_s, f"recompute[{self.name!r}].recompute_s")
        _check(self.saved_bytes >= 0, f"recompute[{self.name!r}].saved_bytes must be >= 0")


@dataclass(frozen=True, slots=True)
class SolverInfo:
    status: str
    time_s: float
    blocks: int
    objective_bound_s: float = 0.0


@dataclass(frozen=True, slots=True)
class BaselineResult:
    bottleneck_s: float
    step_time_s: float


@dataclass(frozen=True, slots=True)
class ScheduleOption:
    """One schedule the planner compared (``Plan.schedule_options``): why the plan's schedule won."""

    schedule: str
    stages_per_device: int
    micro_batches: int
    step_time_s: float
    """The simulated step (with the dp gradient all-reduce); 0 where no split fits memory."""
    peak_memory_bytes: int
    """The simulated peak of the fullest device; where no split fits, the least a split needs."""
    fits: bool
    """Whether it fits the plan's memory limit."""
    estimate: bool = False
    """Simulated on the best contiguous split (the stage ILP's hint) rather than a solved one:
    the planner did not solve this layout, as its estimate is too far behind the fastest."""

    def __post_init__(self) -> None:
        _check(
            self.schedule in tuple(ScheduleKind),
            f"schedule_options: unknown schedule {self.schedule!r}",
        )
        _check(
            self.stages_per_device >= 1 and self.micro_batches >= 1,
            "schedule_options: stages_per_device and micro_batches must be >= 1",
        )
        _check_nonneg(self.step_time_s, "schedule_options[].step_time_s")
        _check(self.peak_memory_bytes >= 0, "schedule_options[].peak_memory_bytes must be >= 0")


_SHARDINGS = ("replicate", "col", "row")


@dataclass(frozen=True, slots=True)
class TPSection:
    """The tensor-parallel part of a plan (the JSON ``"tp"`` object): how every node of the graph
    is sharded over the mesh's ``tp`` dimension. Node names are those of ``stage_of``."""

    degree: int
    sharding: Mapping[str, str]
    """Every weight matmul and embedding -> ``"replicate"``, ``"col"`` (output features split) or
    ``"row"`` (input features split, partial output; an embedding: vocabulary-parallel)."""
    forward_all_reduces_per_block: int
    comm_bytes_per_step: int
    """Bytes each rank sends per training step in TP collectives (forward and backward)."""
    placements: Mapping[str, str] = field(default_factory=dict)
    """Every node -> the placement of its output: ``"R"``, ``"P"``, ``"S(k)"``, ``"S(k,groups=g)"``
    (see ``autopart.passes.tp.strategies.Placement``)."""
    input_placements: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    """Every node -> {input node: the placement the node reads it in}; where it differs from the
    input's own placement, a collective (or a local slice) reshards it."""
    fallbacks: Mapping[str, str] = field(default_factory=dict)
    """Nodes left replicated because the degree does not divide a size they need split, and why."""

    def __post_init__(self) -> None:
        _check(self.degree >= 1, f"tp.degree must be >= 1, got {self.degree}")
        bad = {n: v for n, v in self.sharding.items() if v not in _SHARDINGS}
        _check(not bad, f"tp.sharding has unknown strategies {bad}; use {', '.join(_SHARDINGS)}")
        _check(
            self.forward_all_reduces_per_block >= 0 and self.comm_bytes_per_step >= 0,
            "tp counts must be >= 0",
        )
        for name in ("sharding", "placements", "fallbacks"):
            object.__setattr__(self, name, {str(k): str(v) for k, v in getattr(self, name).items()})
        object.__setattr__(
            self,
            "input_placements",
            {
                str(k): {str(a): str(b) for a, b in v.items()}
                for k, v in self.input_placements.items()
            },
        )

    @classmethod
    def from_tp_plan(cls, tp: Any) -> TPSection:
        """From an ``autopart.solver.tp_ilp.TPPlan``."""
        return cls(
            degree=tp.degree,
            sharding=dict(tp.sharding),
            forward_all_reduces_per_block=tp.forward_all_reduces_per_block,
            comm_bytes_per_step=tp.comm_bytes_per_step,
            placements=dict(tp.placements),
            input_placements={k: dict(v) for k, v in tp.input_placements.items()},
            fallbacks=dict(tp.fallbacks),
        )


@dataclass(frozen=True, slots=True)
class Plan:
    model: str
    mesh: Mapping[str, int]
    device: str
    memory_limit_bytes: int | None
    schedule: str
    micro_batches: int
    stages_per_device: int
    stages: tuple[StagePlan, ...]
    stage_of: Mapping[str, int]
    """Pipeline stage of every graph node, by its node name."""
    bottleneck_s: float
    lower_bound_s: float
    gap: float
    step_time_s: float
    bubble_fraction: float
    solver: SolverInfo
    baselines: Mapping[str, BaselineResult] = field(default_factory=dict)
    optimizer: str = "adamw"
    boundary_bytes: tuple[int, ...] = ()
    """Bytes sent forward across each stage boundary per micro-batch (the same come back as gradients)."""
    tp: TPSection | None = None
    """Tensor parallelism within each stage (None: no ``tp`` axis, or ``tp=1``)."""
    schedule_options: tuple[ScheduleOption, ...] = ()
    """Every schedule, stages per rank and micro-batch count compared, with its simulated step and
    peak memory (fastest first). Written to JSON only when not empty."""
    profile_s: float | None = None
    """Seconds spent measuring the graph's ops when the plan was made on measured times
    (``--profile``); ``None`` for a plan on the cost model. Written to JSON only when set."""
    experts: str = ""
    """How the mixture-of-experts layers were costed (tokens charged per expert, ``T*k/E``, the
    imbalance factor; :meth:`autopart.passes.routing.ExpertRouting.describe`); empty for a model
    that routes nothing, and then not written to JSON."""
    recompute: tuple[RecomputedBlock, ...] = ()
    """The blocks that recompute their forward in backward (in stage order). Written to JSON
    only when not empty."""
    precision: str = "model"
    """``"model"`` or ``"bf16-mixed"`` (:mod:`autopart.precision`). Written to JSON only when
    mixed."""
    reshard_after_forward: bool = False
    """Each layer's FSDP2 unit reshards after its forward and is gathered again by the next
    (``fully_shard(reshard_after_forward=True)``): less memory under GPipe, a gather per
    micro-batch more. Only with an fsdp axis and GPipe. Written to JSON only when true."""

    def __post_init__(self) -> None:
        known = [p.value for p in Precision]
        _check(self.precision in known, f"precision {self.precision!r} is not one of {known}")
        mesh = parse_mesh(dict(self.mesh))
        object.__setattr__(self, "mesh", mesh)
        num_stages = mesh.get("pp", 1) * self.stages_per_device
        _check(
            self.schedule in tuple(ScheduleKind),
            f"schedule must be one of {', '.join(ScheduleKind)}, got {self.schedule!r}",
        )
        _check(self.micro_batches >= 1, f"micro_batches must be >= 1, got {self.micro_batches}")
        _check(self.stages_per_device >= 1, "stages_per_device must be >= 1")
        _check(
            len(self.stages) == num_stages,
            f"stages has {len(self.stages)} entries for {num_stages} pipeline stages",
        )
        for i, st in enumerate(self.stages):
            _check(st.index == i, f"stages[{i}].index is {st.index}")
        bad = [
            n for n, s in self.stage_of.items() if not (isinstance(s, int) and 0 <= s < num_stages)
        ]
        _check(not bad, f"stage_of gives an invalid stage to node(s) {bad[:3]}")
        for name in ("bottleneck_s", "lower_bound_s", "step_time_s"):
            _check_nonneg(getattr(self, name), name)
        if self.profile_s is not None:
            _check_nonneg(self.profile_s, "profile_s")
        _check(isinstance(self.experts, str), f"experts must be a string, got {self.experts!r}")
        _check(
            0.0 <= self.bubble_fraction < 1.0,
            f"bubble_fraction must be in [0, 1), got {self.bubble_fraction}",
        )
        _check(
            self.lower_bound_s <= self.bottleneck_s * (1 + 1e-9),
            "lower_bound_s exceeds bottleneck_s: not a lower bound",
        )
        want_gap = self.bottleneck_s / self.lower_bound_s - 1 if self.lower_bound_s > 0 else 0.0
        _check(
            math.isclose(self.gap, want_gap, rel_tol=1e-6, abs_tol=1e-9),
            f"gap {self.gap} != bottleneck_s / lower_bound_s - 1 = {want_gap}",
        )
        _check(
            len(self.boundary_bytes) in (0, num_stages - 1)
            and all(b >= 0 for b in self.boundary_bytes),
            f"boundary_bytes needs {num_stages - 1} entries >= 0",
        )
        object.__setattr__(self, "boundary_bytes", tuple(int(b) for b in self.boundary_bytes))
        tp_size = mesh.get("tp", 1)
        if self.tp is not None:
            _check(
                self.tp.degree == tp_size,
                f"tp.degree is {self.tp.degree} but the mesh has tp={tp_size}",
            )
        object.__setattr__(self, "stage_of", dict(self.stage_of))
        object.__setattr__(self, "baselines", dict(self.baselines))
        self._check_recompute()
        self._check_reshard()

    def _check_reshard(self) -> None:
        if not self.reshard_after_forward:
            return
        _check(
            self.mesh.get("fsdp", 1) > 1,
            "reshard_after_forward needs an fsdp axis of more than one rank (nothing is sharded "
            "without one); drop it or add fsdp=N to the mesh",
        )
        _check(
            self.schedule == ScheduleKind.GPIPE,
            f"reshard_after_forward lowers memory under GPipe only (under {self.schedule} a "
            "backward runs between forwards and leaves its layers whole); drop it or use gpipe",
        )

    def _check_recompute(self) -> None:
        if not self.recompute:
            return
        _check(
            self.schedule not in SPLIT_BACKWARD,
            f"the {self.schedule} schedule splits the backward, which would run a recomputed "
            "forward twice; plan it with --recompute none or another schedule",
        )
        for block in self.recompute:
            wrong = [n for n in block.nodes if self.stage_of.get(n) != block.stage]
            _check(
                not wrong,
                f"recompute block {block.name!r} names nodes {wrong[:3]} that are not on its "
                f"stage {block.stage}",
            )

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def under_fsdp(self) -> bool:
        """Whether torch's FSDP2 holds the parameters: over an fsdp axis, or for mixed precision
        (its ``MixedPrecisionPolicy``) on any mesh."""
        return self.mesh.get("fsdp", 1) > 1 or self.precision != "model"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format_version"] = PLAN_FORMAT_VERSION
        # Fields added after the format's first release are written only where set, so the file
        # of a plan that does not use them is unchanged.
        d["stages"] = [
            _drop_unset(
                asdict(s),
                backward_weight_s=0.0,
                recompute_s=0.0,
                rematerialized_bytes=0,
                working_bytes=0,
                buffer_bytes=0,
                hidden_gather_s=0.0,
                deferred_bytes=0,
                forward_gathered_bytes=0,
                first_backward_bytes=0,
                resharded_param_bytes=0,
            )
            for s in self.stages
        ]
        d["recompute"] = tuple(_drop_unset(r, selective=False) for r in d["recompute"])
        return _drop_unset(
            d,
            schedule_options=(),
            profile_s=None,
            experts="",
            recompute=(),
            precision="model",
            reshard_after_forward=False,
        )

    def to_json(self, *, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(
                f"plan file is not valid JSON ({exc}); write it with Plan.to_json() or `autopart plan --out`."
            ) from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Any) -> Plan:
        _check(isinstance(raw, dict), "a plan must be a JSON object")
        version = raw.get("format_version")
        _check(
            version == PLAN_FORMAT_VERSION,
            f"plan format_version {version!r} is not {PLAN_FORMAT_VERSION}; re-create the plan with this autopart.",
        )
        try:
            return cls(
                model=str(raw["model"]),
                mesh=dict(raw["mesh"]),
                device=str(raw["device"]),
                memory_limit_bytes=raw["memory_limit_bytes"],
                schedule=str(raw["schedule"]),
                micro_batches=int(raw["micro_batches"]),
                stages_per_device=int(raw["stages_per_device"]),
                stages=tuple(
                    StagePlan(**{**s, "modules": tuple(s["modules"])}) for s in raw["stages"]
                ),
                stage_of={str(k): v for k, v in dict(raw["stage_of"]).items()},
                bottleneck_s=float(raw["bottleneck_s"]),
                lower_bound_s=float(raw["lower_bound_s"]),
                gap=float(raw["gap"]),
                step_time_s=float(raw["step_time_s"]),
                bubble_fraction=float(raw["bubble_fraction"]),
                solver=SolverInfo(**raw["solver"]),
                baselines={
                    k: BaselineResult(**v) for k, v in dict(raw.get("baselines", {})).items()
                },
                optimizer=str(raw.get("optimizer", "adamw")),
                boundary_bytes=tuple(raw.get("boundary_bytes", ())),
                tp=TPSection(**raw["tp"]) if raw.get("tp") is not None else None,
                schedule_options=tuple(
                    ScheduleOption(**o) for o in raw.get("schedule_options", ())
                ),
                profile_s=None if raw.get("profile_s") is None else float(raw["profile_s"]),
                experts=str(raw.get("experts", "")),
                recompute=tuple(RecomputedBlock(**r) for r in raw.get("recompute", ())),
                precision=str(raw.get("precision", "model")),
                reshard_after_forward=_as_bool(raw.get("reshard_after_forward", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(
                f"plan file is malformed: {type(exc).__name__}: {exc}; re-create it with `autopart plan --out`."
            ) from exc


def _drop_unset(d: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """``d`` without the keys of ``defaults`` whose value is the default."""
    return {k: v for k, v in d.items() if k not in defaults or v != defaults[k]}


def _as_bool(value: Any) -> bool:
    """A JSON true or false."""
    _check(isinstance(value, bool), f"reshard_after_forward must be true or false, got {value!r}")
    return bool(value)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise PlanError(f"invalid plan: {message}")


def _check_nonneg(value: Any, name: str) -> None:
    _check(
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 0,
        f"{name} must be a finite number >= 0, got {value!r}",
    )
