"""Video ViT classifier for finetuning a pretrained MAE-ST encoder (facebookresearch/mae_st `models_vit.py`).

Parameter names match the original: the encoder's (`patch_embed`, `cls_token`, `pos_embed*`, `blocks`, `norm`)
plus `head`. As in the original, `norm` is applied after global pooling (there is no separate `fc_norm`), so a
pretrained encoder's `norm` is reused as the pooled-feature norm.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from mae_st.models.backbone import TokenCounts, VideoViTBackbone
from mae_st.models.layers import default_norm_layer, init_vit_weights
from mae_st.models.registry import register_model


class VisionTransformer(VideoViTBackbone):
    """Video ViT with global average pooling (or the cls token) and a linear head; `forward(clips) -> logits`."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 400,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = default_norm_layer,
        num_frames: int = 16,
        t_patch_size: int = 2,
        no_qkv_bias: bool = False,
        sep_pos_embed: bool = True,
        cls_embed: bool = True,
        trunc_init: bool = False,
        drop_path_rate: float = 0.1,
        dropout: float = 0.5,
        global_pool: bool = True,
        head_init_scale: float = 2e-5,
        grad_checkpointing: bool = False,
    ):
        if not global_pool and not cls_embed:
            raise ValueError("global_pool=False classifies from the cls token, which needs cls_embed=True")
        super().__init__(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, num_frames, t_patch_size,
            no_qkv_bias, sep_pos_embed, cls_embed, norm_layer, drop_path_rate, grad_checkpointing,
        )  # fmt: skip
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)

        init_vit_weights(self, trunc_init)
        # MAE finetuning starts the head near zero so the pretrained features are not disturbed early on
        nn.init.trunc_normal_(self.head.weight, std=head_init_scale)
        nn.init.zeros_(self.head.bias)

    def token_counts(self) -> TokenCounts:
        return TokenCounts(encoder=self.num_patches + int(self.cls_embed), decoder=0)

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips (N, C, T, H, W) -> normalised clip feature (N, D) before dropout and head."""
        x = self.patch_embed(clips)
        patch_pos, cls_pos = self.pos_layout.patch_and_class(self)
        x = self._prepend_cls(x + patch_pos, cls_pos)
        x = self._run_encoder_blocks(x)
        if self.global_pool:
            pooled = x[:, int(self.cls_embed) :].mean(dim=1)  # patch tokens only, never the cls token
        else:
            pooled = x[:, 0]
        return self.norm(pooled)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        """clips (N, C, T, H, W) -> logits (N, num_classes)."""
        return self.head(self.dropout(self.forward_features(clips)))


def _vit(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs) -> VisionTransformer:
    return VisionTransformer(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, **kwargs
    )


@register_model("classifier")
def vit_tiny_patch8(**kwargs) -> VisionTransformer:
    """A toy model for tests and demos (64-dim, 2 blocks)."""
    return _vit(8, 64, 2, 4, **kwargs)


@register_model("classifier")
def vit_mini_patch16(**kwargs) -> VisionTransformer:
    """The demo's classifier (128-dim, 4 blocks), the encoder of mae_vit_mini_patch16."""
    return _vit(16, 128, 4, 4, **kwargs)


@register_model("classifier")
def vit_small_patch16(**kwargs) -> VisionTransformer:
    return _vit(16, 384, 12, 6, **kwargs)


@register_model("classifier")
def vit_base_patch16(**kwargs) -> VisionTransformer:
    return _vit(16, 768, 12, 12, **kwargs)


@register_model("classifier")
def vit_large_patch16(**kwargs) -> VisionTransformer:
    return _vit(16, 1024, 24, 16, **kwargs)


@register_model("classifier")
def vit_huge_patch14(**kwargs) -> VisionTransformer:
    return _vit(14, 1280, 32, 16, **kwargs)
