"""A synthetic data source: a fixed set of generated clips resident on the training device.

`--train_shards synthetic:N` (and `--val_shards synthetic:N`) stands in for packed shards. It serves two jobs:
throughput benchmarks of the model step without any decoding, and engine tests that need a learnable, exactly
reproducible clip set. Clip i has label i % num_classes and is a smooth class pattern plus a little
per-clip noise, so an MAE can learn to reconstruct it and a classifier can learn its label.
The epoch order is a pure function of (seed, epoch), like the shard loader's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F

from mae_st.config import DataConfig
from mae_st.data.batch import Batch

SYNTHETIC_PREFIX = "synthetic:"
_PATTERN_SEED = 1234  # the clips are the same for every run; only their order depends on --seed


def is_synthetic(spec: str) -> bool:
    return spec.startswith(SYNTHETIC_PREFIX)


def synthetic_size(spec: str) -> int:
    """N of a "synthetic:N" spec."""
    count = spec[len(SYNTHETIC_PREFIX):]
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"synthetic data spec {spec!r}: expected synthetic:N with N >= 1 clips, e.g. synthetic:64")
    return int(count)


@dataclass
class SyntheticStats:
    """Mirrors the shard loader's stats: what was delivered so far."""

    samples: int = 0
    bad_samples: int = 0
    wait_seconds: float = 0.0

    def record(self) -> dict:
        return {"samples": self.samples, "bad_samples": self.bad_samples}


def make_clips(cfg: DataConfig, num_samples: int, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, T, H, W) normalised-looking clips and (N,) labels, identical on every rank and run."""
    gen = torch.Generator().manual_seed(_PATTERN_SEED)
    classes = max(num_classes, 1)
    t, s = cfg.num_frames, cfg.img_size
    coarse = torch.randn(classes, 3, max(t // 2, 1), 4, 4, generator=gen)
    patterns = F.interpolate(coarse, size=(t, s, s), mode="trilinear", align_corners=False)
    labels = torch.arange(num_samples) % classes
    noise = 0.1 * torch.randn(num_samples, 3, t, s, s, generator=gen)
    return patterns[labels] + noise, labels


class SyntheticLoader:
    """Training iterator over the generated clips: (clips (B * repeat_aug, C, T, H, W), labels) on `device`."""

    def __init__(self, cfg: DataConfig, num_samples: int, num_classes: int, *, rank: int, world_size: int,
                 device: torch.device, seed: int, dtype: torch.dtype = torch.float32):
        if num_samples // world_size < cfg.batch_size_per_gpu:
            raise ValueError(f"synthetic:{num_samples} cannot fill one batch of {cfg.batch_size_per_gpu} on each "
                             f"of {world_size} ranks; use more clips")
        clips, labels = make_clips(cfg, num_samples, num_classes)
        self.clips, self.labels = clips.to(device=device, dtype=dtype), labels.to(device)
        self.cfg, self.rank, self.world_size, self.seed = cfg, rank, world_size, seed
        self.epoch, self.start_step = 0, 0
        self.stats = SyntheticStats()

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def stats_record(self) -> dict:
        return self.stats.record()

    def __len__(self) -> int:
        return (len(self.clips) // self.world_size) // self.cfg.batch_size_per_gpu

    def __iter__(self) -> Iterator[Batch]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.clips), generator=gen)
        per_rank = len(self.clips) // self.world_size
        part = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        batch, repeats = self.cfg.batch_size_per_gpu, self.cfg.repeat_aug
        for step in range(self.start_step, len(self)):
            started = time.perf_counter()
            index = part[step * batch : (step + 1) * batch].to(self.clips.device).repeat_interleave(repeats)
            clips, labels = self.clips[index], self.labels[index]
            self.stats.samples += batch
            self.stats.wait_seconds += time.perf_counter() - started
            yield Batch(clips, labels)


class SyntheticEvalLoader:
    """Evaluation iterator: every clip of this rank's part as several temporally shifted views, with video ids."""

    def __init__(self, cfg: DataConfig, num_samples: int, num_classes: int, *, rank: int, world_size: int,
                 device: torch.device, dtype: torch.dtype = torch.float32):
        clips, labels = make_clips(cfg, num_samples, num_classes)
        lo, hi = num_samples * rank // world_size, num_samples * (rank + 1) // world_size
        self.clips, self.labels = clips[lo:hi].to(device=device, dtype=dtype), labels[lo:hi].to(device)
        self.ids: List[str] = [f"synthetic{i}" for i in range(lo, hi)]
        self.views = cfg.test_num_ensemble_views * cfg.test_num_spatial_crops
        self.batch = cfg.batch_size_per_gpu
        self.stats = SyntheticStats()

    def stats_record(self) -> dict:
        return self.stats.record()

    def __len__(self) -> int:
        return math.ceil(len(self.clips) / self.batch)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(0, len(self.clips), self.batch):
            clips = self.clips[start : start + self.batch]
            views = torch.cat([clips.roll(v, dims=2) for v in range(self.views)])  # view-major order
            labels = self.labels[start : start + self.batch].repeat(self.views)
            ids = self.ids[start : start + self.batch] * self.views
            self.stats.samples += len(clips)
            yield Batch(views, labels, ids)
