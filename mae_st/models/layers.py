"""Building blocks shared by the MAE-ST pretraining model and the video classifier.

Module and parameter names follow facebookresearch/mae_st (`util/video_vit.py`) so its released checkpoints load
without converters. Nothing here reads a parameter's shape during forward: grid sizes are plain ints fixed at
construction, which keeps the layers correct when DeepSpeed ZeRO-3 partitions the parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

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

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        return x.view(n, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        out = F.scaled_dot_product_attention(self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x)))
        out = out.transpose(1, 2).reshape(n, length, dim)
        return self.proj_drop(self.proj(out))


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BlockStack(nn.ModuleList):
    """Transformer blocks applied in order, as one module: under ZeRO-3 the engine gathers a whole stack at once
    (mae_st/engine/zero.py). Parameter names are those of a plain ModuleList (`blocks.0.attn.q.weight`)."""

    def forward(self, x: torch.Tensor, grad_checkpointing: bool = False) -> torch.Tensor:
        """With grad_checkpointing, each block's activations are recomputed in backward instead of stored."""
        checkpointed = grad_checkpointing and torch.is_grad_enabled()
        for block in self:
            x = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        return x


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
