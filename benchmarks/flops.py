"""Analytic FLOP counts for one MAE-ST or ViT training step, the denominator of every MFU figure we report.

Method: count the matmul FLOPs of one forward pass (2 FLOPs per multiply-add) of every linear layer, the 3D patch
embedding (a per-patch linear map) and attention's two batched products (QK^T and AV); a training step is 3x the
forward (backward = 2x forward). Norms, softmax, GELU, gathers and the optimizer are not counted: they are the
overheads MFU is meant to expose.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerShape:
    tokens: int
    width: int
    depth: int
    mlp_ratio: float = 4.0

    def forward_flops(self) -> float:
        n, d = self.tokens, self.width
        linear = 2 * n * d * d * (4 + 2 * self.mlp_ratio)  # q, k, v, proj + fc1, fc2
        attention = 2 * 2 * n * n * d  # QK^T and AV over all heads
        return self.depth * (linear + attention)


def mae_train_flops_per_clip(*, img_size: int, patch_size: int, num_frames: int, t_patch_size: int,
                             embed_dim: int, depth: int, decoder_embed_dim: int, decoder_depth: int,
                             mask_ratio: float, pred_t_dim: int, cls_embed: bool = True,
                             embed_all_patches: bool = True) -> float:
    """Training FLOPs of one clip through the MAE-ST encoder (visible tokens) and decoder (all tokens)."""
    grid = (num_frames // t_patch_size) * (img_size // patch_size) ** 2
    keep = int(grid * (1 - mask_ratio))
    extra = 1 if cls_embed else 0
    patch_dim = 3 * t_patch_size * patch_size**2
    pred_dim = 3 * (t_patch_size * pred_t_dim // num_frames) * patch_size**2
    embedded = grid if embed_all_patches else keep
    forward = (
        2 * embedded * patch_dim * embed_dim
        + TransformerShape(keep + extra, embed_dim, depth).forward_flops()
        + 2 * keep * embed_dim * decoder_embed_dim
        + TransformerShape(grid + extra, decoder_embed_dim, decoder_depth).forward_flops()
        + 2 * grid * decoder_embed_dim * pred_dim
    )
    return 3 * forward


def vit_train_flops_per_clip(*, img_size: int, patch_size: int, num_frames: int, t_patch_size: int,
                             embed_dim: int, depth: int, num_classes: int, cls_embed: bool = False) -> float:
    """Training FLOPs of one clip through the ViT classifier (every token)."""
    grid = (num_frames // t_patch_size) * (img_size // patch_size) ** 2
    patch_dim = 3 * t_patch_size * patch_size**2
    forward = (
        2 * grid * patch_dim * embed_dim
        + TransformerShape(grid + (1 if cls_embed else 0), embed_dim, depth).forward_flops()
        + 2 * embed_dim * num_classes
    )
    return 3 * forward


def train_flops_per_clip(model) -> float:
    """Training FLOPs of one clip through a built `MaskedAutoencoderViT` or `VisionTransformer`, its sizes read
    off the model so the count cannot drift from what was measured."""
    embed = model.patch_embed
    mlp_ratio = model.blocks[0].mlp.fc1.out_features / model.embed_dim
    if mlp_ratio != 4.0:
        raise ValueError(f"flops.py counts MLPs of ratio 4; this model's is {mlp_ratio}")
    geometry = dict(img_size=embed.img_size, patch_size=embed.patch_size, num_frames=embed.num_frames,
                    t_patch_size=embed.t_patch_size, embed_dim=model.embed_dim, depth=model.depth,
                    cls_embed=model.cls_embed)
    if hasattr(model, "decoder_blocks"):
        return mae_train_flops_per_clip(**geometry, decoder_embed_dim=model.decoder_embed_dim,
                                        decoder_depth=model.decoder_depth, mask_ratio=model.mask_ratio,
                                        pred_t_dim=model.pred_t_dim)
    return vit_train_flops_per_clip(**geometry, num_classes=model.num_classes)
