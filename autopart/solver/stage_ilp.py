"""Stage ILP: assign the blocks of a :class:`~autopart.planning.graph.BlockGraph` to pipeline stages.

Data (per micro-batch, integers after scaling):
  w_b                     forward + backward time of block b
  t = (u_t, C_t, n_t)     a tensor produced by block u_t, consumed by blocks C_t, n_t bytes
  a_b, m_b                activation bytes block b saves for backward; its unshared parameter state bytes
  m_q                     state bytes of a parameter q shared by several blocks (tied embeddings)
  f_s                     micro-batches in flight on stage s under the schedule (1F1B: min(p-s, m))
  d(s)                    the device of stage s: looped (s mod devices) or any map, e.g. V-shaped
  alpha, beta             point-to-point latency and bandwidth (alpha-beta model)
  R                       recompute options o = (b, full or selective) where that keeps fewer
                          bytes (``recompute=True``): block b under o keeps a'_o < a_b, takes
                          w'_o = w_b + the forward it runs again, and rebuilds h_o during the
                          backward of one micro-batch (:meth:`~autopart.planning.blocks.Block.recompute`;
                          selective: only the ops that read no weight, :mod:`autopart.planning.selective`)

Variables:
  x[b,s] in {0,1}         block b runs on stage s                           (_add_assignment)
  c[t,k] in {0,1}         tensor t crosses the boundary between k and k+1   (_add_crossing)
  y[q,s] in {0,1}         shared parameter q lives on stage s               (_add_shared_params)
  z >= 0                  the slowest device's time per micro-batch         (_add_bottleneck)
  r[o,s] in {0,1}         option o's block runs on stage s and recomputes as o   (_add_recompute)
  h_d >= 0                the most one recomputed block of device d rebuilds (_add_recompute)
  k_d >= 0                the largest working set of a backward on device d  (_add_working)
  e[t,s] in {0,1}         stage s keeps value t again: t is saved by several blocks
                          (``BlockGraph.saved_across``), its first saver's a_b counts it, and a
                          later saver keeps it on s where the first does not    (_add_saved_again)
  g[t,s] in {0,1}         stage s keeps value t, made on an earlier stage: the stage's receive
                          buffer of t, which the buffers count (M > 0)        (_add_received_kept)

Constraints:
  one stage per block:    sum_s x[b,s] = 1                                  (_add_assignment)
  no empty stage:         sum_b x[b,s] >= 1                                 (_add_assignment)
  parameters everywhere:  sum_{s on d} sum_{b in Q} x[b,s] >= 1 for every device d, where Q are
                          the blocks that use a parameter, when |Q| >= p (always feasible then);
                          so every rank can build an optimizer               (_add_assignment)
  precedence:             stage(u_t) <= stage(v) for v in C_t, stage(b) = sum_s s x[b,s]
                                                                            (_add_precedence)
  crossing:               c[t,k] >= L[u_t,k] - L[v,k] for v in C_t, where L[b,k] = sum_{s<=k} x[b,s]
                          (a skip tensor is forwarded through, and counted at, every boundary it passes)
                                                                            (_add_crossing)
  shared parameters:      y[q,s] >= x[b,s] for every block b that uses q    (_add_shared_params)
  recompute:              sum_{o of b} r[o,s] <= x[b,s]; h_d >= h_o r[o,s] for s on d
                                                                            (_add_recompute)
  working set:            k_d >= k_b x[b,s] for s on d, k_d >= g_d, where k_b is the gradients
                          one of b's nodes holds in its backward (its output's, its inputs', its
                          weights' new one where M != 1) and g_d a floor (``working_floor_bytes``:
                          the loss's backward on the last stage's device)    (_add_working)
  kept again:             e[t,s] >= K[c,s] - K[u_t,s] for every later saver c of t, where
                          K[b,s] = x[b,s] - sum_{o of b} r[o,s] (b runs on s and keeps what it
                          saves)                                            (_add_saved_again)
  received and kept:      g[t,s] <= 1 - x[u_t,s] and g[t,s] <= sum_{c in C_t} k[c,s], where
                          k[c,s] = x[c,s] if c saves t, else sum_{o of c} r[o,s] (recomputing, c
                          keeps its inputs); s > 0, M > 0, in the solves that offer
                          recomputation only: in those keeping every activation the variables
                          slowed CP-SAT's proofs that no split fits past their time limit
                          (counted twice there, an upper bound)             (_add_received_kept)
  memory per device d:    sum_{s on d} [ sum_b x[b,s] (m_b + f_s a_b) - sum_{o in R} r[o,s] f_s
                          (a_b - a'_o) + sum_t e[t,s] f_s n_t - sum_t g[t,s] f_s n_t
                          + sum_q y[q,s] m_q + (M + f_s) B_s + M B_{s-1} ]
                          + h_d + k_d + l_d <= limit                        (_add_memory)
                          with M micro-batches (``micro_batches``; 0: not counted), the
                          pipeline's receive buffers (one per micro-batch for the activations
                          in, M B_{s-1}, and the gradients back, M B_s), the outputs kept until
                          their backward (f_s B_s), and l_d held whatever the split
                          (``reserved_bytes``: the loss kept); a received value the stage keeps
                          is its receive buffer (torch hands the buffer over as the input), so
                          it is taken off the kept values (g), as ``stage_memory`` counts it
  stage time:             T_s = sum_b w_b x[b,s] + [s>0](alpha + B_{s-1}/beta) + [s<p-1](alpha + B_s/beta),
                          B_k = sum_t n_t c[t,k]; a boundary between two stages of one device
                          (the turn of a V-shaped schedule) is handed over locally and costs 0;
                          plus sum_{o in R} (w'_o - w_b) r[o,s]
  bottleneck:             z >= sum_{s on d} T_s for every device d          (_add_bottleneck)

Objective: minimize z, then (tie-breakers, weighted so they never trade against z) the bytes sent
between stages sum_k B_k plus the recompute time sum r[o,s] (w'_o - w_b).   (_add_objective)

Recomputation is offered with ``recompute=True``; the planner offers it only where no split fits
without (:mod:`autopart.planning.mesh_plan`, on blocks that are whole layers:
:meth:`~autopart.planning.blocks.BlockGraph.by_layers`). Recomputing only adds time, so the lower
bounds (CP-SAT's, and :func:`~autopart.solver.cost.lower_bound_s` on the nodes) stay valid.

The solve is seeded, single-threaded and limited in CP-SAT's deterministic time (so deterministic
even when it stops at its limit), and starts from a hint
(the exact chain DP over contiguous splits). Status is checked; an infeasible memory limit is
answered by a second solve that minimizes the peak memory per device, so the error can say the
minimum a plan needs (recomputing wherever that saves memory, when recomputation is allowed).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ortools.sat.python import cp_model

from autopart.cost_models.comm import p2p_time_s
from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError
from autopart.planning.blocks import BlockGraph
from autopart.solver._memory_need import MemoryNeed, memory_need
from autopart.solver.cpsat import limited_solver

__all__ = ["InfeasibleMemoryError", "StageSolution", "solve_stages"]

_TIME_UNITS = 200_000  # the largest stage time maps to this many integer units
_BYTE_UNIT = 1 << 20  # memory in MiB (rounded up, so feasibility is never overstated)


class InfeasibleMemoryError(AutopartError):
    """No assignment fits the per-device memory limit."""

    def __init__(
        self,
        message: str,
        minimum_bytes: int,
        *,
        need: MemoryNeed | None = None,
        reason: str | None = None,
        recomputed: bool = False,
    ) -> None:
        super().__init__(message, reason=reason)
        self.minimum_bytes = minimum_bytes
        """Proven: every split needs at least this much per device."""
        self.recomputed = recomputed
        """Whether the minimum lets layers recompute (where that saves memory)."""
        self.need = need or MemoryNeed(minimum_bytes, minimum_bytes, 0.0)
        """What the memory search proved and found (see :class:`MemoryNeed`)."""

    @property
    def fits_bytes(self) -> int | None:
        """The peak of the leanest split found (``minimum_bytes`` when proven optimal); ``None``
        if the memory search found none within its time limit."""
        return self.need.fits_bytes


@dataclass(frozen=True, slots=True)
class StageSolution:
    stage_of: tuple[int, ...]
    """Stage of each block."""
    status: str
    """"OPTIMAL", "FEASIBLE" (time limit reached with a solution) or "HINT" (the hint, when the
    solver found nothing better within the time limit)."""
    time_s: float
    objective_bound_s: float
    """CP-SAT's proven lower bound on the bottleneck of the block-level problem."""
    recompute: tuple[int, ...] = ()
    """The blocks that recompute their forward in backward
    (:meth:`~autopart.planning.blocks.BlockGraph.with_recompute`)."""
    selective: tuple[int, ...] = ()
    """The blocks that recompute their selective spans only."""


@dataclass(frozen=True, slots=True)
class _Option:
    """A way block ``block`` may recompute (an element of R)."""

    block: int
    selective: bool
    act_mib: int
    """Activation MiB the block keeps under it."""
    work: int
    """Time units it adds (the forward it runs again)."""
    rebuilt_mib: int
    """MiB it rebuilds during the block's backward."""


@dataclass(frozen=True, slots=True)
class _Data:
    bg: BlockGraph
    num_stages: int
    device_of_stage: tuple[int, ...]
    work: tuple[int, ...]
    act_mib: tuple[int, ...]
    state_mib: tuple[int, ...]
    shared_mib: dict[str, int]
    reserved_mib: tuple[int, ...]
    """Held on each device whatever the split (:func:`solve_stages`' ``reserved_bytes``)."""
    micro_batches: int
    """M: the pipeline holds M receive buffers per boundary each way (0: not counted)."""
    working_mib: tuple[int, ...]
    """k_b: the most gradients one of block b's nodes holds in its backward."""
    working_floor_mib: tuple[int, ...]
    """g_d: the least working set of device d (the loss's backward)."""
    in_flight: tuple[int, ...]
    param_blocks: tuple[int, ...]
    """Blocks that use a parameter, of which every device needs one; empty (no such constraint)
    when there are fewer than stages."""
    may_recompute: tuple[_Option, ...]
    """R: the ways blocks may recompute (empty: recomputation is not offered)."""
    recompute: bool
    """Recomputation was offered (``solve_stages(recompute=True)``)."""
    alpha: int
    byte_time: float
    """time units per byte on a link"""
    unit_s: float


def solve_stages(
    bg: BlockGraph,
    num_stages: int,
    device: DeviceSpec,
    *,
    in_flight: Sequence[int],
    state_bytes_per_param_byte: float,
    memory_limit_bytes: int | None,
    stages_per_device: int = 1,
    device_of_stage: Sequence[int] | None = None,
    hint: Sequence[int] | None = None,
    time_limit_s: float = 10.0,
    seed: int = 0,
    explain: bool = True,
    recompute: bool = False,
    reserved_bytes: Sequence[int] | None = None,
    micro_batches: int = 0,
    hint_recompute: Sequence[int] = (),
    working_floor_bytes: Sequence[int] | None = None,
) -> StageSolution:
    """Solve the stage ILP (see the module docstring). ``in_flight[s]`` is the number of
    micro-batches whose activations stage ``s`` keeps; ``state_bytes_per_param_byte`` scales
    parameter bytes to parameter + gradient + optimizer bytes (e.g. 4 for Adam).
    ``device_of_stage`` places the stages on devices (default: looped, stage ``s`` on device
    ``s mod (num_stages / stages_per_device)``). ``explain=False`` skips the second solve that
    finds the least memory a split needs when none fits: the error then only says it is more
    than the limit. ``recompute=True`` lets blocks recompute (only where that lets a split fit
    memory or run faster: the tie-breaker charges every recomputation). ``reserved_bytes[d]`` is
    held on device ``d`` whatever the split (the loss kept; default none); ``micro_batches`` (M > 0) counts the pipeline's receive buffers and kept outputs on
    the bytes each split sends (module docstring). ``hint_recompute``: the blocks the hint
    recomputes in full (with ``recompute=True``; a hint that fits only so is still a plan).
    ``working_floor_bytes[d]``: the least working set device ``d`` holds whatever the split
    (each block's own, ``Block.backward_working_bytes`` and ``param_grad_bytes``, is counted
    on the device it runs on)."""
    data = _build_data(
        bg,
        num_stages,
        device,
        in_flight,
        state_bytes_per_param_byte,
        stages_per_device,
        device_of_stage,
        recompute=recompute,
        reserved_bytes=reserved_bytes,
        micro_batches=micro_batches,
        working_floor_bytes=working_floor_bytes,
    )
    rebuilt = frozenset(hint_recompute) & {o.block for o in data.may_recompute if not o.selective}
    if hint is not None and rebuilt and memory_limit_bytes is not None:
        rebuilt = _leaner_hint(data, hint, rebuilt, memory_limit_bytes // _BYTE_UNIT)
    solve = _Solve(data, device, memory_limit_bytes, hint, rebuilt, time_limit_s, seed)
    return solve.run(explain=explain)


@dataclass(frozen=True, slots=True)
class _Solve:
    """One stage ILP: build, solve, read (the module docstring's build order)."""

    data: _Data
    device: DeviceSpec
    memory_limit_bytes: int | None
    hint: Sequence[int] | None
    hint_recompute: frozenset[int]
    """The blocks the hint recomputes in full."""
    time_limit_s: float
    seed: int

    def run(self, *, explain: bool) -> StageSolution:
        data, hint, memory_limit_bytes = self.data, self.hint, self.memory_limit_bytes
        num_stages, time_limit_s = data.num_stages, self.time_limit_s
        model = cp_model.CpModel()
        v = _add_variables(model, data)
        x, crossing, rc = v.x, v.crossing, v.rc
        if memory_limit_bytes is not None:
            _add_memory(model, data, v, memory_limit_bytes // _BYTE_UNIT)
        z = _add_bottleneck(model, data, x, crossing, rc)
        _add_objective(model, data, z, crossing, rc)
        if hint is not None:
            _add_hint(model, data, v, hint, self.hint_recompute)
        status, solver, elapsed = _solve(model, time_limit_s, self.seed)
        if hint is not None and not _holds_parameters(data, hint):
            hint = None  # a plan of the model without the constraint: no fallback, no memory bound
        if status == cp_model.INFEASIBLE:
            assert memory_limit_bytes is not None, "without a memory limit every split is feasible"
            if not explain:
                over = (memory_limit_bytes // _BYTE_UNIT + 1) * _BYTE_UNIT
                need = MemoryNeed(over, None, time_limit_s)
                raise InfeasibleMemoryError(
                    f"no split into {num_stages} stages fits {_gib(memory_limit_bytes)} per device.",
                    over,
                    need=need,
                    reason=f"a plan {need.needs(_gib_up)}",
                )
            raise _infeasible_memory(data, memory_limit_bytes, hint, time_limit_s, self.seed)
        rebuilt = tuple(sorted(self.hint_recompute))
        hint_fits = hint is not None and (
            memory_limit_bytes is None
            or max(_memory_mib(data, hint, self.hint_recompute)) <= memory_limit_bytes // _BYTE_UNIT
        )
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE) and hint_fits:
            assert hint is not None
            # No solution within the time limit: the hint (the exact contiguous split) is valid.
            bound = _bound_s(solver, data)
            return StageSolution(tuple(hint), "HINT", elapsed, bound, recompute=rebuilt)
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            raise AutopartError(
                f"the stage solver found no plan within {time_limit_s:g} deterministic s (status "
                f"{solver.status_name(status)}); raise the time limit or use fewer blocks."
            )
        n = len(data.bg.blocks)
        stage_of = tuple(
            next(s for s in range(num_stages) if solver.value(x[b, s])) for b in range(n)
        )
        chosen = [
            o for i, o in enumerate(data.may_recompute) if solver.value(rc.r[i, stage_of[o.block]])
        ]
        full = tuple(o.block for o in chosen if not o.selective)
        some = tuple(o.block for o in chosen if o.selective)
        if (
            hint_fits
            and hint is not None
            and _device_bottleneck(data.bg.with_recompute(rebuilt), self.device, hint, data)
            < _device_bottleneck(data.bg.with_recompute(full, some), self.device, stage_of, data)
        ):
            # CP-SAT stopped at the time limit on a plan worse than its own starting point.
            hinted = StageSolution(tuple(hint), "HINT", elapsed, _bound_s(solver, data))
            return dataclasses.replace(hinted, recompute=rebuilt)
        return StageSolution(
            stage_of=stage_of,
            status=solver.status_name(status),
            time_s=elapsed,
            objective_bound_s=_bound_s(solver, data),
            recompute=full,
            selective=some,
        )


# ---------------------------------------------------------------------------------------------
# data


def _build_data(
    bg: BlockGraph,
    num_stages: int,
    device: DeviceSpec,
    in_flight: Sequence[int],
    state_per_byte: float,
    stages_per_device: int,
    device_of_stage: Sequence[int] | None,
    *,
    recompute: bool,
    reserved_bytes: Sequence[int] | None = None,
    micro_batches: int = 0,
    working_floor_bytes: Sequence[int] | None = None,
) -> _Data:
    if num_stages < 1 or stages_per_device < 1 or num_stages % stages_per_device:
        raise AutopartError(
            f"{num_stages} stages cannot be spread {stages_per_device} per device; use a positive "
            "stage count that is a multiple of a positive stages_per_device."
        )
    num_devices = num_stages // stages_per_device
    devices = tuple(
        device_of_stage
        if device_of_stage is not None
        else (s % num_devices for s in range(num_stages))
    )
    if len(devices) != num_stages or sorted(devices) != sorted(
        d for d in range(num_devices) for _ in range(stages_per_device)
    ):
        raise AutopartError(
            f"device_of_stage {devices} must give each of the {num_devices} devices exactly "
            f"{stages_per_device} of the {num_stages} stages."
        )
    if num_stages > len(bg.blocks):
        raise AutopartError(
            f"{num_stages} stages but the model has only {len(bg.blocks)} blocks; use at most {len(bg.blocks)} stages."
        )
    if len(in_flight) != num_stages:
        raise ValueError(f"in_flight has {len(in_flight)} entries for {num_stages} stages")
    total_s = sum(b.forward_s + b.backward_s for b in bg.blocks) + 2 * num_stages * p2p_time_s(
        max((t.nbytes for t in bg.tensors), default=0), device
    )
    unit_s = max(total_s, 1e-12) / _TIME_UNITS
    alpha_s = p2p_time_s(1, device)
    per_byte_s = (p2p_time_s(1 << 20, device) - alpha_s) / ((1 << 20) - 1)
    param_blocks = tuple(b.index for b in bg.blocks if b.params)
    work = tuple(round((b.forward_s + b.backward_s) / unit_s) for b in bg.blocks)
    return _Data(
        bg=bg,
        num_stages=num_stages,
        device_of_stage=devices,
        work=work,
        act_mib=tuple(math.ceil(b.activation_bytes / _BYTE_UNIT) for b in bg.blocks),
        state_mib=tuple(math.ceil(b.param_bytes * state_per_byte / _BYTE_UNIT) for b in bg.blocks),
        shared_mib={
            q: math.ceil(bg.param_bytes_by_name[q] * state_per_byte / _BYTE_UNIT)
            for q in bg.shared_params
        },
        reserved_mib=tuple(
            math.ceil(r / _BYTE_UNIT) for r in (reserved_bytes or [0] * num_devices)
        ),
        micro_batches=micro_batches,
        working_mib=tuple(
            math.ceil(
                (b.backward_working_bytes + (b.param_grad_bytes if micro_batches != 1 else 0))
                / _BYTE_UNIT
            )
            for b in bg.blocks
        ),
        working_floor_mib=tuple(
            math.ceil(f / _BYTE_UNIT) for f in (working_floor_bytes or [0] * num_devices)
        ),
        in_flight=tuple(in_flight),
        param_blocks=param_blocks if len(param_blocks) >= num_stages else (),
        may_recompute=_options(bg, work, unit_s) if recompute else (),
        recompute=recompute,
        alpha=round(alpha_s / unit_s),
        byte_time=per_byte_s / unit_s,
        unit_s=unit_s,
    )


def _options(bg: BlockGraph, work: Sequence[int], unit_s: float) -> tuple[_Option, ...]:
    """R: each block's full and selective recomputation, where each keeps fewer bytes."""
    out = []
    for b in bg.blocks:
        for selective, offered in ((False, b.can_recompute), (True, b.can_recompute_selectively)):
            if offered:
                again = b.recompute(selectively=selective)
                out.append(
                    _Option(
                        block=b.index,
                        selective=selective,
                        act_mib=math.ceil(again.activation_bytes / _BYTE_UNIT),
                        work=round((again.forward_s + again.backward_s) / unit_s) - work[b.index],
                        rebuilt_mib=math.ceil(again.rematerialized_bytes / _BYTE_UNIT),
                    )
                )
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# variables and constraints, one function per family


def _add_assignment(model: cp_model.CpModel, d: _Data) -> dict[tuple[int, int], cp_model.IntVar]:
    n, p = len(d.bg.blocks), d.num_stages
    x = {(b, s): model.new_bool_var(f"x[{b},{s}]") for b in range(n) for s in range(p)}
    for b in range(n):
        model.add_exactly_one(x[b, s] for s in range(p)).with_name(f"one_stage[{b}]")
    for s in range(p):
        model.add(sum(x[b, s] for b in range(n)) >= 1).with_name(f"non_empty[{s}]")
    # A rank without parameters cannot build a torch optimizer (an empty parameter list raises).
    for dev in sorted(set(d.device_of_stage)) if d.param_blocks else ():
        stages = [s for s in range(p) if d.device_of_stage[s] == dev]
        model.add(sum(x[b, s] for b in d.param_blocks for s in stages) >= 1).with_name(
            f"holds_parameters[{dev}]"
        )
    return x


def _holds_parameters(d: _Data, stage_of: Sequence[int]) -> bool:
    """Whether ``stage_of`` meets the parameters-everywhere constraint (the hint may not)."""
    return not d.param_blocks or {d.device_of_stage[stage_of[b]] for b in d.param_blocks} == set(
        d.device_of_stage
    )


def _stage_expr(d: _Data, x: dict[tuple[int, int], cp_model.IntVar], b: int) -> Any:
    return cp_model.LinearExpr.weighted_sum(
        [x[b, s] for s in range(d.num_stages)], list(range(d.num_stages))
    )


def _add_precedence(
    model: cp_model.CpModel, d: _Data, x: dict[tuple[int, int], cp_model.IntVar]
) -> None:
    edges = dict.fromkeys((t.producer, v) for t in d.bg.tensors for v in t.consumers)
    for u, v in edges:
        model.add(_stage_expr(d, x, u) <= _stage_expr(d, x, v)).with_name(f"precedence[{u},{v}]")


def _add_crossing(
    model: cp_model.CpModel, d: _Data, x: dict[tuple[int, int], cp_model.IntVar]
) -> dict[tuple[int, int], cp_model.IntVar]:
    p = d.num_stages
    crossing: dict[tuple[int, int], cp_model.IntVar] = {}
    for i, t in enumerate(d.bg.tensors):
        for k in range(p - 1):
            c = crossing[i, k] = model.new_bool_var(f"c[{i},{k}]")
            produced_by_k = sum(x[t.producer, s] for s in range(k + 1))
            for v in t.consumers:
                consumed_by_k = sum(x[v, s] for s in range(k + 1))
                model.add(c >= produced_by_k - consumed_by_k).with_name(f"crosses[{i},{k},{v}]")
    return crossing


def _add_shared_params(
    model: cp_model.CpModel, d: _Data, x: dict[tuple[int, int], cp_model.IntVar]
) -> dict[tuple[str, int], cp_model.IntVar]:
    y: dict[tuple[str, int], cp_model.IntVar] = {}
    for q, users in d.bg.shared_params.items():
        for s in range(d.num_stages):
            y[q, s] = model.new_bool_var(f"y[{q},{s}]")
            for b in users:
                model.add(y[q, s] >= x[b, s]).with_name(f"shared[{q},{s},{b}]")
    return y


@dataclass(frozen=True, slots=True)
class _Recompute:
    """The recompute variables (none when recomputation is not offered)."""

    r: dict[tuple[int, int], cp_model.IntVar]
    """r[o,s], by the option's index in R."""
    rebuilt: dict[int, cp_model.IntVar]
    """h_d per device."""


def _add_recompute(
    model: cp_model.CpModel, d: _Data, x: dict[tuple[int, int], cp_model.IntVar]
) -> _Recompute:
    r: dict[tuple[int, int], cp_model.IntVar] = {}
    rebuilt: dict[int, cp_model.IntVar] = {}
    if not d.may_recompute:
        return _Recompute(r, rebuilt)
    most = max(o.rebuilt_mib for o in d.may_recompute)
    for dev in sorted(set(d.device_of_stage)):
        h = rebuilt[dev] = model.new_int_var(0, most, f"h[{dev}]")
        for s in (s for s in range(d.num_stages) if d.device_of_stage[s] == dev):
            ways: dict[int, list[cp_model.IntVar]] = {}
            for i, o in enumerate(d.may_recompute):
                r[i, s] = model.new_bool_var(f"r[{i},{s}]")
                ways.setdefault(o.block, []).append(r[i, s])
                model.add(h >= o.rebuilt_mib * r[i, s]).with_name(f"rebuilt[{i},{s}]")
            for b, rs in ways.items():
                model.add(sum(rs) <= x[b, s]).with_name(f"recompute_here[{b},{s}]")
    return _Recompute(r, rebuilt)


def _add_saved_again(
    model: cp_model.CpModel, d: _Data, x: dict[tuple[int, int], cp_model.IntVar], rc: _Recompute
) -> dict[tuple[int, int], cp_model.IntVar]:
    """e[t,s]: stage s keeps value t of :attr:`BlockGraph.saved_across` once more, besides its
    first saver's count: a later saver on s keeps it (runs there, not recomputed) and the first
    saver does not (runs elsewhere, or recomputes), as ``stage_activation_bytes`` counts it."""
    recomputes: dict[tuple[int, int], list[cp_model.IntVar]] = {}
    for (i, s), r in rc.r.items():
        recomputes.setdefault((d.may_recompute[i].block, s), []).append(r)
    e: dict[tuple[int, int], cp_model.IntVar] = {}
    for i, t in enumerate(d.bg.saved_across):
        for s in range(d.num_stages):
            e[i, s] = model.new_bool_var(f"e[{i},{s}]")
            first_keeps = x[t.producer, s] - sum(recomputes.get((t.producer, s), []))
            for c in t.consumers:
                keeps = x[c, s] - sum(recomputes.get((c, s), []))
                model.add(e[i, s] >= keeps - first_keeps).with_name(f"saved_again[{i},{s},{c}]")
    return e


def _add_received_kept(
    model: cp_model.CpModel, d: _Data, x: dict[tuple[int, int], cp_model.IntVar], rc: _Recompute
) -> dict[tuple[int, int], cp_model.IntVar]:
    """g[t,s]: value t, made on an earlier stage, is kept on s by a block reading it (one that
    saves it, or recomputes and so keeps its inputs). torch hands the stage its receive buffer
    as that input, so the kept value is the buffer, which the memory counts with the buffers
    (M > 0); it is taken off the kept values once, as ``stage_memory`` counts it."""
    g: dict[tuple[int, int], cp_model.IntVar] = {}
    if not d.micro_batches or not d.recompute:
        return g  # buffers not counted, or a solve keeping every activation (module docstring)
    recomputes: dict[tuple[int, int], list[cp_model.IntVar]] = {}
    for (i, s), r in rc.r.items():
        recomputes.setdefault((d.may_recompute[i].block, s), []).append(r)
    for i, t in enumerate(d.bg.tensors):
        if t.nbytes < _BYTE_UNIT:
            continue  # nothing to take off in whole MiB
        for s in range(1, d.num_stages):
            keepers = [
                keeper
                for c in t.consumers
                for keeper in (
                    [x[c, s]]
                    if t.name in d.bg.blocks[c].saved_values
                    else recomputes.get((c, s), [])
                )
            ]
            if keepers:
                g[i, s] = model.new_bool_var(f"g[{i},{s}]")
                model.add(g[i, s] <= sum(keepers)).with_name(f"received_kept[{i},{s}]")
                model.add(g[i, s] <= 1 - x[t.producer, s]).with_name(f"received[{i},{s}]")
    return g


@dataclass(frozen=True, slots=True)
class _Vars:
    """The variables of one stage model (the module docstring's families)."""

    x: dict[tuple[int, int], cp_model.IntVar]
    crossing: dict[tuple[int, int], cp_model.IntVar]
    shared: dict[tuple[str, int], cp_model.IntVar]
    rc: _Recompute
    saved_again: dict[tuple[int, int], cp_model.IntVar]
    working: dict[int, cp_model.IntVar]
    """k_d per device."""
    received: dict[tuple[int, int], cp_model.IntVar]
    """g[t,s]: the receive buffer of stage s holds value t, which a block of s keeps."""


def _add_variables(model: cp_model.CpModel, d: _Data) -> _Vars:
    """Assignment, precedence, crossing, shared parameters, recomputation and the values kept
    again on a later stage: everything but memory, bottleneck and objective."""
    x = _add_assignment(model, d)
    _add_precedence(model, d, x)
    rc = _add_recompute(model, d, x)
    return _Vars(
        x,
        _add_crossing(model, d, x),
        _add_shared_params(model, d, x),
        rc,
        _add_saved_again(model, d, x, rc),
        _add_working(model, d, x),
        _add_received_kept(model, d, x, rc),
    )


def _add_working(
    model: cp_model.CpModel, d: _Data, x: dict[tuple[int, int], cp_model.IntVar]
) -> dict[int, cp_model.IntVar]:
    k: dict[int, cp_model.IntVar] = {}
    most = max(d.working_mib, default=0)
    for dev in sorted(set(d.device_of_stage)):
        floor = d.working_floor_mib[dev]
        k[dev] = model.new_int_var(floor, max(floor, most), f"k[{dev}]")
        for s in (s for s in range(d.num_stages) if d.device_of_stage[s] == dev):
            for b, need in enumerate(d.working_mib):
                if need > floor:
                    model.add(k[dev] >= need * x[b, s]).with_name(f"working[{b},{s}]")
    return k


def _add_hint(
    model: cp_model.CpModel,
    d: _Data,
    v: _Vars,
    hint: Sequence[int],
    recomputed: frozenset[int],
) -> None:
    """Start CP-SAT from ``hint``, the ``recomputed`` blocks recomputing in full."""
    for b, s in enumerate(hint):
        for k in range(d.num_stages):
            model.add_hint(v.x[b, k], int(k == s))
    for (i, s), r in v.rc.r.items():
        o = d.may_recompute[i]
        model.add_hint(r, int(not o.selective and o.block in recomputed and hint[o.block] == s))


def _add_memory(model: cp_model.CpModel, d: _Data, v: _Vars, limit_mib: int) -> None:
    for dev in sorted(set(d.device_of_stage)):
        model.add(_device_memory(d, v, dev) <= limit_mib).with_name(f"memory[{dev}]")


def _device_memory(d: _Data, v: _Vars, dev: int) -> Any:
    stages = [s for s in range(d.num_stages) if d.device_of_stage[s] == dev]
    blocks = range(len(d.bg.blocks))
    saved = sum(
        v.rc.r[i, s] * d.in_flight[s] * (d.act_mib[o.block] - o.act_mib)
        for s in stages
        for i, o in enumerate(d.may_recompute)
    )
    # only the boundaries next to this device's stages hold anything here
    sides = sorted({k for s in stages for k in (s - 1, s) if 0 <= k < d.num_stages - 1})
    sent = sum(
        _sent_mib(d, t.nbytes, k, dev) * v.crossing[i, k]
        for i, t in enumerate(d.bg.tensors)
        for k in sides
    )
    again = sum(
        v.saved_again[i, s] * d.in_flight[s] * math.ceil(t.nbytes / _BYTE_UNIT)
        for i, t in enumerate(d.bg.saved_across)
        for s in stages
    )
    buffered = sum(
        g * d.in_flight[s] * (d.bg.tensors[i].nbytes // _BYTE_UNIT)
        for (i, s), g in v.received.items()
        if d.device_of_stage[s] == dev
    )
    return (
        sum(
            v.x[b, s] * (d.state_mib[b] + d.in_flight[s] * d.act_mib[b])
            for s in stages
            for b in blocks
        )
        - saved
        - buffered
        + again
        + sent
        + d.reserved_mib[dev]
        + v.rc.rebuilt.get(dev, 0)
        + v.working[dev]
        + sum(v.shared[q, s] * d.shared_mib[q] for q in d.bg.shared_params for s in stages)
    )


def _sent_mib(d: _Data, nbytes: int, k: int, dev: int) -> int:
    """MiB that a tensor of ``nbytes`` crossing boundary ``k`` holds on device ``dev``: on the
    sending stage ``k`` its kept outputs and gradient buffers, ``(M + f_k) n``; on the receiving
    stage ``k + 1`` its activation buffers, ``M n`` (0 where ``micro_batches`` is 0)."""
    if not d.micro_batches:
        return 0
    held = 0
    if d.device_of_stage[k] == dev:
        held += (d.micro_batches + d.in_flight[k]) * nbytes
    if d.device_of_stage[k + 1] == dev:
        held += d.micro_batches * nbytes
    return math.ceil(held / _BYTE_UNIT)


def _add_bottleneck(
    model: cp_model.CpModel,
    d: _Data,
    x: dict[tuple[int, int], cp_model.IntVar],
    crossing: dict[tuple[int, int], cp_model.IntVar],
    rc: _Recompute,
) -> cp_model.IntVar:
    p, n = d.num_stages, len(d.bg.blocks)
    boundary = [
        sum(round(t.nbytes * d.byte_time) * crossing[i, k] for i, t in enumerate(d.bg.tensors))
        for k in range(p - 1)
    ]
    upper = (
        sum(d.work)
        + sum(o.work for o in d.may_recompute)
        + 2 * (d.alpha + sum(round(t.nbytes * d.byte_time) for t in d.bg.tensors)) * p
    )
    z = model.new_int_var(0, upper, "z")
    for dev in sorted(set(d.device_of_stage)):
        stage_times = []
        for s in (s for s in range(p) if d.device_of_stage[s] == dev):
            comm: Any = 0
            if s > 0 and d.device_of_stage[s - 1] != dev:
                comm += d.alpha + boundary[s - 1]
            if s < p - 1 and d.device_of_stage[s + 1] != dev:
                comm += d.alpha + boundary[s]
            again = sum(o.work * rc.r[i, s] for i, o in enumerate(d.may_recompute))
            stage_times.append(sum(d.work[b] * x[b, s] for b in range(n)) + again + comm)
        model.add(z >= sum(stage_times)).with_name(f"bottleneck[{dev}]")
    return z


def _add_objective(
    model: cp_model.CpModel,
    d: _Data,
    z: cp_model.IntVar,
    crossing: dict[tuple[int, int], cp_model.IntVar],
    rc: _Recompute,
) -> None:
    # Traffic in KiB and recompute time as the tie-breakers; z's weight exceeds the largest
    # possible sum of both, so the solver never accepts a slower plan for fewer bytes or less
    # recomputation (and recomputes nothing that does not help).
    kib = [math.ceil(t.nbytes / 1024) for t in d.bg.tensors]
    again = sum(d.may_recompute[i].work * r for (i, _s), r in rc.r.items())
    model.minimize(_z_weight(d) * z + sum(kib[i] * c for (i, _k), c in crossing.items()) + again)


def _z_weight(d: _Data) -> int:
    traffic = sum(math.ceil(t.nbytes / 1024) for t in d.bg.tensors) * max(0, d.num_stages - 1)
    return traffic + sum(o.work for o in d.may_recompute) + 1


# ---------------------------------------------------------------------------------------------
# solve


def _solve(
    model: cp_model.CpModel, time_limit_s: float, seed: int
) -> tuple[Any, cp_model.CpSolver, float]:
    solver = limited_solver(time_limit_s, seed)
    start = time.perf_counter()
    status = solver.solve(model)
    return status, solver, time.perf_counter() - start


def _bound_s(solver: cp_model.CpSolver, d: _Data) -> float:
    return math.floor(solver.best_objective_bound / _z_weight(d)) * d.unit_s


def _infeasible_memory(
    d: _Data, limit_bytes: int, hint: Sequence[int] | None, time_limit_s: float, seed: int
) -> InfeasibleMemoryError:
    """The error for a limit no split meets, with the least memory a split needs."""
    need = _minimum_memory(d, limit_bytes // _BYTE_UNIT, hint, time_limit_s, seed)
    kept = "in-flight activations"
    if d.may_recompute:
        kept = "in-flight activations (every layer recomputed where that saves memory)"
    return InfeasibleMemoryError(
        f"no split into {d.num_stages} stages fits {_gib(limit_bytes)} per device: a plan "
        f"{need.needs(_gib_up)} (parameters, gradients, optimizer state, shared parameters on every "
        f"stage that uses them, {kept}, the pipeline's buffers and a backward's gradients). "
        f"{need.raise_to(_gib_up)}, add devices "
        "(more stages), or keep fewer activations in flight (more micro-batches, or the 1f1b "
        "schedule).",
        need.least_bytes,
        need=need,
        reason=f"a plan {need.needs(_gib_up)}",
        recomputed=bool(d.may_recompute),
    )


def _minimum_memory(
    d: _Data, limit_mib: int, hint: Sequence[int] | None, time_limit_s: float, seed: int
) -> MemoryNeed:
    """The smallest peak memory per device any valid assignment needs, given that none fits
    ``limit_mib`` (so at least one MiB more); as proven within the time limit."""
    model = cp_model.CpModel()
    v = _add_variables(model, d)
    peak = model.new_int_var(0, _memory_ceiling_mib(d), "peak")
    for dev in sorted(set(d.device_of_stage)):
        model.add(peak >= _device_memory(d, v, dev)).with_name(f"peak[{dev}]")
    model.minimize(peak)
    hint_mib = None
    if hint is not None:
        for b, s in enumerate(hint):
            for k in range(d.num_stages):
                model.add_hint(v.x[b, k], int(k == s))
        hint_mib = max(_memory_mib(d, hint))
    status, solver, _ = _solve(model, time_limit_s, seed)
    # Every topological split into non-empty stages is a solution (num_stages <= blocks is
    # checked in _build_data), so only a bug makes this model infeasible.
    assert status != cp_model.INFEASIBLE, "the memory-minimising stage model has a solution"
    return memory_need(
        status,
        solver,
        unit_bytes=_BYTE_UNIT,
        floor_units=limit_mib + 1,
        fallback_units=hint_mib,
        time_limit_s=time_limit_s,
    )


def _memory_ceiling_mib(d: _Data) -> int:
    """More than any device can hold under any assignment: every block's state and activations at
    the most in-flight micro-batches, and every shared parameter on each of a device's stages."""
    stages_per_device = max(d.device_of_stage.count(dev) for dev in set(d.device_of_stage))
    return (
        sum(d.state_mib)
        + max(d.reserved_mib)
        + max(d.working_floor_mib)
        + max(d.working_mib, default=0)
        + max(d.in_flight) * sum(d.act_mib)
        + max(d.in_flight)
        * d.num_stages
        * sum(math.ceil(t.nbytes / _BYTE_UNIT) for t in d.bg.saved_across)
        + sum(
            _sent_mib(d, t.nbytes, k, dev)
            for t in d.bg.tensors
            for k in range(d.num_stages - 1)
            for dev in set(d.device_of_stage)
        )
        + max((o.rebuilt_mib for o in d.may_recompute), default=0)
        + stages_per_device * sum(d.shared_mib.values())
    )


def _memory_mib(
    d: _Data, stage_of: Sequence[int], recomputed: frozenset[int] = frozenset()
) -> list[int]:
    """Each device's memory under an assignment, ``recomputed`` blocks recomputing in full (those
    that may), in the ILP's own (rounded-up) accounting."""
    full = {o.block: o for o in d.may_recompute if not o.selective and o.block in recomputed}
    per_device = list(d.reserved_mib)
    for t in d.bg.tensors:
        last = max(stage_of[c] for c in t.consumers)
        for k in range(stage_of[t.producer], last):  # crossing, as _add_crossing has it
            for dev in {d.device_of_stage[k], d.device_of_stage[k + 1]}:
                per_device[dev] += _sent_mib(d, t.nbytes, k, dev)
    rebuilt = [0] * len(per_device)
    working = list(d.working_floor_mib)
    for b, s in enumerate(stage_of):
        dev = d.device_of_stage[s]
        kept = full[b].act_mib if b in full else d.act_mib[b]
        per_device[dev] += d.state_mib[b] + d.in_flight[s] * kept
        rebuilt[dev] = max(rebuilt[dev], full[b].rebuilt_mib if b in full else 0)
        working[dev] = max(working[dev], d.working_mib[b])
    for t in d.bg.saved_across:  # kept again where a later saver keeps it and the first does not
        first = set() if t.producer in full else {stage_of[t.producer]}
        for s in {stage_of[c] for c in t.consumers if c not in full} - first:
            per_device[d.device_of_stage[s]] += d.in_flight[s] * math.ceil(t.nbytes / _BYTE_UNIT)
    for q, users in d.bg.shared_params.items():
        for s in sorted({stage_of[b] for b in users}):
            per_device[d.device_of_stage[s]] += d.shared_mib[q]
    for t in d.bg.tensors if d.micro_batches and d.recompute else ():  # its receive buffer
        kept_on = {
            stage_of[c] for c in t.consumers if t.name in d.bg.blocks[c].saved_values or c in full
        } - {stage_of[t.producer]}
        for s in kept_on:
            per_device[d.device_of_stage[s]] -= d.in_flight[s] * (t.nbytes // _BYTE_UNIT)
    return [held + extra + k for held, extra, k in zip(per_device, rebuilt, working)]


def _leaner_hint(
    d: _Data, stage_of: Sequence[int], recomputed: frozenset[int], limit_mib: int
) -> frozenset[int]:
    """Of the blocks ``recomputed`` under the hint's split, those left once each device keeps
    what its memory allows: a block keeps its activations where the device still fits, cheapest
    first (the stages with fewest micro-batches in flight, the last block of a stage first, so a
    stage recomputes its first blocks). Unchanged where the split does not fit with them all.
    Recomputing only adds time, so the hint is no slower; CP-SAT starts from it."""
    if max(_memory_mib(d, stage_of, recomputed)) > limit_mib:
        return recomputed
    order = sorted(recomputed, key=lambda b: (d.in_flight[stage_of[b]], -b))
    kept = set(recomputed)
    for b in order:
        dev = d.device_of_stage[stage_of[b]]
        if _memory_mib(d, stage_of, frozenset(kept - {b}))[dev] <= limit_mib:
            kept.discard(b)
    return frozenset(kept)


def _device_bottleneck(
    bg: BlockGraph, device: DeviceSpec, stage_of: Sequence[int], d: _Data
) -> float:
    """The slowest device's time per micro-batch of ``bg`` (``d``'s blocks, some recomputed), by
    the reporting cost model."""
    from autopart.solver.cost import stage_times_s

    times = stage_times_s(bg, stage_of, d.num_stages, device, ranks=d.device_of_stage)
    per_device = [0.0] * (max(d.device_of_stage) + 1)
    for s, t in enumerate(times):
        per_device[d.device_of_stage[s]] += t
    return max(per_device)


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.2f} GiB"


def _gib_up(nbytes: int) -> str:
    """Rounded up, so a need it names is enough as a --memory value."""
    return f"{math.ceil(nbytes * 100 / (1 << 30)) / 100:.2f} GiB"
