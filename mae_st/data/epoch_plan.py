"""Which samples each rank reads in an epoch, and how many steps an epoch has.

Every rank derives the same global order from (seed, epoch): the tars are permuted (samples keep their stored
order inside a tar, so reads stay sequential) and the resulting list is cut into `world_size` contiguous parts.
The parts are disjoint and together cover every sample, so an epoch sees each sample once across ranks.
"""

from __future__ import annotations

import random
from typing import List, Sequence

from mae_st.data.index import SampleRef


def epoch_order(per_tar: Sequence[Sequence[SampleRef]], seed: int, epoch: int, shuffle: bool) -> List[SampleRef]:
    """All samples in this epoch's global order (the same on every rank)."""
    tar_order = list(range(len(per_tar)))
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(tar_order)
    return [sample for t in tar_order for sample in per_tar[t]]


def rank_part(samples: Sequence[SampleRef], rank: int, world_size: int) -> List[SampleRef]:
    """The contiguous part of `samples` that `rank` reads; part sizes differ by at most one."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    n = len(samples)
    return list(samples[n * rank // world_size : n * (rank + 1) // world_size])


def train_steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs: the smallest part holds n // world samples; the tail is dropped (drop_last)."""
    steps = (num_samples // world_size) // batch_size
    if steps == 0:
        raise ValueError(f"{num_samples} samples cannot fill one batch of {batch_size} on each of {world_size} "
                         "ranks; use more data, fewer ranks or a smaller DataConfig.batch_size_per_gpu")
    return steps
