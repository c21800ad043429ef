"""Pipeline stage 0 of 2 of mlp, written by autopart.emit; runs on rank 0.

Modules: layers.0, layers.1, layers.2, layers.3
Nodes: 8 (linear ... gelu_3)
Inputs (the model's inputs): x
Outputs (to stage 1): gelu_3
Parameters: 8 tensors, 4,198,400 elements
"""

from __future__ import annotations

import torch

PARAMETERS: dict[str, tuple[list[int], torch.dtype]] = {
    "layers.0.weight": ([1024, 1024], torch.float32),
    "layers.0.bias": ([1024], torch.float32),
    "layers.1.weight": ([1024, 1024], torch.float32),
    "layers.1.bias": ([1024], torch.float32),
    "layers.2.weight": ([1024, 1024], torch.float32),
    "layers.2.bias": ([1024], torch.float32),
    "layers.3.weight": ([1024, 1024], torch.float32),
    "layers.3.bias": ([1024], torch.float32),
}
BUFFERS: dict[str, tuple[list[int], torch.dtype]] = {}


class Stage0(torch.nn.Module):
    """Stage 0: parameters and buffers under the model's own names; forward is the traced code."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        for name, (shape, dtype) in PARAMETERS.items():
            param = torch.empty(shape, dtype=dtype, device=self.device)
            _register(self, name, torch.nn.Parameter(param))
        for name, (shape, dtype) in BUFFERS.items():
            _register(self, name, torch.empty(shape, dtype=dtype, device=self.device))

    def forward(self, x):
        layers_0_weight = getattr(self.layers, "0").weight
        layers_0_bias = getattr(self.layers, "0").bias
        layers_1_weight = getattr(self.layers, "1").weight
        layers_1_bias = getattr(self.layers, "1").bias
        layers_2_weight = getattr(self.layers, "2").weight
        layers_2_bias = getattr(self.layers, "2").bias
        layers_3_weight = getattr(self.layers, "3").weight
        layers_3_bias = getattr(self.layers, "3").bias
        linear = torch.ops.aten.linear.default(x, layers_0_weight, layers_0_bias);  x = layers_0_weight = layers_0_bias = None
        gelu = torch.ops.aten.gelu.default(linear);  linear = None
        linear_1 = torch.ops.aten.linear.default(gelu, layers_1_weight, layers_1_bias);  gelu = layers_1_weight = layers_1_bias = None
        gelu_1 = torch.ops.aten.gelu.default(linear_1);  linear_1 = None
        linear_2 = torch.ops.aten.linear.default(gelu_1, layers_2_weight, layers_2_bias);  gelu_1 = layers_2_weight = layers_2_bias = None
        gelu_2 = torch.ops.aten.gelu.default(linear_2);  linear_2 = None
        linear_3 = torch.ops.aten.linear.default(gelu_2, layers_3_weight, layers_3_bias);  gelu_2 = layers_3_weight = layers_3_bias = None
        gelu_3 = torch.ops.aten.gelu.default(linear_3);  linear_3 = None
        return (gelu_3,)


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
