"""The video ViT encoder that the MAE and the classifier both extend: patch embedding, cls token, position
embeddings, transformer blocks and final norm, under the original's top-level parameter names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Set

import torch
import torch.nn as nn

from mae_st.models.layers import PatchEmbed, PosEmbedLayout, default_norm_layer, make_blocks


@dataclass(frozen=True)
class TokenCounts:
    """Tokens each transformer stack processes per clip (cls token included), for FLOP accounting."""

    encoder: int
    decoder: int


class VideoViTBackbone(nn.Module):
    """Encoder shared by both model families; subclasses add a decoder (MAE) or a head (classifier)."""

    def __init__(
        self,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        num_frames: int,
        t_patch_size: int,
        no_qkv_bias: bool,
        sep_pos_embed: bool,
        cls_embed: bool,
        norm_layer: Callable[[int], nn.Module] = default_norm_layer,
        drop_path_rate: float = 0.0,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.depth = depth
        self.in_chans = in_chans
        self.sep_pos_embed = sep_pos_embed
        self.cls_embed = cls_embed
        self.grad_checkpointing = grad_checkpointing

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, num_frames, t_patch_size)
        self.input_size = self.patch_embed.input_size
        self.num_patches = self.patch_embed.num_patches
        self.pos_layout = PosEmbedLayout(self.input_size, sep_pos_embed, cls_embed)
        if cls_embed:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_layout.register(self, "", embed_dim)
        self.blocks = make_blocks(
            depth, embed_dim, num_heads, mlp_ratio, not no_qkv_bias, norm_layer, drop_path_rate=drop_path_rate
        )
        self.norm = norm_layer(embed_dim)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward instead of storing them (less memory, ~1/3 more compute)."""
        self.grad_checkpointing = enable

    def no_weight_decay(self) -> Set[str]:
        """Names of the token and position-embedding parameters, which the original excludes from weight decay."""
        names = {"cls_token"} if self.cls_embed else set()
        return names | set(self.pos_layout.names())

    def _prepend_cls(self, x: torch.Tensor, cls_pos: Optional[torch.Tensor]) -> torch.Tensor:
        """Puts the cls token, with its position embedding, in front of the (already embedded) patch tokens."""
        if not self.cls_embed:
            return x
        cls = (self.cls_token + cls_pos).expand(x.shape[0], -1, -1)
        return torch.cat([cls, x], dim=1)

    def _run_encoder_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x, self.grad_checkpointing)
