"""Each transformer block's parameters packed into two flat tensors, for DeepSpeed's sake.

DeepSpeed's engines do Python work per parameter tensor every step: gradient hooks, ZeRO-3's partition and
gradient bookkeeping, the bf16 optimizer's master copies. A ViT block has 16 parameter tensors (q, k, v, proj,
two norms, two MLP layers; weights and biases), so ViT-H's 36 blocks bring ~580 of them; at MAE-ST's few visible
tokens per step that bookkeeping, not the math, sets the step time (docs/performance.md). Packing each block into
one weight-decayed and one undecayed flat parameter takes the ViT-H MAE from 595 tensors to 91 without touching
the math.

The layers keep their attributes: before each call of the block, `weight`/`bias` of its Linear and LayerNorm
layers are bound to views into the (by then gathered) flat tensors, through one `split` whose backward is a
single concatenation of the gradients. After the call the views are dropped again, so a released ZeRO-3
partition is not kept alive by them.

Weights leave the engine under their usual names: `unfuse_state_dict` splits the flat tensors back, so exports
load anywhere. Pretrained weights (`--finetune`) are loaded before packing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn as nn

from mae_st.models.layers import Block

FUSED_DECAY = "fused_decay"  # parameter names on each packed block
FUSED_NO_DECAY = "fused_no_decay"


@dataclass(frozen=True)
class _Slot:
    """One original parameter inside a flat tensor."""

    owner: nn.Module  # the layer whose attribute it is
    attr: str  # "weight" or "bias"
    name: str  # its name relative to the block, e.g. "attn.q.weight"
    shape: torch.Size

    @property
    def numel(self) -> int:
        return self.shape.numel()


class _PackedBlock:
    """What a packed block needs at call time: its slots per flat tensor and its unpacked forward."""

    def __init__(self, block: nn.Module, slots: Dict[str, List[_Slot]]):
        self.block = block
        self.slots = slots
        self.forward = block.forward

    def __call__(self, *args, **kwargs):
        self.bind()
        try:
            return self.forward(*args, **kwargs)
        finally:
            self.unbind()

    def bind(self) -> None:
        for flat_name, slots in self.slots.items():
            pieces = getattr(self.block, flat_name).split([slot.numel for slot in slots])
            for slot, piece in zip(slots, pieces):
                setattr(slot.owner, slot.attr, piece.view(slot.shape))

    def unbind(self) -> None:
        for slots in self.slots.values():
            for slot in slots:
                setattr(slot.owner, slot.attr, None)


def fuse_block_parameters(model: nn.Module, decays: Callable[[str, nn.Parameter], bool]) -> int:
    """Packs every Block of `model` in place; `decays(full_name, param)` sorts its parameters into the weight-
    decayed and the undecayed tensor. Call it after loading weights and before building the optimizer.
    Returns the number of blocks packed."""
    packed = 0
    for block_name, block in model.named_modules():
        if not isinstance(block, Block) or is_packed(block):
            continue
        slots: Dict[str, List[_Slot]] = {FUSED_DECAY: [], FUSED_NO_DECAY: []}
        flats: Dict[str, List[torch.Tensor]] = {FUSED_DECAY: [], FUSED_NO_DECAY: []}
        for name, param in list(block.named_parameters()):
            owner_path, _, attr = name.rpartition(".")
            flat_name = FUSED_DECAY if decays(f"{block_name}.{name}", param) else FUSED_NO_DECAY
            slots[flat_name].append(_Slot(block.get_submodule(owner_path), attr, name, param.shape))
            flats[flat_name].append(param.detach().reshape(-1))
        for slot in slots[FUSED_DECAY] + slots[FUSED_NO_DECAY]:
            del slot.owner._parameters[slot.attr]
            setattr(slot.owner, slot.attr, None)
        slots = {flat_name: group for flat_name, group in slots.items() if group}
        for flat_name in slots:
            block.register_parameter(flat_name, nn.Parameter(torch.cat(flats[flat_name])))
        block.forward = _PackedBlock(block, slots)
        packed += 1
    return packed


def is_packed(block: nn.Module) -> bool:
    return isinstance(block.forward, _PackedBlock)


def _packed_blocks(model: nn.Module) -> Iterator[Tuple[str, _PackedBlock]]:
    for name, module in model.named_modules():
        if isinstance(module, Block) and is_packed(module):
            yield name, module.forward


def unfuse_state_dict(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`state` (a state dict of the packed `model`) with each flat tensor split back into the parameters it
    holds, under their original names."""
    unpacked: Dict[str, torch.Tensor] = {}
    renames: Dict[str, Dict[str, torch.Tensor]] = {}
    for block_name, packed in _packed_blocks(model):
        for flat_name, slots in packed.slots.items():
            flat = state[f"{block_name}.{flat_name}"]
            pieces = flat.split([slot.numel for slot in slots])
            renames[f"{block_name}.{flat_name}"] = {
                f"{block_name}.{slot.name}": piece.reshape(slot.shape) for slot, piece in zip(slots, pieces)}
    for key, value in state.items():
        if key in renames:
            unpacked.update(renames[key])
        else:
            unpacked[key] = value
    return unpacked
