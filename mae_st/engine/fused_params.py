"""Packing every transformer block of a model into two flat parameters, for DeepSpeed's sake.

The packed block itself is a model layer (mae_st.models.layers.PackedBlock): it computes the Block's math on views
into its flat tensors and names its state dict as the Block does, so `state_dict()`, `load_state_dict()`, exports,
resumes and tools/visualize.py see the usual names. This module decides what goes where: the optimizer's weight-decay
rule sorts each block's parameters into the decayed and the undecayed flat tensor, so weight decay and layer decay
apply to every element as before. Pretrained weights (`--finetune`) are loaded before packing (they would load
after it too).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from mae_st.models.layers import FUSED_DECAY, FUSED_NO_DECAY, Block, PackedBlock, to_block_names

__all__ = ["FUSED_DECAY", "FUSED_NO_DECAY", "fuse_block_parameters", "to_block_names"]


def fuse_block_parameters(model: nn.Module, decays: Callable[[str, nn.Parameter], bool]) -> int:
    """Replaces every Block of `model` by a PackedBlock holding its values; `decays(full_name, param)` (the
    optimizer's rule, mae_st.engine.optim.weight_decay_rule) sorts its parameters into the weight-decayed and the
    undecayed flat tensor. Call it before building the optimizer. Returns the number of blocks packed."""
    found = [(name, block) for name, block in model.named_modules() if isinstance(block, Block)]
    for name, block in found:
        parent_name, _, child = name.rpartition(".")
        decayed = {key for key, param in block.named_parameters() if decays(f"{name}.{key}", param)}
        setattr(model.get_submodule(parent_name) if parent_name else model, child, PackedBlock(block, decayed))
    return len(found)
