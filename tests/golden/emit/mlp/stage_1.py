"""Pipeline stage 1 of 2 of mlp, written by autopart.emit; runs on rank 1.

Modules: layers.4, layers.5, layers.6, layers.7, head
Nodes: 9 (linear_4 ... linear_8)
Inputs (from stage 0): gelu_3
Outputs (the model's outputs, flattened): linear_8
Parameters: 10 tensors, 4,208,650 elements
"""

from __future__ import annotations

import torch

PARAMETERS: dict[str, tuple[list[int], torch.dtype]] = {
    "layers.4.weight": ([1024, 1024], torch.float32),
    "layers.4.bias": ([1024], torch.float32),
    "layers.5.weight": ([1024, 1024], torch.float32),
    "layers.5.bias": ([1024], torch.float32),
    "layers.6.weight": ([1024, 1024], torch.float32),
    "layers.6.bias": ([1024], torch.float32),
    "layers.7.weight": ([1024, 1024], torch.float32),
    "layers.7.bias": ([1024], torch.float32),
    "head.weight": ([10, 1024], torch.float32),
    "head.bias": ([10], torch.float32),
}
BUFFERS: dict[str, tuple[list[int], torch.dtype]] = {}


class Stage1(torch.nn.Module):
    """Stage 1: parameters and buffers under the model's own names; forward is the traced code."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        for name, (shape, dtype) in PARAMETERS.items():
            param = torch.empty(shape, dtype=dtype, device=self.device)
            _register(self, name, torch.nn.Parameter(param))
        for name, (shape, dtype) in BUFFERS.items():
            _register(self, name, torch.empty(shape, dtype=dtype, device=self.device))

    def forward(self, gelu_3):
        layers_4_weight = getattr(self.layers, "4").weight
        layers_4_bias = getattr(self.layers, "4").bias
        layers_5_weight = getattr(self.layers, "5").weight
        layers_5_bias = getattr(self.layers, "5").bias
        layers_6_weight = getattr(self.layers, "6").weight
        layers_6_bias = getattr(self.layers, "6").bias
        layers_7_weight = getattr(self.layers, "7").weight
        layers_7_bias = getattr(self.layers, "7").bias
        head_weight = self.head.weight
        head_bias = self.head.bias
        linear_4 = torch.ops.aten.linear.default(gelu_3, layers_4_weight, layers_4_bias);  gelu_3 = layers_4_weight = layers_4_bias = None
        gelu_4 = torch.ops.aten.gelu.default(linear_4);  linear_4 = None
        linear_5 = torch.ops.aten.linear.default(gelu_4, layers_5_weight, layers_5_bias);  gelu_4 = layers_5_weight = layers_5_bias = None
        gelu_5 = torch.ops.aten.gelu.default(linear_5);  linear_5 = None
        linear_6 = torch.ops.aten.linear.default(gelu_5, layers_6_weight, layers_6_bias);  gelu_5 = layers_6_weight = layers_6_bias = None
        gelu_6 = torch.ops.aten.gelu.default(linear_6);  linear_6 = None
        linear_7 = torch.ops.aten.linear.default(gelu_6, layers_7_weight, layers_7_bias);  gelu_6 = layers_7_weight = layers_7_bias = None
        gelu_7 = torch.ops.aten.gelu.default(linear_7);  linear_7 = None
        linear_8 = torch.ops.aten.linear.default(gelu_7, head_weight, head_bias);  gelu_7 = head_weight = head_bias = None
        return (linear_8,)


def _register(root: torch.nn.Module, name: str, value: torch.Tensor | torch.nn.Module) -> None:
    """Register ``value`` as ``root``'s dotted ``name`` (e.g. ``layers.0.weight``), creating the
    modules on the way, so ``state_dict()`` keys are the model's own names."""
    *path, leaf = name.split(".")
    module = root
    for part in path:
        if part not in module._modules:
            module.add_module(part, torch.nn.Module())
        module = module.get_submodule(part)
    if isinstance(value, torch.nn.Parameter):
        module.register_parameter(leaf, value)
    elif isinstance(value, torch.nn.Module):
        module.add_module(leaf, value)
    else:
        module.register_buffer(leaf, value)
