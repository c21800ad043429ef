"""The runtime benchmark: step time of an autopart program against the same model split by hand.

The hand-written pipeline is what torchtitan (``pipeline_parallel_layers_per_stage``, with
``pipeline_module_split``) and Megatron-LM (``num_layers / pp``) build by default: the same number
of repeated layers on every stage, the embedding on the first stage, the final norm and the output
head on the last. Each stage is an eager ``nn.Module`` that holds the model's own submodules for its
layers (:class:`_LlamaStage`, :class:`_MLPStage`), wrapped in torch's ``PipelineStage``; it never
touches autopart's tracer, planner, split pass or runtime. (torch's tracing front end,
``pipeline(model, mb_args, split_spec=...)``, was tried first: its stages run as
``torch.export`` interpreter modules, whose per-op Python overhead made the hand pipeline twice
as slow as eager on ``llama-tiny``, so it would flatter autopart.) Both programs run the same
schedule class (``Schedule1F1B`` or ``ScheduleGPipe``) with the same micro-batch count, the same
initial weights (one seeded model, deep-copied before either program is built), the same batch and
the same loss.

Timing (:func:`runtime_suite`): the ranks are spawned once per rank count (gloo, file store,
``torch.set_num_threads(1)`` on every rank) and run every case in the same processes. Each case
builds both programs, runs ``warmup`` steps of each, then ``steps`` measured steps of each,
alternating in pairs whose order alternates too (A B, B A, A B, ...: autopart and hand each go
first in half of the pairs). A step is one training step over all
micro-batches (forward, loss and backward; gradients are cleared before it, outside the timed
region, and no optimizer runs); ``dist.barrier()`` precedes and follows it, and its time is the
slowest rank's wall time between the barriers. Reported step times are medians over the measured
steps; ``ratio = hand_step_s / autopart_step_s`` (above 1: autopart is faster).

Pipeline efficiency. Every rank also measures its *busy* time in a step, ``busy_r``: the wall time
spent inside its stage's ``forward_one_chunk`` and ``backward_one_chunk`` and the loss, summed over
micro-batches (the useful work; waiting for and sending tensors is excluded). Then

- ``efficiency = sum_r busy_r / (p * step_s)``: the fraction of the ranks' time spent on useful work;
  equivalently the ideal step time (all work spread evenly over ``p`` ranks, no bubble, free
  communication) over the measured one.
- ``closed_form = m / (m + p - 1)``: the efficiency of GPipe and 1F1B with ``m`` micro-batches on
  ``p`` perfectly balanced stages and free communication (a step takes ``m + p - 1`` stage slots,
  of which each rank is busy ``m``).
- ``bound = m * sum_r t_r / (p * ((m - 1) * max_r t_r + sum_r t_r))`` with ``t_r = busy_r / m`` (the
  per-micro-batch stage work): the same schedule's efficiency with the measured, unequal stage
  times (its step is ``(m - 1) * max t + sum t``); it equals the closed form when the stages are
  equal. ``efficiency`` below ``bound`` is time lost to communication and scheduling;
  ``bound`` below ``closed_form`` is time lost to imbalance.
- ``balance = mean_r busy_r / max_r busy_r``.

On a machine with fewer cores than ranks, busy time includes time a rank waits for a core, so the
efficiency then overstates the useful fraction; the result files record the core count and load.

CPU time. The same wrapper also adds up the CPU time of the rank's own thread
(``time.thread_time``; with ``torch.set_num_threads(1)`` the stage's kernels run on it, gloo's
transfers on other threads), ``cpu_r``, which a busy machine does not inflate: time waiting for a
core is not counted. ``cpu_ratio`` is the hand split's step over autopart's with stage times
``t_r = cpu_r / m`` in the step of ``bound`` above, ``(m - 1) * max_r t_r + sum_r t_r``: the ratio the
two splits would give with a free core per rank and free communication. On a shared host it shows
what the split is worth when the wall-clock ``ratio`` is dominated by other processes (with more
runnable threads than cores, a less balanced split loses less to them: its idle rank leaves a core
to the others).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autopart.errors import AutopartError

__all__ = [
    "CASES",
    "FULL_CASES",
    "FULL_RANKS",
    "QUICK_CASES",
    "ROW_KEYS",
    "RuntimeCase",
    "closed_form_efficiency",
    "equal_layer_starts",
    "format_runtime_markdown",
    "imbalance_bound_efficiency",
    "runtime_suite",
]

ROW_KEYS: tuple[str, ...] = (
    "case",
    "kind",
    "ranks",
    "schedule",
    "profile",
    "micro_batches",
    "batch",
    "steps",
    "warmup",
    "autopart_step_s",
    "hand_step_s",
    "ratio",
    "paired_ratio",
    "cpu_ratio",
    "autopart_spread",
    "hand_spread",
    "predicted_ratio",
    "autopart_efficiency",
    "hand_efficiency",
    "closed_form_efficiency",
    "autopart_bound",
    "hand_bound",
    "autopart_balance",
    "hand_balance",
    "autopart_busy_s",
    "hand_busy_s",
    "predicted_busy_s",
    "autopart_cpu_s",
    "hand_cpu_s",
    "autopart_split",
    "hand_split",
    "autopart_layers_per_stage",
    "hand_layers_per_stage",
    "autopart_loss",
    "hand_loss",
    "autopart_steps_s",
    "hand_steps_s",
)
"""Keys of every row :func:`runtime_suite` returns, in this order.

- ``kind``: ``"heavy head"`` or ``"uniform"`` (:attr:`RuntimeCase.kind`).
- ``autopart_step_s``, ``hand_step_s``: median step time in seconds; ``ratio`` = hand / autopart.
- ``paired_ratio``: the median over measured steps ``i`` of hand step ``i`` / autopart step ``i``
  (neighbours in time, so a slow drift of the machine's load cancels); close to ``ratio`` when the
  run was steady.
- ``*_spread``: interquartile range of the step times over their median (noise of the run).
- ``predicted_ratio``: what autopart's cost model predicts for the same ratio (the plan's
  equal-layers baseline step time over the plan's).
- ``*_efficiency``, ``closed_form_efficiency``, ``*_bound``, ``*_balance``: see the module docstring.
- ``*_busy_s``: median busy seconds per step of each rank, stage order; ``predicted_busy_s``: what
  autopart's cost model predicts for its own stages (``m`` x the plan's per-micro-batch forward +
  backward + receive time).
- ``*_cpu_s``: median CPU seconds per step of each rank's own thread in the same functions;
  ``cpu_ratio``: the step-time ratio these predict (see the module docstring).
- ``*_split``: what each stage holds, from its parameters' names, one string per stage;
  ``*_layers_per_stage``: how many repeated layers have parameters on each stage (a layer cut in
  two by autopart counts on both stages).
- ``*_steps_s``: every measured step's time, in the order they ran (for re-analysis).
- ``*_loss``: the mean loss of the first measured step; both programs compute the same function of
  the same weights and data, so they agree to rounding.
"""


@dataclass(frozen=True, slots=True)
class RuntimeCase:
    """A benchmark model: how to build it (seeded) and where its repeated layers are."""

    name: str
    description: str
    build: Callable[[int, int, int], tuple[nn.Module, tuple[torch.Tensor, ...]]]
    """``(batch, seq, seed) -> (model, example_inputs)`` on the CPU."""
    layers: str
    """Module path of the ``nn.ModuleList`` of repeated layers the hand split divides evenly."""
    hand_stage: Callable[[nn.Module, range, bool, bool], nn.Module]
    """``(model, layers, first, last) -> stage module``: the hand-written stage holding ``layers``
    (and the embedding when ``first``, the norm and head when ``last``)."""
    batch: int
    seq: int
    micro_batches: int
    kind: str
    """``"heavy head"`` (the output head is a large share of the work) or ``"uniform"``."""


def _zoo(name: str) -> Callable[[int, int, int], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(batch: int, seq: int, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        from autopart.models.model_spec import load_model

        loaded = load_model(name, batch=batch, seq=seq, device="cpu", seed=seed)
        return loaded.model, tuple(loaded.example_inputs)

    return build


def _llama(
    n_layer: int, vocab: int
) -> Callable[[int, int, int], tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    def build(batch: int, seq: int, seed: int) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        from autopart.models.zoo import seeded_build, token_inputs
        from autopart.models.zoo.llama import Llama, LlamaConfig

        cfg = LlamaConfig(n_layer, 256, 4, 4, 1024, vocab, max_seq=1024)
        cpu = torch.device("cpu")
        with seeded_build(cpu, seed):
            model = Llama(cfg)
        return model, token_inputs("llama", batch, seq, vocab, cfg.max_seq, cpu, seed)

    return build


class _LlamaStage(nn.Module):
    """A hand-written stage of the zoo's Llama, as torchtitan writes one: the model's own
    embedding (first stage), decoder layers, and norm and head (last stage), run eagerly."""

    rope_cos: torch.Tensor
    rope_sin: torch.Tensor

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        inner: Any = model.model
        self.embed_tokens: nn.Module | None = inner.embed_tokens if first else None
        self.layers = nn.ModuleList(inner.layers[i] for i in layers)
        self.norm: nn.Module | None = inner.norm if last else None
        self.lm_head: nn.Module | None = model.lm_head if last else None  # type: ignore[assignment]
        # Every stage keeps the RoPE tables (torchtitan keeps freqs_cis on every stage).
        self.register_buffer("rope_cos", inner.rope_cos, persistent=False)
        self.register_buffer("rope_sin", inner.rope_sin, persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.embed_tokens is not None:
            h = self.embed_tokens(h)
        seq = h.shape[1]
        cos, sin = self.rope_cos.narrow(0, 0, seq), self.rope_sin.narrow(0, 0, seq)
        for layer in self.layers:
            h = layer(h, cos, sin)
        if self.norm is not None and self.lm_head is not None:
            h = self.lm_head(self.norm(h))
        return h


class _MLPStage(nn.Module):
    """A hand-written stage of the zoo's MLP: its Linear + GELU layers, and the head last."""

    def __init__(self, model: nn.Module, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        full: Any = model
        self.layers = nn.ModuleList(full.layers[i] for i in layers)
        self.head: nn.Module | None = full.head if last else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.nn.functional.gelu(layer(x))
        return self.head(x) if self.head is not None else x


CASES: dict[str, RuntimeCase] = {
    case.name: case
    for case in (
        RuntimeCase(
            "heavy-head",
            "zoo heavy-head: Llama, 4 layers, hidden 256, vocab 65,536 (the head alone is ~4x the "
            "layers' work)",
            _zoo("heavy-head"),
            "model.layers",
            _LlamaStage,
            batch=16,
            seq=16,
            micro_batches=8,
            kind="heavy head",
        ),
        RuntimeCase(
            "llama-8l-v16k",
            "Llama, 8 layers, hidden 256, vocab 16,384 (head ~0.4x the layers' work, as in GPT-2 "
            "small or Qwen2.5-0.5B)",
            _llama(8, 16384),
            "model.layers",
            _LlamaStage,
            batch=16,
            seq=16,
            micro_batches=8,
            kind="heavy head",
        ),
        RuntimeCase(
            "llama-8l-v32k",
            "Llama, 8 layers, hidden 256, vocab 32,000 as in Llama 2 (the head's FLOPs are "
            "0.98x the 8 layers': an equal-layers split puts ~3/4 of the work on the last stage, "
            "and a balanced split can be up to ~1.5x faster)",
            # Not 32,768: its dense 32 MiB embedding and head gradients exceed glibc's largest
            # mmap threshold (32 MiB), so every micro-batch maps and page-faults them in afresh,
            # in both programs alike: 27 ms of CPU per micro-batch for the embedding alone on the
            # development host, against 5.7 ms at 32,000.
            _llama(8, 32000),
            "model.layers",
            _LlamaStage,
            batch=16,
            # 128 tokens per micro-batch (the other Llama cases have 32): costs that do not grow
            # with the tokens (the embedding's dense V x H gradient, accumulating the head's weight
            # gradient) stay a small share of a stage, as they are at training batch sizes.
            seq=64,
            micro_batches=8,
            kind="heavy head",
        ),
        RuntimeCase(
            "llama-8l-v256",
            "uniform Llama, 8 layers, hidden 256, vocab 256 (embedding and head negligible)",
            _llama(8, 256),
            "model.layers",
            _LlamaStage,
            batch=16,
            seq=16,
            micro_batches=8,
            kind="uniform",
        ),
        RuntimeCase(
            "mlp",
            "zoo mlp: 8 x (Linear 1024 + GELU), 10-class head (uniform)",
            _zoo("mlp"),
            "layers",
            _MLPStage,
            batch=256,
            seq=1,
            micro_batches=8,
            kind="uniform",
        ),
        RuntimeCase(
            "llama-tiny",
            "zoo llama-tiny: 2 layers, hidden 64, vocab 256 (for --quick)",
            _zoo("llama-tiny"),
            "model.layers",
            _LlamaStage,
            batch=8,
            seq=16,
            micro_batches=4,
            kind="uniform",
        ),
        RuntimeCase(
            "mlp-small",
            "zoo mlp at batch 32 (for --quick)",
            _zoo("mlp"),
            "layers",
            _MLPStage,
            batch=32,
            seq=1,
            micro_batches=4,
            kind="uniform",
        ),
    )
}
"""Every benchmark case by name."""

FULL_CASES = ("heavy-head", "llama-8l-v16k", "llama-8l-v32k", "llama-8l-v256", "mlp")
QUICK_CASES = ("llama-tiny", "mlp-small")
FULL_RANKS = (2, 4)
QUICK_RANKS = (2,)

Progress = Callable[[int, int, str], None]
"""``progress(done, total, label)``: called before each case and once at the end."""


# ---------------------------------------------------------------------------------------------
# formulas


def closed_form_efficiency(micro_batches: int, ranks: int) -> float:
    """``m / (m + p - 1)``: GPipe and 1F1B on ``p`` equal stages with free communication."""
    return micro_batches / (micro_batches + ranks - 1)


def imbalance_bound_efficiency(busy_s: Sequence[float], micro_batches: int) -> float:
    """The efficiency of GPipe / 1F1B with free communication and per-micro-batch stage times
    ``busy_s[r] / m`` (see the module docstring); the closed form when all are equal."""
    m, p = micro_batches, len(busy_s)
    t = [b / m for b in busy_s]
    step = (m - 1) * max(t) + sum(t)
    return m * sum(t) / (p * step) if step > 0 else float("nan")


def equal_layer_starts(num_layers: int, ranks: int) -> list[int]:
    """The first layer of every stage after the first under an equal-layers split (when the layers
    do not divide evenly the first stages get one more, as :func:`autopart.solver.baselines.
    equal_layers` does)."""
    if num_layers < ranks:
        raise AutopartError(
            f"an equal-layers split of {num_layers} layers over {ranks} stages leaves a stage "
            f"without a layer; use at most {num_layers} ranks."
        )
    per, extra = divmod(num_layers, ranks)
    return [s * per + min(s, extra) for s in range(1, ranks)]


# ---------------------------------------------------------------------------------------------
# the suite (parent process)


def runtime_suite(
    *,
    quick: bool = False,
    cases: Sequence[str] | None = None,
    ranks: Sequence[int] | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    schedule: str = "1f1b",
    profile: bool = False,
    progress: Progress | None = None,
    timeout_s: float = 1800.0,
) -> list[dict[str, Any]]:
    """Rows (see :data:`ROW_KEYS`) for every case at every rank count: the full suite is the five
    :data:`FULL_CASES` on 2 and 4 ranks with 2 warm-up and 16 measured steps per program;
    ``quick`` is two small models on 2 ranks with 1 and 3. ``profile``: autopart plans on op
    times measured on this machine (``autopart.compile(profile=True)``), so its predicted ratio
    is the best split's over equal layers by the measured costs."""
    from autopart.runtime.launch import spawn_ranks

    names = list(cases if cases is not None else (QUICK_CASES if quick else FULL_CASES))
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise AutopartError(f"unknown runtime bench case(s) {unknown}; choose from {list(CASES)}.")
    if schedule not in ("1f1b", "gpipe"):
        raise AutopartError(f"schedule {schedule!r}: the runtime bench runs '1f1b' or 'gpipe'.")
    rank_counts = list(ranks if ranks is not None else (QUICK_RANKS if quick else FULL_RANKS))
    steps = steps if steps is not None else (3 if quick else 16)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    if steps < 1 or warmup < 0:
        raise AutopartError(f"need steps >= 1 and warmup >= 0, got {steps} and {warmup}.")
    say = progress or (lambda _done, _total, _label: None)
    total = len(names) * len(rank_counts)
    rows: list[dict[str, Any]] = []
    for world in rank_counts:
        with tempfile.TemporaryDirectory(prefix="autopart-bench-") as tmp:
            out = Path(tmp) / "rows.jsonl"
            store = str(Path(tmp) / "store")
            args = (world, store, names, steps, warmup, (schedule, profile), str(out))
            shown = [-1]

            def show_progress(
                out: Path = out, world: int = world, shown: list[int] = shown
            ) -> None:
                got = len(out.read_text().splitlines()) if out.exists() else 0
                if got != shown[0] and got < len(names):
                    shown[0] = got
                    say(len(rows) + got, total, f"{names[got]} on {world} ranks")

            show_progress()
            what = f"the runtime bench on {world} ranks"
            spawn_ranks(
                _rank_main, args, world, timeout_s=timeout_s, what=what, on_tick=show_progress
            )
            rows.extend(json.loads(line) for line in out.read_text().splitlines())
    say(total, total, "done")
    return rows


# ---------------------------------------------------------------------------------------------
# one rank


def _rank_main(
    rank: int,
    world: int,
    store: str,
    names: list[str],
    steps: int,
    warmup: int,
    how: tuple[str, bool],
    out: str,
) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    # pipeline()'s export pickles pytree specs that warn about a deprecated spelling in torch 2.13.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*LeafSpec.*")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=600),
    )
    try:
        for name in names:
            row = _run_case(CASES[name], rank, world, steps, warmup, how)
            if rank == 0:
                with open(out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    finally:
        dist.destroy_process_group()


class _BusyClock:
    """Adds up the wall time spent inside the functions it wraps."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self.cpu_s = 0.0
        """CPU time of the calling thread in the same functions."""

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start, cpu_start = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total_s += time.perf_counter() - start
                self.cpu_s += time.thread_time() - cpu_start

        return timed

    def instrument(self, stage: Any) -> None:
        # Instance attributes shadow the methods the schedules call (self._stage.forward_one_chunk);
        # both programs are measured through the same wrapper.
        stage.forward_one_chunk = self.wrap(stage.forward_one_chunk)
        stage.backward_one_chunk = self.wrap(stage.backward_one_chunk)


@dataclass(slots=True)
class _Program:
    """One of the two pipelines on this rank: run one step, and what it holds."""

    step: Callable[[], None]
    params: list[nn.Parameter]
    clock: _BusyClock
    losses: list[float]
    param_names: list[str]


def _run_case(
    case: RuntimeCase, rank: int, world: int, steps: int, warmup: int, how: tuple[str, bool]
) -> dict[str, Any]:
    """One case on this rank; ``how``: the schedule, and whether autopart plans on measured
    op times."""
    import torch.distributed as dist

    from autopart.runtime.launch import training_batch

    model, inputs = case.build(case.batch, case.seq, 0)
    hand_model = copy.deepcopy(model)  # same initial weights; compile aliases the model's storage
    target, loss_fn = training_batch(_Loaded(model, inputs))
    m = case.micro_batches
    schedule = how[0]
    auto, plan = _autopart_program(model, inputs, target, loss_fn, world, m, how)
    hand, num_layers = _hand_program(
        hand_model, inputs, target, loss_fn, case, rank, world, m, schedule
    )
    programs = (auto, hand)
    times: tuple[list[float], list[float]] = ([], [])
    busy: tuple[list[float], list[float]] = ([], [])
    cpu: tuple[list[float], list[float]] = ([], [])
    for i in range(warmup + steps):
        # A B, then B A: each program runs first in half of the pairs, so whatever the step before
        # leaves behind (freed memory, a late send, cache contents) falls on both alike.
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            prog = programs[which]
            for p in prog.params:
                p.grad = None
            before, cpu_before = prog.clock.total_s, prog.clock.cpu_s
            dist.barrier()
            start = time.perf_counter()
            prog.step()
            dist.barrier()
            elapsed = time.perf_counter() - start
            if i >= warmup:
                times[which].append(elapsed)
                busy[which].append(prog.clock.total_s - before)
                cpu[which].append(prog.clock.cpu_s - cpu_before)
    gathered: list[Any] = [None] * world
    mine = {
        "times": times,
        "busy": busy,
        "cpu": cpu,
        "params": (auto.param_names, hand.param_names),
        "losses": (auto.losses[warmup : warmup + 1], hand.losses[warmup : warmup + 1]),
    }
    dist.all_gather_object(gathered, mine)
    return _row(case, world, how, (steps, warmup), plan, gathered, num_layers)


@dataclass(frozen=True, slots=True)
class _Loaded:
    """What :func:`autopart.runtime.launch.training_batch` reads from a loaded model."""

    model: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)


def _timed_loss(
    loss_fn: Callable[[Any, Any], torch.Tensor], clock: _BusyClock, sink: list[float]
) -> Callable[[Any, Any], torch.Tensor]:
    timed = clock.wrap(loss_fn)

    def loss(output: Any, target: Any) -> torch.Tensor:
        value = timed(output, target)
        sink.append(float(value.detach()))
        return value

    return loss


def _autopart_program(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    target: torch.Tensor,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    world: int,
    micro_batches: int,
    how: tuple[str, bool],
) -> tuple[_Program, Any]:
    import autopart

    schedule, profile = how
    clock, mb_losses = _BusyClock(), list[float]()
    program = autopart.compile(
        model,
        f"pp={world}",
        example_inputs=inputs,
        loss_fn=_timed_loss(loss_fn, clock, mb_losses),
        micro_batches=micro_batches,
        schedule=schedule,
        profile=profile,
    )
    for stage in program.local_stages:
        clock.instrument(stage.pipeline_stage)
    losses: list[float] = []

    def step() -> None:
        mb_losses.clear()
        losses.append(program.step(*inputs, target=target))

    names = [n for s in program.local_stages for n, _ in s.module.named_parameters()]
    return _Program(step, list(program.parameters()), clock, losses, names), program.plan


def _hand_program(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    target: torch.Tensor,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    case: RuntimeCase,
    rank: int,
    world: int,
    micro_batches: int,
    schedule: str,
) -> tuple[_Program, int]:
    """This rank's stage of the equal-layers split, a ``PipelineStage`` and the schedule class, as
    torch's pipelining tutorial and torchtitan write them."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    num_layers = len(model.get_submodule(case.layers))  # type: ignore[arg-type]
    bounds = [0, *equal_layer_starts(num_layers, world), num_layers]
    module = case.hand_stage(
        model, range(bounds[rank], bounds[rank + 1]), rank == 0, rank == world - 1
    )
    stage = PipelineStage(module, rank, world, torch.device("cpu"))
    clock, mb_losses = _BusyClock(), list[float]()
    kind = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}[schedule]
    sched = kind(stage, micro_batches, loss_fn=_timed_loss(loss_fn, clock, mb_losses))
    clock.instrument(stage)
    losses: list[float] = []
    is_first, is_last = rank == 0, rank == world - 1

    def step() -> None:
        mb_losses.clear()
        if is_first:
            sched.step(*inputs)
        elif is_last:
            sched.step(target=target)
        else:
            sched.step()
        # Only the last rank has the loss; a hand-written loop sends it nowhere.
        losses.append(statistics.fmean(mb_losses) if is_last else math.nan)

    name_of = {id(p): n for n, p in model.named_parameters()}  # the model's own names
    names = [name_of[id(p)] for p in module.parameters()]
    return _Program(step, list(module.parameters()), clock, losses, names), num_layers


# ---------------------------------------------------------------------------------------------
# the row (rank 0)


def _row(
    case: RuntimeCase,
    world: int,
    how: tuple[str, bool],
    counts: tuple[int, int],
    plan: Any,
    gathered: Sequence[dict[str, Any]],
    num_layers: int,
) -> dict[str, Any]:
    m = case.micro_batches
    steps, warmup = counts
    row: dict[str, Any] = {
        "case": case.name,
        "kind": case.kind,
        "ranks": world,
        "schedule": how[0],
        "profile": how[1],
        "micro_batches": m,
        "batch": case.batch,
        "steps": steps,
        "warmup": warmup,
    }
    base = plan.baselines.get("equal_layers")
    predicted = base.step_time_s / plan.step_time_s if base and plan.step_time_s else math.nan
    per_step_of: list[list[float]] = []
    for which, label in enumerate(("autopart", "hand")):
        # A step ends when its slowest rank passes the closing barrier.
        per_step = [max(g["times"][which][i] for g in gathered) for i in range(steps)]
        per_step_of.append(per_step)
        row[f"{label}_steps_s"] = per_step
        step_s = statistics.median(per_step)
        busy = [statistics.median(g["busy"][which]) for g in gathered]
        row[f"{label}_step_s"] = step_s
        row[f"{label}_spread"] = _iqr(per_step) / step_s
        row[f"{label}_efficiency"] = sum(busy) / (world * step_s)
        row[f"{label}_bound"] = imbalance_bound_efficiency(busy, m)
        row[f"{label}_balance"] = statistics.fmean(busy) / max(busy)
        row[f"{label}_busy_s"] = busy
        row[f"{label}_cpu_s"] = [statistics.median(g["cpu"][which]) for g in gathered]
        names = [g["params"][which] for g in gathered]
        row[f"{label}_split"] = [_describe(n, case.layers) for n in names]
        row[f"{label}_layers_per_stage"] = [len(_layer_indices(n, case.layers)) for n in names]
        row[f"{label}_loss"] = gathered[-1]["losses"][which][0]  # the last rank has both
    row["ratio"] = row["hand_step_s"] / row["autopart_step_s"]
    row["paired_ratio"] = statistics.median(h / a for a, h in zip(*per_step_of))
    row["predicted_ratio"] = predicted
    row["cpu_ratio"] = _pipeline_step(row["hand_cpu_s"], m) / _pipeline_step(
        row["autopart_cpu_s"], m
    )
    row["predicted_busy_s"] = [st.predicted_s * m for st in plan.stages]
    row["closed_form_efficiency"] = closed_form_efficiency(m, world)
    assert sum(row["hand_layers_per_stage"]) == num_layers
    return {key: row[key] for key in ROW_KEYS}


def _pipeline_step(busy_s: Sequence[float], micro_batches: int) -> float:
    """``(m - 1) * max t + sum t`` with ``t = busy_s / m``: a GPipe / 1F1B step on stages that take
    ``t`` per micro-batch, with free communication."""
    t = [b / micro_batches for b in busy_s]
    return (micro_batches - 1) * max(t) + sum(t)


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


def _layer_indices(param_names: Sequence[str], layers: str) -> list[int]:
    prefix = layers + "."
    found: dict[int, None] = {}
    for name in param_names:
        if name.startswith(prefix):
            found[int(name[len(prefix) :].split(".", 1)[0])] = None
    return sorted(found)


def _describe(param_names: Sequence[str], layers: str) -> str:
    """``embed_tokens, layers 0-3`` from a stage's parameter names."""
    prefix = layers + "."
    parts: list[str] = []
    indices = _layer_indices(param_names, layers)
    short = layers.rsplit(".", 1)[-1]
    for name in param_names:
        if name.startswith(prefix):
            if indices:
                lo, hi = indices[0], indices[-1]
                parts.append(f"{short} {lo}" if lo == hi else f"{short} {lo}-{hi}")
                indices = []
            continue
        module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1] if "." in name else name
        if module not in parts:
            parts.append(module)
    return ", ".join(parts) or "(no parameters)"


# ---------------------------------------------------------------------------------------------
# output


def _ms(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: f"{row[key] * 1e3:.1f}"


def _pair(key: str, fmt: str) -> Callable[[dict[str, Any]], str]:
    return lambda row: f"{row['autopart_' + key]:{fmt}} / {row['hand_' + key]:{fmt}}"


def _ratio(key: str, digits: int) -> Callable[[dict[str, Any]], str]:
    # rows of result files written before a key existed show a dash
    return lambda row: "—" if math.isnan(row.get(key, math.nan)) else f"{row[key]:.{digits}f}x"


_COLUMNS: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = (
    ("ranks", lambda row: str(row["ranks"])),
    ("m", lambda row: str(row["micro_batches"])),
    ("autopart step ms", _ms("autopart_step_s")),
    ("hand step ms", _ms("hand_step_s")),
    ("ratio hand / autopart", _ratio("ratio", 3)),
    ("paired", _ratio("paired_ratio", 3)),
    ("CPU-time ratio", _ratio("cpu_ratio", 3)),
    ("predicted ratio", _ratio("predicted_ratio", 2)),
    ("spread autopart / hand", _pair("spread", ".1%")),
    ("efficiency autopart / hand", _pair("efficiency", ".0%")),
    ("closed form", lambda row: f"{row['closed_form_efficiency']:.0%}"),
    ("bound autopart / hand", _pair("bound", ".0%")),
    (
        "layers per stage autopart / hand",
        lambda row: (
            "-".join(map(str, row["autopart_layers_per_stage"]))
            + " / "
            + "-".join(map(str, row["hand_layers_per_stage"]))
        ),
    ),
)


def format_runtime_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """Two markdown tables of ``rows``: times, ratios and efficiencies, then what each stage holds
    and its busy time (a NaN shows as a dash)."""
    lines = [
        "| case | " + " | ".join(h for h, _ in _COLUMNS) + " |",
        "|---|" + "|".join("---:" for _ in _COLUMNS) + "|",
    ]
    lines += [
        f"| {row['case']} | " + " | ".join(cell(row) for _, cell in _COLUMNS) + " |" for row in rows
    ]
    lines += [
        "",
        "| case | ranks | autopart stages | hand stages (equal layers) | busy s per rank autopart "
        "| predicted by autopart's cost model | busy s per rank hand | CPU s per rank autopart "
        "| CPU s per rank hand |",
        "|---|---:|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        busy = [
            " / ".join(f"{b:.3f}" for b in row[key]) if key in row else "—"
            for key in (
                "autopart_busy_s",
                "predicted_busy_s",
                "hand_busy_s",
                "autopart_cpu_s",
                "hand_cpu_s",
            )
        ]
        lines.append(
            f"| {row['case']} | {row['ranks']} | {' ‖ '.join(row['autopart_split'])} | "
            f"{' ‖ '.join(row['hand_split'])} | " + " | ".join(busy) + " |"
        )
    return "\n".join(lines) + "\n"
