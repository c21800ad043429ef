"""autopart: trace a PyTorch model, cost it, and partition it across devices.

Public surface (see the README): ``trace`` captures a model as an FX graph, ``annotate`` writes each
node's cost, ``load_model`` resolves MODEL strings (zoo names, ``hf:...``, ``file.py:factory``).
"""

from typing import Any

from autopart.capture.tracing import trace
from autopart.errors import AutopartError, ModelSpecError, TraceError, UnknownDeviceError
from autopart.models.model_spec import LoadedModel, load_model
from autopart.passes.annotate import annotate, graph_totals, node_cost
from autopart.planning.planner import plan
from autopart.planning.plans import Plan
from autopart.planning.request import PlanRequest

__all__ = [
    "AutopartError",
    "LoadedModel",
    "ModelSpecError",
    "ParallelProgram",
    "Plan",
    "PlanRequest",
    "TraceError",
    "UnknownDeviceError",
    "annotate",
    "compile",
    "emit",
    "graph_totals",
    "load_model",
    "node_cost",
    "plan",
    "trace",
]
__version__ = "0.1.0"

# The runtime and code generator import torch.distributed.pipelining (about 2 s); planning and the
# CLI's inspect/plan do not need them, so they load on first use.
_LAZY = {
    "compile": "autopart.runtime.program",
    "ParallelProgram": "autopart.runtime.program",
    "emit": "autopart.codegen.emitter",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autopart' has no attribute {name!r}")
