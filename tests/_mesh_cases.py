"""Equivalence cases on spawned gloo ranks, shared by the runtime tests: one spawn per mesh runs
every selected case of that mesh (starting processes and importing torch costs more than most
cases), and a reference trains the unpartitioned model on the same micro-batches."""

from __future__ import annotations

import contextlib
import copy
import math
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from autopart.planning.plans import parse_mesh
from autopart.runtime.launch import end_rank, spawn_ranks

Case = tuple[str, str, str, str]
"""(model, mesh, schedule, optimizer)"""

Setup = Callable[[str], tuple[torch.nn.Module, tuple[Any, ...], dict[str, Any], Any, Any]]
"""name -> (model, example inputs, example kwargs, target, loss_fn)"""


def world(mesh: str) -> int:
    return math.prod(parse_mesh(mesh).values())


def _worker(
    rank: int,
    world: int,
    store: str,
    cases: list[Case],
    out: str,
    run_case: Callable[..., dict[str, Any]],
    timeout_s: float,
    keep_going: bool = False,
) -> None:
    """Run ``cases`` one after another; rank 0 writes ``out/<i>.pt`` for each. After a failure the
    ranks stop, and the later cases report that they did not run; with ``keep_going`` every rank
    instead rejoins a fresh process group (a rank left waiting in a collective of the failed case
    gives up after ``timeout_s``) and the next case runs."""
    torch.set_num_threads(1)

    def join(attempt: int) -> None:
        # a rejoin waits for ranks still stuck in the failed case's collectives (up to timeout_s)
        wait = timeout_s * (3 if attempt else 1)
        dist.init_process_group(
            "gloo",
            init_method=f"file://{store}" + (f".{attempt}" if attempt else ""),
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=wait),
        )

    join(0)
    try:
        for i, case in enumerate(cases):
            try:
                result = run_case(*case)
            except Exception:
                if rank == 0:
                    torch.save({"error": traceback.format_exc()}, Path(out) / f"{i}.pt")
                if not keep_going:
                    break
                if i == len(cases) - 1:
                    # end the spawn now: a peer may wait in a collective the failed rank left
                    raise
                dist.destroy_process_group()
                join(i + 1)
                continue
            if rank == 0:
                torch.save(result, Path(out) / f"{i}.pt")
        else:
            dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    end_rank()


def _spawn(ranks: int, args: tuple, timeout_s: float) -> None:
    spawn_ranks(_worker, (ranks, *args), ranks, timeout_s=timeout_s, what=f"{ranks} test ranks")


def results(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    test_name: str,
    cases: list[Case],
    run_case: Callable[..., dict[str, Any]],
    per_case_s: float,
    keep_going: bool = False,
    by_world: bool = False,
) -> Callable[[Case], dict[str, Any]]:
    """The result of a case of ``test_name``, running every selected case of its mesh in one spawn
    on first use (``by_world``: of every mesh of as many ranks, e.g. ``pp=2`` and ``tp=2``: each
    case resolves its mesh against the same group). ``run_case`` must be a module-level function
    (spawned ranks import it). With ``keep_going`` a failed case does not stop the later ones
    (see :func:`_worker`)."""
    selected = [
        tuple(item.callspec.params[k] for k in ("name", "mesh", "schedule", "opt"))
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.originalname == test_name
    ]
    done: dict[Case, dict[str, Any]] = {}

    def key(mesh: str) -> object:
        return world(mesh) if by_world else mesh

    def get(case: Case) -> dict[str, Any]:
        if case not in done:
            todo = [c for c in cases if key(c[1]) == key(case[1]) and c in selected]
            tmp = tmp_path_factory.mktemp("mesh")
            got = run_spawn(world(case[1]), todo, run_case, tmp, per_case_s, keep_going)
            done.update(zip(todo, got))
        return done[case]

    return get


def run_spawn(
    ranks: int,
    cases: list[Case],
    run_case: Callable[..., dict[str, Any]],
    tmp: Path,
    per_case_s: float,
    keep_going: bool = False,
) -> list[dict[str, Any]]:
    """Run ``cases`` one after another in one spawn of ``ranks`` gloo ranks; each case's result
    (what ``run_case`` returned on rank 0), or ``{"error": ...}``."""
    args = (str(tmp / "store"), cases, str(tmp), run_case, per_case_s, keep_going)
    spawn_error = ""
    try:
        _spawn(ranks, args, per_case_s * (1 + len(cases)))
    except (Exception, pytest.fail.Exception) as e:  # recorded once, not respawned per case
        spawn_error = f"the {ranks} ranks failed: {e}"
    return [
        torch.load(tmp / f"{i}.pt")
        if (tmp / f"{i}.pt").exists()
        else {"error": spawn_error or "not run: an earlier case of the spawn failed"}
        for i in range(len(cases))
    ]


def assert_trained_like(got: dict[str, Any], want: Reference) -> None:
    """The program's step losses and its state dict (the model's keys in the model's order, every
    parameter and persistent buffer) equal the reference's, rtol 1e-5."""
    for a, b in zip(got["losses"], want.losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert list(got["state"]) == list(want.state)
    for n, t in got["state"].items():
        torch.testing.assert_close(
            t, want.state[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
        )


def sgd_or_adam(params: Any, kind: str) -> torch.optim.Optimizer:
    """The optimizer a case names: ``"sgd"`` (lr 0.1) or Adam (lr 1e-3)."""
    return torch.optim.SGD(params, lr=0.1) if kind == "sgd" else torch.optim.Adam(params, lr=1e-3)


def chunk(value: Any, n: int) -> list[Any]:
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return list(torch.chunk(value, n))
    return [value] * n


@dataclass(frozen=True)
class Reference:
    """What the unpartitioned model gives when trained the way the pipeline trains."""

    losses: list[float]
    buffers: list[dict[str, torch.Tensor]]
    """Every buffer (non-persistent ones too) of each data-parallel replica, in replica order."""
    output: Any = None
    """With ``infer``: the output of one more forward (no gradients) after the steps."""
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The model's state dict after the steps (replica 0's buffers)."""


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Compute on one thread, as each rank does (``run_cases``): a kernel's reduction order can
    follow the thread count, and Adam's normalisation magnifies a last-bit difference on a
    near-zero gradient (an MLP bias under Adam moved 8e-5 relative on a 2-core AVX-512 host)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()  # as each rank
def reference(
    setup: Setup,
    optimizer: Callable[[Any, str], torch.optim.Optimizer],
    name: str,
    opt: str,
    micro_batches: int,
    steps: int,
    *,
    replicas: int = 1,
    infer: bool = False,
) -> Reference:
    """The unpartitioned model trained the way a pipeline trains: the gradient of the batch's mean
    loss, accumulated over the same ``micro_batches`` (every replica's, in replica order). A
    single full-batch backward sums in a different order, and Adam's normalisation magnifies that
    last-bit difference on near-zero gradients. A ``None`` target means a loss of the output
    alone, ``loss_fn(output)``.

    Buffers written in training (BatchNorm's running statistics) follow each replica's own
    micro-batches, as DDP under a pipeline leaves them: replica ``r`` of ``replicas`` runs
    micro-batches ``r * m .. (r + 1) * m - 1`` (``m = micro_batches / replicas``) on its own
    buffers. With ``infer`` every replica then runs its micro-batches once more without gradients,
    as ``program(x)`` does (in train mode, that too updates running statistics). ``state`` is the
    model's state dict with replica 0's buffers, as ``full_state_dict()`` takes dp rank 0's."""
    model, x, kw, target, loss_fn = setup(name)
    model = copy.deepcopy(model)
    optim = optimizer(model.parameters(), opt)
    chunks = [chunk(t, micro_batches) for t in (*x, target)]
    kw_chunks = {k: chunk(v, micro_batches) for k, v in kw.items()}
    own = _ReplicaBuffers(model, replicas, micro_batches // replicas)

    def forward(i: int) -> tuple[Any, Any]:
        own.switch_to(i)
        *xs, tgt = (c[i] for c in chunks)
        return model(*xs, **{k: v[i] for k, v in kw_chunks.items()}), tgt

    losses = []
    for _ in range(steps):
        optim.zero_grad()
        step_losses = []
        for i in range(micro_batches):
            out, tgt = forward(i)
            loss = loss_fn(out) if target is None else loss_fn(out, tgt)
            (loss / micro_batches).backward()
            step_losses.append(float(loss.detach()))
        optim.step()
        losses.append(sum(step_losses) / micro_batches)
    output = None
    if infer:
        with torch.no_grad():
            outs = [forward(i)[0] for i in range(micro_batches)]
        output = torch.cat([getattr(o, "logits", o) for o in outs])
    buffers = own.all()
    state = {k: buffers[0].get(k, v) for k, v in model.state_dict().items()}
    return Reference(losses, buffers, output, state)


class _ReplicaBuffers:
    """Each data-parallel replica's own buffers, swapped into the one model as its micro-batches
    run."""

    def __init__(self, model: torch.nn.Module, replicas: int, per_replica: int) -> None:
        self.model, self.per_replica, self.current = model, per_replica, 0
        self.saved = [self._take() for _ in range(replicas)]

    def _take(self) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in self.model.named_buffers()}

    def switch_to(self, micro_batch: int) -> None:
        replica = micro_batch // self.per_replica
        if replica != self.current:
            self.saved[self.current] = self._take()
            with torch.no_grad():
                for n, b in self.model.named_buffers():
                    b.copy_(self.saved[replica][n])
            self.current = replica

    def all(self) -> list[dict[str, torch.Tensor]]:
        self.saved[self.current] = self._take()
        return self.saved


def replica_buffers(program: Any, mesh: str) -> list[dict[str, torch.Tensor]]:
    """Every buffer of ``program`` on each data-parallel replica, in replica order, under the
    model's names (collective: every rank calls it). Ranks are laid out (dp, pp, tp)."""
    dp = parse_mesh(mesh).get("dp", 1)
    mine = (
        dist.get_rank() // (dist.get_world_size() // dp),
        {n: b.detach().cpu() for n, b in program.named_buffers()},
    )
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    replicas: list[dict[str, torch.Tensor]] = [{} for _ in range(dp)]
    for replica, tensors in parts:
        replicas[replica].update(tensors)
    return replicas


def read_buffers(model: torch.nn.Module, x: tuple[Any, ...], kw: dict[str, Any]) -> set[str]:
    """The buffers the traced model reads: the program holds these (an unused one, such as HF
    LLaMA's ``original_inv_freq``, is in no stage)."""
    from autopart.capture.tracing import trace

    gm = trace(model, x, kw)
    buffers = {n for n, _ in model.named_buffers()}
    return {str(n.target) for n in gm.graph.nodes if n.op == "get_attr" and n.users} & buffers


def assert_buffers_match(
    got: list[dict[str, torch.Tensor]], want: list[dict[str, torch.Tensor]], read: set[str]
) -> None:
    """Each replica holds exactly the model's buffers that it reads (``read``), equal to the
    reference's (rtol 1e-5). Tensor constants that the trace lifted out of the model's code
    (``lifted_tensor_0``) are no buffers of the model and are not compared."""
    assert len(got) == len(want)
    for replica, (held, theirs) in enumerate(zip(got, want, strict=True)):
        mine = {n: t for n, t in held.items() if "lifted_tensor" not in n.rsplit(".", 1)[-1]}
        assert set(mine) == read, (replica, set(mine) ^ read)
        for n, t in mine.items():
            torch.testing.assert_close(
                t,
                theirs[n],
                rtol=1e-5,
                atol=1e-6,
                msg=lambda m, n=n, r=replica: f"replica {r}, buffer {n}: {m}",
            )


RECOMPUTE = "+recompute"
"""A case whose schedule ends with this plans with ``recompute="full"``: every layer runs under
``torch.utils.checkpoint``, and must train exactly as the unpartitioned model does."""

SELECTIVE = "+selective"
"""The same with ``recompute="selective"``: every layer runs under torch's selective activation
checkpointing (its weight matmuls' outputs kept, its other ops recomputed)."""


def recomputes(schedule: str) -> bool:
    """Whether a case's schedule asks for recomputation."""
    return schedule.endswith((RECOMPUTE, SELECTIVE))


def recompute_request(schedule: str, device: Any) -> tuple[str, Any]:
    """(the case's schedule, the request to compile it with: ``None`` unless it recomputes)."""
    from autopart.planning.request import PlanRequest

    for suffix, how in ((RECOMPUTE, "full"), (SELECTIVE, "selective")):
        if schedule.endswith(suffix):
            return schedule.removesuffix(suffix), PlanRequest(recompute=how, device=device)
    return schedule, None


def recomputed_blocks(program: Any) -> int:
    """How many blocks this rank's stages run under checkpointing."""
    from autopart.passes.recompute import recomputed_blocks as count

    return sum(count(stage.module) for stage in program.local_stages)
