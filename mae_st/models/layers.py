"""Building blocks shared by the MAE-ST pretraining model and the video classifier.

Module and parameter names follow facebookresearch/mae_st (`util/video_vit.py`) so its released checkpoints load
without converters. Nothing here reads a parameter's shape during forward: grid sizes are plain ints fixed at
construction, which keeps the layers correct when DeepSpeed ZeRO-3 partitions the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch.utils.checkpoint import checkpoint

GridSize = Tuple[int, int, int]  # (t, h, w) in patches

default_norm_layer = partial(nn.LayerNorm, eps=1e-6)


class PatchEmbed(nn.Module):
    """Cuts a clip (N, C, T, H, W) into t_patch_size x p x p cubes and projects each to a token: (N, t*h*w, D)."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        num_frames: int = 16,
        t_patch_size: int = 2,
    ):
        super().__init__()
        if img_size % patch_size or num_frames % t_patch_size:
            raise ValueError(
                f"clip {num_frames}x{img_size}x{img_size} is not divisible into patches of "
                f"{t_patch_size}x{patch_size}x{patch_size}; pick img_size/num_frames that are multiples"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_frames = num_frames
        self.t_patch_size = t_patch_size
        self.input_size: GridSize = (num_frames // t_patch_size, img_size // patch_size, img_size // patch_size)
        self.num_patches = math.prod(self.input_size)
        kernel = (t_patch_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, t, h, w = x.shape
        if (t, h, w) != (self.num_frames, self.img_size, self.img_size):
            raise ValueError(
                f"clip of {t}x{h}x{w} (frames x height x width) does not match the model's "
                f"{self.num_frames}x{self.img_size}x{self.img_size}; build the model with the data's "
                f"num_frames/img_size"
            )
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, t, h, w) -> (N, t*h*w, D), time-major


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections (the original's layout) on fused SDPA kernels."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_drop(self.proj(attend(self.q(x), self.k(x), self.v(x), self.num_heads)))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Scaled dot-product attention of (N, L, D) projections over `num_heads` heads, back to (N, L, D)."""
    n, length, dim = q.shape

    def heads(x: torch.Tensor) -> torch.Tensor:
        return x.view(n, length, num_heads, dim // num_heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))
    return out.transpose(1, 2).reshape(n, length, dim)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)), each branch with stochastic depth."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = default_norm_layer,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU)
        # a DeepSpeed checkpoint of a packed model (zero_to_fp32) names the flat tensors: accept those too
        self.register_load_state_dict_pre_hook(_unpack_flat_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BlockStack(nn.ModuleList):
    """Transformer blocks applied in order, as one module: under ZeRO-3 the engine gathers a whole stack at once
    (mae_st/engine/zero.py). Parameter names are those of a plain ModuleList (`blocks.0.attn.q.weight`).

    A stack of PackedBlocks can hold its blocks' flat tensors itself (`pack_block_stack`): then `block_numels`
    gives each block's share of them, and forward hands every block its views."""

    block_numels: Optional[Dict[str, List[int]]] = None  # flat tensor name -> each block's element count

    def __init__(self, blocks=None):
        super().__init__(blocks)
        # a DeepSpeed checkpoint of a stack-packed model (zero_to_fp32) names the stack's flat tensors: accept those
        self.register_load_state_dict_pre_hook(_split_stack_flat_keys)

    def forward(self, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
        """With grad_checkpointing, each block's activations are recomputed in backward instead of stored."""
        checkpointed = grad_checkpointing and torch.is_grad_enabled()
        for block, flats in zip(self, self.block_views()):
            args = (x,) if flats is None else (x, flats)
            x = checkpoint(block, *args, use_reentrant=False) if checkpointed else block(*args)
        return x

    def block_views(self) -> List[Optional[Dict[str, torch.Tensor]]]:
        """Each block's views of the stack's flat tensors (one split each: its backward is one concatenation)."""
        if self.block_numels is None:
            return [None] * len(self)
        parts = {flat: getattr(self, flat).split(numels) for flat, numels in self.block_numels.items()}
        return [{flat: pieces[i] for flat, pieces in parts.items()} for i in range(len(self))]


def make_blocks(
    depth: int,
    dim: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    norm_layer: Callable[[int], nn.Module],
    drop_path_rate: float = 0.0,
) -> BlockStack:
    """A stack of `depth` blocks whose drop-path rate grows linearly from 0 to `drop_path_rate`."""
    return BlockStack(
        Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, drop_path=rate, norm_layer=norm_layer)
        for rate in linear_drop_path_rates(drop_path_rate, depth)
    )


def linear_drop_path_rates(drop_path_rate: float, depth: int) -> List[float]:
    """torch.linspace(0, rate, depth) in plain floats, so it also works while building on the meta device."""
    if depth <= 1:
        return [0.0] * depth
    return [drop_path_rate * i / (depth - 1) for i in range(depth)]


# ---- packed blocks ----------------------------------------------------------------------------------------------
# DeepSpeed does Python work per parameter tensor every step (gradient hooks, ZeRO-3's partition and gradient
# bookkeeping, the bf16 optimizer's master copies), and at MAE-ST's few visible tokens that work, not the math, sets
# the step time (docs/performance.md). A Block has 16 parameter tensors; a PackedBlock holds the same values in two
# flat ones, one weight-decayed and one not (ViT-H MAE: 595 tensors -> 91), computes the Block's math on views into
# them, and reads and writes its state dict under the Block's names (`blocks.0.attn.q.weight`), so exports, resumes
# and loaders see an ordinary model.

FUSED_DECAY = "fused_decay"  # the flat parameters' names on a PackedBlock
FUSED_NO_DECAY = "fused_no_decay"
# Each view starts a multiple of PACK_ALIGN elements into its flat tensor (256 bytes in bf16) and each flat tensor's
# length is one too, so whatever DeepSpeed lays out after it in a shared buffer starts aligned as well. cuBLAS's
# Hopper GEMM kernels read operands through TMA, which needs 16-byte aligned addresses; a view at an odd offset sends
# the GEMM to an older, slower kernel (benchmarks/gemm_alignment.py measures it).
PACK_ALIGN = 128


def aligned_numel(numel: int, align: int = PACK_ALIGN) -> int:
    """`numel` rounded up to a multiple of `align`."""
    return -(-numel // align) * align


@dataclass(frozen=True)
class PackedSlot:
    """One parameter of a block inside a flat tensor."""

    name: str  # relative to the block, e.g. "attn.q.weight"
    shape: Tuple[int, ...]
    offset: int  # its first element in the flat tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class PackLayout:
    """Which flat tensor holds each parameter of a block, and where. The slots of a flat tensor follow the block's
    parameter order, each at a multiple of `align` elements; the gaps are zeros that never get a gradient."""

    slots: Dict[str, Tuple[PackedSlot, ...]]  # flat tensor name -> its slots
    order: Tuple[str, ...]  # the block's parameter names in their own order
    align: int = PACK_ALIGN

    @classmethod
    def of(cls, shapes: Dict[str, Tuple[int, ...]], decayed: Set[str], align: int = PACK_ALIGN) -> "PackLayout":
        groups: Dict[str, List[PackedSlot]] = {FUSED_DECAY: [], FUSED_NO_DECAY: []}
        for name, shape in shapes.items():
            group = groups[FUSED_DECAY if name in decayed else FUSED_NO_DECAY]
            offset = group[-1].offset + aligned_numel(group[-1].numel, align) if group else 0
            group.append(PackedSlot(name, tuple(shape), offset))
        return cls({flat: tuple(g) for flat, g in groups.items() if g}, tuple(shapes), align)

    def numel(self, flat: str) -> int:
        last = self.slots[flat][-1]
        return last.offset + aligned_numel(last.numel, self.align)

    def split_plan(self, flat: str) -> Tuple[List[int], List[Tuple[int, PackedSlot]]]:
        """(sizes for one `split` of the flat tensor, (piece index, slot) of each slot): slots and gaps alternate."""
        sizes, pieces, end = [], [], 0
        for slot in self.slots[flat]:
            if slot.offset > end:
                sizes.append(slot.offset - end)
            pieces.append((len(sizes), slot))
            sizes.append(slot.numel)
            end = slot.offset + slot.numel
        if self.numel(flat) > end:
            sizes.append(self.numel(flat) - end)
        return sizes, pieces

    def unpack(self, flats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Copies of the parameters in `flats` (flat name -> tensor), under their names, in the block's order. A
        flat tensor with no elements (a ZeRO-3 partition not gathered) gives empty tensors."""
        found: Dict[str, torch.Tensor] = {}
        for flat, tensor in flats.items():
            if tensor.numel() == 0:
                found.update({slot.name: tensor.new_empty(0) for slot in self.slots[flat]})
                continue
            if tensor.numel() != self.numel(flat):
                raise ValueError(f"{flat}: {tensor.numel()} elements where this block packs {self.numel(flat)}")
            sizes, pieces = self.split_plan(flat)
            parts = tensor.reshape(-1).split(sizes)
            found.update({slot.name: parts[index].reshape(slot.shape).clone() for index, slot in pieces})
        return {name: found[name] for name in self.order if name in found}

    def pack(self, flat: str, values: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The flat tensor holding `values` (name -> tensor of the slot's shape), zeros in the gaps; empty when every
        value is (ZeRO-3's module state dict of partitioned parameters)."""
        first = next(iter(values.values()))
        if all(value.numel() == 0 for value in values.values()):
            return first.new_empty(0)
        out = torch.zeros(self.numel(flat), dtype=first.dtype, device=first.device)
        for slot in self.slots[flat]:
            out.narrow(0, slot.offset, slot.numel).copy_(values[slot.name].reshape(-1))
        return out


def block_decayed_names(shapes: Dict[str, Tuple[int, ...]], bias_wd: bool) -> Set[str]:
    """The parameters of a block that mae_st.engine.optim.weight_decay_rule decays: matrices, and biases with
    bias_wd (a block holds none of the model's no_weight_decay() names). For reading flat tensors back without the
    run's config; packing itself takes the optimizer's rule."""
    return {name for name, shape in shapes.items() if len(shape) > 1 or (bias_wd and name.endswith(".bias"))}


class PackedBlock(nn.Module):
    """A Block whose parameters live in two flat tensors (see above): the same math, the Block's state-dict names.

    Built from a Block (values copied) and the set of its parameter names to decay. Forward splits each flat tensor
    once (its backward is a single concatenation of the gradients) and runs the Block's layers as functions of the
    views, so nothing is rebound between calls and ZeRO-3's gathered flat tensors are the only storage used.
    """

    def __init__(self, block: Block, decayed: Set[str], align: int = PACK_ALIGN):
        super().__init__()
        norms_ok = all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None
                       for n in (block.norm1, block.norm2))
        if not norms_ok or not isinstance(block.mlp.norm, nn.Identity):
            raise ValueError("PackedBlock computes Blocks with affine LayerNorms and timm's Mlp without a norm layer")
        params = dict(block.named_parameters())
        self.layout = PackLayout.of({name: tuple(p.shape) for name, p in params.items()}, decayed, align)
        self.norm_shape, self.eps = tuple(block.norm1.normalized_shape), (block.norm1.eps, block.norm2.eps)
        self.num_heads = block.attn.num_heads
        self.drop_path, self.proj_drop = block.drop_path, block.attn.proj_drop  # modules without parameters
        self.act, self.drop1, self.drop2 = block.mlp.act, block.mlp.drop1, block.mlp.drop2
        for flat, slots in self.layout.slots.items():
            values = {slot.name: params[slot.name].detach() for slot in slots}
            self.register_parameter(flat, nn.Parameter(self.layout.pack(flat, values)))
        self._plans = {flat: self.layout.split_plan(flat) for flat in self.layout.slots}
        self.register_state_dict_post_hook(_state_dict_under_block_names)
        self.register_load_state_dict_pre_hook(_pack_block_names)

    def weights(self, flats: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The Block's parameters as views into the flat tensors (its own, or `flats` its stack hands it), by name."""
        views = {}
        for flat, (sizes, pieces) in self._plans.items():
            parts = (getattr(self, flat) if flats is None else flats[flat]).split(sizes)
            for index, slot in pieces:
                views[slot.name] = parts[index].view(slot.shape)
        return views

    def forward(self, x: torch.Tensor, flats: Optional[Dict[str, torch.Tensor]] = None) -> torch.Tensor:
        w = self.weights(flats)
        h = F.layer_norm(x, self.norm_shape, w["norm1.weight"], w["norm1.bias"], self.eps[0])
        h = attend(F.linear(h, w["attn.q.weight"], w.get("attn.q.bias")), F.linear(h, w["attn.k.weight"],
                   w.get("attn.k.bias")), F.linear(h, w["attn.v.weight"], w.get("attn.v.bias")), self.num_heads)
        x = x + self.drop_path(self.proj_drop(F.linear(h, w["attn.proj.weight"], w["attn.proj.bias"])))
        h = F.layer_norm(x, self.norm_shape, w["norm2.weight"], w["norm2.bias"], self.eps[1])
        h = self.drop1(self.act(F.linear(h, w["mlp.fc1.weight"], w["mlp.fc1.bias"])))
        return x + self.drop_path(self.drop2(F.linear(h, w["mlp.fc2.weight"], w["mlp.fc2.bias"])))


def _state_dict_under_block_names(module: PackedBlock, state_dict, prefix: str, local_metadata) -> None:
    flats = {flat: state_dict.pop(prefix + flat) for flat in module.layout.slots if prefix + flat in state_dict}
    state_dict.update({prefix + name: value for name, value in module.layout.unpack(flats).items()})


def _pack_block_names(module: PackedBlock, state_dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """Block names -> flat tensors. A state dict that holds the flat tensors themselves loads as it is; one that
    lacks some names is left alone, so load_state_dict reports what is missing and unexpected."""
    if not module._parameters:
        return  # its stack holds the flat tensors (pack_block_stack) and packs them
    for flat in module.layout.slots:
        packed = _flat_from_block_names(module, flat, state_dict, prefix, error_msgs)
        if packed is not None:
            state_dict[prefix + flat] = packed


def _flat_from_block_names(block: PackedBlock, flat: str, state_dict, prefix: str,
                           error_msgs) -> Optional[torch.Tensor]:
    """The flat tensor `flat` of `block` (under `prefix`) packed from its Block names in `state_dict`, which loses
    them; None, leaving it as it is, when the flat tensor is there already or a name is missing or misshapen."""
    slots = block.layout.slots[flat]
    keys = [prefix + slot.name for slot in slots]
    if prefix + flat in state_dict or not all(key in state_dict for key in keys):
        return None
    wrong = [f"size mismatch for {prefix}{slot.name}: copying a param with shape {tuple(state_dict[key].shape)} "
             f"from checkpoint, the shape in current model is {slot.shape}."
             for slot, key in zip(slots, keys) if state_dict[key].numel() and state_dict[key].shape != slot.shape]
    if wrong:
        error_msgs.extend(wrong)
        return None
    return block.layout.pack(flat, {slot.name: state_dict.pop(key) for slot, key in zip(slots, keys)})


# ---- packed stacks ----------------------------------------------------------------------------------------------
# The same idea one level up, for ZeRO-3: a stack of PackedBlocks holds their flat tensors as two of its own, each
# block's share one after the other (every share a multiple of PACK_ALIGN long), so DeepSpeed's per-tensor work
# sees 2 tensors a stack instead of 2 a block (ViT-H MAE: 91 -> 23). Names in and out of state dicts stay the Block's.

def pack_block_stack(stack: BlockStack) -> None:
    """Moves the flat tensors of every PackedBlock of `stack` into two parameters of the stack (same values)."""
    blocks = list(stack)
    if not blocks or not all(isinstance(b, PackedBlock) and set(b._parameters) == set(b.layout.slots)
                             for b in blocks):
        raise ValueError("pack_block_stack packs a stack of PackedBlocks that hold their flat tensors")
    names = list(blocks[0].layout.slots)
    if any(list(b.layout.slots) != names for b in blocks):
        raise ValueError("pack_block_stack: the blocks' flat tensors differ")
    stack.block_numels = {}
    for flat in names:
        shares = [b._parameters.pop(flat) for b in blocks]
        stack.register_parameter(flat, nn.Parameter(torch.cat([share.detach() for share in shares])))
        stack.block_numels[flat] = [share.numel() for share in shares]
    stack.register_state_dict_post_hook(_stack_state_dict_under_block_names)
    stack.register_load_state_dict_pre_hook(_pack_stack_names)


def stack_shares(stack: BlockStack, flats: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The stack's flat tensors `flats` (name -> tensor) cut into its blocks' flat tensors, keyed "<i>.<flat>". A
    tensor with no elements (a ZeRO-3 partition not gathered) gives empty ones."""
    out = {}
    for flat, tensor in flats.items():
        numels = stack.block_numels[flat]
        if tensor.numel() not in (0, sum(numels)):
            raise ValueError(f"{flat}: {tensor.numel()} elements where this stack packs {sum(numels)}")
        parts = [tensor.new_empty(0)] * len(numels) if tensor.numel() == 0 else tensor.reshape(-1).split(numels)
        out.update({f"{i}.{flat}": part for i, part in enumerate(parts)})
    return out


def _stack_state_dict_under_block_names(stack: BlockStack, state_dict, prefix: str, local_metadata) -> None:
    flats = {flat: state_dict.pop(prefix + flat) for flat in stack.block_numels if prefix + flat in state_dict}
    shares = stack_shares(stack, flats)
    for i, block in enumerate(stack):
        mine = {flat: shares[f"{i}.{flat}"] for flat in block.layout.slots if f"{i}.{flat}" in shares}
        state_dict.update({f"{prefix}{i}.{name}": value for name, value in block.layout.unpack(mine).items()})


def _pack_stack_names(stack: BlockStack, state_dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """Block names, or each block's own flat tensors (a checkpoint packed per block), -> the stack's flat tensors.
    A flat tensor some block cannot give is left alone, so load_state_dict reports what is missing."""
    for flat in stack.block_numels:
        if prefix + flat in state_dict:
            continue
        own = [f"{prefix}{i}.{flat}" for i in range(len(stack))]
        if all(key in state_dict for key in own):
            shares = [state_dict.pop(key) for key in own]
        elif all(all(f"{prefix}{i}.{slot.name}" in state_dict for slot in block.layout.slots[flat])
                 for i, block in enumerate(stack)):
            shares = [_flat_from_block_names(block, flat, state_dict, f"{prefix}{i}.", error_msgs)
                      for i, block in enumerate(stack)]
            if any(share is None for share in shares):
                continue  # a misshapen name, reported in error_msgs
        else:
            continue
        state_dict[prefix + flat] = shares[0].new_empty(0) if all(s.numel() == 0 for s in shares) else \
            torch.cat([s.reshape(-1) for s in shares])


def _split_stack_flat_keys(stack: BlockStack, state_dict, prefix: str, local_metadata, strict, missing_keys,
                           unexpected_keys, error_msgs) -> None:
    """A stack that holds no flat tensors of its own, loading a state dict that names a stack's: each is cut into
    equal shares, one per block, which each block then unpacks (its blocks all have the same shapes)."""
    if stack.block_numels is not None or len(stack) == 0:
        return
    for flat in (FUSED_DECAY, FUSED_NO_DECAY):
        tensor = state_dict.get(prefix + flat)
        if tensor is None or tensor.numel() % len(stack):
            continue
        del state_dict[prefix + flat]
        for i, share in enumerate(tensor.reshape(-1).split(tensor.numel() // len(stack))):
            state_dict[f"{prefix}{i}.{flat}"] = share


def _unpack_flat_keys(module: Block, state_dict, prefix: str, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    """Flat tensors of a packed block (e.g. in a DeepSpeed checkpoint consolidated by zero_to_fp32) -> this
    Block's parameters. The layout is the one whose sizes fit: packed with or without bias_wd, aligned (since
    2026-12) or not (checkpoints written before)."""
    flats = {flat: state_dict[prefix + flat] for flat in (FUSED_DECAY, FUSED_NO_DECAY) if prefix + flat in state_dict}
    if not flats:
        return
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    for align in (PACK_ALIGN, 1):
        for bias_wd in (False, True):
            layout = PackLayout.of(shapes, block_decayed_names(shapes, bias_wd), align)
            if set(layout.slots) == set(flats) and all(layout.numel(f) == t.numel() for f, t in flats.items()):
                for flat in flats:
                    del state_dict[prefix + flat]
                state_dict.update({prefix + name: value for name, value in layout.unpack(flats).items()})
                return
    error_msgs.append(f"{prefix}: packed tensors of {[t.numel() for t in flats.values()]} elements fit no packing of "
                      f"this block ({sum(math.prod(s) for s in shapes.values())} parameters)")


def to_block_names(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`tensors` keyed by `model.named_parameters()` names (gradients, fp32 master copies, ...) with each packed
    stack's and block's flat tensors split into the Block's parameter names, as `model.state_dict()` names them."""
    out = dict(tensors)
    for name, module in model.named_modules():  # stacks first: their flat tensors -> each block's
        if isinstance(module, BlockStack) and module.block_numels is not None:
            prefix = f"{name}." if name else ""
            flats = {flat: out.pop(prefix + flat) for flat in module.block_numels if prefix + flat in out}
            out.update({prefix + key: value for key, value in stack_shares(module, flats).items()})
    for name, module in model.named_modules():
        if isinstance(module, PackedBlock):
            prefix = f"{name}." if name else ""
            flats = {flat: out.pop(prefix + flat) for flat in module.layout.slots if prefix + flat in out}
            out.update({prefix + key: value for key, value in module.layout.unpack(flats).items()})
    return out


@dataclass(frozen=True)
class PosEmbedLayout:
    """Which position-embedding parameters a token sequence uses and how they combine.

    Separable (`sep_pos_embed`): `pos_embed_spatial` (1, h*w, D) + `pos_embed_temporal` (1, t, D), broadcast over
    the time-major patch grid, plus `pos_embed_class` (1, 1, D) for the cls token. Joint: one `pos_embed`
    (1, [1 +] t*h*w, D) whose first row belongs to the cls token when there is one. The MAE decoder uses the same
    layout under the prefix "decoder_".
    """

    input_size: GridSize
    sep_pos_embed: bool
    cls_embed: bool

    @property
    def num_patches(self) -> int:
        return math.prod(self.input_size)

    def param_shapes(self, dim: int) -> Dict[str, Tuple[int, ...]]:
        t, h, w = self.input_size
        if self.sep_pos_embed:
            shapes = {"pos_embed_spatial": (1, h * w, dim), "pos_embed_temporal": (1, t, dim)}
            if self.cls_embed:
                shapes["pos_embed_class"] = (1, 1, dim)
            return shapes
        return {"pos_embed": (1, self.num_patches + int(self.cls_embed), dim)}

    def register(self, module: nn.Module, prefix: str, dim: int) -> None:
        """Adds the layout's parameters to `module` as `{prefix}pos_embed...`, trunc-normal(0.02) like the original."""
        for name, shape in self.param_shapes(dim).items():
            param = nn.Parameter(torch.zeros(shape))
            nn.init.trunc_normal_(param, std=0.02)
            module.register_parameter(prefix + name, param)

    def names(self, prefix: str = "") -> List[str]:
        return [prefix + name for name in self.param_shapes(1)]

    def patch_and_class(self, module: nn.Module, prefix: str = "") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The position embedding of every patch (1, L, D) and of the cls token (1, 1, D), or None without one."""
        t, h, w = self.input_size
        if self.sep_pos_embed:
            spatial = getattr(module, prefix + "pos_embed_spatial")
            temporal = getattr(module, prefix + "pos_embed_temporal")
            patches = spatial.repeat(1, t, 1) + torch.repeat_interleave(temporal, h * w, dim=1)
            cls = getattr(module, prefix + "pos_embed_class") if self.cls_embed else None
            return patches, cls
        joint = getattr(module, prefix + "pos_embed")
        if self.cls_embed:
            return joint[:, 1:], joint[:, :1]
        return joint, None


def interpolate_spatial_pos_embed(pos: torch.Tensor, src_hw: Tuple[int, int], dst_hw: Tuple[int, int]) -> torch.Tensor:
    """Resizes a (B, h*w, D) spatial embedding to another grid with bicubic interpolation (as MAE does)."""
    if tuple(src_hw) == tuple(dst_hw):
        return pos
    b, _, dim = pos.shape
    grid = pos.float().reshape(b, *src_hw, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(dst_hw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(b, dst_hw[0] * dst_hw[1], dim).to(pos.dtype)


def interpolate_temporal_pos_embed(pos: torch.Tensor, dst_t: int) -> torch.Tensor:
    """Resizes a (B, t, D) temporal embedding to `dst_t` steps with linear interpolation."""
    if pos.shape[1] == dst_t:
        return pos
    line = F.interpolate(pos.float().transpose(1, 2), size=dst_t, mode="linear", align_corners=False)
    return line.transpose(1, 2).to(pos.dtype)


def interpolate_joint_pos_embed(
    pos: torch.Tensor, src_size: GridSize, dst_size: GridSize, num_extra_tokens: int
) -> torch.Tensor:
    """Resizes a joint (1, extra + t*h*w, D) embedding: bicubic over space per frame, then linear over time.

    The first `num_extra_tokens` rows (the cls token's) are kept as they are.
    """
    if tuple(src_size) == tuple(dst_size):
        return pos
    extra, patches = pos[:, :num_extra_tokens], pos[:, num_extra_tokens:]
    b, _, dim = patches.shape
    src_t, src_h, src_w = src_size
    dst_t, dst_h, dst_w = dst_size
    per_frame = patches.reshape(b * src_t, src_h * src_w, dim)
    per_frame = interpolate_spatial_pos_embed(per_frame, (src_h, src_w), (dst_h, dst_w))
    per_location = per_frame.reshape(b, src_t, dst_h * dst_w, dim).transpose(1, 2).reshape(-1, src_t, dim)
    per_location = interpolate_temporal_pos_embed(per_location, dst_t)
    patches = per_location.reshape(b, dst_h * dst_w, dst_t, dim).transpose(1, 2).reshape(b, -1, dim)
    return torch.cat([extra, patches], dim=1)


def init_vit_weights(module: nn.Module, trunc_init: bool) -> None:
    """The original's init: Linear xavier-uniform (or trunc-normal 0.02) with zero bias, LayerNorm to identity,
    and the patch projection initialised like a Linear over its flattened kernel."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            if trunc_init:
                nn.init.trunc_normal_(m.weight, std=0.02)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            weight = m.proj.weight.data
            if trunc_init:
                nn.init.trunc_normal_(weight)
            else:
                nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
