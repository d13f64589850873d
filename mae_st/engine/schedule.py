"""Learning-rate schedule: linear warmup, then a half-cycle cosine down to min_lr, evaluated every step."""

from __future__ import annotations

import math

import torch

from mae_st.config import OptimConfig

BASE_BATCH = 256  # the original's lr scaling rule: lr = blr * effective_batch / 256


def effective_batch(batch_size_per_gpu: int, repeat_aug: int, accum_iter: int, world_size: int) -> int:
    """Clips per optimizer step over all ranks; repeated clips count, as the original counts them."""
    return batch_size_per_gpu * repeat_aug * accum_iter * world_size


def base_lr(cfg: OptimConfig, eff_batch: int) -> float:
    """--lr when given, else --blr scaled by the effective batch."""
    return cfg.lr if cfg.lr is not None else cfg.blr * eff_batch / BASE_BATCH


def lr_at(epoch: float, peak_lr: float, cfg: OptimConfig) -> float:
    """The lr at a fractional epoch (epoch + step / steps_per_epoch)."""
    if epoch < cfg.warmup_epochs:
        return peak_lr * epoch / cfg.warmup_epochs
    span = cfg.epochs - cfg.warmup_epochs
    progress = min((epoch - cfg.warmup_epochs) / span, 1.0) if span > 0 else 1.0
    return cfg.min_lr + (peak_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Sets every param group's lr to lr * its lr_scale (layer-wise decay; 1 when absent)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
