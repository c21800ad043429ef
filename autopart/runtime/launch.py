"""``autopart run``: train a model on local gloo ranks and check it against one process.

Ranks are started with torch's own launcher (``torch.multiprocessing.start_processes``) and meet
through a file store in a temporary folder. Every rank builds the same seeded model and random
batch, compiles it with :func:`autopart.compile`, and trains ``steps`` SGD steps. Rank 0 then trains
the unpartitioned model on the same micro-batches and compares the losses and every parameter.
A rank that fails makes the others stop within ``timeout_s``: the launcher kills them and the
error names the failing rank.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from autopart.errors import AutopartError

__all__ = ["RunReport", "run_local", "spawn_ranks", "training_batch"]


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
) -> RunReport:
    """Spawn the ranks ``mesh`` needs, train ``spec`` for ``steps`` steps, check and time it.
    ``verify`` checks tensor-parallel stages against unsharded ones first (:mod:`autopart.runtime.verify`)."""
    from autopart.planning.plans import parse_mesh

    world = math.prod(parse_mesh(mesh).values())  # dp x pp x tp ranks
    if steps < 1:
        raise AutopartError(f"--steps must be >= 1, got {steps}.")
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
        )
        args = (world, str(Path(tmp) / "store"), request, str(out), timeout_s)
        spawn_ranks(_rank_main, args, world, timeout_s=timeout_s, what="the run")
        raw = json.loads(out.read_text())
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return RunReport(**fields)


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
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
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
        program = _compile(loaded, request)
        clock = _Clock.attach(program)
        losses = clock.train(program, loaded, request)
        state = program.full_state_dict()
        per_rank: list[Any] = [None] * world
        dist.all_gather_object(per_rank, clock.summary())
        if rank == 0:
            check = _Check(reference, state, losses, per_rank)
            report = _report(loaded, program, request, clock, check)
            Path(out).write_text(json.dumps(asdict(report)))
    finally:
        dist.destroy_process_group()


def _compile(loaded: Any, request: _RunRequest) -> Any:
    import autopart

    _, loss_fn = training_batch(loaded)
    return autopart.compile(
        loaded.model,
        request.mesh,
        example_inputs=loaded.example_inputs,
        example_kwargs=dict(loaded.example_kwargs),
        loss_fn=loss_fn,
        micro_batches=request.micro_batches,
        schedule=request.schedule,
        stages_per_rank=request.stages_per_rank,
        verify=request.verify,
    )


class _Clock:
    """Wall times of one rank's training: every step, and each local stage's forward and backward
    chunks (one per micro-batch)."""

    def __init__(self) -> None:
        self.forward_s: dict[int, list[float]] = {}
        self.backward_s: dict[int, list[float]] = {}
        self.weight_s: dict[int, list[float]] = {}
        """Weight-gradient chunks (zero-bubble schedules run them apart from the backward)."""
        self.busy: list[float] = []
        """This rank's forward + backward time in the current step."""
        self.step_s: list[float] = []
        self.idle: list[float] = []
        """Per step: the fraction of the step outside this rank's forward and backward work."""

    @classmethod
    def attach(cls, program: Any) -> _Clock:
        clock = cls()
        for stage in program.local_stages:
            _time_forward(stage.module, clock.forward_s.setdefault(stage.index, []))
            _time_chunks(
                stage.pipeline_stage,
                clock.busy,
                clock.backward_s.setdefault(stage.index, []),
                clock.weight_s.setdefault(stage.index, []),
            )
        return clock

    def train(self, program: Any, loaded: Any, request: _RunRequest) -> list[float]:
        """``request.steps`` SGD steps on the loaded model's batch, timed; the step losses."""
        import torch.distributed as dist

        x, kw = loaded.example_inputs, dict(loaded.example_kwargs)
        target, _ = training_batch(loaded)
        params = list(program.parameters())
        optimizer = torch.optim.SGD(params, lr=request.lr) if params else None
        losses = []
        for _ in range(request.steps):
            self.busy.clear()
            start = time.perf_counter()
            if optimizer is not None:
                optimizer.zero_grad()
            losses.append(program.step(*x, target=target, **kw))
            if optimizer is not None:
                optimizer.step()
            dist.barrier()
            self.step_s.append(time.perf_counter() - start)
            self.idle.append(max(0.0, 1.0 - sum(self.busy) / self.step_s[-1]))
        return losses

    def summary(self) -> tuple[dict[int, float], dict[int, float], float]:
        """(median forward s per local stage, median backward s, median idle fraction), the steps
        after the first where there are several."""
        return (
            {i: statistics.median(v) if v else 0.0 for i, v in self.forward_s.items()},
            {i: _backward_s(v, self.weight_s[i]) for i, v in self.backward_s.items()},
            statistics.median(_after_first(self.idle)),
        )


def _backward_s(backward: list[float], weight: list[float]) -> float:
    """A stage's backward time per micro-batch: the median chunk, or where weight gradients ran
    apart (in W chunks after some of the B chunks), the mean of both over the micro-batches."""
    if not backward:
        return 0.0
    if not weight:
        return statistics.median(backward)
    return (sum(backward) + sum(weight)) / len(backward)


def _after_first(values: list[float]) -> list[float]:
    """The measurements after the first (warm-up) one, where there are several."""
    return values[1:] if len(values) > 1 else values


@dataclass(frozen=True, slots=True)
class _Check:
    """What rank 0 compares: the unpartitioned model (still untrained), the program's trained
    state, its step losses, and every rank's :meth:`_Clock.summary`."""

    reference: torch.nn.Module
    state: dict[str, torch.Tensor]
    losses: list[float]
    per_rank: list[Any]


def _report(
    loaded: Any, program: Any, request: _RunRequest, clock: _Clock, check: _Check
) -> RunReport:
    """Rank 0's report: the reference trained on the same micro-batches, compared, and the
    measured times beside the plan's."""
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
    forward = {k: v for part in check.per_rank for k, v in part[0].items()}
    backward = {k: v for part in check.per_rank for k, v in part[1].items()}
    step_s = statistics.median(_after_first(clock.step_s))
    p, m = plan.num_stages // plan.stages_per_device, plan.micro_batches
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
        samples_per_s=int(x[0].shape[0]) / step_s,
        stage_forward_s=tuple(forward[i] for i in range(plan.num_stages)),
        predicted_stage_forward_s=tuple(s.forward_s for s in plan.stages),
        stage_backward_s=tuple(backward[i] for i in range(plan.num_stages)),
        predicted_stage_backward_s=tuple(s.backward_s for s in plan.stages),
        bubble_fraction=statistics.fmean(part[2] for part in check.per_rank),
        predicted_bubble_fraction=plan.bubble_fraction,
        closed_form_bubble_fraction=bubble_closed_form(p, m, plan.stages_per_device, plan.schedule),
    )


def _time_forward(stage: torch.nn.Module, sink: list[float]) -> None:
    """Record the wall time of every forward call of ``stage`` (one call per micro-batch)."""
    started: list[float] = []
    stage.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    stage.register_forward_hook(lambda *_: sink.append(time.perf_counter() - started.pop()))


def _time_chunks(stage: Any, busy: list[float], backward: list[float], weight: list[float]) -> None:
    """Record the time a ``PipelineStage`` spends in each forward, backward and weight-gradient
    chunk (its work on one micro-batch, without waiting for its neighbours): ``busy`` gets all,
    ``backward`` the backward chunks, ``weight`` the weight-gradient ones. Wraps the instance's
    methods, which torch's schedules call per micro-batch."""

    def timed(method: Callable[..., Any], sink: list[float] | None) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                busy.append(took)
                if sink is not None:
                    sink.append(took)

        return run

    stage.forward_one_chunk = timed(stage.forward_one_chunk, None)
    stage.backward_one_chunk = timed(stage.backward_one_chunk, backward)
    stage.backward_weight_one_chunk = timed(stage.backward_weight_one_chunk, weight)


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
