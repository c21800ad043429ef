"""``autopart run``: train a model on local gloo ranks and check it against one process.

Ranks are started with torch's own launcher (``torch.multiprocessing.start_processes``) and meet
through a file store in a temporary folder. They are forked from Python's fork server, which
imports torch (and transformers, where installed) once for every later start: a spawned rank
spends seconds importing them, a forked one milliseconds. Each rank takes the launcher's
environment and working folder as they are when it starts (the fork server's are those of its
own start). Every rank builds the same seeded model and random
batch, compiles it with :func:`autopart.compile`, and trains ``steps`` SGD steps. Rank 0 then trains
the unpartitioned model on the same micro-batches and compares the losses and every parameter.
A rank that fails makes the others stop within ``timeout_s``: the launcher kills them and the
error names the failing rank.
"""

from __future__ import annotations

import contextlib
import copy
import faulthandler
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from autopart.codegen.templates.run import end_rank
from autopart.cost_models.devices import DeviceSpec
from autopart.errors import AutopartError
from autopart.passes.routing import DEFAULT_IMBALANCE, check_imbalance
from autopart.planning.request import PlanRequest
from autopart.runtime.step_clock import (
    RankSummary,
    StepClock,
    after_first,
    measured_timeline,
    stage_chunk_s,
    timeline_from_json,
    timeline_to_json,
)

__all__ = [
    "RunReport",
    "end_rank",
    "run_local",
    "spawn_ranks",
    "timeline_from_json",
    "timeline_to_json",
    "training_batch",
]


@dataclass(frozen=True, slots=True)
class RunReport:
    model: str
    mesh: str
    schedule: str
    micro_batches: int
    steps: int
    losses: tuple[float, ...]
    reference_losses: tuple[float, ...]
    max_param_rel_diff: float
    """Largest |pipeline - reference| / max(|reference|) over parameters after training."""
    step_time_s: float
    """Median measured wall time of a training step (after the first)."""
    predicted_step_time_s: float
    samples_per_s: float
    stage_forward_s: tuple[float, ...]
    """Measured forward time per micro-batch of each stage (median over steps)."""
    predicted_stage_forward_s: tuple[float, ...]
    """The plan's, as the simulated chunks take it (:func:`~autopart.runtime.step_clock.\
stage_chunk_s`: the stage's work, stretched where ranks share cores)."""
    stage_backward_s: tuple[float, ...] = ()
    """Measured backward time per micro-batch of each stage (median)."""
    predicted_stage_backward_s: tuple[float, ...] = ()
    bubble_fraction: float = 0.0
    """Measured: the fraction of a step the ranks spend outside forward and backward work
    (waiting for each other, communicating), averaged over ranks, median over steps."""
    predicted_bubble_fraction: float = 0.0
    """The plan's simulated bubble."""
    closed_form_bubble_fraction: float = 0.0
    """(p - 1) / (m + p - 1): the bubble of balanced stages with free communication."""
    predicted_samples_per_s: float = 0.0
    stage_peak_memory_bytes: tuple[int, ...] = ()
    """Measured peak memory of the rank that runs each stage (the highest over its replicas), on
    the first step (:mod:`autopart.cost_models.peak_memory`: ``max_memory_allocated`` on CUDA, the
    rank's parameters, buffers and state plus the profiler's allocation events on CPU)."""
    predicted_stage_peak_memory_bytes: tuple[int, ...] = ()
    """The plan's simulated peak of the device that runs each stage."""
    comm: str = "table"
    """Where the plan's link and per-action costs came from: ``measured`` on this group
    (:mod:`autopart.runtime.measure`, cached) or the device ``table`` (asked for, or
    ``table (<why measuring failed>)``)."""
    pipeline_action_s: float = 0.0
    """The pipeline runtime's cost per action the plan was simulated with."""
    profile_s: float | None = None
    """With ``profile``: the seconds rank 0 spent measuring op times before planning."""
    recomputed: tuple[str, ...] = ()
    """The blocks whose forward the plan runs again in the backward (``Plan.recompute``)."""
    precision: str = "model"
    """The training precision (``"model"``: float32; ``"bf16-mixed"``: FSDP2's policy), against a
    float32 reference either way."""
    predicted_timeline: dict[str, Any] | None = None
    """The plan's simulated step (:func:`timeline_to_json`)."""
    measured_timeline: dict[str, Any] | None = None
    """The last measured step, one event per stage action, in the same form."""


def training_batch(loaded: Any, seed: int = 0) -> tuple[Any, Callable[[Any, Any], torch.Tensor]]:
    """A seeded random target for ``loaded``'s example batch and a loss: cross-entropy over the
    last dimension for models with logits (token models, image classifiers), mean squared error
    (summed over several outputs) otherwise."""
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        out = loaded.model(*loaded.example_inputs, **loaded.example_kwargs)
    if isinstance(out, (tuple, list)):
        target = torch.randn(out[0].shape, generator=gen)

        def several(outs: Any, tgt: torch.Tensor) -> torch.Tensor:
            return sum(torch.nn.functional.mse_loss(o, tgt) for o in outs)  # type: ignore[return-value]

        return target, several
    logits = getattr(out, "logits", None)  # Hugging Face models return a ModelOutput
    if logits is not None or loaded.example_inputs[0].dtype == torch.long:
        logits = out if logits is None else logits
        target = torch.randint(0, logits.shape[-1], tuple(logits.shape[:-1]), generator=gen)

        def tokens(output: Any, tgt: torch.Tensor) -> torch.Tensor:
            logits = getattr(output, "logits", output)
            return torch.nn.functional.cross_entropy(logits.flatten(0, -2), tgt.flatten())

        return target, tokens
    target = torch.randn(out.shape, generator=gen)
    return target, torch.nn.functional.mse_loss


def run_local(
    spec: str,
    *,
    mesh: str = "pp=2",
    steps: int = 3,
    micro_batches: int | None = None,
    schedule: str = "auto",
    stages_per_rank: int | None = None,
    batch: int | None = None,
    seq: int | None = None,
    config: dict[str, str] | None = None,
    lr: float = 0.01,
    timeout_s: float = 600.0,
    verify: bool = True,
    comm: str = "measured",
    profile: bool = False,
    expert_imbalance: float = DEFAULT_IMBALANCE,
    recompute: str = "auto",
    precision: str = "model",
    reshard_after_forward: bool = False,
) -> RunReport:
    """Spawn the ranks ``mesh`` needs, train ``spec`` for ``steps`` steps, check and time it.
    ``verify`` checks tensor-parallel stages against unsharded ones first (:mod:`autopart.runtime.verify`).
    ``comm="measured"`` plans on the link and pipeline costs measured on the ranks' group
    (:func:`autopart.runtime.measure.measured_comm`, cached), ``"table"`` on the device table's.
    ``profile=True`` plans on op times rank 0 measures (:mod:`autopart.cost_models.profiling`).
    ``expert_imbalance``, ``recompute``, ``precision`` and ``reshard_after_forward`` are the
    planning options of those names (the model is built in float32 and, under ``"bf16-mixed"``, trained under FSDP2's
    mixed-precision policy; the reference stays float32)."""
    from autopart.planning.plans import parse_mesh

    world = math.prod(parse_mesh(mesh).values())  # dp x pp x tp ranks
    if steps < 1:
        raise AutopartError(f"--steps must be >= 1, got {steps}.")
    if comm not in _COMM_SOURCES:
        raise AutopartError(f"comm must be one of {', '.join(_COMM_SOURCES)}, got {comm!r}.")
    with tempfile.TemporaryDirectory(prefix="autopart-run-") as tmp:
        out = Path(tmp) / "report.json"
        request = _RunRequest(
            spec,
            mesh,
            steps,
            micro_batches,
            schedule,
            batch,
            seq,
            config,
            lr,
            verify,
            stages_per_rank,
            comm,
            profile,
            check_imbalance(expert_imbalance),  # a bad factor fails before any rank starts
            PlanRequest(recompute=recompute).recompute,  # so does a bad recompute choice
            PlanRequest(precision=precision).precision,  # and a bad precision
            PlanRequest(  # and resharding where it cannot
                mesh=mesh, schedule=schedule, reshard_after_forward=reshard_after_forward
            ).reshard_after_forward,
        )
        args = (world, str(Path(tmp) / "store"), request, str(out), timeout_s)
        spawn_ranks(_rank_main, args, world, timeout_s=timeout_s, what="the run")
        raw = json.loads(out.read_text())
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return RunReport(**fields)


_PRELOADED = ("torch", "torch.distributed", "autopart.runtime.program", "transformers")
"""What the fork server imports once (a module that is not installed is skipped)."""


def _as_launched(
    rank: int,
    fn: Callable[..., None],
    environ: dict[str, str],
    cwd: str,
    args: tuple[Any, ...],
    faults: str,
) -> None:
    """``fn(rank, *args)`` in the launcher's environment and working folder at launch; should the
    rank die of a signal (an abort in a C++ library, a segfault), Python's fault handler writes
    every thread's stack to ``faults/rank<N>.txt`` for the launcher to report."""
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    with open(Path(faults) / f"rank{rank}.txt", "w") as fault:
        faulthandler.enable(file=fault, all_threads=True)
        try:
            fn(rank, *args)
        finally:
            faulthandler.disable()


def _last_words(faults: str, rank: int, lines: int = 40) -> str:
    """What the fault handler wrote when ``rank`` died (its last ``lines``), or nothing."""
    path = Path(faults) / f"rank{rank}.txt"
    text = path.read_text(errors="replace").strip() if path.exists() else ""
    if not text:
        return ""
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\nrank {rank}'s Python stacks when it died (faulthandler):\n{tail}"


def spawn_ranks(
    fn: Callable[..., None],
    args: tuple[Any, ...],
    world: int,
    *,
    timeout_s: float,
    what: str,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Run ``fn(rank, *args)`` on ``world`` processes started by torch's launcher and wait for
    them (calling ``on_tick`` about twice a second). A rank that raises or exits, or a run past
    ``timeout_s``, stops every rank and raises :class:`AutopartError` naming ``what``; no rank is
    left running."""
    import multiprocessing

    import torch.multiprocessing as mp

    multiprocessing.set_forkserver_preload(list(_PRELOADED))  # no effect once the server runs
    with tempfile.TemporaryDirectory(prefix="autopart-ranks-") as faults:
        here = (fn, dict(os.environ), os.getcwd(), args, faults)
        ctx = mp.start_processes(
            _as_launched, args=here, nprocs=world, join=False, start_method="forkserver"
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=0.5):
                if on_tick is not None:
                    on_tick()
                if time.monotonic() > deadline:
                    raise AutopartError(
                        f"{what} did not finish within {timeout_s:.0f} s; its ranks were stopped."
                    )
        except mp.ProcessRaisedException as exc:
            raise AutopartError(f"a rank failed, so {what} was stopped:\n{exc}") from exc
        except mp.ProcessExitedException as exc:
            raise AutopartError(
                f"rank {exc.error_index} exited ({exc}); the other ranks were stopped."
                + _last_words(faults, exc.error_index)
            ) from exc
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()


@dataclass(frozen=True, slots=True)
class _RunRequest:
    """What every rank of :func:`run_local` trains, and how (its keyword arguments)."""

    spec: str
    mesh: str
    steps: int
    micro_batches: int | None
    schedule: str
    batch: int | None
    seq: int | None
    config: dict[str, str] | None
    lr: float
    verify: bool
    stages_per_rank: int | None = None
    comm: str = "measured"
    profile: bool = False
    expert_imbalance: float = DEFAULT_IMBALANCE
    recompute: str = "auto"
    precision: str = "model"
    reshard_after_forward: bool = False


_COMM_SOURCES = ("measured", "table")


def _rank_main(
    rank: int, world: int, store: str, request: _RunRequest, out: str, timeout_s: float
) -> None:
    import torch.distributed as dist

    from autopart.models.model_spec import load_model

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        loaded = load_model(
            request.spec,
            batch=request.batch,
            seq=request.seq,
            config=request.config,
            device="cpu",
            seed=0,
        )
        reference = copy.deepcopy(loaded.model)
        spec, comm = _planning_device(request)
        program = _compile(loaded, request, spec)
        clock = StepClock.attach(program)
        losses = _train(clock, program, loaded, request)
        state = program.full_state_dict()
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, clock.summary())
        if rank == 0:
            check = _Check(reference, state, losses, per_rank)
            report = _report(loaded, program, request, clock, check, spec, comm)
            Path(out).write_text(json.dumps(asdict(report)))
        dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    end_rank()


def _planning_device(request: _RunRequest) -> tuple[DeviceSpec, str]:
    """The cpu cost model, with the link and pipeline costs measured on this group where the
    request asks for them (every rank calls this together), and where they came from."""
    from autopart.cost_models.devices import get_device
    from autopart.runtime.measure import measured_or_table

    spec = get_device("cpu")
    if request.comm == "table":
        return spec, "table"
    return measured_or_table(spec, torch.device("cpu"))


def _compile(loaded: Any, request: _RunRequest, spec: DeviceSpec) -> Any:
    import autopart

    _, loss_fn = training_batch(loaded)
    # planned for what the run does: SGD without momentum (parameters and gradients, no state)
    plan_request = PlanRequest(
        mesh=request.mesh,
        device=spec,
        optimizer="sgd",
        expert_imbalance=request.expert_imbalance,
        recompute=request.recompute,
        precision=request.precision,
        schedule=request.schedule,
        reshard_after_forward=request.reshard_after_forward,
    )
    return autopart.compile(
        loaded.model,
        request.mesh,
        example_inputs=loaded.example_inputs,
        example_kwargs=dict(loaded.example_kwargs),
        loss_fn=loss_fn,
        request=plan_request,
        micro_batches=request.micro_batches,
        schedule=request.schedule,
        stages_per_rank=request.stages_per_rank,
        profile=request.profile,
        verify=request.verify,
    )


def _train(clock: StepClock, program: Any, loaded: Any, request: _RunRequest) -> list[float]:
    """``request.steps`` SGD steps on the loaded model's batch, timed, the first also measured
    for peak memory (:func:`autopart.cost_models.peak_memory.measure_peak`); the step losses."""
    import torch.distributed as dist

    from autopart.cost_models.peak_memory import measure_peak

    x, kw = loaded.example_inputs, dict(loaded.example_kwargs)
    target, _ = training_batch(loaded)
    params = list(program.parameters())
    optimizer = torch.optim.SGD(params, lr=request.lr) if params else None
    held = [
        t for st in program.local_stages for t in (*st.module.parameters(), *st.module.buffers())
    ]
    losses = []
    for step in range(request.steps):
        clock.start_step()
        with (
            measure_peak(torch.device("cpu"), held)
            if step == 0
            else contextlib.nullcontext() as peak
        ):
            if optimizer is not None:
                optimizer.zero_grad()
            losses.append(program.step(*x, target=target, **kw))
            if optimizer is not None:
                optimizer.step()
        dist.barrier()
        clock.end_step()
        if peak is not None:
            clock.peak_memory_bytes = peak.peak_bytes
    return losses


@dataclass(frozen=True, slots=True)
class _Check:
    """What rank 0 compares: the unpartitioned model (still untrained), the program's trained
    state, its step losses, and every rank's :meth:`StepClock.summary`."""

    reference: torch.nn.Module
    state: dict[str, torch.Tensor]
    losses: list[float]
    per_rank: list[RankSummary]


def _report(
    loaded: Any,
    program: Any,
    request: _RunRequest,
    clock: StepClock,
    check: _Check,
    spec: DeviceSpec,
    comm: str,
) -> RunReport:
    """Rank 0's report: the reference trained on the same micro-batches, compared, and the
    measured times and memory beside the plan's."""
    from autopart.planning.mesh_plan import simulate_plan
    from autopart.planning.plans import replicas
    from autopart.planning.schedule import bubble_closed_form

    plan = program.plan
    x, kw = loaded.example_inputs, dict(loaded.example_kwargs)
    target, loss_fn = training_batch(loaded)
    # each data-parallel replica pipelines its share of the batch in micro-batches
    chunks = replicas(plan.mesh) * plan.micro_batches
    reference = check.reference
    ref_losses = _reference(reference, x, kw, target, loss_fn, chunks, request.steps, request.lr)
    diff = max(
        float((check.state[n] - p.detach()).abs().max() / p.detach().abs().max().clamp_min(1e-12))
        for n, p in reference.named_parameters()
    )
    forward = {k: v for part in check.per_rank for k, v in part.forward_s.items()}
    backward = {k: v for part in check.per_rank for k, v in part.backward_s.items()}
    step_s = statistics.median(after_first(clock.step_s))
    p, m = plan.num_stages // plan.stages_per_device, plan.micro_batches
    device_of = [st.device for st in plan.stages]
    measured = measured_timeline(check.per_rank, device_of, clock.step_s[-1])
    predicted = simulate_plan(plan, spec)  # its bubble, like the measured one, counts the tail
    # the chunks' durations, like the measured ones: longer than the work where ranks share cores
    chunk_forward, chunk_backward = stage_chunk_s(predicted, plan.num_stages)
    samples = int(x[0].shape[0])
    return RunReport(
        model=loaded.name,
        mesh=request.mesh,
        schedule=plan.schedule,
        micro_batches=plan.micro_batches,
        steps=request.steps,
        losses=tuple(check.losses),
        reference_losses=tuple(ref_losses),
        max_param_rel_diff=diff,
        step_time_s=step_s,
        predicted_step_time_s=plan.step_time_s,
        samples_per_s=samples / step_s,
        stage_forward_s=tuple(forward[i] for i in range(plan.num_stages)),
        predicted_stage_forward_s=tuple(chunk_forward),
        stage_backward_s=tuple(backward[i] for i in range(plan.num_stages)),
        predicted_stage_backward_s=tuple(chunk_backward),
        bubble_fraction=statistics.fmean(part.idle_fraction for part in check.per_rank),
        predicted_bubble_fraction=predicted.bubble_fraction,
        closed_form_bubble_fraction=bubble_closed_form(p, m, plan.stages_per_device, plan.schedule),
        predicted_samples_per_s=samples / plan.step_time_s if plan.step_time_s > 0 else 0.0,
        stage_peak_memory_bytes=tuple(measured.peak_memory_bytes[d] for d in device_of),
        predicted_stage_peak_memory_bytes=tuple(s.peak_memory_bytes for s in plan.stages),
        comm=comm,
        pipeline_action_s=spec.pipeline_action_s,
        profile_s=plan.profile_s,
        recomputed=tuple(r.name for r in plan.recompute),
        precision=plan.precision,
        predicted_timeline=timeline_to_json(predicted),
        measured_timeline=timeline_to_json(measured),
    )


def _reference(
    model: torch.nn.Module,
    x: tuple[torch.Tensor, ...],
    kwargs: dict[str, Any],
    target: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    micro_batches: int,
    steps: int,
    lr: float,
) -> list[float]:
    """The unpartitioned model trained on the same micro-batches (gradient accumulation)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    chunks = [torch.chunk(t, micro_batches) for t in (*x, target)]
    kw_chunks = {
        k: torch.chunk(v, micro_batches)
        if isinstance(v, torch.Tensor) and v.dim() > 0
        else [v] * micro_batches
        for k, v in kwargs.items()
    }
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for i in range(micro_batches):
            *xs, tgt = (c[i] for c in chunks)
            loss = loss_fn(model(*xs, **{k: v[i] for k, v in kw_chunks.items()}), tgt)
            (loss / micro_batches).backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total / micro_batches)
    return losses
