"""Pipeline stage 0 of 2 of gpt2-tiny, written by autopart.emit; runs on rank 0.

Modules: transformer, transformer.wte, transformer.wpe, transformer.h.0
Nodes: 26 (arange ... add_2)
Inputs (the model's inputs): input_ids
Outputs (to stage 1): add_2
Parameters: 14 tensors, 74,560 elements
Tied: transformer.wte.weight is also on stage(s) 1; run.py sums the copies' gradients.
"""

from __future__ import annotations

import torch

PARAMETERS: dict[str, tuple[list[int], torch.dtype]] = {
    "transformer.wpe.weight": ([128, 64], torch.float32),
    "transformer.h.0.ln_1.weight": ([64], torch.float32),
    "transformer.h.0.ln_1.bias": ([64], torch.float32),
    "transformer.h.0.attn.c_attn.weight": ([192, 64], torch.float32),
    "transformer.h.0.attn.c_attn.bias": ([192], torch.float32),
    "transformer.h.0.attn.c_proj.weight": ([64, 64], torch.float32),
    "transformer.h.0.attn.c_proj.bias": ([64], torch.float32),
    "transformer.h.0.ln_2.weight": ([64], torch.float32),
    "transformer.h.0.ln_2.bias": ([64], torch.float32),
    "transformer.h.0.mlp.c_fc.weight": ([256, 64], torch.float32),
    "transformer.h.0.mlp.c_fc.bias": ([256], torch.float32),
    "transformer.h.0.mlp.c_proj.weight": ([64, 256], torch.float32),
    "transformer.h.0.mlp.c_proj.bias": ([64], torch.float32),
    "transformer.wte.weight": ([256, 64], torch.float32),
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

    def forward(self, input_ids):
        transformer_wpe_weight = self.transformer.wpe.weight
        transformer_h_0_ln_1_weight = getattr(self.transformer.h, "0").ln_1.weight
        transformer_h_0_ln_1_bias = getattr(self.transformer.h, "0").ln_1.bias
        transformer_h_0_attn_c_attn_weight = getattr(self.transformer.h, "0").attn.c_attn.weight
        transformer_h_0_attn_c_attn_bias = getattr(self.transformer.h, "0").attn.c_attn.bias
        transformer_h_0_attn_c_proj_weight = getattr(self.transformer.h, "0").attn.c_proj.weight
        transformer_h_0_attn_c_proj_bias = getattr(self.transformer.h, "0").attn.c_proj.bias
        transformer_h_0_ln_2_weight = getattr(self.transformer.h, "0").ln_2.weight
        transformer_h_0_ln_2_bias = getattr(self.transformer.h, "0").ln_2.bias
        transformer_h_0_mlp_c_fc_weight = getattr(self.transformer.h, "0").mlp.c_fc.weight
        transformer_h_0_mlp_c_fc_bias = getattr(self.transformer.h, "0").mlp.c_fc.bias
        transformer_h_0_mlp_c_proj_weight = getattr(self.transformer.h, "0").mlp.c_proj.weight
        transformer_h_0_mlp_c_proj_bias = getattr(self.transformer.h, "0").mlp.c_proj.bias
        lm_head_weight = self.transformer.wte.weight
        embedding = torch.ops.aten.embedding.default(lm_head_weight, input_ids);  lm_head_weight = input_ids = None
        arange = torch.ops.aten.arange.default(16, device = self.device, pin_memory = False)
        embedding_1 = torch.ops.aten.embedding.default(transformer_wpe_weight, arange);  transformer_wpe_weight = arange = None
        add = torch.ops.aten.add.Tensor(embedding, embedding_1);  embedding = embedding_1 = None
        layer_norm = torch.ops.aten.layer_norm.default(add, [64], transformer_h_0_ln_1_weight, transformer_h_0_ln_1_bias, 1e-05, False);  transformer_h_0_ln_1_weight = transformer_h_0_ln_1_bias = None
        linear = torch.ops.aten.linear.default(layer_norm, transformer_h_0_attn_c_attn_weight, transformer_h_0_attn_c_attn_bias);  layer_norm = transformer_h_0_attn_c_attn_weight = transformer_h_0_attn_c_attn_bias = None
        chunk = torch.ops.aten.chunk.default(linear, 3, -1);  linear = None
        getitem = chunk[0]
        getitem_1 = chunk[1]
        getitem_2 = chunk[2];  chunk = None
        unflatten = torch.ops.aten.unflatten.int(getitem, -1, [4, -1]);  getitem = None
        transpose = torch.ops.aten.transpose.int(unflatten, 1, 2);  unflatten = None
        unflatten_1 = torch.ops.aten.unflatten.int(getitem_1, -1, [4, -1]);  getitem_1 = None
        transpose_1 = torch.ops.aten.transpose.int(unflatten_1, 1, 2);  unflatten_1 = None
        unflatten_2 = torch.ops.aten.unflatten.int(getitem_2, -1, [4, -1]);  getitem_2 = None
        transpose_2 = torch.ops.aten.transpose.int(unflatten_2, 1, 2);  unflatten_2 = None
        scaled_dot_product_attention = torch.ops.aten.scaled_dot_product_attention.default(transpose, transpose_1, transpose_2, None, 0.0, True);  transpose = transpose_1 = transpose_2 = None
        transpose_3 = torch.ops.aten.transpose.int(scaled_dot_product_attention, 1, 2);  scaled_dot_product_attention = None
        flatten = torch.ops.aten.flatten.using_ints(transpose_3, 2);  transpose_3 = None
        linear_1 = torch.ops.aten.linear.default(flatten, transformer_h_0_attn_c_proj_weight, transformer_h_0_attn_c_proj_bias);  flatten = transformer_h_0_attn_c_proj_weight = transformer_h_0_attn_c_proj_bias = None
        add_1 = torch.ops.aten.add.Tensor(add, linear_1);  add = linear_1 = None
        layer_norm_1 = torch.ops.aten.layer_norm.default(add_1, [64], transformer_h_0_ln_2_weight, transformer_h_0_ln_2_bias, 1e-05, False);  transformer_h_0_ln_2_weight = transformer_h_0_ln_2_bias = None
        linear_2 = torch.ops.aten.linear.default(layer_norm_1, transformer_h_0_mlp_c_fc_weight, transformer_h_0_mlp_c_fc_bias);  layer_norm_1 = transformer_h_0_mlp_c_fc_weight = transformer_h_0_mlp_c_fc_bias = None
        gelu = torch.ops.aten.gelu.default(linear_2, approximate = 'tanh');  linear_2 = None
        linear_3 = torch.ops.aten.linear.default(gelu, transformer_h_0_mlp_c_proj_weight, transformer_h_0_mlp_c_proj_bias);  gelu = transformer_h_0_mlp_c_proj_weight = transformer_h_0_mlp_c_proj_bias = None
        add_2 = torch.ops.aten.add.Tensor(add_1, linear_3);  add_1 = linear_3 = None
        return (add_2,)


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
