"""Pipeline stage 1 of 2 of gpt2-tiny, written by autopart.emit; runs on rank 1.

Modules: transformer.h.1, transformer.ln_f, lm_head
Nodes: 24 (layer_norm_2 ... linear_8)
Inputs (from stage 0): add_2
Outputs (the model's outputs, flattened): linear_8
Parameters: 15 tensors, 66,496 elements
Tied: transformer.wte.weight is also on stage(s) 0; run.py sums the copies' gradients.
"""

from __future__ import annotations

import torch

PARAMETERS: dict[str, tuple[list[int], torch.dtype]] = {
    "transformer.h.1.ln_1.weight": ([64], torch.float32),
    "transformer.h.1.ln_1.bias": ([64], torch.float32),
    "transformer.h.1.attn.c_attn.weight": ([192, 64], torch.float32),
    "transformer.h.1.attn.c_attn.bias": ([192], torch.float32),
    "transformer.h.1.attn.c_proj.weight": ([64, 64], torch.float32),
    "transformer.h.1.attn.c_proj.bias": ([64], torch.float32),
    "transformer.h.1.ln_2.weight": ([64], torch.float32),
    "transformer.h.1.ln_2.bias": ([64], torch.float32),
    "transformer.h.1.mlp.c_fc.weight": ([256, 64], torch.float32),
    "transformer.h.1.mlp.c_fc.bias": ([256], torch.float32),
    "transformer.h.1.mlp.c_proj.weight": ([64, 256], torch.float32),
    "transformer.h.1.mlp.c_proj.bias": ([64], torch.float32),
    "transformer.ln_f.weight": ([64], torch.float32),
    "transformer.ln_f.bias": ([64], torch.float32),
    "transformer.wte.weight": ([256, 64], torch.float32),
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

    def forward(self, add_2):
        transformer_h_1_ln_1_weight = getattr(self.transformer.h, "1").ln_1.weight
        transformer_h_1_ln_1_bias = getattr(self.transformer.h, "1").ln_1.bias
        transformer_h_1_attn_c_attn_weight = getattr(self.transformer.h, "1").attn.c_attn.weight
        transformer_h_1_attn_c_attn_bias = getattr(self.transformer.h, "1").attn.c_attn.bias
        transformer_h_1_attn_c_proj_weight = getattr(self.transformer.h, "1").attn.c_proj.weight
        transformer_h_1_attn_c_proj_bias = getattr(self.transformer.h, "1").attn.c_proj.bias
        transformer_h_1_ln_2_weight = getattr(self.transformer.h, "1").ln_2.weight
        transformer_h_1_ln_2_bias = getattr(self.transformer.h, "1").ln_2.bias
        transformer_h_1_mlp_c_fc_weight = getattr(self.transformer.h, "1").mlp.c_fc.weight
        transformer_h_1_mlp_c_fc_bias = getattr(self.transformer.h, "1").mlp.c_fc.bias
        transformer_h_1_mlp_c_proj_weight = getattr(self.transformer.h, "1").mlp.c_proj.weight
        transformer_h_1_mlp_c_proj_bias = getattr(self.transformer.h, "1").mlp.c_proj.bias
        transformer_ln_f_weight = self.transformer.ln_f.weight
        transformer_ln_f_bias = self.transformer.ln_f.bias
        lm_head_weight = self.transformer.wte.weight
        layer_norm_2 = torch.ops.aten.layer_norm.default(add_2, [64], transformer_h_1_ln_1_weight, transformer_h_1_ln_1_bias, 1e-05, False);  transformer_h_1_ln_1_weight = transformer_h_1_ln_1_bias = None
        linear_4 = torch.ops.aten.linear.default(layer_norm_2, transformer_h_1_attn_c_attn_weight, transformer_h_1_attn_c_attn_bias);  layer_norm_2 = transformer_h_1_attn_c_attn_weight = transformer_h_1_attn_c_attn_bias = None
        chunk_1 = torch.ops.aten.chunk.default(linear_4, 3, -1);  linear_4 = None
        getitem_3 = chunk_1[0]
        getitem_4 = chunk_1[1]
        getitem_5 = chunk_1[2];  chunk_1 = None
        unflatten_3 = torch.ops.aten.unflatten.int(getitem_3, -1, [4, -1]);  getitem_3 = None
        transpose_4 = torch.ops.aten.transpose.int(unflatten_3, 1, 2);  unflatten_3 = None
        unflatten_4 = torch.ops.aten.unflatten.int(getitem_4, -1, [4, -1]);  getitem_4 = None
        transpose_5 = torch.ops.aten.transpose.int(unflatten_4, 1, 2);  unflatten_4 = None
        unflatten_5 = torch.ops.aten.unflatten.int(getitem_5, -1, [4, -1]);  getitem_5 = None
        transpose_6 = torch.ops.aten.transpose.int(unflatten_5, 1, 2);  unflatten_5 = None
        scaled_dot_product_attention_1 = torch.ops.aten.scaled_dot_product_attention.default(transpose_4, transpose_5, transpose_6, None, 0.0, True);  transpose_4 = transpose_5 = transpose_6 = None
        transpose_7 = torch.ops.aten.transpose.int(scaled_dot_product_attention_1, 1, 2);  scaled_dot_product_attention_1 = None
        flatten_1 = torch.ops.aten.flatten.using_ints(transpose_7, 2);  transpose_7 = None
        linear_5 = torch.ops.aten.linear.default(flatten_1, transformer_h_1_attn_c_proj_weight, transformer_h_1_attn_c_proj_bias);  flatten_1 = transformer_h_1_attn_c_proj_weight = transformer_h_1_attn_c_proj_bias = None
        add_3 = torch.ops.aten.add.Tensor(add_2, linear_5);  add_2 = linear_5 = None
        layer_norm_3 = torch.ops.aten.layer_norm.default(add_3, [64], transformer_h_1_ln_2_weight, transformer_h_1_ln_2_bias, 1e-05, False);  transformer_h_1_ln_2_weight = transformer_h_1_ln_2_bias = None
        linear_6 = torch.ops.aten.linear.default(layer_norm_3, transformer_h_1_mlp_c_fc_weight, transformer_h_1_mlp_c_fc_bias);  layer_norm_3 = transformer_h_1_mlp_c_fc_weight = transformer_h_1_mlp_c_fc_bias = None
        gelu_1 = torch.ops.aten.gelu.default(linear_6, approximate = 'tanh');  linear_6 = None
        linear_7 = torch.ops.aten.linear.default(gelu_1, transformer_h_1_mlp_c_proj_weight, transformer_h_1_mlp_c_proj_bias);  gelu_1 = transformer_h_1_mlp_c_proj_weight = transformer_h_1_mlp_c_proj_bias = None
        add_4 = torch.ops.aten.add.Tensor(add_3, linear_7);  add_3 = linear_7 = None
        layer_norm_4 = torch.ops.aten.layer_norm.default(add_4, [64], transformer_ln_f_weight, transformer_ln_f_bias, 1e-05, False);  add_4 = transformer_ln_f_weight = transformer_ln_f_bias = None
        linear_8 = torch.ops.aten.linear.default(layer_norm_4, lm_head_weight);  layer_norm_4 = lm_head_weight = None
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
