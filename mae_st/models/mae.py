"""MAE-ST pretraining model: a video ViT encoder sees a random ~10% of spacetime patches, a light decoder
reconstructs the pixels of the rest (Feichtenhofer et al., "Masked Autoencoders As Spatiotemporal Learners").

Behaves like facebookresearch/mae_st `models_mae.py` (same masking, target and loss), with the same parameter names.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Set, Tuple

import torch
import torch.nn as nn

from mae_st.models.backbone import TokenCounts, VideoViTBackbone
from mae_st.models.layers import default_norm_layer, init_vit_weights, make_blocks
from mae_st.models.registry import register_model


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[n, ids[n, i]] for every sample n: picks (or reorders) tokens of a (N, L, D) sequence."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class MaskedAutoencoderViT(VideoViTBackbone):
    """Masked autoencoder with a video ViT backbone; `forward(clips) -> (loss, pred, mask)`."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 4,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer: Callable[[int], nn.Module] = default_norm_layer,
        norm_pix_loss: bool = True,
        num_frames: int = 16,
        t_patch_size: int = 2,
        no_qkv_bias: bool = False,
        sep_pos_embed: bool = True,
        trunc_init: bool = False,
        cls_embed: bool = True,
        pred_t_dim: int = 8,
        mask_ratio: float = 0.9,
        grad_checkpointing: bool = False,
    ):
        super().__init__(
            img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, num_frames, t_patch_size,
            no_qkv_bias, sep_pos_embed, cls_embed, norm_layer, grad_checkpointing=grad_checkpointing,
        )  # fmt: skip
        if pred_t_dim > num_frames or (t_patch_size * pred_t_dim) % num_frames:
            raise ValueError(
                f"pred_t_dim={pred_t_dim} must be <= num_frames={num_frames} and t_patch_size*pred_t_dim "
                f"({t_patch_size}*{pred_t_dim}) a multiple of num_frames, so each token predicts whole frames"
            )
        self._check_mask_ratio(mask_ratio)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.pred_t_dim = pred_t_dim
        self.t_pred_patch_size = t_patch_size * pred_t_dim // num_frames
        self.decoder_embed_dim = decoder_embed_dim
        self.decoder_depth = decoder_depth
        # (frames, device) -> the target frames' index, made once: copied to the GPU at every step, it made the host
        # wait there for the queued forward (a copy from pageable memory synchronises its stream). Not a buffer:
        # ZeRO-3's consolidated state dict would export it, and pretrained checkpoints would no longer load.
        self._frame_indexes: Dict[Tuple[int, torch.device], torch.Tensor] = {}

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        if cls_embed:
            self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))  # zeros, as the original
        self.pos_layout.register(self, "decoder_", decoder_embed_dim)
        self.decoder_blocks = make_blocks(
            decoder_depth, decoder_embed_dim, decoder_num_heads, mlp_ratio, not no_qkv_bias, norm_layer
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(
            decoder_embed_dim, self.t_pred_patch_size * patch_size**2 * in_chans, bias=True
        )

        init_vit_weights(self, trunc_init)
        if trunc_init:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        else:
            nn.init.normal_(self.mask_token, std=0.02)

    # ---- bookkeeping -------------------------------------------------------------------------------------------

    @staticmethod
    def _check_mask_ratio(mask_ratio: float) -> None:
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1) (the loss is over masked patches), got {mask_ratio}")

    def len_keep(self, mask_ratio: Optional[float] = None) -> int:
        """Visible (unmasked) patches per clip: int(L * (1 - mask_ratio)), exactly the original's rounding."""
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        return int(self.num_patches * (1 - ratio))

    def token_counts(self, mask_ratio: Optional[float] = None) -> TokenCounts:
        extra = int(self.cls_embed)
        return TokenCounts(encoder=self.len_keep(mask_ratio) + extra, decoder=self.num_patches + extra)

    def no_weight_decay(self) -> Set[str]:
        names = super().no_weight_decay() | {"mask_token"} | set(self.pos_layout.names("decoder_"))
        return names | ({"decoder_cls_token"} if self.cls_embed else set())

    # ---- pixels <-> patches ------------------------------------------------------------------------------------

    def patchify(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, C, pred_t_dim, H, W) -> (N, L, t_pred_patch_size * p * p * C), in the decoder's token order."""
        n, c, t_frames, h_pix, w_pix = frames.shape
        p, u = self.patch_embed.patch_size, self.t_pred_patch_size
        t, h, w = t_frames // u, h_pix // p, w_pix // p
        x = frames.reshape(n, c, t, u, h, p, w, p)
        x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)  # n t h w u p q c
        return x.reshape(n, t * h * w, u * p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of `patchify` for this model's grid: (N, L, u*p*p*C) -> (N, C, pred_t_dim, H, W)."""
        n = x.shape[0]
        t, h, w = self.input_size
        p, u, c = self.patch_embed.patch_size, self.t_pred_patch_size, self.in_chans
        x = x.reshape(n, t, h, w, u, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)  # n c t u h p w q
        return x.reshape(n, c, t * u, h * p, w * p)

    def frame_index(self, frames: int) -> torch.Tensor:
        """The pred_t_dim of `frames` frames the decoder reconstructs (on the CPU): evenly spaced, truncated like the
        original."""
        return torch.linspace(0, frames - 1, self.pred_t_dim, device="cpu").long()

    def target_frames(self, clips: torch.Tensor) -> torch.Tensor:
        """The decoder's target frames of (N, C, T, H, W) clips."""
        key = (clips.shape[2], clips.device)
        index = self._frame_indexes.get(key)
        if index is None:
            index = self._frame_indexes[key] = self.frame_index(clips.shape[2]).to(clips.device)
        return torch.index_select(clips, 2, index)

    def prediction_target(self, clips: torch.Tensor) -> torch.Tensor:
        """Per-patch regression target (N, L, D): target frames patchified, normalised per patch if norm_pix_loss."""
        target = self.patchify(self.target_frames(clips))
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    # ---- model -------------------------------------------------------------------------------------------------

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keeps the `len_keep` tokens with the smallest noise per sample.

        Returns (visible tokens (N, len_keep, D), mask (N, L) with 1 = masked, ids_restore, ids_keep).
        """
        n, length, _ = x.shape
        len_keep = self.len_keep(mask_ratio)
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape (batch, num_patches) = ({n}, {length}), got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return gather_tokens(x, ids_keep), mask, ids_restore, ids_keep

    def forward_encoder(
        self, clips: torch.Tensor, mask_ratio: float, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encodes only the visible patches; returns (latent without cls (N, len_keep, D), mask, ids_restore)."""
        x = self.patch_embed(clips)
        x, mask, ids_restore, ids_keep = self.random_masking(x, mask_ratio, noise)
        patch_pos, cls_pos = self.pos_layout.patch_and_class(self)
        x = x + gather_tokens(patch_pos.expand(x.shape[0], -1, -1), ids_keep)
        x = self._prepend_cls(x, cls_pos)
        x = self.norm(self._run_encoder_blocks(x))
        return x[:, int(self.cls_embed) :], mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """Fills masked positions with the mask token and predicts every patch's pixels: (N, L, u*p*p*C)."""
        x = self.decoder_embed(latent)
        n, num_visible, dim = x.shape
        mask_tokens = self.mask_token.expand(n, self.num_patches - num_visible, -1)
        x = gather_tokens(torch.cat([x, mask_tokens], dim=1), ids_restore)
        patch_pos, cls_pos = self.pos_layout.patch_and_class(self, "decoder_")
        x = x + patch_pos
        if self.cls_embed:
            x = torch.cat([(self.decoder_cls_token + cls_pos).expand(n, -1, -1), x], dim=1)
        x = self.decoder_blocks(x, self.grad_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, int(self.cls_embed) :]

    def forward_loss(self, clips: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over masked patches of the per-patch MSE between prediction and target."""
        per_patch = ((pred - self.prediction_target(clips)) ** 2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()

    def forward(
        self, clips: torch.Tensor, mask_ratio: Optional[float] = None, noise: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """clips (N, C, T, H, W) -> (loss, pred (N, L, u*p*p*C), mask (N, L), 1 = masked).

        `mask_ratio` defaults to the configured one; pass `noise` (N, L) to choose the mask reproducibly.
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        self._check_mask_ratio(ratio)
        latent, mask, ids_restore = self.forward_encoder(clips, ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(clips, pred, mask), pred, mask


def _mae(patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=4.0, **kwargs
    )


@register_model("mae")
def mae_vit_tiny_patch8(**kwargs) -> MaskedAutoencoderViT:
    """A toy model for tests and demos (64-dim, 2 blocks); its decoder is small unless told otherwise."""
    kwargs = {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 4, **kwargs}
    return _mae(8, 64, 2, 4, **kwargs)


@register_model("mae")
def mae_vit_mini_patch16(**kwargs) -> MaskedAutoencoderViT:
    """The demo's model (128-dim, 4 blocks): 64 px clips are 4x4 patches a frame, so a CPU trains it in minutes."""
    return _mae(16, 128, 4, 4, **kwargs)


@register_model("mae")
def mae_vit_small_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(16, 384, 12, 6, **kwargs)


@register_model("mae")
def mae_vit_base_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(16, 768, 12, 12, **kwargs)


@register_model("mae")
def mae_vit_large_patch16(**kwargs) -> MaskedAutoencoderViT:
    return _mae(16, 1024, 24, 16, **kwargs)


@register_model("mae")
def mae_vit_huge_patch14(**kwargs) -> MaskedAutoencoderViT:
    return _mae(14, 1280, 32, 16, **kwargs)
