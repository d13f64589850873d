"""Picks the data source for a run: the DALI shard loader, or the synthetic clips for `synthetic:N` specs."""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from mae_st.config import DataConfig
from mae_st.data.synthetic import SyntheticEvalLoader, SyntheticLoader, is_synthetic, synthetic_size
from mae_st.engine.distributed import DistEnv


def build_train_data(cfg: DataConfig, mode: str, num_classes: int, env: DistEnv, seed: int,
                     dtype: torch.dtype, state_dir: Optional[str] = None) -> Iterable:
    """Iterable of `Batch`es on env.device with len() = steps per epoch, set_epoch(epoch, start_step) and
    stats_record(); `state_dir` (the run's output folder) keeps the bad samples met, for resumed runs."""
    if is_synthetic(cfg.train_shards):
        return SyntheticLoader(cfg, synthetic_size(cfg.train_shards), num_classes, rank=env.rank,
                               world_size=env.world_size, device=env.device, seed=seed, dtype=dtype)
    from mae_st.data.loader import build_train_loader  # DALI is imported only when shards are read

    return build_train_loader(cfg, mode, num_classes, env.rank, env.world_size, env.device, seed=seed, dtype=dtype,
                              state_dir=state_dir)


def build_eval_data(cfg: DataConfig, num_classes: int, env: DistEnv, dtype: torch.dtype,
                    state_dir: Optional[str] = None) -> Iterable:
    """Iterable of `Batch`es with video_ids: every view of this rank's part of --val_shards."""
    if is_synthetic(cfg.val_shards):
        return SyntheticEvalLoader(cfg, synthetic_size(cfg.val_shards), num_classes, rank=env.rank,
                                   world_size=env.world_size, device=env.device, dtype=dtype)
    from mae_st.data.loader import build_eval_loader

    return build_eval_loader(cfg, env.rank, env.world_size, env.device, dtype=dtype, state_dir=state_dir)
