"""Packing every transformer block of a model into two flat parameters, for DeepSpeed's sake; under ZeRO-3 each
block stack's blocks into two.

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

from mae_st.models.layers import (FUSED_DECAY, FUSED_NO_DECAY, Block, BlockStack, PackedBlock, pack_block_stack,
                                  to_block_names)

__all__ = ["FUSED_DECAY", "FUSED_NO_DECAY", "fuse_block_parameters", "pack_block_stacks", "to_block_names"]


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


def pack_block_stacks(model: nn.Module) -> int:
    """After `fuse_block_parameters`: every BlockStack of packed blocks (the encoder's, the MAE decoder's) takes
    its blocks' flat tensors as two of its own (mae_st.models.layers.pack_block_stack). What the ZeRO-3 engine
    trains: DeepSpeed's host work per parameter tensor each step (gradient hooks and buckets, norms, partitioning)
    then runs for 2 tensors a stack instead of 2 a block. Returns the number of stacks packed."""
    stacks = [m for m in model.modules() if isinstance(m, BlockStack) and len(m) and
              all(isinstance(b, PackedBlock) for b in m)]
    for stack in stacks:
        pack_block_stack(stack)
    return len(stacks)
