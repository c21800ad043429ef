"""autopart.emit: the written program is pinned by golden files, deterministic, free of autopart,
and trains under torchrun exactly like the unpartitioned model.

Set ``AUTOPART_UPDATE_GOLDEN=1`` to rewrite ``tests/golden/emit`` (plans included) after an
intended change to the generated code, and review the diff.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils._pytree import tree_flatten

import autopart
from autopart.codegen.emitter import EmitError, _Program, _write
from autopart.models.model_spec import load_model, parse_config_overrides
from autopart.passes.split_stages import split_stages, stage_info
from autopart.planning.planner import plan_graph
from autopart.planning.plans import Plan
from autopart.precision import as_precision, traced_as_computed
from autopart.runtime.launch import end_rank, spawn_ranks
from autopart.runtime.stage_io import StateLayout, stage_io, value_metas
from tests.models import FAST_LINK, HF_CONFIGS, locked_version, target_and_loss

GOLDEN = Path(__file__).parents[1] / "golden" / "emit"
UPDATE = os.environ.get("AUTOPART_UPDATE_GOLDEN") == "1"


TEMPLATE = Path(autopart.__file__).parent / "codegen" / "templates" / "run.py"
COLLECTIVES = TEMPLATE.parent / "collectives.py"
# golden folder -> (model, schedule, mesh); 4 micro-batches
GOLDEN_CASES = {
    "mlp": ("mlp", "gpipe", "pp=2"),
    "gpt2-tiny": ("gpt2-tiny", "1f1b", "pp=2"),
    # Megatron-split blocks, a vocabulary-parallel tied embedding, collectives in the code
    "hf-gpt2-pp2-tp2": ("hf:gpt2", "1f1b", "pp=2,tp=2"),
}
SOURCES = ("config.json", "plan.json", "loss.py", "stage_0.py", "stage_1.py")


def _setup(name: str) -> tuple[nn.Module, tuple[Any, ...], dict[str, Any], torch.Tensor, Any]:
    if name in HF_CONFIGS:  # small Hugging Face models, dropout off
        config = parse_config_overrides(HF_CONFIGS[name])
        loaded = load_model(name, device="cpu", batch=8, seq=16, config=config, seed=0)
    elif ":" in name:  # a factory: batch and sequence length are its own
        loaded = load_model(name, device="cpu", seed=0)
    else:
        loaded = load_model(name, device="cpu", batch=8, seq=16, seed=0)
    target, loss_fn = target_and_loss(loaded)
    return loaded.model, loaded.example_inputs, dict(loaded.example_kwargs), target, loss_fn


def _plan(
    name: str,
    schedule: str,
    pp: int = 2,
    micro_batches: int = 4,
    *,
    mesh: str | None = None,
    device: Any = "cpu",
    stages_per_rank: int | None = None,
    precision: str = "model",
    recompute: str = "auto",
    reshard_after_forward: bool = False,
) -> Plan:
    model, args, kwargs, _, _ = _setup(name)
    dtype = as_precision(precision).compute_dtype
    with traced_as_computed(dtype, model, args, kwargs) as (cargs, ckwargs):  # as it computes
        traced = autopart.trace(model, cargs, ckwargs)
        batch = int(tree_flatten((args, kwargs))[0][0].shape[0])
        return plan_graph(
            autopart.annotate(traced),
            batch=batch,
            mesh=mesh or f"pp={pp}",
            device=device,
            stages_per_rank=stages_per_rank,
            micro_batches=micro_batches,
            schedule=schedule,
            name=name,
            precision=precision,
            recompute=recompute,
            reshard_after_forward=reshard_after_forward,
        )


def _golden_plan(case: str) -> Plan:
    """The checked-in plan, so the golden sources pin code generation, not the solver."""
    path = GOLDEN / case / "plan.json"
    if UPDATE or not path.exists():
        model, schedule, mesh = GOLDEN_CASES[case]
        device = FAST_LINK if "tp" in mesh else "cpu"
        return _plan(model, schedule, mesh=mesh, device=device)
    return Plan.from_json(path.read_text())


def _emit(name: str, plan: Plan, out: Path, **extra: Any) -> Path:
    model, args, kwargs, target, loss_fn = _setup(name)
    return autopart.emit(
        plan,
        out,
        model=model,
        example_inputs=args,
        example_kwargs=kwargs,
        target=target,
        loss_fn=loss_fn,
        **extra,
    )


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_generated_sources_match_the_golden_files(tmp_path: Path, case: str) -> None:
    model, _, mesh = GOLDEN_CASES[case]
    if model.startswith("hf:"):
        import transformers

        if transformers.__version__ != locked_version("transformers") and not UPDATE:
            pytest.skip(
                f"the golden {case} was traced with transformers {locked_version('transformers')} (the "
                f"lock), not {transformers.__version__}; emitting it fresh is checked elsewhere"
            )
    out = _emit(model, _golden_plan(case), tmp_path / case)
    golden = GOLDEN / case
    if UPDATE:
        golden.mkdir(parents=True, exist_ok=True)
        for file in SOURCES:
            (golden / file).write_bytes((out / file).read_bytes())
    copied = {"run.py": TEMPLATE} | ({"collectives.py": COLLECTIVES} if "tp" in mesh else {})
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted([*SOURCES, *copied, "weights.pt", "data.pt"])
    for file in SOURCES:
        assert (out / file).read_text() == (golden / file).read_text(), (
            f"{case}/{file} differs from tests/golden/emit/{case}/{file}; if the change is "
            "intended, rerun with AUTOPART_UPDATE_GOLDEN=1 and review the diff"
        )
    for file, template in copied.items():
        assert (out / file).read_bytes() == template.read_bytes()  # copied verbatim


def test_emitting_twice_writes_identical_bytes(tmp_path: Path) -> None:
    plan = _golden_plan("gpt2-tiny")
    first = _emit("gpt2-tiny", plan, tmp_path / "a")
    second = _emit("gpt2-tiny", plan, tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for file in names:
        assert (first / file).read_bytes() == (second / file).read_bytes(), file
    for file in names:
        text = (first / file).read_bytes()
        assert b"/work/" not in text and str(Path.home()).encode() not in text, file
        assert not re.search(rb"at 0x[0-9a-f]{6,}", text), file


def test_the_emitted_program_never_imports_autopart() -> None:
    files = [TEMPLATE, COLLECTIVES, *GOLDEN.glob("*/*.py")]
    assert len(files) == 2 + 3 * len(GOLDEN_CASES)  # run.py, collectives.py; loss and 2 stages
    for file in files:
        assert not re.search(r"^\s*(import|from)\s+autopart\b", file.read_text(), re.M), file


def test_the_templates_schedule_tables_are_the_planners() -> None:
    from autopart.codegen.templates import run
    from autopart.planning.schedule import SPLIT_BACKWARD, ScheduleKind

    assert set(run.SCHEDULES) == {k.value for k in ScheduleKind}
    assert set(run.SPLIT_BACKWARD) == {k.value for k in SPLIT_BACKWARD}


class _SendsWhatItScales(nn.Module):
    """A stage that sends a value on and also scales it by a weight (a U-Net's skip beside its
    next layer): the scaling saves the value for the weight's gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.linear(x))
        return h, h * self.scale


def test_split_backward_stages_send_copies_of_outputs_autograd_saved() -> None:
    """torch's split backward detaches a stage's outputs in place after the input gradients; an
    output that autograd saved for a weight gradient must be a copy of what is sent."""
    from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight

    from autopart.codegen.templates.run import contiguous_outputs, copied_outputs

    def split_backward(hook: Any) -> None:
        stage = _SendsWhatItScales()
        stage.register_forward_hook(hook)
        x = torch.randn(2, 4, requires_grad=True)
        outs = list(stage(x))
        grads = [torch.ones_like(t) for t in outs]
        _, groups = stage_backward_input(outs, grads, [x], stage.parameters())
        stage_backward_weight(stage.parameters(), groups)
        assert stage.scale.grad is not None and stage.linear.weight.grad is not None

    with pytest.raises(RuntimeError, match="detached in-place"):
        split_backward(contiguous_outputs)
    split_backward(copied_outputs)


# -- the emitted stages against the model, in one process ----------------------------------------


def _import(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_stages(out: Path) -> tuple[list[nn.Module], Any, dict[str, Any]]:
    config = json.loads((out / "config.json").read_text())
    weights = torch.load(out / "weights.pt", weights_only=True)
    tag = re.sub(r"\W", "_", str(out))
    stages = []
    for k in range(len(config["stage_ranks"])):
        module = _import(out / f"stage_{k}.py", f"{tag}_stage_{k}")
        stage = getattr(module, f"Stage{k}")("cpu")
        stage.load_state_dict({n: weights[n] for n in stage.state_dict()})
        stages.append(stage)
    return stages, _import(out / "loss.py", f"{tag}_loss"), config


def _check_against_model(
    out: Path,
    model: nn.Module,
    flat_inputs: list[Any],
    target: Any,
    loss_fn: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> None:
    """One micro-batch through the emitted stages: the model's loss and every gradient."""
    stages, loss_module, config = _load_stages(out)
    m = config["micro_batches"]
    size = target.shape[0] // m

    def first(x: Any) -> Any:
        return x[:size] if isinstance(x, torch.Tensor) and x.dim() > 0 else x

    values: tuple[Any, ...] = tuple(first(x) for x in flat_inputs)
    for stage in stages:
        values = stage(*values)
    loss = loss_module.pipeline_loss(values, target[:size])
    loss.backward()
    model = copy.deepcopy(model)
    expected = loss_fn(
        model(*(first(a) for a in args), **{k: first(v) for k, v in kwargs.items()}), target[:size]
    )
    expected.backward()
    torch.testing.assert_close(loss, expected)
    grads: dict[str, torch.Tensor] = {}
    for stage in stages:
        for n, p in stage.named_parameters():
            grads[n] = grads[n] + p.grad if n in grads else p.grad
    model_params = dict(model.named_parameters())
    assert set(grads) == set(model_params)
    for n, g in grads.items():
        torch.testing.assert_close(g, model_params[n].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "pp"),
    [
        ("llama-tiny", 4),  # RoPE tables passed through stages that do not read them
        ("hf:llama", 2),  # rotary embeddings under no_grad: a higher-order op's subgraph
        ("tests.models:two_in_two_out", 2),  # two inputs, a tuple of two outputs
        ("tests.models:keyword_inputs", 2),  # inputs by keyword
        ("tests.models:logits_and_aux", 2),  # a 0-dim auxiliary loss beside the logits
        ("tests.models:dict_with_none", 2),  # a dict with a 0-dim mean and a None field
    ],
)
def test_emitted_stages_compute_the_models_loss_and_gradients(
    tmp_path: Path, name: str, pp: int
) -> None:
    model, args, kwargs, target, loss_fn = _setup(name)
    out = _emit(name, _plan(name, "gpipe", pp), tmp_path)
    if pp == 4:
        assert "Passed through unchanged" in (out / "stage_2.py").read_text()
    traced = autopart.trace(model, args, kwargs)
    if any(isinstance(m, torch.fx.GraphModule) for m in traced.children()):
        # a higher-order op's body (HF LLaMA's rotary embedding up to transformers 5.23)
        assert "class Subgraph_" in "".join(p.read_text() for p in out.glob("stage_*.py"))
    flat = tree_flatten((args, kwargs))[0]
    _check_against_model(out, model, flat, target, loss_fn, args, kwargs)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(self.norm(x)))


class _FxModel(nn.Module):
    def __init__(self, attention: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.attn is not None:
            x = self.attn(x, x, x)[0]
        return x


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((output - target) ** 2).mean()


def _fx_program(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> _Program:
    gm = autopart.annotate(autopart.trace(model, (x,), method="fx"))
    plan = plan_graph(gm, batch=8, mesh="pp=2", device="cpu", micro_batches=1, schedule="gpipe")
    stages = split_stages(gm, plan)
    infos = tuple(stage_info(s) for s in stages)
    metas = value_metas(gm, [x])  # one micro-batch: the whole batch
    return _Program(
        plan=plan,
        stages=tuple(stages),
        infos=infos,
        inputs=(x,),
        target=target,
        loss_fn=_mse,
        steps=1,
        lr=0.1,
        io={i.index: stage_io(metas, None, i) for i in infos},
        layout=StateLayout.of(model, gm, stages),
    )


def test_fx_graphs_emit_torch_nn_modules_whole(tmp_path: Path) -> None:
    model = _FxModel()
    x, target = torch.randn(8, 4, 16), torch.randn(8, 4, 16)
    program = _fx_program(model, x, target)
    assert any(n.op == "call_module" for s in program.stages for n in s.graph.nodes)
    state = {n: t for s in program.stages for n, t in s.state_dict().items()}
    _write(program, tmp_path, state)
    assert "torch.nn.Linear(in_features=16, out_features=16, bias=True)" in "".join(
        p.read_text() for p in tmp_path.glob("stage_*.py")
    )
    _check_against_model(tmp_path, model, [x], target, _mse, (x,), {})


def test_fx_modules_without_a_source_form_are_a_clear_error(tmp_path: Path) -> None:
    model = _FxModel(attention=True)
    x = torch.randn(8, 4, 16)
    program = _fx_program(model, x, torch.randn(8, 4, 16))
    with pytest.raises(EmitError, match=r"MultiheadAttention.*torch\.export"):
        _write(program, tmp_path, {})


# -- errors ---------------------------------------------------------------------------------------


def _helper(t: torch.Tensor) -> torch.Tensor:
    return t * 2


def _uses_a_helper(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _mse(_helper(output), target)


def test_bad_requests_are_clear_errors(tmp_path: Path) -> None:
    plan = _golden_plan("mlp")
    model, args, _, target, loss_fn = _setup("mlp")
    with pytest.raises(EmitError, match=r"needs model, example_inputs.*ParallelProgram"):
        autopart.emit(plan, tmp_path, target=target, loss_fn=loss_fn)
    scale = torch.ones(1)

    def closure(output: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        return ((output - tgt) * scale).pow(2).mean()

    for bad, message in [
        (lambda o, t: (o - t).pow(2).mean(), "lambda"),
        (closure, r"closure over 'scale'.*module level"),
        (_uses_a_helper, r"_helper.*only torch"),
    ]:
        with pytest.raises(EmitError, match=message):
            autopart.emit(
                plan, tmp_path, model=model, example_inputs=args, target=target, loss_fn=bad
            )
    with pytest.raises(EmitError, match=r"target must be a tensor with the batch's 8 samples"):
        autopart.emit(
            plan, tmp_path, model=model, example_inputs=args, target=target[:3], loss_fn=loss_fn
        )
    assert not (tmp_path / "run.py").exists()  # nothing is written before everything is known


# -- torchrun --------------------------------------------------------------------------------------


def _reference(
    name: str, micro_batches: int, steps: int, lr: float
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The unpartitioned model trained on the same micro-batches (gradient accumulation): the
    losses, and its state dict afterwards."""
    model, args, kwargs, target, loss_fn = _setup(name)
    assert not kwargs
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    chunks = [torch.chunk(t, micro_batches) for t in (*args, target)]
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        total = 0.0
        for i in range(micro_batches):
            *xs, tgt = (c[i] for c in chunks)
            loss = loss_fn(model(*xs), tgt)
            (loss / micro_batches).backward()
            total += float(loss.detach())
        optimizer.step()
        losses.append(total / micro_batches)
    return losses, model.state_dict()


def _torchrun(
    out: Path, *args: str, shadow: Path, ranks: int = 2
) -> subprocess.CompletedProcess[str]:
    # A package named autopart that cannot be imported comes first on the path: the program
    # must run on torch alone.
    (shadow / "autopart").mkdir(parents=True, exist_ok=True)
    (shadow / "autopart" / "__init__.py").write_text(
        "raise ImportError('the emitted program imported autopart')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(shadow)}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            "run.py",
            *args,
        ],
        cwd=out,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _train_emitted(
    out: Path, tmp_path: Path, ranks: int = 2
) -> tuple[list[float], dict[str, torch.Tensor], str]:
    """Run the emitted program in ``out`` for 2 steps under torchrun: its losses, its
    ``--save-weights`` state dict and what it printed."""
    done = _torchrun(
        out,
        "--steps",
        "2",
        "--losses-out",
        "losses.json",
        "--save-weights",
        "trained.pt",
        shadow=tmp_path / "shadow",
        ranks=ranks,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    losses = json.loads((out / "losses.json").read_text())
    return losses, torch.load(out / "trained.pt", weights_only=True), done.stdout


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("name", "schedule"),
    [
        ("gpt2-tiny", "1f1b"),  # the embedding is tied to the output layer across the two ranks
        pytest.param("llama-tiny", "interleaved", marks=pytest.mark.slow),  # 2 stages a rank
        # a V: the tied embedding's two stages (the first and the last) both on rank 0
        ("tests.models:tied_deep", "zbv"),
        # BatchNorm's running statistics and batch counts, written on both stages
        ("tests.models:batchnorm_cnn", "1f1b"),
        # y += h, relu_, div_, copy_ into slices, a running mean in a buffer
        ("tests.models:inplace_residual", "gpipe"),
    ],
)
def test_torchrun_trains_like_the_unpartitioned_model(
    tmp_path: Path, name: str, schedule: str
) -> None:
    plan = (
        _golden_plan(name)
        if name in GOLDEN_CASES
        else _plan(name, schedule, stages_per_rank=2 if schedule == "interleaved" else None)
    )
    assert plan.schedule == schedule and plan.micro_batches == 4
    out = _emit(name, plan, tmp_path / "program", lr=0.1)
    losses, trained, printed = _train_emitted(out, tmp_path)
    assert "step 2/2  loss" in printed
    want_losses, want_state = _reference(name, plan.micro_batches, 2, lr=0.1)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    assert list(trained) == list(want_state)  # the model's state dict: its keys, in its order
    for n, t in trained.items():
        torch.testing.assert_close(t, want_state[n], rtol=1e-5, atol=1e-6)
    _setup(name)[0].load_state_dict(trained)  # strict: the tied lm_head.weight included


@pytest.mark.distributed
@pytest.mark.timeout(900)  # torchrun of a 4-rank program, per case
@pytest.mark.parametrize(
    ("name", "mesh", "schedule"),
    [
        # TP shards of every block, the tied embedding's shards summed across the two stages
        ("hf:gpt2", "pp=2,tp=2", "1f1b"),
        # two DDP replicas of a pipeline, each on half the batch
        ("gpt2-tiny", "dp=2,pp=2", "gpipe"),
        # GQA attention split by heads on two TP ranks, two replicas, no pipeline
        pytest.param("hf:llama", "dp=2,tp=2", "gpipe", marks=pytest.mark.slow),
        # FSDP2 replicas of a pipeline, the tied embedding's shards summed across the stages,
        # every layer recomputed (torch.utils.checkpoint in the emitted stage code) and
        # resharded after its forward
        ("gpt2-tiny", "fsdp=2,pp=2", "gpipe"),
        # the same under a zero-bubble schedule (weight gradients apart, FSDP2 reducing them at
        # the step's end; the first and last stage, tied embedding and head, on one rank)
        ("gpt2-tiny", "fsdp=2,pp=2", "zbv"),
    ],
)
def test_torchrun_trains_dp_and_tp_meshes_like_the_unpartitioned_model(
    tmp_path: Path, name: str, mesh: str, schedule: str
) -> None:
    fsdp_gpipe = "fsdp" in mesh and schedule == "gpipe"
    recompute = "full" if fsdp_gpipe else "none"
    plan = _plan(
        name,
        schedule,
        micro_batches=2,
        mesh=mesh,
        device=FAST_LINK,
        recompute=recompute,
        reshard_after_forward=fsdp_gpipe,
    )
    assert bool(plan.recompute) == (recompute == "full")
    assert plan.reshard_after_forward == fsdp_gpipe
    sizes = {"dp": 1, "fsdp": 1, "tp": 1, **plan.mesh}
    if sizes["tp"] > 1:
        assert plan.tp is not None and {"col", "row"} <= set(plan.tp.sharding.values())
    out = _emit(name, plan, tmp_path / "program", lr=0.1)
    replicas = sizes["dp"] * sizes["fsdp"]
    world = replicas * sizes["pp"] * sizes["tp"]
    if sizes["tp"] > 1:
        assert (out / "collectives.py").exists()
        stage = (out / "stage_0.py").read_text()
        assert "import collectives" in stage and "SHARDED" in stage
    for r in plan.recompute:  # the blocks the plan recomputes, as the runtime runs them
        code = (out / f"stage_{r.stage}.py").read_text()
        assert "torch.utils.checkpoint.checkpoint(" in code and "use_reentrant = False" in code
    if sizes["fsdp"] > 1:  # each layer its own module, an FSDP unit, as the runtime shards them
        assert any("fsdp_unit = True" in p.read_text() for p in out.glob("stage_*.py"))
    config = json.loads((out / "config.json").read_text())
    assert config.get("reshard_after_forward", False) == fsdp_gpipe
    losses, trained, _ = _train_emitted(out, tmp_path, ranks=world)
    want_losses, want_state = _reference(name, replicas * plan.micro_batches, 2, lr=0.1)
    assert losses == pytest.approx(want_losses, rel=1e-5)
    # Whole tensors: the model's state dict, its keys in its order (tied aliases included, HF
    # LLaMA's non-persistent rotary buffers not)
    assert list(trained) == list(want_state)
    for n, t in trained.items():
        torch.testing.assert_close(t, want_state[n], rtol=1e-5, atol=1e-6)
    _setup(name)[0].load_state_dict(trained)  # strict


@pytest.mark.distributed
def test_torchrun_trains_bf16_mixed_like_one_process_under_the_policy(tmp_path: Path) -> None:
    """An emitted bf16-mixed program (FSDP2's MixedPrecisionPolicy, two FSDP replicas) against one
    process under the same policy (tests/distributed/test_mixed_precision.py), rtol 1e-5: FSDP
    runs the same bfloat16 operations on the same micro-batches. Its layers recompute
    selectively (torch's selective checkpointing, from the checkpointing.py written beside the
    stages), which rebuilds the same values."""
    from tests.distributed.test_mixed_precision import mixed_reference

    plan = _plan(
        "hf:llama",
        "gpipe",
        micro_batches=2,
        mesh="fsdp=2",
        device=FAST_LINK,
        precision="bf16-mixed",
        recompute="selective",
    )
    assert plan.recompute and all(r.selective for r in plan.recompute)
    out = _emit("hf:llama", plan, tmp_path / "program", lr=0.1)
    config = json.loads((out / "config.json").read_text())
    assert config["precision"] == "bf16-mixed" and config["mesh"]["fsdp"] == 2
    code = (out / "stage_0.py").read_text()
    assert "from checkpointing import checkpoint_saving_matmuls" in code
    assert "fsdp_unit = True" in code  # the layers FSDP units
    assert (out / "checkpointing.py").exists()
    losses, trained, _ = _train_emitted(out, tmp_path)
    want = mixed_reference("hf:llama", "sgd", 2 * plan.micro_batches, setup=_setup)
    assert losses == pytest.approx(want["losses"], rel=1e-5)
    for n, p in want["params"].items():
        assert trained[n].dtype == torch.float32  # the masters
        torch.testing.assert_close(trained[n], p, rtol=1e-5, atol=1e-6, msg=n)


def test_run_py_outside_torchrun_says_how_to_launch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = _emit(
        "tests.models:two_in_two_out", _plan("tests.models:two_in_two_out", "gpipe"), tmp_path
    )
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = _import(out / "run.py", "emitted_run")
    with pytest.raises(
        SystemExit, match=r"WORLD_SIZE is not set.*torchrun --nproc-per-node 2 run\.py"
    ):
        run.main([])


# -- emit(program) on the ranks of a running program ----------------------------------------------


def _program_worker(rank: int, world: int, store: str, out: str, name: str, mesh: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model, args, _, target, loss_fn = _setup(name)
        program = autopart.compile(
            model,
            mesh,
            example_inputs=args,
            loss_fn=loss_fn,
            micro_batches=2,
            schedule="1f1b",
            device=FAST_LINK if "tp" in mesh else None,
        )
        params = list(program.parameters())  # stage 1 of two_in_two_out has none
        optimizer = torch.optim.SGD(params, lr=0.1) if params else None
        program.step(*args, target=target)
        if optimizer is not None:
            optimizer.step()
        written = autopart.emit(program, Path(out) / "program", target=target, steps=3)
        assert (written / "run.py").exists()  # on every rank, once rank 0 has written
        state = program.full_state_dict()
        if rank == 0:
            torch.save(state, Path(out) / "state.pt")
        dist.barrier()  # no rank tears its group down while a peer still talks to it
    finally:
        dist.destroy_process_group()
    end_rank()


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("name", "mesh"),
    [
        ("tests.models:two_in_two_out", "pp=2"),
        ("hf:gpt2", "tp=2"),  # each rank holds shards: emit joins them into whole weights
    ],
)
def test_emit_of_a_program_gathers_the_trained_weights(
    tmp_path: Path, name: str, mesh: str
) -> None:
    args = (2, str(tmp_path / "store"), str(tmp_path), name, mesh)
    spawn_ranks(_program_worker, args, 2, timeout_s=180, what="the program's ranks")
    out = tmp_path / "program"
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    weights = torch.load(out / "weights.pt", weights_only=True)
    config = json.loads((out / "config.json").read_text())
    assert list(config["state_dict"]) == list(state)  # the model's keys -> the tensor holding each
    for n, t in state.items():
        # the trained weights, not the initial ones
        assert torch.equal(weights[config["state_dict"][n]], t), n
    assert config["steps"] == 3
    # The same sources as emitting the program's plan from the model.
    plan = Plan.from_json((out / "plan.json").read_text())
    again = _emit(name, plan, tmp_path / "again", steps=3)
    files = sorted(f.name for f in out.iterdir() if f.suffix in (".py", ".json"))
    assert files == sorted(f.name for f in again.iterdir() if f.suffix in (".py", ".json"))
    for file in files:
        assert (out / file).read_text() == (again / file).read_text(), file


# -- CLI ------------------------------------------------------------------------------------------


def test_cli_emit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from autopart.cli.main import main

    out = tmp_path / "prog"
    code = main(
        [
            "emit",
            "gpt2-tiny",
            "--mesh",
            "pp=2",
            "--out",
            str(out),
            "--batch",
            "4",
            "--seq",
            "8",
            "--micro-batches",
            "2",
            "--schedule",
            "gpipe",
            "--format",
            "json",
        ]
    )
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "torchrun --nproc-per-node 2 run.py"
    assert doc["plan"]["micro_batches"] == 2 and doc["plan"]["schedule"] == "gpipe"
    assert set(doc["files"]) == {*SOURCES, "run.py", "weights.pt", "data.pt"}
    config = json.loads((out / "config.json").read_text())
    assert config["inputs"] == [{"shape": [4, 8], "dtype": "torch.int64"}]
    assert config["mesh"] == {"dp": 1, "pp": 2, "tp": 1}
    both = tmp_path / "both"
    args = ["--batch", "4", "--seq", "8", "--micro-batches", "2", "--format", "json"]
    assert main(["emit", "gpt2-tiny", "--mesh", "dp=2,pp=2", "--out", str(both), *args]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "torchrun --nproc-per-node 4 run.py"
    assert json.loads((both / "config.json").read_text())["mesh"] == {"dp": 2, "pp": 2, "tp": 1}
    assert main(["emit", "gpt2-tiny", "--mesh", "pp=2,xp=2", "--out", str(out)]) == 2
    assert "xp" in capsys.readouterr().err
