"""Pipeline stage 1 of 2 of hf:gpt2, written by autopart.emit; runs on pipeline rank 1 of every
tp=2 coordinate.

Modules: transformer.h.0, transformer.h.1, transformer.ln_f, transformer, lm_head
Nodes: 54 (mul ... linear)
Inputs (from stage 0): add_4, view_9, add_5
Outputs (the model's outputs, flattened): linear
Parameters: 17 tensors, 99,328 elements
Tensor parallel: each of the 2 TP ranks of this stage runs this code on its own shard of the 8
tensors in SHARDED (1/2 each; run.py cuts them from the whole weights with collectives.shard)
and the whole of the others; collectives.py's tp_* functions join the pieces over the TP group
(tp_group).
Tied: transformer.wte.weight is also on stage(s) 0; run.py sums the copies' gradients.
"""

from __future__ import annotations

import torch

import collectives

TP_DEGREE = 2
# Shapes as one TP rank holds them: its shard of each tensor in SHARDED
PARAMETERS: dict[str, tuple[list[int], torch.dtype]] = {
    "transformer.h.0.mlp.c_proj.weight": ([128, 64], torch.float32),
    "transformer.h.0.mlp.c_proj.bias": ([64], torch.float32),
    "transformer.h.1.ln_1.weight": ([64], torch.float32),
    "transformer.h.1.ln_1.bias": ([64], torch.float32),
    "transformer.h.1.attn.c_attn.weight": ([64, 96], torch.float32),
    "transformer.h.1.attn.c_attn.bias": ([96], torch.float32),
    "transformer.h.1.attn.c_proj.weight": ([32, 64], torch.float32),
    "transformer.h.1.attn.c_proj.bias": ([64], torch.float32),
    "transformer.h.1.ln_2.weight": ([64], torch.float32),
    "transformer.h.1.ln_2.bias": ([64], torch.float32),
    "transformer.h.1.mlp.c_fc.weight": ([64, 128], torch.float32),
    "transformer.h.1.mlp.c_fc.bias": ([128], torch.float32),
    "transformer.h.1.mlp.c_proj.weight": ([128, 64], torch.float32),
    "transformer.h.1.mlp.c_proj.bias": ([64], torch.float32),
    "transformer.ln_f.weight": ([64], torch.float32),
    "transformer.ln_f.bias": ([64], torch.float32),
    "transformer.wte.weight": ([512, 32], torch.float32),
}
BUFFERS: dict[str, tuple[list[int], torch.dtype]] = {}
# Split across the TP ranks: (dimension, interleaved groups) -> collectives.shard
SHARDED: dict[str, tuple[int, int]] = {
    "transformer.h.0.mlp.c_proj.weight": (0, 1),
    "transformer.h.1.attn.c_attn.weight": (1, 3),
    "transformer.h.1.attn.c_attn.bias": (0, 3),
    "transformer.h.1.attn.c_proj.weight": (0, 1),
    "transformer.h.1.mlp.c_fc.weight": (1, 1),
    "transformer.h.1.mlp.c_fc.bias": (0, 1),
    "transformer.h.1.mlp.c_proj.weight": (0, 1),
    "transformer.wte.weight": (1, 1),
}


class Stage1(torch.nn.Module):
    """Stage 1: parameters and buffers under the model's own names; forward is the traced code."""

    def __init__(self, device: torch.device | str = "cpu", tp_rank: int = 0, tp_group: str = "") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.tp_rank = tp_rank  # this rank's place in its TP group
        self.tp_group = tp_group  # the group's name, for the collectives
        for name, (shape, dtype) in PARAMETERS.items():
            param = torch.empty(shape, dtype=dtype, device=self.device)
            _register(self, name, torch.nn.Parameter(param))
        for name, (shape, dtype) in BUFFERS.items():
            _register(self, name, torch.empty(shape, dtype=dtype, device=self.device))

    def forward(self, add_4, view_9, add_5):
        transformer_h_0_mlp_c_proj_weight = getattr(self.transformer.h, "0").mlp.c_proj.weight
        transformer_h_0_mlp_c_proj_bias = getattr(self.transformer.h, "0").mlp.c_proj.bias
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
        mul = torch.ops.aten.mul.Tensor(view_9, 0.5);  view_9 = None
        mul_2 = torch.ops.aten.mul.Tensor(add_5, 0.7978845608028654);  add_5 = None
        tanh = torch.ops.aten.tanh.default(mul_2);  mul_2 = None
        add_6 = torch.ops.aten.add.Tensor(tanh, 1.0);  tanh = None
        mul_3 = torch.ops.aten.mul.Tensor(mul, add_6);  mul = add_6 = None
        view_10 = torch.ops.aten.view.default(mul_3, [32, 128]);  mul_3 = None
        addmm_3_product = torch.ops.aten.mm.default(view_10, transformer_h_0_mlp_c_proj_weight);  view_10 = transformer_h_0_mlp_c_proj_weight = None
        addmm_3 = collectives.tp_partial_bias(addmm_3_product, transformer_h_0_mlp_c_proj_bias, self.tp_rank == 0);  addmm_3_product = transformer_h_0_mlp_c_proj_bias = None
        view_11 = torch.ops.aten.view.default(addmm_3, [2, 16, 64]);  addmm_3 = None
        view_11_all_reduce = collectives.tp_all_reduce(view_11, self.tp_group, False);  view_11 = None
        dropout_2 = torch.ops.aten.dropout.default(view_11_all_reduce, 0.0, True);  view_11_all_reduce = None
        dropout_2_slice = collectives.tp_slice(dropout_2, 2, 1, 2, self.tp_rank, self.tp_group);  dropout_2 = None
        add_7 = torch.ops.aten.add.Tensor(add_4, dropout_2_slice);  add_4 = dropout_2_slice = None
        add_7_all_gather = collectives.tp_all_gather(add_7, 2, 1, 2, self.tp_rank, self.tp_group, False)
        layer_norm_2 = torch.ops.aten.layer_norm.default(add_7_all_gather, [64], transformer_h_1_ln_1_weight, transformer_h_1_ln_1_bias, 1e-05, False);  add_7_all_gather = transformer_h_1_ln_1_weight = transformer_h_1_ln_1_bias = None
        view_12 = torch.ops.aten.view.default(layer_norm_2, [-1, 64]);  layer_norm_2 = None
        view_12_copy = collectives.tp_copy(view_12, self.tp_group);  view_12 = None
        addmm_4 = torch.ops.aten.addmm.default(transformer_h_1_attn_c_attn_bias, view_12_copy, transformer_h_1_attn_c_attn_weight);  transformer_h_1_attn_c_attn_bias = view_12_copy = transformer_h_1_attn_c_attn_weight = None
        view_13 = torch.ops.aten.view.default(addmm_4, [2, 16, 96]);  addmm_4 = None
        split_1 = torch.ops.aten.split.Tensor(view_13, 32, 2);  view_13 = None
        getitem_3 = split_1[0]
        getitem_4 = split_1[1]
        getitem_5 = split_1[2];  split_1 = None
        view_14 = torch.ops.aten.view.default(getitem_4, [2, 16, 2, 16]);  getitem_4 = None
        transpose_4 = torch.ops.aten.transpose.int(view_14, 1, 2);  view_14 = None
        view_15 = torch.ops.aten.view.default(getitem_5, [2, 16, 2, 16]);  getitem_5 = None
        transpose_5 = torch.ops.aten.transpose.int(view_15, 1, 2);  view_15 = None
        view_16 = torch.ops.aten.view.default(getitem_3, [2, 16, 2, 16]);  getitem_3 = None
        transpose_6 = torch.ops.aten.transpose.int(view_16, 1, 2);  view_16 = None
        arange_3 = torch.ops.aten.arange.default(16, device = self.device, pin_memory = False)
        add_2 = torch.ops.aten.add.Tensor(arange_3, 0);  arange_3 = None
        unsqueeze_7 = torch.ops.aten.unsqueeze.default(add_2, 0);  add_2 = None
        unsqueeze_8 = torch.ops.aten.unsqueeze.default(unsqueeze_7, 1);  unsqueeze_7 = None
        unsqueeze_9 = torch.ops.aten.unsqueeze.default(unsqueeze_8, 3);  unsqueeze_8 = None
        new_ones = torch.ops.aten.new_ones.default(unsqueeze_9, [], dtype = torch.bool, pin_memory = False)
        arange = torch.ops.aten.arange.default(16, device = self.device, pin_memory = False)
        add = torch.ops.aten.add.Tensor(arange, 0);  arange = None
        unsqueeze = torch.ops.aten.unsqueeze.default(add, 0);  add = None
        expand = torch.ops.aten.expand.default(unsqueeze, [2, -1])
        slice_1 = torch.ops.aten.slice.Tensor(expand, 1, 0, 1)
        sub = torch.ops.aten.sub.Tensor(slice_1, 1);  slice_1 = None
        diff = torch.ops.aten.diff.default(expand, 1, -1, sub);  expand = sub = None
        ne = torch.ops.aten.ne.Scalar(diff, 1);  diff = None
        cumsum = torch.ops.aten.cumsum.default(ne, -1);  ne = None
        arange_1 = torch.ops.aten.arange.default(2, device = self.device, pin_memory = False)
        unsqueeze_1 = torch.ops.aten.unsqueeze.default(arange_1, 1);  arange_1 = None
        unsqueeze_2 = torch.ops.aten.unsqueeze.default(unsqueeze_1, 2);  unsqueeze_1 = None
        unsqueeze_3 = torch.ops.aten.unsqueeze.default(unsqueeze_2, 3);  unsqueeze_2 = None
        index = torch.ops.aten.index.Tensor(cumsum, [unsqueeze_3, unsqueeze_9])
        arange_4 = torch.ops.aten.arange.default(16, device = self.device, pin_memory = False)
        add_3 = torch.ops.aten.add.Tensor(arange_4, 0);  arange_4 = None
        unsqueeze_10 = torch.ops.aten.unsqueeze.default(add_3, 0);  add_3 = None
        unsqueeze_11 = torch.ops.aten.unsqueeze.default(unsqueeze_10, 1);  unsqueeze_10 = None
        unsqueeze_12 = torch.ops.aten.unsqueeze.default(unsqueeze_11, 2);  unsqueeze_11 = None
        index_1 = torch.ops.aten.index.Tensor(cumsum, [unsqueeze_3, unsqueeze_12]);  cumsum = None
        eq = torch.ops.aten.eq.Tensor(index, index_1);  index = index_1 = None
        to_1 = torch.ops.aten.to.dtype_layout(eq, dtype = torch.bool, layout = torch.strided, device = self.device);  eq = None
        and_1 = torch.ops.aten.__and__.Tensor(new_ones, to_1);  new_ones = to_1 = None
        expand_1 = torch.ops.aten.expand.default(unsqueeze, [2, -1]);  unsqueeze = None
        index_3 = torch.ops.aten.index.Tensor(expand_1, [unsqueeze_3, unsqueeze_12]);  unsqueeze_12 = None
        index_2 = torch.ops.aten.index.Tensor(expand_1, [unsqueeze_3, unsqueeze_9]);  expand_1 = unsqueeze_3 = unsqueeze_9 = None
        le = torch.ops.aten.le.Tensor(index_3, index_2);  index_3 = index_2 = None
        to_2 = torch.ops.aten.to.dtype_layout(le, dtype = torch.bool, layout = torch.strided, device = self.device);  le = None
        and_2 = torch.ops.aten.__and__.Tensor(and_1, to_2);  and_1 = to_2 = None
        expand_2 = torch.ops.aten.expand.default(and_2, [2, -1, 16, 16]);  and_2 = None
        scaled_dot_product_attention_1 = torch.ops.aten.scaled_dot_product_attention.default(transpose_6, transpose_4, transpose_5, expand_2, scale = 0.25);  transpose_6 = transpose_4 = transpose_5 = expand_2 = None
        reshape_2 = torch.ops.aten.reshape.default(scaled_dot_product_attention_1, [2, 2, 16, 16]);  scaled_dot_product_attention_1 = None
        transpose_7 = torch.ops.aten.transpose.int(reshape_2, 1, 2);  reshape_2 = None
        reshape_3 = torch.ops.aten.reshape.default(transpose_7, [2, 16, 32]);  transpose_7 = None
        view_17 = torch.ops.aten.view.default(reshape_3, [32, 32]);  reshape_3 = None
        addmm_5_product = torch.ops.aten.mm.default(view_17, transformer_h_1_attn_c_proj_weight);  view_17 = transformer_h_1_attn_c_proj_weight = None
        addmm_5 = collectives.tp_partial_bias(addmm_5_product, transformer_h_1_attn_c_proj_bias, self.tp_rank == 0);  addmm_5_product = transformer_h_1_attn_c_proj_bias = None
        view_18 = torch.ops.aten.view.default(addmm_5, [2, 16, 64]);  addmm_5 = None
        view_18_all_reduce = collectives.tp_all_reduce(view_18, self.tp_group, False);  view_18 = None
        dropout_3 = torch.ops.aten.dropout.default(view_18_all_reduce, 0.0, True);  view_18_all_reduce = None
        dropout_3_slice = collectives.tp_slice(dropout_3, 2, 1, 2, self.tp_rank, self.tp_group);  dropout_3 = None
        add_8 = torch.ops.aten.add.Tensor(dropout_3_slice, add_7);  dropout_3_slice = add_7 = None
        add_8_all_gather = collectives.tp_all_gather(add_8, 2, 1, 2, self.tp_rank, self.tp_group, False)
        layer_norm_3 = torch.ops.aten.layer_norm.default(add_8_all_gather, [64], transformer_h_1_ln_2_weight, transformer_h_1_ln_2_bias, 1e-05, False);  add_8_all_gather = transformer_h_1_ln_2_weight = transformer_h_1_ln_2_bias = None
        view_19 = torch.ops.aten.view.default(layer_norm_3, [-1, 64]);  layer_norm_3 = None
        view_19_copy = collectives.tp_copy(view_19, self.tp_group);  view_19 = None
        addmm_6 = torch.ops.aten.addmm.default(transformer_h_1_mlp_c_fc_bias, view_19_copy, transformer_h_1_mlp_c_fc_weight);  transformer_h_1_mlp_c_fc_bias = view_19_copy = transformer_h_1_mlp_c_fc_weight = None
        view_20 = torch.ops.aten.view.default(addmm_6, [2, 16, 128]);  addmm_6 = None
        mul_4 = torch.ops.aten.mul.Tensor(view_20, 0.5)
        pow_2 = torch.ops.aten.pow.Tensor_Scalar(view_20, 3.0)
        mul_5 = torch.ops.aten.mul.Tensor(pow_2, 0.044715);  pow_2 = None
        add_9 = torch.ops.aten.add.Tensor(view_20, mul_5);  view_20 = mul_5 = None
        mul_6 = torch.ops.aten.mul.Tensor(add_9, 0.7978845608028654);  add_9 = None
        tanh_1 = torch.ops.aten.tanh.default(mul_6);  mul_6 = None
        add_10 = torch.ops.aten.add.Tensor(tanh_1, 1.0);  tanh_1 = None
        mul_7 = torch.ops.aten.mul.Tensor(mul_4, add_10);  mul_4 = add_10 = None
        view_21 = torch.ops.aten.view.default(mul_7, [32, 128]);  mul_7 = None
        addmm_7_product = torch.ops.aten.mm.default(view_21, transformer_h_1_mlp_c_proj_weight);  view_21 = transformer_h_1_mlp_c_proj_weight = None
        addmm_7 = collectives.tp_partial_bias(addmm_7_product, transformer_h_1_mlp_c_proj_bias, self.tp_rank == 0);  addmm_7_product = transformer_h_1_mlp_c_proj_bias = None
        addmm_7_all_reduce = collectives.tp_all_reduce(addmm_7, self.tp_group, False);  addmm_7 = None
        view_22 = torch.ops.aten.view.default(addmm_7_all_reduce, [2, 16, 64]);  addmm_7_all_reduce = None
        view_22_slice = collectives.tp_slice(view_22, 2, 1, 2, self.tp_rank, self.tp_group);  view_22 = None
        dropout_4 = torch.ops.aten.dropout.default(view_22_slice, 0.0, True);  view_22_slice = None
        add_11 = torch.ops.aten.add.Tensor(add_8, dropout_4);  add_8 = dropout_4 = None
        add_11_all_gather = collectives.tp_all_gather(add_11, 2, 1, 2, self.tp_rank, self.tp_group, False);  add_11 = None
        layer_norm_4 = torch.ops.aten.layer_norm.default(add_11_all_gather, [64], transformer_ln_f_weight, transformer_ln_f_bias, 1e-05, False);  add_11_all_gather = transformer_ln_f_weight = transformer_ln_f_bias = None
        view_23 = torch.ops.aten.view.default(layer_norm_4, [-1, 16, 64]);  layer_norm_4 = None
        alias = torch.ops.aten.alias.default(view_23);  view_23 = None
        alias_slice = collectives.tp_slice(alias, 2, 1, 2, self.tp_rank, self.tp_group);  alias = None
        linear = torch.ops.aten.linear.default(alias_slice, lm_head_weight);  alias_slice = lm_head_weight = None
        linear_all_reduce = collectives.tp_all_reduce(linear, self.tp_group, False);  linear = None
        return (linear_all_reduce,)


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
