"""The runtime on spawned gloo ranks (CPU) against the unpartitioned model: the same loss, and the
same parameters and buffers after two optimizer steps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.planning.plans import parse_mesh
from tests._mesh_cases import (
    RECOMPUTE,
    SELECTIVE,
    Case,
    assert_buffers_match,
    assert_trained_like,
    chunk,
    read_buffers,
    recompute_request,
    recomputed_blocks,
    recomputes,
    reference,
    replica_buffers,
    results,
    sgd_or_adam,
)
from tests.models import HF_CONFIGS, LOSSES, target_and_loss

STEPS = 2


def _setup(
    name: str, seed: int = 0
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...], dict[str, Any], torch.Tensor, Any]:
    if ":" in name and not name.startswith(
        "hf:"
    ):  # a factory: batch and sequence length are its own
        loaded = load_model(name, device="cpu", seed=seed)
    else:
        config = parse_config_overrides(HF_CONFIGS[name]) if name in HF_CONFIGS else None
        loaded = load_model(name, device="cpu", batch=8, seq=16, config=config, seed=seed)
    model = loaded.model
    model.train()
    target, loss_fn = target_and_loss(loaded, seed)
    return model, loaded.example_inputs, dict(loaded.example_kwargs), target, loss_fn


def _micro_batches(mesh: str, schedule: str) -> int:
    """Per replica: 4 micro-batches (of 2 samples; of one for the ``*_batch4`` models, whose
    micro-batch graph differs from the batch's); with data parallelism, one per pipeline rank."""
    sizes = parse_mesh(mesh)
    pp = sizes.get("pp", 1)
    if sizes.get("dp", 1) > 1:
        return pp
    return 4


def _run_case(name: str, mesh: str, schedule: str, opt: str) -> dict[str, Any]:
    import autopart.runtime.program as runtime

    model, x, kw, target, loss_fn = _setup(name)
    schedule, request = recompute_request(schedule, "cpu")
    program = runtime.compile(
        model,
        mesh,
        example_inputs=x,
        example_kwargs=kw,
        loss_fn=loss_fn,
        request=request,
        schedule=schedule,
        stages_per_rank=2 if schedule == "interleaved" else None,
        micro_batches=_micro_batches(mesh, schedule),
    )
    inference = program(*x, **kw)  # before training: the model's own output on every rank
    assert type(inference) is type(model(*x, **kw))  # e.g. a Hugging Face ModelOutput
    inference = getattr(inference, "logits", inference)
    params = list(program.parameters())
    everywhere = torch.tensor([float(bool(params))])
    dist.all_reduce(everywhere, op=dist.ReduceOp.MIN)
    optimizer = sgd_or_adam(params, opt) if params else None  # see WITHOUT_PARAMETERS
    losses = []
    for _ in range(STEPS):
        if optimizer is not None:
            optimizer.zero_grad()
        losses.append(program.step(*x, target=target, **kw))
        if optimizer is not None:
            optimizer.step()
    return {
        "losses": losses,
        "state": program.full_state_dict(),
        "buffers": replica_buffers(program, mesh),
        "schedule": program.plan.schedule,
        "stages": program.plan.num_stages,
        "inference": inference,
        "every_rank_has_parameters": bool(everywhere),
        "recomputed": recomputed_blocks(program),
    }


def _inference(name: str, chunks: int) -> Any:
    """What ``program(x)`` returns on ``chunks`` micro-batches in all: the model's output on the
    whole batch, except that an output without a batch dimension (a 0-dim mean, an auxiliary loss)
    is the mean of its values on the micro-batches."""
    model, x, kw, _, _ = _setup(name)
    with torch.no_grad():
        whole, spec = tree_flatten(model(*x, **kw))
        pieces = [
            tree_leaves(model(*(c[i] for c in (chunk(t, chunks) for t in x)), **kw_i))
            for i, kw_i in enumerate(_chunked_kwargs(kw, chunks))
        ]
    batch = x[0].shape[0]
    leaves = [
        w
        if not isinstance(w, torch.Tensor) or (w.dim() > 0 and w.shape[0] == batch)
        else torch.stack([p[j] for p in pieces]).mean(0)
        for j, w in enumerate(whole)
    ]
    return tree_unflatten(leaves, spec)


def _chunked_kwargs(kw: dict[str, Any], chunks: int) -> list[dict[str, Any]]:
    split = {k: chunk(v, chunks) for k, v in kw.items()}
    return [{k: v[i] for k, v in split.items()} for i in range(chunks)]


def _full_batch_loss(name: str) -> float:
    model, x, kw, target, loss_fn = _setup(name)
    with torch.no_grad():
        return float(loss_fn(model(*x, **kw), target))


# Every model on 2 and 4 ranks, and every schedule on several models. SGD, not Adam, for the CNN
# and GPT-2: some of their gradient components are exactly zero in exact arithmetic (a convolution
# followed by GroupNorm, which removes them; the key bias of attention, which softmax ignores), and
# Adam turns the last-bit noise of those zeros into full-size steps in either program.
CASES = [
    ("mlp", "pp=2", "gpipe", "sgd"),
    ("mlp", "pp=2", "1f1b", "adam"),
    ("mlp", "pp=4", "1f1b", "sgd"),
    ("mlp", "pp=4", "interleaved", "adam"),  # eight stages, two per rank
    # tied embeddings across the two stages; micro-batches of one sequence (see below)
    ("tests.models:gpt2_batch4", "pp=2", "1f1b", "sgd"),
    ("hf:gpt2", "pp=4", "gpipe", "sgd"),
    ("tests.models:llama_batch4", "pp=2", "interleaved", "sgd"),
    ("hf:llama", "pp=4", "1f1b", "adam"),
    ("gpt2-tiny", "pp=2", "gpipe", "sgd"),
    ("llama-tiny", "pp=2", "gpipe", "adam"),
    ("cnn", "pp=2", "1f1b", "sgd"),  # long skip connections forwarded through stages
    ("cnn", "pp=4", "gpipe", "sgd"),
    ("tests.models:tied_deep", "pp=4", "1f1b", "adam"),  # the embedding's copies on ranks 0 and 3
    ("tests.models:tied_deep", "pp=2", "interleaved", "sgd"),
    ("tests.models:two_in_two_out", "pp=2", "gpipe", "sgd"),  # two inputs, two outputs
    ("tests.models:two_in_two_out", "pp=4", "1f1b", "adam"),
    ("tests.models:keyword_inputs", "pp=2", "1f1b", "sgd"),  # a tensor and a float by keyword
    ("tests.models:gpt2_padded", "pp=2", "1f1b", "sgd"),  # attention_mask= by keyword
    # Outputs of any structure: a 0-dim auxiliary loss beside the logits, read by the loss; a dict
    # with a 0-dim mean and a None field.
    ("tests.models:logits_and_aux", "pp=2", "1f1b", "sgd"),
    ("tests.models:dict_with_none", "pp=2", "gpipe", "adam"),
    # Micro-batches of one sequence (a batch of 4 on 4 micro-batches; GPT-2 and LLaMA above):
    # export traces them to another graph than the batch's, which compile plans itself.
    ("tests.models:mistral_batch4", "pp=2", "1f1b", "sgd"),
    # the cost model alone would leave three of the four ranks without parameters
    ("tests.models:vit", "pp=4", "1f1b", "sgd"),
    # Data parallelism (DDP over dp) beside the pipeline: 4 ranks, two replicas of a 2-stage pipeline.
    ("mlp", "dp=2,pp=2", "1f1b", "adam"),
    ("hf:gpt2", "dp=2,pp=2", "1f1b", "sgd"),  # tied embeddings: summed per replica
    ("hf:llama", "dp=2,pp=2", "gpipe", "adam"),
    ("tests.models:logits_and_aux", "dp=2,pp=2", "gpipe", "sgd"),  # the aux loss of every replica
    # Every layer recomputed in backward (torch.utils.checkpoint on the stage graphs): the same
    # losses and parameters as the unpartitioned model, so as the program without recomputation;
    # selectively (torch's selective checkpointing: weight matmuls kept, the rest recomputed) too
    ("mlp", "pp=2", "1f1b" + RECOMPUTE, "adam"),
    ("hf:llama", "pp=2", "1f1b" + RECOMPUTE, "sgd"),
    ("hf:gpt2", "pp=2", "1f1b" + SELECTIVE, "sgd"),
    ("hf:llama", "dp=2,pp=2", "gpipe" + SELECTIVE, "adam"),
]


WITHOUT_PARAMETERS = {("tests.models:two_in_two_out", "pp=4")}
"""Cases where some rank holds no parameters: two linear layers cannot cover four ranks. Every
other plan gives every rank a parameter, so that each can build a torch optimizer."""


@pytest.fixture(scope="module")
def pipeline_results(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[Case], dict[str, Any]]:
    return results(
        request,
        tmp_path_factory,
        "test_pipeline_matches_the_unpartitioned_model",
        CASES,
        _run_case,
        60.0,
    )


@pytest.mark.distributed
@pytest.mark.timeout(900)  # the first case of a mesh spawns every case of it
@pytest.mark.parametrize(("name", "mesh", "schedule", "opt"), CASES)
def test_pipeline_matches_the_unpartitioned_model(
    pipeline_results: Callable[[Case], dict[str, Any]],
    name: str,
    mesh: str,
    schedule: str,
    opt: str,
) -> None:
    got = pipeline_results((name, mesh, schedule, opt))
    assert "error" not in got, got.get("error")
    sizes = parse_mesh(mesh)
    chunks = sizes.get("dp", 1) * _micro_batches(mesh, schedule)
    expected = _inference(name, chunks)
    expected = getattr(expected, "logits", expected)
    torch.testing.assert_close(got["inference"], expected, rtol=1e-5, atol=1e-6)
    # The reference accumulates over every replica's micro-batches, in replica order.
    dp = sizes.get("dp", 1)
    want = reference(
        _setup, sgd_or_adam, name, opt, dp * _micro_batches(mesh, schedule), STEPS, replicas=dp
    )
    assert got["schedule"] == recompute_request(schedule, "cpu")[0]
    assert (got["recomputed"] > 0) == recomputes(schedule)
    assert got["every_rank_has_parameters"] == ((name, mesh) not in WITHOUT_PARAMETERS)
    assert got["stages"] == sizes["pp"] * (2 if schedule == "interleaved" else 1)
    if name not in LOSSES:  # the batch's own loss (those of LOSSES square a batch mean)
        assert got["losses"][0] == pytest.approx(_full_batch_loss(name), rel=1e-5)
    # the model's state dict: its keys in its order (tied aliases, persistent buffers), whole
    assert_trained_like(got, want)
    model, x, kw, _, _ = _setup(name)
    assert_buffers_match(got["buffers"], want.buffers, read_buffers(model, x, kw))


def test_no_process_group_is_a_clear_error() -> None:
    import autopart.runtime.program as runtime

    model, x, _, _, loss_fn = _setup("mlp")
    assert not dist.is_initialized()
    with pytest.raises(runtime.RuntimeSetupError, match="init_process_group"):
        runtime.compile(model, "pp=2", example_inputs=x, loss_fn=loss_fn)


def _errors_worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    messages = []
    try:
        from torch.distributed.device_mesh import init_device_mesh

        import autopart.runtime.program as runtime
        from autopart.errors import AutopartError
        from autopart.planning.request import PlanRequest

        model, x, _, _, loss_fn = _setup("mlp")
        pp_only = init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))
        for kwargs in (
            {"mesh": "pp=4"},  # more stages than ranks
            {"mesh": "pp=2", "micro_batches": 3},  # 8 samples do not split into 3
            {"mesh": "pp=2", "micro_batches": 1, "schedule": "1f1b"},  # 1F1B needs >= 2
            {"mesh": "pp=2", "schedule": "zigzag"},  # checked as a PlanRequest field
            # the request's other options reach the planner: a limit nothing fits
            {"mesh": "pp=2", "request": PlanRequest(memory="1KiB", device="cpu")},
            # mixed precision runs FSDP2 over an fsdp dim, which this DeviceMesh lacks
            {"mesh": pp_only, "precision": "bf16-mixed"},
        ):
            try:
                runtime.compile(model, example_inputs=x, loss_fn=loss_fn, **kwargs)  # type: ignore[arg-type]
                messages.append("no error")
            except AutopartError as err:
                messages.append(str(err))
        if rank == 0:
            Path(out).write_text("\n---\n".join(messages))
        dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_bad_runtime_requests_are_clear_errors(tmp_path: Path) -> None:
    out = tmp_path / "err.txt"
    mp.start_processes(
        _errors_worker, args=(2, str(tmp_path / "store"), str(out)), nprocs=2, start_method="spawn"
    )
    mesh, divisible, one_f_one_b, schedule, memory, mixed = out.read_text().split("\n---\n")
    assert "needs 4 ranks" in mesh and "has 2" in mesh and "torchrun" in mesh
    assert "does not split into 3" in divisible and "divisor of 8" in divisible
    assert "1f1b" in one_f_one_b and "micro-batch" in one_f_one_b
    assert "unknown schedule 'zigzag'" in schedule
    assert "1.00 KiB per device" in memory and "--memory" in memory, memory
    assert "FSDP2" in mixed and "add an 'fsdp' dim (of size 1" in mixed, mixed
