"""Pipeline stage 0 of 2 of hf:gpt2, written by autopart.emit; runs on pipeline rank 0 of every
tp=2 coordinate.

Modules: transformer, transformer.wte, transformer.wpe, transformer.drop, transformer.h.0
Nodes: 76 (view ... add_5)
Inputs (the model's inputs): input_ids
Outputs (to stage 1): add_4, view_9, add_5
Parameters: 12 tensors, 70,400 elements
Tensor parallel: each of the 2 TP ranks of this stage runs this code on its own shard of the 7
tensors in SHARDED (1/2 each; run.py cuts them from the whole weights with collectives.shard)
and the whole of the others; collectives.py's tp_* functions join the pieces over the TP group
(tp_group).
Tied: transformer.wte.weight is also on stage(s) 1; run.py sums the copies' gradients.
"""

from __future__ import annotations

import torch

import collectives

TP_DEGREE = 2
# Shapes as one TP rank holds them: its shard of each tensor in SHARDED
PARAMETERS: dict[str, tuple[list[int], torch.dtype]] = {
    "transformer.wpe.weight": ([64, 32], torch.float32),
    "transformer.h.0.ln_1.weight": ([64], torch.float32),
    "transformer.h.0.ln_1.bias": ([64], torch.float32),
    "transformer.h.0.attn.c_attn.weight": ([64, 96], torch.float32),
    "transformer.h.0.attn.c_attn.bias": ([96], torch.float32),
    "transformer.h.0.attn.c_proj.weight": ([32, 64], torch.float32),
    "transformer.h.0.attn.c_proj.bias": ([64], torch.float32),
    "transformer.h.0.ln_2.weight": ([64], torch.float32),
    "transformer.h.0.ln_2.bias": ([64], torch.float32),
    "transformer.h.0.mlp.c_fc.weight": ([64, 128], torch.float32),
    "transformer.h.0.mlp.c_fc.bias": ([128], torch.float32),
    "transformer.wte.weight": ([512, 32], torch.float32),
}
BUFFERS: dict[str, tuple[list[int], torch.dtype]] = {}
# Split across the TP ranks: (dimension, interleaved groups) -> collectives.shard
SHARDED: dict[str, tuple[int, int]] = {
    "transformer.wpe.weight": (1, 1),
    "transformer.h.0.attn.c_attn.weight": (1, 3),
    "transformer.h.0.attn.c_attn.bias": (0, 3),
    "transformer.h.0.attn.c_proj.weight": (0, 1),
    "transformer.h.0.mlp.c_fc.weight": (1, 1),
    "transformer.h.0.mlp.c_fc.bias": (0, 1),
    "transformer.wte.weight": (1, 1),
}


class Stage0(torch.nn.Module):
    """Stage 0: parameters and buffers under the model's own names; forward is the traced code."""

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
        lm_head_weight = self.transformer.wte.weight
        view = torch.ops.aten.view.default(input_ids, [-1, 16]);  input_ids = None
        embedding = torch.ops.aten.embedding.default(lm_head_weight, view);  lm_head_weight = view = None
        arange = torch.ops.aten.arange.default(16, device = self.device, pin_memory = False)
        add = torch.ops.aten.add.Tensor(arange, 0);  arange = None
        unsqueeze = torch.ops.aten.unsqueeze.default(add, 0);  add = None
        embedding_1 = torch.ops.aten.embedding.default(transformer_wpe_weight, unsqueeze);  transformer_wpe_weight = None
        to = torch.ops.aten.to.dtype_layout(embedding_1, dtype = torch.float32, layout = torch.strided, device = self.device);  embedding_1 = None
        add_1 = torch.ops.aten.add.Tensor(embedding, to);  embedding = to = None
        dropout = torch.ops.aten.dropout.default(add_1, 0.0, True);  add_1 = None
        dropout_all_gather = collectives.tp_all_gather(dropout, 2, 1, 2, self.tp_rank, self.tp_group, False)
        layer_norm = torch.ops.aten.layer_norm.default(dropout_all_gather, [64], transformer_h_0_ln_1_weight, transformer_h_0_ln_1_bias, 1e-05, False);  dropout_all_gather = transformer_h_0_ln_1_weight = transformer_h_0_ln_1_bias = None
        view_1 = torch.ops.aten.view.default(layer_norm, [-1, 64]);  layer_norm = None
        view_1_copy = collectives.tp_copy(view_1, self.tp_group);  view_1 = None
        addmm = torch.ops.aten.addmm.default(transformer_h_0_attn_c_attn_bias, view_1_copy, transformer_h_0_attn_c_attn_weight);  transformer_h_0_attn_c_attn_bias = view_1_copy = transformer_h_0_attn_c_attn_weight = None
        view_2 = torch.ops.aten.view.default(addmm, [2, 16, 96]);  addmm = None
        split = torch.ops.aten.split.Tensor(view_2, 32, 2);  view_2 = None
        getitem = split[0]
        getitem_1 = split[1]
        getitem_2 = split[2];  split = None
        view_3 = torch.ops.aten.view.default(getitem_1, [2, 16, 2, 16]);  getitem_1 = None
        transpose = torch.ops.aten.transpose.int(view_3, 1, 2);  view_3 = None
        view_4 = torch.ops.aten.view.default(getitem_2, [2, 16, 2, 16]);  getitem_2 = None
        transpose_1 = torch.ops.aten.transpose.int(view_4, 1, 2);  view_4 = None
        view_5 = torch.ops.aten.view.default(getitem, [2, 16, 2, 16]);  getitem = None
        transpose_2 = torch.ops.aten.transpose.int(view_5, 1, 2);  view_5 = None
        arange_3 = torch.ops.aten.arange.default(16, device = self.device, pin_memory = False)
        add_2 = torch.ops.aten.add.Tensor(arange_3, 0);  arange_3 = None
        unsqueeze_7 = torch.ops.aten.unsqueeze.default(add_2, 0);  add_2 = None
        unsqueeze_8 = torch.ops.aten.unsqueeze.default(unsqueeze_7, 1);  unsqueeze_7 = None
        unsqueeze_9 = torch.ops.aten.unsqueeze.default(unsqueeze_8, 3);  unsqueeze_8 = None
        new_ones = torch.ops.aten.new_ones.default(unsqueeze_9, [], dtype = torch.bool, pin_memory = False)
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
        scaled_dot_product_attention = torch.ops.aten.scaled_dot_product_attention.default(transpose_2, transpose, transpose_1, expand_2, scale = 0.25);  transpose_2 = transpose = transpose_1 = expand_2 = None
        reshape = torch.ops.aten.reshape.default(scaled_dot_product_attention, [2, 2, 16, 16]);  scaled_dot_product_attention = None
        transpose_3 = torch.ops.aten.transpose.int(reshape, 1, 2);  reshape = None
        reshape_1 = torch.ops.aten.reshape.default(transpose_3, [2, 16, 32]);  transpose_3 = None
        view_6 = torch.ops.aten.view.default(reshape_1, [32, 32]);  reshape_1 = None
        addmm_1_product = torch.ops.aten.mm.default(view_6, transformer_h_0_attn_c_proj_weight);  view_6 = transformer_h_0_attn_c_proj_weight = None
        addmm_1 = collectives.tp_partial_bias(addmm_1_product, transformer_h_0_attn_c_proj_bias, self.tp_rank == 0);  addmm_1_product = transformer_h_0_attn_c_proj_bias = None
        view_7 = torch.ops.aten.view.default(addmm_1, [2, 16, 64]);  addmm_1 = None
        view_7_all_reduce = collectives.tp_all_reduce(view_7, self.tp_group, False);  view_7 = None
        dropout_1 = torch.ops.aten.dropout.default(view_7_all_reduce, 0.0, True);  view_7_all_reduce = None
        dropout_1_slice = collectives.tp_slice(dropout_1, 2, 1, 2, self.tp_rank, self.tp_group);  dropout_1 = None
        add_4 = torch.ops.aten.add.Tensor(dropout_1_slice, dropout);  dropout_1_slice = dropout = None
        add_4_all_gather = collectives.tp_all_gather(add_4, 2, 1, 2, self.tp_rank, self.tp_group, False)
        layer_norm_1 = torch.ops.aten.layer_norm.default(add_4_all_gather, [64], transformer_h_0_ln_2_weight, transformer_h_0_ln_2_bias, 1e-05, False);  add_4_all_gather = transformer_h_0_ln_2_weight = transformer_h_0_ln_2_bias = None
        view_8 = torch.ops.aten.view.default(layer_norm_1, [-1, 64]);  layer_norm_1 = None
        view_8_copy = collectives.tp_copy(view_8, self.tp_group);  view_8 = None
        addmm_2 = torch.ops.aten.addmm.default(transformer_h_0_mlp_c_fc_bias, view_8_copy, transformer_h_0_mlp_c_fc_weight);  transformer_h_0_mlp_c_fc_bias = view_8_copy = transformer_h_0_mlp_c_fc_weight = None
        view_9 = torch.ops.aten.view.default(addmm_2, [2, 16, 128]);  addmm_2 = None
        pow_1 = torch.ops.aten.pow.Tensor_Scalar(view_9, 3.0)
        mul_1 = torch.ops.aten.mul.Tensor(pow_1, 0.044715);  pow_1 = None
        add_5 = torch.ops.aten.add.Tensor(view_9, mul_1);  mul_1 = None
        return (add_4, view_9, add_5)


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
