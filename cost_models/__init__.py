"""Cost models: device specs, compute (roofline), communication (alpha-beta) and memory.

Every number carries its unit in its name (``_s``, ``_bytes``, ``_flops``, ``_per_s``); every
constant and formula cites its source in the module that defines it.
"""

from __future__ import annotations

from autopart.cost_models.comm import (
    all_gather_time_s,
    all_reduce_time_s,
    all_to_all_time_s,
    p2p_time_s,
    reduce_scatter_time_s,
)
from autopart.cost_models.compute import ComputeModel, node_time_s
from autopart.cost_models.devices import DEVICES, DeviceSpec, get_device
from autopart.cost_models.memory import (
    MemoryBreakdown,
    NodeSet,
    Optimizer,
    ParamSize,
    activation_bytes,
    memory_of,
    node_costs,
    param_table,
)
from autopart.cost_models.node_cost import NodeCost

__all__ = [
    "DEVICES",
    "ComputeModel",
    "DeviceSpec",
    "MemoryBreakdown",
    "NodeCost",
    "NodeSet",
    "Optimizer",
    "ParamSize",
    "activation_bytes",
    "all_gather_time_s",
    "all_reduce_time_s",
    "all_to_all_time_s",
    "get_device",
    "memory_of",
    "node_costs",
    "node_time_s",
    "p2p_time_s",
    "param_table",
    "reduce_scatter_time_s",
]
