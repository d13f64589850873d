"""Batch augmentations of finetuning, applied by the trainer to each step's batch on the device.

They run after the trainer seeded the step's generators from (seed, rank, step), so a resumed run draws the same
boxes, pairings and lambdas as the uninterrupted one; `build_batch_transform` pairs them with the soft targets the
classification loss reads (as timm pairs Mixup with SoftTargetCrossEntropy).

Random erasing picks one box per clip and erases it in every frame (the box must not jump between frames);
mixup/cutmix is timm's `Mixup` run on (B, C*T, H, W) views so cutmix cuts the same region from all frames.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from timm.data import Mixup

from mae_st.config import DataConfig


class ClipRandomErasing:
    """timm-style random erasing for (B, C, T, H, W) clips: `count` boxes per clip, the same in all frames."""

    def __init__(self, probability: float, mode: str = "pixel", count: int = 1,
                 area: tuple = (0.02, 1 / 3), aspect: tuple = (0.3, 1 / 0.3)):
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"DataConfig.remode={mode!r}: expected 'pixel', 'rand' or 'const'")
        self.probability, self.mode, self.count = probability, mode, count
        self.area, self.log_aspect = area, (math.log(aspect[0]), math.log(aspect[1]))

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        _, channels, frames, height, width = clips.shape
        for clip in clips:
            if torch.rand(()) >= self.probability:
                continue
            for _ in range(self.count):
                box = self._sample_box(height, width)
                if box is not None:
                    top, left, h, w = box
                    clip[:, :, top : top + h, left : left + w] = self._fill(channels, frames, h, w, clips)
        return clips

    def _sample_box(self, height: int, width: int) -> Optional[tuple]:
        for _ in range(10):
            area = height * width * float(torch.empty(()).uniform_(*self.area))
            aspect = math.exp(float(torch.empty(()).uniform_(*self.log_aspect)))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < h < height and 0 < w < width:
                top = int(torch.randint(0, height - h + 1, ()))
                left = int(torch.randint(0, width - w + 1, ()))
                return top, left, h, w
        return None

    def _fill(self, channels: int, frames: int, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        # values are in normalised units, so N(0, 1) noise matches timm's "pixel" mode
        if self.mode == "pixel":
            return torch.randn((channels, 1, h, w), dtype=like.dtype, device=like.device)
        if self.mode == "rand":
            return torch.randn((channels, 1, 1, 1), dtype=like.dtype, device=like.device)
        return torch.zeros((), dtype=like.dtype, device=like.device)


class ClipMixup:
    """timm Mixup/CutMix with label smoothing on (B, C, T, H, W) clips -> (clips, soft targets)."""

    def __init__(self, cfg: DataConfig, num_classes: int):
        self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, cutmix_minmax=cfg.cutmix_minmax,
                           prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                           label_smoothing=cfg.smoothing, num_classes=num_classes)

    def __call__(self, clips: torch.Tensor, labels: torch.Tensor) -> tuple:
        b, c, t, h, w = clips.shape
        if b % 2:
            raise ValueError(f"mixup needs an even number of clips per step, got {b}; "
                             "change DataConfig.batch_size_per_gpu or repeat_aug")
        flat, targets = self.mixup(clips.view(b, c * t, h, w), labels)
        return flat.view(b, c, t, h, w), targets


def mixup_enabled(cfg: DataConfig) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0 or cfg.cutmix_minmax is not None


BatchTransform = Callable[[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor]]


def build_batch_transform(cfg: DataConfig, mode: str, num_classes: int) -> Optional[BatchTransform]:
    """(clips, labels) -> (clips, targets) for a finetuning step: random erasing, then mixup/cutmix with smoothed
    soft targets; None when neither is on or in pretraining."""
    if mode != "finetune":
        return None
    erase = ClipRandomErasing(cfg.reprob, cfg.remode, cfg.recount) if cfg.reprob > 0 else None
    mixup = ClipMixup(cfg, num_classes) if mixup_enabled(cfg) else None
    if erase is None and mixup is None:
        return None

    def transform(clips: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if erase is not None:
            clips = erase(clips)
        return mixup(clips, labels) if mixup is not None else (clips, labels)

    return transform
