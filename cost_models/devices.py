"""Device specifications: peak rates, capacities and links, each with its unit and its source.

Peak FLOP/s are *dense* (no 2:4 structured sparsity; NVIDIA datasheets quote sparse figures with an
asterisk, twice the dense ones). Bandwidths are per direction. Datasheet numbers are what the silicon
can do; the efficiency factors turn them into what a well-tuned kernel achieves:

- ``compute_efficiency``: large cuBLAS GEMMs reach roughly 70-80% of the dense tensor-core peak on
  H100 SXM (power-limited at 700 W, it runs below the boost clock the peak assumes; see
  https://glennklockwood.com/garden/peak-FLOPS for how peaks follow from clocks) and 80-90% on A100.
  These are estimates from published benchmarks, not measurements made for this project.
- ``memory_efficiency``: STREAM-like copy/triad kernels sustain about 90% of HBM bandwidth (about
  3.0-3.1 TB/s of 3.35 TB/s in CUDA-event-timed device-to-device copies on H100 SXM).
- ``link_efficiency`` / ``network_efficiency``: NCCL's own tuning model caps the ring bus bandwidth of
  A100 NVLink at 235 GB/s of 300 GB/s per direction (``busBw = min(busBw, 235)`` in
  https://github.com/NVIDIA/nccl/blob/master/src/graph/tuning.cc), i.e. ~78%; InfiniBand runs closer
  to line rate.
- Latencies follow the same file's ``hwLat`` table (per ring step, Simple protocol: 3.4 us NVLink,
  9.6 us network) rounded to whole microseconds.

``autopart.cost_models.profiling.calibrate`` refits ``compute_efficiency``, ``memory_efficiency`` and
``kernel_launch_s`` from measurements on the machine at hand.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from autopart.errors import AutopartError, UnknownDeviceError

__all__ = ["DEVICES", "DeviceSpec", "get_device"]

_GiB = 2**30

# The pipeline runtime's cost per action is Python on the host: the schedule's bookkeeping, the
# stage's input and output handling, posting and waiting on its sends and receives. On GPU hosts it
# is an estimate (not measured for this project: a fast host core runs this Python several times
# quicker than the shared 2-core CPU host below, where it measured 1.8-1.9 ms with gloo);
# benchmarks/device_check.sh measures it (autopart.runtime.measure).
PIPELINE_ACTION_HOST_S = 100e-6
CPU_PIPELINE_ACTION_S = 1.8e-3


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One accelerator (or CPU host) as the cost models see it."""

    name: str
    description: str
    peak_fp64_flops_per_s: float
    """Dense FP64 FLOP/s (tensor cores where the device has FP64 tensor cores)."""
    peak_fp32_flops_per_s: float
    """FP32 FLOP/s on the vector units (CUDA cores): what full-precision matmuls get by default."""
    peak_tf32_flops_per_s: float | None
    """Dense TF32 tensor-core FLOP/s; ``None`` where the device has no TF32 mode."""
    peak_bf16_flops_per_s: float
    """Dense BF16 FLOP/s (tensor cores on GPUs)."""
    peak_fp16_flops_per_s: float
    """Dense FP16 FLOP/s (tensor cores on GPUs)."""
    peak_fp8_flops_per_s: float | None
    """Dense FP8 FLOP/s; ``None`` where FP8 runs at the FP16 rate (no FP8 units)."""
    memory_bytes: int
    """Device memory capacity in bytes."""
    memory_bandwidth_bytes_per_s: float
    """Peak device-memory bandwidth in bytes/s."""
    link_bandwidth_bytes_per_s: float
    """Intra-node device-to-device bandwidth per direction in bytes/s (NVLink for GPUs)."""
    link_latency_s: float
    """Intra-node per-message latency in seconds (alpha of the Hockney model)."""
    network_bandwidth_bytes_per_s: float
    """Inter-node bandwidth per device and direction in bytes/s (one NIC per GPU)."""
    network_latency_s: float
    """Inter-node per-message latency in seconds."""
    kernel_launch_s: float
    """Fixed cost of one kernel (launch plus framework dispatch) in seconds."""
    pipeline_action_s: float
    """Fixed cost in seconds of one action (a stage's forward, backward or weight-gradient step on
    one micro-batch) of ``torch.distributed.pipelining``'s schedule beyond the stage's own kernels:
    its Python bookkeeping, posting the sends and receives, waiting on them. The simulator adds it
    to every action (:func:`autopart.planning.schedule.simulate`)."""
    compute_efficiency: float
    """Fraction of peak FLOP/s that well-shaped kernels reach (0, 1]."""
    memory_efficiency: float
    """Fraction of peak memory bandwidth that streaming kernels reach (0, 1]."""
    link_efficiency: float
    """Fraction of link bandwidth that collectives reach (0, 1]."""
    network_efficiency: float
    """Fraction of network bandwidth that collectives reach (0, 1]."""
    sources: tuple[str, ...] = ()
    """Datasheets and measurements the numbers come from."""
    split_backward_factor: float | None = None
    """How much longer a backward takes run as torch's zero-bubble schedules run it, input
    gradients (``I``) then weight gradients (``W``) in two autograd passes after a Python walk of
    the autograd graph, than in one pass (:func:`autopart.planning.mesh_plan.split_backward_factor`).
    ``None``: the same (not measured on GPUs)."""
    shared_cores: float | None = None
    """CPU hosts: the cores the simulated devices share, one rank (one thread) per core at full
    speed; more busy ranks than cores run at a share (:func:`autopart.planning.schedule.simulate`).
    ``None``: each device is its own (GPUs). The table gives the host's cores; a pipeline's spec
    (:func:`autopart.planning.mesh_plan.pipeline_device`) its share, in devices of ``tp`` ranks
    beside the other replicas."""

    def __post_init__(self) -> None:
        if not self.name:
            raise AutopartError("DeviceSpec.name must be a non-empty string, e.g. 'h100'")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str | tuple) or value is None:
                continue
            if not value > 0:
                raise AutopartError(
                    f"DeviceSpec({self.name!r}).{f.name} must be positive, got {value!r}; "
                    "give the datasheet value in the unit its name states"
                )
            if f.name.endswith("efficiency") and value > 1:
                raise AutopartError(
                    f"DeviceSpec({self.name!r}).{f.name} must be a fraction in (0, 1], got {value!r}"
                )

    def peak_flops_per_s(self, dtype: str, *, allow_tf32: bool = False) -> float:
        """Dense peak FLOP/s for arithmetic in ``dtype`` (a torch dtype name such as ``"bfloat16"``).

        ``float32`` uses the TF32 tensor-core rate only with ``allow_tf32`` (PyTorch's
        ``torch.backends.cuda.matmul.allow_tf32``, off by default). FP8 falls back to the FP16 rate
        where the device has no FP8 units. Integer, boolean and unknown dtypes use the FP32 rate:
        such nodes do index arithmetic whose FLOP counts are small or zero.
        """
        name = dtype.removeprefix("torch.")
        if name in ("float64", "double", "complex128"):
            return self.peak_fp64_flops_per_s
        if name == "bfloat16":
            return self.peak_bf16_flops_per_s
        if name in ("float16", "half"):
            return self.peak_fp16_flops_per_s
        if name.startswith("float8"):
            return self.peak_fp8_flops_per_s or self.peak_fp16_flops_per_s
        if allow_tf32 and self.peak_tf32_flops_per_s is not None and name in ("float32", "float"):
            return self.peak_tf32_flops_per_s
        return self.peak_fp32_flops_per_s


_NCCL_TUNING = "https://github.com/NVIDIA/nccl/blob/master/src/graph/tuning.cc"

# H100 SXM5 80GB. 132 SMs; 989.4 TFLOPS BF16 = 132 SMs x 4 tensor cores x 1024 FLOP/clock x 1.83 GHz.
_H100 = DeviceSpec(
    name="h100",
    description="NVIDIA H100 SXM5 80GB (HBM3, NVLink 4, InfiniBand NDR 400 Gb/s per GPU)",
    peak_fp64_flops_per_s=66.9e12,  # FP64 tensor core
    peak_fp32_flops_per_s=66.9e12,
    peak_tf32_flops_per_s=494.7e12,
    peak_bf16_flops_per_s=989.4e12,
    peak_fp16_flops_per_s=989.4e12,
    peak_fp8_flops_per_s=1979e12,
    memory_bytes=80 * _GiB,  # five 16 GiB HBM3 stacks; CUDA context and allocator take some of it
    memory_bandwidth_bytes_per_s=3.35e12,
    link_bandwidth_bytes_per_s=450e9,  # NVLink 4: 18 links, 900 GB/s total = 450 GB/s per direction
    link_latency_s=3e-6,  # NCCL hwLat NVLink ring Simple: 3.4 us per step
    network_bandwidth_bytes_per_s=50e9,  # ConnectX-7 NDR 400 Gb/s per GPU (DGX H100)
    network_latency_s=10e-6,  # NCCL hwLat network ring Simple: 9.6 us per step
    kernel_launch_s=5e-6,  # CUDA launch plus PyTorch eager dispatch
    pipeline_action_s=PIPELINE_ACTION_HOST_S,
    compute_efficiency=0.75,  # cuBLAS BF16 GEMMs reach ~700-800 of 989 TFLOPS at the 700 W limit
    memory_efficiency=0.9,  # ~3.0-3.1 TB/s sustained device-to-device copy of 3.35 TB/s
    link_efficiency=0.8,  # NCCL all-reduce bus bandwidth ~360 GB/s of 450 GB/s without NVLS
    network_efficiency=0.9,
    sources=(
        "https://resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet",
        "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper",
        "https://docs.nvidia.com/dgx/dgxh100-user-guide/introduction-to-dgxh100.html",
        _NCCL_TUNING,
    ),
)

# H200 SXM: the H100's GH100 die and clocks with 141 GB of HBM3e; compute peaks are the H100's.
_H200 = dataclasses.replace(
    _H100,
    name="h200",
    description="NVIDIA H200 SXM 141GB (HBM3e, NVLink 4, InfiniBand NDR 400 Gb/s per GPU)",
    memory_bytes=141 * _GiB,  # six 24 GiB HBM3e stacks, 141 GiB enabled
    memory_bandwidth_bytes_per_s=4.8e12,
    sources=(
        "https://www.nvidia.com/en-us/data-center/h200/",
        "https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper",
        _NCCL_TUNING,
    ),
)

_A100 = DeviceSpec(
    name="a100",
    description="NVIDIA A100 SXM4 80GB (HBM2e, NVLink 3, InfiniBand HDR 200 Gb/s per GPU)",
    peak_fp64_flops_per_s=19.5e12,  # FP64 tensor core
    peak_fp32_flops_per_s=19.5e12,
    peak_tf32_flops_per_s=156e12,
    peak_bf16_flops_per_s=312e12,
    peak_fp16_flops_per_s=312e12,
    peak_fp8_flops_per_s=None,  # Ampere has no FP8 tensor cores
    memory_bytes=80 * _GiB,
    memory_bandwidth_bytes_per_s=2.039e12,
    link_bandwidth_bytes_per_s=300e9,  # NVLink 3: 12 links, 600 GB/s total = 300 GB/s per direction
    link_latency_s=3e-6,
    network_bandwidth_bytes_per_s=25e9,  # ConnectX-6 HDR 200 Gb/s per GPU (DGX A100)
    network_latency_s=10e-6,
    kernel_launch_s=5e-6,
    pipeline_action_s=PIPELINE_ACTION_HOST_S,
    compute_efficiency=0.8,  # A100 runs closer to its (lower) peak clock than H100
    memory_efficiency=0.85,
    link_efficiency=0.78,  # NCCL caps sm_80 ring bus bandwidth at 235 of 300 GB/s
    network_efficiency=0.9,
    sources=(
        "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/"
        "nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        "https://images.nvidia.com/aem-dam/en-zz/Solutions/data-center/"
        "nvidia-ampere-architecture-whitepaper.pdf",
        "https://docs.nvidia.com/dgx/dgxa100-user-guide/introduction-to-dgxa100.html",
        _NCCL_TUNING,
    ),
)

# The development machine: a 2-vCPU KVM guest on an AMD EPYC (family 25 model 1: Zen 3 "Milan"),
# AVX2 + FMA, no AVX-512, no native BF16/FP16 arithmetic. Zen 3 has two 256-bit FMA pipes per core:
# 2 x 8 fp32 lanes x 2 FLOP = 32 FP32 FLOP/cycle (16 FP64). Assumed clock 2.45 GHz (the TSC rate,
# BogoMIPS / 2; the part may boost higher, but a shared host cannot be relied on to).
_CPU_CLOCK_HZ = 2.45e9
_CPU_CORES = 2
_CPU = DeviceSpec(
    name="cpu",
    description="This development host: 2-core AMD EPYC (Zen 3, AVX2+FMA), 24 GiB, gloo over loopback",
    peak_fp64_flops_per_s=_CPU_CORES * _CPU_CLOCK_HZ * 16,
    peak_fp32_flops_per_s=_CPU_CORES * _CPU_CLOCK_HZ * 32,  # 156.8 GFLOP/s
    peak_tf32_flops_per_s=None,
    # No AVX512_BF16/AMX: PyTorch 2.13's CPU bf16/fp16 matmuls ran at ~1 GFLOP/s here (1024^3),
    # 50-70x slower than fp32. Listed as measured rate / compute_efficiency, not a hardware peak.
    peak_bf16_flops_per_s=2.5e9,
    peak_fp16_flops_per_s=2.5e9,
    peak_fp8_flops_per_s=None,
    memory_bytes=24_684_096 * 1024,  # MemTotal of /proc/meminfo (~23.5 GiB)
    # Conservative: what 2 cores of a shared server stream. torch copy_/add on 128 MiB tensors
    # measured 16-20 GB/s here; profiling calibrates it.
    memory_bandwidth_bytes_per_s=20e9,
    # "Link" = gloo between processes on this host (TCP over loopback). A 2-rank send/recv ping-pong
    # measured 0.2-2 ms one-way for small messages (2 busy cores) and 1.5-1.9 GB/s for 16-64 MiB.
    link_bandwidth_bytes_per_s=1.5e9,
    link_latency_s=200e-6,
    network_bandwidth_bytes_per_s=1.25e9,  # 10 GbE between hosts, should anyone run CPU multi-node
    network_latency_s=50e-6,
    kernel_launch_s=4e-6,  # PyTorch eager dispatch of a tiny op measured 3.9 us
    pipeline_action_s=CPU_PIPELINE_ACTION_S,
    # torch's stage_backward_input + stage_backward_weight against one backward, the fx stages of
    # pp=2 plans (one thread, 4 samples): llama-tiny 1.21x, gpt2-tiny 1.22x, mlp 1.26x, cnn
    # 1.26x and 1.35x; the median
    split_backward_factor=1.26,
    shared_cores=_CPU_CORES,
    compute_efficiency=0.45,  # fp32 2048^3 matmul measured 52-73 GFLOP/s of 156.8
    memory_efficiency=0.9,
    link_efficiency=1.0,  # the link numbers above are already measured, not line rates
    network_efficiency=0.9,
    sources=(
        "https://en.wikichip.org/wiki/amd/microarchitectures/zen_3",
        "https://www.agner.org/optimize/microarchitecture.pdf",
        "measured on this host with torch 2.13.0+cpu: matmul, copy_, gloo send/recv",
    ),
)

DEVICES: Mapping[str, DeviceSpec] = MappingProxyType(
    {spec.name: spec for spec in (_A100, _CPU, _H100, _H200)}
)
"""Known devices by canonical name."""

_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "h100-sxm": "h100",
        "h100-sxm5": "h100",
        "h100-80gb": "h100",
        "h100-sxm-80gb": "h100",
        "h100-sxm5-80gb": "h100",
        "h200-sxm": "h200",
        "h200-141gb": "h200",
        "h200-sxm-141gb": "h200",
        "a100-80gb": "a100",
        "a100-sxm": "a100",
        "a100-sxm4": "a100",
        "a100-sxm4-80gb": "a100",
        "host": "cpu",
    }
)


def get_device(name_or_spec: str | DeviceSpec) -> DeviceSpec:
    """The spec called ``name_or_spec`` (case-insensitive, aliases such as ``"h100-sxm"`` accepted);
    a ``DeviceSpec`` is returned unchanged."""
    if isinstance(name_or_spec, DeviceSpec):
        return name_or_spec
    key = _normalize(name_or_spec)
    key = _ALIASES.get(key, key)
    if key in DEVICES:
        return DEVICES[key]
    raise UnknownDeviceError(_unknown_message(name_or_spec))


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(" ", "-")


def _unknown_message(name: str) -> str:
    candidates = [*DEVICES, *_ALIASES]
    close = difflib.get_close_matches(_normalize(name), candidates, n=1, cutoff=0.5)
    hint = f" did you mean {_ALIASES.get(close[0], close[0])!r}?" if close else ""
    known = ", ".join(sorted(DEVICES))
    return (
        f"unknown device {name!r}:{hint} Known devices: {known}. Pass one of these to --device, "
        "or build a DeviceSpec(...) for your own hardware."
    )
